"""Compile before measuring: every Triton kernel variant the GPU run will use, compiled up front and
in parallel, so that no later stage spends its budget in the compiler.

The run's kernels come from three places, read here rather than copied:
  e2e    the pre-training step of each model in bench_e2e's plan (from the model YAMLs: ViT
         self-attention on a fused qkv, text self-attention with padding and dropout, the
         decoder's causal attention, cross-attention to the image tokens; the ITC loss, its
         hard-negative sampler and the LM cross-entropy at the plan's batches);
  tests  tests/kernels/test_attention.py's GPU_CASES (read with `ast`, nothing imported), in bf16 and fp16;
  micro  benchmarks/bench_attention.py's CASES and bench_losses.py's CASES.

A *job* launches one workload (shape, layout, dtype, flags) through the kernels' own launchers
with one tiling forced for each of the forward, dQ and dK/dV kernels: job i forces the i-th
config of each kernel's autotuning space (after the autotuner's own pruning), so the jobs of a
workload compile every config the autotuner may try. Nothing is tuned here (tuning on tiny
inputs, or beside 15 other processes, would cache wrong choices); the compiled binaries land in
Triton's on-disk cache, where the autotuner and every later process find them. The ITC,
sampler and cross-entropy kernels have no tuning space: one job each runs the op at the real
shape (their tile counts are compile-time constants of the shape).

The *units* are what Triton compiles: (kernel, constexprs, warps, stages, dtype, the integer
arguments' specialisation: == 1, divisible by 16, or neither). Jobs that add no new unit are
dropped. On the GPU the jobs run in a process pool (one worker per core); on the CPU (dry run)
the plan is enumerated and reported, and `--compile-sm90 N` compiles N of the attention units
for sm_90 (Triton's compiler with an explicit target needs no GPU) to prove they compile.

    python benchmarks/warmup.py                    # GPU: compile everything, 16 workers
    python benchmarks/warmup.py --dry-run --list   # CPU: print the plan
    python benchmarks/warmup.py --dry-run --compile-sm90 4

Packed text (exact work: `varlen_attention`, the e2e model's text and bench_attention's
VARLEN_CASES) runs at fixed tiles: one job per workload launches the forward and both backward
schedules on five sequences whose totals are not multiples of 16 (Triton specialises integers that
are; a batch whose totals are compiles those variants when it first runs). Kernels that a checkout
adds later are compiled here once a workload function below lists them; until then they compile
when first used.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DTYPE_NAMES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Attn:
    """One attention call site: q (B, H, Lq, D), k/v (B, H, Lk, D) in `layout`; or, with layout
    "packed", variable-length sequences of at most Lq queries and Lk keys (`varlen_attention`)."""
    H: int
    Lq: int
    Lk: int
    D: int
    causal: bool
    mask: bool
    dropout: bool
    layout: str  # fused_qkv | heads_view | contiguous | packed
    dtype: str


@dataclass(frozen=True)
class Itc:
    B: int
    Q: int
    E: int
    dtype: str


@dataclass(frozen=True)
class Ce:
    N: int
    V: int
    C: int
    dtype: str


@dataclass
class Job:
    family: str  # attention | itc | ce
    workload: object
    config_index: int = 0  # attention: the i-th config of each kernel's pruned space
    sources: List[str] = field(default_factory=list)
    units: List[str] = field(default_factory=list)

    def describe(self) -> str:
        w = self.workload
        if self.family == "attention":
            flags = "".join(c for c, on in (("C", w.causal), ("M", w.mask), ("P", w.dropout)) if on) or "-"
            return (f"attention {w.dtype} H{w.H} {w.Lq}x{w.Lk} d{w.D} {flags} {w.layout} cfg#{self.config_index}")
        if self.family == "itc":
            return f"itc+sampler {w.dtype} B{w.B} Q{w.Q} E{w.E}"
        return f"ce {w.dtype} N{w.N} V{w.V} C{w.C}"


# ---------------------------------------------------------------------------------------------
# workloads


def model_workloads(model: str, batches: List[int]) -> Tuple[List[Attn], List[Itc], List[Ce]]:
    """The kernels one pre-training step of `model` launches (bf16 autocast)."""
    import bench_e2e

    cfg = bench_e2e.load_config(model, bench_e2e.PROVIDERS["blipfast"])
    v, t = cfg.vision, cfg.text
    n_img = (v.image_size // v.patch_size) ** 2 + 1
    L = cfg.max_text_len
    dv, dt = v.width // v.num_heads, t.hidden_size // t.num_attention_heads
    drop = t.attention_probs_dropout_prob > 0
    from blipfast.kernels.flash_attention import SUPPORTED_HEAD_DIMS

    attn = [
        Attn(v.num_heads, n_img, n_img, dv, False, False, False, "fused_qkv", "bf16"),  # ViT (+ momentum)
        Attn(t.num_attention_heads, L, L, dt, False, True, drop, "heads_view", "bf16"),  # text encoder
        Attn(t.num_attention_heads, L, L, dt, True, True, drop, "heads_view", "bf16"),  # decoder
        Attn(t.num_attention_heads, L, n_img, dt, False, False, drop, "heads_view", "bf16"),  # cross
    ]
    if cfg.exact_work:  # text on its real tokens only: the packed kernels (varlen_attention)
        attn += [
            Attn(t.num_attention_heads, L, L, dt, False, False, drop, "packed", "bf16"),  # text encoder
            Attn(t.num_attention_heads, L, L, dt, True, False, drop, "packed", "bf16"),  # decoder
            Attn(t.num_attention_heads, L, n_img, dt, False, False, drop, "packed", "bf16"),  # cross
        ]
    attn = [a for a in attn if a.D in SUPPORTED_HEAD_DIMS]  # others run elsewhere (sdpa)
    itc = [Itc(B, cfg.queue_size, cfg.embed_dim, "bf16") for B in batches]
    ce = [Ce(B * (L - 1), t.vocab_size, t.hidden_size, "bf16") for B in batches]
    return attn, itc, ce


def e2e_workloads(dry: bool):
    import bench_e2e

    plan = bench_e2e.DRY_RUN_PLAN if dry else bench_e2e.DEFAULT_PLAN
    by_model: Dict[str, List[int]] = {}
    for model, batch, _ in plan:
        by_model.setdefault(model, []).append(batch)
    out = ([], [], [])
    for model, batches in by_model.items():
        for acc, got in zip(out, model_workloads(model, batches)):
            acc.extend(got)
    return out


def _literal(path: str, name: str):
    """The literal value assigned to `name` at the top of a Python file (never imported)."""
    tree = ast.parse(open(path).read(), path)
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == name:
                return ast.literal_eval(node.value)
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):  # A, B = 1, 2
                for t, v in zip(target.elts, node.value.elts):
                    if isinstance(t, ast.Name) and t.id == name:
                        return ast.literal_eval(v)
    raise KeyError(f"{name} not found in {path}")


def test_workloads() -> List[Attn]:
    """tests/kernels/test_attention.py's GPU cases: (B, H, Lq, Lk, D, causal, mask kind, layout)."""
    path = os.path.join(REPO, "tests", "kernels", "test_attention.py")
    out = []
    try:
        cases = _literal(path, "GPU_CASES")
    except (OSError, KeyError, ValueError, SyntaxError) as e:
        print(f"[warmup] tests/kernels/test_attention.py: no GPU_CASES literal ({e}); its kernels compile when run")
        return out
    for (_B, H, Lq, Lk, D, causal, mask_kind, layout) in cases.values():
        for dt in ("bf16", "fp16"):
            out.append(Attn(H, Lq, Lk, D, causal, mask_kind is not None, False, layout, dt))
    # the dropout test and the every-config test (test_gpu_dropout_*, test_gpu_every_tuning_config_*)
    out.append(Attn(12, 35, 35, 64, False, True, True, "heads_view", "bf16"))
    out.append(Attn(4, 97, 203, 64, True, True, False, "heads_view", "bf16"))
    out.append(Attn(4, 197, 197, 64, False, True, False, "fused_qkv", "fp32"))  # the fp32 test
    return out


