"""Fused attention: the public `attention` function over the flash-attention Triton kernels.

Layers: `flash_attention.py` holds the kernels and their launchers; this file validates inputs,
registers the launchers as PyTorch custom ops (a fake implementation for tracing, an autograd
formula that calls the backward op), and exposes `attention`, whose semantics are exactly
`blipfast.kernels.reference.attention`'s.

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

__all__ = ["attention", "draw_dropout_seed", "dropout_keep_mask", "check_inputs"]


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


def check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                 dropout_p: float = 0.0) -> None:
    """Raise ValueError (TypeError for non-tensors) naming what the fused kernels cannot take."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, L, D), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        raise ValueError(
            f"attention: the Triton kernels need CUDA tensors (got {q.device}); CPU tensors run only under "
            "the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported). On a CPU use the "
            "'sdpa' or 'reference' attention backend."
        )
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
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim {D} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
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
            ones are scaled by 1 / (1 - dropout_p). The pattern comes from Philox inside the
            kernels, seeded by one draw from torch's default CPU generator (`draw_dropout_seed`),
            and is regenerated identically in the backward; `dropout_keep_mask(seed, shape, p)`
            returns it as a bool (B, H, Lq, Lk) tensor.
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
