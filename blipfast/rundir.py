"""A training run's output directory, read by everything that uses a trained model (export, the
eval CLIs, CapFilt, blipfast.load) without importing the trainer.

Layout of `output_dir/`:
    config.yaml              the resolved run config (task, model, data, train, deepspeed)
    checkpoints/
        stepNNNNNNNN/        one tag per save (global optimizer step): DeepSpeed's files,
                             momentum.pt (fp32 momentum encoders, queues), rank{r}.pt (RNG),
                             COMMITTED (written last: JSON manifest of the files and their sizes)
        latest_good          the newest committed tag
The writer is blipfast.train.checkpoint. Every file is read weights-only (blipfast.safe_load):
a checkpoint directory is untrusted input.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional

import torch

from blipfast import safe_load
from blipfast.config import BlipConfig, from_dict, load_yaml
from blipfast.models.registry import NEEDS_TOKENIZER, build_model

COMMITTED = "COMMITTED"
LATEST = "latest_good"
MOMENTUM_FILE = "momentum.pt"
TAG_PREFIX = "step"


def _manifest(tag_dir: str) -> Dict[str, int]:
    files = {}
    for root, _, names in os.walk(tag_dir):
        for n in names:
            if n == COMMITTED or ".tmp" in n:  # a write in flight (blipfast.atomic names)
                continue
            full = os.path.join(root, n)
            files[os.path.relpath(full, tag_dir)] = os.path.getsize(full)
    return files


def commit_problem(tag_dir: str) -> Optional[str]:
    """None when tag_dir is committed: COMMITTED exists and every file it lists is present with its
    recorded size. Otherwise what is wrong, in words."""
    marker = os.path.join(tag_dir, COMMITTED)
    if not os.path.isfile(marker):
        return "no COMMITTED marker (a save that did not finish)"
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable COMMITTED marker ({e})"
    for rel, size in info.get("files", {}).items():
        full = os.path.join(tag_dir, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, the manifest says {size}"
    return None


def is_committed(tag_dir: str) -> bool:
    """COMMITTED exists and every file it lists is present with its recorded size."""
    return commit_problem(tag_dir) is None


def all_tags(ckpt_dir: str) -> List[str]:
    """Every tag directory, committed or not, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir)
                  if t.startswith(TAG_PREFIX) and os.path.isdir(os.path.join(ckpt_dir, t)))


