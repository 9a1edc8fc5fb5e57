"""benchmarks/work_report.py at tiny size: the FLOP ratio it measures (torch's FLOP counter on
the meta device) equals the one blipfast/flops.py computes from the caption lengths."""
import os

import pytest

import work_report  # benchmarks/ is on pytest's pythonpath
from blipfast import BlipConfig, flops
from tests.helpers import REPO


def tiny(**kw):
    over = {"attention_backend": "reference", "loss_backend": work_report.MetaLosses.name, **kw}
    return BlipConfig.from_yaml(os.path.join(REPO, "configs", "blip_tiny.yaml"), over)


def test_tiny_report_ratio_matches_the_formulas():
    lengths, L = [1, 5, 16, 3, 9, 2, 12, 6], 16  # 1 real token up to the padded length
    neg_img, neg_txt = work_report.derangements(len(lengths))
    row = work_report.compare(lambda **kw: tiny(**kw), lengths, L, neg_img, neg_txt)
    B = len(lengths)
    ours = flops.pretrain_step(tiny(exact_work=True, max_text_len=L), B, L, lengths=lengths, neg_text=neg_txt)
    orig = flops.pretrain_step(tiny(exact_work=False, max_text_len=L), B, L)
    assert row["ours"]["flops_py_agrees"] and row["original"]["flops_py_agrees"]
    assert row["flop_ratio"] == pytest.approx(ours.model_flops / orig.model_flops, rel=1e-12)
    assert row["flop_ratio"] < 0.9  # mean 6.75 real tokens of 16: the text passes shrink a lot
    assert 0 < row["ours"]["saved_mb_per_sample"] < row["original"]["saved_mb_per_sample"]
