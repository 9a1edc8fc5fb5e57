"""Fused attention: the public `attention` function over the flash-attention Triton kernels.

Layers: `flash_kernels.py` holds the kernels, `flash_attention.py` their launchers; this file validates inputs,
registers the launchers as PyTorch custom ops (a fake implementation for tracing, an autograd
formula that calls the backward op), and exposes two functions over the same kernel family:

- `attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, softmax_scale=None)`:
  padded (B, H, L, D) tensors, semantics exactly `blipfast.kernels.reference.attention`'s;
- `varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
  dropout_p=0.0, softmax_scale=None)`, its sibling for packed (total, H, D) sequences with
  cumulative lengths (self, causal and cross attention without a pad token anywhere), semantics
  exactly `blipfast.kernels.reference.varlen_attention`'s.

`blipfast.kernels.attention` is the function; this module is `blipfast.kernels.attention` in
`sys.modules` (use `importlib.import_module` to reach `draw_dropout_seed` and friends).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import flash_attention as fa
from .flash_attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, dropout_keep_mask, interpreting

__all__ = ["attention", "varlen_attention", "draw_dropout_seed", "dropout_keep_mask", "check_inputs",
           "check_varlen_inputs"]


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


# The seed travels as a CPU int64 tensor (not an int) so that drawing it stays inside a
# torch.compile graph; custom ops accept it beside CUDA tensors.
@torch.library.custom_op("blipfast::flash_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], seed: Optional[Tensor],
            causal: bool, dropout_p: float, softmax_scale: float) -> Tuple[Tensor, Tensor]:
    return fa.forward(q, k, v, key_padding_mask, causal, dropout_p, softmax_scale, _seed(seed))


@_fwd_op.register_fake
def _fwd_fake(q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    B, H, Lq, D = q.shape
    return fa.empty_blhd(B, H, Lq, D, q), q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.custom_op("blipfast::flash_attention_bwd", mutates_args=())
def _bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            key_padding_mask: Optional[Tensor], seed: Optional[Tensor], causal: bool, dropout_p: float,
            softmax_scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return fa.backward(dout, q, k, v, out, lse, key_padding_mask, causal, dropout_p, softmax_scale, _seed(seed))


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    return fa.empty_blhd(B, H, Lq, D, q), fa.empty_blhd(B, H, Lk, D, k), fa.empty_blhd(B, H, Lk, D, v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, key_padding_mask, seed, ctx.causal, ctx.dropout_p,
                         ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def draw_dropout_seed() -> Tensor:
    """The Philox seed `attention` draws for a call with dropout: one draw from torch's default CPU
    generator, so `torch.manual_seed` makes the dropout pattern reproducible."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def _check_qkv(op: str, layout: str, cpu_hint: str, q, k, v, **index) -> None:
    """What `attention` and `varlen_attention` both need of their tensors: `index` (name: tensor,
    e.g. cu_seqlens) and q, k, v are tensors on one device, q, k, v of rank len(layout) in one
    supported dtype, on CUDA (or the CPU under the interpreter), with a supported head dim (last)."""
    tensors = {"q": q, "k": k, "v": v, **index}
    for name, x in tensors.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != len(layout.split(",")):
            raise ValueError(f"{op}: {name} must be {len(layout.split(','))}-D ({layout}), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    devices = {x.device for x in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{op}: {', '.join(tensors)} must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{op}: the Triton kernels need CUDA tensors (got {q.device}); CPU tensors run only under the "
            f"Triton interpreter (TRITON_INTERPRET=1 set before triton is imported). On a CPU use {cpu_hint}."
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim {q.shape[-1]} is not supported; supported: {SUPPORTED_HEAD_DIMS}")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                 dropout_p: float = 0.0) -> None:
    """Raise ValueError (TypeError for non-tensors) naming what the fused kernels cannot take."""
    _check_qkv("attention", "B, H, L, D", "the 'sdpa' or 'reference' attention backend", q, k, v)
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(
            f"attention: batch and head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(
            f"attention: q, k, v must share the head dim: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"attention: key_padding_mask must be a bool tensor (True = real key), got {got}")
        if key_padding_mask.shape != (B, k.shape[2]):
            raise ValueError(
                f"attention: key_padding_mask must be (B, Lk) = {(B, k.shape[2])}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
) -> Tensor:
    """Fused scaled dot-product attention (Triton), forward and backward, never storing the scores.

    Args:
        q: (B, H, Lq, D) queries. Any strides (e.g. a permuted view of a fused qkv projection).
        k: (B, H, Lk, D) keys; Lk may differ from Lq (cross-attention). Any strides.
        v: (B, H, Lk, D) values. Any strides.
            q, k, v share dtype (float16, bfloat16 or float32; accumulation is always fp32) and
            device (CUDA, or CPU under TRITON_INTERPRET=1). D is one of 16, 32, 64, 128.
        key_padding_mask: optional bool (B, Lk); True where the key is real (like BERT's
            attention_mask == 1), False where it is padding and gets no weight.
        causal: query i attends only to keys j <= i (top-left aligned, also when Lq != Lk).
        dropout_p: probability of dropping an attention probability (after the softmax); kept
            ones are scaled by 1 / (1 - p). p is realised in steps of 1/256 (8-bit thresholds, as
            in FlashAttention-2: 0.1 -> 26/256 = 0.1016, see `flash_attention.effective_dropout_p`),
            and the scale uses the realised p, so the expectation is exact. The pattern comes from Philox inside the kernels, seeded by one draw from
            torch's default CPU generator (`draw_dropout_seed`), and is regenerated identically
            in the backward; `dropout_keep_mask(seed, shape, p)` returns it as a bool
            (B, H, Lq, Lk) tensor.
        softmax_scale: multiplier of q.k; default 1 / sqrt(D).

    Returns:
        (B, H, Lq, D) in q's dtype, stored as (B, Lq, H, D) so that merging heads is a free view.
        A query row whose keys are all masked (padding and/or causality) returns zeros and gets
        zero gradients, as in `blipfast.kernels.reference.attention`.

    Differentiable in q, k, v; registered as the custom op `blipfast::flash_attention_fwd`, so
    `torch.compile` traces it without a graph break.
    """
    check_inputs(q, k, v, key_padding_mask, dropout_p)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    out, _ = _fwd_op(q, k, v, key_padding_mask, seed, bool(causal), float(dropout_p), scale)
    return out


# ---------------------------------------------------------------------------------------------
# the packed (variable-length) sibling


@torch.library.custom_op("blipfast::varlen_attention_fwd", mutates_args=())
def _varlen_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                   max_seqlen_k: int, seed: Optional[Tensor], causal: bool, dropout_p: float,
                   softmax_scale: float) -> Tuple[Tensor, Tensor]:
    return fa.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, dropout_p,
                             softmax_scale, _seed(seed))


