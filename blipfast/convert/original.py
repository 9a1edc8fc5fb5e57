"""The official BLIP checkpoint layout (Salesforce's `.pth` files) <-> blipfast, strict both ways.

blipfast's parameter names are the official ones, so loading is a copy after a few layout rules:

* `temp` is 0-dim in the file and 1-dim in blipfast (DeepSpeed cannot initialise 0-dim
  parameters);
* `visual_encoder.pos_embed` / `visual_encoder_m.pos_embed` are interpolated (bicubic, CLS row
  kept) when the checkpoint was trained at another image size;
* `*.embeddings.position_ids` buffers are dropped (they must be `arange`, which blipfast uses);
* `*cls.predictions.decoder.weight` / `.decoder.bias` are aliases of the tied word embeddings and
  of `cls.predictions.bias`: they must equal what they alias and are dropped;
* tensors a model shares between modules (pre-training ties the decoder's embeddings,
  cross-attention and feed-forward to the encoder's) appear under every name in the file; all
  copies present must be equal;
* the retrieval files name the queue pointer `ptr_queue`, pre-training `queue_ptr`: the file's
  name is mapped to whichever the model has.

Anything else that does not line up (missing keys, unexpected keys, shape mismatches) raises
`CheckpointError` listing every offending key. Works for any module whose state_dict uses the
official names (pre-training, retrieval, captioning, VQA models).
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, Iterable, List, Mapping, MutableMapping

import torch
import torch.nn as nn

from blipfast.models.vit import interpolate_pos_embed

__all__ = [
    "CheckpointError",
    "export_original_state_dict",
    "load_original_checkpoint",
    "load_original_state_dict",
]

POSITION_IDS = "embeddings.position_ids"
LM_DECODER_WEIGHT = "cls.predictions.decoder.weight"
LM_DECODER_BIAS = "cls.predictions.decoder.bias"
QUEUE_PTR_NAMES = ("queue_ptr", "ptr_queue")  # pre-training / LAVIS, and BLIP's retrieval model


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (missing / unexpected keys, shapes, inconsistent aliases)."""


def _fmt(keys: Iterable[str], limit: int = 60) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _parts(model: nn.Module) -> List[nn.Module]:
    """The model, plus the container of its momentum encoders and queues when a trainer moved
    them out of the module tree (`detach_momentum()`): the official layout holds both."""
    holder = model.__dict__.get("_momentum_state")
    return [model] + ([holder] if isinstance(holder, nn.Module) else [])


def _state_dict(model: nn.Module, keep_vars: bool = False) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for part in _parts(model):
        out.update(part.state_dict(keep_vars=keep_vars))
    return out


def _alias_groups(model: nn.Module) -> List[List[str]]:
    """State-dict names that refer to the same tensor object (module sharing), in name order."""
    by_obj: Dict[int, List[str]] = {}
    for name, t in _state_dict(model, keep_vars=True).items():
        by_obj.setdefault(id(t), []).append(name)
    return [names for names in by_obj.values() if len(names) > 1]


def _is_temp(name: str) -> bool:
    return name == "temp" or name.endswith(".temp")


def _drop_position_ids(sd: MutableMapping[str, torch.Tensor], problems: List[str]) -> None:
    for key in [k for k in sd if k.endswith(POSITION_IDS)]:
        ids = sd.pop(key)
        # blipfast always uses positions 0..L-1; a file with other position ids would change results.
        expected = torch.arange(ids.shape[-1], dtype=ids.dtype, device=ids.device).expand_as(ids)
        if not torch.equal(ids, expected):
            problems.append(f"{key} is not arange({ids.shape[-1]}) (blipfast always uses positions 0..L-1)")


def _resolve_lm_aliases(sd: MutableMapping[str, torch.Tensor], problems: List[str]) -> None:
    """decoder.weight aliases bert.embeddings.word_embeddings.weight; decoder.bias aliases bias."""
    for key in [k for k in sd if k.endswith(LM_DECODER_WEIGHT) or k.endswith(LM_DECODER_BIAS)]:
        stem = key[: -len(LM_DECODER_WEIGHT)] if key.endswith(LM_DECODER_WEIGHT) else key[: -len(LM_DECODER_BIAS)]
        target = stem + ("bert.embeddings.word_embeddings.weight" if key.endswith(LM_DECODER_WEIGHT)
                         else "cls.predictions.bias")
        value = sd.pop(key)
        if target not in sd:
            sd[target] = value  # only the alias was saved: it is the tensor itself
        elif sd[target].shape != value.shape or not torch.equal(sd[target], value):
            problems.append(
                f"{key} differs from {target}, which it must equal (blipfast ties the LM head's "
                f"output weight to the word embeddings and its bias to cls.predictions.bias)"
            )


def _map_queue_ptr(sd: MutableMapping[str, torch.Tensor], model_keys: Iterable[str]) -> None:
    model_keys = set(model_keys)
    file_name = [n for n in QUEUE_PTR_NAMES if n in sd]
    model_name = [n for n in QUEUE_PTR_NAMES if n in model_keys]
    if len(file_name) == 1 and len(model_name) == 1 and file_name != model_name:
        sd[model_name[0]] = sd.pop(file_name[0])


