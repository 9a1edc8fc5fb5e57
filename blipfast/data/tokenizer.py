"""BLIP's tokenizer: BERT uncased WordPiece plus [DEC] (bos) and [ENC], built from local files only.

Every text branch tokenizes the same string, which starts with [CLS] and ends with [SEP]; the
model overwrites position 0 with [ENC] (image-grounded encoder) or [DEC] (decoder) itself.

* `load_tokenizer(path)`: a `vocab.txt` file, or a directory holding one (or a saved
  tokenizer). With BERT's 30,522-entry vocabulary, [DEC] = 30522 and [ENC] = 30523 (30,524 in all).
* `build_demo_tokenizer()`: the vocabulary of the synthetic dataset: [PAD]=0 [UNK]=1 [CLS]=2
  [SEP]=3 [MASK]=4 [DEC]=5 [ENC]=6, then `synthetic.DEMO_WORDS`, padded with [unusedN] to
  `DEMO_VOCAB_SIZE` (= configs/blip_tiny.yaml's vocab_size).
"""
from __future__ import annotations

import inspect
import os
import tempfile
from typing import Sequence, Tuple

import torch

from .scenes import DEMO_WORDS

DEMO_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")
DEMO_VOCAB_SIZE = 128


def _bert_from_vocab_file(vocab_file: str):
    from transformers import BertTokenizerFast

    # transformers 5 takes the vocabulary as `vocab=`; 4.x as `vocab_file=`.
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"
    return BertTokenizerFast(**{key: vocab_file}, do_lower_case=True)


def _add_blip_tokens(tok):
    """Add [DEC] as bos and [ENC] as an extra special token (ids reused when already in the vocab)."""
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    tok.dec_token_id = tok.bos_token_id
    return tok


def load_tokenizer(path: str):
    """BLIP tokenizer from a local `vocab.txt`, or a directory with `vocab.txt` or a saved tokenizer."""
    if path == "demo":
        return build_demo_tokenizer()
    if os.path.isdir(path):
        vocab = os.path.join(path, "vocab.txt")
        if os.path.isfile(vocab):
            tok = _bert_from_vocab_file(vocab)
        elif os.path.isfile(os.path.join(path, "tokenizer.json")):
            from transformers import BertTokenizerFast

            tok = BertTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            raise FileNotFoundError(f"tokenizer directory {path} has neither vocab.txt nor tokenizer.json")
    elif os.path.isfile(path):
        tok = _bert_from_vocab_file(path)
    else:
        raise FileNotFoundError(
            f"tokenizer not found: {path} (give a BERT vocab.txt, a directory holding one, or 'demo')"
        )
    if tok.convert_tokens_to_ids("[CLS]") == tok.unk_token_id:
        raise ValueError(f"{path}: not a BERT vocabulary (no [CLS] entry)")
    return _add_blip_tokens(tok)


def demo_vocab() -> list[str]:
    words = list(DEMO_SPECIALS) + [w for w in DEMO_WORDS if w not in DEMO_SPECIALS]
    if len(words) > DEMO_VOCAB_SIZE:
        raise ValueError(f"the demo vocabulary has {len(words)} entries, more than {DEMO_VOCAB_SIZE}")
    return words + [f"[unused{i}]" for i in range(DEMO_VOCAB_SIZE - len(words))]


def build_demo_tokenizer(out_dir: str | None = None):
    """The synthetic dataset's tokenizer; its vocab.txt is written to `out_dir` (a temp dir if None)."""
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer keeps the vocab in memory
            return build_demo_tokenizer(tmp)
    os.makedirs(out_dir, exist_ok=True)
    vocab_file = os.path.join(out_dir, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(demo_vocab()) + "\n")
    return _add_blip_tokens(_bert_from_vocab_file(vocab_file))


def tokenize(tokenizer, captions: Sequence[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both int64 (B, max_length): [CLS] ... [SEP], padded and truncated."""
    if isinstance(captions, str):
        raise TypeError("tokenize expects a list of captions, got a single string")
    enc = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()
