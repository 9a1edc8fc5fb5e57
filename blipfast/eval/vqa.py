"""VQA evaluation as the original (`train_vqa.py::evaluation`), batched and sharded.

    python -m blipfast.eval.vqa --config configs/tasks/vqa_eval.yaml eval.checkpoint=CKPT
    torchrun --nproc_per_node N -m blipfast.eval.vqa --config ...      (questions sharded over ranks)

* inference `rank` (the original's VQA v2 setting): for each question, the k_test answers of the
  answer list whose first token is most probable after [DEC], then the best of those by the
  label-smoothed summed log-likelihood (`BlipForVQA.rank_answers`).
* inference `generate`: beam search over the answer decoder (3 beams, at most 10 tokens).
* Output: the evaluation server's result file, a JSON list of {"question_id", "answer"} in the
  order of the questions file; when the held-out file carries answers, VQA accuracy
  (`blipfast.eval.vqa_metrics`, the official normalisation) is printed and written too.
* Sharding: rank r answers a contiguous slice of the questions; the answers are merged by one
  all_gather_object after all local work.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from blipfast.config import ConfigError

INFERENCE = ("rank", "generate")


@dataclass
class VqaEvalConfig:
    """The `eval:` section of a VQA evaluation YAML (configs/tasks/vqa_eval.yaml)."""

    checkpoint: str = ""  # BlipForVQA weights (official layout .pth, a blipfast export, or a training output's .pth)
    inference: str = "rank"  # rank (answer list) | generate (free answers)
    k_test: int = 128  # rank: candidates kept after the first-token step (the original: 128); 0 = the whole list
    num_beams: int = 3  # generate: beam width (the original: 3)
    max_answer_len: int = 10  # generate: tokens at most, [DEC] included (the original: 10)
    min_answer_len: int = 1  # generate: tokens at least (the original: 1)
    batch_size: int = 32  # questions per forward (the original: 32 per GPU)
    max_questions: int = 0  # evaluate the first N questions only (0 = all)
    output: str = ""  # result file: [{"question_id", "answer"}] (rank 0)
    metrics_output: str = ""  # accuracy JSON, when the questions have answers
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def validate(self, where: str) -> None:
        if self.inference not in INFERENCE:
            raise ConfigError(f"{where}: eval.inference must be one of {', '.join(INFERENCE)}, got {self.inference!r}")
        for name in ("num_beams", "max_answer_len", "min_answer_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: eval.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("k_test", "max_questions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: eval.{name} must be >= 0, got {getattr(self, name)}")


@torch.no_grad()
def predict(model, ev, rows: range, device, inference: str = "rank", k_test: int = 128, num_beams: int = 3,
            max_answer_len: int = 10, min_answer_len: int = 1, batch_size: int = 32, progress: bool = False,
            tokenizer=None) -> List[str]:
    """Answers to the questions `rows` of `ev` (a blipfast.data.vqa.VqaEvalSet), in order."""
    model.eval()
    n_list = len(ev.answer_list)
    k = n_list if k_test == 0 else min(k_test, n_list)
    answer_ids, answer_mask = ev.answer_ids.to(device), ev.answer_mask.to(device)
    out: List[str] = []
    starts = range(rows.start, rows.stop, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"vqa {inference}", unit="batch", file=sys.stderr, dynamic_ncols=True)
    for s in starts:
        sel = slice(s, min(s + batch_size, rows.stop))
        images = ev.images[ev.image_of[sel]].to(device)  # (b, 3, S, S): a question's image
        q_ids, q_mask = ev.input_ids[sel].to(device), ev.attention_mask[sel].to(device)
        if inference == "rank":
            best = model.rank_answers(images, q_ids, q_mask, answer_ids, answer_mask, k=k)
            out += [ev.answer_list[i] for i in best.tolist()]
        else:
            out += [a.strip() for a in model.generate(images, q_ids, q_mask, num_beams=num_beams,
                                                      max_length=max_answer_len, min_length=min_answer_len,
                                                      tokenizer=tokenizer)]
    return out


def accuracy(ev, answers: List[str]) -> Optional[Dict[str, float]]:
    """VQA accuracy (percent) of `answers` (one per question of ev, in order): "overall", and per
    answer type ("yes/no", "number", "other") when the questions carry one; None without references."""
    from .vqa_metrics import vqa_score

    if ev.answers is None:
        return None
    keys = list(range(len(answers)))  # positions: question ids need not be unique across files
    preds, refs = dict(zip(keys, answers)), dict(zip(keys, ev.answers[:len(answers)]))
    out = vqa_score(preds, refs)
    types = getattr(ev, "answer_types", None)
    if types:
        for t in sorted(set(types[:len(answers)])):
            sel = [k for k in keys if types[k] == t]
            out[f"type:{t}"] = vqa_score({k: preds[k] for k in sel}, {k: refs[k] for k in sel})["overall"]
    return out


def main(argv=None) -> int:
    """Answer the held-out questions of a data config with a VQA checkpoint; write the result file
    and, when the questions have answers, the VQA accuracy."""
    from . import cli

    p = cli.parser("python -m blipfast.eval.vqa", main.__doc__.split("\n")[0])
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    try:
        run = cli.load_eval_run(args.config, args.overrides, VqaEvalConfig)
        from blipfast.data import tokenizer_from_config
        from blipfast.data.vqa import build_vqa_eval_set

        tok = tokenizer_from_config(run.data)
        ev = build_vqa_eval_set(run.data, tok, run.model.vision.image_size, run.eval.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from blipfast.rundir import load_model
    from blipfast.models.vqa import BlipForVQA

    cfg = run.eval
    try:
        model = load_model(BlipForVQA(run.model, tokenizer=tok), cfg.checkpoint)
    except (FileNotFoundError, ValueError) as e:  # a missing file, or keys / shapes that do not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = cli.resolve_device(cfg.device)
    rank, world, own = cli.init_distributed(device)
    model = model.to(device).eval()
    if cfg.max_questions:
        ev = ev.subset(cfg.max_questions)
    t0 = time.perf_counter()
    rows = cli.shard_batches(len(ev.questions), cfg.batch_size, rank, world)
    mine = predict(model, ev, rows, device, cfg.inference, cfg.k_test, cfg.num_beams, cfg.max_answer_len,
                   cfg.min_answer_len, cfg.batch_size, progress=rank == 0 and not args.no_progress, tokenizer=tok)
    answers = cli.gather_in_order(mine, world)
    if rank == 0:
        results = [{"question_id": q, "answer": a} for q, a in zip(ev.question_ids, answers)]
        cli.write_json(results, cfg.output)
        summary = {"inference": cfg.inference, "num_questions": len(answers),
                   "seconds": time.perf_counter() - t0, "accuracy": accuracy(ev, answers)}
        cli.write_json(summary, cfg.metrics_output)
        print(json.dumps(summary, indent=1), flush=True)
    cli.finish(own)
    return 0


if __name__ == "__main__":
    sys.exit(main())
