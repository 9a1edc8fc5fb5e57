"""HF transformers BLIP <-> blipfast, strict.

blipfast's parameter names are the official BLIP checkpoint's. HF's conversion renamed only the
vision tower (`vision_model.*`); `text_encoder.*`, `text_decoder.*`, `vision_proj`, `text_proj` and
`itm_head` keep the official names. Three HF classes map onto blipfast task models:

  HF class                        blipfast task   top-level modules
  BlipForConditionalGeneration    captioning      visual_encoder, text_decoder
  BlipForImageTextRetrieval       retrieval       visual_encoder, text_encoder, vision_proj, text_proj, itm_head
  BlipForQuestionAnswering        vqa             visual_encoder, text_encoder, text_decoder

HF's config defaults that are wrong for BLIP (transformers 5.24; see blip_reference.md §7.2):
  * `text_config.num_attention_heads` defaults to 8; BLIP's BERT has 12 (old hub configs say 8);
  * `vision_config.layer_norm_eps` defaults to 1e-5; BLIP's ViT uses 1e-6;
  * `label_smoothing` defaults to 0.0; BLIP's LM loss always uses 0.1;
  * text dropout defaults to 0.0; BLIP trains with 0.1 (dropout does not change eval outputs).
HF also never inserts [ENC] (callers set the first token) and has no momentum encoders, queues
or temperature. And in transformers 5.24 the text cross-attention ignores `encoder_attention_mask`
(BlipTextAttention does not pass it on): HF's VQA answer decoder attends to padded question
tokens, the original and blipfast do not (found by tests/convert/test_hf_parity.py). `export_hf` writes BLIP-correct values; `load_hf` refuses a config whose numerics
differ from the model's (heads, eps, activation, widths, token ids) unless told otherwise.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from blipfast.config import BlipConfig, TextConfig, VisionConfig, apply_overrides, from_dict

from .original import CheckpointError


class HFConversionError(CheckpointError):
    """An HF checkpoint and a blipfast model do not correspond (keys, shapes or config).

    `missing`, `unexpected` and `mismatched` hold the offending keys (HF names)."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


# ---------------------------------------------------------------------------------------------
# key mapping

