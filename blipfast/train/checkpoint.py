"""Atomic, resumable checkpoints on top of DeepSpeed's `save_checkpoint` / `load_checkpoint`.

Layout of `output_dir/checkpoints/`:
    step00001200/            one tag per save (global optimizer step)
        (DeepSpeed's files)  model states, ZeRO optimizer shards, zero_to_fp32.py
        momentum.pt          the fp32 momentum encoders, queues and queue_ptr (rank 0 writes it)
        rank{r}.pt           rank r's RNG states (python, numpy, torch, accelerator)
        COMMITTED            written last, by rank 0, after a barrier: JSON manifest of the files
    latest_good              the newest committed tag (atomic rename), for humans and tools

DeepSpeed writes its own files in place and its `latest` pointer without waiting for the other
ranks, so a crash while saving can leave a torn tag. Here a tag counts only once its COMMITTED
marker exists and every file the manifest lists has the recorded size; `find_latest` ignores the
rest, and a later save of the same tag first deletes the torn one. A committed tag is never
deleted before a newer one is committed (saving a committed step again keeps it as it is).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_torch_save, atomic_write_text, fsync_dir
from ..distributed import rank_world
from .. import safe_load

# The layout and its read-only side live in blipfast.rundir (shared with export, eval, CapFilt).
from ..rundir import (COMMITTED, LATEST, MOMENTUM_FILE, TAG_PREFIX, _manifest, all_tags,  # noqa: F401
                      commit_problem, committed_tags, find_latest, is_committed, read_meta)


class CheckpointWriteError(RuntimeError):
    """A checkpoint cannot be written (the directory vanished, became a file, is read-only or full)."""


def _writable(ckpt_dir: str) -> None:
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint in {ckpt_dir}: {e.strerror or e}") from None
    if not os.access(ckpt_dir, os.W_OK | os.X_OK):
        raise CheckpointWriteError(f"cannot write checkpoint in {ckpt_dir}: permission denied")


def tag_for(global_step: int) -> str:
    return f"{TAG_PREFIX}{global_step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- RNG ---------------------------------------------------------------------------------------


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- save / load -------------------------------------------------------------------------------


def save(engine, ckpt_dir: str, global_step: int, meta: Dict, momentum_state: Dict, keep_last: int) -> str:
    """Save a checkpoint on every rank (all ranks must call this); returns the tag.

    meta: small JSON-able training position (epoch, batch, global step, ...), also handed to
    DeepSpeed as client_state. Order: DeepSpeed files + own files on every rank -> barrier ->
    rank 0 writes COMMITTED (manifest) and latest_good -> prune -> barrier."""
    tag = tag_for(global_step)
    tag_dir = os.path.join(ckpt_dir, tag)
    rank = rank_world()[0]
    _writable(ckpt_dir)  # every rank, before any collective: all of them stop with the same message
    if is_committed(tag_dir):
        # This step is already committed (a periodic save, then the end-of-epoch one): keep it. Both
        # positions resume identically, and deleting it first would leave nothing if killed meanwhile.
        _barrier()
        return tag
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(tag_dir):  # a torn save of the same step (never committed): start clean
            shutil.rmtree(tag_dir)
    _barrier()
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"blipfast": meta}, save_latest=False)
        atomic_torch_save({"rng": rng_state(), "meta": meta}, os.path.join(tag_dir, f"rank{rank}.pt"))
        if rank == 0:
            atomic_torch_save(momentum_state, os.path.join(tag_dir, MOMENTUM_FILE))
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint {tag_dir}: {e.strerror or e} (the newest committed "
                                   f"checkpoint, {find_latest(ckpt_dir)}, is intact)") from None
    _barrier()  # every rank's files are on disk
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        missing = [f"rank{r}.pt" for r in range(world) if not os.path.isfile(os.path.join(tag_dir, f"rank{r}.pt"))]
        if missing:
            raise RuntimeError(f"checkpoint {tag_dir}: files of other ranks are not visible here: {missing} "
                               f"(the output directory must be on a filesystem every rank shares)")
        fsync_dir(tag_dir)
        atomic_write_text(os.path.join(tag_dir, COMMITTED),
                          json.dumps({"tag": tag, "meta": meta, "world_size": world, "files": _manifest(tag_dir)}))
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
        prune(ckpt_dir, keep_last, newest=tag)
    _barrier()
    return tag


def prune(ckpt_dir: str, keep_last: int, newest: str) -> None:
    """Keep the newest `keep_last` committed tags; delete older committed ones and torn ones
    older than `newest` (torn tags newer than it cannot exist: saves are sequential)."""
    committed = committed_tags(ckpt_dir)
    doomed = committed[:-keep_last] if keep_last > 0 else []
    for t in os.listdir(ckpt_dir):
        full = os.path.join(ckpt_dir, t)
        if t.startswith(TAG_PREFIX) and os.path.isdir(full) and t < newest and t not in committed:
            doomed.append(t)
    for t in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def load(engine, ckpt_dir: str, tag: str) -> Dict:
    """Load tag into the engine (model, optimizer) on every rank; returns {'meta', 'momentum', 'rng'}.
    The caller restores the momentum state and, last, the RNG state."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if not is_committed(tag_dir):
        raise RuntimeError(f"checkpoint {tag_dir} is not committed (incomplete save): refusing to load it")
    safe_load.check_files(safe_load.pickle_files(tag_dir))  # before DeepSpeed sees any of it
    with safe_load.weights_only_loads():
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rank = rank_world()[0]
    own = os.path.join(tag_dir, f"rank{rank}.pt")
    if not os.path.isfile(own):
        raise RuntimeError(f"checkpoint {tag_dir} has no {os.path.basename(own)}: it was saved with fewer "
                           f"ranks than this run has; resume with the same world size")
    rank_state = safe_load.load(own)
    momentum = safe_load.load(os.path.join(tag_dir, MOMENTUM_FILE))
    return {"meta": read_meta(ckpt_dir, tag), "momentum": momentum, "rng": rank_state["rng"]}
