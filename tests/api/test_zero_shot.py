"""Zero-shot shape and colour classification with the demo's tiny pre-trained BLIP
(examples/zero_shot_synthetic.py): accuracy must beat the binomial floor, the accuracy that
guessing at chance reaches with probability at most 1e-6 on this many images.

The checkpoint is the demo model committed in tests/assets (see its README for how it was made;
BLIPFAST_DEMO_CHECKPOINT names another, e.g. a fresh `bash scripts/demo.sh` output/demo). Why not
train inside the test: 200-400 steps of a narrower tiny model (one layer per
tower, 32 or 64 pixels, lr 3e-4 to 3e-3, in-process AdamW) left the image features constant
(chance accuracy), and even a plain in-batch InfoNCE did not fit 32 fixed pairs in 100 steps; the
demo (3 layers, 434 steps of 64) learns but takes minutes on 2 CPU cores.
"""
import importlib.util
import math
import os

import pytest

import blipfast

from tests.helpers import REPO

CHECKPOINT = os.environ.get("BLIPFAST_DEMO_CHECKPOINT")
ASSET = os.path.join(REPO, "tests", "assets", "demo_model.pth")


def _example():
    spec = importlib.util.spec_from_file_location("zero_shot_synthetic",
                                                  os.path.join(REPO, "examples", "zero_shot_synthetic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_binomial_floor():
    zs = _example()
    assert zs.binomial_floor(10, 0.5, alpha=1 / 1024) == 10  # P(10 of 10) = 1/1024
    assert zs.binomial_floor(10, 0.5, alpha=11 / 1024) == 9  # P(>= 9) = 11/1024
    for n, p in ((360, 1 / 3), (360, 1 / 6)):
        k = zs.binomial_floor(n, p)
        tail = lambda k: sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))  # noqa: E731
        assert tail(k) <= 1e-6 < tail(k - 1)


def test_eval_set_is_balanced():
    zs = _example()
    images, shapes, colours = zs.attribute_eval_set(64, renders=1)
    assert images.shape == (180, 3, 64, 64)
    assert {s: shapes.count(s) for s in set(shapes)} == {"circle": 60, "square": 60, "triangle": 60}
    assert set(colours.count(c) for c in set(colours)) == {30}


@pytest.mark.slow  # 38-53 s
def test_zero_shot_colour_beats_the_binomial_floor():
    """Colour: 360 images, chance 1/6, floor 97/360 = 26.9%; the demo model (434 steps) measured
    96.7% by ITC and 90.8% with ITM re-ranking of the top 2. Shape is evaluated and printed but
    not held: the demo model does not tell shapes apart yet (38.6% / 37.2% against chance 33.3%
    and floor 45.6%; its own captions get colours right and shapes wrong)."""
    zs = _example()
    if CHECKPOINT:  # a run directory: config.yaml, tokenizer, newest checkpoint
        model = blipfast.load(CHECKPOINT)
    else:
        model = blipfast.load(ASSET, config=os.path.join(REPO, "configs", "demo.yaml"), tokenizer="demo")
    res = zs.evaluate(model, renders=2, top_k=2)
    print(res)
    r = res["colour"]
    assert r["n"] == 360 and r["chance"] == pytest.approx(1 / 6) and r["floor"] == pytest.approx(97 / 360)
    assert r["itc"] >= r["floor"], r
    assert r["itc_itm"] >= r["floor"], r
