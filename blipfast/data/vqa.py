"""VQA data as the original BLIP reads it (`data/vqa_dataset.py`), for task vqa.

Annotation files are JSON lists of questions:

    {"question_id": 1, "question": "what is ...?", "answer": ["a", "a", "b", ...],
     "image": "train2014/COCO_....jpg", "dataset": "vqa"}

* "dataset" "vqa" (the default): the image path is under `vqa.image_root`; each distinct answer
  gets weight count / number of answers (VQA v2: 10 annotators).
* "dataset" "vg" (Visual Genome QA): the image is under `vqa.vg_image_root`; "answer" is one
  string, weight 0.2.
* Questions are cleaned by `pre_question`; answers are used as written (the files hold
  normalised answers). A question without any answer is skipped in training (counted).
* Held-out files (the original's vqa_test.json) need "question_id", "question", "image"; when
  every entry also has "answer", accuracy is computed, else only predictions are written.

Images are vetted exactly as for pre-training (index.py: missing / corrupt ones skipped, counted,
cached), and an image shared by several questions is decoded once per batch it appears in.
Training batches come from `VqaLoader`, the pre-training loader (same sharding, seeded order,
resumable augmentation, DALI or PIL) with the text part replaced:

    input_ids / attention_mask (B, Lq)  questions, padded to the batch's longest ([CLS] ... [SEP];
                                        the model writes [ENC] over [CLS])
    answer_ids / answer_mask  (A, La)   every question's answers, question-major
    n_answers (B,) int64, weights (A,) float32, index (B,) int64
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .captions import pre_question
from .config import DataConfig, DataError
from .index import OUTSIDE_HINT, SampleIndex, _Cache, _check_files, inside_root, read_json
from .loader import PretrainLoader, decode_eval_images

VG_WEIGHT = 0.2  # the original's weight of a Visual Genome answer


@dataclass
class VqaIndex(SampleIndex):
    """SampleIndex whose samples are questions (`captions` holds the cleaned questions)."""

    answers: List[List[str]] = field(default_factory=list)  # per question: distinct answers (train) or all (eval)
    weights: List[List[float]] = field(default_factory=list)  # per question: weight of each answer (train)
    question_ids: List = field(default_factory=list)  # per question: its id in the file
    answer_types: List[str] = field(default_factory=list)  # per question: "answer_type" ("" when absent)


def load_questions(path: str, need_answers: bool) -> List[dict]:
    """A VQA annotation file, checked entry by entry (DataError names the file and the entry)."""
    ann = read_json(path, "VQA annotation file")
    if not isinstance(ann, list) or not ann:
        raise DataError(f"VQA annotation file {path}: expected a non-empty JSON list of questions")
    for i, e in enumerate(ann):
        ok = isinstance(e, dict) and isinstance(e.get("question"), str) and isinstance(e.get("image"), str)
        ok = ok and e.get("dataset", "vqa") in ("vqa", "vg")
        a = e.get("answer") if isinstance(e, dict) else None
        if ok and (need_answers or a is not None):
            ok = isinstance(a, str) or (isinstance(a, list) and all(isinstance(x, str) for x in a))
        if not ok:
            raise DataError(f"VQA annotation file {path}, entry {i}: expected {{'question': str, 'image': str, "
                            f"'answer': str or list of str, 'dataset': 'vqa' or 'vg'}}, got {e!r:.200}")
    return ann


def answer_weights(entry: dict) -> Tuple[List[str], List[float]]:
    """The original's (answers, weights) of a training question."""
    if entry.get("dataset", "vqa") == "vg":
        a = entry["answer"]
        return ([a] if isinstance(a, str) else list(a)[:1]), [VG_WEIGHT]
    answers = [entry["answer"]] if isinstance(entry["answer"], str) else entry["answer"]
    weight: "OrderedDict[str, float]" = OrderedDict()
    for a in answers:
        weight[a] = weight.get(a, 0.0) + 1.0 / len(answers)
    return list(weight), list(weight.values())


def _roots(cfg: DataConfig, held_out: bool) -> Dict[str, str]:
    v = cfg.vqa
    root = (v.eval_image_root or v.image_root) if held_out else v.image_root
    if cfg.format == "synthetic" and not root:
        from .index import _synthetic

        root = _synthetic(cfg).image_root
    return {"vqa": root, "vg": v.vg_image_root or root}


