"""Backend choice for every fused op, resolved once when a module is built.

`resolve_attention(name)` returns the attention callable a module stores and calls;
`resolve_losses(name)` returns the loss backend (ITC, hard negatives, LM cross-entropy).
"""
from .attention import ATTENTION_BACKENDS, AttentionBackend, resolve_attention
from .losses import LOSS_BACKENDS, LossBackend, resolve_losses

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "resolve_attention",
    "LOSS_BACKENDS",
    "LossBackend",
    "resolve_losses",
]
