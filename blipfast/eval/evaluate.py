"""End-of-run evaluation of a pre-training model: held-out retrieval recall and a few captions.

Retrieval follows the original's `evaluation` (train_retrieval.py): cosine similarity of the ITC
features ranks every text for every image and vice versa; with k_test > 0 each query's top-k are
re-scored by ITM logit + ITC similarity (everything else is pushed below), batched, by
`blipfast.eval.retrieval`. Recall@K as
`blipfast.eval.retrieval_metrics.retrieval_recall`. Captions: greedy decoding from [DEC].
"""
from __future__ import annotations

from typing import Dict, List

import torch

from blipfast.eval.retrieval_metrics import retrieval_recall


@torch.no_grad()
def retrieval(model, ev, device, batch_size: int = 64, k_test: int = 0) -> Dict[str, float]:
    """Recall@1/5/10 (percent) for image->text (txt_r*) and text->image (img_r*) on `ev`.

    The features and the batched ITM re-ranking are `blipfast.eval.retrieval`'s; this process
    scores the whole (small, held-out) gallery itself (rank 0 of 1)."""
    from blipfast.eval.retrieval import extract_features, rerank_scores

    model.eval()
    feats = extract_features(model, ev.images, (ev.input_ids, ev.attention_mask), batch_size=batch_size,
                             device=device)
    if k_test > 0:
        s_i2t, s_t2i = rerank_scores(model, feats, k_test=k_test, pair_batch=batch_size, rank=0, world_size=1,
                                     device=device)
    else:
        s_i2t = feats["image_feat"] @ feats["text_feat"].t()  # (n_img, n_txt) cosine similarities
        s_t2i = s_i2t.t().contiguous()
    return retrieval_recall(s_i2t, s_t2i, ev.txt2img, ev.img2txt)


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
