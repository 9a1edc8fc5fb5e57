"""Image-text retrieval evaluation as the original (`train_retrieval.py::evaluation`), batched and
sharded.

1. `extract_features`: ViT tokens of every image (kept on the CPU, as the original), normalised
   ITC features of images and texts ([CLS] first), the texts' ids and masks. Save them with
   `torch.save` (or `save_features`) and search a large gallery without re-encoding.
2. `rerank_scores`: ITC cosine similarities for all pairs; for each image its k_test most similar
   texts, for each text its k_test most similar images, are re-scored by ITM. The score is the
   raw ITM "match" logit plus the ITC cosine (not divided by temp); every other entry is -100.
   The (query, candidate) pairs of many queries are batched into one encoder call, and the
   cross-attention keys/values of each image are projected once per batch and indexed per pair.
3. Sharding: rank r of W scores a contiguous slice of the image rows and of the text rows; each
   rank's result is (rows, candidate ids, scores) of fixed size, merged by one short all_gather
   after all local work (or written to files and merged with `merge_partial_scores`), so no
   collective waits on another rank's long computation.
4. `evaluate`: recall@1/5/10 via `blipfast.eval.retrieval_metrics.retrieval_recall`.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from blipfast.atomic import atomic_torch_save
from .retrieval_metrics import retrieval_recall

NEG = -100.0  # the original's filler for pairs that are not re-ranked

__all__ = [
    "extract_features",
    "save_features",
    "load_features",
    "rerank_scores",
    "merge_partial_scores",
    "evaluate",
]


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
    else:
        for b in images:
            yield b[0] if isinstance(b, (tuple, list)) else b


@torch.no_grad()
def extract_features(model, images: Union[torch.Tensor, Iterable], texts: Tuple[torch.Tensor, torch.Tensor],
                     batch_size: int = 64, device=None, embeds_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Encode a gallery once.

    model: a BlipForRetrieval or BlipForPretraining (visual_encoder, image_features, text_features;
    re-ranking also uses text_encoder, itm_head, with_first_token);
    images: (N_i, 3, S, S) tensor, or an iterable of image batches (or (images, ...) tuples) in
    gallery order; texts: (input_ids, attention_mask), each (N_t, L), BERT-tokenised ([CLS]
    first; the original pads to 35). The model runs in eval mode, in batches of batch_size.
    Returns CPU tensors: image_embeds (N_i, T, Cv) (in embeds_dtype if given, e.g. float16 to
    halve memory), image_feat (N_i, E), text_feat (N_t, E), text_ids, text_mask (N_t, L).
    """
    input_ids, attention_mask = texts
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"texts must be (input_ids, attention_mask) of equal (N, L) shape; got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    device = device or next(model.parameters()).device
    embeds, img_feat, txt_feat = [], [], []
    with _eval_mode(model):
        for imgs in _batches(images, batch_size):
            e = model.visual_encoder(imgs.to(device))  # (b, T, Cv)
            img_feat.append(model.image_features(e).float().cpu())
            embeds.append(e.to(embeds_dtype or e.dtype).cpu())
        for i in range(0, input_ids.shape[0], batch_size):
            ids, m = input_ids[i:i + batch_size].to(device), attention_mask[i:i + batch_size].to(device)
            txt_feat.append(model.text_features(ids, m).float().cpu())
    if not embeds:
        raise ValueError("no images to encode")
    return {
        "image_embeds": torch.cat(embeds), "image_feat": torch.cat(img_feat), "text_feat": torch.cat(txt_feat),
        "text_ids": input_ids.cpu(), "text_mask": attention_mask.cpu(),
    }


def save_features(feats: Dict[str, torch.Tensor], path: str) -> None:
    atomic_torch_save(feats, path)  # a crash never leaves a half-written file under the real name


def load_features(path: str) -> Dict[str, torch.Tensor]:
    feats = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"image_embeds", "image_feat", "text_feat", "text_ids", "text_mask"} - set(feats)
    if missing:
        raise ValueError(f"{path}: not a retrieval feature file (missing {sorted(missing)})")
    return feats


def _shard(n: int, rank: int, world: int) -> Tuple[int, int]:
    per = math.ceil(n / world)
    return min(rank * per, n), min((rank + 1) * per, n)


