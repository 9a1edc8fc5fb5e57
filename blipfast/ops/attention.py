"""Attention backends behind one call: `backend(q, k, v, key_padding_mask, causal, dropout_p)`.

q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_padding_mask: bool (B, Lk), True = real key;
causal aligns query i with key i. Semantics are `blipfast.kernels.reference.attention`'s.

Backends: `reference` (plain PyTorch), `sdpa` (torch's scaled_dot_product_attention), `triton`
(blipfast's fused kernels, `blipfast.kernels.attention`), `xformers` and `flash_attn` (optional
packages, CUDA only, each serving only the cases it supports).

A backend is chosen once per module (from the config's `attention_backend`, overridden by the
environment variable BLIPFAST_ATTENTION_BACKEND) and shown in the module's repr. "auto" means
Triton when CUDA is available and SDPA otherwise. Asking explicitly for a backend that cannot
run here raises `BackendUnavailable` at construction; one that cannot serve a particular call
(for example an unsupported head dim) raises `BackendUnsupported` naming the reason.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from blipfast.kernels import reference as ref

from .packing import pad_packed, unpad

ENV_VAR = "BLIPFAST_ATTENTION_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine (missing package or device)."""


class BackendUnsupported(ValueError):
    """The backend runs here but does not support this particular call."""


class AttentionBackend:
    """A named attention implementation; instances are callables shared by modules."""

    name: str = "?"

    def __call__(self, q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0):
        raise NotImplementedError

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
               causal=False, dropout_p=0.0):
        """Attention over packed sequences, `blipfast.kernels.reference.varlen_attention`'s semantics.

        q: (total_q, H, D); k, v: (total_k, H, D); cu_seqlens_q / _k: int (B + 1,); query
        sequence b attends key sequence b only (causal: top-left aligned within it). Returns
        (total_q, H, D). This default pads to (B, H, max_len, D), calls the padded backend with
        a key padding mask and unpads: exact, and sync-free given the max lengths."""
        return _padded_varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal, dropout_p)

    def __repr__(self) -> str:
        return f"AttentionBackend({self.name})"


class ReferenceAttention(AttentionBackend):
    name = "reference"

    def __call__(self, q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0):
        return ref.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p)


class SdpaAttention(AttentionBackend):
    """torch.nn.functional.scaled_dot_product_attention with a boolean mask when needed."""

    name = "sdpa"

    def __call__(self, q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0):
        Lq, Lk = q.shape[2], k.shape[2]
        if key_padding_mask is None:
            # SDPA's is_causal is top-left aligned, like ours.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        allowed = key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Lk)
        if causal:
            allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        # SDPA gives NaN (and NaN gradients) for a row with no allowed key; ours defines it as
        # zeros: let such rows attend anywhere, then zero their output (no host sync).
        empty = ~allowed.any(-1, keepdim=True)  # (B, 1, Lq|1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, dropout_p=dropout_p)
        return out.masked_fill(empty, 0.0)


def _padded_varlen(backend, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, dropout_p: float):
    """varlen through a padded backend call: pad, attend with a key padding mask, unpad."""
    qp, _ = pad_packed(q, cu_q, max_q)  # (B, Lq, H, D)
    kp, key_mask = pad_packed(k, cu_k, max_k)  # (B, Lk, H, D), None when all sequences are full
    vp, _ = pad_packed(v, cu_k, max_k)
    out = backend(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), key_padding_mask=key_mask,
                  causal=causal, dropout_p=dropout_p)  # (B, H, Lq, D)
    return unpad(out.transpose(1, 2), cu_q, q.shape[0])  # (total_q, H, D)


def _interpreting() -> bool:
    from blipfast.kernels import flash_attention

    return flash_attention.interpreting()


