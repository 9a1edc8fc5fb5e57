"""Loss backends: ITC (momentum distillation + queue), hard-negative sampling, LM cross-entropy.

Chosen once per model (config `loss_backend`, env var BLIPFAST_LOSS_BACKEND). "auto" means the
fused Triton path on CUDA and the reference path otherwise.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from blipfast.kernels import reference as ref

from .attention import BackendUnavailable

ENV_VAR = "BLIPFAST_LOSS_BACKEND"


class LossBackend:
    """Reference implementation; fused backends override the methods."""

    name = "reference"

    def itc_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                 temp, alpha):
        """Returns (loss, sim_i2t_inbatch (B, B), sim_t2i_inbatch (B, B)); the sims carry no grad."""
        loss, sim_i2t, sim_t2i = ref.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                              image_queue, text_queue, temp, alpha, return_logits=True)
        B = image_feat.shape[0]
        return loss, sim_i2t[:, :B].detach(), sim_t2i[:, :B].detach()

    def sample_hard_negatives(self, sim_i2t_inbatch, sim_t2i_inbatch, generator=None):
        """Returns (neg_image_for_text, neg_text_for_image), int64 (B,)."""
        return ref.sample_hard_negatives(sim_t2i_inbatch, sim_i2t_inbatch, generator=generator)

    def lm_loss(self, hidden, weight, bias, labels, label_smoothing=0.1, ignore_index=-100):
        return ref.lm_cross_entropy(hidden, weight, bias, labels, label_smoothing=label_smoothing,
                                    ignore_index=ignore_index)

    def __repr__(self) -> str:
        return f"LossBackend({self.name})"


LOSS_BACKENDS: Dict[str, Callable[[], LossBackend]] = {"reference": LossBackend}


def register_loss_backend(name: str, factory: Callable[[], LossBackend]) -> None:
    LOSS_BACKENDS[name] = factory


def resolve_losses(name: Optional[str] = "auto") -> LossBackend:
    name = os.environ.get(ENV_VAR) or name or "auto"
    if name == "auto":
        name = "triton" if torch.cuda.is_available() and "triton" in LOSS_BACKENDS else "reference"
    if name not in LOSS_BACKENDS:
        raise BackendUnavailable(
            f"unknown loss backend {name!r}; choose one of auto, {', '.join(sorted(LOSS_BACKENDS))}"
        )
    return LOSS_BACKENDS[name]()
