"""Static audit of blipfast's Triton kernels on Hopper, with no GPU: compile every kernel variant and
autotune config for sm_90 with the installed Triton, then read what the compiler produced.

    python benchmarks/kernel_audit.py                 # the full table (every config)
    python benchmarks/kernel_audit.py --quick         # the first config of each kernel only (no fp32 rows)
    python benchmarks/kernel_audit.py --json out.json
    python benchmarks/kernel_audit.py --fused-bwd     # the fused 5-matmul backward (a prototype) vs dq + dkdv,
                                                      # dense and packed (varlen)
    python benchmarks/kernel_audit.py --dropout-cost  # where dropout's extra loop instructions go, by opcode

Per compiled kernel it reports:
  regs, spills      registers per thread and spill bytes (STACK + LOCAL) from `cuobjdump -res-usage`
                    (the cuobjdump that ships inside the triton wheel, triton/backends/nvidia/bin);
  smem              shared memory bytes from the kernel's metadata;
  occ               an occupancy estimate on an sm_90 SM (64K registers, 228 KiB shared memory,
                    64 warps, 32 CTAs): resident warps / 64;
  mma               wgmma (Hopper's warpgroup MMA) and/or mma.sync (the Ampere path), read from the PTX;
  loop              SASS instructions of the main loop body per iteration (the longest backward
                    branch span that holds an MMA), and with dropout its ratio to the same kernel
                    without dropout;
  LDG / STG         (the cross-entropy rows) global loads / stores in the SASS by width: 128-bit
                    vector (LDG.E.128) versus 32-bit and 16-bit scalar (LDG.E, LDG.E.U16).
Compilation follows what `triton.jit` does at a launch: strides of 1 become constants, pointers and
strides are given 16-divisibility (the layouts the model hands over have it).

Then a work model at BLIP's shapes (B = 256, 12 heads, d = 64): for each kernel schedule (tiles
visited, as the kernels' loop bounds decide them) the computed score elements over the useful ones
(allowed (query, key) pairs), and the HBM bytes the forward moves (each tile load counted once,
K/V re-read per query tile) over the floor of the real tokens (q, k, v, o once each, LSE).
Text uses BLIP's caption-length mix (`caption_lengths`: mean about 13 of 30 tokens).

The thresholds CI enforces (tests/kernels/test_kernel_audit.py) are in THRESHOLDS. Figures differ between
triton versions (registers by up to ~60 per thread): read them under the GPU machine's triton.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the audit compiles real GPU code (set before triton loads)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

fa = importlib.import_module("blipfast.kernels.flash_attention")

TARGET = GPUTarget("cuda", 90, 32)
THRESHOLDS = {
    "spills": 0,                 # bytes, every kernel
    "dropout_loop_ratio": 1.35,  # SASS loop instructions with dropout / without
    "vit_work_ratio": 1.3,       # computed / useful score elements, ViT 197 and 577
    "text_bytes_ratio": 1.2,     # forward HBM bytes / floor of the real tokens, packed text and cross
}
SM90 = dict(regs=65536, smem=233472, warps=64, ctas=32, smem_per_cta_reserved=1024)


# ---------------------------------------------------------------------------------------------
# compiling


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p", "alpha"}
ITC_POINTERS = {"q_ptr": "*bf16", "qm_ptr": "*bf16", "k_ptr": "*bf16", "queue_ptr": "*bf16", "idx_ptr": "*i64",
                "idxq_ptr": "*i64"}
INT64_ARGS = {"seed"}
POINTER_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "DQACC": "*fp32", "KPM": "*u8", "OUT": "*i8", "CU_Q": "*i32", "CU_K": "*i32",
                 "SEQ_Q": "*i32", "SEQ_K": "*i32", "TILES": "*i32", "KV_LEN": "*i32",
                 "QSPANS": "*i32"}


def compile_sm90(fn, constexprs: dict, num_warps: int, num_stages: int, elem="bf16", types=None,
                 not_divisible=()):
    """Compile `fn` for sm_90 as a launch with contiguous-head-dim bf16 tensors would. types:
    argument types that override the rules below; not_divisible: arguments a launch would not give
    16-divisibility (a row stride of 30522)."""
    sig, consts, attrs = {}, {k: v for k, v in constexprs.items() if k in fn.arg_names}, {}
    ptr_suffix = any(n.endswith("_ptr") for n in fn.arg_names)  # the loss kernels name pointers x_ptr
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ITC_POINTERS or name.endswith("_ptr"):
            sig[name] = ITC_POINTERS.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif not ptr_suffix and (name in "QKVO" or (name.isupper() and len(name) > 1
                                                    and not name.endswith(("BUCKET", "_KEY")))):  # attention pointers
            sig[name] = POINTER_TYPES.get(name, f"*{elem}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in INT64_ARGS:
            sig[name] = "i64"
        elif re.fullmatch(r"s\w*d", name):  # head-dim strides: 1 (triton.jit makes 1 a constant)
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if re.fullmatch(r"s\w+", name) and name != "splits_b":  # other strides: multiples of 16 elements
                attrs[(i,)] = [["tt.divisibility", 16]]
        if types and name in types:
            sig[name] = types[name]
        if name in not_divisible:
            attrs.pop((i,), None)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


def _res_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return dict(regs=int(fields["REG"]), spills=int(fields["STACK"]) + int(fields["LOCAL"]), sass=sass)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_body(sass: str) -> List[str]:
    """Opcodes (full names, NOPs excluded) of the main loop body: among backward branches, the
    longest span that contains an MMA (HGMMA / HMMA)."""
    instrs = [(int(a, 16), op, rest) for a, _, op, rest in _INSTR.findall(sass)]
    best: List[str] = []
    for addr, op, rest in instrs:
        if op != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", rest)
        target = int(m.group(1), 16) if m else addr
        if target >= addr:
            continue
        body = [o for a, o, _ in instrs if target <= a <= addr and o != "NOP"]
        if any(o.startswith(("HGMMA", "HMMA")) for o in body) and len(body) > len(best):
            best = body
    return best


def loop_instructions(sass: str) -> int:
    """Instructions of the main loop body (`loop_body`)."""
    return len(loop_body(sass))


def inner_loop_instructions(sass: str) -> int:
    """Like `loop_instructions`, for kernels with nested loops (the fused backward walks key tiles,
    then query tiles): the longest backward-branch span holding a wgmma (HGMMA) that holds no other
    such span, i.e. the main innermost loop."""
    instrs = [(int(a, 16), op, rest) for a, _, op, rest in _INSTR.findall(sass)]
    spans = []
    for addr, op, rest in instrs:
        if op != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", rest)
        target = int(m.group(1), 16) if m else addr
        if target < addr and any(target <= a <= addr and o.startswith("HGMMA") for a, o, _ in instrs):
            spans.append((target, addr))
    inner = [(t, a) for t, a in spans if not any((t2, a2) != (t, a) and t <= t2 and a2 <= a for t2, a2 in spans)]
    return max((len([o for x, o, _ in instrs if t <= x <= a and o != "NOP"]) for t, a in inner), default=0)


def occupancy(regs: int, smem: int, num_warps: int) -> float:
    """Resident warps / 64 on an sm_90 SM (registers allocated per warp in units of 256)."""
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = SM90["regs"] // (regs_per_warp * num_warps)
    by_smem = SM90["smem"] // (smem + SM90["smem_per_cta_reserved"]) if smem else SM90["ctas"]
    by_warps = SM90["warps"] // num_warps
    ctas = min(by_regs, by_smem, by_warps, SM90["ctas"])
    return ctas * num_warps / SM90["warps"]


@dataclasses.dataclass
class Row:
    kernel: str
    variant: str
    config: str
    regs: int
    spills: int
    smem: int
    occ: float
    mma: str
    loop: int
    loop_ratio: Optional[float] = None  # with dropout: loop / the same kernel's loop without
    ldg: Optional[Dict[str, int]] = None  # global loads (LDG) in the SASS by width in bits, e.g. {"128": 6, "16": 1}
    stg: Optional[Dict[str, int]] = None  # global stores (STG) likewise


def global_accesses(sass: str, op: str) -> Dict[str, int]:
    """Static count of the SASS global loads (op "LDG") or stores ("STG") by access width in bits:
    LDG.E.128 is a 128-bit vector load, LDG.E.64 64, LDG.E 32, LDG.E.U16 / .S16 16, .U8 / .S8 8."""
    out: Dict[str, int] = {}
    for _, _, name, _ in _INSTR.findall(sass):
        parts = name.split(".")
        if parts[0] != op:  # not LDGSTS / LDGDEPBAR
            continue
        width = next((w for w in ("128", "64") if w in parts[1:]), None) or next(
            (p[1:] for p in parts[1:] if p in ("U16", "S16", "U8", "S8")), "32")
        out[width] = out.get(width, 0) + 1
    return out


def audit_kernel(name: str, fn, constexprs: dict, num_warps: int, num_stages: int, variant: str,
                 config: str, **compile_kw) -> Row:
    k = compile_sm90(fn, constexprs, num_warps, num_stages, **compile_kw)
    usage = _res_usage(k.asm["cubin"])
    ptx = k.asm["ptx"]
    kinds = [kind for kind, op in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if op in ptx]
    mma = "+".join(kinds) or "none"  # "wgmma+mma.sync": some of the kernel's dots missed wgmma
    smem = k.metadata.shared
    return Row(name, variant, config, usage["regs"], usage["spills"], smem, occupancy(usage["regs"], smem, num_warps),
               mma, loop_instructions(usage["sass"]), ldg=global_accesses(usage["sass"], "LDG"),
               stg=global_accesses(usage["sass"], "STG"))


# ---------------------------------------------------------------------------------------------
# the kernels and their variants


# FUSED_DQ (dkdv only; `compile_sm90` drops flags a kernel does not take): the two-kernel backward
ATTN_BASE = dict(HEAD_DIM=64, UPCAST=False, DOT_PREC="tf32", INTERPRET=False, EVEN_M=False, EVEN_N=False,
                 FUSED_DQ=False)
# (variant name, flags). Each is compiled with and without dropout.
ATTN_VARIANTS = {
    "dense": dict(IS_CAUSAL=False, HAS_MASK=False, VARLEN=False),
    "causal+kpm": dict(IS_CAUSAL=True, HAS_MASK=True, VARLEN=False),
    "varlen": dict(IS_CAUSAL=False, HAS_MASK=False, VARLEN=True),
    "varlen+causal": dict(IS_CAUSAL=True, HAS_MASK=False, VARLEN=True),
}


def attention_variants():
    """(kernel name, fn, variant, flags, configs) for every attention kernel specialisation audited:
    the dense variants under every autotune config, the packed ones under their fixed blocks."""
    for kind, fn in fa._KERNELS.items():
        # the second launch over a thin tail (`thin_tail_split`): 16 rows (fwd/dq) or keys (dkdv)
        m, n, w, st = fa.gpu_configs(kind)[0].kwargs["BLOCK_M"], fa.gpu_configs(kind)[0].kwargs["BLOCK_N"], 4, 3
        m, n = (16, n) if kind != "dkdv" else (m, 16)
        tail_cfg = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)]
        for drop in (False, True):
            yield kind, fn, "thin-tail" + ("+dropout" if drop else ""), dict(ATTN_BASE, **ATTN_VARIANTS["dense"],
                                                                            HAS_DROPOUT=drop), tail_cfg
        for vname, flags in ATTN_VARIANTS.items():
            for drop in (False, True):
                if flags["VARLEN"]:
                    m, n, w, st = fa.VARLEN_BLOCKS[kind]
                    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)]
                else:  # the autotuner's space for this variant (fa.prune drops the same tiles)
                    configs = [c for c in fa.gpu_configs(kind) if fa.fits_registers(c, drop)]
                yield kind, fn, vname + ("+dropout" if drop else ""), dict(ATTN_BASE, **flags, HAS_DROPOUT=drop), configs


FUSED_VARIANTS = ("dense", "causal+kpm", "varlen", "varlen+causal")


def _fixed_configs(kinds_blocks) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in kinds_blocks]


def fused_bwd_rows(log=None, candidates: bool = True) -> List[Row]:
    """Candidate rows for the deterministic fused backward (`backward(fused_dq=True)` and
    `varlen_backward(fused_dq=True)`: the dK/dV kernel with FUSED_DQ, 5 matmuls per tile, one
    program per (batch, head), or per group of key tiles holding whole packed sequences): kernel
    "dkdvq", each variant with and without dropout under each of its configs (packed: its fixed
    block, VARLEN_BLOCKS), next to the two-kernel path ("dq" + "dkdv", their first configs; packed:
    their fixed blocks) of the same variant. The fused kernel's `loop` is its main innermost loop
    (`inner_loop_instructions`: it also walks key tiles in an outer loop)."""
    rows: List[Row] = []
    for vname in FUSED_VARIANTS:
        for drop in (False, True):
            flags = dict(ATTN_BASE, **ATTN_VARIANTS[vname], HAS_DROPOUT=drop)
            variant = vname + ("+dropout" if drop else "")
            varlen = flags["VARLEN"]
            for kind in ("dq", "dkdv"):
                c = _fixed_configs([fa.VARLEN_BLOCKS[kind]])[0] if varlen else fa.gpu_configs(kind)[0]
                rows.append(audit_kernel(kind, fa._KERNELS[kind], dict(flags, **c.kwargs), c.num_warps,
                                         c.num_stages, variant, f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} "
                                         f"w{c.num_warps} s{c.num_stages}"))
                if log:
                    log(rows[-1])
            # the fused configs, and (tried, spilling: see fa.gpu_configs) 32-query and pipelined ones
            tried = _fixed_configs(((32, 64, 4, 1), (32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2)))
            own = _fixed_configs([fa.VARLEN_BLOCKS["dkdv_fused"]]) if varlen else fa.gpu_configs("dkdv_fused")
            # packed: a runtime `group` (chunked keys: the cross-attention's 197 per caption), and the
            # packed schedule's group = 1, which a launch specialises as a constant ("g1")
            groups = [{}, {"group": 1}] if varlen else [{}]
            for c, g in [(c, g) for c in own for g in groups] + [(c, {}) for c in (tried if candidates else [])]:
                if not fa.fits_registers(c, drop):
                    continue
                k = compile_sm90(fa._attn_bwd_dkdv, dict(flags, **c.kwargs, **g, FUSED_DQ=True), c.num_warps,
                                 c.num_stages)
                usage = _res_usage(k.asm["cubin"])
                mma = "+".join(kd for kd, op in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))
                               if op in k.asm["ptx"])
                rows.append(Row("dkdvq", variant, f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} "
                                f"s{c.num_stages}" + (" g1" if g else ""), usage["regs"], usage["spills"],
                                k.metadata.shared, occupancy(usage["regs"], k.metadata.shared, c.num_warps),
                                mma or "none", inner_loop_instructions(usage["sass"])))
                if log:
                    log(rows[-1])
    return rows


FP32_VARIANTS = ("dense", "causal+kpm", "varlen")


def fp32_rows(log=None) -> List[Row]:
    """The fp32 path of each attention kernel and of the fused backward (fp32 inputs on a GPU: true
    fp32 dots on the FMA units under `fa.FP32_BLOCKS`), each variant with and without dropout,
    marked "fp32": held to 0 spills like the 16-bit rows (no tensor-core dots, so no wgmma check,
    and no dropout ratio)."""
    rows: List[Row] = []
    kernels = [(kind, fa._KERNELS[kind], kind, {}) for kind in ("fwd", "dq", "dkdv")]
    kernels.append(("dkdvq", fa._attn_bwd_dkdv, "dkdv_fused", {"FUSED_DQ": True}))
    for name, fn, blocks, extra in kernels:
        m, n, w, st = fa.FP32_BLOCKS[blocks]
        for vname in FP32_VARIANTS:
            for drop in (False, True):
                flags = dict(ATTN_BASE, **ATTN_VARIANTS[vname], HAS_DROPOUT=drop, UPCAST=True, DOT_PREC="ieee",
                             BLOCK_M=m, BLOCK_N=n, **extra)
                rows.append(audit_kernel(name, fn, flags, w, st, vname + ("+dropout" if drop else "") + " fp32",
                                         f"{m}x{n} w{w} s{st}", elem="fp32"))
                if log:
                    log(rows[-1])
    return rows


# Where the dropout's extra loop instructions go (`dropout_cost`): opcode prefixes per group, the
# first matching group wins; what matches none is "other".
DROPOUT_GROUPS = (
    ("mul", ("IMAD.WIDE", "IMAD.HI")),  # Philox's 32 x 32 -> 64-bit products, two per round
    ("lop3", ("LOP3",)),                # Philox's xors (one LOP3 per round and word pair), word picks
    ("rot", ("SHF.L.W",)),              # an element's byte rotated to the top of its word
    ("cmp", ("ISETP",)),                # byte >= threshold, one per element
    ("sel", ("FSEL", "SEL")),           # dropped elements zeroed, or the 1 / (1 - p) factor picked
    ("fp", ("FMUL", "FFMA", "FADD")),   # net: the backward folds the factor into its dP arithmetic
)


def dropout_cost(base: List[str], drop: List[str]) -> Dict[str, int]:
    """Per DROPOUT_GROUPS group (plus "other"), loop instructions with dropout minus without: the
    opcode lists of the two compiled loop bodies (`loop_body`). The values sum to the length difference."""
    def group(op: str) -> str:
        return next((g for g, prefixes in DROPOUT_GROUPS if op.startswith(prefixes)), "other")

    out = {g: 0 for g, _ in DROPOUT_GROUPS}
    out["other"] = 0
    for ops, sign in ((drop, 1), (base, -1)):
        for op in ops:
            out[group(op)] += sign
    return out


def dropout_cost_rows(log=None) -> List[dict]:
    """For the forward, dQ and dK/dV at their default tiles (dense: the autotuner's first config; packed:
    VARLEN_BLOCKS), the main loop with and without dropout, and where the difference goes."""
    rows = []
    for kind, fn in fa._KERNELS.items():
        for vname in ("dense", "varlen"):
            if vname == "varlen":
                m, n, w, st = fa.VARLEN_BLOCKS[kind]
            else:
                c = fa.gpu_configs(kind)[0]
                m, n, w, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
            bodies = []
            for drop in (False, True):
                flags = dict(ATTN_BASE, **ATTN_VARIANTS[vname], HAS_DROPOUT=drop, BLOCK_M=m, BLOCK_N=n)
                bodies.append(loop_body(_res_usage(compile_sm90(fn, flags, w, st).asm["cubin"])["sass"]))
            row = dict(kernel=kind, variant=vname, config=f"{m}x{n} w{w} s{st}", elems=m * n // (32 * w),
                       base=len(bodies[0]), dropout=len(bodies[1]), **dropout_cost(*bodies))
            rows.append(row)
            if log:
                log(row)
    return rows


def format_dropout_cost(rows: List[dict]) -> str:
    groups = [g for g, _ in DROPOUT_GROUPS] + ["other"]
    head = f"{'kernel':6} {'variant':7} {'config':13} {'elem/thr':>8} {'loop':>5} {'+drop':>5} {'x':>5} " + \
        " ".join(f"{g:>5}" for g in groups) + f" {'/elem':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        extra = r["dropout"] - r["base"]
        lines.append(f"{r['kernel']:6} {r['variant']:7} {r['config']:13} {r['elems']:8d} {r['base']:5d} {extra:+5d} "
                     f"{r['dropout'] / r['base']:5.2f} " + " ".join(f"{r[g]:+5d}" for g in groups)
                     + f" {extra / r['elems']:6.2f}")
    return "\n".join(lines)


def format_fused(rows: List[Row]) -> str:
    """Per variant: SASS warp-instructions of the main loops per 64 x 64 (query x key) tile, i.e.
    loop instructions x warps x 4096 / tile elements (every warp runs the loop body once per tile),
    of the two-kernel path (dq's plus dkdv's) against each fused config's."""
    def per64(r):
        tile, warps = r.config.split()[:2]
        m, n = (int(x) for x in tile.split("x"))
        return r.loop * int(warps[1:]) * 4096 / (m * n)

    head = f"{'variant':20} {'path':26} {'regs':>9} {'spill':>7} {'occ':>11} {'warp-instr/64x64':>16}"
    lines = [head, "-" * len(head)]
    for variant in dict.fromkeys(r.variant for r in rows):
        dq, kv = (next(r for r in rows if r.variant == variant and r.kernel == k) for k in ("dq", "dkdv"))
        lines.append(f"{variant:20} {'dq ' + dq.config.split()[0] + ' + dkdv ' + kv.config.split()[0]:26} "
                     f"{dq.regs:4d}+{kv.regs:<4d} {dq.spills:3d}+{kv.spills:<3d} {dq.occ:.3f}+{kv.occ:.3f} "
                     f"{per64(dq) + per64(kv):16.0f}")
        for r in rows:
            if r.variant == variant and r.kernel == "dkdvq":
                lines.append(f"{'':20} {'fused ' + r.config:26} {r.regs:9d} {r.spills:7d} {r.occ:11.3f} "
                             f"{per64(r):16.0f}")
    return "\n".join(lines)


