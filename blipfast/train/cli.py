"""`deepspeed [--num_gpus N] train.py --config configs/X.yaml [key=value ...] [--resume]`."""
from __future__ import annotations

import argparse
import sys
import time

from blipfast.config import ConfigError, parse_overrides


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="train.py",
        description="BLIP pre-training under DeepSpeed ZeRO. Launch with `deepspeed [--num_gpus N] train.py ...`.",
    )
    p.add_argument("--config", required=True, help="run YAML (model, data, train, deepspeed sections)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest committed checkpoint in train.output_dir (torn saves are ignored)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=1e-4 train.epochs=2 model.vision.depth=6")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from .config import load_run_config
    from .checkpoint import CheckpointWriteError
    from .trainer import NonFiniteLoss, Trainer

    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        overrides = parse_overrides(args.overrides)
        run = load_run_config(args.config, overrides)
        trainer = Trainer(run, resume=args.resume)
        if args.resume:
            trainer.resume()
    except ConfigError as e:  # DataError and an unsafe or mismatched checkpoint are ConfigErrors too
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        result = trainer.fit()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if "stopped" in result:  # preempted: the checkpoint is committed, --resume continues
        return 0
    if trainer.rank == 0:
        print(f"done: {result['steps']} steps, wall time {time.perf_counter() - t0:.1f} s "
              f"(outputs in {run.train.output_dir})", flush=True)
    return 0
