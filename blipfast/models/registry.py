"""Task name -> model: the one place that maps what a run or checkpoint says it is to a class.

Used by the trainer's tasks, the run-directory reader (export, eval, CapFilt) and blipfast.load.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from blipfast.config import BlipConfig, ConfigError

TASKS = ("pretrain", "retrieval", "caption", "vqa")
NEEDS_TOKENIZER = ("caption", "vqa")  # they keep it: the prompt, decoding, answer lists


def _pretrain(config: BlipConfig, tokenizer=None, **kw):
    from .blip import BlipForPretraining

    return BlipForPretraining(config, **kw)


def _retrieval(config: BlipConfig, tokenizer=None, **kw):
    from .retrieval import BlipForRetrieval

    return BlipForRetrieval(config, **kw)


def _caption(config: BlipConfig, tokenizer=None, **kw):
    from .caption import BlipForCaptioning

    return BlipForCaptioning(config, tokenizer=tokenizer, **kw)


def _vqa(config: BlipConfig, tokenizer=None, **kw):
    from .vqa import BlipForVQA

    return BlipForVQA(config, tokenizer=tokenizer, **kw)


BUILDERS: Dict[str, Callable[..., Any]] = {"pretrain": _pretrain, "retrieval": _retrieval, "caption": _caption,
                                           "vqa": _vqa}


def build_model(task: str, config: BlipConfig, tokenizer=None, where: str = "", **kwargs):
    """The model of `task` (pretrain | retrieval | caption | vqa) built from `config`; caption and
    vqa need the tokenizer. Extra keyword arguments go to the model's constructor."""
    if task not in BUILDERS:
        raise ConfigError(f"{where + ': ' if where else ''}unknown task {task!r}; valid: {', '.join(TASKS)}")
    if task in NEEDS_TOKENIZER and tokenizer is None:
        raise ConfigError(f"{where + ': ' if where else ''}task {task} needs a tokenizer (for the prompt and decoding)")
    return BUILDERS[task](config, tokenizer, **kwargs)
