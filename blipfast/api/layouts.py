"""What a checkpoint is, read from its files and keys: layout, task and architecture.

Four layouts reach `blipfast.load`:

  layout      what it is                                          how it is recognised
  official    Salesforce's BLIP .pth (weights under 'model')      a file; official names; 0-dim `temp`,
                                                                  `position_ids` or LM-head aliases
  blipfast    `python -m blipfast.train.export --format blipfast`  a file; official names, none of the above
  hf          an HF transformers BLIP directory                  config.json + model.safetensors / .bin
  run         a training output directory                         config.yaml + checkpoints/

The task comes from the top-level modules (official names), as the model classes define them:

  task        modules
  pretrain    visual_encoder, text_encoder, text_decoder, itm_head (+ momentum copies, queues)
  retrieval   visual_encoder, text_encoder, itm_head, vision_proj, text_proj (no text_decoder)
  caption     visual_encoder, text_decoder (no text_encoder)
  vqa         visual_encoder, text_encoder, text_decoder (no itm_head)

A state dict carries every width and depth but not the number of attention heads: `infer_config`
reads the shapes and takes the heads from the released BLIP models' 64-wide heads, refusing
widths no released model has (pass a config then).
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Dict, Mapping, Optional, Set

import torch

from blipfast.config import BlipConfig, ConfigError, apply_overrides, from_dict

TASKS = ("pretrain", "retrieval", "caption", "vqa")
TASK_ALIASES = {"pretrain": "pretrain", "pretraining": "pretrain", "feature_extractor": "pretrain",
                "retrieval": "retrieval", "itm": "retrieval", "caption": "caption", "captioning": "caption",
                "vqa": "vqa"}
# The modules each task model must find in a checkpoint (beyond these it may hold more).
REQUIRED: Dict[str, Set[str]] = {
    "pretrain": {"visual_encoder", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"},
    "retrieval": {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"},
    "caption": {"visual_encoder", "text_decoder"},
    "vqa": {"visual_encoder", "text_encoder", "text_decoder"},
}
# HF class (config.json "architectures") -> task.
HF_ARCHITECTURES = {"BlipForConditionalGeneration": "caption", "BlipForImageTextRetrieval": "retrieval",
                    "BlipForQuestionAnswering": "vqa"}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
HEAD_DIM = 64  # every released BLIP: ViT-B/16 768/12, ViT-L/16 1024/16, BERT-base 768/12
RELEASED_VISION_WIDTHS = (768, 1024)
RELEASED_TEXT_WIDTHS = (768,)


class LayoutError(ValueError):
    """A path is not a checkpoint blipfast can load, or not for the task asked for."""


def canonical_task(task: Optional[str]) -> Optional[str]:
    if task is None:
        return None
    key = task.lower().replace("-", "_")
    if key not in TASK_ALIASES:
        raise LayoutError(f"unknown task {task!r}: use one of {', '.join(TASKS)} (or captioning, itm)")
    return TASK_ALIASES[key]


def top_modules(keys) -> Set[str]:
    return {k.partition(".")[0] for k in keys}


def detect_layout(path: str) -> str:
    """'run', 'hf', or 'file' (a weights file: official or blipfast, told apart by `file_layout`)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isdir(os.path.join(path, "checkpoints")):
            return "run"
        if os.path.isfile(os.path.join(path, "config.json")) and any(
                os.path.isfile(os.path.join(path, f)) for f in HF_WEIGHT_FILES):
            return "hf"
        listing = sorted(os.listdir(path))[:12]
        raise LayoutError(
            f"{path} is a directory but neither a training output directory (config.yaml + checkpoints/) nor an "
            f"HF BLIP directory (config.json + one of {', '.join(HF_WEIGHT_FILES)}); it holds {listing}")
    if os.path.isfile(path):
        return "file"
    raise FileNotFoundError(f"no checkpoint at {path}")


def read_weights_file(path: str) -> Mapping[str, torch.Tensor]:
    """A state dict from a .pth / .bin (weights under 'model', or bare) or a .safetensors file.
    torch.load runs with weights_only=True: no arbitrary Python object is ever unpickled."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).splitlines() or [""])[0]
        if "weights only" in str(e).lower():
            raise LayoutError(f"{path} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
                              f"({first}); blipfast.load never unpickles arbitrary objects") from None
        raise LayoutError(f"{path} is not a torch checkpoint ({first})") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:  # truncated or foreign files
        raise LayoutError(f"{path} is not a torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # the official files and blipfast exports: {'model': state_dict, ...}
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    found = f"a dict with keys {list(obj)[:10]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise LayoutError(f"{path} holds {found}, not a state dict (or one under 'model')")


def file_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """'hf' (vision_model.* names), 'official' or 'blipfast' for a state dict read from a file."""
    if any(k.startswith("vision_model.") for k in sd):
        return "hf"
    official_marks = any(k.endswith(("embeddings.position_ids", "cls.predictions.decoder.weight")) for k in sd)
    temp = sd.get("temp")
    if official_marks or (temp is not None and temp.ndim == 0):
        return "official"
    return "blipfast"


def detect_task(keys, where: str) -> str:
    """The task whose model holds exactly these top-level modules (see the module docstring)."""
    has = top_modules(keys)
    enc, dec, itm = "text_encoder" in has, "text_decoder" in has, "itm_head" in has
    if "visual_encoder" in has:
        if enc and dec and itm:
            return "pretrain"
        if enc and itm and not dec:
            return "retrieval"
        if dec and not enc:
            return "caption"
        if enc and dec and not itm:
            return "vqa"
    raise LayoutError(
        f"{where}: its top-level modules {sorted(has)[:16]} match no blipfast model "
        + "; ".join(f"{t}: {', '.join(sorted(REQUIRED[t]))}" for t in TASKS)
        + ("" if "cls_head" not in has else " (an NLVR checkpoint? blipfast has no NLVR model)"))


def check_task_fits(task: str, keys, found_task: str, where: str) -> None:
    """Raise when the checkpoint lacks modules the requested task's model needs."""
    missing = REQUIRED[task] - top_modules(keys)
    if missing:
        raise LayoutError(
            f"{where}: task {task!r} needs {', '.join(sorted(REQUIRED[task]))}, but this is a {found_task} "
            f"checkpoint without {', '.join(sorted(missing))}; load it with task={found_task!r} (or None)")


