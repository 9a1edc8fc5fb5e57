"""Momentum (EMA) encoders shared by the pre-training and retrieval models.

`MomentumModel` holds what both need: the pairs (online, momentum) of encoders and projections,
copying and EMA-updating them, the ITC feature helpers, and `detach_momentum()`, which moves the
EMA state out of the module tree so a DeepSpeed trainer can keep it fp32 and unpartitioned.
A subclass sets `MOMENTUM_STATE` (the names of its momentum modules and queue buffers) and has
the attributes `visual_encoder`, `vision_proj`, `text_encoder`, `text_proj` and their `*_m`
copies, `config` and `momentum_context`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from blipfast.distributed import concat_all_gather
from blipfast.ops.packing import Packing


class MomentumModel(nn.Module):
    MOMENTUM_STATE: Tuple[str, ...] = ()

    def __init__(self, momentum_context: Optional[Callable[[List[nn.Parameter]], contextlib.AbstractContextManager]] = None,
                 update_momentum_in_forward: bool = True):
        """momentum_context: wraps the EMA update's reads of the online weights (a trainer under
        ZeRO-3 passes one that gathers the partitioned parameters); update_momentum_in_forward:
        False for a trainer that runs `momentum_update()` itself before each forward (outside
        DeepSpeed's ZeRO-3 hooks; the online weights do not change in between, so the result is
        the same)."""
        super().__init__()
        self.momentum_context = momentum_context or (lambda params: contextlib.nullcontext())
        self.update_momentum_in_forward = update_momentum_in_forward

    def _build_momentum(self, config, attention_backend: str) -> None:
        """Create the momentum towers as copies of the online ones, initialise the ITC/ITM heads
        (BERT's N(0, 0.02)) and the feature queues (random unit columns, as the original).
        Needs `visual_encoder`, `text_encoder`, `vision_proj`, `text_proj`, `itm_head` built."""
        from .med import TextTransformer
        from .vit import VisionTransformer

        vc, tc = config.vision, config.text
        self.visual_encoder_m = VisionTransformer(vc, attention_backend)
        self.text_encoder_m = TextTransformer(tc, attention_backend)
        self.vision_proj_m = nn.Linear(vc.width, config.embed_dim)
        self.text_proj_m = nn.Linear(tc.hidden_size, config.embed_dim)
        for m in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        self.copy_params()
        E, Q = config.embed_dim, config.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(E, Q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(E, Q), dim=0))

    def momentum_pairs(self) -> Iterator[Tuple[str, nn.Module, nn.Module]]:
        yield "visual_encoder", self.visual_encoder, self.visual_encoder_m
        yield "vision_proj", self.vision_proj, self.vision_proj_m
        yield "text_encoder", self.text_encoder, self.text_encoder_m
        yield "text_proj", self.text_proj, self.text_proj_m

    def _param_lists(self):
        online, momentum = [], []
        for name, m, m_m in self.momentum_pairs():
            a, b = dict(m.named_parameters()), dict(m_m.named_parameters())
            if a.keys() != b.keys():
                raise RuntimeError(f"momentum copy of {name} does not mirror its parameters")
            online += [a[k] for k in a]
            momentum += [b[k] for k in a]
        return online, momentum

    @torch.no_grad()
    def copy_params(self) -> None:
        online, momentum = self._param_lists()
        for p, p_m in zip(online, momentum):
            p_m.data.copy_(p.data)
            p_m.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta, in the momentum weights' own dtype (fp32)."""
        online, momentum = self._param_lists()
        m = self.config.momentum
        with self.momentum_context(online):
            src = [p.data.to(p_m.dtype) for p, p_m in zip(online, momentum)]
            dst = [p_m.data for p_m in momentum]
            torch._foreach_mul_(dst, m)
            torch._foreach_add_(dst, src, alpha=1.0 - m)

    # -- momentum state kept outside the module tree -----------------------------------------

    def detach_momentum(self) -> nn.Module:
        """Move the momentum encoders and queues (MOMENTUM_STATE) into a separate module and return it.

        This model keeps using them (attribute access falls through to the container), but they
        are no longer registered: `parameters()`, `state_dict()`, `.to()` and DeepSpeed's casting
        and ZeRO-3 partitioning no longer see them, so a trainer can keep this EMA state in fp32
        and replicated. The container's state_dict uses the same names, so
        `{**model.state_dict(), **container.state_dict()}` is the full official layout.
        """
        if "_momentum_state" in self.__dict__:
            raise RuntimeError("the momentum state is already detached")
        holder = nn.Module()
        for name in self.MOMENTUM_STATE:
            value = getattr(self, name)
            delattr(self, name)
            if isinstance(value, nn.Module):
                holder.add_module(name, value)
            else:
                holder.register_buffer(name, value)
        holder.train(self.training)
        object.__setattr__(self, "_momentum_state", holder)  # deliberately not a registered child
        return holder

    def __getattr__(self, name: str):
        holder = self.__dict__.get("_momentum_state")
        if holder is not None and name in type(self).MOMENTUM_STATE:
            return getattr(holder, name)
        return super().__getattr__(name)

    def train(self, mode: bool = True):
        super().train(mode)
        holder = self.__dict__.get("_momentum_state")
        if holder is not None:
            holder.train(mode)  # the original runs the momentum encoders in train mode too
        return self

    # -- input checks and the queues ---------------------------------------------------------

    def _check_batch(self, images, input_ids, attention_mask) -> None:
        """Clear errors for a malformed batch: (B, L) ids and mask, one image per text, token ids
        inside the vocabulary (checked on CPU inputs only: on a GPU it would wait for the device)."""
        if input_ids.ndim != 2 or attention_mask is None or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)} and "
                f"{None if attention_mask is None else tuple(attention_mask.shape)}"
            )
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {input_ids.shape[0]} texts")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        # under torch.compile the check would break the graph
        if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
            lo, hi, V = int(input_ids.min()), int(input_ids.max()), self.config.text.vocab_size
            if lo < 0 or hi >= V:
                raise ValueError(f"input_ids must be in [0, {V}) (text.vocab_size), got values in [{lo}, {hi}]")

    @staticmethod
    def _check_negatives(negatives, B: int, pool: int, where: str = "the batch") -> Tuple[torch.Tensor, torch.Tensor]:
        """negatives: (neg image per text, neg text per image), two (B,) integer indices into a
        pool of `pool` samples; returned as int64."""
        if len(negatives) != 2 or any(n.shape != (B,) for n in negatives):
            raise ValueError("negatives must be a pair of (B,) index tensors (neg image per text, neg text per image)")
        for n in negatives:
            if n.dtype not in (torch.int64, torch.int32) or bool(((n < 0) | (n >= pool)).any()):
                raise ValueError(f"negative indices must be integers in [0, {pool}) ({where})")
        return tuple(n.long() for n in negatives)

    @torch.no_grad()
    def _enqueue(self, ptr: torch.Tensor, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                 idx_world: Optional[torch.Tensor] = None) -> None:
        """Write the world batch's momentum features (and image ids, into `idx_queue`) at the
        queue pointer `ptr` and advance it."""
        image_feats = concat_all_gather(image_feat_m)
        text_feats = concat_all_gather(text_feat_m)
        n, Q = image_feats.shape[0], self.config.queue_size
        if Q % n:
            raise ValueError(
                f"queue_size {Q} is not a multiple of the global batch {n} (per-rank batch x world "
                f"size): choose a batch that divides it, or drop the last incomplete batch"
            )
        # Column indices computed on the device: no host sync to read the pointer.
        cols = (ptr + torch.arange(n, device=ptr.device)) % Q  # (n,)
        self.image_queue.index_copy_(1, cols, image_feats.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, cols, text_feats.T.to(self.text_queue.dtype))
        if idx_world is not None:
            self.idx_queue.index_copy_(1, cols, idx_world.reshape(1, -1).to(self.idx_queue.dtype))
        ptr.copy_((ptr + n) % Q)

    # -- ITC features --------------------------------------------------------------------------

    def with_first_token(self, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
        ids = input_ids.clone()
        ids[:, 0] = token_id
        return ids

    def image_features(self, image_embeds: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(image_embeds[:, 0, :]), dim=-1)

    def text_features(self, input_ids, attention_mask, momentum: bool = False,
                      packing: Optional[Packing] = None) -> torch.Tensor:
        """(B, E) normalised [CLS] features; with `packing` (the mask's layout) on real tokens only,
        the last layer computing only the [CLS] rows."""
        enc, proj = (self.text_encoder_m, self.text_proj_m) if momentum else (self.text_encoder, self.text_proj)
        ids = self.with_first_token(input_ids, self.config.text.cls_token_id)
        if packing is None:
            return F.normalize(proj(enc(ids, attention_mask)[:, 0, :]), dim=-1)
        return F.normalize(proj(enc(ids, packing=packing, first_only=True)), dim=-1)

    # -- the forward parts pre-training and retrieval share -----------------------------------

    def itc_features(self, images, input_ids, attention_mask, packing: Optional[Packing] = None):
        """Image tokens and the online and momentum ITC features of a batch:
        (image_embeds (B, 1 + N, Cv), image_feat, text_feat, image_feat_m, text_feat_m (B, E)).

        In training the momentum encoders are updated first, as the original does. With
        `packing` (exact work) the text passes skip padding and the momentum ViT's last block
        computes only [CLS]."""
        image_embeds = self.visual_encoder(images)  # (B, 1 + N, Cv)
        image_feat = self.image_features(image_embeds)  # (B, E)
        text_feat = self.text_features(input_ids, attention_mask, packing=packing)  # (B, E)
        with torch.no_grad():
            if self.training and self.update_momentum_in_forward:
                self.momentum_update()
            image_embeds_m = self.visual_encoder_m(images, first_only=packing is not None)  # (B, 1 | 1 + N, Cv)
            image_feat_m = self.image_features(image_embeds_m, momentum=True)
            text_feat_m = self.text_features(input_ids, attention_mask, momentum=True, packing=packing)
        return image_embeds, image_feat, text_feat, image_feat_m, text_feat_m

    def itm_logits_packed(self, enc_ids: torch.Tensor, attention_mask: torch.Tensor, image_kv,
                          image_index: torch.Tensor) -> torch.Tensor:
        """(P, 2) ITM logits of P (text, image) pairs, exact work: text p ([ENC] first; (P, L)
        padded, right-padded rows) reads image `image_index[p]` through the per-image
        cross-attention keys/values `image_kv` (`text_encoder.image_kv`, projected once per image,
        gathered per pair); the text runs on its real tokens only and the last layer computes
        only the [ENC] rows. A mask that is not right-padded keeps the padded text."""
        # the mask is checked again: negatives may be other ranks' texts
        vl = self.text_encoder.first_states(enc_ids, attention_mask, image_kv, image_index)  # (P, C)
        return self.itm_head(vl)

    def itm_loss(self, image_embeds: torch.Tensor, enc_ids: torch.Tensor, attention_mask: torch.Tensor,
                 neg_img: torch.Tensor, neg_txt: torch.Tensor, exact: bool, image_pool=None, ids_pool=None,
                 att_pool=None, image_kv=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss_itm, itm_logits (3B, 2)): B positive pairs, then B texts with the negative image
        `image_pool[neg_img]`, then B images with the negative text `ids_pool[neg_txt]`.

        The pools default to this batch (pre-training; retrieval passes the gathered world
        batch). exact (exact work): cross-attention keys/values once per image, for this batch's
        images (`image_kv` when the caller already has them) and, when negatives come from a
        gathered pool, for the B negative images; texts on their real tokens only."""
        B = image_embeds.shape[0]
        local = image_pool is None
        image_pool = image_embeds if local else image_pool
        ids_pool = enc_ids if ids_pool is None else ids_pool
        att_pool = attention_mask if att_pool is None else att_pool
        ids_all = torch.cat([enc_ids, enc_ids, ids_pool[neg_txt]], dim=0)  # (3B, L)
        att_all = torch.cat([attention_mask, attention_mask, att_pool[neg_txt]], dim=0)
        if not exact:
            img_all = torch.cat([image_embeds, image_pool[neg_img], image_embeds], dim=0)  # (3B, 1 + N, Cv)
            itm_logits = self.itm_head(self.text_encoder(ids_all, att_all, image_embeds=img_all)[:, 0, :])
        else:
            arange = torch.arange(B, device=neg_img.device)
            if local:  # every pair reads one of this batch's B images
                index = torch.cat([arange, neg_img, arange])
                kv = image_kv if image_kv is not None else self.text_encoder.image_kv(image_embeds)
            else:  # 2B projections (this batch + its negatives), not 3B nor the world batch
                memory = torch.cat([image_embeds, image_pool[neg_img]], dim=0)  # (2B, 1 + N, Cv)
                index = torch.cat([arange, arange + B, arange])
                kv = self.text_encoder.image_kv(memory)
            # negatives may be other ranks' texts: packed by their own lengths (right-padded)
            itm_logits = self.itm_logits_packed(ids_all, att_all, kv, index)
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
        return F.cross_entropy(itm_logits.float(), labels.to(itm_logits.device)), itm_logits
