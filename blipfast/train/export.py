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
from typing import Optional

import torch

from blipfast.rundir import (build_run_model, consolidated_state_dict, load_run_model_config,  # noqa: F401
                             resolve_tag)


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