# ---------------------------------------------------------------------------------------------
# architecture from shapes


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(found) + 1 if found else 0


def _heads(width: int, released, what: str, where: str) -> int:
    if width not in released:
        raise LayoutError(
            f"{where}: the number of {what} attention heads is not stored in the weights, and width {width} is not "
            f"a released BLIP width ({', '.join(map(str, released))}, {HEAD_DIM}-wide heads); pass config= (a model "
            f"YAML, a training output directory or a BlipConfig) or overrides={{'vision.num_heads': ..., "
            f"'text.num_attention_heads': ...}}")
    return width // HEAD_DIM


def infer_config(sd: Mapping[str, torch.Tensor], token_ids: Mapping[str, int], where: str,
                 overrides: Optional[Mapping] = None) -> BlipConfig:
    """A BlipConfig from an official-layout state dict's shapes plus the tokenizer's special ids.

    overrides: dotted keys applied before the head check (e.g. {'vision.num_heads': 4})."""
    overrides = dict(overrides or {})
    try:
        patch = sd["visual_encoder.patch_embed.proj.weight"]  # (W, 3, p, p)
        pos = sd["visual_encoder.pos_embed"]  # (1, 1 + g * g, W)
    except KeyError as e:
        raise LayoutError(f"{where}: no {e.args[0]}: not a BLIP vision tower") from None
    W, chans, p = patch.shape[0], patch.shape[1], patch.shape[2]
    grid = round((pos.shape[1] - 1) ** 0.5)
    if grid * grid != pos.shape[1] - 1:
        raise LayoutError(f"{where}: pos_embed {tuple(pos.shape)} is not a square grid plus a CLS row")
    fc1 = sd["visual_encoder.blocks.0.mlp.fc1.weight"]  # (hidden, W)
    vision = dict(image_size=grid * p, patch_size=p, width=W, depth=_count(sd, "visual_encoder.blocks."),
                  mlp_ratio=fc1.shape[0] / W, qkv_bias="visual_encoder.blocks.0.attn.qkv.bias" in sd, in_chans=chans)
    tower = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in sd else "text_decoder.bert."
    words = sd[tower + "embeddings.word_embeddings.weight"]  # (V, C)
    C = words.shape[1]
    cross = sd[tower + "encoder.layer.0.crossattention.self.key.weight"]  # (C, encoder width)
    text = dict(vocab_size=words.shape[0], hidden_size=C, num_hidden_layers=_count(sd, tower + "encoder.layer."),
                intermediate_size=sd[tower + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=sd[tower + "embeddings.position_embeddings.weight"].shape[0],
                encoder_width=cross.shape[1], **token_ids)
    data: dict = {"vision": vision, "text": text}
    if "vision_proj.weight" in sd:
        data["embed_dim"] = sd["vision_proj.weight"].shape[0]
    # Inference never reads the queues: keep the file's length, or a 1-column queue when it has none.
    data["queue_size"] = sd["image_queue"].shape[1] if "image_queue" in sd else 1
    data = apply_overrides(data, overrides, where)
    if "num_heads" not in data["vision"]:
        data["vision"]["num_heads"] = _heads(W, RELEASED_VISION_WIDTHS, "vision", where)
    if "num_attention_heads" not in data["text"]:
        data["text"]["num_attention_heads"] = _heads(C, RELEASED_TEXT_WIDTHS, "text", where)
    try:
        cfg = from_dict(BlipConfig, data, where)
        cfg.validate(where)
    except ConfigError as e:
        raise LayoutError(str(e)) from None
    return cfg


def check_token_ids(cfg: BlipConfig, token_ids: Mapping[str, int], where: str) -> None:
    """The config's special-token ids must be the tokenizer's."""
    bad = [f"{k}: config {getattr(cfg.text, k)} vs tokenizer {v}" for k, v in token_ids.items()
           if getattr(cfg.text, k) != v]
    if bad:
        raise LayoutError(f"{where}: the model config and the tokenizer disagree on special tokens ("
                          + "; ".join(bad) + "): is this the checkpoint's tokenizer?")


__all__ = ["LayoutError", "TASKS", "canonical_task", "detect_layout", "detect_task", "file_layout",
           "infer_config", "read_weights_file", "check_task_fits", "check_token_ids"]
