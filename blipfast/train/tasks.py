"""What the trainer trains: the run YAML's `task:` (pretrain | retrieval | caption).

A task builds the model, turns a batch into (loss, {name: loss}), says whether the model has
momentum encoders / queues (kept fp32 outside the engine, see momentum.py), which checkpoint
keys to skip when initialising from another model (`train.init_from`), and what to evaluate at
the end of the run (on rank 0, with a plain fp32 copy of the weights).

* pretrain: BlipForPretraining (ITC + ITM + LM); eval: held-out recall + a few captions.
* retrieval: BlipForRetrieval (ITC with image-id positives + ITM), the original's
  train_retrieval.py; eval: recall@1/5/10 with ITM re-ranking (blipfast.eval.retrieval).
  Image ids (`idx`): the loader's dataset sample index mapped to its image row
  (`loader.index.sample_image`), so all captions of one image (the synthetic set has two per
  image, COCO five) are positives of each other; a loader without an index (tests) passes
  batch["index"] itself as the image id.
* caption: BlipForCaptioning (LM loss on "a picture of " + caption, prompt not in the loss);
  eval: beam-search captions scored by BLEU-4 / CIDEr against the held-out references.
  The loader's caption tokens get the prompt's tokens inserted after [CLS] (token-level, so any
  loader works; the result equals tokenising prompt + caption when the caption is not truncated).
"""
from __future__ import annotations

import time
from typing import Dict, Tuple

import torch

from blipfast.config import ConfigError

TASKS = ("pretrain", "retrieval", "caption")

# Pre-training checkpoint keys a task model does not have (official names, prefixes).
_PRETRAIN_MOMENTUM = ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m")
_QUEUES = ("image_queue", "text_queue", "queue_ptr")


class Task:
    name = ""
    loss_names: Tuple[str, ...] = ()
    has_momentum = True
    init_ignore: Tuple[str, ...] = ()  # checkpoint keys skipped by train.init_from
    init_allow_missing: Tuple[str, ...] = ()  # model keys train.init_from may leave as built

    def build_model(self, model_config, tokenizer):
        raise NotImplementedError

    def forward(self, engine, batch: Dict, alpha: float, negatives, trainer) -> Tuple[torch.Tensor, Dict]:
        raise NotImplementedError

    def evaluate(self, model, ev, tokenizer, cfg, device) -> Dict:
        raise NotImplementedError


class PretrainTask(Task):
    name = "pretrain"
    loss_names = ("loss_itc", "loss_itm", "loss_lm")

    def build_model(self, model_config, tokenizer):
        from blipfast.models.blip import BlipForPretraining

        return BlipForPretraining(model_config)

    def forward(self, engine, batch, alpha, negatives, trainer):
        out = engine(batch["images"], batch["input_ids"], batch["attention_mask"], alpha=alpha, negatives=negatives)
        return out.loss, {n: getattr(out, n) for n in self.loss_names}

    def evaluate(self, model, ev, tokenizer, cfg, device):
        from . import evaluate as ev_mod

        recall = ev_mod.retrieval(model, ev, device, cfg.batch_size, cfg.k_test)
        n_img = ev.images.shape[0]
        result = {"recall": recall, "num_images": n_img, "num_texts": int(ev.input_ids.shape[0]),
                  "chance_r1_percent": 100.0 / n_img}
        if cfg.num_captions and tokenizer is not None:
            n = min(cfg.num_captions, n_img)
            caps = ev_mod.captions(model, ev.images[:n], tokenizer, device, cfg.max_caption_len)
            result["captions"] = [{"generated": c, "reference": first_caption(ev, j)} for j, c in enumerate(caps)]
        return result


