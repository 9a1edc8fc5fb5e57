"""Flash attention on Triton: the host launchers of the kernels in `flash_kernels` (forward, backward).

One kernel family serves every attention BLIP runs: bidirectional or causal self-attention and
cross-attention (Lq != Lk), with an optional key padding mask, in-kernel Philox dropout, and two
layouts: padded (B, H, L, D) tensors and packed variable-length (total, H, D) sequences with
cumulative lengths. The variants are `tl.constexpr` specialisations (IS_CAUSAL, HAS_MASK, VARLEN,
HAS_DROPOUT, EVEN_M, EVEN_N, UPCAST), not copies.

Padded layout: q (B, H, Lq, D), k/v (B, H, Lk, D) with any strides (the model hands over strided
views of a fused qkv projection); every kernel takes all four strides of every tensor. The output
and the gradients are allocated (B, L, H, D) in memory and returned as (B, H, L, D) views, which is
the layout the model merges heads from without a copy. With a key padding mask, key tiles after a
batch row's last real key are not visited.

Tiles: loops run full BLOCK tiles, then the ragged rest in 16-wide tiles (TAIL); a thin tail of
rows (197 = 3 x 64 + 5; `thin_tail_split`) is a second launch with 16-row tiles, so ViT's 197
tokens compute 208 x 208, not 256 x 256. Masks are applied only where a tile needs them.

Packed layout (VARLEN): the same kernels with B = 1, Lq = total_q, Lk = total_k; a host-built
schedule (`varlen_schedule`, device ops, no sync) gives each program a span of whole sequences, so
several short captions share one query tile (block-diagonal masking) and no program touches a row
outside the packed tensors. Masking is by per-row intervals: query row i sees keys [klo_i, khi_i)
of its own sequence (cut at the diagonal when causal); the dK/dV kernel uses the transposed form.

Numerics: scores, softmax statistics and accumulators are fp32. The softmax runs in base 2
(qk_scale = softmax_scale * log2(e)); the forward stores LSE2 = m + log2(l) per row, and +inf for
a row with no allowed key, so that every recomputed probability of such a row is exactly 0
(output 0, gradients 0: `reference.attention`'s definition).

Dropout: in-kernel Philox, one random byte per score element, p realised in steps of 1/256; the
forward and both backward kernels regenerate the same mask (`attention_dropout`). With dropout,
packed query tiles start at a multiple of 16 rows (as key tiles always do).

Backward: two schedules, both deterministic. A dQ kernel (S, dP, dQ: 3 matmuls per (query tile,
key tile)) and a dK/dV kernel (S, dP, dV, dK: 4); or the dK/dV kernel alone with FUSED_DQ, 5 matmuls
per tile: each program walks its key tiles in order and adds dS K into fp32 dQ rows only it
touches, so it needs no atomics (16-bit: computed as K^T dS^T, the head dim on the M side of the dot,
so that it runs on wgmma with 16-query tiles); it needs more registers and runs fewer programs
(benchmarks/kernel_audit.py --fused-bwd). Dense: one program per (batch, head). Packed: one per
group of key tiles holding whole sequences (`varlen_fused_schedule`: a tile of several short
sequences, or all chunks of a long one), owning those sequences' query rows; with dropout its query
tiles may start in the sequence before (16-row alignment), and those rows are masked out of its
delta reads and dQ writes. On a GPU the faster schedule is measured per tuning key at the first
backward (`FUSED_DQ`; `backward(fused_dq=...)`, `varlen_backward(fused_dq=...)` force one).

Files: `flash_kernels` (the device code), `attention_dropout` (the mask), `attention_tuning` (block
sizes and the autotuner's space), `varlen_schedule` (the packed layout's tile schedules); this
module launches them. It holds no autograd logic; `attention.py` builds the custom ops and the
public functions.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton

from ._common import device_guard, interpreting  # noqa: F401  (re-exported: flash_attention.interpreting)
from .attention_dropout import (  # noqa: F401  (re-exported: the dropout API the docstrings name)
    DROPOUT_BITS, DROPOUT_LEVELS, dropout_draws, dropout_keep_mask, effective_dropout_p, varlen_dropout_keep_masks)
from .attention_tuning import (  # noqa: F401  (re-exported: the block tables)
    FP32_BLOCKS, INTERPRETER_BLOCKS, TUNE_KEY, VARLEN_BLOCKS, device_key, fits_registers, gpu_configs, prune,
    quick_bench, tensor_device_key)
from .flash_kernels import TAIL, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd
from .varlen_schedule import _sequence_ids, varlen_fused_schedule, varlen_schedule  # noqa: F401

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# launching: the EVEN_* heuristics, the autotuner (attention_tuning), the backward's path choice


_EVEN = {
    "EVEN_M": lambda a: a["Lq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Lk"] % a["BLOCK_N"] == 0,
}
_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}
# The deterministic fused backward (FUSED_DQ=True): the dK/dV kernel, one program per (batch, head)
# (packed: per group of key tiles holding whole sequences, `varlen_fused_schedule`).
_FUSED_KERNELS = {"dkdv_fused": _attn_bwd_dkdv}
# Which backward runs when a call does not say (`fused_dq=None`): True, the fused 5-matmul kernel;
# False, the dQ and dK/dV kernels (7 matmuls); None, measured: on a GPU, the first backward of each
# tuning key times both (each under its own autotuned tiles) and keeps the faster for that key
# (`_measured_fused_choice`). Static counts cannot settle it: the fused kernel does 16-26% fewer
# instructions per tile but runs fewer, unpipelined programs (benchmarks/kernel_audit.py --fused-bwd).
# The interpreter and fp32 take the two-kernel path.
FUSED_DQ: Optional[bool] = None
# tuning key (`_choice_key`) -> True when the fused backward was the faster there
_FUSED_CHOICE: dict = {}


def _choice_key(args: dict, dtype: torch.dtype, varlen: bool) -> tuple:
    return (varlen, str(dtype), *(args[k] for k in TUNE_KEY))


def _measured_fused_choice(key: tuple, fused, two_kernel, bench=None) -> bool:
    """Whether to run the fused backward for `key`: cached, or timed now. fused / two_kernel:
    zero-argument launches of each path on the call's own tensors (they overwrite the same
    outputs, so the timing leaves nothing behind). bench(fn) -> ms (default: `quick_bench`)."""
    if key not in _FUSED_CHOICE:
        bench = bench or (lambda fn: quick_bench(fn, None))
        t_fused, t_two = bench(fused), bench(two_kernel)
        _FUSED_CHOICE[key] = t_fused < t_two
    return _FUSED_CHOICE[key]


def _use_fused(fused_dq: Optional[bool], args: dict, q: torch.Tensor, varlen: bool, fused, two_kernel) -> bool:
    """Resolve the backward path of one call (`FUSED_DQ`)."""
    choice = FUSED_DQ if fused_dq is None else fused_dq
    if choice is not None:
        return bool(choice)
    if not q.is_cuda or args["UPCAST"] or args["INTERPRET"]:
        return False  # nothing to measure
    key = _choice_key(args, q.dtype, varlen)
    if key not in _FUSED_CHOICE and torch.cuda.is_current_stream_capturing():
        return False  # no timing inside a CUDA graph capture (a warm-up run outside it has measured)
    return _measured_fused_choice(key, fused, two_kernel)


@functools.lru_cache(maxsize=None)
def _launcher(kind: str, tuned: bool):
    """The kernel wrapped with the EVEN_* heuristics, and with the autotuner when `tuned` (built
    lazily: nothing here may touch a GPU driver at import time). Tuning results are cached on
    disk (cache_results) under the full key, so later processes on the same machine skip the search."""
    fn = triton.heuristics(_EVEN)({**_KERNELS, **_FUSED_KERNELS}[kind])
    if tuned:
        fn = triton.autotune(gpu_configs(kind), key=TUNE_KEY, prune_configs_by={"early_config_prune": prune},
                             do_bench=quick_bench, cache_results=True)(fn)
    return fn


def _pick_config(kind: str, config, upcast: bool, varlen: bool):
    """`config`: (BLOCK_M, BLOCK_N[, num_warps, num_stages]) to force a tiling, or a dict of them by
    kind ("fwd", "dq", "dkdv"); None picks one: the interpreter's fixed blocks, the fixed fp32
    blocks, the packed layout's blocks, or None = the autotuner (dense fp16/bf16 on a GPU)."""
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None and interpreting():
        config = INTERPRETER_BLOCKS[kind]
    elif config is None and upcast:
        config = FP32_BLOCKS[kind]
    elif config is None and varlen:
        config = VARLEN_BLOCKS[kind]
    return config


