"""Training logs: metrics.jsonl (every optimizer step), TensorBoard and a console line (every
`log_every` steps), a tqdm bar, throughput, data-loader wait time and MFU on GPUs.

MFU = achieved model FLOP/s / (peak FLOP/s of the GPU x world size), with the model FLOPs of one
pre-training sample from blipfast.flops, the count the benchmarks use and that the tests hold to
torch.utils.flop_counter (matmuls only; activation recomputation is not model work).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional

import torch

from blipfast import flops
from blipfast.atomic import atomic_open

def peak_flops(precision: str) -> Optional[float]:
    """Dense peak FLOP/s of this process's GPU at the run's precision (blipfast.flops' table), or None."""
    if not torch.cuda.is_available():
        return None
    if precision == "fp32":  # fp32 matmuls run on tensor cores only when TF32 is allowed
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    peak = flops.peak_tflops(torch.cuda.get_device_name(), precision)
    return None if peak is None else peak * 1e12


def truncate_metrics(output_dir: str, last_step: int) -> None:
    """Drop metrics.jsonl rows after `last_step` (and a torn last line): a resumed run logs those
    steps again, so the file keeps one row per step."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, AttributeError):
                continue
    with atomic_open(path) as f:
        f.writelines(keep)


class RunLogger:
    """Rank-0 sink for per-step metrics and periodic throughput; a no-op on other ranks."""

    def __init__(self, output_dir: str, rank: int, total_steps: int, start_step: int, enabled_bar: bool,
                 flops_per_sample: float, peak: Optional[float], world_size: int):
        self.rank, self.world = rank, world_size
        self.flops_per_sample, self.peak = flops_per_sample, peak
        self.metrics = None
        self.tb = None
        self.bar = None
        self._reset_window(start_step)
        if rank != 0:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.metrics = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except ImportError:  # tensorboard is in the [train] extra; logs still go to metrics.jsonl
            self.tb = None
        if enabled_bar:
            from tqdm import tqdm

            # disable=None: on when stderr is a terminal, off in batch logs
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, disable=None,
                            desc="train", unit="step", file=sys.stderr)

    def _reset_window(self, step: int) -> None:
        self.t0 = time.perf_counter()
        self.win_steps = 0
        self.win_samples = 0
        self.win_tokens = 0
        self.win_wait = 0.0
        self.win_losses: Dict[str, float] = {}

    def step(self, record: Dict, samples: int, tokens: float, wait_s: float) -> None:
        """One optimizer step: record (JSON-able; losses averaged over ranks and micro-batches)."""
        self.win_steps += 1
        self.win_samples += samples
        self.win_tokens += tokens
        self.win_wait += wait_s
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm"):
            if k in record:
                self.win_losses[k] = self.win_losses.get(k, 0.0) + record[k]
        if self.rank != 0:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", lr=f"{record['lr']:.2e}")

    def flush_window(self, step: int, extra: Dict[str, float]) -> Dict[str, float]:
        """Throughput and mean losses since the last flush; written to TensorBoard and printed."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        n = max(self.win_steps, 1)
        out = {k: v / n for k, v in self.win_losses.items()}
        out.update(extra)
        out["images_per_s"] = self.win_samples / dt
        out["tokens_per_s"] = self.win_tokens / dt
        out["data_wait_frac"] = self.win_wait / dt
        out["step_time_s"] = dt / n
        if self.peak:
            out["mfu"] = self.flops_per_sample * out["images_per_s"] / (self.peak * self.world)
        if self.rank == 0:
            if self.tb is not None:
                for k, v in out.items():
                    self.tb.add_scalar(f"train/{k}", v, step)
                self.tb.flush()
            parts = [f"step {step}"] + [f"{k} {v:.4g}" for k, v in out.items()]
            self.print("  ".join(parts))
        self._reset_window(step)
        return out

    def print(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.metrics is not None:
            self.metrics.close()
