"""The run configuration of `train.py`: one YAML with `model`, `data`, `train` and `deepspeed`.

```yaml
task: pretrain                     # pretrain | retrieval | caption | vqa (blipfast/train/tasks.py)
model: configs/blip_tiny.yaml      # a model YAML (path) or an inline BlipConfig mapping
data: {format: synthetic, ...}     # blipfast.data.DataConfig
train: {epochs: 2, batch_size: 24, ...}   # TrainConfig below
deepspeed: configs/deepspeed/zero2.json   # ZeRO stage and its knobs
```

Loading is strict (an unknown key names the key and the file). `key=value` overrides use the
same dotted names (`train.lr=1e-4`, `model.vision.depth=2`, `data.synthetic.num_train=512`).
Batch size, gradient accumulation, clipping and precision are set here, once: the trainer writes
them into the DeepSpeed config, and a JSON that sets them to something else is an error.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import yaml

from blipfast.config import (BlipConfig, ConfigError, load_model_section, load_section,
                             load_yaml, resolve_path, split_sections)
from blipfast.atomic import atomic_write_text

PRECISIONS = ("fp32", "bf16", "fp16")
NAN_POLICIES = ("stop", "skip")
SCHEDULES = ("step", "cosine")


@dataclass
class EvalConfig:
    enabled: bool = True  # held-out retrieval recall + a few captions at the end of the run
    batch_size: int = 64  # images / texts per forward when computing features
    k_test: int = 0  # re-rank each query's top-k by the ITM head (the original: 256 COCO); 0 = ITC only
    num_captions: int = 5  # captions generated (greedy) for the first held-out images and printed
    max_caption_len: int = 20  # generated tokens at most (task caption: the prompt included, as the original)
    min_caption_len: int = 5  # task caption: generated tokens at least, the prompt included
    num_beams: int = 3  # task caption: beam search width (the original: 3)
    max_images: int = 0  # evaluate on at most this many held-out images (0 = all)
    vqa_inference: str = "rank"  # task vqa: rank (answer list, top k_test by first token; 0 = all) | generate
    max_answer_len: int = 10  # task vqa, generate: answer tokens at most, [DEC] included (the original: 10)

    def validate(self, where: str) -> None:
        if self.vqa_inference not in ("rank", "generate"):
            raise ConfigError(f"{where}: eval.vqa_inference must be rank or generate, got {self.vqa_inference!r}")
        for name in ("batch_size", "num_beams", "max_caption_len", "max_answer_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: eval.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("k_test", "num_captions", "max_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: eval.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    epochs: int = 20  # passes over the data (the original: 20)
    max_steps: int = 0  # stop after this many optimizer steps in all (0 = run every epoch)
    batch_size: int = 75  # images per rank per micro-batch (the original: 75 per GPU)
    grad_accum: int = 1  # micro-batches per optimizer step (each micro-batch still updates the
    #                      momentum encoders and the queue, as every forward of the original does)
    lr: float = 3e-4  # peak learning rate (the original's init_lr; 2e-4 for ViT-L)
    warmup_steps: int = 3000  # linear warmup from warmup_lr to lr, per optimizer step, epoch 0 only
    warmup_lr: float = 1e-6  # learning rate at step 0
    schedule: str = "step"  # after the warmup: step (pre-training: lr * lr_decay_rate ** epoch) or
    #                         cosine (fine-tuning: min_lr + (lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2)
    lr_decay_rate: float = 0.9  # from epoch 1 on: lr * lr_decay_rate ** epoch ...
    min_lr: float = 1e-6  # ... but never below min_lr
    weight_decay: float = 0.05  # AdamW weight decay (the original applies it to every parameter)
    wd_exclude_bias_norm: bool = False  # LAVIS's variant: no decay on biases, norms, other 1-d params
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas (torch defaults)
    adam_eps: float = 1e-8  # AdamW eps (torch default)
    alpha: float = 0.4  # momentum-distillation weight reached after the ramp
    alpha_ramp_epochs: float = 2.0  # alpha rises linearly from 0 over this many epochs (original: 2)
    negative_all_rank: bool = True  # task retrieval: ITM negatives from the world batch (COCO) or the rank's own (Flickr)
    grad_clip: float = 0.0  # global gradient-norm clipping; 0 = off (the original does not clip)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses DeepSpeed's dynamic loss scaling)
    activation_checkpointing: bool = False  # recompute ViT blocks in backward (memory for compute)
    seed: int = 42  # every rank seeds python/numpy/torch with seed + rank (as the original)
    output_dir: str = "output/pretrain"  # checkpoints, logs, TensorBoard, the resolved config
    log_every: int = 50  # print / log throughput every this many optimizer steps
    save_every_steps: int = 0  # also checkpoint every this many optimizer steps (0 = per epoch only)
    keep_last: int = 3  # committed checkpoints to keep (older ones are deleted); 0 = keep all
    nan_policy: str = "stop"  # non-finite loss: stop with a message, or skip the micro-batch
    progress_bar: bool = True  # tqdm bar on rank 0 (off when stdout is not a terminal, too)
    init_from: str = ""  # initial weights: a .pth (official / blipfast layout) or a pre-training output_dir
    init_optional: bool = False  # a missing init_from logs a line and trains from scratch (demo configs)
    eval: EvalConfig = field(default_factory=EvalConfig)  # end-of-run evaluation

    def validate(self, where: str) -> None:
        positive = ("epochs", "batch_size", "grad_accum", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "save_every_steps", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay", "grad_clip", "alpha", "alpha_ramp_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr_decay_rate <= 1:
            raise ConfigError(f"{where}: train.lr_decay_rate must be in (0, 1], got {self.lr_decay_rate}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"{where}: train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{where}: train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"{where}: train.nan_policy must be one of {', '.join(NAN_POLICIES)}, got {self.nan_policy!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}: train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        self.eval.validate(where)


@dataclass
class RunConfig:
    model: BlipConfig
    data: Any  # blipfast.data.DataConfig
    train: TrainConfig
    deepspeed: Dict[str, Any]  # the DeepSpeed config as loaded (before the trainer fills it in)
    source: str = ""  # the YAML it came from (for messages)
    deepspeed_path: str = ""  # the JSON it came from
    task: str = "pretrain"  # pretrain | retrieval | caption | vqa (blipfast/train/tasks.py)

    def to_dict(self) -> dict:
        """The resolved config as plain data (saved as output_dir/config.yaml); loads back as a run YAML."""
        return {
            "task": self.task,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "deepspeed": self.deepspeed_path,
        }

    def check_world(self, world_size: int) -> None:
        """Start-up checks that need the world size (run before any other work)."""
        if self.task == "caption":  # no queue, no in-batch negatives
            return
        global_batch = self.train.batch_size * world_size
        if self.model.queue_size % global_batch:
            raise ConfigError(
                f"{self.source}: model.queue_size {self.model.queue_size} is not a multiple of the global "
                f"batch {global_batch} (train.batch_size {self.train.batch_size} x world size {world_size}): "
                f"every micro-batch enqueues the features of all ranks. Pick a batch size (or queue size) "
                f"that divides it"
            )
        if self.train.batch_size < 2:
            raise ConfigError(f"{self.source}: train.batch_size must be >= 2 (hard negatives come from the same batch)")


TOP_KEYS = ("task", "model", "data", "train", "deepspeed")


def load_run_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """Load a run YAML strictly, apply dotted `overrides`, resolve the model YAML and DeepSpeed JSON."""
    from blipfast.data import DataConfig  # the data package owns its config

    raw = load_yaml(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    whole, by_top = split_sections(raw, overrides or {}, TOP_KEYS, path, required=("model", "data"))
    raw.update(whole)
    from .tasks import get_task

    task = str(raw.get("task", "pretrain"))
    get_task(task, f"{path}: task")  # an unknown task fails here

    # model: a path to a model YAML (or a run naming one) or an inline mapping
    model = load_model_section(raw["model"], base_dir, f"{path}: model", by_top["model"])
    data = load_section(DataConfig, raw["data"], by_top["data"], f"{path}: data")
    train = load_section(TrainConfig, raw.get("train"), by_top["train"], f"{path}: train", validate_where=path)

    ds_value = raw.get("deepspeed", "configs/deepspeed/zero2.json")
    if by_top["deepspeed"]:
        raise ConfigError("deepspeed overrides take a path (deepspeed=configs/deepspeed/zero3.json); "
                          "edit the JSON for ZeRO knobs")
    if isinstance(ds_value, Mapping):
        ds_path, ds = f"{path}: deepspeed", dict(ds_value)
    else:
        ds_path = resolve_path(str(ds_value), base_dir)
        if not os.path.isfile(ds_path):
            raise ConfigError(f"{path}: deepspeed config not found: {ds_value}")
        with open(ds_path) as f:
            try:
                ds = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{ds_path}: not valid JSON: {e}") from None
    if train.activation_checkpointing:
        model.vision.grad_checkpointing = True
    return RunConfig(model=model, data=data, train=train, deepspeed=ds, source=str(path), deepspeed_path=ds_path,
                     task=task)


# ---------------------------------------------------------------------------------------------
# DeepSpeed config: the YAML owns batch size, accumulation, clipping and precision

_AUTO = "auto"


def _set(ds: dict, key: str, value: Any, yaml_name: str, ds_path: str) -> None:
    have = ds.get(key, _AUTO)
    if have != _AUTO and have != value:
        raise ConfigError(
            f"{ds_path}: {key}={have!r} conflicts with {yaml_name}={value!r} in the run YAML; "
            f"remove it from the JSON (or write \"auto\"): the YAML sets it"
        )
    ds[key] = value


def build_deepspeed_config(run: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config dict handed to deepspeed.initialize, filled in from the run YAML."""
    ds = copy.deepcopy(run.deepspeed)
    t, where = run.train, run.deepspeed_path
    _set(ds, "train_micro_batch_size_per_gpu", t.batch_size, "train.batch_size", where)
    _set(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", where)
    _set(ds, "train_batch_size", t.batch_size * t.grad_accum * world_size,
         "train.batch_size x train.grad_accum x world size", where)
    # DeepSpeed >= 0.19.3 clips at 1.0 when the key is absent; the original BLIP never clips.
    _set(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", where)
    for name in ("bf16", "fp16"):
        block = dict(ds.get(name) or {})
        want = t.precision == name
        have = block.get("enabled", _AUTO)
        if have != _AUTO and bool(have) != want:
            raise ConfigError(
                f"{where}: {name}.enabled={have!r} conflicts with train.precision={t.precision!r}; "
                f"remove 'enabled' from the JSON (or write \"auto\"): the YAML sets the precision"
            )
        block["enabled"] = want
        ds[name] = block
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            f"{where}: remove the 'optimizer' / 'scheduler' blocks: the trainer builds AdamW with the "
            f"original's schedule from the train section of the run YAML"
        )
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero.get('stage')!r}")
    ds.setdefault("steps_per_print", 10 ** 9)  # the trainer prints its own progress
    return ds