def _launch(kind: str, grid, config, **kwargs):
    """Launch kernel `kind`. grid(block_m, block_n) -> the launch grid; config from `_pick_config`."""
    if config is not None:
        bm, bn, *launch = config
        launch = dict(zip(("num_warps", "num_stages"), launch))
        _launcher(kind, False)[grid(bm, bn)](BLOCK_M=bm, BLOCK_N=bn, **launch, **kwargs)
    else:
        _launcher(kind, True)[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](**kwargs)


def thin_tail_split(L: int, block: int) -> int:
    """Rows covered by full `block` tiles when the rest is a thin tail (at most block / 4 rows:
    197 = 3 x 64 + 5), which a second launch covers in TAIL-row tiles; L otherwise."""
    rest = L % block
    return L - rest if L > block and 0 < rest <= block // 4 else L


def _launch_dense(kind: str, length: int, along: int, n_heads: int, n_batch: int, config, **kwargs):
    """Launch kernel `kind` of the padded layout over `length` rows (along=0: query tiles of BLOCK_M) or
    keys (along=1: key tiles of BLOCK_N), then, when the last tile would be nearly empty, once
    more over the thin tail with TAIL-wide tiles (they lower to mma.sync, for a few rows), so
    that 197 tokens compute 208 rows, not 256."""
    def grid(bm, bn):
        block = (bm, bn)[along]
        return (triton.cdiv(thin_tail_split(length, block), block), n_heads, n_batch)

    _launch(kind, grid, config, first=0, **kwargs)
    if config is None:  # the autotuner's choice for this key
        best = _launcher(kind, True).best_config
        blocks, launch = [best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"]], (4, best.num_stages)
    else:
        blocks, launch = list(config[:2]), ((4, *config[3:]) if len(config) > 2 else ())
    split = thin_tail_split(length, blocks[along])
    if split < length:
        blocks[along] = TAIL.value if hasattr(TAIL, "value") else TAIL
        _launch(kind, lambda bm, bn: (triton.cdiv(length - split, blocks[along]), n_heads, n_batch), (*blocks, *launch), first=split,
                **{k: v for k, v in kwargs.items() if k != "first"})


# ---------------------------------------------------------------------------------------------
# host launchers


def _strides(x: torch.Tensor, names: str) -> dict:
    return dict(zip(names.split(), x.stride()))


def _common(q, Lq, Lk, B, H, causal, dropout_p, seed, has_mask, varlen):
    # The interpreter computes bf16 wrongly (triton#11584): there bf16 runs in fp32 tiles. fp16 runs
    # the GPU's own path (fp16 operands, fp32 accumulation), which the interpreter gets right.
    upcast = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting())
    p = effective_dropout_p(dropout_p)
    return dict(
        H=H, Lq=Lq, Lk=Lk, dropout_p=p, seed=int(seed),
        LQ_BUCKET=triton.next_power_of_2(Lq), LK_BUCKET=triton.next_power_of_2(Lk),
        BH_BUCKET=triton.next_power_of_2(B * H), DEVICE_KEY=tensor_device_key(q.device),
        HEAD_DIM=q.shape[-1], IS_CAUSAL=bool(causal), HAS_MASK=has_mask, VARLEN=varlen,
        HAS_DROPOUT=p > 0.0,
        UPCAST=upcast,
        INTERPRET=interpreting(),
        # fp32 inputs get true fp32 dots (a GPU's default for fp32 tl.dot is TF32).
        DOT_PREC="ieee" if upcast else "tf32",
    )


