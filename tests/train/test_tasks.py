"""The trainer's task hook (blipfast/train/tasks.py): retrieval and captioning fine-tuning in
process on one rank (ZeRO-0, CPU), init_from a pre-training checkpoint, the end-of-run
evaluations, the cosine schedule and the config errors."""
import math
import os
from types import SimpleNamespace

import pytest
import torch

from blipfast.config import ConfigError
from blipfast.train import schedule
from blipfast.train.config import RunConfig, TrainConfig, load_run_config
from tests.dist.train_common import make_batch, tiny_model_config, train_config
from tests.helpers import REPO

N_BATCHES = 4


class SameBatchLoader:
    """The same 4-sample batch every step (a loss that falls shows the step learns); image ids 0..3."""

    def __len__(self):
        return N_BATCHES

    def epoch(self, epoch, start_step=0):
        for _ in range(start_step, N_BATCHES):
            yield make_batch(0, 0, 0)


def eval_set(tokenizer):
    b = make_batch(0, 0, 0)
    caps = ["red circle", "blue square left", "green triangle", "red square"]
    enc = tokenizer(caps, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    return SimpleNamespace(images=b["images"], input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                           txt2img=torch.arange(4), img2txt=[[i] for i in range(4)], captions=caps)


@pytest.fixture(scope="module")
def tokenizer():
    from blipfast.data import build_demo_tokenizer

    return build_demo_tokenizer()


def run_config(tmp_path, task, **train_kw):
    from blipfast.data import DataConfig

    kw = dict(lr=1e-3, warmup_steps=0, alpha=0.4, alpha_ramp_epochs=1.0)
    kw.update(train_kw)
    train = train_config(str(tmp_path / task), **kw)
    return RunConfig(model=tiny_model_config(), data=DataConfig(), train=train,
                     deepspeed={"zero_optimization": {"stage": 0}}, source="<test>", deepspeed_path="<test>",
                     task=task)


def trainer_for(run, tokenizer):
    from blipfast.train.trainer import Trainer

    return Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer, eval_set=eval_set(tokenizer))


