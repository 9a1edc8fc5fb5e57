"""CapFilt: the CLI (sharded, resumable, JSON and webdataset outputs the trainer's reader accepts)
and a very small end-to-end run of examples/capfilt_experiment.py.

Quality (does the filter find the corrupted captions?) needs a trained model and is reported
by the example at full size; here only structure and bookkeeping are checked.
"""
import importlib.util
import json
import os
import sys

import pytest
import torch
import yaml

from blipfast.capfilt import main
from blipfast.config import BlipConfig, from_dict
from blipfast.data import DataConfig, generate_synthetic
from blipfast.data.index import build_train_index
from blipfast.models.caption import BlipForCaptioning
from blipfast.models.retrieval import BlipForRetrieval
from tests.helpers import REPO, sharpen_, tiny_model

MODEL = tiny_model(depth=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    data = generate_synthetic(str(root / "data"), num_train=10, num_val=2, seed=0, image_size=32)
    cfg = from_dict(BlipConfig, MODEL)
    torch.manual_seed(0)
    cap, filt = BlipForCaptioning(cfg), BlipForRetrieval(cfg)
    sharpen_(cap, 1)
    sharpen_(filt, 2, temp=0.1)
    paths = {"captioner": str(root / "captioner.pt"), "filter": str(root / "filter.pt")}
    torch.save({"model": cap.state_dict()}, paths["captioner"])  # the official {'model': ...} wrapper
    torch.save(filt.state_dict(), paths["filter"])  # a bare state dict
    config = {
        "model": MODEL,
        "data": {"format": "json", "ann_files": [data.train_json], "image_root": data.image_root,
                 "backend": "torch", "tokenizer": "demo", "cache_dir": str(root / "cache")},
        "capfilt": {**paths, "num_synthetic": 2, "threshold": 0.5, "batch_size": 3, "chunk_size": 4,
                    "max_length": 12, "min_length": 6, "device": "cpu", "merge_timeout": 30},
    }
    path = str(root / "capfilt.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return root, data, path


def _load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def test_sharded_resumable_run_matches_single_rank(setup, capsys):
    root, data, cfg = setup
    two, one = str(root / "two"), str(root / "one")
    # Rank 1 first: rank 0 merges after its own units and waits for every marker.
    assert main(["--config", cfg, "--rank", "1", "--world-size", "2", "--no-progress", f"capfilt.out_dir={two}"]) == 0
    assert not os.path.exists(os.path.join(two, "summary.json"))  # only rank 0 merges
    assert main(["--config", cfg, "--rank", "0", "--world-size", "2", "--no-progress", f"capfilt.out_dir={two}"]) == 0
    assert main(["--config", cfg, "--no-progress", f"capfilt.out_dir={one}"]) == 0
    # Same candidates and scores whatever the number of ranks (each unit's randomness is its own).
    a, b = _load(two, "candidates.json"), _load(one, "candidates.json")
    assert [(r["image"], r["caption"], r["source"]) for r in a] == [(r["image"], r["caption"], r["source"]) for r in b]
    assert max(abs(x["p_match"] - y["p_match"]) for x, y in zip(a, b)) < 1e-5

    # Resume: nothing left to do, outputs unchanged.
    capsys.readouterr()
    before = _load(one, "capfilt.json")
    assert main(["--config", cfg, "--no-progress", f"capfilt.out_dir={one}"]) == 0
    assert "0 to do, 3 already done" in capsys.readouterr().out
    assert _load(one, "capfilt.json") == before

    # Bookkeeping: 1 original + 2 synthetic candidates per image; kept = p >= threshold; counts add up.
    summary = _load(one, "summary.json")
    assert len(a) == 10 * 3 and sum(r["source"] == "synthetic" for r in a) == 20
    assert all(r["kept"] == (r["p_match"] >= 0.5 and bool(r["caption"])) for r in a)
    for src in ("original", "synthetic"):
        rs = [r for r in a if r["source"] == src]
        assert summary[src] == {"kept": sum(r["kept"] for r in rs), "dropped": sum(not r["kept"] for r in rs)}
    # The trainer's reader accepts the output, one sample per kept caption. Its image paths are
    # absolute: data.image_root names the images' root (paths must stay under it).
    index = build_train_index(DataConfig(format="json", ann_files=[os.path.join(one, "capfilt.json")],
                                         image_root=data.image_root, cache_dir=str(root / "cache2")))
    assert len(index) == summary["kept"] == len(before)


def test_threshold_override_and_webdataset_output(setup):
    root, data, cfg = setup
    out = str(root / "wds")
    shards = data.train_shards[0]
    assert main(["--config", cfg, "--no-progress", f"capfilt.out_dir={out}", "capfilt.threshold=0.0",
                 "data.format=webdataset", f"data.shards=[{shards}]", "data.ann_files=[]"]) == 0
    summary = _load(out, "summary.json")
    assert summary["format"] == "webdataset" and summary["kept"] == summary["candidates"]  # threshold 0 keeps all
    index = build_train_index(DataConfig(format="webdataset", shards=[os.path.join(out, "shards", "capfilt-*.tar")],
                                         cache_dir=str(root / "cache3")))
    cands = _load(out, "candidates.json")
    assert len(index) == len([c for c in cands if c["caption"]])


def test_bad_config_is_reported(setup, capsys):
    root, data, cfg = setup
    assert main(["--config", cfg, "capfilt.threshold=1.5"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert main(["--config", cfg, "capfilt.captioner=/nonexistent.pt", f"capfilt.out_dir={root / 'bad'}",
                 "--no-progress"]) == 2


def test_experiment_runs_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("capfilt_experiment", os.path.join(REPO, "examples", "capfilt_experiment.py"))
    ex = importlib.util.module_from_spec(spec)
    sys.modules["capfilt_experiment"] = ex
    spec.loader.exec_module(ex)
    over = {"vision.width": 32, "vision.depth": 1, "vision.num_heads": 2, "text.hidden_size": 32,
            "text.num_hidden_layers": 1, "text.num_attention_heads": 2, "text.intermediate_size": 64,
            "embed_dim": 16, "queue_size": 32, "attention_backend": "reference"}
    scale = ex.Scale(num_train=40, num_val=8, image_size=32, model_overrides=over, batch_size=8, pretrain_steps=3,
                     finetune_steps=2, retrain_steps=2, k_test=4, log_every=0, clean_fraction=0.2)
    res = ex.run(str(tmp_path), scale, log=lambda *a: None)
    assert res["web_images"] == 32 and 0 < res["corrupted"] <= round(0.3 * 32)
    s = res["capfilt_summary"]
    assert s["original"]["kept"] + s["original"]["dropped"] == 32
    assert s["synthetic"]["kept"] + s["synthetic"]["dropped"] == 32
    assert res["train_samples"]["bootstrapped"] == 8 + s["kept"]
    # held-out retrieval of the three models, each over the 8 validation images and their captions
    assert set(res["recall"]) == {"pretrained", "noisy", "bootstrapped"}
    for r in res["recall"].values():
        assert r["r_mean"] == pytest.approx(sum(r[f"{d}_r{k}"] for d in ("txt", "img") for k in (1, 5, 10)) / 6)
        assert all((r[f"txt_r{k}"] * 8 / 100).is_integer() for k in (1, 5, 10)), r  # TR: a fraction of 8 images
    assert "precision" in ex.report(res)
    assert json.load(open(tmp_path / "results.json"))["web_images"] == 32
    # corrupt_captions: every chosen caption moved to another image
    import numpy as np

    recs = [{"caption": f"c{i}"} for i in range(10)]
    new, bad = ex.corrupt_captions(recs, 0.5, np.random.default_rng(0))
    assert len(bad) == 5 and all(new[i]["caption"] != recs[i]["caption"] for i in bad)
    assert sorted(r["caption"] for r in new) == sorted(r["caption"] for r in recs)