class RetrievalTask(Task):
    name = "retrieval"
    loss_names = ("loss_itc", "loss_itm")
    # Fresh queues (random features, empty image ids): the pre-training queues hold no image ids.
    init_ignore = ("text_decoder",) + _QUEUES
    init_allow_missing = ("image_queue", "text_queue", "idx_queue", "ptr_queue")

    def build_model(self, model_config, tokenizer):
        from blipfast.models.retrieval import BlipForRetrieval

        return BlipForRetrieval(model_config)

    def forward(self, engine, batch, alpha, negatives, trainer):
        idx = batch["index"]
        rows = getattr(getattr(trainer.loader, "index", None), "sample_image", None)
        if rows is not None:  # dataset sample index -> image id (several captions share an image)
            idx = torch.as_tensor(rows[idx.numpy()], dtype=torch.int64)
        out = engine(batch["images"], batch["input_ids"], batch["attention_mask"], alpha=alpha,
                     idx=idx.to(batch["images"].device), negatives=negatives)
        return out.loss, {n: getattr(out, n) for n in self.loss_names}

    def evaluate(self, model, ev, tokenizer, cfg, device):
        from blipfast.eval.retrieval import evaluate, extract_features

        model.eval()
        feats = extract_features(model, ev.images, (ev.input_ids, ev.attention_mask), cfg.batch_size, device)
        # Rank 0 alone evaluates here: no collectives (rank/world_size given).
        recall = evaluate(model, feats, [int(t) for t in ev.txt2img], ev.img2txt, k_test=cfg.k_test,
                          rank=0, world_size=1, device=device)
        n_img = ev.images.shape[0]
        return {"recall": recall, "num_images": n_img, "num_texts": int(ev.input_ids.shape[0]),
                "chance_r1_percent": 100.0 / n_img}


class CaptionTask(Task):
    name = "caption"
    loss_names = ("loss_lm",)
    has_momentum = False
    init_ignore = ("text_encoder", "vision_proj", "text_proj", "itm_head", "temp") + _PRETRAIN_MOMENTUM + _QUEUES

    def build_model(self, model_config, tokenizer):
        from blipfast.models.caption import BlipForCaptioning

        if tokenizer is None:
            raise ConfigError("task: caption needs a tokenizer (for the prompt and generation)")
        return BlipForCaptioning(model_config, tokenizer=tokenizer)

    @staticmethod
    def with_prompt(model, ids: torch.Tensor, mask: torch.Tensor):
        """[CLS] c... [SEP] pad -> [CLS] prompt c... [SEP] pad: (B, L) -> (B, L + P - 1)."""
        prompt = model.prompt_ids(1, ids.device)[:, 1:]  # (1, P - 1): the prompt without [DEC]
        B = ids.shape[0]
        ids = torch.cat([ids[:, :1], prompt.expand(B, -1).to(ids.dtype), ids[:, 1:]], dim=1)
        mask = torch.cat([mask[:, :1], torch.ones(B, prompt.shape[1], dtype=mask.dtype, device=mask.device),
                          mask[:, 1:]], dim=1)
        return ids, mask

    def forward(self, engine, batch, alpha, negatives, trainer):
        ids, mask = self.with_prompt(trainer.model, batch["input_ids"], batch["attention_mask"])
        loss = engine(batch["images"], ids, mask)
        return loss, {"loss_lm": loss}

    def evaluate(self, model, ev, tokenizer, cfg, device):
        from blipfast.eval.caption_metrics import caption_scores

        model.eval()
        t0 = time.perf_counter()
        generated = []
        for s in range(0, ev.images.shape[0], cfg.batch_size):
            generated += model.generate(ev.images[s:s + cfg.batch_size].to(device), num_beams=cfg.num_beams,
                                        max_length=cfg.max_caption_len, min_length=cfg.min_caption_len)
        refs = {i: [ev.captions[t] for t in ev.img2txt[i]] for i in range(len(generated))}
        # An empty caption (possible from an untrained model) would leave BLEU nothing to count.
        cands = {i: [c.strip() or "."] for i, c in enumerate(generated)}
        scores = caption_scores(refs, cands)
        n = min(max(cfg.num_captions, 0), len(generated))
        return {"scores": scores, "num_images": len(generated), "generation_seconds": time.perf_counter() - t0,
                "captions": [{"generated": generated[j], "reference": refs[j][0] if refs[j] else ""}
                             for j in range(n)]}


_BY_NAME = {t.name: t for t in (PretrainTask, RetrievalTask, CaptionTask)}


def get_task(name: str, where: str = "") -> Task:
    if name not in _BY_NAME:
        raise ConfigError(f"{where}: unknown task {name!r}; valid: {', '.join(TASKS)}")
    return _BY_NAME[name]()


def first_caption(ev, image_index: int) -> str:
    caps = getattr(ev, "captions", None)
    if caps is None:
        return ""
    texts = ev.img2txt[image_index]
    return caps[texts[0]] if len(texts) else ""