def committed_tags(ckpt_dir: str) -> List[str]:
    """Committed tags, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir)
            if t.startswith(TAG_PREFIX) and os.path.isdir(os.path.join(ckpt_dir, t))
            and is_committed(os.path.join(ckpt_dir, t))]
    return sorted(tags)


def find_latest(ckpt_dir: str) -> Optional[str]:
    """The newest committed tag (by step), or None. Torn tags (no valid COMMITTED) are ignored."""
    tags = committed_tags(ckpt_dir)
    return tags[-1] if tags else None


def read_meta(ckpt_dir: str, tag: str) -> Dict:
    with open(os.path.join(ckpt_dir, tag, COMMITTED)) as f:
        return json.load(f)["meta"]



# -- the model a run trained ----------------------------------------------------------------


def _ds_state_dict(ckpt_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed tag. Every file is scanned first and read weights-only
    (safe_load): a checkpoint directory is untrusted input and must not run code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(ckpt_dir, tag)
    safe_load.check_files(safe_load.pickle_files(tag_dir))
    stage0 = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(stage0) or any(n.endswith("optim_states.pt") for n in os.listdir(tag_dir)):
        try:
            with safe_load.weights_only_loads():
                return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag))
        except safe_load.UnsafeCheckpointError:
            raise
        except (ValueError, FileNotFoundError, TypeError):  # deepspeed 0.19.8: TypeError on a stage-0 checkpoint
            if not os.path.isfile(stage0):
                raise
    # ZeRO stage 0 keeps the whole model in mp_rank_00_model_states.pt (zero_to_fp32 cannot read it)
    return {k: v.float() if v.is_floating_point() else v for k, v in safe_load.load(stage0)["module"].items()}


def load_run_model_config(output_dir: str) -> BlipConfig:
    path = os.path.join(output_dir, "config.yaml")
    data = load_yaml(path)
    if not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: no resolved model section (is this a train.output_dir?)")
    cfg = from_dict(BlipConfig, data["model"], where=f"{path}: model")
    cfg.validate(path)
    return cfg


def build_run_model(output_dir: str):
    """The model a run trained (its config.yaml's task and model; pre-training when no task)."""
    from blipfast.data import DataConfig, tokenizer_from_config

    path = os.path.join(output_dir, "config.yaml")
    data = load_yaml(path)
    task = str(data.get("task", "pretrain"))
    tok = None
    if task in NEEDS_TOKENIZER:  # their models keep the tokenizer (prompt, decoding)
        tok = tokenizer_from_config(from_dict(DataConfig, data.get("data") or {}, "data"))
    kw = {}
    if task == "retrieval":
        kw["negative_all_rank"] = bool((data.get("train") or {}).get("negative_all_rank", True))
    return build_model(task, load_run_model_config(output_dir), tok, where=path, **kw)


def resolve_tag(output_dir: str, tag: Optional[str] = None) -> str:
    """The tag to read: `tag` if given (it must be committed), else the newest tag, which must be
    committed: a damaged or unfinished newest checkpoint is refused rather than silently passed
    over for an older one (name the older one with tag= / --tag to use it)."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    if not os.path.isfile(os.path.join(output_dir, "config.yaml")):
        raise FileNotFoundError(f"{output_dir} is not a training output directory (it has no config.yaml)")
    if tag is not None:
        problem = commit_problem(os.path.join(ckpt_dir, tag))
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise FileNotFoundError(f"no checkpoint {tag} in {ckpt_dir} (there are: "
                                    f"{', '.join(all_tags(ckpt_dir)) or 'none'})")
        if problem:
            raise ValueError(f"checkpoint {os.path.join(ckpt_dir, tag)} is damaged or incomplete: {problem}")
        return tag
    tags = all_tags(ckpt_dir)
    if not tags:
        raise FileNotFoundError(f"{output_dir} has no checkpoint yet (nothing in {ckpt_dir})")
    newest = tags[-1]
    problem = commit_problem(os.path.join(ckpt_dir, newest))
    if problem:
        good = find_latest(ckpt_dir)
        hint = (f"the newest intact one is {good}: pass --tag {good} (or tag={good}) to use it"
                if good else "there is no intact checkpoint")
        raise ValueError(f"the newest checkpoint {os.path.join(ckpt_dir, newest)} is damaged or incomplete "
                         f"({problem}); {hint}")
    return newest


def consolidated_state_dict(output_dir: str, tag: Optional[str] = None, model=None) -> Dict[str, torch.Tensor]:
    """The full state dict (blipfast layout, fp32 weights, int64 queue_ptr) of a committed
    checkpoint; loaded strictly into `model` (the run's model from config.yaml if None) to check it."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    tag = resolve_tag(output_dir, tag)
    sd = _ds_state_dict(ckpt_dir, tag)
    momentum = safe_load.load(os.path.join(ckpt_dir, tag, MOMENTUM_FILE))
    sd.update(momentum)  # fp32 EMA weights and queues, int64 queue_ptr
    if model is None:
        model = build_run_model(output_dir)
    want = model.state_dict()
    missing, unexpected = want.keys() - sd.keys(), sd.keys() - want.keys()
    if missing or unexpected:
        raise ValueError(f"checkpoint {tag} does not match the model: missing {sorted(missing)[:10]}, "
                         f"unexpected {sorted(unexpected)[:10]}")
    out = {}
    for k, v in want.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"checkpoint {tag}: {k} has shape {tuple(sd[k].shape)}, the model {tuple(v.shape)}")
        out[k] = sd[k].to(v.dtype)
    model.load_state_dict(out, strict=True)
    return out



# -- any checkpoint into a model ------------------------------------------------------------


def load_model(model: torch.nn.Module, path: str, init_from_pretrain: bool = False) -> torch.nn.Module:
    """Load a checkpoint file (weights under 'model', or a bare state dict), or a training run's
    output directory (its newest committed checkpoint), with `load_state`."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.yaml")):
        import contextlib
        import sys

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's zero_to_fp32 prints; stdout carries results
            sd = consolidated_state_dict(path)
        return load_state(model, sd, init_from_pretrain)
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a directory but not a training output directory (no config.yaml): "
                                f"give a weights file (.pth) or a run's train.output_dir")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = safe_load.load(path)  # weights only; an empty, truncated or foreign file is a ConfigError
    sd = obj["model"] if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) else obj
    return load_state(model, sd, init_from_pretrain)


def load_state(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], init_from_pretrain: bool = False):
    """Strict load with the official layout rules (`blipfast.convert`); with init_from_pretrain,
    keys the model does not have are ignored (a captioner or filter initialised from pre-training
    weights) and a retrieval model may lack its image-id queue."""
    from blipfast.convert import load_original_state_dict

    ignore, allow_missing = (), ()
    if init_from_pretrain:
        own = set(model.state_dict())
        # Keys the loader maps itself: LM-head aliases, position ids, and the queue pointer's two names.
        aliases = ("position_ids", "predictions.decoder.weight", "predictions.decoder.bias")
        if own & {"queue_ptr", "ptr_queue"}:
            aliases += ("queue_ptr", "ptr_queue")
        ignore = tuple(k for k in sd if k not in own and not k.endswith(aliases))
        allow_missing = ("idx_queue", "ptr_queue")
    return load_original_state_dict(model, sd, ignore_unexpected=ignore, allow_missing=allow_missing)


