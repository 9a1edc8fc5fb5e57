"""Attention backends behind one call: `backend(q, k, v, key_padding_mask, causal, dropout_p)`.

q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_padding_mask: bool (B, Lk), True = real key;
causal aligns query i with key i. Semantics are `blipfast.kernels.reference.attention`'s.

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


ATTENTION_BACKENDS: Dict[str, Callable[[], AttentionBackend]] = {
    "reference": ReferenceAttention,
    "sdpa": SdpaAttention,
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
