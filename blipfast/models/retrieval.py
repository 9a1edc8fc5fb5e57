"""Image-text retrieval fine-tuning: ITC with image-id positives + ITM with gathered hard negatives.

The original `blip_retrieval.py`, with its checkpoint names (`visual_encoder`, `text_encoder`,
`vision_proj`, `text_proj`, `itm_head`, `temp`, the `*_m` momentum copies, `image_queue`,
`text_queue`, `idx_queue`, `ptr_queue`). What differs from pre-training:

* ITC targets: every column with the sample's image id is a positive (y = pos / pos.sum), the
  queue also stores image ids (`idx_queue`, -100 = empty);
* ITM negatives are drawn from the whole world batch (`negative_all_rank=True`, the COCO setting;
  False = local, Flickr): weights softmax(online sims vs the gathered online features / temp)
  with same-image columns zeroed; negative images come from an all-gather that keeps gradients;
* no LM loss, no decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from blipfast.config import BlipConfig
from blipfast.ops import resolve_losses
from blipfast.ops.packing import Packing

from blipfast.distributed import all_gather_with_grad, concat_all_gather

from .blip import TEMP_MAX, TEMP_MIN
from .med import TextTransformer
from .momentum import MomentumModel
from .vit import VisionTransformer

# EMA state of this model (see `detach_momentum`); the queue pointer has the retrieval name.
RETRIEVAL_MOMENTUM_STATE = ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m",
                            "image_queue", "text_queue", "idx_queue", "ptr_queue")


@dataclass
class BlipRetrievalOutput:
    loss: torch.Tensor  # loss_itc + loss_itm (equal weights, as the original's train_retrieval.py)
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    image_feat: torch.Tensor  # (B, E) normalised online image features
    text_feat: torch.Tensor  # (B, E) normalised online text features
    itm_logits: torch.Tensor  # (3B, 2): B positives, B (text, neg image), B (neg text, image)
    negatives: Tuple[torch.Tensor, torch.Tensor]  # indices into the gathered batch (image per text, text per image)


class BlipForRetrieval(MomentumModel):
    """model(images, input_ids, attention_mask, alpha, idx, negatives=None) -> BlipRetrievalOutput.

    images: (B, 3, S, S); input_ids / attention_mask: (B, L) BERT-tokenised ([CLS] first; the
    original pads to 35); alpha: momentum-distillation weight; idx: (B,) int image ids;
    negatives: optional (neg_image_for_text, neg_text_for_image) int64 (B,) indices into the
    gathered world batch (this rank's rows are [rank * B, (rank + 1) * B)) replacing sampling.
    In training mode a forward updates the momentum encoders first and the queues after ITC.
    """

    MOMENTUM_STATE = RETRIEVAL_MOMENTUM_STATE

    def __init__(self, config: BlipConfig, negative_all_rank: bool = True, nonfinite_negatives: str = "raise",
                 **momentum_kwargs):
        super().__init__(**momentum_kwargs)
        config.validate()
        self.config = config
        self.negative_all_rank = negative_all_rank
        vc, tc, ab = config.vision, config.text, config.attention_backend
        self.visual_encoder = VisionTransformer(vc, ab)
        self.text_encoder = TextTransformer(tc, ab)
        self.vision_proj = nn.Linear(vc.width, config.embed_dim)
        self.text_proj = nn.Linear(tc.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(tc.hidden_size, 2)
        self.temp = nn.Parameter(torch.full((1,), config.temp))  # 1-dim: DeepSpeed rejects 0-dim params

        self._build_momentum(config, ab)
        Q = config.queue_size
        self.register_buffer("idx_queue", torch.full((1, Q), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
        self.losses = resolve_losses(config.loss_backend, nonfinite_negatives=nonfinite_negatives)

    def dequeue_and_enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                            idx_world: torch.Tensor) -> None:
        self._enqueue(self.ptr_queue, image_feat_m, text_feat_m, idx_world)

    # -- inference helpers ---------------------------------------------------------------------

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: Optional[torch.Tensor] = None, image_kv=None) -> torch.Tensor:
        """(B, 2) ITM logits (class 1 = match) of texts against image tokens (or their precomputed
        cross-attention keys/values); the first token is replaced by [ENC]."""
        ids = self.with_first_token(input_ids, self.config.text.enc_token_id)
        if image_kv is None:
            image_kv = self.text_encoder.image_kv(image_embeds)
        return self.itm_head(self.text_encoder.first_states(ids, attention_mask, image_kv,
                                                            exact_work=self.config.exact_work))

    # -- training forward ----------------------------------------------------------------------

    def _check_inputs(self, images, input_ids, attention_mask, idx):
        self._check_batch(images, input_ids, attention_mask)
        B = images.shape[0]
        if idx is None or idx.numel() != B or idx.dtype.is_floating_point:
            raise ValueError(f"idx must hold one integer image id per sample ({B}), got "
                             f"{None if idx is None else (tuple(idx.shape), idx.dtype)}")

    def forward(self, images, input_ids, attention_mask, alpha: float, idx: torch.Tensor,
                negatives: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> BlipRetrievalOutput:
        self._check_inputs(images, input_ids, attention_mask, idx)
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        B = images.shape[0]
        idx = idx.reshape(-1).long()

        # Exact work (config.exact_work): text on real tokens only, cross-attention keys/values
        # once per image; None = off, or a batch that cannot be packed exactly (padded path).
        packing = Packing.from_mask(attention_mask) if self.config.exact_work else None
        image_embeds, image_feat, text_feat, image_feat_m, text_feat_m = self.itc_features(
            images, input_ids, attention_mask, packing)
        # Through the loss backend (the fused ITC on GPUs), in fp32 with autocast off as in pre-training.
        loss_itc, _, _ = self.losses.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                                              self.text_queue, self.temp, alpha, idx=idx,
                                              idx_queue=self.idx_queue.reshape(-1))
        idx_world = concat_all_gather(idx)

        # ITM negatives from the world batch (or the local one), same image id excluded.
        enc_ids = self.with_first_token(input_ids, self.config.text.enc_token_id)
        gather = self.negative_all_rank
        with torch.no_grad():
            idx_pool = idx_world if gather else idx  # (N,)
            text_pool_feat = concat_all_gather(text_feat) if gather else text_feat  # (N, E)
            image_pool_feat = concat_all_gather(image_feat) if gather else image_feat
            temp = self.temp.reshape(())
            if negatives is None:  # one batched draw per direction, no host sync
                neg_img, neg_txt = self.losses.sample_retrieval_negatives(
                    image_feat @ text_pool_feat.T / temp, text_feat @ image_pool_feat.T / temp, idx, idx_pool)
            else:
                neg_img, neg_txt = self._check_negatives(negatives, B, idx_pool.shape[0], "the gathered batch")
        image_pool = all_gather_with_grad(image_embeds) if gather else image_embeds  # (N, 1 + N_img, Cv)
        # one process: the gathered pool is this batch itself (the gathers return their input)
        pooled = image_pool is not image_embeds
        loss_itm, itm_logits = self.itm_loss(
            image_embeds, enc_ids, attention_mask, neg_img, neg_txt, exact=packing is not None,
            image_pool=image_pool if pooled else None, ids_pool=concat_all_gather(enc_ids) if pooled else None,
            att_pool=concat_all_gather(attention_mask) if pooled else None)
        if self.training:  # last, after everything that can raise (the ITC above copied the queues)
            self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx_world)
        return BlipRetrievalOutput(
            loss=loss_itc + loss_itm, loss_itc=loss_itc, loss_itm=loss_itm, image_feat=image_feat,
            text_feat=text_feat, itm_logits=itm_logits, negatives=(neg_img, neg_txt),
        )
