"""Zero-shot shape and colour classification on blipfast's synthetic shapes with a trained tiny BLIP.

    bash scripts/demo.sh                                   # trains output/demo (a few minutes)
    python examples/zero_shot_synthetic.py output/demo [--renders 2] [--top-k 2]

The checkpoint is anything `blipfast.load` reads; the demo's training output directory (a tiny
BLIP pre-trained on the synthetic set's captions, "a large red circle on the left and ...") is
the intended one. Held-out renders of single objects (every size x colour x shape x position,
`renders` times each, pixels from a random stream the dataset never uses) are classified by
shape (3 classes) and by colour (6 classes) with prompt ensembles that are never training
captions: by ITC alone, then with ITM re-ranking of the top k. Accuracy is reported against
chance and against the binomial floor: the smallest accuracy a classifier guessing at chance
reaches with probability at most `alpha` on this many images.

tests/api/test_zero_shot.py holds that floor on the demo checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch


def _templates(first: Sequence[str], second: Sequence[str], pattern: str) -> Tuple[str, ...]:
    return tuple(pattern.format(a, b) for a in first for b in second)


# Prompt ensembles in the captions' own words, varying the attributes that are not the class
# (as CLIP's ensembles vary "a photo of a {}" / "a drawing of a {}"). No template is a training
# caption: captions always name a position.
SHAPE_TEMPLATES = _templates(("small", "large"), ("red", "green", "blue", "yellow", "purple", "orange"), "a {} {} {{}}")
COLOUR_TEMPLATES = _templates(("small", "large"), ("circle", "square", "triangle"), "a {} {{}} {}")


# ---------------------------------------------------------------------------------------------
# data


def attribute_eval_set(image_size: int = 64, renders: int = 2,
                       seed: int = 1234) -> Tuple[torch.Tensor, List[str], List[str]]:
    """Single-object scenes, every (size, colour, shape, position) `renders` times: (images, shapes,
    colours). Rendered by the dataset's own renderer from a random stream the train split never uses."""
    from blipfast.data.synthetic import COLOURS, POSITIONS, SHAPES, SIZES, SceneObject, render_scene
    from blipfast.data.torch_pipeline import normalize

    rng = np.random.default_rng([seed, 7])
    images, shapes, colours = [], [], []
    for _ in range(renders):
        for size in SIZES:
            for colour in COLOURS:
                for shape in SHAPES:
                    for pos in POSITIONS:
                        img = render_scene([SceneObject(size, colour, shape, pos)], rng, image_size)
                        images.append(normalize(img.convert("RGB")))
                        shapes.append(shape)
                        colours.append(colour)
    return torch.from_numpy(np.stack(images)), shapes, colours


# ---------------------------------------------------------------------------------------------
# evaluation


def binomial_floor(n: int, chance: float, alpha: float = 1e-6) -> int:
    """Smallest k with P(Binomial(n, chance) >= k) <= alpha: more correct answers than a classifier
    guessing at `chance` gets with probability alpha."""
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.comb(n, k) * chance ** k * (1 - chance) ** (n - k)
        if tail > alpha:
            return k + 1
    return 0


def evaluate(predictor, renders: int = 2, top_k: int = 2, alpha: float = 1e-6) -> Dict[str, dict]:
    images, shapes, colours = attribute_eval_set(predictor.image_size, renders)
    from blipfast.data.synthetic import COLOURS, SHAPES

    result = {}
    for attr, names, truth, templates in (("shape", list(SHAPES), shapes, SHAPE_TEMPLATES),
                                          ("colour", list(COLOURS), colours, COLOUR_TEMPLATES)):
        clf = predictor.zero_shot_classifier(names, templates=templates)
        n, chance = len(truth), 1.0 / len(names)
        row = {"n": n, "classes": len(names), "chance": chance, "floor": binomial_floor(n, chance, alpha) / n,
               "alpha": alpha, "top_k_itm": top_k}
        for key, k in (("itc", 0), ("itc_itm", top_k))[:2 if top_k else 1]:
            pred = clf.classify(images, top_k_itm=k).labels
            row[key] = sum(p == t for p, t in zip(pred, truth)) / n
        result[attr] = row
    return result


def main(argv: Sequence[str] = None) -> int:
    import blipfast

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="anything blipfast.load reads, e.g. output/demo")
    p.add_argument("--renders", type=int, default=2, help="renders of each of the 180 single-object scenes")
    p.add_argument("--top-k", type=int, default=2, help="classes re-ranked by ITM")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = blipfast.load(a.checkpoint, tokenizer=a.tokenizer)
    res = evaluate(model, renders=a.renders, top_k=a.top_k)
    res["checkpoint"] = a.checkpoint
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
