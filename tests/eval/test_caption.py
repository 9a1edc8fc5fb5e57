"""Caption evaluation CLI (`python -m blipfast.eval.caption`): captions equal to direct
`generate` calls in image order, scores equal to `caption_scores` (and to the trainer's
end-of-run evaluation), 2 ranks equal to 1 rank, config errors exit with status 2."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

from blipfast.config import BlipConfig, from_dict
from blipfast.data import DataConfig, build_demo_tokenizer, build_eval_set, generate_synthetic
from blipfast.eval.caption import main
from blipfast.eval.caption_metrics import caption_scores
from blipfast.eval.cli import shard_batches
from blipfast.models.caption import BlipForCaptioning
from tests.helpers import REPO, run_cli_ranks, sharpen_, tiny_model

MODEL = tiny_model(depth=1)
NUM_VAL = 7  # with batch_size 2: 4 batches, so 2 ranks get images 0..3 and 4..6
EVAL = {"batch_size": 2, "num_beams": 2, "max_length": 12, "min_length": 6, "device": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_eval")
    generate_synthetic(str(root / "data"), num_train=2, num_val=NUM_VAL, seed=0, image_size=32)
    cfg = from_dict(BlipConfig, MODEL)
    torch.manual_seed(0)
    model = BlipForCaptioning(cfg, tokenizer=build_demo_tokenizer())
    sharpen_(model, 1)  # peaked distributions: captions differ between images
    ckpt = str(root / "captioner.pt")
    torch.save({"model": model.state_dict()}, ckpt)
    data = {"format": "synthetic", "synthetic": {"out_dir": str(root / "data"), "num_train": 2, "num_val": NUM_VAL,
                                                 "image_size": 32},
            "backend": "torch", "tokenizer": "demo", "cache_dir": str(root / "cache")}
    path = str(root / "eval.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"model": MODEL, "data": data, "eval": {"checkpoint": ckpt, **EVAL}}, f)
    es = build_eval_set(from_dict(DataConfig, data), build_demo_tokenizer(), 32, 30)
    return root, path, model.eval(), es


def _direct(model, images, sample=False, seed=0, bs=EVAL["batch_size"]):
    """The documented behaviour, by hand: batches of bs, sampling seeded with seed + batch start."""
    out = []
    for s in range(0, images.shape[0], bs):
        gen = torch.Generator().manual_seed(seed + s) if sample else None
        out += model.generate(images[s:s + bs], sample=sample, num_beams=EVAL["num_beams"],
                              max_length=EVAL["max_length"], min_length=EVAL["min_length"], generator=gen)
    return out


def test_cli_captions_and_scores_match_direct_generation(setup, tmp_path, capsys):
    root, path, model, es = setup
    out = str(tmp_path / "res" / "captions.json")
    assert main(["--config", path, "--no-progress", f"eval.output={out}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = json.load(open(out))
    assert [r["image_id"] for r in records] == list(range(NUM_VAL))
    assert [r["image"] for r in records] == es.image_names
    captions = [r["caption"] for r in records]
    assert captions == _direct(model, es.images)
    assert len(set(captions)) > 1  # otherwise an ordering mistake could go unnoticed
    refs = {i: [es.captions[t] for t in es.img2txt[i]] for i in range(NUM_VAL)}
    assert summary["scores"] == caption_scores(refs, {i: [c.strip() or "."] for i, c in enumerate(captions)})
    assert summary["num_images"] == NUM_VAL and summary["generation_seconds"] > 0

    # The trainer's end-of-run evaluation gives the same scores for the same settings.
    from blipfast.train.tasks import CaptionTask

    tcfg = SimpleNamespace(batch_size=EVAL["batch_size"], num_beams=EVAL["num_beams"],
                           max_caption_len=EVAL["max_length"], min_caption_len=EVAL["min_length"], num_captions=0)
    assert CaptionTask().evaluate(model, es, None, tcfg, torch.device("cpu"))["scores"] == summary["scores"]


def test_cli_scores_each_caption_against_its_own_image(setup, tmp_path, capsys, monkeypatch):
    """A "model" that returns each image's first reference: perfect BLEU only if the CLI keeps
    captions, images and references aligned (random weights score ~0 whatever the order)."""
    root, path, model, es = setup

    def oracle(self, images, **kw):
        return [next(es.captions[es.img2txt[i][0]] for i in range(NUM_VAL) if torch.equal(es.images[i], im))
                for im in images]

    monkeypatch.setattr(BlipForCaptioning, "generate", oracle)
    out = str(tmp_path / "o.json")
    assert main(["--config", path, "--no-progress", f"eval.output={out}"]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert [r["caption"] for r in json.load(open(out))] == [es.captions[t[0]] for t in es.img2txt]
    assert scores["BLEU-4"] > 0.99 and scores["CIDEr"] > 1.0


def test_cli_sampling_is_seeded_and_max_images(setup, tmp_path, capsys):
    root, path, model, es = setup
    out = str(tmp_path / "s.json")
    args = ["--config", path, "--no-progress", f"eval.output={out}", "eval.sample=true", "eval.seed=3"]
    assert main(args + ["eval.max_images=5"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 5
    captions = [r["caption"] for r in json.load(open(out))]
    assert captions == _direct(model, es.images[:5], sample=True, seed=3)


def test_shard_batches_covers_whole_batches():
    for n, bs, world in [(7, 2, 2), (5, 2, 4), (10, 3, 3), (1, 4, 2)]:
        ranges = [(s.start, s.stop) for s in (shard_batches(n, bs, r, world) for r in range(world))]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
        assert all(lo % bs == 0 for lo, hi in ranges if hi > lo)  # single-process batch boundaries


def _run_ranks(path, world, extra):
    """The CLI as `python -m` in `world` processes (gloo); returns rank 0's stdout."""
    return run_cli_ranks("blipfast.eval.caption", ["--config", path, "--no-progress", *extra], world)


@pytest.mark.distributed
@pytest.mark.parametrize("sample", [False, True])
def test_two_ranks_equal_one_rank(setup, tmp_path, sample, capsys):
    root, path, model, es = setup
    common = [f"eval.sample={str(sample).lower()}", "eval.seed=5"]
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    assert main(["--config", path, "--no-progress", f"eval.output={one}", *common]) == 0
    single = json.loads(capsys.readouterr().out)
    multi = json.loads(_run_ranks(path, 2, [f"eval.output={two}", *common]))
    assert json.load(open(two)) == json.load(open(one))
    assert multi["scores"] == single["scores"] and multi["num_images"] == NUM_VAL


def test_config_errors_exit_2(setup, capsys):
    root, path, model, es = setup
    assert main(["--config", path, "eval.checkpoint="]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["--config", path, "eval.beams=4"]) == 2
    assert "'beams'" in capsys.readouterr().err
    assert main(["--config", path, f"eval.checkpoint={root / 'missing.pt'}"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["--config", path, "eval.batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(["--config", path, "eval.max_length=100"]) == 2  # over max_position_embeddings
    assert "max_length" in capsys.readouterr().err


def test_shipped_config_loads():
    from blipfast.data import DataConfig as DC
    from blipfast.eval.caption import CaptionEvalConfig

    raw = yaml.safe_load(open(os.path.join(REPO, "configs", "tasks", "caption_eval.yaml")))
    assert raw["model"] == "../blip_tiny.yaml"
    from_dict(DC, raw["data"]).validate()
    ev = from_dict(CaptionEvalConfig, raw["eval"])
    assert ev == CaptionEvalConfig()  # the YAML spells out the defaults
