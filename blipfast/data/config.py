"""Data configuration: the `data:` section of a run YAML, loaded strictly (unknown keys are errors)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping

from blipfast.config import ConfigError, from_dict


class DataError(ConfigError):
    """The data cannot be used: a missing file or root, an empty or malformed annotation, no valid image."""


@dataclass
class SyntheticConfig:
    out_dir: str = "data/synthetic"  # where the generated dataset lives (generated once, then reused)
    num_train: int = 2000  # train images
    num_val: int = 200  # held-out images (retrieval chance level = 1 / num_val)
    seed: int = 0  # generation seed
    image_size: int = 64  # side of the generated JPEGs, in pixels
    reader: str = "json"  # read the generated data through its annotation JSON or its webdataset shards


@dataclass
class VqaDataConfig:
    """Task vqa's data (blipfast/data/vqa.py); with format synthetic, empty paths mean the
    synthetic dataset's questions (vqa_train.json, vqa_val.json, answer_list.json)."""

    train_files: List[str] = field(default_factory=list)  # the original's vqa_train/vqa_val/vg_qa JSONs
    image_root: str = ""  # root of the "image" paths of dataset "vqa" entries (the original's vqa_root)
    vg_image_root: str = ""  # root of dataset "vg" entries' images (the original's vg_root)
    eval_file: str = ""  # held-out questions (vqa_test.json layout; "answer" lists give accuracy)
    eval_image_root: str = ""  # root of the held-out images ("" = image_root)
    answer_list: str = ""  # JSON list of candidate answers (the original's answer_list.json)
    max_question_words: int = 50  # pre_question truncation (the original's default)
    max_question_len: int = 35  # question tokens at most, [ENC] and [SEP] included (the original: 35)
    max_answer_len: int = 12  # answer tokens at most when tokenised ([DEC] ... [SEP])


@dataclass
class DataConfig:
    format: str = "synthetic"  # json | webdataset | synthetic
    ann_files: List[str] = field(default_factory=list)  # BLIP annotation JSONs: lists of {image, caption}
    image_root: str = ""  # root the JSON image paths are relative to ("" = each JSON file's folder)
    shards: List[str] = field(default_factory=list)  # webdataset tars; globs and {000..123} ranges allowed
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # the embedded default dataset
    eval_ann_file: str = ""  # held-out annotation JSON ({image, caption: str | list}); synthetic: its val split
    eval_image_root: str = ""  # root of the held-out images ("" = image_root)
    max_words: int = 30  # pre_caption truncation (30 in BLIP pre-training)
    min_scale: float = 0.5  # random resized crop: smallest crop area fraction
    max_scale: float = 1.0  # random resized crop: largest crop area fraction
    hflip: bool = True  # random horizontal flip (p = 0.5); turn off when captions say left/right
    rand_augment: bool = True  # BLIP's RandomAugment(2, 5) (identity, autocontrast, equalize, shear, translate, rotate)
    backend: str = "dali"  # dali | torch (PIL + numpy, no DALI needed)
    decode: str = "auto"  # dali decoding: auto (GPU 'mixed' when CUDA is present) | cpu | mixed
    num_threads: int = 2  # decoding / augmentation threads per rank
    tokenizer: str = "demo"  # 'demo' (the synthetic vocabulary) or a BERT vocab.txt / tokenizer directory
    check_images: str = "decode"  # how images are vetted before DALI sees them: decode (full) | header (fast)
    cache_dir: str = "auto"  # where image checks are cached: auto (~/.cache/blipfast/data) | none | a path
    allow_outside_root: bool = False  # annotation image paths may leave image_root ("..", absolute paths, symlinks)
    max_image_bytes: int = 64 * 1024 * 1024  # larger image files are skipped (never read in full)
    vqa: VqaDataConfig = field(default_factory=VqaDataConfig)  # task vqa's questions and answers

    def validate(self, where: str = "data") -> None:
        def bad(msg):
            raise ConfigError(f"{where}: {msg}")

        if self.format not in ("json", "webdataset", "synthetic"):
            bad(f"format must be json, webdataset or synthetic, got {self.format!r}")
        if self.format == "json" and not self.ann_files and not self.vqa.train_files:
            bad("format 'json' needs ann_files (a list of BLIP annotation JSON files), or vqa.train_files for task vqa")
        if self.format == "webdataset" and not self.shards:
            bad("format 'webdataset' needs shards (tar paths or globs)")
        if self.synthetic.reader not in ("json", "webdataset"):
            bad(f"synthetic.reader must be json or webdataset, got {self.synthetic.reader!r}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            bad(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale} and {self.max_scale}")
        if self.backend not in ("dali", "torch"):
            bad(f"backend must be dali or torch, got {self.backend!r}")
        if self.decode not in ("auto", "cpu", "mixed"):
            bad(f"decode must be auto, cpu or mixed, got {self.decode!r}")
        if self.check_images not in ("decode", "header"):
            bad(f"check_images must be decode or header, got {self.check_images!r}")
        if self.max_image_bytes < 1:
            bad(f"max_image_bytes must be at least 1, got {self.max_image_bytes}")
        if self.num_threads < 1:
            bad(f"num_threads must be at least 1, got {self.num_threads}")
        if self.max_words < 1:
            bad(f"max_words must be at least 1, got {self.max_words}")
        for name in ("max_question_words", "max_question_len", "max_answer_len"):
            if getattr(self.vqa, name) < (1 if name == "max_question_words" else 3):
                bad(f"vqa.{name} is too small: {getattr(self.vqa, name)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "data") -> "DataConfig":
        cfg = from_dict(cls, data, where)
        cfg.validate(where)
        return cfg