def run_compile_audit(quick: bool = False, log=None) -> List[Row]:
    if fa.interpreting():
        raise RuntimeError("kernel_audit: the kernels were defined under TRITON_INTERPRET=1; run the audit in a "
                           "process without it (python benchmarks/kernel_audit.py)")
    rows: List[Row] = []
    for kind, fn, variant, flags, configs in attention_variants():
        for c in configs[:1] if quick else configs:
            cfg = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
            row = audit_kernel(kind, fn, dict(flags, **c.kwargs), c.num_warps, c.num_stages, variant, cfg)
            rows.append(row)
            if log:
                log(row)
    rows += itc_rows(log)
    rows += ce_rows(log)
    return set_dropout_ratios(rows)


def set_dropout_ratios(rows: List[Row]) -> List[Row]:
    """Give each dropout row its loop_ratio: its loop over the same kernel's, variant's and config's
    loop without dropout (None where that has no MMA loop: the fp32 rows)."""
    base = {(r.kernel, r.variant, r.config): r.loop for r in rows if "dropout" not in r.variant}
    for r in rows:
        if "dropout" in r.variant:
            ref_loop = base.get((r.kernel, r.variant.replace("+dropout", ""), r.config))
            r.loop_ratio = r.loop / ref_loop if ref_loop else None
    return rows


