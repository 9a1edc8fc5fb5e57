"""Shared by the scripts in tests/dist (run under `deepspeed --num_gpus 2`) and the pytest
processes that replay their work in one process: the tiny run config, fixed batches and fixed
hard negatives (so the replay is exact)."""
from __future__ import annotations

import os

import torch

from tests.helpers import REPO

BATCH = 4  # per rank
WORLD = 2
STEPS = 3
SEED = 1234


EXACT_WORK = os.environ.get("BLIPFAST_TEST_EXACT_WORK", "1") == "1"


def tiny_model_config(queue_size: int = 16):
    from blipfast import BlipConfig

    cfg = BlipConfig.from_yaml(os.path.join(REPO, "configs", "blip_tiny.yaml"), {
        "vision.width": 32, "vision.depth": 2, "vision.num_heads": 2, "vision.image_size": 32,
        "text.hidden_size": 32, "text.num_hidden_layers": 2, "text.num_attention_heads": 2,
        "text.intermediate_size": 64, "text.hidden_dropout_prob": 0.0, "text.attention_probs_dropout_prob": 0.0,
        "embed_dim": 16, "queue_size": queue_size, "max_text_len": 8,
        "attention_backend": "reference", "loss_backend": "reference", "exact_work": EXACT_WORK,
    })
    return cfg


def train_config(output_dir: str, **kw):
    from blipfast.train.config import TrainConfig

    base = dict(epochs=1, batch_size=BATCH, lr=1e-3, warmup_steps=2, warmup_lr=1e-5, weight_decay=0.05,
                seed=SEED, output_dir=output_dir, log_every=1, progress_bar=False)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.eval.enabled = False
    return cfg


def zero_config(stage: int) -> dict:
    # Under ZeRO-3 partition every parameter (threshold 0): by default the tiny model's
    # parameters are all small enough to stay gathered, which would hide partitioning bugs.
    return {"stage": 3, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}


def run_config(output_dir: str, stage: int, precision: str = "fp32", **train_kw):
    from blipfast.data import DataConfig
    from blipfast.train.config import RunConfig

    return RunConfig(model=tiny_model_config(), data=DataConfig(),
                     train=train_config(output_dir, precision=precision, **train_kw),
                     deepspeed={"zero_optimization": zero_config(stage)}, source="<test>",
                     deepspeed_path="<test>")


def make_batch(epoch: int, index: int, rank: int, image_size: int = 32, length: int = 8, vocab: int = 128):
    """A deterministic batch for (epoch, index, rank): random images, token ids with [CLS]=2
    first, [SEP]=3 at a per-row length, padding after it."""
    g = torch.Generator().manual_seed(SEED * 1000 + epoch * 100 + index * 10 + rank)
    images = torch.randn(BATCH, 3, image_size, image_size, generator=g)
    ids = torch.randint(7, vocab, (BATCH, length), generator=g)
    lengths = torch.randint(3, length + 1, (BATCH,), generator=g)
    pos = torch.arange(length)[None]
    ids[:, 0] = 2
    ids[pos == (lengths[:, None] - 1)] = 3
    mask = (pos < lengths[:, None]).long()
    ids = ids * mask
    return {"images": images, "input_ids": ids, "attention_mask": mask, "index": torch.arange(BATCH)}


def fixed_negatives(epoch: int, index: int, rank: int):
    """Hard negatives chosen deterministically: sample j gets (j + s) % B, s in [1, B-1]."""
    s = 1 + (index + rank + epoch) % (BATCH - 1)
    t = 1 + (index + rank + epoch + 1) % (BATCH - 1)
    j = torch.arange(BATCH)
    return (j + s) % BATCH, (j + t) % BATCH  # (neg image per text, neg text per image)


class FixedLoader:
    def __init__(self, rank: int, n: int = STEPS, nan_at=None):
        self.rank, self.n, self.nan_at = rank, n, nan_at or set()

    def __len__(self):
        return self.n

    def epoch(self, epoch: int, start_step: int = 0):
        for i in range(start_step, self.n):
            b = make_batch(epoch, i, self.rank)
            if (epoch, i, self.rank) in self.nan_at:
                b["images"][0, 0, 0, 0] = float("nan")
            yield b