def save_resolved(run: RunConfig, ds_config: dict, output_dir: str) -> None:
    """Write output_dir/config.yaml (the resolved run config; it loads back as a run YAML, with
    deepspeed.json beside it) and deepspeed_resolved.json (what DeepSpeed was given)."""
    os.makedirs(output_dir, exist_ok=True)
    resolved = run.to_dict()
    resolved["deepspeed"] = "deepspeed.json"
    atomic_write_text(os.path.join(output_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
    atomic_write_text(os.path.join(output_dir, "deepspeed.json"), json.dumps(run.deepspeed, indent=2))
    atomic_write_text(os.path.join(output_dir, "deepspeed_resolved.json"), json.dumps(ds_config, indent=2))





# ---------------------------------------------------------------------------------------------
# --resume: what may change between a run and its continuation

# Keys that change neither the math nor the data position: allowed on --resume (and logged).
RESUME_SAFE = ("train.max_steps", "train.log_every", "train.progress_bar", "train.save_every_steps",
               "train.keep_last", "train.nan_policy", "train.init_from", "train.init_optional",
               "train.output_dir", "train.eval.", "data.cache_dir", "deepspeed.")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _comparable(run: RunConfig) -> Dict[str, Any]:
    d = run.to_dict()
    d["deepspeed"] = run.deepspeed
    return _flatten(d)


def resume_changes(saved: RunConfig, new: RunConfig, saved_world: Optional[int], world: int):
    """(refused, allowed): "key: old -> new" strings. Refused changes alter the math or the data
    position (model shapes, queue, batch size, schedule, data, world size); allowed ones do not."""
    old, cur = _comparable(saved), _comparable(new)
    refused, allowed = [], []
    for key in sorted(old.keys() | cur.keys()):
        a, b = old.get(key, "<unset>"), cur.get(key, "<unset>")
        if a == b:
            continue
        line = f"{key}: {a} -> {b}"
        safe = key.startswith(RESUME_SAFE)
        if key == "train.epochs" and new.train.schedule == "step":
            safe = True  # the step schedule and the alpha ramp do not depend on the number of epochs
        if key == "deepspeed.zero_optimization.stage" and {a, b} != {1, 2}:
            safe = False  # stages 1 and 2 share DeepSpeed's checkpoint layout; 0 and 3 do not
            line += " (only ZeRO stages 1 and 2 can resume each other's checkpoints)"
        (allowed if safe else refused).append(line)
    if saved_world is not None and saved_world != world:
        refused.append(f"world size: {saved_world} -> {world} (the queue, the per-rank batches and the "
                       f"optimizer shards depend on it)")
    return refused, allowed
