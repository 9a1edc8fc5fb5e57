"""Zero-shot classification with BLIP: rank classes by ITC, optionally re-rank the top k by ITM.

Each class is described by an ensemble of prompts (`templates`, each with one `{}` for the class
name). The ITC class embedding is the normalised mean of the prompts' normalised text features,
computed once when the classifier is built. `classify(images, top_k_itm=k)` scores every image
against every class by cosine; with k > 0 the k best classes of each image are re-scored as the
original's retrieval re-ranking does: ITM match logit (here averaged over the class's prompts)
plus the ITC cosine. Each image's ViT tokens and cross-attention keys/values are computed once
and shared by its k x (number of templates) prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import inputs
from .predictor import _select_kv

DEFAULT_TEMPLATES = ("a picture of a {}.", "a photo of a {}.", "an image of a {}.", "a {}.")
NOT_RERANKED = -100.0  # the original retrieval's score for candidates ITM did not re-rank


@dataclass
class Classification:
    indices: torch.Tensor  # (N,) predicted class per image
    labels: List[str]  # (N,) its name
    scores: torch.Tensor  # (N, C) ranking scores: ITC cosine, or ITM + ITC for re-ranked classes (others -100)
    itc: torch.Tensor  # (N, C) cosine of image and class ITC embeddings
    candidates: Optional[torch.Tensor] = None  # (N, k) the classes ITM re-ranked (ITC order), or None
    itm: Optional[torch.Tensor] = None  # (N, k) their ITM match logits, averaged over the templates


class ZeroShotClassifier:
    """classifier = predictor.zero_shot_classifier(["cat", "dog"], templates=["a photo of a {}."])"""

    def __init__(self, predictor, class_names: Sequence[str], templates: Optional[Sequence[str]] = None):
        predictor._need("zero-shot classification", "vision_proj", "text_proj", "text_encoder")
        names = [class_names] if isinstance(class_names, str) else list(class_names)
        if not names or not all(isinstance(c, str) and c.strip() for c in names):
            raise ValueError(f"class_names must be a non-empty list of non-empty strings, got {class_names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"class names repeat: {sorted({c for c in names if names.count(c) > 1})}")
        templates = list(DEFAULT_TEMPLATES if templates is None else templates)
        bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"templates must be strings with exactly one '{{}}' for the class name; bad: {bad or templates}")
        self.predictor, self.class_names, self.templates = predictor, names, templates
        C, K = len(names), len(templates)
        prompts = [t.format(c) for c in names for t in templates]  # class-major: prompt c * K + t
        self.input_ids, self.attention_mask = predictor.tokenize(prompts)  # (C * K, L), tokenised once
        with torch.no_grad():
            feat = predictor.encode_text(prompts).feat  # (C * K, E), normalised
        self.class_feat = F.normalize(feat.view(C, K, -1).mean(1), dim=-1)  # (C * K, E) -> (C, E)

    @torch.no_grad()
    def classify(self, images, top_k_itm: int = 0, batch_size: Optional[int] = None) -> Classification:
        p, model = self.predictor, self.predictor.model
        C = len(self.class_names)
        if not 0 <= top_k_itm <= C:
            raise ValueError(f"top_k_itm must be in [0, {C}] (the number of classes), got {top_k_itm}")
        if top_k_itm:
            p._need("ITM re-ranking", "itm_head")
        itc, cands, itms = [], [], []
        for x in p._images(inputs.as_image_list(images), batch_size):
            emb = model.visual_encoder(x)  # (b, T, Cv)
            sims = F.normalize(model.vision_proj(emb[:, 0, :]), dim=-1) @ self.class_feat.T  # (b, C)
            itc.append(sims)
            if top_k_itm:
                cand = sims.topk(top_k_itm, dim=1).indices  # (b, k)
                cands.append(cand)
                itms.append(self._itm(emb, cand))
        itc = torch.cat(itc)
        if not top_k_itm:
            idx = itc.argmax(1)
            return Classification(idx, [self.class_names[i] for i in idx.tolist()], itc, itc)
        cand, itm = torch.cat(cands), torch.cat(itms)  # (N, k), (N, k)
        scores = torch.full_like(itc, NOT_RERANKED)
        scores.scatter_(1, cand, itm + itc.gather(1, cand))
        idx = scores.argmax(1)
        return Classification(idx, [self.class_names[i] for i in idx.tolist()], scores, itc, cand, itm)

    def _itm(self, emb: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """(b, k) ITM match logits of each image's candidate classes, averaged over the templates."""
        p, K = self.predictor, len(self.templates)
        b, k = cand.shape
        kv = p.model.text_encoder.image_kv(emb)  # per layer (b, H, T, D): once per image
        per_image = k * K
        logits = []
        for s in range(0, b * per_image, p.pair_batch):  # pair q = (image q // kK, class cand[., j // K], template j % K)
            q = torch.arange(s, min(s + p.pair_batch, b * per_image), device=emb.device)
            img, j = q // per_image, q % per_image
            prompt = cand[img, j // K] * K + j % K
            h = p._grounded(self.input_ids[prompt], self.attention_mask[prompt], _select_kv(kv, img))
            logits.append(p.model.itm_head(h[:, 0, :])[:, 1].float())
        return torch.cat(logits).view(b, k, K).mean(-1)  # (b * k * K,) -> (b, k)
