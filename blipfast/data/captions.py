"""Caption and question cleaning with the original BLIP semantics (`data/utils.py`).

`pre_caption` (every caption in pre-training, retrieval and captioning):
  1. lowercase;
  2. each of  . ! " ( ) * # : ; ~  becomes a space;
  3. every run of two or more whitespace characters becomes one space (a single tab or newline
     is left alone, as in the original);
  4. trailing newlines, then leading/trailing spaces, are removed;
  5. if splitting on single spaces gives more than `max_words` pieces, only the first
     `max_words` are kept (joined by single spaces).

`pre_question` (VQA questions) deletes those characters instead of replacing them, strips only
trailing spaces and does not collapse whitespace; truncation is the same.
"""
from __future__ import annotations

import re

_PUNCT = re.compile(r'[.!"()*#:;~]')
_WS_RUN = re.compile(r"\s{2,}")


def _truncate(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(text: str, max_words: int = 50) -> str:
    """Clean a caption exactly as the original `pre_caption` does (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"pre_caption expects a string, got {type(text).__name__}: {text!r}")
    out = _PUNCT.sub(" ", text.lower())
    out = _WS_RUN.sub(" ", out)
    out = out.rstrip("\n").strip(" ")
    return _truncate(out, max_words)


def pre_question(text: str, max_words: int = 50) -> str:
    """Clean a VQA question exactly as the original `pre_question` does (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"pre_question expects a string, got {type(text).__name__}: {text!r}")
    out = _PUNCT.sub("", text.lower()).rstrip(" ")
    return _truncate(out, max_words)