@_varlen_fwd_op.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal, dropout_p,
                     softmax_scale):
    total_q, H, D = q.shape
    return q.new_empty(total_q, H, D), q.new_empty(H, total_q, dtype=torch.float32)


@torch.library.custom_op("blipfast::varlen_attention_bwd", mutates_args=())
def _varlen_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
                   cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, seed: Optional[Tensor], causal: bool,
                   dropout_p: float, softmax_scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return fa.varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal, dropout_p, softmax_scale, _seed(seed))


@_varlen_bwd_op.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
                     dropout_p, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, seed, causal, dropout_p, softmax_scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, causal, dropout_p, softmax_scale)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, causal, dropout_p, softmax_scale = ctx.args
    dq, dk, dv = _varlen_bwd_op(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, seed, causal,
                                dropout_p, softmax_scale)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def check_varlen_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                        max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0) -> None:
    """Raise ValueError (TypeError for non-tensors) naming what `varlen_attention` cannot take.

    Checks needing the values of cu_seqlens (monotone, starting at 0, ending at the totals, max
    lengths bounding every sequence) run only for CPU tensors outside torch.compile tracing: on a
    GPU they would cost a host sync."""
    _check_qkv("varlen_attention", "total, H, D", "blipfast.kernels.reference.varlen_attention", q, k, v,
               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if q.shape[1:] != k.shape[1:] or v.shape[1:] != k.shape[1:]:
        raise ValueError(f"varlen_attention: q, k, v must share (H, D): q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"varlen_attention: k and v must have the same total length, got {k.shape[0]} and {v.shape[0]}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2 or not cu.is_contiguous():
            raise ValueError(f"varlen_attention: {name} must be a contiguous int32 (B + 1,) tensor with B >= 1, "
                             f"got {cu.dtype} of shape {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"varlen_attention: cu_seqlens_q and cu_seqlens_k must both be (B + 1,), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} entries")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"varlen_attention: {name} must be a non-negative int, got {m!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"varlen_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():  # values: not while tracing
        for name, cu, total, m in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                   ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
            lens = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens < 0).any()):
                raise ValueError(f"varlen_attention: {name} must rise from 0 to the packed length {total}, got "
                                 f"{cu.tolist()}")
            if int(lens.max()) > m:
                raise ValueError(f"varlen_attention: {name} has a sequence of {int(lens.max())} rows, more than "
                                 f"{name.replace('cu_seqlens', 'max_seqlen')} = {m}")


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
) -> Tensor:
    """`attention` over packed sequences (no padding anywhere): the same kernels, in the layout of
    flash-attn's varlen functions. Semantics: `blipfast.kernels.reference.varlen_attention`.

    Args:
        q: (total_q, H, D) queries of B sequences laid end to end. Any row/head strides, D stride 1
            or not (the kernels take all strides).
        k, v: (total_k, H, D) keys and values, packed the same way. For cross-attention of packed
            text against each image's tokens: cu_seqlens_k = arange(B + 1) * 197.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths from 0 to total; query
            sequence b (rows cu_q[b]:cu_q[b + 1]) attends only to key sequence b.
        max_seqlen_q, max_seqlen_k: host ints bounding every sequence's length (they size the tile
            schedule without a host sync; checked against cu_seqlens for CPU tensors only).
        causal: top-left aligned within each sequence pair (query i sees keys j <= i).
        dropout_p: as in `attention` (realised in steps of 1/256, see
            `flash_attention.effective_dropout_p`); the pattern is regenerated in the backward.
            `flash_attention.varlen_dropout_keep_masks(seed, cu_q, cu_k, H, p)` returns it.
        softmax_scale: multiplier of q.k; default 1 / sqrt(D).

    Returns:
        (total_q, H, D) contiguous, in q's dtype. A sequence with no keys returns zeros (zero
        gradients). Several short sequences share one 64-row query tile (block-diagonal masking),
        and no program reads or writes a row outside the packed tensors.

    Differentiable in q, k, v; registered as the custom op `blipfast::varlen_attention_fwd`.
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    out, _ = _varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), seed,
                            bool(causal), float(dropout_p), scale)
    return out
