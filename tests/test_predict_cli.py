"""python -m blipfast.predict: score table, captions and classes, streamed per batch, JSON with --out."""
import json

import pytest
import torch
import yaml
from PIL import Image

import blipfast
from blipfast.convert import export_original_state_dict
from blipfast.models import BlipForPretraining
from blipfast.predict import main
from tests.api.test_api import MODEL, make

TEXTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    ckpt = str(root / "model_base.pth")
    torch.save({"model": export_original_state_dict(make(BlipForPretraining))}, ckpt)  # official layout
    (root / "model.yaml").write_text(yaml.safe_dump(MODEL))
    imgs = root / "imgs"
    imgs.mkdir()
    for i, c in enumerate([(220, 40, 40), (40, 80, 220), (40, 165, 60)]):
        Image.new("RGB", (40, 40), c).save(imgs / f"img{i}.png")
    (imgs / "notes.txt").write_text("not an image: skipped by extension")
    base = ["--checkpoint", ckpt, "--images", str(imgs), "--tokenizer", "demo", "--config", str(root / "model.yaml"),
            "--batch-size", "2", "--no-progress"]
    return root, base


def test_scores_table_and_json(setup, capsys):
    root, base = setup
    out = str(root / "scores.json")
    assert main(base + ["--texts", *TEXTS, "--out", out]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["T1 = a red square", "T2 = a blue circle"]
    assert [line.split()[0] for line in printed[4:]] == ["img0.png", "img1.png", "img2.png"]
    res = json.load(open(out))
    assert res["mode"] == "scores" and res["texts"] == TEXTS and res["task"] == "pretrain"
    assert res["layout"] == "official" and [r["image"].rsplit("/", 1)[1] for r in res["results"]] == [
        "img0.png", "img1.png", "img2.png"]
    p = blipfast.load(res["checkpoint"], tokenizer="demo", config=str(root / "model.yaml"))
    paths = [r["image"] for r in res["results"]]
    torch.testing.assert_close(torch.tensor([r["itm"] for r in res["results"]]), p.itm_score(paths, TEXTS),
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(torch.tensor([r["itc"] for r in res["results"]]), p.itc_score(paths, TEXTS),
                               rtol=0, atol=2e-6)


def test_classes_and_captions(setup, capsys):
    root, base = setup
    out = str(root / "classes.json")
    assert main(base + ["--classes", "red", "blue", "green", "--templates", "a {} square", "a {} shape",
                        "--top-k-itm", "2", "--out", out]) == 0
    res = json.load(open(out))
    assert res["mode"] == "classify" and res["top_k_itm"] == 2 and res["templates"] == ["a {} square", "a {} shape"]
    p = blipfast.load(res["checkpoint"], tokenizer="demo", config=str(root / "model.yaml"))
    want = p.zero_shot_classifier(["red", "blue", "green"], ["a {} square", "a {} shape"]).classify(
        [r["image"] for r in res["results"]], top_k_itm=2)
    assert [r["label"] for r in res["results"]] == want.labels
    assert all(r["top"][0]["class"] == r["label"] for r in res["results"])
    capsys.readouterr()
    out = str(root / "captions.json")
    assert main(base + ["--task", "caption", "--max-length", "6", "--min-length", "2", "--num-beams", "1",
                        "--out", out]) == 0
    res = json.load(open(out))
    assert res["mode"] == "caption" and len(res["results"]) == 3
    assert res["results"][0]["caption"] == p.caption([res["results"][0]["image"]], num_beams=1, max_length=6,
                                                     min_length=2)[0]
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_errors(setup, tmp_path, capsys):
    root, base = setup
    assert main(base[:2] + ["--images", str(tmp_path / "none"), "--texts", "x"]) == 2
    assert "neither a file nor a directory" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--images", str(root / "imgs"), "--texts", "x"]) == 2
    assert "neither a training output directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--texts", "x", "--classes", "y"])  # one mode at a time