def itc_rows(log=None) -> List[Row]:
    """The fused ITC loss kernels at their GPU defaults, E = 256 features: bf16 (wgmma; variant
    "default", and "ids" with retrieval image ids) and fp32 (3xTF32 mma.sync, features streamed in
    chunks; "default fp32", "ids fp32", and "E1024 fp32" at the widest E the op takes)."""
    import torch

    itc = importlib.import_module("blipfast.kernels.itc")
    fp32_types = {n: "*fp32" for n in ("q_ptr", "qm_ptr", "k_ptr", "queue_ptr")}
    out = []
    for dtype, suffix, types in ((torch.bfloat16, "", {}), (torch.float32, " fp32", fp32_types)):
        cfg = itc.ItcKernelConfig().resolved(dtype, False)
        widths = (256, 1024) if dtype == torch.float32 else (256,)
        for E, ids in [(256, False), (256, True)] + [(e, False) for e in widths if e != 256]:
            variant = ("ids" if ids else "default" if E == 256 else f"E{E}") + suffix
            base = dict(TILES_PER_SPLIT=8, HAS_IDX=ids, BLOCK_N=cfg.block_n,
                        **itc._feature_constexprs(dtype, E, cfg.precision, False))
            for name, fn, bm, extra in (("itc_st", itc._itc_stats_kernel, cfg.block_m, dict(WRITE_SIMS=True)),
                                        ("itc_gr", itc._itc_grad_kernel, cfg.block_m_grad, {})):
                row = audit_kernel(name, fn, dict(base, BLOCK_M=bm, **extra), cfg.num_warps, cfg.num_stages, variant,
                                   f"{bm}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}", types=types)
                out.append(row)
                if log:
                    log(row)
    return out


