"""BLIP pre-training: `deepspeed [--num_gpus N] train.py --config configs/demo.yaml [key=value ...] [--resume]`.

See blipfast/train/ for the loop, checkpoints and configs; `python -m blipfast.train.export`
turns a checkpoint into plain weights.
"""
import sys

from blipfast.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
