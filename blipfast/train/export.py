"""Plain weights from a training checkpoint of any ZeRO stage and precision.

    python -m blipfast.train.export OUTPUT_DIR --out model.pth [--format blipfast|original|hf]
                                    [--tag step00001200] [--task captioning]

OUTPUT_DIR is a run's train.output_dir (config.yaml + checkpoints/) of any task (pretrain,
retrieval, caption, vqa: config.yaml's `task` picks the model); the newest checkpoint is
used unless --tag says otherwise; a damaged or unfinished newest checkpoint is an error (name an
older one with --tag), and the tag read is printed. A task run's export is what the evaluation CLIs read
(`python -m blipfast.eval.{retrieval,caption,vqa} ... eval.checkpoint=OUT`). The online weights come from DeepSpeed's
zero_to_fp32 utilities (fp32 master weights, gathered from every rank's partition), the momentum
encoders and queues from the checkpoint's own fp32 momentum.pt (zero_to_fp32 would return
frozen weights in the training dtype and the int64 queue_ptr as float32). The result is checked
key by key and shape by shape against a freshly built model before it is written.

Formats: blipfast (`torch.save({'model': state_dict})`, this package's names), original (the
official BLIP .pth layout via blipfast.convert.export_original_state_dict: loads into Salesforce's
code with strict=True), hf (a transformers BLIP directory via blipfast.convert.export_hf; a
pre-training run needs --task, a task run's model says which class it is; only that class's
modules are kept).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional

import torch

from blipfast.config import BlipConfig, from_dict, load_yaml

from . import checkpoint, safe_load


def _ds_state_dict(ckpt_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed tag. Every file is scanned first and read weights-only
    (safe_load): a checkpoint directory is untrusted input and must not run code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(ckpt_dir, tag)
    safe_load.check_files(safe_load.pickle_files(tag_dir))
    stage0 = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(stage0) or any(n.endswith("optim_states.pt") for n in os.listdir(tag_dir)):
        try:
            with safe_load.weights_only_loads():
                return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag))
        except safe_load.UnsafeCheckpointError:
            raise
        except (ValueError, FileNotFoundError, TypeError):  # deepspeed 0.19.8: TypeError on a stage-0 checkpoint
            if not os.path.isfile(stage0):
                raise
    # ZeRO stage 0 keeps the whole model in mp_rank_00_model_states.pt (zero_to_fp32 cannot read it)
    return {k: v.float() if v.is_floating_point() else v for k, v in safe_load.load(stage0)["module"].items()}


def load_run_model_config(output_dir: str) -> BlipConfig:
    path = os.path.join(output_dir, "config.yaml")
    data = load_yaml(path)
    if not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: no resolved model section (is this a train.output_dir?)")
    cfg = from_dict(BlipConfig, data["model"], where=f"{path}: model")
    cfg.validate(path)
    return cfg


def build_run_model(output_dir: str):
    """The model a run trained (its config.yaml's task and model; pre-training when no task)."""
    from blipfast.data import DataConfig, tokenizer_from_config

    from .tasks import get_task

    data = load_yaml(os.path.join(output_dir, "config.yaml"))
    task = get_task(data.get("task", "pretrain"), os.path.join(output_dir, "config.yaml"))
    tok = None
    if task.name in ("caption", "vqa"):  # their models keep the tokenizer (prompt, decoding)
        tok = tokenizer_from_config(from_dict(DataConfig, data.get("data") or {}, "data"))
    return task.build_model(load_run_model_config(output_dir), tok)


def resolve_tag(output_dir: str, tag: Optional[str] = None) -> str:
    """The tag to read: `tag` if given (it must be committed), else the newest tag, which must be
    committed: a damaged or unfinished newest checkpoint is refused rather than silently passed
    over for an older one (name the older one with tag= / --tag to use it)."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    if not os.path.isfile(os.path.join(output_dir, "config.yaml")):
        raise FileNotFoundError(f"{output_dir} is not a training output directory (it has no config.yaml)")
    if tag is not None:
        problem = checkpoint.commit_problem(os.path.join(ckpt_dir, tag))
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise FileNotFoundError(f"no checkpoint {tag} in {ckpt_dir} (there are: "
                                    f"{', '.join(checkpoint.all_tags(ckpt_dir)) or 'none'})")
        if problem:
            raise ValueError(f"checkpoint {os.path.join(ckpt_dir, tag)} is damaged or incomplete: {problem}")
        return tag
    tags = checkpoint.all_tags(ckpt_dir)
    if not tags:
        raise FileNotFoundError(f"{output_dir} has no checkpoint yet (nothing in {ckpt_dir})")
    newest = tags[-1]
    problem = checkpoint.commit_problem(os.path.join(ckpt_dir, newest))
    if problem:
        good = checkpoint.find_latest(ckpt_dir)
        hint = (f"the newest intact one is {good}: pass --tag {good} (or tag={good}) to use it"
                if good else "there is no intact checkpoint")
        raise ValueError(f"the newest checkpoint {os.path.join(ckpt_dir, newest)} is damaged or incomplete "
                         f"({problem}); {hint}")
    return newest


def consolidated_state_dict(output_dir: str, tag: Optional[str] = None, model=None) -> Dict[str, torch.Tensor]:
    """The full state dict (blipfast layout, fp32 weights, int64 queue_ptr) of a committed
    checkpoint; loaded strictly into `model` (the run's model from config.yaml if None) to check it."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    tag = resolve_tag(output_dir, tag)
    sd = _ds_state_dict(ckpt_dir, tag)
    momentum = safe_load.load(os.path.join(ckpt_dir, tag, checkpoint.MOMENTUM_FILE))
    sd.update(momentum)  # fp32 EMA weights and queues, int64 queue_ptr
    if model is None:
        model = build_run_model(output_dir)
    want = model.state_dict()
    missing, unexpected = want.keys() - sd.keys(), sd.keys() - want.keys()
    if missing or unexpected:
        raise ValueError(f"checkpoint {tag} does not match the model: missing {sorted(missing)[:10]}, "
                         f"unexpected {sorted(unexpected)[:10]}")
    out = {}
    for k, v in want.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"checkpoint {tag}: {k} has shape {tuple(sd[k].shape)}, the model {tuple(v.shape)}")
        out[k] = sd[k].to(v.dtype)
    model.load_state_dict(out, strict=True)
    return out


def export(output_dir: str, out: str, fmt: str = "blipfast", tag: Optional[str] = None,
           task: Optional[str] = None) -> str:
    from blipfast.models.blip import BlipForPretraining

    model = build_run_model(output_dir)
    sd = consolidated_state_dict(output_dir, tag, model)
    if fmt == "blipfast":
        torch.save({"model": sd}, out)
    elif fmt == "original":
        from blipfast.convert import export_original_state_dict

        torch.save({"model": export_original_state_dict(model)}, out)
    elif fmt == "hf":
        from blipfast.convert import export_hf

        if task is None and isinstance(model, BlipForPretraining):
            raise ValueError("--format hf needs --task (captioning, retrieval or vqa): a pre-training model has "
                             "the modules of several transformers BLIP classes")
        export_hf(model, out, task=task)
    else:
        raise ValueError(f"unknown format {fmt!r}: blipfast, original or hf")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m blipfast.train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", help="a run's train.output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="file to write (a directory for --format hf)")
    p.add_argument("--format", default="blipfast", choices=("blipfast", "original", "hf"))
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest one, which must be intact)")
    p.add_argument("--task", default=None, help="with --format hf: captioning, retrieval or vqa")
    a = p.parse_args(argv)
    try:
        parent = os.path.dirname(os.path.abspath(a.out))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"--out {a.out}: the directory {parent} does not exist")
        tag = resolve_tag(a.output_dir, a.tag)
        path = export(a.output_dir, a.out, a.format, tag, a.task)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported checkpoint {tag} of {a.output_dir} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
