"""BLIP's momentum encoders and feature queues under DeepSpeed: fp32, replicated, outside the engine.

DeepSpeed casts every parameter of the module it wraps to bf16/fp16, and ZeRO-3 partitions
every parameter, frozen ones included; an EMA kept in bf16 loses most small updates, and an EMA
written into ZeRO-3 partitions is silently wrong (ENVIRONMENT.md). So before the engine is built
the momentum encoders and queues are detached from the model (`detach_momentum`): they live in
an fp32 container that DeepSpeed never sees, identical on every rank (same initial weights, same
updates, queues filled from all-gathered features). The trainer runs the EMA itself before each
forward; under ZeRO-3 it reads the online weights inside `GatheredParameters` (read-only).
Under bf16/fp16 the momentum forward runs under autocast from the fp32 weights.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


def momentum_model_kwargs(task, zero_stage: int) -> dict:
    """What the trainer builds a momentum model with (constructor arguments, so nothing patches the
    model afterwards): the EMA update runs in the trainer (MomentumState), under ZeRO-3 inside a
    read-only gather of the partitioned online weights, and hard-negative sampling does not raise
    on non-finite similarities (every rank must finish its forward; the trainer's all-reduced
    check decides)."""
    if not task.has_momentum:
        return {}
    kw = {"update_momentum_in_forward": False, "nonfinite_negatives": "next"}
    if zero_stage == 3:
        import deepspeed

        # modifier_rank=None: nothing of the online weights is written, so nothing is broadcast back
        kw["momentum_context"] = lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return kw


class MomentumState:
    """Owns the detached EMA state of a BlipForPretraining (call before deepspeed.initialize)."""

    def __init__(self, model: nn.Module, zero_stage: int, device: torch.device):
        self.model = model
        self.module = model.detach_momentum().float().to(device)
        if model.update_momentum_in_forward:
            raise ValueError("MomentumState runs the EMA update itself: build the model with "
                             "momentum_model_kwargs(task, zero_stage)")

    def broadcast_from_rank0(self) -> None:
        """Make every rank's copy identical to rank 0's (DeepSpeed broadcasts only what it wraps)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                dist.broadcast(t.data, src=0)

    @torch.no_grad()
    def update(self) -> None:
        """theta_m <- m theta_m + (1 - m) theta, in fp32, before the forward (as the original)."""
        self.model.momentum_update()

    # -- undoing one micro-batch's enqueue (nan_policy=skip) -----------------------------------

    def _ptr(self) -> torch.Tensor:  # pre-training names it queue_ptr, retrieval ptr_queue
        m = self.module
        return m.queue_ptr if hasattr(m, "queue_ptr") else m.ptr_queue

    def _queues(self):
        return [getattr(self.module, k) for k in ("image_queue", "text_queue", "idx_queue") if hasattr(self.module, k)]

    def snapshot_queue(self, n: int) -> Tuple[int, list]:
        """Copy the n queue columns the next enqueue will overwrite (cheap: E x n per queue)."""
        ptr = int(self._ptr()[0])
        return ptr, [q[:, ptr:ptr + n].clone() for q in self._queues()]

    @torch.no_grad()
    def restore_queue(self, snap: Tuple[int, list]) -> None:
        ptr, saved = snap
        for q, s in zip(self._queues(), saved):
            q[:, ptr:ptr + s.shape[1]] = s
        self._ptr()[0] = ptr

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        own = self.module.state_dict()
        missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
        if missing or unexpected:
            raise RuntimeError(f"momentum state does not match the model: missing {sorted(missing)[:8]}, "
                               f"unexpected {sorted(unexpected)[:8]}")
        for k, v in own.items():
            if sd[k].shape != v.shape:
                raise RuntimeError(f"momentum state {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}")
            v.copy_(sd[k])  # keeps the container's dtypes (fp32, int64 queue_ptr)


class NoMomentum:
    """The momentum interface for a task without momentum encoders (captioning): does nothing."""

    def broadcast_from_rank0(self) -> None:
        pass

    def update(self) -> None:
        pass

    def snapshot_queue(self, n: int) -> None:
        return None

    def restore_queue(self, snap) -> None:
        pass

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        if sd:
            raise RuntimeError(f"the checkpoint has momentum state ({sorted(sd)[:4]}...) but this task has none")


def register_zero3_external_params(model: nn.Module) -> None:
    """Parameters the top-level forward reads directly (not through their module's forward):
    ZeRO-3 must gather them with the top-level module. The LM loss multiplies by the tied word
    embeddings and adds `cls.predictions.bias` outside any submodule's forward."""
    import deepspeed

    dec = model.text_decoder
    for p in (dec.output_weight, dec.cls.predictions.bias):
        deepspeed.zero.register_external_parameter(model, p)


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 runs compute under autocast so the fp32 momentum encoders run in low precision
    too; the engine's own weights are already low precision."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
