"""BLIP pre-training: ViT + MED with the ITC, ITM and LM losses of the original `blip_pretrain.py`.

Parameter and buffer names follow the official checkpoint (`visual_encoder`, `text_encoder`,
`text_decoder.bert` / `text_decoder.cls`, `vision_proj`, `text_proj`, `itm_head`, `temp`, the
`*_m` momentum copies, `image_queue`, `text_queue`, `queue_ptr`), so `blipfast.convert` only
reshapes `temp` and checks keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from blipfast.config import BlipConfig
from blipfast.ops import resolve_losses
from blipfast.ops.packing import Packing

from .med import TextDecoder, TextTransformer
from .momentum import MomentumModel
from .vit import VisionTransformer

TEMP_MIN, TEMP_MAX = 0.001, 0.5
# EMA state: the momentum encoders and the feature queues (see `detach_momentum`).
MOMENTUM_STATE = ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m",
                  "image_queue", "text_queue", "queue_ptr")


@dataclass
class BlipPretrainOutput:
    loss: torch.Tensor  # loss_itc + loss_itm + loss_lm (the original weights them equally)
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor
    image_feat: torch.Tensor  # (B, E) normalised online image features
    text_feat: torch.Tensor  # (B, E) normalised online text features
    itm_logits: torch.Tensor  # (3B, 2): B positives, then B (text, neg image), B (neg text, image)
    negatives: Tuple[torch.Tensor, torch.Tensor]  # (neg image per text, neg text per image)


class BlipForPretraining(MomentumModel):
    """model(images, input_ids, attention_mask, alpha, negatives=None) -> BlipPretrainOutput.

    images: (B, 3, S, S) normalised; input_ids / attention_mask: (B, L) as a BERT tokenizer
    returns them ([CLS] first, padded); alpha: momentum-distillation weight; negatives: optional
    (neg_image_for_text, neg_text_for_image) int64 (B,) index tensors that replace sampling.
    In training mode a forward also updates the momentum encoders (before computing momentum
    features) and the feature queues (after the ITC loss), exactly as the original does.
    """

    MOMENTUM_STATE = MOMENTUM_STATE

    def __init__(self, config: BlipConfig, nonfinite_negatives: str = "raise", **momentum_kwargs):
        super().__init__(**momentum_kwargs)
        config.validate()
        self.config = config
        vc, tc = config.vision, config.text
        ab = config.attention_backend
        self.visual_encoder = VisionTransformer(vc, ab)
        self.text_encoder = TextTransformer(tc, ab)
        self.text_decoder = TextDecoder(TextTransformer.sharing(self.text_encoder, ab))
        self.vision_proj = nn.Linear(vc.width, config.embed_dim)
        self.text_proj = nn.Linear(tc.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(tc.hidden_size, 2)
        # 1-dim, not 0-dim: DeepSpeed 0.19.8 cannot initialise a 0-dim parameter.
        self.temp = nn.Parameter(torch.full((1,), config.temp))

        self._build_momentum(config, ab)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.losses = resolve_losses(config.loss_backend, nonfinite_negatives=nonfinite_negatives)

    def dequeue_and_enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        self._enqueue(self.queue_ptr, image_feat_m, text_feat_m)

    # -- forward -------------------------------------------------------------------------------

    def _check_inputs(self, images, input_ids, attention_mask, negatives):
        self._check_batch(images, input_ids, attention_mask)
        if negatives is None and images.shape[0] < 2:
            raise ValueError("a batch of 1: hard negatives come from the same batch, so it needs at least 2 samples")
        if negatives is not None:
            self._check_negatives(negatives, images.shape[0], images.shape[0])

    def forward(self, images, input_ids, attention_mask, alpha: float,
                negatives: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> BlipPretrainOutput:
        self._check_inputs(images, input_ids, attention_mask, negatives)
        tc = self.config.text
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)

        # Exact work (config.exact_work): text on real tokens only, cross-attention keys/values
        # once per image. None: off, or a batch that cannot be packed exactly (the padded path).
        packing = None
        if self.config.exact_work:
            dec_labels_ok = (input_ids == tc.pad_token_id) | attention_mask.bool()  # LM targets only on real tokens
            dec_labels_ok[:, 0] = True  # column 0 becomes [DEC], never a target
            packing = Packing.from_mask(attention_mask, extra_ok=dec_labels_ok)

        image_embeds, image_feat, text_feat, image_feat_m, text_feat_m = self.itc_features(
            images, input_ids, attention_mask, packing)

        loss_itc, sim_i2t, sim_t2i = self.losses.itc_loss(
            image_feat, text_feat, image_feat_m, text_feat_m,
            self.image_queue, self.text_queue, self.temp, alpha,
        )

        # ITM: B positives, then B texts with a hard-negative image, B images with a hard-negative text.
        if negatives is None:
            negatives = self.losses.sample_hard_negatives(sim_i2t, sim_t2i)
        neg_img, neg_txt = (n.long() for n in negatives)
        # Exact work: one projection per image and layer, shared by the 3B pairs and the decoder
        # (whose cross-attention is the encoder's): the backward sums all four uses into it.
        image_kv = self.text_encoder.image_kv(image_embeds) if packing is not None else None
        loss_itm, itm_logits = self.itm_loss(image_embeds, self.with_first_token(input_ids, tc.enc_token_id),
                                             attention_mask, neg_img, neg_txt, exact=packing is not None,
                                             image_kv=image_kv)
        dec_ids = self.with_first_token(input_ids, tc.dec_token_id)
        labels = dec_ids.masked_fill(dec_ids == tc.pad_token_id, -100)

        # LM: [DEC] first, padding ignored, [SEP] is a target.
        if packing is None:
            hidden = self.text_decoder(dec_ids, attention_mask, image_embeds=image_embeds)
            loss_lm = self.text_decoder.lm_loss(hidden, labels, self.losses, self.config.label_smoothing)
        else:
            loss_lm = self.text_decoder.lm_loss_exact(dec_ids, attention_mask, labels, self.losses,
                                                      self.config.label_smoothing, image_kv=image_kv,
                                                      packing=packing)

        # Last, after everything that can raise: a forward that raises leaves the queues and the
        # pointer as they were. They are overwritten in place: a loss backend that keeps them for
        # its backward must keep a copy of what it needs (the reference path's torch.cat copies).
        if self.training:
            self.dequeue_and_enqueue(image_feat_m, text_feat_m)
        return BlipPretrainOutput(
            loss=loss_itc + loss_itm + loss_lm, loss_itc=loss_itc, loss_itm=loss_itm, loss_lm=loss_lm,
            image_feat=image_feat, text_feat=text_feat, itm_logits=itm_logits, negatives=(neg_img, neg_txt),
        )
