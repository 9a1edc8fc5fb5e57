"""Reading checkpoint files without running code from them.

A pickle can name any Python callable (`os.system`, ...) and `torch.load(weights_only=False)`
calls it. A training output directory is user-supplied input (`--resume`, `train.init_from=DIR`,
`eval.checkpoint=DIR`, `python -m blipfast.train.export DIR`), so every read here is
`weights_only=True` with a short allowlist of the few non-tensor classes DeepSpeed's own files
hold (its ZeRO stage enum, loss scalers, fragment addresses) and the numpy arrays of the saved
RNG states. Nothing else is constructed.

Two layers:
- `check_files(paths)` scans each pickle (without loading it, `get_unsafe_globals_in_checkpoint`)
  and refuses one that names anything outside torch's defaults and the allowlist, naming the file
  and what it wanted; it runs on every file of a tag before DeepSpeed is handed the directory.
- `weights_only_loads()` makes every `torch.load` inside it weights-only (torch's documented
  `TORCH_FORCE_WEIGHTS_ONLY_LOAD` switch: it overrides DeepSpeed's explicit `weights_only=False`)
  with the allowlist active, so a file swapped after the scan still cannot run code.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import sys
import zipfile
from typing import Iterable, Iterator, List

import torch

from blipfast.config import ConfigError


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file is not a plain tensor file (it names other Python objects), or is unreadable."""


def _allowlist() -> List:
    import numpy as np

    out: List = [np.ndarray, np.dtype]
    try:
        out.append(np._core.multiarray._reconstruct)  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        out.append(np.core.multiarray._reconstruct)
    out.extend(type(np.dtype(t)) for t in ("uint32", "int64", "float64"))  # numpy 2's dtype classes
    if "deepspeed" not in sys.modules:
        # Only DeepSpeed's own files need its classes, and whoever reads them has imported it;
        # importing it here would print its accelerator banner in the evaluation CLIs.
        return out
    try:  # DeepSpeed's optimizer shards: the ZeRO stage, the loss scaler and fragment addresses
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out.extend([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address])
    except ImportError:  # pragma: no cover - deepspeed is in the [train] extra
        pass
    return out


def _names(objs: Iterable) -> set:
    out = set()
    for o in objs:
        mod = getattr(o, "__module__", None)
        name = getattr(o, "__qualname__", getattr(o, "__name__", None))
        if mod and name:
            out.add(f"{mod}.{name}")
    return out


def allowed_names() -> set:
    return _names(_allowlist())


def check_file(path: str) -> None:
    """Refuse `path` unless it is a torch zip file whose pickle names only tensors, containers,
    torch's default-safe globals and the allowlist. Nothing in it is executed."""
    if not os.path.isfile(path):
        raise UnsafeCheckpointError(f"{path}: not a regular file")
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{path}: not a torch checkpoint (torch.save zip format): empty, truncated or a raw pickle; "
            f"refusing to unpickle it")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # a damaged zip or pickle stream
        raise UnsafeCheckpointError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}: {e})") from None
    bad = sorted(set(unsafe) - allowed_names())
    if bad:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the file names Python objects that are not tensors ({', '.join(bad)}); "
            f"unpickling it could run arbitrary code. Only load checkpoints you produced yourself")


def check_files(paths: Iterable[str]) -> None:
    for p in paths:
        check_file(p)


def pickle_files(tag_dir: str) -> List[str]:
    """Every file of a checkpoint tag that torch.load would read (everything but the marker, JSON and scripts)."""
    out = []
    for root, _, names in os.walk(tag_dir):
        for n in sorted(names):
            if n.endswith((".pt", ".pth", ".bin")):
                out.append(os.path.join(root, n))
    return sorted(out)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load in this block is weights-only with the allowlist (DeepSpeed's included)."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_allowlist()):
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def load(path: str):
    """torch.load(path) on the CPU, weights-only with the allowlist; a clear error otherwise."""
    check_file(path)
    try:
        with weights_only_loads():
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UnsafeCheckpointError(f"{path}: cannot load it weights-only ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