# (HF name under `vision_model.`, blipfast name under `visual_encoder.`); {i} = layer, {p} = weight|bias
_VISION_PAIRS = [
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.patch_embedding.{p}", "patch_embed.proj.{p}"),
    ("embeddings.position_embedding", "pos_embed"),
    ("encoder.layers.{i}.self_attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("encoder.layers.{i}.self_attn.projection.{p}", "blocks.{i}.attn.proj.{p}"),
    ("encoder.layers.{i}.layer_norm1.{p}", "blocks.{i}.norm1.{p}"),
    ("encoder.layers.{i}.layer_norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("encoder.layers.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("encoder.layers.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("post_layernorm.{p}", "norm.{p}"),
]
_HF_VISION, _BF_VISION = "vision_model.", "visual_encoder."
_PASSTHROUGH = ("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")
# HF ties these to the tensor on the right; blipfast stores only the right-hand one.
_TIED = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}
_POSITION_IDS = re.compile(r"(text_encoder|text_decoder\.bert)\.embeddings\.position_ids")
# What HF lacks and loading leaves as the model has it (queues, their pointers, temperature).
_KEPT_ON_LOAD = {"temp", "image_queue", "text_queue", "queue_ptr", "idx_queue", "ptr_queue"}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


_HF_TO_BF = [(_template_regex(hf), bf) for hf, bf in _VISION_PAIRS]
_BF_TO_HF = [(_template_regex(bf), hf) for hf, bf in _VISION_PAIRS]


def _rename(key: str, prefix: str, table, new_prefix: str) -> Optional[str]:
    rest = key[len(prefix):]
    for regex, template in table:
        m = regex.fullmatch(rest)
        if m:
            return new_prefix + template.format(**m.groupdict())
    return None


def hf_to_blipfast_key(key: str) -> Optional[str]:
    """The blipfast (official) name of an HF parameter, or None if it has none."""
    if key.startswith(_HF_VISION):
        return _rename(key, _HF_VISION, _HF_TO_BF, _BF_VISION)
    return key if key.startswith(_PASSTHROUGH) else None


def blipfast_to_hf_key(key: str) -> Optional[str]:
    """The HF name of a blipfast parameter, or None if HF has no such parameter."""
    if key.startswith(_BF_VISION):
        return _rename(key, _BF_VISION, _BF_TO_HF, _HF_VISION)
    return key if key.startswith(_PASSTHROUGH) else None


# ---------------------------------------------------------------------------------------------
# tasks

TASKS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "captioning": ("BlipForConditionalGeneration", ("visual_encoder", "text_decoder")),
    "retrieval": ("BlipForImageTextRetrieval",
                  ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head")),
    "vqa": ("BlipForQuestionAnswering", ("visual_encoder", "text_encoder", "text_decoder")),
}


def infer_task(model: torch.nn.Module) -> str:
    """captioning / retrieval / vqa from the model's top-level modules (official names)."""
    has = {name for name, _ in model.named_children()}
    if "text_decoder" in has and "text_encoder" not in has:
        return "captioning"
    if {"text_encoder", "itm_head"} <= has and "text_decoder" not in has:
        return "retrieval"
    if {"text_encoder", "text_decoder"} <= has and "itm_head" not in has:
        return "vqa"
    raise HFConversionError(
        f"cannot tell which HF class {type(model).__name__} corresponds to (modules: {sorted(has)}); "
        f"pass task= one of {sorted(TASKS)} (a pre-training model holds all three)"
    )


# ---------------------------------------------------------------------------------------------
# reading checkpoints and configs


def _load_weights_file(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf_checkpoint(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state dict, config.json dict or None) from an HF model directory or a single weights file.

    A directory holds model.safetensors, a sharded model.safetensors.index.json, pytorch_model.bin
    or pytorch_model.bin.index.json (looked for in that order)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return _load_weights_file(path), None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no HF checkpoint at {path} (expected a directory or a weights file)")
    cfg_path = os.path.join(path, "config.json")
    config = None
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if not name.endswith(".index.json"):
            return _load_weights_file(file), config
        with open(file) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: Dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load_weights_file(os.path.join(path, shard)))
        return state, config
    raise FileNotFoundError(
        f"{path} holds no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
        f"pytorch_model.bin.index.json"
    )


def _as_hf_config(config: Any):
    """A transformers BlipConfig (HF's own defaults filled in) from a dict, a path or a config."""
    from transformers import BlipConfig as HFBlipConfig

    if isinstance(config, HFBlipConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(path) as f:
            config = json.load(f)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected an HF BlipConfig, a config dict or a path, got {type(config).__name__}")
    if config.get("model_type", "blip") != "blip":
        raise HFConversionError(f"not a BLIP config: model_type={config.get('model_type')!r}")
    return HFBlipConfig.from_dict(dict(config))


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise HFConversionError(f"blipfast needs a square {name}, the HF config has {value}")
        value = value[0]
    return int(value)


def _is(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def blipfast_config_from_hf(config, *, faithful_to_hf: bool = False,
                            overrides: Optional[Mapping[str, Any]] = None) -> BlipConfig:
    """A blipfast BlipConfig from an HF BLIP config (a model directory, config.json, dict or object).

    faithful_to_hf=False (default): BLIP-correct where HF's defaults are known to be wrong: an
    8-head 768-wide text config becomes 12 heads, vision eps 1e-5 becomes 1e-6 (each with a
    warning), and label smoothing / dropout keep blipfast's BLIP values (0.1). Load such a model
    with `load_hf(..., allow_known_hf_bugs=True)`. faithful_to_hf=True: exactly the numerics HF
    runs with this config (also HF's label smoothing and dropout).
    `overrides`: dotted keys applied last, e.g. {"text.enc_token_id": 6} (HF configs have no
    [CLS] or [ENC] ids; blipfast's defaults, 101 and 30523, are those of the real vocabulary)."""
    hf = _as_hf_config(config)
    hv, ht = hf.vision_config, hf.text_config
    for where, act in (("vision_config", hv.hidden_act), ("text_config", ht.hidden_act)):
        if act != "gelu":
            raise HFConversionError(f"{where}.hidden_act={act!r}: BLIP (and blipfast) use exact GELU ('gelu')")
    mlp_ratio = hv.intermediate_size / hv.hidden_size
    if int(hv.hidden_size * mlp_ratio) != hv.intermediate_size:
        raise HFConversionError(f"vision intermediate_size {hv.intermediate_size} is not representable as "
                                f"hidden_size {hv.hidden_size} * mlp_ratio")
    vision = dict(image_size=_square(hv.image_size, "image_size"), patch_size=_square(hv.patch_size, "patch_size"),
                  width=hv.hidden_size, depth=hv.num_hidden_layers, num_heads=hv.num_attention_heads,
                  mlp_ratio=mlp_ratio, layer_norm_eps=hv.layer_norm_eps)
    text = dict(vocab_size=ht.vocab_size, hidden_size=ht.hidden_size, num_hidden_layers=ht.num_hidden_layers,
                num_attention_heads=ht.num_attention_heads, intermediate_size=ht.intermediate_size,
                max_position_embeddings=ht.max_position_embeddings, layer_norm_eps=ht.layer_norm_eps,
                pad_token_id=ht.pad_token_id, sep_token_id=ht.sep_token_id, dec_token_id=ht.bos_token_id)
    data: Dict[str, Any] = {"vision": vision, "text": text, "embed_dim": hf.image_text_hidden_size}
    if faithful_to_hf:
        text.update(hidden_dropout_prob=ht.hidden_dropout_prob,
                    attention_probs_dropout_prob=ht.attention_probs_dropout_prob)
        data["label_smoothing"] = ht.label_smoothing
    else:
        if ht.num_attention_heads == 8 and ht.hidden_size == 768:
            warnings.warn("HF config has text num_attention_heads=8 (HF's default, a known bug of old hub "
                          "configs); BLIP's BERT-base has 12: using 12", stacklevel=2)
            text["num_attention_heads"] = 12
        if _is(hv.layer_norm_eps, 1e-5):
            warnings.warn("HF config has vision layer_norm_eps=1e-5 (HF's default); BLIP's ViT uses 1e-6: "
                          "using 1e-6", stacklevel=2)
            vision["layer_norm_eps"] = 1e-6
    where = "HF config"
    if overrides:
        data = apply_overrides(data, overrides, where)
    cfg = from_dict(BlipConfig, data, where)
    cfg.validate(where)
    return cfg


def hf_config_from_blipfast(vision: VisionConfig, text: TextConfig, embed_dim: int, label_smoothing: float,
                            task: str):
    """A transformers BlipConfig with BLIP-correct values for `task` (12 heads stay 12, eps 1e-6,
    label smoothing 0.1 as the model has them)."""
    from transformers import BlipConfig as HFBlipConfig

    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if not vision.qkv_bias or vision.in_chans != 3:
        raise HFConversionError("HF's BLIP ViT always has a qkv bias and 3 input channels; this model "
                                f"has qkv_bias={vision.qkv_bias}, in_chans={vision.in_chans}")
    if task == "vqa" and vision.width != text.hidden_size:
        # HF gives the answer decoder's cross-attention the vision width, but it reads question states.
        raise HFConversionError(f"HF's BlipForQuestionAnswering needs vision width ({vision.width}) == text "
                                f"hidden_size ({text.hidden_size})")
    vision_cfg = dict(hidden_size=vision.width, intermediate_size=int(vision.width * vision.mlp_ratio),
                      num_hidden_layers=vision.depth, num_attention_heads=vision.num_heads,
                      image_size=vision.image_size, patch_size=vision.patch_size, hidden_act="gelu",
                      layer_norm_eps=vision.layer_norm_eps, attention_dropout=0.0)
    text_cfg = dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size, encoder_hidden_size=vision.width,
                    intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                    num_attention_heads=text.num_attention_heads,
                    max_position_embeddings=text.max_position_embeddings, hidden_act="gelu",
                    layer_norm_eps=text.layer_norm_eps, hidden_dropout_prob=text.hidden_dropout_prob,
                    attention_probs_dropout_prob=text.attention_probs_dropout_prob,
                    bos_token_id=text.dec_token_id, eos_token_id=text.sep_token_id,
                    pad_token_id=text.pad_token_id, sep_token_id=text.sep_token_id, is_decoder=True,
                    label_smoothing=label_smoothing, tie_word_embeddings=True)
    return HFBlipConfig(text_config=text_cfg, vision_config=vision_cfg, image_text_hidden_size=embed_dim,
                        label_smoothing=label_smoothing, architectures=[TASKS[task][0]])


# ---------------------------------------------------------------------------------------------
# the model's side


def _model_configs(model: torch.nn.Module) -> Tuple[VisionConfig, TextConfig, float, Optional[int]]:
    """(vision cfg, text cfg of the image-grounded tower, label smoothing, ITC width or None)."""
    if not hasattr(model, "visual_encoder"):
        raise HFConversionError(f"{type(model).__name__} has no `visual_encoder`: not a BLIP model")
    vision = model.visual_encoder.cfg
    tower = getattr(model, "text_encoder", None)
    if tower is None:
        tower = getattr(model, "text_decoder", None)
    if tower is None:
        raise HFConversionError(f"{type(model).__name__} has neither `text_encoder` nor `text_decoder`")
    cfg = getattr(model, "config", None)
    cfg = cfg if isinstance(cfg, BlipConfig) else None
    smoothing = cfg.label_smoothing if cfg is not None else BlipConfig.label_smoothing
    embed_dim = cfg.embed_dim if cfg is not None else None
    if hasattr(model, "vision_proj"):
        embed_dim = model.vision_proj.out_features
    return vision, tower.cfg, smoothing, embed_dim


def _config_mismatches(hf, vision: VisionConfig, text: TextConfig):
    """[(HF field, HF value, model value, is a known HF-default bug)] where numerics would differ."""
    hv, ht = hf.vision_config, hf.text_config
    checks = [
        ("vision_config.hidden_size", hv.hidden_size, vision.width),
        ("vision_config.intermediate_size", hv.intermediate_size, int(vision.width * vision.mlp_ratio)),
        ("vision_config.num_hidden_layers", hv.num_hidden_layers, vision.depth),
        ("vision_config.num_attention_heads", hv.num_attention_heads, vision.num_heads),
        ("vision_config.patch_size", _square(hv.patch_size, "patch_size"), vision.patch_size),
        ("vision_config.layer_norm_eps", hv.layer_norm_eps, vision.layer_norm_eps),
        ("vision_config.hidden_act", hv.hidden_act, "gelu"),
        ("text_config.vocab_size", ht.vocab_size, text.vocab_size),
        ("text_config.hidden_size", ht.hidden_size, text.hidden_size),
        ("text_config.intermediate_size", ht.intermediate_size, text.intermediate_size),
        ("text_config.num_hidden_layers", ht.num_hidden_layers, text.num_hidden_layers),
        ("text_config.num_attention_heads", ht.num_attention_heads, text.num_attention_heads),
        ("text_config.max_position_embeddings", ht.max_position_embeddings, text.max_position_embeddings),
        ("text_config.layer_norm_eps", ht.layer_norm_eps, text.layer_norm_eps),
        ("text_config.hidden_act", ht.hidden_act, "gelu"),
        ("text_config.encoder_hidden_size", ht.encoder_hidden_size, text.encoder_width),
        ("text_config.pad_token_id", ht.pad_token_id, text.pad_token_id),
        ("text_config.sep_token_id", ht.sep_token_id, text.sep_token_id),
        ("text_config.bos_token_id ([DEC])", ht.bos_token_id, text.dec_token_id),
    ]
    out = []
    for name, theirs, ours in checks:
        same = _is(theirs, ours) if isinstance(ours, float) else theirs == ours
        if not same:
            known = (name == "text_config.num_attention_heads" and theirs == 8 and ours == 12) or (
                name == "vision_config.layer_norm_eps" and _is(theirs, 1e-5) and _is(ours, 1e-6))
            out.append((name, theirs, ours, known))
    return out


def check_hf_config(model: torch.nn.Module, hf_config, allow_known_hf_bugs: bool = False) -> None:
    """Raise HFConversionError if the HF config's numerics differ from the model's.

    allow_known_hf_bugs: accept (with a warning) an HF config that has HF's BLIP-wrong defaults
    (8 text heads, vision eps 1e-5) where the model has BLIP's values (12, 1e-6): the weights are
    BLIP's, and blipfast computes as the original code does."""
    vision, text, _, _ = _model_configs(model)
    bad = _config_mismatches(_as_hf_config(hf_config), vision, text)
    if allow_known_hf_bugs:
        for name, theirs, ours, _ in (b for b in bad if b[3]):
            warnings.warn(f"HF config {name}={theirs} is HF's BLIP-wrong default; using the model's {ours}",
                          stacklevel=3)
        bad = [b for b in bad if not b[3]]
    if not bad:
        return
    lines = [f"  {name}: HF {theirs!r} vs blipfast {ours!r}" + ("  (HF's BLIP-wrong default)" if known else "")
             for name, theirs, ours, known in bad]
    hint = ""
    if any(b[3] for b in bad):
        hint = ("\nHF's defaults of 8 text heads and vision eps 1e-5 are known bugs: weights converted from "
                "BLIP were trained with 12 heads and eps 1e-6. If that is this checkpoint, pass "
                "allow_known_hf_bugs=True (blipfast keeps BLIP's values); to reproduce HF's numerics build the "
                "model from blipfast_config_from_hf(path, faithful_to_hf=True).")
    raise HFConversionError("the HF config does not match the blipfast model:\n" + "\n".join(lines) + hint
                            + "\n(check_config=False skips this check; shapes are still checked)")


# ---------------------------------------------------------------------------------------------
# load


def _convert_hf_state_dict(hf_sd: Mapping[str, torch.Tensor]):
    """-> ({blipfast key: (HF key, tensor)}, unexpected HF keys, errors)."""
    out: Dict[str, Tuple[str, torch.Tensor]] = {}
    unexpected, errors = [], []
    for key, t in hf_sd.items():
        if _POSITION_IDS.fullmatch(key):
            # Non-persistent in HF 5; older files saved it. blipfast uses positions 0..L-1.
            if not torch.equal(t.reshape(-1), torch.arange(t.numel(), dtype=t.dtype, device=t.device)):
                errors.append(f"{key} is not 0..{t.numel() - 1}: blipfast uses absolute positions from 0")
            continue
        if key in _TIED:
            target = _TIED[key]
            if target in hf_sd:
                if hf_sd[target].shape != t.shape or not torch.equal(hf_sd[target], t):
                    errors.append(f"{key} differs from {target}: blipfast ties them (the LM head is the word "
                                  f"embedding matrix), so this checkpoint cannot be represented")
                continue
            key_bf = target  # only the tied copy was saved: it is the canonical tensor
        else:
            key_bf = hf_to_blipfast_key(key)
        if key_bf is None:
            unexpected.append(key)
        else:
            out[key_bf] = (key, t)
    return out, unexpected, errors


def load_hf(model: torch.nn.Module, path_or_state_dict, *, hf_config=None, check_config: bool = True,
            allow_known_hf_bugs: bool = False) -> torch.nn.Module:
    """Load an HF transformers BLIP checkpoint into a blipfast model, strictly; returns the model.

    path_or_state_dict: an HF model directory (config.json + model.safetensors, sharded or not,
    or pytorch_model.bin), a single weights file, or a state dict in HF names. hf_config: the HF
    config for a state dict (a directory's own config.json is used otherwise). With a config and
    check_config, numerics-relevant fields must match the model (see `check_hf_config`).

    Every model key must come from the checkpoint and every checkpoint key must land in the model,
    with the same shape, else HFConversionError lists the missing, unexpected and mismatched keys.
    Exceptions, which HF lacks: momentum copies (`*_m.*`) are initialised from the loaded online
    weights, as the original does at construction; feature queues, their pointers and `temp` keep
    the model's current values. A position table for another image size is interpolated (bicubic,
    CLS kept) as the official loader does. The tied `cls.predictions.decoder.*` must equal the
    tensors they are tied to."""
    if isinstance(path_or_state_dict, Mapping):
        hf_sd, file_config = dict(path_or_state_dict), None
    else:
        hf_sd, file_config = read_hf_checkpoint(path_or_state_dict)
    hf_config = hf_config if hf_config is not None else file_config
    if hf_config is not None and check_config:
        check_hf_config(model, hf_config, allow_known_hf_bugs)

    converted, unexpected, errors = _convert_hf_state_dict(hf_sd)
    target = model.state_dict()
    unexpected += [hf_key for bf_key, (hf_key, _) in converted.items() if bf_key not in target]
    new: Dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for key, current in target.items():
        head, _, rest = key.partition(".")
        if key in converted:
            hf_key, t = converted[key]
            if key == "visual_encoder.pos_embed" and t.ndim == 3 and t.shape[-1] == current.shape[-1]:
                from blipfast.models.vit import interpolate_pos_embed

                t = interpolate_pos_embed(t, current.shape[1] - 1)
            if t.shape != current.shape:
                mismatched.append(
                    f"{hf_key}: checkpoint {tuple(t.shape)} vs model {key} {tuple(current.shape)}")
            new[key] = t
        elif head.endswith("_m") and f"{head[:-2]}.{rest}" in converted:
            continue  # momentum copy: filled from the online weight below
        elif key in _KEPT_ON_LOAD:
            new[key] = current
        else:
            hf_name = blipfast_to_hf_key(key) or "(no HF name)"
            missing.append(f"{hf_name}  (blipfast {key})")
    for key in target:
        head, _, rest = key.partition(".")
        if key not in new and head.endswith("_m") and f"{head[:-2]}.{rest}" in new:
            new[key] = new[f"{head[:-2]}.{rest}"]
    errors += _shared_weight_conflicts(model, new)
    if missing or unexpected or mismatched or errors:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", mismatched), ("other", errors)):
            if items:
                parts.append(f"{len(items)} {title}:\n    " + "\n    ".join(sorted(items)))
        arch = file_config.get("architectures") if file_config else None
        where = f" (checkpoint architectures: {arch})" if arch else ""
        raise HFConversionError(
            f"HF checkpoint does not fit {type(model).__name__}{where}:\n  " + "\n  ".join(parts),
            missing, unexpected, mismatched)
    model.load_state_dict(new, strict=True)
    return model


def _shared_weight_conflicts(model: torch.nn.Module, new: Mapping[str, torch.Tensor]) -> List[str]:
    """Keys that are one tensor in the model (shared weights) must get equal values."""
    groups = defaultdict(list)
    for key, t in model.state_dict(keep_vars=True).items():
        groups[id(t)].append(key)
    errors = []
    for keys in groups.values():
        keys = [k for k in keys if k in new]  # absent ones are reported as missing already
        if len(keys) > 1 and any(not torch.equal(new[keys[0]], new[k]) for k in keys[1:]):
            errors.append(f"the model shares one tensor among {keys}, but the checkpoint gives them "
                          f"different values")
    return errors


# ---------------------------------------------------------------------------------------------
# export


def export_hf(model: torch.nn.Module, path: Union[str, os.PathLike], task: Optional[str] = None) -> str:
    """Write `path/config.json` + `path/model.safetensors` for transformers' BLIP class of `task`.

    task: captioning (BlipForConditionalGeneration), retrieval (BlipForImageTextRetrieval) or vqa
    (BlipForQuestionAnswering); inferred from the model's modules when None (a pre-training model
    needs it). Only the task's modules are written: momentum copies, queues and `temp` have no
    HF counterpart. The config is BLIP-correct (the model's heads and eps, its label smoothing).
    The tied LM-head weights are not stored (HF ties them on load). Returns the directory."""
    task = task or infer_task(model)
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    modules = TASKS[task][1]
    absent = [m for m in modules if not hasattr(model, m)]
    if absent:
        raise HFConversionError(f"{type(model).__name__} has no {absent}: cannot export it as {TASKS[task][0]}")
    vision, text, smoothing, embed_dim = _model_configs(model)
    hf_config = hf_config_from_blipfast(vision, text, embed_dim or BlipConfig.embed_dim, smoothing, task)

    tensors: Dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key.partition(".")[0] not in modules:
            continue
        hf_key = blipfast_to_hf_key(key)
        if hf_key is None:
            raise HFConversionError(f"blipfast parameter {key} has no HF counterpart")
        # Own contiguous CPU copies: safetensors refuses tensors that share memory.
        tensors[hf_key] = t.detach().to("cpu", copy=True).contiguous()

    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    hf_config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path
