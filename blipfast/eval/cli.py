"""What the evaluation CLIs (`python -m blipfast.eval.{retrieval,caption,vqa}`) share: the YAML
with `model`, `data` and `eval` sections, dotted `key=value` overrides, strict loading, the
process group under torchrun / deepspeed, the device, and this rank's contiguous slice of work.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist

from blipfast.atomic import atomic_write_json
from blipfast.config import BlipConfig, ConfigError, apply_overrides, from_dict, load_yaml, parse_overrides


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
    over: Dict[str, Dict] = {"model": {}, "data": {}, "eval": {}}
    for key, value in parse_overrides(list(overrides)).items():
        head, _, rest = key.partition(".")
        if key == "model" and isinstance(value, str):  # model=PATH: another model file / run
            raw["model"], base = value, os.getcwd()
            continue
        if head not in over or not rest:
            raise ConfigError(f"override {key!r}: expected model=PATH, model.X, data.X or eval.X")
        over[head][rest] = value
    unknown = set(raw) - set(over)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: model, data, eval")
    model_raw = raw.get("model")
    if isinstance(model_raw, str):
        model_raw = _model_section(model_raw if os.path.exists(model_raw) else os.path.join(base, model_raw))
    model = from_dict(BlipConfig, apply_overrides(dict(model_raw or {}), over["model"], path), "model")
    model.validate("model")
    data = from_dict(DataConfig, apply_overrides(dict(raw.get("data") or {}), over["data"], path), "data")
    data.validate("data")
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


def _model_section(path: str) -> Dict:
    """A model YAML, or the `model` section of a run YAML / a training output_dir's config.yaml."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.yaml")
    data = load_yaml(path)
    if isinstance(data.get("model"), dict):
        return data["model"]
    if isinstance(data.get("model"), str):  # a run YAML naming its model file
        return _model_section(os.path.join(os.path.dirname(os.path.abspath(path)), data["model"]))
    return data


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
