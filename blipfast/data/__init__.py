"""Data for blipfast: BLIP annotation JSON and webdataset shards, vetted, sharded by rank, decoded
and augmented by DALI (GPU or CPU) or by PIL, plus the embedded synthetic dataset and tokenizers.

    from blipfast.data import DataConfig, build_pretrain_loader, build_eval_set
"""
from .captions import pre_caption, pre_question
from .config import DataConfig, DataError, SyntheticConfig
from .loader import EvalSet, PretrainLoader, build_eval_set, build_pretrain_loader
from .synthetic import DEMO_WORDS, SyntheticData, generate_synthetic
from .tokenizer import build_demo_tokenizer, load_tokenizer, tokenize


def tokenizer_from_config(cfg: DataConfig):
    """The tokenizer named by `cfg.tokenizer`: 'demo' or a local BERT vocab file / directory."""
    return build_demo_tokenizer() if cfg.tokenizer == "demo" else load_tokenizer(cfg.tokenizer)


__all__ = [
    "DEMO_WORDS",
    "DataConfig",
    "DataError",
    "EvalSet",
    "PretrainLoader",
    "SyntheticConfig",
    "SyntheticData",
    "build_demo_tokenizer",
    "build_eval_set",
    "build_pretrain_loader",
    "generate_synthetic",
    "load_tokenizer",
    "pre_caption",
    "pre_question",
    "tokenize",
    "tokenizer_from_config",
]
