"""What the trainer trains: the run YAML's `task:` (pretrain | retrieval | caption | vqa).

A task builds the model and its data (training loader, held-out set), turns a batch into
(loss, {name: loss}), says whether the model has momentum encoders / queues (kept fp32 outside
the engine, see momentum.py), which checkpoint keys to skip when initialising from another
model (`train.init_from`), and what to evaluate at the end of the run (on rank 0, with a plain
fp32 copy of the weights).

* pretrain: BlipForPretraining (ITC + ITM + LM); eval: held-out recall + a few captions.
* retrieval: BlipForRetrieval (ITC with image-id positives + ITM), the original's
  train_retrieval.py; eval: recall@1/5/10 with ITM re-ranking (blipfast.eval.retrieval).
  `train.negative_all_rank`: ITM hard negatives from the whole world batch (true, the
  original's COCO setting) or from each rank's own batch (false, its Flickr30k setting).
  Image ids (`idx`): the loader's batch["image_id"] (each sample's image row), so all captions
  of one image (the synthetic set has two per image, COCO five) are positives of each other; a
  loader that emits no image ids (a test's) makes every sample its own image (batch["index"]).
* caption: BlipForCaptioning (LM loss on "a picture of " + caption, prompt not in the loss);
  eval: beam-search captions scored by BLEU-4 / CIDEr against the held-out references.
  The prompt's tokens are inserted after [CLS] as the loader yields (`batch_transform`:
  blipfast.data.collate.PromptCollate, token level, so any loader works).

A task gets what it needs, never the trainer: the run config, the tokenizer, rank / world and
the device to build data; the engine and the batch to compute losses.
* vqa: BlipForVQA (question encoder + answer decoder, answer-weighted LM loss), the original's
  train_vqa.py, on `data.vqa` (blipfast/data/vqa.py: VQA / VG question files, or the synthetic
  set's questions); eval: VQA accuracy of answer-list ranking (`train.eval.vqa_inference: rank`,
  top `k_test` by first token, 0 = all) or of generated answers (`generate`).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch

from blipfast.config import ConfigError
from blipfast.models.registry import TASKS, build_model  # noqa: F401  (TASKS re-exported)


# Pre-training checkpoint keys a task model does not have (official names, prefixes).
_PRETRAIN_MOMENTUM = ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m")
_QUEUES = ("image_queue", "text_queue", "queue_ptr")


class Task:
    name = ""
    loss_names: Tuple[str, ...] = ()
    has_momentum = True
    init_ignore: Tuple[str, ...] = ()  # checkpoint keys skipped by train.init_from
    init_allow_missing: Tuple[str, ...] = ()  # model keys train.init_from may leave as built

    def __init__(self, run=None):
        self.run = run  # the RunConfig (task options live in run.train); None: the defaults

    def build_model(self, model_config, tokenizer, **model_kwargs):
        raise NotImplementedError

    def build_loader(self, run, tokenizer, rank: int, world: int, device: torch.device):
        """This rank's training loader (default: image-caption pairs, blipfast.data)."""
        from blipfast.data import build_pretrain_loader

        cfg = run.train
        return build_pretrain_loader(run.data, tokenizer, run.model.vision.image_size, cfg.batch_size,
                                     run.model.max_text_len, rank, world, cfg.seed, device_id=_dali_device(device))

    def batch_transform(self, tokenizer) -> Optional[Callable[[Dict], Dict]]:
        """A step applied to every training batch as the loader yields it (any loader); None: none."""
        return None

    def check_eval_data(self, run) -> None:
        """Fail at start-up, not after training, when the held-out data is unusable."""
        from blipfast.data.index import build_eval_index

        build_eval_index(run.data)

    def build_eval_set(self, run, tokenizer):
        from blipfast.data import build_eval_set

        return build_eval_set(run.data, tokenizer, run.model.vision.image_size, run.model.max_text_len)

    def subset_eval(self, ev, n: int):
        """The first n images and their texts (text ids renumbered): train.eval.max_images."""
        from types import SimpleNamespace

        n = min(n, ev.images.shape[0])
        texts = [t for i in range(n) for t in ev.img2txt[i]]
        remap = {t: j for j, t in enumerate(texts)}
        caps = getattr(ev, "captions", None)
        return SimpleNamespace(
            images=ev.images[:n], input_ids=ev.input_ids[texts], attention_mask=ev.attention_mask[texts],
            txt2img=[int(ev.txt2img[t]) for t in texts],
            img2txt=[[remap[t] for t in ev.img2txt[i]] for i in range(n)],
            captions=None if caps is None else [caps[t] for t in texts])

    def forward(self, engine, batch: Dict, alpha: float, negatives) -> Tuple[torch.Tensor, Dict]:
        raise NotImplementedError

    def evaluate(self, model, ev, tokenizer, cfg, device) -> Dict:
        raise NotImplementedError