def losses(tr):
    import json

    with open(os.path.join(tr.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def record_weights(monkeypatch, owner, name: str) -> list:
    """Wrap `owner.name(model, ...)` so each call first records a copy of the model's state dict;
    returns the (growing) list of records."""
    records = []
    real = getattr(owner, name)

    def spy(model, *args, **kwargs):
        records.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return records


def test_retrieval_trains_and_evaluates(tmp_path, tokenizer, monkeypatch):
    import blipfast.eval.retrieval as eval_retrieval

    run = run_config(tmp_path, "retrieval")
    run.train.eval.enabled = True
    run.train.eval.k_test = 2
    tr = trainer_for(run, tokenizer)
    before = tr.model.itm_head.weight.detach().clone()
    # the weights of each model the end-of-run evaluation extracts features with
    evaluated = record_weights(monkeypatch, eval_retrieval, "extract_features")
    result = tr.fit()
    monkeypatch.undo()
    assert result["steps"] == N_BATCHES
    assert not torch.equal(before, tr.model.itm_head.weight.detach())
    recs = [r for r in losses(tr) if "loss_itm" in r]
    assert len(recs) == N_BATCHES and all(math.isfinite(r["loss"]) and math.isfinite(r["loss_itc"]) for r in recs)
    assert tr.momentum.module.ptr_queue.item() == (4 * N_BATCHES) % 16  # idx queue filled by the task's forward
    assert set(tr.momentum.module.idx_queue[0, :4].tolist()) == {0, 1, 2, 3}
    ev = result["eval"]
    assert ev["task"] == "retrieval" and ev["num_images"] == 4
    # The evaluated model holds the trained weights (not, say, the initial ones): with 4 images the
    # recall alone cannot tell (R@5 and R@10 are 100 by construction, R@1 a multiple of 25).
    trained = tr.full_state_dict()
    assert len(evaluated) == 1 and evaluated[0].keys() == trained.keys()
    assert all(torch.equal(evaluated[0][k], trained[k]) for k in trained), [
        k for k in trained if not torch.equal(evaluated[0][k], trained[k])][:5]
    # and the reported recall is those weights' recall, recomputed here
    from blipfast.eval import evaluate as ev_mod

    model = tr.task.build_model(run.model, tokenizer)
    model.load_state_dict(tr.full_state_dict())
    ev_set = tr.eval_set if tr.eval_set is not None else tr.task.build_eval_set(tr.run, tokenizer)
    want = ev_mod.retrieval(model.eval(), ev_set, torch.device("cpu"), run.train.eval.batch_size, run.train.eval.k_test)
    assert ev["recall"] == want, (ev["recall"], want)


def test_retrieval_positives_are_the_loaders_image_ids(tmp_path, tokenizer):
    tr = trainer_for(run_config(tmp_path, "retrieval"), tokenizer)
    b = make_batch(0, 0, 0)
    b["image_id"] = torch.tensor([5, 5, 6, 6])  # two captions per image, as a real loader emits them
    tr.task.forward(tr.engine, b, 0.4, None)
    assert tr.momentum.module.idx_queue[0, :4].tolist() == [5, 5, 6, 6]


def test_caption_loss_falls_and_evaluates(tmp_path, tokenizer, monkeypatch):
    from blipfast.models.caption import BlipForCaptioning

    run = run_config(tmp_path, "caption", lr=3e-3)
    run.train.eval.enabled = True
    run.train.eval.num_beams, run.train.eval.max_caption_len, run.train.eval.min_caption_len = 2, 8, 5
    run.train.eval.num_captions = 4
    tr = trainer_for(run, tokenizer)
    assert tr.momentum.state_dict() == {}
    evaluated = record_weights(monkeypatch, BlipForCaptioning, "generate")  # the weights it generates with
    result = tr.fit()
    monkeypatch.undo()
    trained = tr.full_state_dict()  # the captions come from the trained weights, not the initial ones
    assert evaluated and all(e.keys() == trained.keys() for e in evaluated)
    assert all(torch.equal(e[k], trained[k]) for e in evaluated for k in trained)
    model = tr.task.build_model(run.model, tokenizer)
    model.load_state_dict(trained)
    want = model.eval().generate(eval_set(tokenizer).images, num_beams=2, max_length=8, min_length=5)
    assert [c["generated"] for c in result["eval"]["captions"]] == want
    recs = [r["loss_lm"] for r in losses(tr)]
    assert len(recs) == N_BATCHES and all(math.isfinite(v) for v in recs)
    assert recs[-1] < recs[0]
    ev = result["eval"]
    assert ev["task"] == "caption" and ev["num_images"] == 4 and len(ev["captions"]) == 4
    from blipfast.eval.caption_metrics import caption_scores

    refs = {i: [c] for i, c in enumerate(eval_set(tokenizer).captions)}
    cands = {i: [c["generated"].strip() or "."] for i, c in enumerate(ev["captions"])}
    assert ev["scores"] == pytest.approx(caption_scores(refs, cands))
    assert 0.0 <= ev["scores"]["BLEU-4"] <= 1.0 and ev["scores"]["CIDEr"] >= 0.0


def test_caption_prompt_is_a_collate_step_matching_tokenising_prompt_plus_caption(tokenizer):
    from blipfast.models.caption import BlipForCaptioning
    from blipfast.train.tasks import CaptionTask

    collate = CaptionTask().batch_transform(tokenizer)
    model = BlipForCaptioning(tiny_model_config(), tokenizer=tokenizer)
    assert torch.equal(collate.ids, model.prompt_ids(1)[0, 1:])  # the tokens generation starts from, less [DEC]
    enc = tokenizer(["red circle", "blue square"], padding="max_length", max_length=8, return_tensors="pt")
    images = torch.zeros(2, 3, 4, 4)
    out = collate({"images": images, "input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    want = tokenizer(["a picture of red circle", "a picture of blue square"], padding="max_length",
                     max_length=8 + model.prompt_length - 1, return_tensors="pt")
    assert torch.equal(out["input_ids"], want.input_ids) and torch.equal(out["attention_mask"], want.attention_mask)
    assert out["images"] is images


def test_trainer_applies_the_caption_prompt_to_any_loader(tmp_path, tokenizer):
    tr = trainer_for(run_config(tmp_path, "caption"), tokenizer)
    raw = make_batch(0, 0, 0)
    got = next(iter(tr.loader.epoch(0)))
    P = tr.model.prompt_length
    assert len(tr.loader) == N_BATCHES
    assert got["input_ids"].shape == (raw["input_ids"].shape[0], raw["input_ids"].shape[1] + P - 1)
    assert torch.equal(got["input_ids"][:, 1:P], tr.model.prompt_ids(4)[:, 1:])
    assert torch.equal(got["input_ids"][:, P:], raw["input_ids"][:, 1:])
    # other tasks see the loader's batches untouched
    tr2 = trainer_for(run_config(tmp_path, "retrieval"), tokenizer)
    assert torch.equal(next(iter(tr2.loader.epoch(0)))["input_ids"], raw["input_ids"])


@pytest.mark.parametrize("task, shared", [("caption", "text_decoder.cls.predictions.bias"),
                                          ("retrieval", "itm_head.weight")])
def test_init_from_pretraining_export(tmp_path, tokenizer, task, shared):
    from blipfast.models.blip import BlipForPretraining

    torch.manual_seed(7)
    pre = BlipForPretraining(tiny_model_config())
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.01)  # differ from whatever the task model draws at construction
    path = tmp_path / "pretrain.pth"
    torch.save({"model": pre.state_dict()}, path)
    tr = trainer_for(run_config(tmp_path, task, init_from=str(path)), tokenizer)
    sd = tr.model.state_dict()
    assert torch.equal(sd["visual_encoder.cls_token"], pre.visual_encoder.cls_token)
    assert torch.equal(sd[shared], pre.state_dict()[shared])
    if task == "retrieval":  # the momentum copies come from the checkpoint too; the queues are fresh
        assert torch.equal(tr.momentum.module.text_proj_m.weight, pre.text_proj_m.weight)
        assert (tr.momentum.module.idx_queue == -100).all()


class VqaBatchLoader:
    """The same 4 questions every step; question i has i % 2 + 1 answers (weights sum to 1)."""

    def __init__(self, tokenizer):
        b = make_batch(0, 0, 0)
        q = tokenizer(["what color is it?", "is there a circle?", "how many shapes are there?", "where is it?"],
                      padding="longest", return_tensors="pt")
        answers = ["red", "yes", "no", "2", "left", "right"]
        a = tokenizer(answers, padding="longest", return_tensors="pt")
        self.batch = {"images": b["images"], "input_ids": q.input_ids, "attention_mask": q.attention_mask,
                      "answer_ids": a.input_ids, "answer_mask": a.attention_mask,
                      "n_answers": torch.tensor([1, 2, 1, 2]), "weights": torch.tensor([1.0, 0.7, 0.3, 1.0, 0.5, 0.5]),
                      "index": torch.arange(4)}

    def __len__(self):
        return N_BATCHES

    def epoch(self, epoch, start_step=0):
        for _ in range(start_step, N_BATCHES):
            yield dict(self.batch)


def vqa_eval_set(tokenizer, loader):
    from blipfast.data.vqa import VqaEvalSet

    b = loader.batch
    answer_list = ["red", "yes", "no", "2", "left", "blue"]
    a = tokenizer(answer_list, padding="longest", return_tensors="pt")
    return VqaEvalSet(b["images"], torch.arange(4), b["input_ids"], b["attention_mask"], [10, 11, 12, 13],
                      ["q0", "q1", "q2", "q3"], [["red"] * 10, ["yes"] * 10, ["2"] * 10, ["left"] * 10],
                      answer_list, a.input_ids, a.attention_mask, ["i0", "i1", "i2", "i3"], {})


def test_vqa_loss_falls_and_evaluates(tmp_path, tokenizer):
    from blipfast.eval.vqa import accuracy, predict
    from blipfast.train.trainer import Trainer

    run = run_config(tmp_path, "vqa", lr=3e-3)
    run.train.eval.enabled = True
    run.train.eval.k_test = 3
    run.train.eval.num_captions = 2
    loader = VqaBatchLoader(tokenizer)
    ev = vqa_eval_set(tokenizer, loader)
    tr = Trainer(run, loader=loader, tokenizer=tokenizer, eval_set=ev)
    assert tr.momentum.state_dict() == {}
    # The task's loss is the model's weighted answer loss on the batch.
    b = loader.batch
    want = tr.model(b["images"], b["input_ids"], b["attention_mask"], b["answer_ids"], b["answer_mask"],
                    b["n_answers"], b["weights"])
    got, parts = tr.task.forward(tr.engine, dict(b), 0.0, None)
    assert torch.equal(got.detach(), want.detach()) and parts["loss_vqa"] is got
    result = tr.fit()
    recs = [r["loss_vqa"] for r in losses(tr)]
    assert len(recs) == N_BATCHES and all(math.isfinite(v) for v in recs) and recs[-1] < recs[0]
    out = result["eval"]
    assert out["task"] == "vqa" and out["num_questions"] == 4 and out["inference"] == "rank"
    model = tr.task.build_model(run.model, tokenizer)
    model.load_state_dict(tr.full_state_dict())
    answers = predict(model, ev, range(4), torch.device("cpu"), "rank", k_test=3)
    assert out["accuracy"] == accuracy(ev, answers)
    assert [e["answer"] for e in out["examples"]] == answers[:2]
    import json

    with open(os.path.join(run.train.output_dir, "vqa_result.json")) as f:  # the server's result file
        assert json.load(f) == [{"question_id": q, "answer": a} for q, a in zip(ev.question_ids, answers)]
    assert out["written"] == ["vqa_result.json"] and "files" not in out


def test_vqa_init_from_pretraining_export(tmp_path, tokenizer):
    """As the original: the VQA encoder and decoder start from the pre-training text encoder and
    decoder (the decoder's cross-attention then reads the question instead of the image)."""
    from blipfast.models.blip import BlipForPretraining
    from blipfast.train.trainer import Trainer

    torch.manual_seed(7)
    pre = BlipForPretraining(tiny_model_config())
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.01)
    path = tmp_path / "pretrain.pth"
    torch.save({"model": pre.state_dict()}, path)
    run = run_config(tmp_path, "vqa", init_from=str(path))
    tr = Trainer(run, loader=VqaBatchLoader(tokenizer), tokenizer=tokenizer)
    sd, want = tr.model.state_dict(), pre.state_dict()
    for k in ("visual_encoder.cls_token", "text_encoder.encoder.layer.0.crossattention.self.query.weight",
              "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight",
              "text_decoder.bert.encoder.layer.0.attention.self.query.weight", "text_decoder.cls.predictions.bias"):
        assert torch.equal(sd[k], want[k]), k


def test_retrieval_negative_all_rank_option(tmp_path, tokenizer):
    for flag in (True, False):
        tr = trainer_for(run_config(tmp_path, "retrieval", negative_all_rank=flag), tokenizer)
        assert tr.model.negative_all_rank is flag
    assert load_run_config(os.path.join(REPO, "configs", "tasks", "retrieval_flickr.yaml"),
                           {"data.ann_files": ["/x.json"]}).train.negative_all_rank is False


def test_init_from_missing(tmp_path, tokenizer, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        trainer_for(run_config(tmp_path, "caption", init_from=str(tmp_path / "nope.pth")), tokenizer)
    trainer_for(run_config(tmp_path, "caption", init_from=str(tmp_path / "nope.pth"), init_optional=True), tokenizer)
    assert "FROM SCRATCH" in capsys.readouterr().out


def test_cosine_schedule_values():
    cfg = TrainConfig(lr=1e-5, min_lr=0.0, epochs=6, warmup_steps=0, schedule="cosine")
    got = [schedule.learning_rate(cfg, e, 3) for e in range(6)]
    # The original's cosine_lr_schedule: (init - min) * 0.5 * (1 + cos(pi * epoch / max_epoch)) + min.
    assert got == pytest.approx([1e-5, 1e-5 * (1 + 3 ** 0.5 / 2) / 2, 7.5e-6, 5e-6, 2.5e-6, 1e-5 * (1 - 3 ** 0.5 / 2) / 2])
    cfg.min_lr = 1e-6
    assert schedule.learning_rate(cfg, 3, 0) == pytest.approx(5.5e-6)
    with pytest.raises(ConfigError, match="train.schedule"):
        TrainConfig(schedule="linear").validate("<t>")


def test_task_configs_load_and_unknown_task_fails(tmp_path):
    for name in ("retrieval_demo", "caption_demo", "vqa_demo", "retrieval_coco", "retrieval_flickr", "caption_coco",
                 "vqa_vqav2"):
        real = "demo" not in name
        over = {"data.vqa.train_files" if "vqa" in name else "data.ann_files": ["/x.json"]}
        run = load_run_config(os.path.join(REPO, "configs", "tasks", f"{name}.yaml"), over if real else None)
        assert run.task == name.split("_")[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: segmentation\nmodel: %s\ndata: {format: synthetic}\n"
                   % os.path.join(REPO, "configs", "blip_tiny.yaml"))
    with pytest.raises(ConfigError, match="unknown task 'segmentation'"):
        load_run_config(str(bad))


def test_init_from_pretraining_output_dir_then_resume_caption(tmp_path, tokenizer):
    from blipfast.train.export import consolidated_state_dict
    from blipfast.train.trainer import Trainer

    pre = run_config(tmp_path, "pretrain", max_steps=1)
    Trainer(pre, loader=SameBatchLoader(), tokenizer=tokenizer).fit()  # commits one checkpoint
    want = consolidated_state_dict(pre.train.output_dir)

    cap = run_config(tmp_path, "caption", init_from=pre.train.output_dir, max_steps=2)
    tr = trainer_for(cap, tokenizer)
    sd = tr.model.state_dict()
    for k in ("visual_encoder.patch_embed.proj.weight", "text_decoder.bert.embeddings.word_embeddings.weight"):
        assert torch.equal(sd[k], want[k]), k
    tr.fit()
    again = trainer_for(cap, tokenizer)
    assert again.resume() is not None and again.global_step == 2  # no momentum state to restore
    for k, v in tr.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k


@pytest.mark.parametrize("task", ["vqa", "caption", "retrieval"])
def test_task_run_exports_and_feeds_the_eval_clis(tmp_path, tokenizer, task, capsys):
    """A fine-tuning run's output directory exports as its task model (not the pre-training one),
    loads into the evaluation CLIs' models directly, and names the model for `model=PATH`."""
    from blipfast.capfilt import load_model
    from blipfast.eval.cli import load_eval_run
    from blipfast.eval.vqa import VqaEvalConfig
    from blipfast.train.export import export
    from blipfast.train.trainer import Trainer

    run = run_config(tmp_path, task, max_steps=1)
    loader = VqaBatchLoader(tokenizer) if task == "vqa" else SameBatchLoader()
    tr = Trainer(run, loader=loader, tokenizer=tokenizer)
    tr.fit()
    want = tr.full_state_dict()
    out = export(run.train.output_dir, str(tmp_path / "model.pth"))
    sd = torch.load(out, weights_only=True)["model"]
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
    fresh = tr.task.build_model(run.model, tokenizer)
    capsys.readouterr()
    load_model(fresh, run.train.output_dir)  # the directory itself
    assert capsys.readouterr().out == ""  # the eval CLIs print their JSON results on stdout
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model: ../nowhere.yaml\ndata: {format: synthetic}\neval: {checkpoint: x}\n")
    ev = load_eval_run(str(cfg), [f"model={run.train.output_dir}"], VqaEvalConfig)
    assert ev.model == run.model
