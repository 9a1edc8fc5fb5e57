"""End-of-run evaluation of a pre-training model: held-out retrieval recall and a few captions.

Retrieval follows the original's `evaluation` (train_retrieval.py): cosine similarity of the ITC
features ranks every text for every image and vice versa; with k_test > 0 each query's top-k are
re-scored by ITM logit + ITC similarity (everything else is pushed below). Recall@K as
`blipfast.eval.retrieval_metrics.retrieval_recall`. Captions: greedy decoding from [DEC].
"""
from __future__ import annotations

from typing import Dict, List

import torch

from blipfast.eval.retrieval_metrics import retrieval_recall


@torch.no_grad()
def _features(model, ev, device, batch_size: int, keep_embeds: bool):
    img_feats, embeds = [], []
    for s in range(0, ev.images.shape[0], batch_size):
        e = model.visual_encoder(ev.images[s:s + batch_size].to(device))  # (b, 1 + N, Cv)
        img_feats.append(model.image_features(e))
        if keep_embeds:
            embeds.append(e)
    txt_feats = []
    for s in range(0, ev.input_ids.shape[0], batch_size):
        txt_feats.append(model.text_features(ev.input_ids[s:s + batch_size].to(device),
                                             ev.attention_mask[s:s + batch_size].to(device)))
    return torch.cat(img_feats), torch.cat(txt_feats), (torch.cat(embeds) if keep_embeds else None)


@torch.no_grad()
def _itm_scores(model, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, batch_size: int):
    """ITM 'match' logits of image embeds[i] with text (ids[i], mask[i]); (n,)."""
    enc_ids = model.with_first_token(ids, model.config.text.enc_token_id)
    out = []
    for s in range(0, ids.shape[0], batch_size):
        h = model.text_encoder(enc_ids[s:s + batch_size], mask[s:s + batch_size],
                               image_embeds=embeds[s:s + batch_size])[:, 0, :]
        out.append(model.itm_head(h)[:, 1].float())
    return torch.cat(out)


@torch.no_grad()
def retrieval(model, ev, device, batch_size: int = 64, k_test: int = 0) -> Dict[str, float]:
    """Recall@1/5/10 (percent) for image->text (txt_r*) and text->image (img_r*) on `ev`."""
    model.eval()
    img_feat, txt_feat, embeds = _features(model, ev, device, batch_size, keep_embeds=k_test > 0)
    sims = (img_feat @ txt_feat.t()).float().cpu()  # (n_img, n_txt)
    s_i2t, s_t2i = sims, sims.t().contiguous()
    if k_test > 0:
        ids, mask = ev.input_ids.to(device), ev.attention_mask.to(device)
        s_i2t = _rerank(model, sims, embeds, ids, mask, k_test, batch_size, image_rows=True)
        s_t2i = _rerank(model, sims.t().contiguous(), embeds, ids, mask, k_test, batch_size, image_rows=False)
    return retrieval_recall(s_i2t, s_t2i, ev.txt2img, ev.img2txt)


def _rerank(model, sims, embeds, ids, mask, k, batch_size, image_rows: bool):
    out = torch.full_like(sims, -100.0)  # the original's floor for entries outside the top-k
    k = min(k, sims.shape[1])
    top_sim, top_idx = sims.topk(k, dim=1)  # (n_query, k)
    for q in range(sims.shape[0]):
        cand = top_idx[q].to(ids.device)
        if image_rows:
            e, t_ids, t_mask = embeds[q].expand(k, -1, -1), ids[cand], mask[cand]
        else:
            e, t_ids, t_mask = embeds[cand], ids[q].expand(k, -1), mask[q].expand(k, -1)
        out[q, top_idx[q]] = _itm_scores(model, e, t_ids, t_mask, batch_size).cpu() + top_sim[q]
    return out


@torch.no_grad()
def captions(model, images: torch.Tensor, tokenizer, device, max_length: int = 20, min_length: int = 1) -> List[str]:
    """Greedy captions for `images` (n, 3, S, S), decoded from [DEC] until [SEP]."""
    from blipfast.generation import generate

    model.eval()
    if images.shape[0] == 0:
        return []
    embeds = model.visual_encoder(images.to(device))
    tc = model.config.text
    prompt = torch.full((images.shape[0], 1), tc.dec_token_id, dtype=torch.long, device=device)
    ids = generate(model.text_decoder, embeds, prompt, num_beams=1, max_length=max_length,
                   min_length=min_length, eos_token_id=tc.sep_token_id, pad_token_id=tc.pad_token_id)
    return [tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).strip() for row in ids.cpu()]