def micro_workloads(dry: bool):
    attn, itc, ce = [], [], []
    try:
        cases = _literal(os.path.join(HERE, "bench_attention.py"), "CASES")
        with_dropout = _literal(os.path.join(HERE, "bench_attention.py"), "DROPOUT_CASES")
        for name, (_B, H, Lq, Lk, D, causal, padded, layout) in cases.items():
            for drop in (False, True) if name in with_dropout else (False,):
                attn.append(Attn(H, Lq, Lk, D, causal, padded, drop, layout, "bf16"))
        for (_B, H, D, causal, lk) in _literal(os.path.join(HERE, "bench_attention.py"), "VARLEN_CASES").values():
            for drop in (False, True):  # every packed case also runs with dropout
                attn.append(Attn(H, 30, lk or 30, D, causal, False, drop, "packed", "bf16"))  # captions <= 30
    except (OSError, KeyError, ValueError, SyntaxError) as e:
        print(f"[warmup] bench_attention.py: no CASES literal ({e})")
    try:
        path = os.path.join(HERE, "bench_losses.py")
        cases = _literal(path, "CASES")
        q, e_, v, c, L = (_literal(path, n) for n in ("QUEUE", "EMBED", "VOCAB", "HIDDEN", "TEXT_LEN"))
        if not dry:
            for B, dt in cases:
                itc.append(Itc(B, q, e_, dt))
                ce.append(Ce(B * (L - 1), v, c, dt))
    except (OSError, KeyError, ValueError, SyntaxError) as e:
        print(f"[warmup] bench_losses.py: constants not found ({e})")
    return attn, itc, ce