def _dense_args(q, k, key_padding_mask, causal, dropout_p, seed):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)  # same bytes, a dtype Triton loads everywhere
        mask_strides = {"smb": kpm.stride(0), "smn": kpm.stride(1)}
        # One past each batch row's last real key: key tiles after it are skipped (no sync: a device op).
        pos = torch.arange(1, Lk + 1, device=q.device, dtype=torch.int32)
        kv_len = (key_padding_mask.to(torch.int32) * pos).amax(1).to(torch.int32) if Lk else pos.new_zeros(B)
    else:
        kpm, kv_len, mask_strides = q, q, {"smb": 0, "smn": 0}  # dummy pointers, never read (HAS_MASK=False)
    varlen_dummies = dict(TILES=q, CU_Q=q, CU_K=q)  # never read (VARLEN=False)
    args = _common(q, Lq, Lk, B, H, causal, dropout_p, seed, key_padding_mask is not None, False)
    return dict(KPM=kpm, KV_LEN=kv_len, **mask_strides, **varlen_dummies, **args)


def empty_blhd(B: int, H: int, L: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, L, D) tensor stored as (B, L, H, D): merging heads afterwards is a free view."""
    return torch.empty(B, L, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def forward(q, k, v, key_padding_mask: Optional[torch.Tensor], causal: bool, dropout_p: float,
            softmax_scale: float, seed: int, config=None):
    """Launch the forward kernel on validated inputs. Returns (out (B, H, Lq, D), lse2 fp32 (B, H, Lq)).

    `config` (see `_pick_config`) bypasses the autotuner: tests use it to vary the tiling.
    """
    B, H, Lq, D = q.shape
    out = empty_blhd(B, H, Lq, D, q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    args = _dense_args(q, k, key_padding_mask, causal, dropout_p, seed)
    cfg = _pick_config("fwd", config, args["UPCAST"], False)
    with device_guard(q):
        _launch_dense("fwd", Lq, 0, H, B, cfg, Q=q, K=k, V=v, O=out, LSE=lse, SEQ_Q=q, **_strides(q, "sqb sqh sqm sqd"), **_strides(k, "skb skh skn skd"),
                **_strides(v, "svb svh svn svd"), **_strides(out, "sob soh som sod"),
                qk_scale=softmax_scale * LOG2E, **args)
    return out, lse


def backward(dout, q, k, v, out, lse, key_padding_mask, causal: bool, dropout_p: float,
             softmax_scale: float, seed: int, config=None, fused_dq: Optional[bool] = None):
    """Launch the dQ kernel (which also writes delta), then the dK/dV kernel. Returns (dq, dk, dv).

    fused_dq=True: one launch of the dK/dV kernel with FUSED_DQ, one program per (batch, head),
    5 matmuls per tile instead of 7, deterministic (no atomics), with an fp32 (B, H, Lq, D)
    scratch for dQ. None (default): the module's FUSED_DQ, by default the faster of the two as
    measured on this GPU for this tuning key."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq = empty_blhd(B, H, Lq, D, q)
    dk = empty_blhd(B, H, Lk, D, k)
    dv = empty_blhd(B, H, Lk, D, v)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    args = _dense_args(q, k, key_padding_mask, causal, dropout_p, seed)
    args.update(qk_scale=softmax_scale * LOG2E, sm_scale=softmax_scale)
    qkv = {**_strides(q, "sqb sqh sqm sqd"), **_strides(k, "skb skh skn skd"), **_strides(v, "svb svh svn svd"),
           **_strides(dout, "sdob sdoh sdom sdod")}
    outs = {**_strides(out, "sob soh som sod"), **_strides(dq, "sdqb sdqh sdqm sdqd"),
            **_strides(dk, "sdkb sdkh sdkn sdkd"), **_strides(dv, "sdvb sdvh sdvn sdvd")}

    def fused():
        dq_acc = torch.empty(B, H, Lq, D, dtype=torch.float32, device=q.device)  # zeroed by the kernel
        _launch("dkdv_fused", lambda bm, bn: (1, H, B), _pick_config("dkdv_fused", config, args["UPCAST"], False),
                first=0, Q=q, K=k, V=v, O=out, DO=dout, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=dq_acc,
                SEQ_K=q, QSPANS=q, group=1, FUSED_DQ=True, **qkv, **outs, **args)

    def two_kernel():
        _launch_dense("dq", Lq, 0, H, B, _pick_config("dq", config, args["UPCAST"], False), Q=q, K=k, V=v, O=out,
                      DO=dout, DQ=dq, LSE=lse, DELTA=delta, SEQ_Q=q, **qkv, **_strides(out, "sob soh som sod"),
                      **_strides(dq, "sdqb sdqh sdqm sdqd"), **args)
        _launch_dense("dkdv", Lk, 1, H, B, _pick_config("dkdv", config, args["UPCAST"], False), Q=q, K=k, V=v, O=out,
                      DO=dout, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=delta, SEQ_K=q, QSPANS=q, group=1,
                      FUSED_DQ=False, **qkv, **outs, **args)

    with device_guard(q):
        (fused if _use_fused(fused_dq, args, q, False, fused, two_kernel) else two_kernel)()
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# the packed (variable-length) layout: the same kernels with VARLEN=True, B = 1, Lq = total_q,
# Lk = total_k, and a schedule of row spans per program (varlen_schedule).