def _build(cfg: DataConfig, files: Sequence[str], held_out: bool) -> VqaIndex:
    roots = _roots(cfg, held_out)
    rows: Dict[str, int] = {}
    img: Dict[str, list] = {k: [] for k in ("names", "widths", "heights")}
    out: Dict[str, list] = {k: [] for k in ("sample_image", "captions", "answers", "weights", "question_ids",
                                            "answer_types")}
    stats = dict(missing=0, skipped_corrupt=0, skipped_samples=0, no_answer=0)
    examples: List[str] = []
    for path in files:
        ann = load_questions(path, need_answers=not held_out)
        for ds in {e.get("dataset", "vqa") for e in ann}:
            if not roots[ds] or not os.path.isdir(roots[ds]):
                key = "image_root" if ds == "vqa" else "vg_image_root"
                raise DataError(f"{path}: images of dataset {ds!r} need data.vqa.{key}; {roots[ds]!r} is not a directory")
        paths = [os.path.join(roots[e.get("dataset", "vqa")], e["image"]) for e in ann]
        outside = set() if cfg.allow_outside_root else {
            p for e, p in zip(ann, paths) if not inside_root(p, roots[e.get("dataset", "vqa")])}
        cache = _Cache(cfg.cache_dir, "json", path,
                       f"vqa|{roots['vqa']}|{roots['vg']}|{cfg.check_images}|{cfg.max_image_bytes}")
        checks = _check_files([p for p in paths if p not in outside], cfg.check_images, cfg.num_threads, cache,
                              cfg.max_image_bytes)
        for p in outside:
            checks[p] = [-1, -1, False, 0, 0, OUTSIDE_HINT, -1]
        for n, (e, p) in enumerate(zip(ann, paths)):
            _, _, ok, w, h, reason, _ = checks[p]
            if not ok:
                stats["missing" if reason == "missing" else "skipped_corrupt"] += 1
                stats["skipped_samples"] += 1
                if len(examples) < 3:
                    examples.append(f"{p} ({reason})")
                continue
            if held_out:
                a = e.get("answer")
                answers, weights = ([a] if isinstance(a, str) else list(a or [])), []
            else:
                answers, weights = answer_weights(e)
                if not answers:
                    stats["no_answer"] += 1
                    continue
            if p not in rows:
                rows[p] = len(img["names"])
                img["names"].append(p)
                img["widths"].append(w)
                img["heights"].append(h)
            out["sample_image"].append(rows[p])
            out["captions"].append(pre_question(e["question"], cfg.vqa.max_question_words))
            out["answers"].append(answers)
            out["weights"].append(weights)
            out["question_ids"].append(e.get("question_id", f"{os.path.basename(path)}:{n}"))
            out["answer_types"].append(str(e.get("answer_type", "")))
    what = ", ".join(files)
    if examples:
        import logging

        logging.getLogger("blipfast.data").warning("%s: %d questions skipped for their images, e.g. %s", what,
                                                   stats["skipped_samples"], "; ".join(examples))
    if not out["captions"]:
        raise DataError(f"{what}: no usable questions (missing images {stats['missing']}, corrupt images "
                        f"{stats['skipped_corrupt']}, questions without answers {stats['no_answer']})")
    n_img = len(img["names"])
    stats.update(num_images=n_img, num_samples=len(out["captions"]))
    return VqaIndex(
        names=img["names"], files=list(img["names"]), offsets=np.zeros(n_img, np.int64),
        sizes=np.full(n_img, -1, np.int64), widths=np.asarray(img["widths"], np.int32),
        heights=np.asarray(img["heights"], np.int32), sample_image=np.asarray(out["sample_image"], np.int64),
        captions=out["captions"], stats=stats, answers=out["answers"], weights=out["weights"],
        question_ids=out["question_ids"], answer_types=out["answer_types"])


def _synthetic_paths(cfg: DataConfig):
    from .index import _synthetic

    return _synthetic(cfg) if cfg.format == "synthetic" else None


def build_vqa_train_index(cfg: DataConfig) -> VqaIndex:
    files = list(cfg.vqa.train_files)
    if not files:
        syn = _synthetic_paths(cfg)
        if syn is None:
            raise DataError("task vqa needs data.vqa.train_files (VQA annotation JSONs)")
        files = [syn.vqa_train_json]
    return _build(cfg, files, held_out=False)


def build_vqa_eval_index(cfg: DataConfig) -> VqaIndex:
    f = cfg.vqa.eval_file
    if not f:
        syn = _synthetic_paths(cfg)
        if syn is None:
            raise DataError("evaluating task vqa needs data.vqa.eval_file (held-out questions JSON)")
        f = syn.vqa_val_json
    return _build(cfg, [f], held_out=True)