# ---------------------------------------------------------------------------------------------
# the plan: jobs and the compile units they add


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def make_qkv(w: Attn, B: int, device: str):
    import torch

    dt = _torch_dtype(w.dtype)
    kw = dict(device=device, dtype=dt)
    if w.layout == "fused_qkv":
        assert w.Lq == w.Lk
        q, k, v = torch.randn(B, w.Lq, 3, w.H, w.D, **kw).permute(2, 0, 3, 1, 4).unbind(0)
    elif w.layout == "heads_view":
        q, k, v = (torch.randn(B, L, w.H, w.D, **kw).transpose(1, 2) for L in (w.Lq, w.Lk, w.Lk))
    else:
        q, k, v = (torch.randn(B, w.H, L, w.D, **kw) for L in (w.Lq, w.Lk, w.Lk))
    mask = None
    if w.mask:
        mask = torch.ones(B, w.Lk, dtype=torch.bool, device=device)
        mask[:, w.Lk // 2 + 1:] = False
    dout = torch.randn(B, w.Lq, w.H, w.D, **kw).transpose(1, 2)  # gradients arrive as merged heads
    return q, k, v, mask, dout


def make_packed(w: Attn, device: str):
    """Packed inputs for a "packed" workload: five sequences, the longest of w.Lq queries, a
    single-token one among them; keys are the queries' own (self-attention) or w.Lk per sequence
    (cross-attention to image tokens). Returns (q, k, v, cu_q, cu_k, max_q, max_k, dout)."""
    import torch

    from blipfast.ops.packing import Packing

    lens_q = [w.Lq, max(1, w.Lq // 2 + 1), min(w.Lq, 7), 1, min(w.Lq, 3)]
    if sum(lens_q) % 16 == 0:  # Triton specialises integers divisible by 16: keep the common case
        lens_q[-1] = 2
    lens_k = lens_q if w.Lk == w.Lq else [w.Lk] * len(lens_q)
    kw = dict(device=device, dtype=_torch_dtype(w.dtype))
    q = torch.randn(sum(lens_q), w.H, w.D, **kw)
    k, v = (torch.randn(sum(lens_k), w.H, w.D, **kw) for _ in range(2))

    def cu(lens):  # the model's own packing: int32 (B + 1,) cumulative lengths from 0
        return Packing.from_lengths(torch.tensor(lens, device=device), max(lens)).cu_seqlens

    return q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), torch.randn_like(q)


def packed_units(w: Attn) -> List[List[str]]:
    """The compile units of a packed workload: one job, the forward, dQ, dK/dV and fused kernels at
    their fixed packed tiles (VARLEN_BLOCKS; fp32: FP32_BLOCKS, no fused backward)."""
    from blipfast.kernels import flash_attention as fa

    q, k, v, cu_q, cu_k, _, max_k, _ = make_packed(w, "cpu")  # tiny; the fused schedule runs on it
    args = fa._varlen_args(q, k, cu_q, cu_k, w.causal, 0.1 if w.dropout else 0.0, 1)
    fp32 = w.dtype == "fp32"
    flags = {k_: args[k_] for k_ in ("HEAD_DIM", "IS_CAUSAL", "HAS_MASK", "VARLEN", "HAS_DROPOUT")}
    flags.update(UPCAST=fp32, DOT_PREC="ieee" if fp32 else "tf32")
    ints = f"Lq={_spec(q.shape[0])},Lk={_spec(k.shape[0])},H={_spec(w.H)}"
    units = []
    for kind in ("fwd", "dq", "dkdv") if fp32 else ("fwd", "dq", "dkdv", "dkdv_fused"):
        bm, bn, warps, stages = (fa.FP32_BLOCKS if fp32 else fa.VARLEN_BLOCKS)[kind]
        # the fused kernel's key-tile group: 1 (packed short sequences, a constant to Triton) or the
        # chunks of a long key sequence (197 image tokens)
        group = fa.varlen_fused_schedule(cu_q, cu_k, k.shape[0], max_k, bn)[2] if kind == "dkdv_fused" else 1
        units.append(json.dumps({"kernel": kind, "dtype": w.dtype, **flags, "BLOCK_M": bm, "BLOCK_N": bn,
                                 "num_warps": warps, "num_stages": stages, "ints": ints + f",group={_spec(group)}"},
                                sort_keys=True))
    return [units]


def _spec(v) -> str:
    """Triton's integer specialisation: 1, divisible by 16, or neither."""
    if isinstance(v, bool) or not isinstance(v, int):
        return repr(v)
    return "1" if v == 1 else ("d16" if v % 16 == 0 else "n")


def attention_units(w: Attn) -> List[List[str]]:
    """For each config index, the compile units (one per kernel: fwd, dq, dkdv) of workload w.

    Computed from meta tensors through the launchers' own helpers (_dense_args, the EVEN_* rules,
    the autotuner's prune function), so it follows the kernels' code, not a copy of it."""
    from blipfast.kernels import flash_attention as fa

    if w.layout == "packed":
        return packed_units(w)

    q, k, v, mask, dout = make_qkv(w, 2, "meta")
    args = fa._dense_args(q, k, mask, w.causal, 0.1 if w.dropout else 0.0, 1)
    # what a GPU launch gets, also when this process runs under TRITON_INTERPRET (CI): there
    # only fp32 upcasts (the interpreter also upcasts bf16, a CPU-only workaround)
    args.update(UPCAST=w.dtype == "fp32", DOT_PREC="ieee" if w.dtype == "fp32" else "tf32", INTERPRET=False)
    if args["UPCAST"]:  # fp32: one fixed tiling
        per_kind = {kind: [fa.FP32_BLOCKS[kind]] for kind in fa._KERNELS}
    else:
        per_kind = {}
        for kind in fa._KERNELS:
            cfgs = fa.prune(fa.gpu_configs(kind), dict(args))
            per_kind[kind] = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cfgs]
    out = fa.empty_blhd(2, w.H, w.Lq, w.D, q)
    ints = {**fa._strides(q, "sqb sqh sqm sqd"), **fa._strides(k, "skb skh skn skd"),
            **fa._strides(v, "svb svh svn svd"), **fa._strides(out, "sob soh som sod"),
            **fa._strides(dout, "sdob sdoh sdom sdod"), "smb": args["smb"], "smn": args["smn"],
            "H": w.H, "Lq": w.Lq, "Lk": w.Lk, "LQ_BUCKET": args["LQ_BUCKET"], "LK_BUCKET": args["LK_BUCKET"]}
    ints_key = ",".join(f"{k_}={_spec(v_)}" for k_, v_ in sorted(ints.items()))
    flags = {k_: args[k_] for k_ in ("HEAD_DIM", "IS_CAUSAL", "HAS_MASK", "VARLEN", "HAS_DROPOUT", "UPCAST",
                                     "DOT_PREC")}
    n = max(len(c) for c in per_kind.values())
    jobs = []
    for i in range(n):
        units = []
        for kind, cfgs in per_kind.items():
            bm, bn, warps, stages = cfgs[min(i, len(cfgs) - 1)]
            even = {"EVEN_M": w.Lq % bm == 0, "EVEN_N": w.Lk % bn == 0}
            units.append(json.dumps({"kernel": kind, "dtype": w.dtype, **flags, **even, "BLOCK_M": bm,
                                     "BLOCK_N": bn, "num_warps": warps, "num_stages": stages,
                                     "ints": ints_key}, sort_keys=True))
        jobs.append(units)
    return jobs


def attention_configs(w: Attn, i: int) -> Dict[str, tuple]:
    """The forced tilings of job i (what attention_units described)."""
    units = attention_units(w)[i]
    out = {}
    for u in map(json.loads, units):
        out[u["kernel"]] = (u["BLOCK_M"], u["BLOCK_N"], u["num_warps"], u["num_stages"])
    return out


def build_plan(dry: bool, sources=("e2e", "tests", "micro")) -> List[Job]:
    gathered: List[Tuple[str, object]] = []
    if "e2e" in sources:
        a, i, c = e2e_workloads(dry)
        gathered += [("e2e", x) for x in a + i + c]
    if "tests" in sources:
        gathered += [("tests", x) for x in test_workloads()]
    if "micro" in sources:
        a, i, c = micro_workloads(dry)
        gathered += [("micro", x) for x in a + i + c]
    jobs: Dict[tuple, Job] = {}
    seen_units = set()
    for source, w in gathered:
        if isinstance(w, Attn):
            for idx, units in enumerate(attention_units(w)):
                key = ("attention", w, idx)
                if key in jobs:
                    jobs[key].sources.append(source) if source not in jobs[key].sources else None
                    continue
                new = [u for u in units if u not in seen_units]
                if not new:
                    continue
                seen_units.update(new)
                jobs[key] = Job("attention", w, idx, [source], new)
        else:
            fam = "itc" if isinstance(w, Itc) else "ce"
            key = (fam, w, 0)
            if key in jobs:
                if source not in jobs[key].sources:
                    jobs[key].sources.append(source)
                continue
            jobs[key] = Job(fam, w, 0, [source], [json.dumps({"kernel": fam, **asdict(w)}, sort_keys=True)])
    return list(jobs.values())


# ---------------------------------------------------------------------------------------------
# running a job (on the GPU, in a pool worker)


def run_job(job: Job, dev: str = "cuda") -> Tuple[str, bool, float, Optional[str]]:
    """Launch the job's kernels once (compiling them). `dev` is "cpu" only in tests, under
    TRITON_INTERPRET=1, where nothing is compiled but every launch's arguments are checked."""
    t0 = time.time()
    try:
        import torch

        w = job.workload
        if job.family == "attention":
            from blipfast.kernels import flash_attention as fa

            if w.layout == "packed":  # fixed tiles: the launchers pick them; both backward schedules
                q, k, v, cu_q, cu_k, mq, mk, dout = make_packed(w, dev)
                p, scale = (0.1 if w.dropout else 0.0), fa.default_scale(w.D)
                o, lse = fa.varlen_forward(q, k, v, cu_q, cu_k, mq, mk, w.causal, p, scale, 1234)
                for fused in (False, True) if w.dtype != "fp32" else (False,):
                    fa.varlen_backward(dout, q, k, v, o, lse, cu_q, cu_k, mq, mk, w.causal, p, scale, 1234,
                                       fused_dq=fused)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return job.describe(), True, time.time() - t0, None
            q, k, v, mask, dout = make_qkv(w, 2, dev)
            cfg = attention_configs(w, job.config_index)
            if w.dtype == "fp32":
                cfg = None  # the fixed fp32 tiling, as the launcher picks it
            p = 0.1 if w.dropout else 0.0
            scale = fa.default_scale(w.D)
            o, lse = fa.forward(q, k, v, mask, w.causal, p, scale, 1234, config=cfg)
            # both backward schedules, forced: the default measures them at first use (nothing is
            # timed here), and the fused one has a single config, compiled with the first job
            fa.backward(dout, q, k, v, o, lse, mask, w.causal, p, scale, 1234, config=cfg, fused_dq=False)
            if job.config_index == 0 and w.dtype != "fp32":
                fa.backward(dout, q, k, v, o, lse, mask, w.causal, p, scale, 1234, config=cfg, fused_dq=True)
        elif job.family == "itc":
            import torch.nn.functional as F

            from blipfast.kernels import itc

            dt = _torch_dtype(w.dtype)
            feats = [F.normalize(torch.randn(w.B, w.E, device=dev), dim=-1).to(dt) for _ in range(4)]
            for f in feats[:2]:
                f.requires_grad_(True)
            queues = [F.normalize(torch.randn(w.E, w.Q, device=dev), dim=0) for _ in range(2)]
            temp = torch.full((1,), 0.07, device=dev, requires_grad=True)
            loss, s_i2t, s_t2i = itc.itc_loss(*feats, *queues, temp, 0.4)
            loss.backward()
            itc.sample_hard_negatives(s_i2t, s_t2i, seed=1)
        else:
            from blipfast.kernels.cross_entropy import lm_cross_entropy

            dt = _torch_dtype(w.dtype)
            h = torch.randn(w.N, w.C, device=dev, dtype=dt, requires_grad=True)
            wt = (torch.randn(w.V, w.C, device=dev) * 0.05).to(dt).requires_grad_(True)
            b = torch.zeros(w.V, device=dev, dtype=dt, requires_grad=True)
            y = torch.randint(0, w.V, (w.N,), device=dev)
            lm_cross_entropy(h, wt, b, y, label_smoothing=0.1).backward()
            with torch.no_grad():  # the no-grad variant (WRITE_GRAD=False): momentum / eval paths
                lm_cross_entropy(h, wt, b, y, label_smoothing=0.1)
        if dev == "cuda":
            torch.cuda.synchronize()
        return job.describe(), True, time.time() - t0, None
    except Exception as e:  # noqa: BLE001 - a job that fails compiles when first used instead
        return job.describe(), False, time.time() - t0, f"{type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc()[-800:]}"


def _compile_sm90(unit: str) -> Tuple[str, bool, float, Optional[str]]:
    """Compile one attention unit for sm_90 without a GPU, as the static audit does
    (`kernel_audit.compile_sm90`: Triton's compiler with an explicit target, the launch's types)."""
    t0 = time.time()
    u = json.loads(unit)
    try:
        from kernel_audit import ATTN_BASE, compile_sm90  # benchmarks/ is on sys.path here

        from blipfast.kernels import flash_attention as fa

        fn = fa._KERNELS.get(u["kernel"], fa._attn_bwd_dkdv)  # "dkdv_fused": dK/dV with FUSED_DQ
        consts = {k: u[k] for k in ("HEAD_DIM", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "UPCAST", "DOT_PREC",
                                    "EVEN_M", "EVEN_N", "BLOCK_M", "BLOCK_N", "VARLEN") if k in u}
        consts.update(FUSED_DQ=u["kernel"] == "dkdv_fused", INTERPRET=False)
        for name, value in ATTN_BASE.items():  # constexprs a unit does not name take the audit's values
            consts.setdefault(name, value)
        k = compile_sm90(fn, consts, u["num_warps"], u["num_stages"], elem=u["dtype"])
        return f"{u['kernel']} {u['dtype']} {u['BLOCK_M']}x{u['BLOCK_N']} smem {k.metadata.shared}", True, \
            time.time() - t0, None
    except Exception as e:  # noqa: BLE001
        return unit, False, time.time() - t0, f"{type(e).__name__}: {str(e)[:300]}"


def _pool(workers: int, fn, items, deadline: float, log) -> Tuple[List[tuple], bool]:
    """Run fn over items in `workers` processes until `deadline`; returns (results, timed out)."""
    results = []
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    futs = [ex.submit(fn, it) for it in items]
    try:
        for f in cf.as_completed(futs, timeout=max(deadline - time.time(), 1.0)):
            r = f.result()
            results.append(r)
            log(f"[warmup] {'ok ' if r[1] else 'ERR'} {r[2]:5.1f} s  {r[0]}" + (f"\n{r[3]}" if r[3] else ""))
    except cf.TimeoutError:
        log(f"[warmup] budget reached: {len(futs) - len(results)} jobs left to compile on first use")
        # stop the workers now (a compile in flight would otherwise outlive this process and hold
        # its output open); the executor has no public call for that
        workers_now = list(getattr(ex, "_processes", {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for p in workers_now:
            p.kill()
        return results, True
    ex.shutdown(wait=True)
    return results, False


def main(argv=None) -> int:
    import harness

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", default=harness.is_dry_run())
    ap.add_argument("--workers", type=int, default=int(os.environ.get("BLIPFAST_WARMUP_WORKERS", 0)) or None)
    ap.add_argument("--budget-s", type=float, default=90.0)
    ap.add_argument("--sources", default="e2e,tests,micro")
    ap.add_argument("--list", action="store_true", help="print every job and its units")
    ap.add_argument("--plan-out", default=None, help="write the plan (jobs and units) as JSON here")
    ap.add_argument("--compile-sm90", type=int, default=0, metavar="N",
                    help="CPU: compile the first N attention units for sm_90 (proves they compile)")
    ap.add_argument("--results", default=None, help="append a 'compile' row here")
    ap.add_argument("--run-id", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    jobs = build_plan(args.dry_run or not cuda, tuple(s for s in args.sources.split(",") if s))
    units = [u for j in jobs for u in j.units]
    by_kernel: Dict[str, int] = {}
    for u in units:
        name = json.loads(u)["kernel"]
        by_kernel[name] = by_kernel.get(name, 0) + 1
    print(f"[warmup] plan: {len(jobs)} jobs, {len(units)} compile units ({', '.join(f'{k} {v}' for k, v in sorted(by_kernel.items()))})",
          flush=True)
    if args.list:
        for j in jobs:
            print(f"  {j.describe():60s} from {'+'.join(j.sources)}: {len(j.units)} units")
    if args.plan_out:
        with open(args.plan_out, "w") as f:
            json.dump([{"job": j.describe(), "family": j.family, "sources": j.sources,
                        "units": [json.loads(u) for u in j.units]} for j in jobs], f, indent=1)
    workers = args.workers or min(16, os.cpu_count() or 1)
    results: List[tuple] = []
    timed_out = False
    mode = "enumerate"
    if cuda:
        mode = "compile"
        order = sorted(jobs, key=lambda j: (j.family != "attention", -j.workload.D if j.family == "attention" else 0))
        results, timed_out = _pool(workers, run_job, order, deadline, lambda m: print(m, flush=True))
    elif args.compile_sm90:
        mode = "compile-sm90"
        attn_units = [u for j in jobs if j.family == "attention" for u in j.units][:args.compile_sm90]
        env_interp = os.environ.pop("TRITON_INTERPRET", None)
        try:
            results, timed_out = _pool(min(workers, len(attn_units)) or 1, _compile_sm90, attn_units, deadline,
                                       lambda m: print(m, flush=True))
        finally:
            if env_interp is not None:
                os.environ["TRITON_INTERPRET"] = env_interp
    failed = [r for r in results if not r[1]]
    secs = time.time() - t0
    print(f"[warmup] {mode}: {len(results)} done, {len(failed)} failed, {secs:.1f} s with {workers} workers",
          flush=True)
    if args.results:
        cfg = {"mode": mode, "jobs": len(jobs), "units": len(units), "units_by_kernel": by_kernel,
               "done": len(results), "failed": len(failed), "workers": workers, "seconds": round(secs, 1),
               "failed_jobs": [r[0] for r in failed][:20]}
        status, reason = "ok", None
        if failed:
            status, reason = "fail", f"{len(failed)} of {len(results)} jobs failed: {failed[0][0]}: {(failed[0][3] or '')[:200]}"
        elif timed_out:
            status, reason = "error", f"budget reached after {len(results)} of {len(jobs)} jobs"
        harness.append_rows([harness.make_row(args.run_id or harness.new_run_id(), "compile", "kernel warmup",
                                              "triton kernels", "warmup", "run", cfg, status=status,
                                              reason=reason)], args.results)
    rc = 1 if failed else 0
    if timed_out:  # workers still compiling: do not wait for them (they die with this process group)
        sys.stdout.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