class TritonAttention(AttentionBackend):
    """blipfast's fused flash-attention kernels (`blipfast.kernels.attention`).

    Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
    """

    name = "triton"

    def __init__(self):
        if not torch.cuda.is_available() and not _interpreting():
            raise BackendUnavailable(
                "attention backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 set before triton is "
                "imported, to run its kernels slowly on the CPU); on this machine use 'sdpa' or 'reference'"
            )
        from blipfast.kernels.flash_attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

        self._dtypes, self._head_dims = SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    def _check(self, q) -> None:
        if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
            raise BackendUnsupported(
                f"attention backend 'triton' got {q.device} tensors: it runs on CUDA (or on the CPU under "
                "TRITON_INTERPRET=1); use 'sdpa' or 'reference' for them"
            )
        if q.shape[-1] not in self._head_dims:
            raise BackendUnsupported(
                f"attention backend 'triton' supports head dims {self._head_dims}, got {q.shape[-1]}"
            )
        if q.dtype not in self._dtypes:
            raise BackendUnsupported(f"attention backend 'triton' supports {self._dtypes}, got {q.dtype}")

    def __call__(self, q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0):
        from blipfast.kernels import attention

        self._check(q)
        return attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
               causal=False, dropout_p=0.0):
        """The packed kernel (`blipfast.kernels.varlen_attention`): no work on padding at all."""
        from blipfast.kernels import varlen_attention

        self._check(q)
        return varlen_attention(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k,
                                causal=causal, dropout_p=dropout_p)


