"""End-to-end BLIP pre-training step: images/s, ms/step by phase, peak memory, MFU.

One step = forward (ITC + ITM + LM, momentum update, queue update, hard-negative sampling),
backward, AdamW step: `blipfast.BlipForPretraining` through its public API, on random
images and padded random captions already on the device (data loading is not timed).

Providers (what is compared, per model and batch; ratios are against reference-fp32 of the
same run, and against the fastest 'switches' row). Each is a dict of BlipConfig overrides plus
precision / compile / optimiser switches (PROVIDER_LIST): a new row is one line there.
  original-fp32          the original code (PyPI blip-vit), where importable; else a skip row
  reference-fp32         blipfast, reference attention and losses, fp32, exact_work off (the original's math)
  sdpa-bf16              bf16 autocast + SDPA + fused AdamW, exact_work off: what a user gets by flipping switches
  sdpa-bf16-compile      the same + torch.compile of every tower ("switches-only", the headline peer)
  sdpa-bf16-exact        sdpa-bf16 with exact_work on (packed text, K/V once per image)
  xformers-bf16          bf16 autocast + xformers attention, if that backend is registered
  blipfast               blipfast's defaults (auto backends = the Triton kernels on a GPU, and the
                         config's exact-work savings) in bf16
  blipfast-compile       the same + torch.compile
  blipfast-no-exact-work blipfast with `exact_work: False`
  triton-bf16(-compile)  the Triton kernels forced for attention and losses

Cases run in a worker subprocess; if a case kills it (a CUDA error poisons the process), the
case gets an error row and a fresh worker carries on with the rest. Before each case the worker
checks the time budget and writes a skip row for a case that would not fit.

    python benchmarks/bench_e2e.py                      # the default plan on the GPU
    python benchmarks/bench_e2e.py --dry-run            # tiny model on the CPU, every code path
    python benchmarks/bench_e2e.py --cases base_224:64:sdpa-bf16,base_224:64:triton-bf16
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling scripts (harness, flops) are not a package
    sys.path.insert(0, HERE)

import harness  # noqa: E402
from blipfast import flops as flop_formulas  # noqa: E402

REPO = harness.REPO
MODELS = {
    "tiny": "configs/blip_tiny.yaml",
    "base_224": "configs/blip_base_224.yaml",
    "base_384": "configs/blip_base_384.yaml",
    "large_384": "configs/blip_large_384.yaml",  # activation checkpointing on (config)
}


@dataclass(frozen=True)
class Provider:
    """One way of running the step. `overrides` are BlipConfig overrides (dotted keys) applied on
    top of the model YAML and the command line's --set: a provider is a config-override dict, so a
    new row (say blipfast without a feature) is one line in PROVIDER_LIST."""
    name: str
    tier: str  # original | reference | switches | fused (blipfast)
    precision: str  # fp32 | bf16 (autocast)
    overrides: Tuple[Tuple[str, object], ...] = ()
    compile: bool = False
    fused_adamw: bool = False
    baseline: bool = False

    @property
    def config_overrides(self) -> Dict[str, object]:
        return dict(self.overrides)

    @property
    def attention(self) -> str:
        return str(self.config_overrides.get("attention_backend", "auto"))

    @property
    def losses(self) -> str:
        return str(self.config_overrides.get("loss_backend", "auto"))


def _p(name, tier, precision, overrides=None, **kw) -> Provider:
    return Provider(name, tier, precision, tuple(sorted((overrides or {}).items())), **kw)


# The baseline and switches-only rows compute what the original computes (exact_work off: padded
# text, K/V per pair); blipfast's rows take the config default (exact work on).
REFERENCE = {"attention_backend": "reference", "loss_backend": "reference", "exact_work": False}
SWITCHES = {"attention_backend": "sdpa", "loss_backend": "reference", "exact_work": False}
TRITON = {"attention_backend": "triton", "loss_backend": "triton"}
PROVIDER_LIST = [
    _p("original-fp32", "original", "fp32", {"attention_backend": "-", "loss_backend": "-"}),
    # the original's math in fp32: the baseline of every ratio (parity tests hold it to the original)
    _p("reference-fp32", "reference", "fp32", REFERENCE, baseline=True),
    # switches only: what a user gets from bf16 autocast + SDPA (+ torch.compile) + fused AdamW
    _p("sdpa-bf16", "switches", "bf16", SWITCHES, fused_adamw=True),
    _p("sdpa-bf16-compile", "switches", "bf16", SWITCHES, compile=True, fused_adamw=True),
    # the same switches plus exact work: what the savings alone buy on SDPA
    _p("sdpa-bf16-exact", "switches", "bf16", {**SWITCHES, "exact_work": True}, fused_adamw=True),
    _p("xformers-bf16", "switches", "bf16", {"attention_backend": "xformers", "loss_backend": "reference"},
       fused_adamw=True),
    # blipfast as shipped: the config's defaults (auto backends: the Triton kernels on a GPU;
    # exact-work savings where the config has them)
    _p("blipfast", "fused", "bf16", {}, fused_adamw=True),
    _p("blipfast-compile", "fused", "bf16", {}, compile=True, fused_adamw=True),
    _p("blipfast-no-exact-work", "fused", "bf16", {"exact_work": False}, fused_adamw=True),
    # the Triton kernels forced (no auto fallback)
    _p("triton-bf16", "fused", "bf16", TRITON, fused_adamw=True),
    _p("triton-bf16-compile", "fused", "bf16", TRITON, compile=True, fused_adamw=True),
]
PROVIDERS: Dict[str, Provider] = {p.name: p for p in PROVIDER_LIST}

# Ordered by what matters most if the budget runs out: the headline at base 224, batch 64
# (the original baseline, blipfast's default, switches-only: eager SDPA first, a few seconds, so a
# switches row exists even if torch.compile's minutes do not fit), then the rest of that group,
# the large batch, BLIP large (checkpointed), base 384. original-fp32 is first because it only
# costs its skip row on the GPU image.
DEFAULT_PLAN = [
    ("base_224", 64, ["original-fp32", "reference-fp32", "blipfast", "sdpa-bf16", "sdpa-bf16-compile",
                      "blipfast-no-exact-work", "sdpa-bf16-exact", "triton-bf16", "xformers-bf16",
                      "blipfast-compile"]),
    ("base_224", 256, ["reference-fp32", "sdpa-bf16", "blipfast"]),
    ("large_384", 32, ["reference-fp32", "sdpa-bf16", "blipfast"]),
    ("base_384", 32, ["reference-fp32", "sdpa-bf16", "blipfast"]),
]
DRY_RUN_PLAN = [("tiny", 2, list(PROVIDERS))]
TOWERS = ("visual_encoder", "visual_encoder_m", "text_encoder", "text_encoder_m", "text_decoder")
# Rough device rates and set-up costs for the time-budget check only (never reported). Each row
# records what its set-up really took (config.setup_s, config.first_steps_s) to recalibrate these.
EST_RATE = {"fp32": 35e12, "bf16": 250e12}
EST_BUILD_S = 8.0  # model init on the device, optimiser, batch
# Triton: autotuning every attention variant of the model (a few configs x ~30 ms each), plus
# compiling whatever the compile stage (benchmarks/warmup.py) did not; cold = nothing warmed.
EST_TRITON_WARM_S = float(os.environ.get("BLIPFAST_EST_TRITON_WARM_S", 15.0))
EST_TRITON_COLD_S = float(os.environ.get("BLIPFAST_EST_TRITON_COLD_S", 90.0))
# torch.compile (inductor) of the five towers, forward and backward, on 16 cores
EST_COMPILE_S = float(os.environ.get("BLIPFAST_EST_COMPILE_S", 100.0))
WARMED_ENV = "BLIPFAST_KERNELS_WARMED"  # set by run_all.py after a successful compile stage


def parse_cases(text: str) -> List[Tuple[str, int, str]]:
    cases = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in MODELS or parts[2] not in PROVIDERS or not parts[1].isdigit():
            raise SystemExit(f"bad case {item!r}: want MODEL:BATCH:PROVIDER with MODEL in {sorted(MODELS)} "
                             f"and PROVIDER in {sorted(PROVIDERS)}")
        cases.append((parts[0], int(parts[1]), parts[2]))
    return cases


def case_id(model: str, batch: int, provider: str) -> str:
    return f"{model}:{batch}:{provider}"


# ---------------------------------------------------------------------------------------------
# one case


def load_config(model: str, provider: Provider, overrides: Optional[Dict[str, object]] = None):
    from blipfast import BlipConfig

    over = {**(overrides or {}), **provider.config_overrides}
    return BlipConfig.from_yaml(os.path.join(REPO, MODELS[model]), over)


def make_batch(cfg, batch: int, device, seed: int = 0):
    """Random normalised images and padded captions: [CLS] w1..wn [SEP] [PAD]..., n varies."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tc, L, S = cfg.text, cfg.max_text_len, cfg.vision.image_size
    images = torch.randn(batch, 3, S, S, generator=g)
    # Ordinary word ids lie between the low special tokens ([PAD], [CLS], [SEP]...) and the high
    # ones ([DEC], [ENC] appended at the end of BERT's vocabulary).
    specials = (tc.pad_token_id, tc.cls_token_id, tc.sep_token_id, tc.dec_token_id, tc.enc_token_id)
    low = max([t for t in specials if t < tc.vocab_size // 2], default=-1) + 1
    high = min([t for t in specials if t >= tc.vocab_size // 2], default=tc.vocab_size)
    ids = torch.randint(low, high, (batch, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (batch,), generator=g)  # tokens incl. [CLS] and [SEP]
    pos = torch.arange(L)[None, :]
    ids[:, 0] = tc.cls_token_id
    ids[pos == (lengths[:, None] - 1)] = tc.sep_token_id
    mask = (pos < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, tc.pad_token_id)
    return images.to(device), ids.to(device), mask.to(device)


class PhaseRecorder:
    """Device timestamps at the boundaries of each tower's forward (module hooks, eager only).

    The gaps between towers are named by what the model does there (momentum update, ITC loss
    with queue update and negative sampling, ITM head, LM head + loss).
    """

    NAMES = {"visual_encoder": "vit", "visual_encoder_m": "vit_m", "text_encoder_m": "text_m",
             "text_decoder": "lm"}
    GAPS = {("text<", "vit_m>"): "ema", ("text_m<", "itm>"): "itc", ("itm<", "lm>"): "itm_loss",
            ("lm<", "forward_end"): "lm_loss", ("start", "forward_end"): "fwd",
            ("forward_end", "backward_end"): "bwd", ("backward_end", "optimizer_end"): "opt"}

    def __init__(self, model, clock, hooks: bool):
        self.clock, self.marks, self.handles = clock, [], []
        if hooks:
            for attr in TOWERS:
                mod = getattr(model, attr)
                self.handles.append(mod.register_forward_pre_hook(self._hook(attr, ">"), with_kwargs=True))
                self.handles.append(mod.register_forward_hook(self._hook(attr, "<"), with_kwargs=True))

    def _hook(self, attr, edge):
        def hook(module, args, kwargs, *output):
            name = self.NAMES.get(attr)
            if attr == "text_encoder":  # called twice: unimodal, then image-grounded for ITM
                name = "itm" if kwargs.get("image_embeds") is not None or kwargs.get("image_kv") is not None else "text"
            self.mark(name + edge)

        return hook

    def mark(self, label: str) -> None:
        self.marks.append((label, self.clock.mark()))

    ORDER = ("vit", "text", "ema", "vit_m", "text_m", "itc", "itm", "itm_loss", "lm", "lm_loss", "fwd", "bwd",
             "opt", "other")

    def phases(self) -> Dict[str, float]:
        """ms per phase of the recorded steps (steps start at each 'start' mark), in step order."""
        self.clock.sync()
        out: Dict[str, float] = {}
        for (a, ta), (b, tb) in zip(self.marks, self.marks[1:]):
            if b == "start":
                continue
            name = a[:-1] if a.endswith(">") else self.GAPS.get((a, b), "other")
            out[name] = out.get(name, 0.0) + self.clock.elapsed_ms(ta, tb)
        rank = {k: i for i, k in enumerate(self.ORDER)}
        return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _skip_reason(provider: Provider, device: str) -> Optional[str]:
    """Why this provider cannot run here, or None."""
    if provider.tier == "original":
        return _original_reason()
    from blipfast.config import ConfigError
    from blipfast.ops.attention import BackendUnavailable, resolve_attention
    from blipfast.ops.losses import resolve_losses

    try:  # e.g. a config key that this checkout does not have yet (exact_work)
        load_config("tiny", provider)
    except ConfigError as e:
        return f"this checkout's config does not take the provider's overrides {provider.config_overrides}: {e}"
    try:
        resolve_attention(provider.attention)
        resolve_losses(provider.losses)
    except BackendUnavailable as e:
        return f"backend not registered here: {e}"
    if "triton" in (provider.attention, provider.losses) and not device.startswith("cuda"):
        return ("Triton kernels run on a GPU; on the CPU only the interpreter (no bf16) would run them, "
                "so there is nothing meaningful to time (dry-run)")
    return None


def _original_reason() -> str:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    try:
        import blip.models.blip_pretrain  # noqa: F401  (PyPI blip-vit)
    except Exception as e:  # noqa: BLE001 - any import failure means it cannot run here
        return (f"the original code (PyPI blip-vit) is not importable here ({type(e).__name__}: {str(e)[:80]}); "
                f"it needs transformers<=4.46 + timm 0.4.12 (here: transformers {version('transformers')}, "
                f"timm {version('timm')}); reference-fp32 is the same math (parity tests) and is the baseline")
    return ("the original BLIP code is importable, but driving it needs shims (process group, hub "
            "downloads, tokenizer) that this harness does not implement yet; reference-fp32 stands in")


def estimate_seconds(model: str, batch: int, provider: Provider, opts) -> float:
    if not opts.device.startswith("cuda"):
        return 0.0
    cfg = load_config(model, PROVIDERS["reference-fp32"], opts.overrides)
    step = flop_formulas.pretrain_step(cfg, batch).hardware_flops / EST_RATE[provider.precision]
    timed = min(opts.iters * step, opts.max_step_seconds)
    est = EST_BUILD_S + (warmup_steps(provider, opts) + opts.phase_iters) * step + timed
    if uses_triton(provider):
        est += EST_TRITON_WARM_S if os.environ.get(WARMED_ENV) == "1" else EST_TRITON_COLD_S
    return est + (EST_COMPILE_S if provider.compile else 0.0)


def uses_triton(provider: Provider) -> bool:
    """Whether the provider's model runs blipfast's Triton kernels on a GPU ('auto' picks them)."""
    return any(b in ("triton", "auto") for b in (provider.attention, provider.losses))


def attention_bwd_schedules() -> Dict[str, str]:
    """The backward schedule the Triton attention measured faster for each tuning key so far in this
    process (`flash_attention.FUSED_DQ = None`): "fused" (5 matmuls) or "dq+dkdv" (7). Keys name
    the layout, dtype, length and batch x heads buckets and flags (`flash_attention.TUNE_KEY`)."""
    from blipfast.kernels import flash_attention as fa

    names = ("varlen", "dtype", *fa.TUNE_KEY)
    return {",".join(f"{n}={v}" for n, v in zip(names, key) if n != "DEVICE_KEY"): ("fused" if fused else "dq+dkdv")
            for key, fused in fa._FUSED_CHOICE.items()}


def warmup_steps(provider: Provider, opts) -> int:
    if opts.warmup is not None:
        return opts.warmup
    # Eager: one step loads kernels and handles. Compiled: the first step compiles, and the
    # second may recompile once guards see the state after an optimiser step.
    return 2 if provider.compile and not opts.dry_run else 1


def run_case(model: str, batch: int, provider: Provider, opts) -> dict:
    import torch

    cid = case_id(model, batch, provider.name)
    group = f"{model} B={batch}"
    base_cfg = {"case": cid, "model": model, "batch": batch, "tier": provider.tier, "precision": provider.precision}

    def row(status="ok", reason=None, **fields):
        return harness.make_row(opts.run_id, "e2e", group, "blip_pretrain_step", provider.name, "step",
                                {**base_cfg, **fields.pop("config", {})}, status=status, reason=reason,
                                baseline=provider.baseline, **fields)

    reason = _skip_reason(provider, opts.device)
    if reason:
        return row("skip", reason)
    left = (opts.deadline or float("inf")) - time.time()
    est = estimate_seconds(model, batch, provider, opts)
    if est > left:
        return row("skip", f"time budget: needs ~{est:.0f} s, {max(left, 0):.0f} s left")
    device = opts.device
    cfg = load_config(model, provider, opts.overrides)
    model_obj = opt = data = None
    t_setup = time.time()
    try:
        from blipfast import BlipForPretraining

        torch.manual_seed(0)
        with torch.device(device):  # build in place: initialising ~0.5 B parameters on the CPU is slow
            model_obj = BlipForPretraining(cfg).train()
        params = [p for p in model_obj.parameters() if p.requires_grad]
        fused = provider.fused_adamw and device.startswith("cuda")
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **({"fused": True} if fused else {}))
        compile_backend = None
        if provider.compile:
            compile_backend = "inductor" if device.startswith("cuda") else "eager"  # CPU: trace only
            for attr in TOWERS:
                getattr(model_obj, attr).compile(backend=compile_backend, dynamic=False)
        data = make_batch(cfg, batch, device)
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=provider.precision == "bf16")
        last = {}

        def step(rec: Optional[PhaseRecorder] = None):
            if rec:
                rec.mark("start")
            with autocast:
                out = model_obj(*data, alpha=cfg.alpha)
            if rec:
                rec.mark("forward_end")
            out.loss.backward()
            if rec:
                rec.mark("backward_end")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rec:
                rec.mark("optimizer_end")
            last["loss"] = out.loss.detach()

        harness.Clock(device).sync()
        setup_s = time.time() - t_setup
        t_steps = time.time()
        with harness.peak_memory(device) as mem:
            times = harness.time_iterations(step, device, warmup=warmup_steps(provider, opts), iters=opts.iters,
                                            max_seconds=opts.max_step_seconds, min_iters=min(3, opts.iters))
        # the warm-up steps' wall time: kernel compilation, autotuning, torch.compile (calibrates EST_*)
        first_steps_s = max(time.time() - t_steps - sum(times) * 1e-3, 0.0)
        phases = None
        if opts.phase_iters:
            rec = PhaseRecorder(model_obj, harness.Clock(device), hooks=not provider.compile)
            per_step: List[Dict[str, float]] = []
            for _ in range(opts.phase_iters):
                rec.marks.clear()
                step(rec)
                per_step.append(rec.phases())
            rec.remove()
            phases = {k: statistics.median(s.get(k, 0.0) for s in per_step) for k in per_step[0]}
        loss = float(last["loss"])
        flops = flop_formulas.pretrain_step(cfg, batch)
        tf32 = bool(device.startswith("cuda") and torch.backends.cuda.matmul.allow_tf32)
        precision = "bf16" if provider.precision == "bf16" else ("tf32" if tf32 else "fp32")
        p50_s = harness.quantiles(times, [0.5])[0] * 1e-3
        # The backends the built model really uses (an environment variable can override the config).
        attn_names = sorted({m.attn_fn.name for m in model_obj.modules() if hasattr(m, "attn_fn")})
        config = {
            "attention_backend": "+".join(attn_names),
            "loss_backend": getattr(model_obj.losses, "name", None),
            "compile": compile_backend, "optimizer": f"AdamW(fused={fused})", "tf32": tf32,
            "image_size": cfg.vision.image_size, "text_len": cfg.max_text_len, "queue_size": cfg.queue_size,
            "grad_checkpointing": cfg.vision.grad_checkpointing, "ckpt_layer": cfg.vision.ckpt_layer,
            "hardware_flops": flops.hardware_flops, "flops_by_phase": flops.by_phase(),
            "loss_last": loss, "warmup": warmup_steps(provider, opts), "overrides": opts.overrides,
            "provider_overrides": provider.config_overrides, "exact_work": getattr(cfg, "exact_work", None),
            "setup_s": round(setup_s, 2), "first_steps_s": round(first_steps_s, 2),
            "estimate_s": round(est, 1), "kernels_warmed": os.environ.get(WARMED_ENV) == "1",
            "attention_bwd_schedules": attention_bwd_schedules(),
        }
        if loss != loss or abs(loss) == float("inf"):
            return row("error", f"non-finite loss {loss}", times_ms=times, config=config)
        return row("ok", times_ms=times, config=config, flops=flops.model_flops,
                   throughput=batch / p50_s, throughput_unit="images/s", peak_mem_mb=mem["mb"],
                   mfu=flop_formulas.mfu(flops.model_flops, p50_s, harness.environment()["card"], precision),
                   phases_ms=phases)
    except torch.cuda.OutOfMemoryError as e:
        return row("oom", f"out of memory: {str(e).splitlines()[0][:200]}")
    finally:
        model_obj = opt = data = None  # drop the references (`step` shares these cells; `del` would unbind them)
        if provider.compile:
            torch._dynamo.reset()  # drop compiled graphs that still reference this model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _fatal_cuda(err: BaseException) -> bool:
    """Errors after which the CUDA context is unusable: the worker must restart."""
    text = str(err)
    return any(s in text for s in ("illegal memory access", "device-side assert", "CUDA error", "unspecified launch failure"))


def worker(opts) -> int:
    import torch

    if opts.dry_run:
        # Timings on the CPU mean nothing; one thread avoids OpenMP spinning on a shared machine.
        torch.set_num_threads(int(os.environ.get("BLIPFAST_BENCH_THREADS", "1")))
    cases = parse_cases(opts.cases)
    for model, batch, pname in cases:
        provider = PROVIDERS[pname]
        group = f"{model} B={batch}"
        t0 = time.time()
        print(f"[e2e] {case_id(model, batch, pname)} ...", flush=True)
        fatal = False
        try:
            row = run_case(model, batch, provider, opts)
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
            traceback.print_exc()
            fatal = _fatal_cuda(e)
            row = harness.make_row(opts.run_id, "e2e", group, "blip_pretrain_step", pname, "step",
                                   {"case": case_id(model, batch, pname), "model": model, "batch": batch,
                                    "tier": provider.tier, "precision": provider.precision},
                                   status="error", baseline=provider.baseline,
                                   reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        harness.append_rows([row], opts.results)
        msg = row["reason"] or f"{row['throughput']:.1f} images/s, p50 {row['p50_ms']:.1f} ms"
        print(f"[e2e] {row['status'].upper()} {case_id(model, batch, pname)} ({time.time() - t0:.0f} s): {msg}",
              flush=True)
        if fatal:
            return 3  # the CUDA context is gone: the parent starts a fresh worker for the rest
    return 0


def run_plan(opts, cases: List[Tuple[str, int, str]]) -> int:
    """Run `cases` in worker subprocesses, restarting after a crash; returns 0 if all got rows."""
    deadline = time.time() + opts.budget_s
    remaining = list(cases)
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--run-id", opts.run_id, "--results",
            opts.results, "--deadline", str(deadline), "--device", opts.device,
            "--iters", str(opts.iters), "--max-step-seconds", str(opts.max_step_seconds),
            *(["--warmup", str(opts.warmup)] if opts.warmup is not None else []),
            *[a for kv in opts.set for a in ("--set", kv)],
            "--phase-iters", str(opts.phase_iters)] + (["--dry-run"] if opts.dry_run else [])
    while remaining:
        cmd = base + ["--cases", ",".join(case_id(*c) for c in remaining)]
        timeout = max(deadline - time.time(), 0) + opts.grace_s
        try:
            rc = subprocess.run(cmd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        done = {r["config"].get("case") for r in harness.read_rows(opts.results, opts.run_id) if r["suite"] == "e2e"}
        remaining = [c for c in remaining if case_id(*c) not in done]
        if not remaining:
            return 0
        model, batch, pname = remaining.pop(0)
        why = ("the time budget ran out while it ran" if rc == "timeout"
               else f"the worker died (exit {rc}) while running it; see the log above")
        harness.append_rows([harness.make_row(
            opts.run_id, "e2e", f"{model} B={batch}", "blip_pretrain_step", pname, "step",
            {"case": case_id(model, batch, pname), "model": model, "batch": batch,
             "tier": PROVIDERS[pname].tier, "precision": PROVIDERS[pname].precision},
            status="error", reason=why, baseline=PROVIDERS[pname].baseline)], opts.results)
        print(f"[e2e] ERROR {case_id(model, batch, pname)}: {why}", flush=True)
        if rc == "timeout" or time.time() >= deadline:
            for m, b, p in remaining:
                harness.append_rows([harness.make_row(
                    opts.run_id, "e2e", f"{m} B={b}", "blip_pretrain_step", p, "step",
                    {"case": case_id(m, b, p), "model": m, "batch": b, "tier": PROVIDERS[p].tier,
                     "precision": PROVIDERS[p].precision},
                    status="skip", reason="time budget exhausted", baseline=PROVIDERS[p].baseline)], opts.results)
            return 1
    return 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", default=harness.is_dry_run(),
                    help="tiny model on the CPU, 1 warm-up + 2 timed steps (also BLIPFAST_BENCH_DRY_RUN=1)")
    ap.add_argument("--cases", default=None, help="MODEL:BATCH:PROVIDER,... instead of the plan")
    ap.add_argument("--results", default=None, help=f"JSON-lines file to append to (default {harness.DEFAULT_RESULTS})")
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget for all cases")
    ap.add_argument("--grace-s", type=float, default=30.0, help="how far a running case may overrun the budget")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, cpu in dry-run)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1; 2 when compiled)")
    ap.add_argument("--iters", type=int, default=None, help="at most this many timed steps")
    ap.add_argument("--max-step-seconds", type=float, default=None, help="stop timing after this long (>= 3 steps)")
    ap.add_argument("--phase-iters", type=int, default=None, help="extra instrumented steps for the phase split")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every case, e.g. --set vision.num_heads=3 (repeatable)")
    ap.add_argument("--no-summary", dest="summary", action="store_false", help="do not print the table at the end")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return ap


def resolve_options(opts) -> None:
    import torch

    dry = opts.dry_run
    if opts.device is None:
        opts.device = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    for name, full, tiny in (("iters", 10, 2), ("max_step_seconds", 8.0, 0.5), ("phase_iters", 1, 1)):
        if getattr(opts, name) is None:
            setattr(opts, name, tiny if dry else full)
    if opts.results is None:
        opts.results = os.path.join(_dry_dir(), "results.jsonl") if dry else harness.DEFAULT_RESULTS
    opts.run_id = opts.run_id or harness.new_run_id()
    from blipfast.config import parse_override

    opts.overrides = dict(parse_override(kv) for kv in opts.set)


def _dry_dir() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), "blipfast-bench-dry-run")


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    resolve_options(opts)
    if opts.worker:
        return worker(opts)
    if opts.cases:
        cases = parse_cases(opts.cases)
    else:
        plan = DRY_RUN_PLAN if opts.dry_run else DEFAULT_PLAN
        cases = [(m, b, p) for m, b, ps in plan for p in ps]
    print(f"[e2e] run {opts.run_id}: {len(cases)} cases on {opts.device}, budget {opts.budget_s:.0f} s, "
          f"results -> {opts.results}", flush=True)
    rc = run_plan(opts, cases)
    if opts.summary:
        rows = [r for r in harness.read_rows(opts.results, opts.run_id) if r["suite"] == "e2e"]
        print(harness.summary_table(rows))
    return rc


if __name__ == "__main__":
    sys.exit(main())
