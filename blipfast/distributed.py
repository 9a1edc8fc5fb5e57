"""torch.distributed helpers shared by the models, the loss backends and the trainer.

Every helper is the identity (or rank 0 of 1) when torch.distributed is not initialised, so the
same model code runs in one process, under torchrun and under DeepSpeed.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["rank_world", "concat_all_gather", "all_gather_with_grad"]


def rank_world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) per rank -> (world * n, ...), rank-major, no gradient."""
    world = rank_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        rank, world = rank_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's rows
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) per rank -> (world * n, ...), rank-major; the backward sends each rank the sum of
    every rank's gradient for its own rows."""
    if rank_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)