def ce_rows(log=None) -> List[Row]:
    """The LM cross-entropy kernel at BERT's vocabulary (V = 30522), bf16 logits and bias, the GPU
    tile, with the gradient sweep (training), in both specialisations: "aligned" (the op's logits
    buffer, row stride 30528: 128-bit loads expected) and "unaligned" (the fall-back for a
    contiguous (n, 30522) tensor: its row stride is not 16-divisible, so a launch does not get that
    specialisation)."""
    ce = importlib.import_module("blipfast.kernels.cross_entropy")
    V, bv, w = 30522, ce.GPU_BLOCK_V, ce.NUM_WARPS
    types = dict(logits_ptr="*bf16", bias_ptr="*bf16", labels_ptr="*i64", eps="fp32")
    out = []
    for aligned in (True, False):
        row = audit_kernel("ce", ce._ce_kernel, dict(V=V, HAS_BIAS=True, ALIGNED=aligned, WRITE_GRAD=True, ROWS=1,
                                                                 BLOCK_V=bv), w, 3,
                           "aligned" if aligned else "unaligned", f"V{V} BV{bv} w{w}", types=types,
                           not_divisible=() if aligned else ("stride_row",))
        out.append(row)
        if log:
            log(row)
    return out


# ---------------------------------------------------------------------------------------------
# work model at BLIP's shapes


