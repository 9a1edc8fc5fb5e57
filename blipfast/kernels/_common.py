"""Helpers every kernel family shares: whether Triton runs interpreted, where tensors may be, and
the CUDA device a launch runs on."""
from __future__ import annotations

import contextlib

import torch
import triton


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when triton.jit produced interpreter functions (TRITON_INTERPRET=1 set before triton
    was imported): the kernels then run on CPU tensors, one program after another."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


def check_device(t: torch.Tensor, what: str, who: str = "the Triton kernels") -> None:
    """ValueError unless `t` is where the kernels run: CUDA, or the CPU under the interpreter."""
    if t.device.type == "cuda":
        if interpreting():
            raise ValueError(f"{what} is on CUDA but TRITON_INTERPRET=1 runs kernels on the CPU")
    elif t.device.type != "cpu" or not interpreting():
        raise ValueError(f"{what} is on {t.device}; {who} need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")


def device_guard(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's (a no-op on the CPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
