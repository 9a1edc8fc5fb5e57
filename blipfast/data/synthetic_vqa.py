"""Questions and answers about the synthetic scenes, in the original BLIP's VQA annotation format.

Every question has exactly one right answer, determined by the scene (one or two objects, see
synthetic.py). Kinds, each asked only when its answer is unambiguous:

    what color is the circle?              -> red ...      (the scene has one circle)
    what shape is on the left?             -> circle ...   (an object is on the left)
    what size is the red circle?           -> small/large  (one red circle)
    where is the red circle?               -> left/right/top/bottom/center
    is there a blue square?                -> yes/no       (half of them about an absent object)
    how many shapes are there?             -> 1/2          (digits: the VQA evaluator turns a
                                                            predicted "two" into "2")

Files (under the synthetic out_dir):
    vqa_train.json   [{"question_id", "question", "answer": [10 x answer], "image", "dataset": "vqa",
                       "answer_type": "yes/no" | "number" | "other"}]
    vqa_val.json     the same fields for the held-out images (answers kept: accuracy is computed)
    answer_list.json every possible answer (the candidates of answer ranking)

"answer" repeats the right answer for 10 annotators as VQA v2 does, so each training question has
one answer of weight 1.0 and the official accuracy formula gives 1.0 to the right answer.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from .scenes import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES

ANNOTATORS = 10
KINDS = ("colour", "shape", "size", "where", "exists", "count")
# VQA v2's answer types, reported separately by its evaluation.
ANSWER_TYPE = {"exists": "yes/no", "count": "number"}


def answer_list() -> List[str]:
    return list(COLOURS) + list(SHAPES) + list(SIZES) + list(POSITIONS) + ["yes", "no", "1", "2"]


def _candidates(objs: Sequence, rng: np.random.Generator) -> Dict[str, Tuple[str, str]]:
    """kind -> (question, answer) for every kind that has one right answer in this scene."""
    out: Dict[str, Tuple[str, str]] = {}
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    shapes_once = [s for s, os_ in by_shape.items() if len(os_) == 1]
    if shapes_once:
        s = shapes_once[int(rng.integers(len(shapes_once)))]
        out["colour"] = (f"what color is the {s}?", by_shape[s][0].colour)
    o = objs[int(rng.integers(len(objs)))]
    out["shape"] = (f"what shape is {POSITION_PHRASES[o.position]}?", o.shape)
    pairs = [(o.colour, o.shape) for o in objs]
    unique = [o for o in objs if pairs.count((o.colour, o.shape)) == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        out["size"] = (f"what size is the {o.colour} {o.shape}?", o.size)
        o = unique[int(rng.integers(len(unique)))]
        out["where"] = (f"where is the {o.colour} {o.shape}?", o.position)
    if rng.random() < 0.5:
        o = objs[int(rng.integers(len(objs)))]
        out["exists"] = (f"is there a {o.colour} {o.shape}?", "yes")
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
        c, s = absent[int(rng.integers(len(absent)))]
        out["exists"] = (f"is there a {c} {s}?", "no")
    out["count"] = ("how many shapes are there?", str(len(objs)))
    return out


def make_questions(scenes: Sequence[Sequence], images: Sequence[str], rng: np.random.Generator,
                   per_image: int, first_id: int) -> List[dict]:
    """`per_image` questions of distinct kinds per scene (fewer when fewer kinds apply)."""
    records = []
    qid = first_id
    for objs, image in zip(scenes, images):
        cands = _candidates(objs, rng)
        kinds = [k for k in KINDS if k in cands]
        for k in rng.permutation(kinds)[:per_image]:
            question, answer = cands[str(k)]
            records.append({"question_id": qid, "question": question, "answer": [answer] * ANNOTATORS,
                            "image": image, "dataset": "vqa", "answer_type": ANSWER_TYPE.get(str(k), "other")})
            qid += 1
    return records
