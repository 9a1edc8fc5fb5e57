"""Loss backends: ITC (momentum distillation + queue), hard-negative sampling, LM cross-entropy.

Chosen once per model (config `loss_backend`, env var BLIPFAST_LOSS_BACKEND). "auto" means the
fused Triton path on CUDA (when triton imports) and the reference path otherwise. "triton"
runs `blipfast.kernels.itc` / `cross_entropy`: on CUDA, or on CPU tensors under TRITON_INTERPRET=1.

Also here, for retrieval fine-tuning (original `blip_retrieval.py`): `LossBackend.itc_loss` with
image ids, `LossBackend.retrieval_negatives` (negatives over the local or all-gathered batch)
and the gathers `concat_all_gather` (no gradient) / `all_gather_with_grad`.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from blipfast.kernels import reference as ref

from blipfast.distributed import all_gather_with_grad, concat_all_gather  # noqa: F401  (re-exported)

from .attention import BackendUnavailable

ENV_VAR = "BLIPFAST_LOSS_BACKEND"


class LossBackend:
    """Reference implementation; fused backends override the methods."""

    name = "reference"

    def itc_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                 temp, alpha, idx=None, idx_queue=None):
        """Returns (loss, sim_i2t_inbatch (B, B), sim_t2i_inbatch (B, B)); the sims carry no grad.

        With idx (B,) / idx_queue (Q,) image ids: the retrieval fine-tuning loss (targets over
        every column of the same image). The queues are not needed after this call returns.

        Computed in fp32 with autocast off: logits reach 1/temp = 1000, where bf16 rounding would
        change the loss (the original runs in fp32)."""
        with torch.autocast(device_type=image_feat.device.type, enabled=False):
            f32 = [t.float() for t in (image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp)]
            return self._itc_loss_fp32(*f32, alpha, idx, idx_queue)

    def _itc_loss_fp32(self, image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                       temp, alpha, idx, idx_queue):
        if idx is None:
            loss, sim_i2t, sim_t2i = ref.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                                  image_queue, text_queue, temp, alpha, return_logits=True)
        else:
            loss, sim_i2t, sim_t2i = ref.itc_loss_retrieval(
                image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, idx, idx_queue,
                temp, alpha, return_logits=True)
        B = image_feat.shape[0]
        return loss, sim_i2t[:, :B].detach(), sim_t2i[:, :B].detach()

    def sample_hard_negatives(self, sim_i2t_inbatch, sim_t2i_inbatch, generator=None):
        """Returns (neg_image_for_text, neg_text_for_image), int64 (B,)."""
        return ref.sample_hard_negatives(sim_t2i_inbatch, sim_i2t_inbatch, generator=generator)

    def lm_loss(self, hidden, weight, bias, labels, label_smoothing=0.1, ignore_index=-100):
        return ref.lm_cross_entropy(hidden, weight, bias, labels, label_smoothing=label_smoothing,
                                    ignore_index=ignore_index)

    def retrieval_negatives(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor,
                            temp: torch.Tensor, all_ranks: bool = True,
                            generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Hard negatives of retrieval fine-tuning (original `negative_all_rank=all_ranks`).

        image_feat, text_feat: (B, E) this rank's normalised online features; idx: (B,) image ids;
        temp: 1-element tensor. Weights: softmax(online feat @ candidate online feats^T / temp)
        with every candidate of the same image id removed (no 1e-4 floor). Candidates are the
        all-gathered batch (rank-major, W x B) when all_ranks, else the local batch. Returns
        (neg_image_for_text, neg_text_for_image): int64 (B,) indices into the candidates, i.e.
        into `all_gather_with_grad(image_embeds)` (gradient flows back to the owning rank) and
        `concat_all_gather(input_ids / attention_mask)`; no host sync.
        """
        with torch.no_grad():
            if all_ranks:
                img_c, txt_c, idx_c = concat_all_gather(image_feat), concat_all_gather(text_feat), concat_all_gather(idx)
            else:
                img_c, txt_c, idx_c = image_feat, text_feat, idx
            t = temp.reshape(())
            sim_i2t = image_feat @ txt_c.t() / t  # (B, C)
            sim_t2i = text_feat @ img_c.t() / t  # (B, C)
            return self._sample_by_idx(sim_i2t, sim_t2i, idx, idx_c, generator)

    def sample_retrieval_negatives(self, sim_i2t, sim_t2i, idx_row, idx_col, generator=None):
        """(neg_image_for_text, neg_text_for_image) column indices, same image id excluded."""
        return self._sample_by_idx(sim_i2t, sim_t2i, idx_row, idx_col, generator)

    def _sample_by_idx(self, sim_i2t, sim_t2i, idx_row, idx_col, generator):
        return ref.sample_retrieval_negatives(sim_i2t, sim_t2i, idx_row, idx_col, generator=generator)

    def __repr__(self) -> str:
        return f"LossBackend({self.name})"