def _check_aliases(sd: MutableMapping[str, torch.Tensor], groups: List[List[str]], problems: List[str]) -> None:
    """Every copy of a shared tensor present in the file must be equal; fill absent copies."""
    for names in groups:
        present = [n for n in names if n in sd]
        if not present:
            continue  # reported as missing below
        first = sd[present[0]]
        for other in present[1:]:
            if sd[other].shape != first.shape or not torch.equal(sd[other], first):
                problems.append(
                    f"{other} differs from {present[0]}, but this model shares one tensor between them"
                )
        for n in names:
            sd.setdefault(n, first)


def _prefixed(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def load_original_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore_unexpected: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
) -> nn.Module:
    """Strictly load an official-layout BLIP state dict into `model` (in place; returns it).

    ignore_unexpected / allow_missing: key prefixes (or exact keys) to drop from the file or to
    leave at the model's values, for deliberate partial loads such as initialising a VQA model
    from pre-training weights (`ignore_unexpected=("visual_encoder_m", "text_encoder_m", ...)`).
    Everything else must match; otherwise `CheckpointError` lists every problem.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    ignore_unexpected, allow_missing = tuple(ignore_unexpected), tuple(allow_missing)
    target = _state_dict(model)
    sd: Dict[str, torch.Tensor] = {k: v for k, v in state_dict.items() if not _prefixed(k, ignore_unexpected)}
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"state dict entries that are not tensors: {_fmt(not_tensors)}")

    problems: List[str] = []
    _drop_position_ids(sd, problems)
    _resolve_lm_aliases(sd, problems)
    _map_queue_ptr(sd, target.keys())
    _check_aliases(sd, _alias_groups(model), problems)

    shape_errors = []
    for key in sd.keys() & target.keys():
        want, have = target[key].shape, sd[key].shape
        if want == have:
            continue
        if _is_temp(key) and have.numel() == 1 and want.numel() == 1:
            sd[key] = sd[key].reshape(want)  # 0-dim in the file, 1-dim in blipfast
        elif key.endswith("pos_embed") and len(have) == 3 and len(want) == 3 and have[2] == want[2]:
            try:
                sd[key] = interpolate_pos_embed(sd[key], want[1] - 1)  # (1, 1 + n, C) -> (1, 1 + n', C)
            except ValueError as e:
                shape_errors.append(f"{key}: {e}")
        else:
            shape_errors.append(f"{key}: file {tuple(have)} vs model {tuple(want)}")

    missing = [k for k in target if k not in sd and not _prefixed(k, allow_missing)]
    unexpected = [k for k in sd if k not in target]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if shape_errors:
        problems.append(f"shape mismatches ({len(shape_errors)}): " + "; ".join(sorted(shape_errors)))
    if problems:
        raise CheckpointError(
            f"the checkpoint does not fit {type(model).__name__}:\n  - " + "\n  - ".join(problems)
        )
    # Allowed-missing keys keep the model's values: load them back as they are.
    for part in _parts(model):
        part.load_state_dict({k: sd.get(k, v) for k, v in part.state_dict().items()}, strict=True)
    return model


def export_original_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """`model.state_dict()` in the official layout, so the original code's
    `load_state_dict(strict=True)` accepts it: 0-dim `temp`, `embeddings.position_ids` buffers,
    the LM head's `decoder.weight` / `decoder.bias` aliases, shared tensors under every prefix."""
    sd = _state_dict(model)  # shared modules already appear under each of their names
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _is_temp(key) and value.numel() == 1:
            value = value.reshape(())
        out[key] = value
        suffix = "embeddings.position_embeddings.weight"
        if key.endswith(suffix):
            n = value.shape[0]
            # The original registers arange(max_positions) expanded to (1, L): int64.
            out[key[: -len(suffix)] + POSITION_IDS] = torch.arange(n, device=value.device)[None]
    for key in [k for k in sd if k.endswith("cls.predictions.bias")]:
        stem = key[: -len("cls.predictions.bias")]
        word = stem + "bert.embeddings.word_embeddings.weight"
        if word not in sd:
            raise CheckpointError(f"{key} has no word embeddings at {word} to tie the LM head to")
        out[stem + LM_DECODER_WEIGHT] = sd[word]
        out[stem + LM_DECODER_BIAS] = sd[key]
    return out


def _read_checkpoint(path: str, weights_only: bool) -> Mapping[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects that torch.load(weights_only=True) refuses ({e}). If you "
            f"trust the file, pass weights_only=False."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # empty, truncated or not a torch file
        raise CheckpointError(f"{path} is not a readable torch checkpoint (empty, truncated or another format): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return obj["model"]  # training checkpoints: {'model', 'optimizer', 'config', 'epoch'}
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    keys = list(obj)[:10] if isinstance(obj, Mapping) else None
    raise CheckpointError(
        f"{path} is neither a state dict nor a dict with the weights under 'model' "
        f"(got {type(obj).__name__}" + (f" with keys {keys}" if keys is not None else "") + ")"
    )


def load_original_checkpoint(model: nn.Module, path: str | os.PathLike, *, weights_only: bool = True,
                             ignore_unexpected: Iterable[str] = (), allow_missing: Iterable[str] = ()
                             ) -> nn.Module:
    """Read an official `.pth` file (weights under 'model', or a bare state dict) on the CPU and
    load it strictly with `load_original_state_dict`. Returns the model."""
    sd = _read_checkpoint(os.fspath(path), weights_only)
    return load_original_state_dict(model, sd, ignore_unexpected=ignore_unexpected, allow_missing=allow_missing)
