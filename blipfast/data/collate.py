"""Batch transforms applied as the loader yields, before the training step sees a batch.

* `PromptCollate`: captioning trains on "a picture of " + caption. The prompt's tokens are
  inserted after [CLS] of already-tokenised captions (token level, so any loader works; the
  result equals tokenising prompt + caption whenever the caption was not truncated).
* `MappedLoader`: a loader whose every batch goes through such a transform; everything else
  (len, num_samples, stats, ...) is the wrapped loader's.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator

import torch


def prompt_token_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(P - 1,) int64: the prompt's word-piece ids, without [CLS] and [SEP]."""
    ids = tokenizer([prompt]).input_ids[0]
    return torch.as_tensor(ids[1:-1], dtype=torch.int64)


def insert_prompt(ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor):
    """[CLS] c... [SEP] pad -> [CLS] prompt c... [SEP] pad: (B, L) -> (B, L + P - 1)."""
    B, n = ids.shape[0], prompt.numel()
    p = prompt.to(device=ids.device, dtype=ids.dtype).expand(B, n)  # (B, P - 1)
    ids = torch.cat([ids[:, :1], p, ids[:, 1:]], dim=1)
    mask = torch.cat([mask[:, :1], mask.new_ones(B, n), mask[:, 1:]], dim=1)
    return ids, mask


class PromptCollate:
    """batch -> batch with the prompt inserted into input_ids / attention_mask."""

    def __init__(self, tokenizer, prompt: str):
        if tokenizer is None:
            raise ValueError("inserting a caption prompt needs the tokenizer the captions were tokenised with")
        self.prompt = prompt
        self.ids = prompt_token_ids(tokenizer, prompt)

    def __call__(self, batch: Dict) -> Dict:
        ids, mask = insert_prompt(batch["input_ids"], batch["attention_mask"], self.ids)
        return {**batch, "input_ids": ids, "attention_mask": mask}

    def __repr__(self) -> str:
        return f"PromptCollate({self.prompt!r}, {self.ids.numel()} tokens)"


class MappedLoader:
    """`loader` with `fn` applied to every batch of `epoch()`; other attributes pass through."""

    def __init__(self, loader, fn: Callable[[Dict], Dict]):
        self.loader, self.fn = loader, fn

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Dict]:
        return map(self.fn, self.loader.epoch(epoch, start_step))

    def __getattr__(self, name):  # only called for names this wrapper lacks
        if name in ("loader", "fn"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