def _itm_match_logits(model, feats, img_idx: torch.Tensor, txt_idx: torch.Tensor, device, dtype) -> torch.Tensor:
    """ITM match logit of the pairs (img_idx[p], txt_idx[p]); each distinct image is projected once."""
    uniq, inverse = torch.unique(img_idx, return_inverse=True)
    emb = feats["image_embeds"][uniq].to(device=device, dtype=dtype)  # (u, T, Cv)
    kv = model.text_encoder.image_kv(emb)  # per distinct image; pairs index it (no re-projection)
    ids = model.with_first_token(feats["text_ids"][txt_idx].to(device), model.config.text.enc_token_id)
    mask = feats["text_mask"][txt_idx].to(device)
    h = model.text_encoder.first_states(ids, mask, kv, inverse.to(device), model.config.exact_work)  # (P, C): [ENC]
    return model.itm_head(h)[:, 1].float()


def _rerank_rows(model, feats, sims: torch.Tensor, rows: range, k: int, image_rows: bool, pair_batch: int,
                 device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each row (an image if image_rows, else a text) its top-k candidates by ITC and their
    scores ITM match logit + cosine. Returns (cand (n, k) int64, score (n, k) float32)."""
    n = len(rows)
    if n == 0:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    top_sim, cand = sims[rows.start:rows.stop].topk(k, dim=1)  # (n, k)
    query = torch.arange(rows.start, rows.stop, device=sims.device).repeat_interleave(k)  # (n * k,)
    flat_cand = cand.reshape(-1)
    img_idx, txt_idx = (query, flat_cand) if image_rows else (flat_cand, query)
    logits = torch.empty(n * k, device=device)
    for s in range(0, n * k, pair_batch):  # many queries per encoder call
        sl = slice(s, s + pair_batch)
        logits[sl] = _itm_match_logits(model, feats, img_idx[sl].cpu(), txt_idx[sl].cpu(), device, dtype)
    scores = logits.view(n, k) + top_sim.to(device).float()
    return cand.cpu(), scores.cpu()


@torch.no_grad()
def rerank_scores(model, feats: Dict[str, torch.Tensor], k_test: int = 256, pair_batch: int = 256,
                  rank: Optional[int] = None, world_size: Optional[int] = None, gather: bool = True, device=None):
    """Score matrices (scores_i2t (N_i, N_t), scores_t2i (N_t, N_i)), -100 outside the re-ranked
    top-k_test of each row.

    rank / world_size default to torch.distributed's (0 / 1 without it). With gather=True the
    ranks' slices are all-gathered (one collective, after all local work) and every rank gets the
    full matrices; with gather=False this rank's partial result is returned for
    `merge_partial_scores` (for example after writing it to a file). k_test is capped at the
    gallery size.
    """
    if rank is None or world_size is None:
        on = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    img_feat, txt_feat = feats["image_feat"].to(device), feats["text_feat"].to(device)
    n_img, n_txt = img_feat.shape[0], txt_feat.shape[0]
    sims = img_feat @ txt_feat.T  # (N_i, N_t) cosine similarities
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    with _eval_mode(model):
        i0, i1 = _shard(n_img, rank, world_size)
        t0, t1 = _shard(n_txt, rank, world_size)
        cand_i2t, sc_i2t = _rerank_rows(model, feats, sims, range(i0, i1), k_i2t, True, pair_batch, device, dtype)
        cand_t2i, sc_t2i = _rerank_rows(model, feats, sims.T, range(t0, t1), k_t2i, False, pair_batch, device, dtype)
    part = {"n_img": n_img, "n_txt": n_txt, "i2t_rows": (i0, i1), "t2i_rows": (t0, t1),
            "i2t_cand": cand_i2t, "i2t_score": sc_i2t, "t2i_cand": cand_t2i, "t2i_score": sc_t2i}
    if not gather:
        return part
    if world_size > 1:
        parts = _all_gather_parts(part, world_size, device)
    else:
        parts = [part]
    return merge_partial_scores(parts)


def _all_gather_parts(part: dict, world_size: int, device) -> List[dict]:
    """Every rank's partial result. Slices have the same size except the last, so pad to the
    first rank's row count; the row ranges are recomputed from (n, rank, world)."""
    out = [dict(part) for _ in range(world_size)]
    for key in ("i2t", "t2i"):
        n = part["n_img"] if key == "i2t" else part["n_txt"]
        per = math.ceil(n / world_size)
        for what in ("cand", "score"):
            local = part[f"{key}_{what}"]
            padded = local.new_zeros((per,) + tuple(local.shape[1:]))
            padded[:local.shape[0]] = local
            bufs = [torch.empty_like(padded, device=device) for _ in range(world_size)]
            dist.all_gather(bufs, padded.to(device))
            for r in range(world_size):
                lo, hi = _shard(n, r, world_size)
                out[r][f"{key}_rows"] = (lo, hi)
                out[r][f"{key}_{what}"] = bufs[r][:hi - lo].cpu()
    return out


def merge_partial_scores(parts: Sequence[dict]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Assemble the full score matrices from every rank's `rerank_scores(..., gather=False)`."""
    n_img, n_txt = parts[0]["n_img"], parts[0]["n_txt"]
    i2t = torch.full((n_img, n_txt), NEG)
    t2i = torch.full((n_txt, n_img), NEG)
    seen_i, seen_t = torch.zeros(n_img, dtype=torch.bool), torch.zeros(n_txt, dtype=torch.bool)
    for p in parts:
        (i0, i1), (t0, t1) = p["i2t_rows"], p["t2i_rows"]
        i2t[i0:i1].scatter_(1, p["i2t_cand"], p["i2t_score"])
        t2i[t0:t1].scatter_(1, p["t2i_cand"], p["t2i_score"])
        seen_i[i0:i1] = True
        seen_t[t0:t1] = True
    if not (seen_i.all() and seen_t.all()):
        raise ValueError("the partial results do not cover every row: pass the parts of all ranks")
    return i2t, t2i


def evaluate(model, feats: Dict[str, torch.Tensor], txt2img: Sequence[int], img2txt: Sequence[Sequence[int]],
             k_test: int = 256, **kw) -> Dict[str, float]:
    """Recall@1/5/10 (text and image retrieval) and their means, in percent."""
    i2t, t2i = rerank_scores(model, feats, k_test=k_test, **kw)
    return retrieval_recall(i2t, t2i, txt2img, img2txt)


# ---------------------------------------------------------------------------------------------
# command line: python -m blipfast.eval.retrieval --config configs/tasks/retrieval_eval.yaml


@dataclass
class RetrievalEvalConfig:
    """The `eval:` section of a retrieval evaluation YAML (configs/tasks/retrieval_eval.yaml)."""

    checkpoint: str = ""  # BlipForRetrieval weights (official layout .pth or torch.save state dict)
    init_from_pretrain: bool = False  # the checkpoint holds other weights too (pre-training): extra keys ignored
    k_test: int = 256  # ITM re-ranking depth (the original: 256 COCO, 128 Flickr)
    max_text_len: int = 35  # text padding length (the original's 35)
    batch_size: int = 64  # images / texts per forward when extracting features
    pair_batch: int = 256  # (query, candidate) pairs per ITM forward
    features: str = ""  # a path: features are loaded from it when it exists, else extracted and saved there
    output: str = ""  # write the recall JSON here (rank 0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


def main(argv=None) -> int:
    """Evaluate a retrieval checkpoint on the held-out split of a data config: recall@1/5/10.

    Under torchrun / deepspeed (WORLD_SIZE > 1) every rank re-ranks a slice of the queries and
    the slices are merged by one all_gather after the local work. Each rank extracts (or loads)
    the features itself, so no rank waits in a collective while another computes.
    """
    import json as _json
    import sys

    from blipfast.config import ConfigError

    from . import cli

    args = cli.parser("python -m blipfast.eval.retrieval", main.__doc__.split("\n\n")[0]).parse_args(argv)
    try:
        run = cli.load_eval_run(args.config, args.overrides, RetrievalEvalConfig)
        from blipfast.rundir import load_model
        from blipfast.data import build_eval_set, tokenizer_from_config
        from blipfast.models.retrieval import BlipForRetrieval

        cfg, ev = run.model, run.eval
        model = load_model(BlipForRetrieval(cfg), ev.checkpoint, ev.init_from_pretrain)
        tok = tokenizer_from_config(run.data)
        es = build_eval_set(run.data, tok, cfg.vision.image_size, ev.max_text_len, batch_size=ev.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # DataError is a ConfigError; bad weights: ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = cli.resolve_device(ev.device)
    rank, world, own = cli.init_distributed(device)
    try:
        model = model.to(device).eval()
        if ev.features and os.path.isfile(ev.features):
            feats = load_features(ev.features)
        else:
            feats = extract_features(model, es.images, (es.input_ids, es.attention_mask), ev.batch_size, device)
            if ev.features and rank == 0:
                save_features(feats, ev.features)
        out = evaluate(model, feats, es.txt2img.tolist(), es.img2txt, k_test=ev.k_test, pair_batch=ev.pair_batch)
        if rank == 0:
            print(_json.dumps(out, indent=1))
            cli.write_json(out, ev.output)
    finally:
        cli.finish(own)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
