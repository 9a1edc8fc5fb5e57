"""Caption metrics: BLEU-1..4 and CIDEr(-D) with pycocoevalcap's own scorers, no Java needed.

The COCO caption evaluation (`pycocoevalcap.eval.COCOEvalCap`) tokenizes with Stanford's Java
PTBTokenizer and also runs METEOR and SPICE (Java, and SPICE downloads CoreNLP). Here the BLEU
and CIDEr scorers are called directly on captions tokenized by `simple_ptb_tokenize`, a Python
rendering of the PTB rules that matter for captions (lowercase; punctuation split off and then
removed, as the COCO tokenizer removes it; n't / 's / 're / 've / 'll / 'd / 'm split off;
brackets become -lrb- / -rrb-, which the COCO list does not remove; "$" split from numbers;
hyphenated words, numbers like 1,000 and 3.50 and common abbreviations kept whole). With
`tokenizer="ptb"` the Java tokenizer itself is used (needs `java` on PATH).

CIDEr's document frequencies come from the references of the evaluated set (CIDEr-D, as COCO).
"""
from __future__ import annotations

import re
import shutil
from typing import Dict, List, Mapping, Sequence, Union

# What the COCO tokenizer wrapper drops after PTB tokenization.
COCO_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                    "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "e.g.", "i.e.", "u.s.", "a.m.", "p.m."}
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"n't|'s|'re|'ve|'ll|'d|'m|'n'"  # contractions, already separated; rock 'n' roll
    r"|(?:[a-z]\.){2,}"  # e.g. u.s.
    r"|\d+(?:[.,:]\d+)+"  # 1,000  3.50  10:30
    r"|\w+(?:['\-/&]\w+)*\.?"  # words, hyphenated words, o'clock; a trailing period checked below
    r"|\.\.\.|--|``|''|\S"
)

Captions = Mapping[Union[str, int], Union[str, Sequence[str]]]


def simple_ptb_tokenize(text: str) -> str:
    """One caption -> space-joined lowercase tokens, punctuation removed (see the module docstring)."""
    t = _CONTRACTION.sub(r" \1", text.lower().replace("\n", " ").replace("\t", " "))
    t = t.replace('"', " '' ")
    out: List[str] = []
    for tok in _TOKEN.findall(t):
        if tok[0].isalnum() and tok.endswith(".") and tok not in _ABBREVIATIONS and not re.fullmatch(r"(?:[a-z]\.){2,}", tok):
            out += [tok[:-1], "."]  # a sentence period, not an abbreviation
            continue
        out.append(_BRACKETS.get(tok, tok))
    return " ".join(w for w in out if w not in COCO_PUNCTUATION)


def _as_lists(captions: Captions, what: str) -> Dict[Union[str, int], List[str]]:
    out = {}
    for k, v in captions.items():
        v = [v] if isinstance(v, str) else list(v)
        if not v or not all(isinstance(c, str) for c in v):
            raise ValueError(f"{what}[{k!r}] must be a caption or a non-empty list of captions, got {v!r:.100}")
        out[k] = v
    return out


def tokenize_captions(captions: Dict, tokenizer: str = "simple") -> Dict:
    if tokenizer == "simple":
        return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions.items()}
    if tokenizer == "ptb":
        if shutil.which("java") is None:
            raise RuntimeError("tokenizer='ptb' needs Java (java on PATH); use tokenizer='simple'")
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    raise ValueError(f"tokenizer must be 'simple' or 'ptb', got {tokenizer!r}")


def caption_scores(references: Captions, candidates: Captions, tokenizer: str = "simple") -> Dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr of `candidates` (id -> one caption) against `references`
    (id -> caption or list of captions). Scores are fractions as pycocoevalcap returns them
    (BLEU in [0, 1]; CIDEr about 0..10, COCO papers print x100). Returns
    {"BLEU-1", ..., "BLEU-4", "CIDEr"}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs, cands = _as_lists(references, "references"), _as_lists(candidates, "candidates")
    if refs.keys() != cands.keys():
        missing, extra = refs.keys() - cands.keys(), cands.keys() - refs.keys()
        raise ValueError(f"candidates and references must cover the same ids (missing candidates for "
                         f"{sorted(missing, key=str)[:5]}, no references for {sorted(extra, key=str)[:5]})")
    if any(len(v) != 1 for v in cands.values()):
        raise ValueError("give exactly one candidate caption per id")
    if not refs:
        raise ValueError("no captions to score")
    refs, cands = tokenize_captions(refs, tokenizer), tokenize_captions(cands, tokenizer)
    bleu, _ = Bleu(4).compute_score(refs, cands, verbose=0)
    cider, _ = Cider().compute_score(refs, cands)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["CIDEr"] = float(cider)
    return out
