"""VQA evaluation CLI (`python -m blipfast.eval.vqa`): answers equal to direct
`rank_answers` / `generate` calls in question order, VQA accuracy (overall and per answer type)
equal to the metric on those answers, 2 ranks equal to 1 rank, config errors exit with status 2."""
import json
import os

import pytest
import torch
import yaml

from blipfast.config import BlipConfig, from_dict
from blipfast.data import DataConfig, build_demo_tokenizer, generate_synthetic
from blipfast.data.vqa import build_vqa_eval_set
from blipfast.eval.vqa import VqaEvalConfig, accuracy, main
from blipfast.eval.vqa_metrics import vqa_score
from blipfast.models.vqa import BlipForVQA
from tests.helpers import REPO, run_cli_ranks, sharpen_, tiny_model

MODEL = tiny_model(depth=1)
NUM_VAL = 4  # 12 questions; batch 5: 3 batches, so 2 ranks get questions 0..9 and 10..11
EVAL = {"batch_size": 5, "k_test": 6, "device": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_eval")
    generate_synthetic(str(root / "data"), num_train=2, num_val=NUM_VAL, seed=0, image_size=32)
    cfg = from_dict(BlipConfig, MODEL)
    tok = build_demo_tokenizer()
    torch.manual_seed(0)
    model = BlipForVQA(cfg, tokenizer=tok)
    sharpen_(model, 5)  # peaked distributions: answers differ between questions (seed 5 does)
    ckpt = str(root / "vqa.pt")
    torch.save({"model": model.state_dict()}, ckpt)
    data = {"format": "synthetic", "synthetic": {"out_dir": str(root / "data"), "num_train": 2, "num_val": NUM_VAL,
                                                 "image_size": 32},
            "backend": "torch", "tokenizer": "demo", "cache_dir": str(root / "cache")}
    path = str(root / "eval.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"model": MODEL, "data": data, "eval": {"checkpoint": ckpt, **EVAL}}, f)
    ev = build_vqa_eval_set(from_dict(DataConfig, data), tok, 32)
    return root, path, model.eval(), ev


def _run(path, tmp_path, capsys, *extra):
    out = str(tmp_path / "result.json")
    assert main(["--config", path, "--no-progress", f"eval.output={out}", *extra]) == 0
    return json.load(open(out)), json.loads(capsys.readouterr().out)


def test_rank_answers_and_accuracy(setup, tmp_path, capsys):
    root, path, model, ev = setup
    results, summary = _run(path, tmp_path, capsys)
    assert len(ev.questions) == 3 * NUM_VAL
    assert [r["question_id"] for r in results] == ev.question_ids
    want = []
    for s in range(0, len(ev.questions), EVAL["batch_size"]):
        sl = slice(s, s + EVAL["batch_size"])
        idx = model.rank_answers(ev.images[ev.image_of[sl]], ev.input_ids[sl], ev.attention_mask[sl], ev.answer_ids,
                                 ev.answer_mask, k=EVAL["k_test"])
        want += [ev.answer_list[i] for i in idx.tolist()]
    assert [r["answer"] for r in results] == want
    assert len(set(want)) > 1  # the sharpened random model does not answer everything alike
    acc = summary["accuracy"]
    assert acc["overall"] == pytest.approx(vqa_score(dict(enumerate(want)), dict(enumerate(ev.answers)))["overall"])
    assert summary["num_questions"] == len(want) and summary["inference"] == "rank"


def test_accuracy_per_answer_type():
    from types import SimpleNamespace

    ev = SimpleNamespace(answers=[["yes"] * 10, ["2"] * 10, ["red"] * 10, ["left"] * 10],
                         answer_types=["yes/no", "number", "other", "other"])
    acc = accuracy(ev, ["yes", "two", "red", "right"])  # "two" is normalised to "2", as the official evaluator
    assert acc["overall"] == 75.0 and acc["type:yes/no"] == 100.0 and acc["type:number"] == 100.0
    assert acc["type:other"] == 50.0
    assert accuracy(SimpleNamespace(answers=None), ["x"]) is None


def test_generate_mode_and_max_questions(setup, tmp_path, capsys):
    root, path, model, ev = setup
    tok = build_demo_tokenizer()
    results, summary = _run(path, tmp_path, capsys, "eval.inference=generate", "eval.num_beams=2",
                            "eval.max_answer_len=4", "eval.max_questions=7")
    want = []
    for s in range(0, 7, EVAL["batch_size"]):
        sl = slice(s, min(s + EVAL["batch_size"], 7))
        want += [a.strip() for a in model.generate(ev.images[ev.image_of[sl]], ev.input_ids[sl], ev.attention_mask[sl],
                                                   num_beams=2, max_length=4, min_length=1, tokenizer=tok)]
    assert [r["answer"] for r in results] == want and summary["num_questions"] == 7
    assert len(set(want)) > 1


def test_answers_stay_with_their_questions(setup, tmp_path, capsys, monkeypatch):
    """An oracle ranker that answers each question right gives 100% only if the CLI keeps the
    question order (and sharding boundaries) through to the metric."""
    root, path, model, ev = setup
    truth = {(int(i), q): a[0] for i, q, a in zip(ev.image_of, ev.questions, ev.answers)}
    tok = build_demo_tokenizer()

    def oracle(self, images, q_ids, q_mask, answer_ids, answer_mask, k=128):
        rows = [next(i for i in range(ev.images.shape[0]) if torch.equal(ev.images[i], im)) for im in images]
        qs = [tok.decode(row[m.bool()], skip_special_tokens=True).replace(" ?", "?") for row, m in zip(q_ids, q_mask)]
        return torch.tensor([ev.answer_list.index(truth[(r, q)]) for r, q in zip(rows, qs)])

    assert len(truth) == len(ev.questions)  # (image, question text) identifies a question here
    monkeypatch.setattr(BlipForVQA, "rank_answers", oracle)
    results, summary = _run(path, tmp_path, capsys)
    assert summary["accuracy"]["overall"] == 100.0
    assert [r["answer"] for r in results] == [a[0] for a in ev.answers]


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(setup, tmp_path, capsys):
    root, path, model, ev = setup
    one, summary = _run(path, tmp_path, capsys)
    two = str(tmp_path / "two.json")
    out = run_cli_ranks("blipfast.eval.vqa", ["--config", path, "--no-progress", f"eval.output={two}"], 2)
    assert json.load(open(two)) == one
    assert json.loads(out)["accuracy"] == summary["accuracy"]


def test_config_errors_exit_2(setup, capsys):
    root, path, model, ev = setup
    assert main(["--config", path, "eval.checkpoint="]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["--config", path, "eval.beams=4"]) == 2
    assert "'beams'" in capsys.readouterr().err
    assert main(["--config", path, f"eval.checkpoint={root / 'missing.pt'}"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["--config", path, "eval.inference=vote"]) == 2
    assert "eval.inference" in capsys.readouterr().err
    bad = root / "wrong_model.pt"  # a captioning model's weights: strict loading names the problem
    from blipfast.models.caption import BlipForCaptioning

    torch.save(BlipForCaptioning(from_dict(BlipConfig, MODEL), tokenizer=build_demo_tokenizer()).state_dict(), bad)
    assert main(["--config", path, f"eval.checkpoint={bad}"]) == 2
    assert "error:" in capsys.readouterr().err


def test_shipped_config_loads():
    raw = yaml.safe_load(open(os.path.join(REPO, "configs", "tasks", "vqa_eval.yaml")))
    assert raw["model"] == "../blip_tiny.yaml"
    from_dict(DataConfig, raw["data"]).validate()
    ev = from_dict(VqaEvalConfig, raw["eval"])
    ev.validate("<vqa_eval.yaml>")
    assert ev.inference == "rank"
