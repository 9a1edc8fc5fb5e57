"""`Predictor`: what `blipfast.load` returns. A thin wrapper (composition, no patching) around a
loaded BLIP task model and its tokenizer: features, ITC / ITM scores, zero-shot classification
and captions, batched, in eval mode, without gradients unless asked.

Which calls a model supports follows from its modules:

  call                      needs                                       pretrain retrieval caption vqa
  encode_image .embeds      visual_encoder                                 yes      yes      yes   yes
  encode_image .feat        + vision_proj                                  yes      yes       -     -
  encode_text               text_encoder (+ text_proj for .feat)           yes      yes       -    yes*
  encode_multimodal         text_encoder with cross-attention              yes      yes       -    yes
  itc_score / itm_score     the projections / itm_head                     yes      yes       -     -
  caption                   text_decoder reading the image                 yes      -        yes    -
  (* embeddings only)

Scores follow the original's retrieval evaluation: ITC = cosine of the normalised projected
[CLS] features (not divided by the temperature); ITM = the match head on the [ENC] state of the
image-grounded encoder. When one image meets many texts, its ViT tokens and cross-attention
keys/values are computed once and shared by every text (`expand`: no copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import inputs

DEFAULT_MAX_TEXT_LEN = 35  # the original's retrieval padding length


@dataclass
class ImageFeatures:
    embeds: Optional[torch.Tensor]  # (N, 1 + P, Cv) ViT tokens, [CLS] first, unprojected (None: not kept)
    feat: Optional[torch.Tensor]  # (N, E) L2-normalised projection of [CLS] (None: no vision_proj)


@dataclass
class TextFeatures:
    embeds: Optional[torch.Tensor]  # (N, L, C) unimodal text-encoder states, [CLS] first
    feat: Optional[torch.Tensor]  # (N, E) L2-normalised projection of [CLS] (None: no text_proj)
    attention_mask: torch.Tensor  # (N, L) 1 = real token


@dataclass
class MultimodalFeatures:
    embeds: torch.Tensor  # (N, L, C) image-grounded encoder states, [ENC] first (ITM reads [:, 0])
    attention_mask: torch.Tensor  # (N, L)


class Predictor:
    """A loaded BLIP model for inference. Build it with `blipfast.load(...)`.

    model: a blipfast task model (BlipForPretraining / Retrieval / Captioning / VQA); tokenizer:
    its BLIP tokenizer; task, layout, source: what was loaded, from where.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, task: str, layout: str = "", source: str = "",
                 max_text_len: int = DEFAULT_MAX_TEXT_LEN, batch_size: int = 64, pair_batch: int = 128):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task, self.layout, self.source = task, layout, source
        self.max_text_len, self.batch_size, self.pair_batch = max_text_len, batch_size, pair_batch

    def __repr__(self) -> str:
        return (f"Predictor(task={self.task}, model={type(self.model).__name__}, layout={self.layout}, "
                f"source={self.source!r}, device={self.device})")

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def to(self, device) -> "Predictor":
        self.model.to(device)
        return self

    def _need(self, what: str, *modules: str) -> None:
        absent = [m for m in modules if not hasattr(self.model, m)]
        if absent:
            raise ValueError(f"{what} needs {', '.join(modules)}; this {self.task} model "
                             f"({type(self.model).__name__}) has no {', '.join(absent)}")

    def _images(self, images, batch_size: Optional[int]):
        dtype = next(self.model.parameters()).dtype
        for batch in inputs.image_batches(images, self.image_size, batch_size or self.batch_size):
            yield batch.to(self.device, dtype)

    def tokenize(self, texts: Union[str, Sequence[str]], clean: bool = False):
        """(input_ids, attention_mask) on the model's device, (N, L), padded to the longest."""
        ids, mask = inputs.tokenize(self.tokenizer, inputs.as_texts(texts, clean), self.max_text_len)
        return ids.to(self.device), mask.to(self.device)

    # -- features ------------------------------------------------------------------------------

    def encode_image(self, images, batch_size: Optional[int] = None, grad: bool = False,
                     embeds: bool = True) -> ImageFeatures:
        """ViT tokens (embeds=False drops them) and normalised projected [CLS] features."""
        self._need("encode_image", "visual_encoder")
        proj = getattr(self.model, "vision_proj", None)
        tok, feat = [], []
        with torch.set_grad_enabled(grad):
            for x in self._images(inputs.as_image_list(images), batch_size):
                e = self.model.visual_encoder(x)  # (b, 1 + P, Cv)
                if proj is not None:
                    feat.append(F.normalize(proj(e[:, 0, :]), dim=-1))  # (b, E)
                if embeds:
                    tok.append(e)
        return ImageFeatures(torch.cat(tok) if embeds else None, torch.cat(feat) if proj is not None else None)

    def encode_text(self, texts, batch_size: Optional[int] = None, grad: bool = False,
                    clean: bool = False) -> TextFeatures:
        """Unimodal text-encoder states ([CLS] first) and normalised projected [CLS] features."""
        self._need("encode_text", "text_encoder")
        ids, mask = self.tokenize(texts, clean)
        ids = ids.clone()
        ids[:, 0] = self.config.text.cls_token_id
        proj = getattr(self.model, "text_proj", None)
        hs, feat = [], []
        bs = batch_size or self.batch_size
        with torch.set_grad_enabled(grad):
            for i in range(0, ids.shape[0], bs):
                h = self.model.text_encoder(ids[i:i + bs], mask[i:i + bs])  # (b, L, C), no image: unimodal
                hs.append(h)
                if proj is not None:
                    feat.append(F.normalize(proj(h[:, 0, :]), dim=-1))
        return TextFeatures(torch.cat(hs), torch.cat(feat) if proj is not None else None, mask)

    def _grounded(self, ids: torch.Tensor, mask: torch.Tensor, kv) -> torch.Tensor:
        """(P, L, C) image-grounded encoder states of texts reading precomputed image keys/values."""
        ids = ids.clone()
        ids[:, 0] = self.config.text.enc_token_id
        return self.model.text_encoder(ids, mask, image_kv=kv)

    def _pairs(self, images, ids: torch.Tensor, mask: torch.Tensor, batch_size: Optional[int], fn):
        """fn(states (P, L, C)) over the pairs (image i, text i); one image meets every text when
        only one is given (its ViT tokens and keys/values computed once)."""
        images = inputs.as_image_list(images)
        n_img, n_txt = inputs.count(images), ids.shape[0]
        if n_img == 1:
            return self._matrix(images, ids, mask, fn)[0]
        if n_img != n_txt:
            raise ValueError(f"pairs need as many images as texts (or one image): got {n_img} images, {n_txt} texts")
        bs = batch_size or self.batch_size
        out, start = [], 0
        for x in self._images(images, bs):
            b = x.shape[0]
            kv = self.model.text_encoder.image_kv(self.model.visual_encoder(x))  # per layer (b, H, T, D)
            out.append(fn(self._grounded(ids[start:start + b], mask[start:start + b], kv)))
            start += b
        return torch.cat(out)

    def _matrix(self, images, ids, mask, fn, image_batch: Optional[int] = None) -> torch.Tensor:
        """(N_img, N_txt, ...) of fn over every (image, text) pair; each image's ViT tokens and
        cross-attention keys/values are computed once and shared by its texts."""
        T, rows = ids.shape[0], []
        for x in self._images(images, image_batch):
            kv = self.model.text_encoder.image_kv(self.model.visual_encoder(x))  # per layer (b, H, Ti, D)
            b = x.shape[0]
            flat = []
            for s in range(0, b * T, self.pair_batch):  # pair p = (image p // T, text p % T)
                p = torch.arange(s, min(s + self.pair_batch, b * T), device=ids.device)
                img, txt = p // T, p % T
                flat.append(fn(self._grounded(ids[txt], mask[txt], _select_kv(kv, img))))
            out = torch.cat(flat)
            rows.append(out.view(b, T, *out.shape[1:]))  # (b * T, ...) -> (b, T, ...)
        return torch.cat(rows)

    def encode_multimodal(self, images, texts, batch_size: Optional[int] = None, grad: bool = False,
                          clean: bool = False) -> MultimodalFeatures:
        """Image-grounded encoder states of pairs (image i, text i), or of one image with every text."""
        self._need("encode_multimodal", "visual_encoder", "text_encoder")
        ids, mask = self.tokenize(texts, clean)
        with torch.set_grad_enabled(grad):
            states = self._pairs(images, ids, mask, batch_size, lambda h: h)
        return MultimodalFeatures(states, mask)

    # -- scores --------------------------------------------------------------------------------

    def itc_score(self, images, texts, pairwise: bool = False, clean: bool = False,
                  batch_size: Optional[int] = None) -> torch.Tensor:
        """Cosine similarity of ITC features: (N_img, N_txt), or (N,) for pairs (image i, text i)."""
        self._need("itc_score", "vision_proj", "text_proj")
        img = self.encode_image(images, batch_size, embeds=False).feat  # (N_img, E)
        txt = self.encode_text(texts, batch_size, clean=clean).feat  # (N_txt, E)
        if not pairwise:
            return img @ txt.T
        if img.shape[0] == 1:
            return (img @ txt.T)[0]
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"pairs need as many images as texts: got {img.shape[0]} images, {txt.shape[0]} texts")
        return (img * txt).sum(-1)

    def itm_score(self, images, texts, pairwise: bool = False, logits: bool = False, clean: bool = False,
                  batch_size: Optional[int] = None) -> torch.Tensor:
        """ITM p(match) (logits=True: the raw match logit, what the original's re-ranking adds to
        the ITC cosine): (N_img, N_txt), or (N,) for pairs."""
        self._need("itm_score", "visual_encoder", "text_encoder", "itm_head")

        def head(h):  # (P, L, C) -> (P,)
            out = self.model.itm_head(h[:, 0, :]).float()  # (P, 2)
            return out[:, 1] if logits else out.softmax(-1)[:, 1]

        ids, mask = self.tokenize(texts, clean)
        with torch.no_grad():
            if pairwise:
                return self._pairs(images, ids, mask, batch_size, head)
            return self._matrix(inputs.as_image_list(images), ids, mask, head, batch_size)

    # -- zero-shot and captions ----------------------------------------------------------------

    def zero_shot_classifier(self, class_names: Sequence[str], templates: Optional[Sequence[str]] = None):
        """A `ZeroShotClassifier` over `class_names`; its prompt-ensemble ITC features are built now."""
        from .zero_shot import ZeroShotClassifier

        return ZeroShotClassifier(self, class_names, templates)

    @torch.no_grad()
    def caption(self, images, num_beams: int = 3, max_length: int = 20, min_length: int = 5,
                sample: bool = False, batch_size: Optional[int] = None, **kw) -> List[str]:
        """Captions (a captioning model: the original's beam search with its prompt; a pre-training
        model: its decoder from [DEC], no prompt)."""
        self._need("caption", "visual_encoder", "text_decoder")
        if self.task == "vqa":
            raise ValueError("caption needs a captioning or pre-training model; a VQA decoder reads questions")
        out: List[str] = []
        for x in self._images(inputs.as_image_list(images), batch_size):
            if hasattr(self.model, "generate"):
                out += self.model.generate(x, sample=sample, num_beams=num_beams, max_length=max_length,
                                           min_length=min_length, **kw)
            else:
                out += self._pretrain_caption(x, sample, num_beams, max_length, min_length, **kw)
        return out

    def _pretrain_caption(self, x, sample, num_beams, max_length, min_length, **kw) -> List[str]:
        from blipfast.generation import generate

        if self.tokenizer is None:
            raise ValueError("captions need a tokenizer to decode: blipfast.load(..., tokenizer=...)")
        tc = self.config.text
        start = torch.full((x.shape[0], 1), tc.dec_token_id, dtype=torch.long, device=x.device)  # [DEC]
        ids = generate(self.model.text_decoder, self.model.visual_encoder(x), start, sample_mode=sample,
                       num_beams=num_beams, max_length=max_length, min_length=min_length, **kw)
        return [self.tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in ids.tolist()]


def _select_kv(kv, rows: torch.Tensor):
    """Per-layer (k, v) for pair rows: one image -> a broadcast view (expand, no copy), else indexed."""
    if bool((rows == rows[0]).all()):
        r = int(rows[0])
        return [(k[r:r + 1].expand(rows.shape[0], -1, -1, -1), v[r:r + 1].expand(rows.shape[0], -1, -1, -1))
                for k, v in kv]  # (1, H, T, D) -> (P, H, T, D) view
    return [(k[rows], v[rows]) for k, v in kv]