def _varlen_args(q, k, cu_q, cu_k, causal, dropout_p, seed):
    total_q, H, D = q.shape
    total_k = k.shape[0]
    args = _common(q, total_q, total_k, 1, H, causal, dropout_p, seed, False, True)
    return dict(CU_Q=cu_q, CU_K=cu_k, KPM=q, KV_LEN=q, smb=0, smn=0, **args)


def _row_align(args: dict) -> int:
    """Where packed query tiles start (`_query_tile`): with dropout at a multiple of 16 rows (the
    dropout words are laid out per 16 rows), else anywhere."""
    return 16 if args["HAS_DROPOUT"] else 1


def _packed_strides(x: torch.Tensor, names: str) -> dict:
    """(total, H, D) seen as (1, H, total, D): batch stride 0."""
    b, h, m, d = names.split()
    return {b: 0, h: x.stride(1), m: x.stride(0), d: x.stride(2)}


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, dropout_p: float,
                   softmax_scale: float, seed: int, config=None):
    """Forward over packed sequences. Returns (out (total_q, H, D), lse2 fp32 (H, total_q))."""
    total_q, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    args = _varlen_args(q, k, cu_q, cu_k, causal, dropout_p, seed)
    bm, bn, *launch = _pick_config("fwd", config, args["UPCAST"], True)
    tiles = varlen_schedule(cu_q, total_q, max_q, bm, align=_row_align(args))
    with device_guard(q):
        _launch("fwd", lambda _bm, _bn: (tiles.shape[0], H, 1), (bm, bn, *launch), first=0, Q=q, K=k, V=v, O=out,
                LSE=lse, TILES=tiles, SEQ_Q=_sequence_ids(cu_q, total_q), **_packed_strides(q, "sqb sqh sqm sqd"),
                **_packed_strides(k, "skb skh skn skd"), **_packed_strides(v, "svb svh svn svd"),
                **_packed_strides(out, "sob soh som sod"), qk_scale=softmax_scale * LOG2E, **args)
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, dropout_p: float,
                    softmax_scale: float, seed: int, config=None, fused_dq: Optional[bool] = None):
    """dQ then dK/dV over packed sequences. Returns (dq, dk, dv), shaped like q, k, v.

    fused_dq=True: one launch of the dK/dV kernel with FUSED_DQ, one program per group of key
    tiles holding whole sequences (`varlen_fused_schedule`), 5 matmuls per tile instead of 7,
    deterministic (no atomics), with an fp32 (H, total_q, D) scratch for dQ. None (default): the
    module's FUSED_DQ, by default the faster of the two as measured on this GPU for this key."""
    total_q, H, D = q.shape
    total_k = k.shape[0]
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq, dk, dv
    delta = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    args = _varlen_args(q, k, cu_q, cu_k, causal, dropout_p, seed)
    args.update(qk_scale=softmax_scale * LOG2E, sm_scale=softmax_scale)
    qkv = {**_packed_strides(q, "sqb sqh sqm sqd"), **_packed_strides(k, "skb skh skn skd"),
           **_packed_strides(v, "svb svh svn svd"), **_packed_strides(dout, "sdob sdoh sdom sdod")}
    outs = {**_packed_strides(out, "sob soh som sod"), **_packed_strides(dq, "sdqb sdqh sdqm sdqd"),
            **_packed_strides(dk, "sdkb sdkh sdkn sdkd"), **_packed_strides(dv, "sdvb sdvh sdvn sdvd")}

    def fused():
        cfg = _pick_config("dkdv_fused", config, args["UPCAST"], True)
        tiles, spans, group = varlen_fused_schedule(cu_q, cu_k, total_k, max_k, cfg[1])
        dq_acc = torch.empty(H, total_q, D, dtype=torch.float32, device=q.device)  # zeroed by the kernel, per program
        _launch("dkdv_fused", lambda bm, bn: (spans.shape[0], H, 1), cfg, first=0, Q=q, K=k, V=v, O=out,
                DO=dout, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=dq_acc, TILES=tiles, QSPANS=spans,
                group=group, SEQ_K=_sequence_ids(cu_k, total_k), FUSED_DQ=True, **qkv, **outs, **args)

    def two_kernel():
        cfg_dq = _pick_config("dq", config, args["UPCAST"], True)
        cfg_kv = _pick_config("dkdv", config, args["UPCAST"], True)
        q_tiles = varlen_schedule(cu_q, total_q, max_q, cfg_dq[0], align=_row_align(args))
        k_tiles = varlen_schedule(cu_k, total_k, max_k, cfg_kv[1], align=16)  # dropout words: 16 keys
        _launch("dq", lambda bm, bn: (q_tiles.shape[0], H, 1), cfg_dq, first=0, Q=q, K=k, V=v, O=out, DO=dout, DQ=dq,
                LSE=lse, DELTA=delta, TILES=q_tiles, SEQ_Q=_sequence_ids(cu_q, total_q), **qkv,
                **_packed_strides(out, "sob soh som sod"), **_packed_strides(dq, "sdqb sdqh sdqm sdqd"), **args)
        _launch("dkdv", lambda bm, bn: (k_tiles.shape[0], H, 1), cfg_kv, first=0, Q=q, K=k, V=v, O=out, DO=dout,
                DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=delta, TILES=k_tiles, QSPANS=k_tiles, group=1,
                SEQ_K=_sequence_ids(cu_k, total_k), FUSED_DQ=False, **qkv, **outs, **args)

    # both paths write the same rows (a row no key sees keeps its zero in either), so the timing
    # runs of a measured choice leave nothing the chosen path does not overwrite
    with device_guard(q):
        (fused if _use_fused(fused_dq, args, q, True, fused, two_kernel) else two_kernel)()
    return dq, dk, dv


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
