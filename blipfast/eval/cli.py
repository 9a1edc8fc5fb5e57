"""What the evaluation CLIs (`python -m blipfast.eval.{retrieval,caption,vqa}`) share: the YAML
with `model`, `data` and `eval` sections, dotted `key=value` overrides, strict loading, the
process group under torchrun / deepspeed, the device, and this rank's contiguous slice of work.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist

from blipfast.atomic import atomic_write_json
from blipfast.config import (BlipConfig, ConfigError, apply_overrides, from_dict, load_model_section, load_section,
                             load_yaml, parse_overrides, split_sections)


@dataclass
class EvalRun:
    model: BlipConfig
    data: Any  # blipfast.data.DataConfig
    eval: Any  # the CLI's eval dataclass
    source: str  # the YAML path (for messages)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="YAML with model, data and eval sections")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the YAML, e.g. eval.batch_size=32 data.backend=torch; model=PATH "
                        "takes the model from a model YAML, a run YAML or a training output directory")
    return p


def load_eval_run(path: str, overrides: Sequence[str], eval_cls: Type) -> EvalRun:
    """Strict load (ConfigError names the unknown / bad key); eval.checkpoint must be set."""
    from blipfast.data import DataConfig

    raw = load_yaml(path)
    base = os.path.dirname(os.path.abspath(path))
    whole, over = split_sections(raw, parse_overrides(list(overrides)), ("model", "data", "eval"), path)
    if set(whole) - {"model"} or not isinstance(whole.get("model", ""), str):
        raise ConfigError(f"override(s) {', '.join(map(repr, whole))}: expected model=PATH, model.X, data.X or eval.X")
    if "model" in whole:  # model=PATH: another model file / run, relative to the working directory
        raw["model"], base = whole["model"], os.getcwd()
    model = load_model_section(raw.get("model") or {}, base, "model", over["model"])
    data = load_section(DataConfig, raw.get("data"), over["data"], "data")
    ev = from_dict(eval_cls, apply_overrides(dict(raw.get("eval") or {}), over["eval"], path), "eval")
    if hasattr(ev, "validate"):
        ev.validate(path)
    if not getattr(ev, "checkpoint", ""):
        raise ConfigError(f"{path}: eval.checkpoint is not set (give eval.checkpoint=PATH)")
    return EvalRun(model, data, ev, path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def init_distributed(device: torch.device) -> Tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group). Under torchrun /
    deepspeed (WORLD_SIZE > 1) a group is created with the backend of the device used (gloo for
    eval.device=cpu even on a GPU machine); NCCL's collectives use the current CUDA device."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own = world > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), own
    return 0, 1, own


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> range:
    """Rank's contiguous slice of n items made of whole batches of the single-process batching,
    so each rank runs exactly the batches one process would (same results, same sampling seeds)."""
    n_batches = -(-n // batch_size)
    per = -(-n_batches // world)  # batches per rank; trailing ranks may get fewer or none
    return range(min(rank * per * batch_size, n), min((rank + 1) * per * batch_size, n))


def gather_in_order(part: list, world: int) -> list:
    """Concatenate every rank's list in rank order: one all_gather_object after all local work,
    so no rank waits in a collective while another still computes."""
    if world == 1:
        return list(part)
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    return [x for p in parts for x in p]


def finish(own_group: bool) -> None:
    """Destroy the process group if this CLI created it."""
    if own_group and dist.is_initialized():
        dist.destroy_process_group()


def write_json(obj: Any, path: Optional[str]) -> None:
    """Atomic write (a crash never leaves half a results file)."""

    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, obj, indent=1)
