"""`blipfast.load(path_or_dir, task=None)`: any BLIP checkpoint -> a ready `Predictor`.

The layout is read from the path (see `layouts.py`), the model class from the checkpoint's keys
(or `task`), the config from the checkpoint (shapes; HF's config.json; a run's config.yaml) and
the tokenizer's special ids. Weights go through the existing strict loaders:
`blipfast.convert.load_original_state_dict` (official / blipfast files), `blipfast.convert.load_hf`
(HF directories), `blipfast.train.export.consolidated_state_dict` (training output directories),
and `blipfast.capfilt.load_state(init_from_pretrain=True)` when a pre-training checkpoint is
loaded as a task model (its extra modules are dropped).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Mapping, Optional, Union

import torch

from blipfast.config import BlipConfig, from_dict, load_model_section, load_yaml
from blipfast.models.registry import build_model

from .layouts import (HF_ARCHITECTURES, LayoutError, canonical_task, check_task_fits, check_token_ids,
                      detect_layout, detect_task, file_layout, infer_config, read_weights_file)
from .predictor import Predictor

PathLike = Union[str, os.PathLike]


def load(path_or_dir: PathLike, task: Optional[str] = None, *, tokenizer: Any = None,
         config: Union[None, BlipConfig, PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
         device: Union[str, torch.device] = "cpu") -> Predictor:
    """Load a BLIP checkpoint of any layout and return a `Predictor` in eval mode on `device`.

    path_or_dir: an official BLIP .pth, a blipfast export (.pth), an HF BLIP directory
    (config.json + weights) or a training output directory (config.yaml + checkpoints/).
    task: pretrain | retrieval | caption | vqa (aliases: captioning, itm); None = the checkpoint's
    own. A pre-training checkpoint also loads as retrieval, caption or vqa (unused modules dropped).
    tokenizer: a tokenizer object, a BERT vocab.txt / directory, or 'demo' (the synthetic set's);
    None = tokenizer files beside the checkpoint, or the run's `data.tokenizer`.
    config: for .pth files, a BlipConfig or a model / run YAML or run directory; None = read
    from the weights' shapes (heads assume BLIP's 64-wide heads; other widths need config or
    overrides). overrides: dotted config keys, e.g. {'attention_backend': 'reference'}.
    """
    path = os.fspath(path_or_dir)
    want = canonical_task(task)
    layout = detect_layout(path)
    if layout == "run":
        if config is not None:
            raise LayoutError(f"{path} is a training output directory: its config.yaml is the config (drop config=)")
        model, tok, found = _load_run(path, want, tokenizer, overrides)
    elif layout == "hf":
        model, tok, found = _load_hf_dir(path, want, tokenizer, overrides)
    else:
        sd = read_weights_file(path)
        layout = file_layout(sd)
        if layout == "hf":
            raise LayoutError(f"{path} holds HF transformers BLIP weights (vision_model.*): load the directory "
                              f"holding it and its config.json instead")
        model, tok, found = _load_file(path, sd, want, tokenizer, config, overrides)
    return Predictor(model.to(device).eval(), tok, task=want or found, layout=layout, source=path)


# ---------------------------------------------------------------------------------------------
# tokenizer and model


def _tokenizer(tokenizer: Any, search_dirs=()) -> Any:
    from blipfast.data import load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer  # a tokenizer object
    if tokenizer is not None:
        return load_tokenizer(os.fspath(tokenizer))
    for d in search_dirs:
        if any(os.path.isfile(os.path.join(d, f)) for f in ("vocab.txt", "tokenizer.json")):
            return load_tokenizer(d)
    return None


def token_ids(tok) -> dict:
    """The special-token ids a BlipConfig needs, from a BLIP tokenizer."""
    ids = dict(pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
               dec_token_id=getattr(tok, "dec_token_id", None) or tok.convert_tokens_to_ids("[DEC]"),
               enc_token_id=getattr(tok, "enc_token_id", None) or tok.convert_tokens_to_ids("[ENC]"))
    unk = getattr(tok, "unk_token_id", None)
    absent = [k for k, v in ids.items() if v is None or (v == unk and k in ("dec_token_id", "enc_token_id"))]
    if absent:
        raise LayoutError(f"the tokenizer has no {', '.join(absent)}: use blipfast.data.load_tokenizer (adds [DEC], [ENC])")
    return ids


def _model_config(config: Union[BlipConfig, PathLike]) -> BlipConfig:
    """A BlipConfig from an object, a model YAML, a run YAML (its `model` section) or a run directory."""
    if isinstance(config, BlipConfig):
        return config
    return load_model_section(os.fspath(config), os.getcwd(), "config", {})


def _load_state(model, sd, same_task: bool):
    """Strict official-layout load; a pre-training checkpoint into a task model drops what it lacks."""
    if same_task:
        from blipfast.convert import load_original_state_dict

        return load_original_state_dict(model, sd)
    from blipfast.rundir import load_state

    return load_state(model, sd, init_from_pretrain=True)


def _load_file(path, sd, want, tokenizer, config, overrides):
    where = path
    found = detect_task(sd.keys(), where)
    task = want or found
    check_task_fits(task, sd.keys(), found, where)
    tok = _tokenizer(tokenizer, [os.path.dirname(os.path.abspath(path))])
    if config is None:
        if tok is None:
            raise LayoutError(
                f"{path}: no tokenizer found beside it; pass tokenizer= (a BERT vocab.txt or a directory holding "
                f"one, 'demo' for the synthetic dataset's vocabulary, or a tokenizer object)")
        cfg = infer_config(sd, token_ids(tok), where, overrides)
    else:
        cfg = _model_config(config)
        if overrides:
            from blipfast.config import apply_overrides

            cfg = from_dict(BlipConfig, apply_overrides(cfg.to_dict(), overrides, where), where)
            cfg.validate(where)
        if tok is not None:
            check_token_ids(cfg, token_ids(tok), where)
    model = build_model(task, cfg, tok)
    return _load_state(model, sd, task == found), tok, found


def _load_hf_dir(path, want, tokenizer, overrides):
    from blipfast.convert import load_hf
    from blipfast.convert.hf import blipfast_config_from_hf, read_hf_checkpoint

    sd, hf_cfg = read_hf_checkpoint(path)
    arch = (hf_cfg.get("architectures") or [None])[0]
    if arch not in HF_ARCHITECTURES:
        raise LayoutError(f"{path}: config.json architectures={hf_cfg.get('architectures')}; blipfast loads "
                          f"{', '.join(HF_ARCHITECTURES)}")
    found = HF_ARCHITECTURES[arch]
    if want not in (None, found):
        raise LayoutError(f"{path}: an HF {arch} checkpoint is a {found} model, not {want}")
    tok = _tokenizer(tokenizer, [path])
    if tok is None:
        raise LayoutError(f"{path}: no tokenizer files (vocab.txt / tokenizer.json); pass tokenizer=")
    ids = token_ids(tok)
    # HF configs carry no [CLS] / [ENC] ids (blipfast_config_from_hf's docstring); the tokenizer has them.
    # HF has no feature queues: a 1-column queue is enough for inference.
    over = {"text.cls_token_id": ids["cls_token_id"], "text.enc_token_id": ids["enc_token_id"], "queue_size": 1,
            **(overrides or {})}
    cfg = blipfast_config_from_hf(hf_cfg, overrides=over)
    check_token_ids(cfg, ids, path)
    model = build_model(found, cfg, tok)
    load_hf(model, sd, hf_config=hf_cfg, allow_known_hf_bugs=True)
    return model, tok, found


def _load_run(path, want, tokenizer, overrides):
    from blipfast.data import DataConfig, tokenizer_from_config
    from blipfast.rundir import consolidated_state_dict, load_run_model_config

    raw = load_yaml(os.path.join(path, "config.yaml"))
    found = canonical_task(raw.get("task", "pretrain"))
    task = want or found
    cfg = load_run_model_config(path)
    if overrides:
        from blipfast.config import apply_overrides

        cfg = from_dict(BlipConfig, apply_overrides(cfg.to_dict(), overrides, path), path)
    tok = _tokenizer(tokenizer)
    if tok is None:
        tok = tokenizer_from_config(from_dict(DataConfig, raw.get("data") or {}, f"{path}: data"))
    check_token_ids(cfg, token_ids(tok), path)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's zero_to_fp32 prints; stdout carries results
        if task == found:
            model = build_model(task, cfg, tok)
            consolidated_state_dict(path, model=model)  # loads the newest committed checkpoint into it
            return model, tok, found
        sd = consolidated_state_dict(path)
    check_task_fits(task, sd.keys(), found, path)
    return _load_state(build_model(task, cfg, tok), sd, False), tok, found
