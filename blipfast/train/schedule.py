"""The original BLIP pre-training schedule (`pretrain.py` / `utils.py`), as pure functions.

* learning rate, epoch 0: a linear warmup per optimizer step, capped at the peak,
      lr(i) = min(lr, warmup_lr + (lr - warmup_lr) * i / warmup_steps)
  applied at every step of epoch 0 (so an epoch shorter than the warmup ends below the peak);
* learning rate, epoch e >= 1: a step decay, max(min_lr, lr * lr_decay_rate ** e); or, with
  train.schedule=cosine (the original's fine-tuning, `cosine_lr_schedule`), per epoch
      min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2   (epoch 0: the warmup, if any, else lr);
* alpha (momentum distillation): alpha * min(1, (epoch * n + i) / (ramp_epochs * n)) with n the
  number of batches per epoch and i the batch index (the original ramps over 2 epochs).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch.nn as nn

from .config import TrainConfig


def learning_rate(cfg: TrainConfig, epoch: int, step_in_epoch: int) -> float:
    """The learning rate of optimizer step `step_in_epoch` (0-based) of `epoch`."""
    if epoch == 0:
        if cfg.warmup_steps == 0:
            return cfg.lr
        return min(cfg.lr, cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step_in_epoch / cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay_rate ** epoch)


def alpha(cfg: TrainConfig, epoch: int, batch_in_epoch: int, batches_per_epoch: int) -> float:
    """The distillation weight for batch `batch_in_epoch` (0-based) of `epoch`."""
    if cfg.alpha_ramp_epochs == 0:
        return cfg.alpha
    progress = (epoch * batches_per_epoch + batch_in_epoch) / (cfg.alpha_ramp_epochs * batches_per_epoch)
    return cfg.alpha * min(1.0, progress)


def param_groups(model: nn.Module, cfg: TrainConfig) -> List[Dict]:
    """AdamW parameter groups over the trainable parameters (shared ones once).

    The original decays every parameter by weight_decay; with wd_exclude_bias_norm (LAVIS) the
    1-d parameters (biases, LayerNorm gains, the temperature) get no decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() yields a shared tensor once
        if not p.requires_grad:
            continue
        if cfg.wd_exclude_bias_norm and (p.ndim < 2 or name.endswith(".bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
