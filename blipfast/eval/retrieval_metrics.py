"""Recall@K for image-text retrieval from a score matrix (the original's TR/IR definitions)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def retrieval_recall(
    scores_i2t: torch.Tensor,
    scores_t2i: torch.Tensor,
    txt2img: Sequence[int] | torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> Dict[str, float]:
    """scores_i2t: (n_img, n_txt); scores_t2i: (n_txt, n_img); txt2img[t] is the image of text t;
    img2txt[i] lists image i's texts. Text retrieval (TR) ranks an image's best ground-truth
    text; image retrieval (IR) ranks a text's image. Returns percentages: txt_r{k}, img_r{k},
    txt_r_mean, img_r_mean, r_mean."""
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i must be ({n_txt}, {n_img}), got {tuple(scores_t2i.shape)}")
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    order_i2t = scores_i2t.argsort(dim=1, descending=True)  # (n_img, n_txt) text ids by score
    rank_of_txt = torch.empty_like(order_i2t)
    rank_of_txt.scatter_(1, order_i2t, torch.arange(n_txt).expand(n_img, n_txt))  # rank of each text
    tr_rank = torch.stack([rank_of_txt[i, torch.as_tensor(list(t), dtype=torch.long)].min() for i, t in enumerate(img2txt)])
    order_t2i = scores_t2i.argsort(dim=1, descending=True)
    ir_rank = (order_t2i == txt2img[:, None]).float().argmax(dim=1)  # position of the true image
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (tr_rank < k).float().mean().item()
        out[f"img_r{k}"] = 100.0 * (ir_rank < k).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