def load_answer_list(cfg: DataConfig) -> List[str]:
    path = cfg.vqa.answer_list
    if not path:
        syn = _synthetic_paths(cfg)
        if syn is None:
            raise DataError("VQA answer ranking needs data.vqa.answer_list (a JSON list of answers)")
        path = syn.answer_list
    answers = read_json(path, "VQA answer list")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise DataError(f"{path}: expected a non-empty JSON list of answer strings")
    return answers


def tokenize_longest(tokenizer, texts: Sequence[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) int64, padded to the longest text (as the original), truncated at max_length."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


class VqaLoader(PretrainLoader):
    """Training batches of questions (see the module docstring for the batch layout)."""

    index: VqaIndex

    def __init__(self, cfg: DataConfig, index: VqaIndex, tokenizer, image_size: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device_id: Optional[int] = None):
        super().__init__(cfg, index, tokenizer, image_size, batch_size, cfg.vqa.max_question_len, rank,
                         world_size, seed, device_id)

    def _text(self, idx: np.ndarray) -> Dict[str, torch.Tensor]:
        ix = self.index
        q_ids, q_mask = tokenize_longest(self.tokenizer, [ix.captions[i] for i in idx], self.max_length)
        answers = [a for i in idx for a in ix.answers[i]]
        a_ids, a_mask = tokenize_longest(self.tokenizer, answers, self.cfg.vqa.max_answer_len)
        return {
            "input_ids": q_ids, "attention_mask": q_mask, "answer_ids": a_ids, "answer_mask": a_mask,
            "n_answers": torch.as_tensor([len(ix.answers[i]) for i in idx], dtype=torch.int64),
            "weights": torch.as_tensor([w for i in idx for w in ix.weights[i]], dtype=torch.float32),
            "index": torch.as_tensor(idx, dtype=torch.int64),
        }


def build_vqa_loader(cfg: DataConfig, tokenizer, image_size: int, batch_size: int, rank: int = 0,
                     world_size: int = 1, seed: int = 0, device_id: Optional[int] = None) -> VqaLoader:
    return VqaLoader(cfg, build_vqa_train_index(cfg), tokenizer, image_size, batch_size, rank, world_size, seed,
                     device_id)


@dataclass
class VqaEvalSet:
    """Held-out questions with their images decoded by the eval transform."""

    images: torch.Tensor  # (N_img, 3, S, S) float32, CPU
    image_of: torch.Tensor  # (Q,) int64: the image row of each question
    input_ids: torch.Tensor  # (Q, Lq) int64 questions
    attention_mask: torch.Tensor  # (Q, Lq)
    question_ids: List
    questions: List[str]
    answers: Optional[List[List[str]]]  # per question, every annotator's answer; None when the file has none
    answer_list: List[str]  # ranking candidates
    answer_ids: torch.Tensor  # (N, La) the candidates tokenised ([CLS] a [SEP] pad; [DEC] goes over [CLS])
    answer_mask: torch.Tensor  # (N, La)
    image_names: List[str]
    stats: Dict[str, int]
    answer_types: Optional[List[str]] = None  # per question (VQA v2: yes/no, number, other); None when absent

    def subset(self, n_questions: int) -> "VqaEvalSet":
        """The first n questions (images kept as they are: questions index them)."""
        n = min(n_questions, len(self.questions))
        return VqaEvalSet(self.images, self.image_of[:n], self.input_ids[:n], self.attention_mask[:n],
                          self.question_ids[:n], self.questions[:n], None if self.answers is None else self.answers[:n],
                          self.answer_list, self.answer_ids, self.answer_mask, self.image_names, self.stats,
                          None if self.answer_types is None else self.answer_types[:n])


def build_vqa_eval_set(cfg: DataConfig, tokenizer, image_size: int, batch_size: int = 64,
                       device_id: Optional[int] = None) -> VqaEvalSet:
    index = build_vqa_eval_index(cfg)
    answer_list = load_answer_list(cfg)
    stats = dict(index.stats, read_errors=0)
    images = decode_eval_images(cfg, index, image_size, batch_size, stats, device_id)
    q_ids, q_mask = tokenize_longest(tokenizer, index.captions, cfg.vqa.max_question_len)
    a_ids, a_mask = tokenize_longest(tokenizer, answer_list, cfg.vqa.max_answer_len)
    has_answers = all(len(a) > 0 for a in index.answers)
    return VqaEvalSet(images, torch.as_tensor(index.sample_image, dtype=torch.int64), q_ids, q_mask,
                      list(index.question_ids), list(index.captions), index.answers if has_answers else None,
                      answer_list, a_ids, a_mask, list(index.names), stats,
                      index.answer_types if all(index.answer_types) else None)
