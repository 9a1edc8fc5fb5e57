"""Atomic file writes: the one helper every writer in blipfast uses.

A file is written under a temporary name beside its real one (unique to this process), flushed
and fsynced, then renamed over the real name, and the directory is fsynced: a crash at any point
leaves either the old file or the new one under the real name, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import IO, Iterator

__all__ = ["atomic_open", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "fsync_dir"]


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """`with atomic_open(path, "wb") as f: ...`: `path` appears, whole, only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str, obj, **dump_kwargs) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **dump_kwargs)


def atomic_torch_save(obj, path: str) -> None:
    import torch  # here, so that the data and eval writers do not need torch to import this

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