class TritonLossBackend(LossBackend):
    """Fused Triton kernels: streaming ITC + sync-free sampling (`blipfast.kernels.itc`) and the
    chunked LM-head cross-entropy (`blipfast.kernels.cross_entropy`). Same methods and results as
    the reference (losses as 0-dim fp32 tensors); sampling draws from the same distributions
    with a different random stream."""

    name = "triton"

    def __init__(self):
        try:
            from blipfast.kernels import cross_entropy, itc
        except ImportError as e:  # triton missing or broken
            raise BackendUnavailable(f"loss backend 'triton' needs triton: {e}") from e
        if not (torch.cuda.is_available() or itc.interpreting()):
            raise BackendUnavailable("loss backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests)")
        self._itc, self._ce = itc, cross_entropy

    def itc_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                 temp, alpha, idx=None, idx_queue=None):
        return self._itc.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                                  temp, alpha, idx=idx, idx_queue=idx_queue)

    def sample_hard_negatives(self, sim_i2t_inbatch, sim_t2i_inbatch, generator=None):
        """generator: a CPU torch.Generator (or None: torch's default CPU generator) seeds the draw."""
        return self._itc.sample_hard_negatives(sim_i2t_inbatch, sim_t2i_inbatch, generator=generator)

    def lm_loss(self, hidden, weight, bias, labels, label_smoothing=0.1, ignore_index=-100):
        return self._ce.lm_cross_entropy(hidden, weight, bias, labels, label_smoothing=label_smoothing,
                                         ignore_index=ignore_index)

    def _sample_by_idx(self, sim_i2t, sim_t2i, idx_row, idx_col, generator):
        neg_img = self._itc.sample_negatives_by_idx(sim_t2i, idx_row, idx_col, generator=generator)
        neg_txt = self._itc.sample_negatives_by_idx(sim_i2t, idx_row, idx_col, generator=generator)
        return neg_img, neg_txt


LOSS_BACKENDS: Dict[str, Callable[[], LossBackend]] = {"reference": LossBackend, "triton": TritonLossBackend}


def register_loss_backend(name: str, factory: Callable[[], LossBackend]) -> None:
    LOSS_BACKENDS[name] = factory


class NonRaisingNegatives:
    """A loss backend whose hard-negative sampling never raises on non-finite similarities (a
    corrupt batch or divergence): it returns the next sample as the negative instead. A trainer
    asks for it (`resolve_losses(..., nonfinite_negatives="next")`, through the model's
    constructor) so that every rank finishes its forward (ZeRO-3 gathers parameters collectively
    inside it, so a rank that raised half-way would deadlock the others) and its all-reduced
    non-finite check stops or skips on all ranks together. The non-finite values still reach the
    ITC loss, which is where the trainer sees them."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sample_hard_negatives(self, sim_i2t, sim_t2i, *args, **kwargs):
        try:
            return self.inner.sample_hard_negatives(sim_i2t, sim_t2i, *args, **kwargs)
        except ValueError as e:
            if "non-finite" not in str(e):
                raise
            B = sim_i2t.shape[0]
            nxt = (torch.arange(B, device=sim_i2t.device) + 1) % B
            return nxt, nxt.clone()

    def sample_retrieval_negatives(self, sim_i2t, sim_t2i, *args, **kwargs):
        try:
            return self.inner.sample_retrieval_negatives(sim_i2t, sim_t2i, *args, **kwargs)
        except ValueError as e:
            if "non-finite" not in str(e):
                raise
            B, C = sim_i2t.shape  # any valid columns: the loss is non-finite, the step is skipped or stopped
            nxt = (torch.arange(B, device=sim_i2t.device) + 1) % C
            return nxt, nxt.clone()

    def __repr__(self) -> str:
        return f"NonRaisingNegatives({self.inner!r})"


NONFINITE_NEGATIVES = ("raise", "next")


def resolve_losses(name: Optional[str] = "auto", nonfinite_negatives: str = "raise"):
    """The loss backend `name` (auto | reference | triton; BLIPFAST_LOSS_BACKEND overrides).
    nonfinite_negatives: 'raise' (a ValueError from hard-negative sampling on non-finite
    similarities, where the backend checks) or 'next' (see NonRaisingNegatives)."""
    if nonfinite_negatives not in NONFINITE_NEGATIVES:
        raise ValueError(f"nonfinite_negatives must be one of {NONFINITE_NEGATIVES}, got {nonfinite_negatives!r}")
    backend = _resolve_backend(name)
    return NonRaisingNegatives(backend) if nonfinite_negatives == "next" else backend


def _resolve_backend(name: Optional[str]) -> LossBackend:
    name = os.environ.get(ENV_VAR) or name or "auto"
    if name == "auto":
        if torch.cuda.is_available() and "triton" in LOSS_BACKENDS:
            try:
                return LOSS_BACKENDS["triton"]()
            except BackendUnavailable:  # e.g. triton not installed: the reference still runs
                pass
        name = "reference"
    if name not in LOSS_BACKENDS:
        raise BackendUnavailable(
            f"unknown loss backend {name!r}; choose one of auto, {', '.join(sorted(LOSS_BACKENDS))}"
        )
    return LOSS_BACKENDS[name]()
