"""Run the ORIGINAL BLIP code on jobs prepared by blipfast's tests; save what it computed.

    cd REPO && <ref venv>/bin/python -m tests.parity.run_original JOBS.pt RESULTS.pt

JOBS.pt: {name: job}. A job builds an original model (`kind`: pretrain = BLIP_Pretrain,
retrieval = BLIP_Retrieval, caption = BLIP_Decoder, vqa = BLIP_VQA) for a blipfast config dict,
gets its weights one of three ways, then runs one training step per batch:

* weights='state_dict': `load_state_dict(job['state_dict'], strict=True)` (blipfast's export);
* weights='own': the original's own modules, re-drawn at a sharp scale with `job['seed']`; its
  `state_dict()` is returned for blipfast to load;
* weights='checkpoint': the original's own loader `blip.models.blip.load_checkpoint(model, path)`
  (interpolates position embeddings when the image size differs).

A step: forward (the ITC models update their momentum encoders first and the queues after the
ITC loss), backward of the summed losses, AdamW (not after the last batch). Hard negatives are
drawn by the original's own `torch.multinomial` calls, recorded (weights and indices) so that
blipfast can replay them. A batch's `texts` are the (ids, mask) pairs the model's tokenizer
calls return, in call order. RESULTS.pt: {name: result dict, or {'error': traceback}}.
"""
import contextlib
import io
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from transformers import BatchEncoding

from tests.helpers import random_queues_, sharpen_
from tests.parity.original_env import build, init_process_group

HOOKED = ("visual_encoder", "vision_proj", "text_proj", "itm_head")  # each runs once per forward


class MultinomialRecorder:
    """Wraps torch.multinomial during a forward: draws as usual, records weights and indices."""

    def __init__(self):
        self.weights, self.indices = [], []

    def __enter__(self):
        self._orig = torch.multinomial
        torch.multinomial = self
        return self

    def __exit__(self, *exc):
        torch.multinomial = self._orig

    def __call__(self, input, num_samples, replacement=False, *, generator=None):
        idx = self._orig(input, num_samples, replacement, generator=generator)
        self.weights.append(input.detach().clone())
        self.indices.append(idx.detach().clone())
        return idx


def _record_outputs(model):
    seen, handles = {}, []
    for name in HOOKED:
        if hasattr(model, name):
            def hook(module, args, out, name=name):  # returns None: the output is left alone
                seen.setdefault(name, out.detach().clone())
            handles.append(getattr(model, name).register_forward_hook(hook))
    return seen, handles


def _forward(kind, model, batch, alpha):
    """The original forward of `kind`; returns {loss name: loss}."""
    images = batch["images"]
    blanks = [""] * images.shape[0]  # FixedTokenizer ignores the strings and hands out the ids
    if kind == "pretrain":
        itc, itm, lm = model(images, blanks, alpha)
        return {"loss_itc": itc, "loss_itm": itm, "loss_lm": lm}
    if kind == "retrieval":
        itc, itm = model(images, blanks, alpha, batch["idx"])
        return {"loss_itc": itc, "loss_itm": itm}
    if kind == "caption":
        return {"loss_lm": model(images, blanks)}
    if kind == "vqa":
        answers = [""] * int(sum(batch["n"]))
        return {"loss_vqa": model(images, blanks, answers, n=list(batch["n"]), weights=batch["weights"], train=True)}
    raise ValueError(f"unknown model kind {kind!r}")


def _is_momentum(key):  # momentum parameters (position_ids buffers are constants: left out)
    return key.split(".")[0].endswith("_m") and not key.endswith("position_ids")