def caption_lengths(B: int = 256, max_len: int = 30) -> List[int]:
    """A fixed caption-length mix like COCO's after BLIP's tokenizer ([CLS]/[DEC] + words + [SEP]):
    mean about 13, between 5 and max_len (deterministic: the audit must not drift)."""
    import random

    rng = random.Random(13)
    return [min(max_len, max(5, round(rng.gauss(13.0, 3.5)))) for _ in range(B)]


@dataclasses.dataclass
class Shape:
    name: str
    B: int
    H: int
    D: int
    lens_q: List[int]  # real query rows per sequence
    lens_k: List[int]  # real keys per sequence
    causal: bool
    pad_q: int  # the padded length a dense (B, H, L, D) call runs at
    pad_k: int


def blip_shapes(B: int = 256, H: int = 12, D: int = 64) -> List[Shape]:
    text = caption_lengths(B)
    return [
        Shape("vit_197", B, H, D, [197] * B, [197] * B, False, 197, 197),
        Shape("vit_577", B // 4, H, D, [577] * (B // 4), [577] * (B // 4), False, 577, 577),
        Shape("text_self", B, H, D, text, text, False, 30, 30),
        Shape("text_causal", B, H, D, text, text, True, 30, 30),
        Shape("cross_text_x197", B, H, D, text, [197] * B, False, 30, 197),
    ]


def _useful(s: Shape) -> int:
    if s.causal:
        return sum(sum(min(i + 1, lk) for i in range(lq)) for lq, lk in zip(s.lens_q, s.lens_k)) * s.H
    return sum(lq * lk for lq, lk in zip(s.lens_q, s.lens_k)) * s.H


def key_columns(n: int, BN: int) -> int:
    """Key columns the loops compute for a range of n keys: full BN tiles, then 16-wide tail tiles."""
    tail = fa.TAIL.value if hasattr(fa.TAIL, "value") else fa.TAIL
    return n // BN * BN + triton.cdiv(n % BN, tail) * tail


def dense_schedule_work(s: Shape, BM: int, BN: int) -> dict:
    """The padded kernel (`attention` at pad_q x pad_k; text with a key padding mask): tiles
    visited by `_attn_fwd`'s loops: key tiles up to the row's last real key (kv_len), or up to the
    diagonal block when causal, the ragged rest in 16-wide tiles; a thin tail of query rows
    (197 = 3 x 64 + 5) in 16-row tiles of a second launch. Bytes: q, o, LSE of every padded row, K/V rows loaded per tile."""
    computed, kv_rows = 0, 0
    masked = s.pad_k != max(s.lens_k) or len(set(s.lens_k)) > 1
    tail = fa.TAIL.value if hasattr(fa.TAIL, "value") else fa.TAIL
    split = fa.thin_tail_split(s.pad_q, BM)  # the rest runs as a second launch of TAIL-row tiles
    tiles = [(r, BM) for r in range(0, split, BM)] + [(r, tail) for r in range(split, s.pad_q, tail)]
    for lk in s.lens_k:
        kv_len = lk if masked else s.pad_k
        for r0, rows in tiles:
            hi = min(kv_len, r0 + rows) if s.causal else kv_len
            computed += rows * (key_columns(hi, BN) if hi % BN or masked or s.causal else hi)
            kv_rows += hi
    e = 2  # bf16
    bytes_fwd = s.H * (s.B * s.pad_q * (2 * s.D * e + 4) + 2 * kv_rows * s.D * e)
    return dict(computed=computed * s.H, bytes=bytes_fwd)


def varlen_schedule_work(s: Shape, BM: int, BN: int) -> dict:
    """The packed kernel (`varlen_attention`): the real schedule (`varlen_schedule`), and per query
    tile the key range `_query_tile` computes (first key rounded down to 16, to the last allowed
    key). Bytes: q, o, LSE of real rows only, K/V rows in each tile's key range."""
    import torch

    cu_q = [0]
    for n in s.lens_q:
        cu_q.append(cu_q[-1] + n)
    cu_k = [0]
    for n in s.lens_k:
        cu_k.append(cu_k[-1] + n)
    tiles = fa.varlen_schedule(torch.tensor(cu_q, dtype=torch.int32), cu_q[-1], max(s.lens_q), BM).tolist()
    seq_of = [b for b, n in enumerate(s.lens_q) for _ in range(n)]
    computed, kv_rows = 0, 0
    for lo, hi in tiles:
        spans = []
        for r in range(lo, hi):
            b = seq_of[r]
            klo, khi = cu_k[b], cu_k[b + 1]
            if s.causal:
                khi = min(khi, klo + r - cu_q[b] + 1)
            if khi > klo:
                spans.append((klo, khi))
        if not spans:
            continue
        k_start = min(a for a, _ in spans)
        k_start -= k_start % 16
        k_end = max(b for _, b in spans)
        computed += BM * key_columns(k_end - k_start, BN)
        kv_rows += k_end - k_start
    e = 2
    bytes_fwd = s.H * (cu_q[-1] * (2 * s.D * e + 4) + 2 * kv_rows * s.D * e)
    return dict(computed=computed * s.H, bytes=bytes_fwd)


def work_floor_bytes(s: Shape) -> int:
    e = 2
    return s.H * (sum(s.lens_q) * (2 * s.D * e + 4) + sum(s.lens_k) * 2 * s.D * e)


def work_table() -> List[dict]:
    """Per BLIP shape and path (padded `attention` under its default GPU tile, packed
    `varlen_attention` under its fixed blocks): computed / useful, forward bytes / floor."""
    out = []
    dense_bm, dense_bn = fa.gpu_configs("fwd")[0].kwargs.values()
    var_bm, var_bn = fa.VARLEN_BLOCKS["fwd"][:2]
    for s in blip_shapes():
        useful = _useful(s)
        floor = work_floor_bytes(s)
        paths = [("padded", dense_schedule_work(s, dense_bm, dense_bn), f"{dense_bm}x{dense_bn}")]
        if s.name.startswith(("text", "cross")):
            paths.append(("packed", varlen_schedule_work(s, var_bm, var_bn), f"{var_bm}x{var_bn}"))
        for path, d, tile in paths:
            out.append(dict(shape=s.name, path=path, tile=tile, work_ratio=d["computed"] / useful,
                            bytes_ratio=d["bytes"] / floor))
    return out


# ---------------------------------------------------------------------------------------------
# report


def _widths(counts: Dict[str, int]) -> str:
    return " ".join(f"{w}b x{n}" for w, n in sorted(counts.items(), key=lambda kv: -int(kv[0])))


def format_rows(rows: List[Row]) -> str:
    head = f"{'kernel':6} {'variant':23} {'config':16} {'regs':>4} {'spill':>5} {'smem':>6} {'occ':>5} {'mma':8} " \
           f"{'loop':>5} {'x':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r.loop_ratio:.2f}" if r.loop_ratio else ""
        lines.append(f"{r.kernel:6} {r.variant:23} {r.config:16} {r.regs:4d} {r.spills:5d} {r.smem:6d} "
                     f"{r.occ:5.3f} {r.mma:8} {r.loop:5d} {ratio:>5}")
        if r.kernel == "ce":  # a memory-bound kernel: how wide its global accesses are
            lines[-1] += f"   LDG {_widths(r.ldg)} | STG {_widths(r.stg)}"
    return "\n".join(lines)


def format_work(work: List[dict]) -> str:
    head = f"{'shape':16} {'path':14} {'tile':8} {'computed/useful':>15} {'fwd bytes/floor':>15}"
    lines = [head, "-" * len(head)]
    for w in work:
        lines.append(f"{w['shape']:16} {w['path']:14} {w['tile']:8} {w['work_ratio']:15.2f} {w['bytes_ratio']:15.2f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="first autotune config of each kernel only")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--fused-bwd", action="store_true",
                    help="only the fused deterministic backward (kernel dkdvq) against dq + dkdv")
    ap.add_argument("--dropout-cost", action="store_true",
                    help="only where the dropout's extra loop instructions go (fwd, dq, dkdv at their default tiles)")
    args = ap.parse_args(argv)
    if args.dropout_cost:
        print(f"# dropout loop cost by opcode group: triton {triton.__version__}, target sm_90; elem/thr: score "
              f"elements per thread per tile, /elem: extra instructions per element")
        print(format_dropout_cost(dropout_cost_rows()))
        return
    if args.fused_bwd:
        print(f"# fused backward candidates: triton {triton.__version__}, target sm_90")
        rows = set_dropout_ratios(fused_bwd_rows())
        print(format_rows(rows))
        print()
        print(format_fused(rows))
        return
    rows = run_compile_audit(quick=args.quick)
    # the opt-in fused backward's own configs (not the tried candidates), so CI checks their spills too
    rows += [r for r in fused_bwd_rows(candidates=False) if r.kernel == "dkdvq"]
    if not args.quick:
        rows += fp32_rows()
    set_dropout_ratios(rows)  # the fused backward's rows too
    work = work_table()
    print(f"# kernel audit: triton {triton.__version__}, target sm_90 (compiled without a GPU)")
    print(format_rows(rows))
    print()
    print("# work at BLIP shapes (B=256, H=12, d=64; text: caption lengths mean "
          f"{sum(caption_lengths()) / 256:.1f} of 30)")
    print(format_work(work))
    if args.json:  # with the dropout cost breakdown (kernels compiled above: Triton's cache has them)
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=[dataclasses.asdict(r) for r in rows], work=work,
                           dropout_cost=dropout_cost_rows()), f, indent=1)


if __name__ == "__main__":
    main()
