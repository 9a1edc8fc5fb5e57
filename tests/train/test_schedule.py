"""The learning-rate and alpha schedules against the original pretrain.py formulas, and the
AdamW parameter groups."""
import pytest
import torch

from blipfast.train import schedule
from blipfast.train.config import TrainConfig


def original_warmup(step, max_step, init_lr, max_lr):  # utils.warmup_lr_schedule
    return min(max_lr, init_lr + (max_lr - init_lr) * step / max_step)


def original_step(epoch, init_lr, min_lr, decay):  # utils.step_lr_schedule
    return max(min_lr, init_lr * decay ** epoch)


@pytest.mark.parametrize("epoch,step", [(0, 0), (0, 1), (0, 1500), (0, 2999), (0, 3000), (0, 5000),
                                        (1, 0), (1, 77), (5, 10), (19, 0), (80, 0)])
def test_lr_matches_original(epoch, step):
    cfg = TrainConfig()  # the original's values: 3e-4, 3000 warmup steps from 1e-6, 0.9 per epoch, floor 1e-6
    want = original_warmup(step, 3000, 1e-6, 3e-4) if epoch == 0 else original_step(epoch, 3e-4, 1e-6, 0.9)
    assert schedule.learning_rate(cfg, epoch, step) == pytest.approx(want, rel=1e-12)


def test_lr_known_values():
    cfg = TrainConfig()
    assert schedule.learning_rate(cfg, 0, 0) == 1e-6
    assert schedule.learning_rate(cfg, 0, 1500) == pytest.approx(1.505e-4)
    assert schedule.learning_rate(cfg, 0, 3000) == 3e-4
    assert schedule.learning_rate(cfg, 2, 0) == pytest.approx(3e-4 * 0.81)
    assert schedule.learning_rate(cfg, 100, 0) == 1e-6  # floor


def test_alpha_ramp():
    cfg = TrainConfig()
    n = 40
    for epoch, i in [(0, 0), (0, 10), (0, 39), (1, 0), (1, 20), (2, 0), (3, 5)]:
        want = 0.4 * min(1, (epoch * n + i) / (2 * n))  # pretrain.py
        assert schedule.alpha(cfg, epoch, i, n) == pytest.approx(want, rel=1e-12)
    assert schedule.alpha(cfg, 0, 0, n) == 0.0 and schedule.alpha(cfg, 1, 0, n) == pytest.approx(0.2)


def test_param_groups(tiny_config):
    from blipfast import BlipForPretraining

    model = BlipForPretraining(tiny_config)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    (all_group,) = schedule.param_groups(model, TrainConfig())  # the original: decay on everything
    assert all_group["weight_decay"] == 0.05 and {id(p) for p in all_group["params"]} == trainable
    assert len(all_group["params"]) == len(trainable)  # shared encoder/decoder weights once

    decay, no_decay = schedule.param_groups(model, TrainConfig(wd_exclude_bias_norm=True))
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim < 2 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert id(model.temp) in {id(p) for p in no_decay["params"]}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == trainable
    assert not any(p.requires_grad for p in model.visual_encoder_m.parameters())
    assert torch.is_tensor(model.temp) and model.temp.ndim == 1