def run_steps(kind, model, job):
    torch.manual_seed(job.get("sampling_seed", 0))
    model.train()
    hp = job["adamw"]
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    steps = []
    for i, batch in enumerate(job["batches"]):
        model.tokenizer.batches = list(batch["texts"])
        seen, handles = _record_outputs(model)
        with MultinomialRecorder() as rec:
            losses = _forward(kind, model, batch, job.get("alpha", 0.0))
        for h in handles:
            h.remove()
        if model.tokenizer.batches:
            raise RuntimeError(f"the original tokenised fewer texts than prepared ({len(model.tokenizer.batches)} left)")
        step = {k: v.detach() for k, v in losses.items()}
        if "visual_encoder" in seen:
            step["image_embeds"] = seen["visual_encoder"]
        if "vision_proj" in seen:  # as the original: normalize(proj(CLS))
            step["image_feat"] = F.normalize(seen["vision_proj"], dim=-1)
            step["text_feat"] = F.normalize(seen["text_proj"], dim=-1)
        if "itm_head" in seen:
            step["itm_logits"] = seen["itm_head"]
        if rec.indices:  # the original draws B negative images (one per text), then B negative texts
            B = batch["images"].shape[0]
            step["neg_image_for_text"], step["neg_text_for_image"] = torch.cat(rec.indices[:B]), torch.cat(rec.indices[B:])
            step["weights_t2i"], step["weights_i2t"] = torch.stack(rec.weights[:B]), torch.stack(rec.weights[B:])
        sum(losses.values()).backward()
        if i == 0:
            step["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if i + 1 < len(job["batches"]):
            opt.step()
            opt.zero_grad(set_to_none=True)
            step["params_after_opt"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        step["momentum"] = {k: v.detach().clone() for k, v in model.state_dict().items() if _is_momentum(k)}
        step["buffers"] = {k: v.detach().clone() for k, v in model.named_buffers() if "queue" in k}
        steps.append(step)
    return steps


def rank_answers(model, job):
    """BLIP_VQA's inference='rank' on job['rank']: the chosen answer index per question."""
    r = job["rank"]
    model.eval()
    model.tokenizer.batches = [r["question"]]
    answers = BatchEncoding({"input_ids": r["answer_ids"], "attention_mask": r["answer_mask"]})
    with torch.no_grad():
        return model(r["images"], [""] * r["images"].shape[0], answers, train=False, inference="rank", k_test=r["k"])


def run_job(job, workdir):
    kind = job.get("kind", "pretrain")
    model = build(kind, job["config"], workdir, prompt_ids=job.get("prompt_ids"), **job.get("init", {}))
    out = {"original_layout": {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}}
    if job["weights"] == "state_dict":
        model.load_state_dict(job["state_dict"], strict=True)  # raises on any key / shape mismatch
        out["strict_load"] = "ok"
    elif job["weights"] == "own":
        sharpen_(model, job["seed"], temp=job.get("temp", 0.09), momentum="draw")
        random_queues_(model.image_queue, model.text_queue, job["seed"] + 1)
        model.queue_ptr.fill_(job.get("queue_ptr", 0))
        out["state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    elif job["weights"] == "checkpoint":
        from blip.models.blip import load_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):
            _, msg = load_checkpoint(model, job["path"])
        out["missing_keys"], out["unexpected_keys"] = list(msg.missing_keys), list(msg.unexpected_keys)
        out["pos_embed"] = model.visual_encoder.pos_embed.detach().clone()
        out["pos_embed_m"] = model.visual_encoder_m.pos_embed.detach().clone()
    else:
        raise ValueError(f"unknown weights source {job['weights']!r}")
    out["steps"] = run_steps(kind, model, job)
    if "rank" in job:
        out["ranked"] = rank_answers(model, job)
    return out


def main(jobs_path, results_path):
    torch.set_num_threads(int(os.environ.get("BLIPFAST_REF_THREADS", "2")))
    jobs = torch.load(jobs_path, map_location="cpu", weights_only=True)
    workdir = os.path.dirname(os.path.abspath(results_path))
    init_process_group(workdir)
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = run_job(job, workdir)
        except Exception:  # reported per job, so one failure does not hide the others
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