class PretrainTask(Task):
    name = "pretrain"
    loss_names = ("loss_itc", "loss_itm", "loss_lm")

    def build_model(self, model_config, tokenizer, **model_kwargs):
        return build_model("pretrain", model_config, **model_kwargs)

    def forward(self, engine, batch, alpha, negatives):
        out = engine(batch["images"], batch["input_ids"], batch["attention_mask"], alpha=alpha, negatives=negatives)
        return out.loss, {n: getattr(out, n) for n in self.loss_names}

    def evaluate(self, model, ev, tokenizer, cfg, device):
        from blipfast.eval import evaluate as ev_mod

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

    def build_model(self, model_config, tokenizer, **model_kwargs):
        all_rank = self.run.train.negative_all_rank if self.run is not None else True
        return build_model("retrieval", model_config, negative_all_rank=all_rank, **model_kwargs)

    def forward(self, engine, batch, alpha, negatives):
        idx = batch["image_id"] if "image_id" in batch else batch["index"]  # see the module docstring
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

    def build_model(self, model_config, tokenizer, **model_kwargs):
        return build_model("caption", model_config, tokenizer, where="task", **model_kwargs)

    def batch_transform(self, tokenizer):
        from blipfast.data.collate import PromptCollate
        from blipfast.models.caption import DEFAULT_PROMPT  # the prompt build_model gives the model

        return PromptCollate(tokenizer, DEFAULT_PROMPT)

    def forward(self, engine, batch, alpha, negatives):  # the prompt is in the batch (batch_transform)
        loss = engine(batch["images"], batch["input_ids"], batch["attention_mask"])
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


class VqaTask(Task):
    name = "vqa"
    loss_names = ("loss_vqa",)
    has_momentum = False
    # The original initialises text_encoder and text_decoder from the pre-training ones.
    init_ignore = ("vision_proj", "text_proj", "itm_head", "temp") + _PRETRAIN_MOMENTUM + _QUEUES

    def build_model(self, model_config, tokenizer, **model_kwargs):
        return build_model("vqa", model_config, tokenizer, where="task", **model_kwargs)

    def build_loader(self, run, tokenizer, rank, world, device):
        from blipfast.data.vqa import build_vqa_loader

        return build_vqa_loader(run.data, tokenizer, run.model.vision.image_size, run.train.batch_size, rank,
                                world, run.train.seed, device_id=_dali_device(device))

    def check_eval_data(self, run) -> None:
        from blipfast.data.vqa import build_vqa_eval_index, load_answer_list

        build_vqa_eval_index(run.data)
        if run.train.eval.vqa_inference == "rank":
            load_answer_list(run.data)

    def build_eval_set(self, run, tokenizer):
        from blipfast.data.vqa import build_vqa_eval_set

        return build_vqa_eval_set(run.data, tokenizer, run.model.vision.image_size)

    def subset_eval(self, ev, n: int):
        """train.eval.max_images: the questions about the first n images."""
        keep = int((ev.image_of < n).sum()) if bool((ev.image_of[1:] >= ev.image_of[:-1]).all()) else None
        return ev.subset(keep if keep is not None else n)

    def forward(self, engine, batch, alpha, negatives):
        dev = batch["images"].device
        loss = engine(batch["images"], batch["input_ids"], batch["attention_mask"], batch["answer_ids"].to(dev),
                      batch["answer_mask"].to(dev), batch["n_answers"].to(dev), batch["weights"].to(dev))
        return loss, {"loss_vqa": loss}

    def evaluate(self, model, ev, tokenizer, cfg, device):
        from blipfast.eval.vqa import accuracy, predict

        model.eval()
        t0 = time.perf_counter()
        answers = predict(model, ev, range(len(ev.questions)), device, cfg.vqa_inference, cfg.k_test,
                          cfg.num_beams, cfg.max_answer_len, 1, cfg.batch_size, tokenizer=tokenizer)
        n = min(max(cfg.num_captions, 0), len(answers))
        results = [{"question_id": q, "answer": a} for q, a in zip(ev.question_ids, answers)]
        return {"accuracy": accuracy(ev, answers), "inference": cfg.vqa_inference, "num_questions": len(answers),
                "answer_seconds": time.perf_counter() - t0, "files": {"vqa_result.json": results},
                "examples": [{"question": ev.questions[j], "answer": answers[j],
                              "reference": ev.answers[j][0] if ev.answers else ""} for j in range(n)]}


_BY_NAME = {t.name: t for t in (PretrainTask, RetrievalTask, CaptionTask, VqaTask)}


def get_task(name: str, where: str = "", run=None) -> Task:
    if name not in _BY_NAME:
        raise ConfigError(f"{where}: unknown task {name!r}; valid: {', '.join(TASKS)}")
    return _BY_NAME[name](run)


def _dali_device(device: torch.device):
    """DALI's GPU decoding device (None on the CPU)."""
    return device.index if device.type == "cuda" else None


def first_caption(ev, image_index: int) -> str:
    caps = getattr(ev, "captions", None)
    if caps is None:
        return ""
    texts = ev.img2txt[image_index]
    return caps[texts[0]] if len(texts) else ""
