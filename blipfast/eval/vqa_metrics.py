"""VQA accuracy as the official VQA evaluation defines it.

Per question, with the (usually 10) human answers: for each human, the other humans' answers are
compared with the prediction, acc_i = min(1, #matches / 3); the question's accuracy is the mean
of acc_i. (With 10 answers of which m match: 0, 0.3, 0.6, 0.9, then 1 from m = 4 on; the simple
min(1, m / 3) is the same for m = 0 and m >= 4.)

Normalisation, following the official rules:
* the prediction: newlines/tabs -> spaces, strip; `process_punctuation`, then `process_digit_article`;
* the human answers (already normalised in the VQA annotation files): strip, and
  `process_punctuation` only when they are not all identical (the official evaluator's rule).

process_punctuation: each of  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  is deleted when the text
has it next to a space or holds a digit-comma-digit group, else replaced by a space; then every
period not followed by a digit is deleted (at most 32 of them, a quirk of the official code,
kept for equal scores).
process_digit_article: lowercase, split on whitespace; number words zero..ten and "none" become
digits; the articles a / an / the are dropped; contractions written without their apostrophe
("dont", "isnt", "youre", ...) get it back.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern's "(?!<=\d)" is a negative lookahead for the text "<=digit" (a typo for a
# lookbehind), which never matches here: in effect a period not followed by a digit is deleted.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions the annotators may type without the apostrophe; the key is the form without it.
_CONTRACTED = [
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd",
    "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't",
    "not've", "o'clock", "oughtn't", "shan't", "she'd", "she'd've", "she'll", "she's", "should've", "shouldn't",
    "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
    "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas",
    "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd",
    "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's",
    "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've",
    "you'll", "you're", "you've",
]
_CONTRACTIONS = {c.replace("'", ""): c for c in _CONTRACTED}
_CONTRACTIONS.update({c.replace("'", "", 1): c for c in _CONTRACTED if c.count("'") == 2})  # "couldn'tve"


def process_punctuation(text: str) -> str:
    out = text
    spaced_or_number = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        if spaced_or_number or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The normalisation applied to predictions."""
    a = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(a))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers of its question."""
    if not answers:
        raise ValueError("a question needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_score(predictions: Dict, answers: Dict) -> Dict[str, float]:
    """Overall accuracy in percent: predictions {question_id: answer}, answers {question_id: [human answers]}.
    Returns {"overall": ..., "num_questions": ...}."""
    missing = answers.keys() - predictions.keys()
    if missing:
        raise ValueError(f"no prediction for {len(missing)} questions, e.g. {sorted(missing, key=str)[:5]}")
    accs: List[float] = [vqa_accuracy(predictions[q], answers[q]) for q in answers]
    return {"overall": 100.0 * sum(accs) / max(1, len(accs)), "num_questions": float(len(accs))}