def _allowed_and_empty(key_padding_mask, causal, Lq, Lk, device):
    """allowed: bool (B|1, 1, Lq|1, Lk) or None; empty: bool (B|1, 1, Lq|1, 1) rows with no key, or None."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        tri = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, Lq, Lk)
        allowed = tri if allowed is None else allowed & tri
    empty = None if allowed is None else ~allowed.any(-1, keepdim=True)
    return allowed, empty


class XformersAttention(AttentionBackend):
    """xformers.ops.memory_efficient_attention (optional package), CUDA only.

    Layout (B, L, H, D); masks go in as an additive bias (-inf where not allowed). A row with no
    allowed key is given a zero bias (so the kernel sees no all -inf row) and zeroed afterwards.
    """

    name = "xformers"

    def __init__(self):
        try:
            import xformers.ops as xops
        except ImportError as e:
            raise BackendUnavailable(
                f"attention backend 'xformers' needs the xformers package ({e}); pip install xformers, "
                "or choose triton, sdpa or reference"
            ) from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("attention backend 'xformers' needs a CUDA GPU; use 'sdpa' or 'reference'")
        self._xops = xops

    def __call__(self, q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0):
        if q.device.type != "cuda":
            raise BackendUnsupported(f"attention backend 'xformers' needs CUDA tensors, got {q.device}")
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        bias = None
        empty = None
        if key_padding_mask is None and causal:
            # Top-left aligned, like ours (LowerTriangularFromBottomRightMask is the other one).
            bias = self._xops.LowerTriangularMask()
        elif key_padding_mask is not None:
            allowed, empty = _allowed_and_empty(key_padding_mask, causal, Lq, Lk, q.device)
            allowed = allowed | empty  # rows with no key: attend to everything, zeroed below
            # xformers wants the bias's row stride to be a multiple of 8: allocate padded, then slice.
            pad = -(-Lk // 8) * 8
            full = torch.zeros(B, 1, Lq, pad, dtype=q.dtype, device=q.device)
            full[..., :Lk].masked_fill_(~allowed, float("-inf"))
            bias = full[..., :Lk].expand(B, H, Lq, Lk)
        out = self._xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
        ).transpose(1, 2)  # (B, Lq, H, D) -> (B, H, Lq, D)
        return out if empty is None else out.masked_fill(empty, 0.0)


class FlashAttnAttention(AttentionBackend):
    """flash_attn (optional package): fp16/bf16 on CUDA, head dim <= 256 and a multiple of 8.

    Layout (B, L, H, D). A key padding mask goes through the varlen kernel (keys packed, queries
    not); causal attention is served only without a key padding mask (flash_attn aligns causal
    masks bottom-right once keys are packed) and with Lq == Lk.
    """

    name = "flash_attn"

    def __init__(self):
        try:
            import flash_attn
        except ImportError as e:
            raise BackendUnavailable(
                f"attention backend 'flash_attn' needs the flash-attn package ({e}); it builds from source "
                "(pip install flash-attn --no-build-isolation), or choose triton, sdpa or reference"
            ) from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("attention backend 'flash_attn' needs a CUDA GPU; use 'sdpa' or 'reference'")
        self._fa = flash_attn

    def __call__(self, q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0):
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            raise BackendUnsupported(
                f"attention backend 'flash_attn' needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}"
            )
        if D > 256 or D % 8:
            raise BackendUnsupported(f"attention backend 'flash_attn' needs head dim <= 256 and % 8 == 0, got {D}")
        if causal and (key_padding_mask is not None or Lq != Lk):
            raise BackendUnsupported(
                "attention backend 'flash_attn' serves causal attention only with Lq == Lk and no key padding "
                "mask (its causal mask is bottom-right aligned); use 'triton' or 'sdpa'"
            )
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, L, H, D)
        if key_padding_mask is None:
            out = self._fa.flash_attn_func(qt, kt, vt, dropout_p=dropout_p, causal=causal)
            return out.transpose(1, 2)
        mask = key_padding_mask.to(torch.bool)
        lens_k = mask.sum(1, dtype=torch.int32)  # (B,)
        idx = mask.flatten().nonzero().squeeze(1)  # positions of real keys in (B*Lk)
        k_packed = kt.reshape(B * Lk, H, D)[idx]  # (total_k, H, D)
        v_packed = vt.reshape(B * Lk, H, D)[idx]
        cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
        out = self._fa.flash_attn_varlen_func(
            qt.reshape(B * Lq, H, D), k_packed, v_packed, cu_q, cu_k, Lq, int(lens_k.max()),
            dropout_p=dropout_p, causal=False,
        ).view(B, Lq, H, D)
        empty = (lens_k == 0)[:, None, None, None]  # (B, 1, 1, 1): no real key at all
        return out.transpose(1, 2).masked_fill(empty, 0.0)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
               causal=False, dropout_p=0.0):
        """flash_attn's own packed kernel. Its causal mask is bottom-right aligned, which is ours
        only when every query sequence is as long as its key sequence (self-attention)."""
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8:
            raise BackendUnsupported(
                f"attention backend 'flash_attn' needs fp16/bf16 CUDA tensors with head dim % 8 == 0, got "
                f"{q.dtype} on {q.device}, head dim {q.shape[-1]}"
            )
        if causal and cu_seqlens_q is not cu_seqlens_k:
            raise BackendUnsupported("attention backend 'flash_attn' serves packed causal attention only as "
                                     "self-attention (the same cu_seqlens object for queries and keys)")
        if max_seqlen_k == 0:  # no key anywhere: every query attends to nothing
            return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        out = self._fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                              dropout_p=dropout_p, causal=causal)
        lens_k = cu_k[1:] - cu_k[:-1]
        # rows of a query sequence that has no key attend to nothing (zeros), as the reference
        empty_q = torch.repeat_interleave(lens_k == 0, (cu_q[1:] - cu_q[:-1]).long(), output_size=q.shape[0])
        return out.masked_fill(empty_q[:, None, None], 0.0)


ATTENTION_BACKENDS: Dict[str, Callable[[], AttentionBackend]] = {
    "reference": ReferenceAttention,
    "sdpa": SdpaAttention,
    "triton": TritonAttention,
    "xformers": XformersAttention,
    "flash_attn": FlashAttnAttention,
}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    ATTENTION_BACKENDS[name] = factory


def _auto_name() -> str:
    if torch.cuda.is_available() and "triton" in ATTENTION_BACKENDS:
        return "triton"
    return "sdpa"


def resolve_attention(name: Optional[str] = "auto") -> AttentionBackend:
    """Return the attention backend for `name` (env var BLIPFAST_ATTENTION_BACKEND wins)."""
    name = os.environ.get(ENV_VAR) or name or "auto"
    if name == "auto":
        name = _auto_name()
    if name not in ATTENTION_BACKENDS:
        raise BackendUnavailable(
            f"unknown attention backend {name!r}; choose one of auto, {', '.join(sorted(ATTENTION_BACKENDS))}"
        )
    return ATTENTION_BACKENDS[name]()
