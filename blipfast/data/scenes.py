"""The synthetic scenes' vocabulary: colours, shapes, sizes, positions, the words the demo
tokenizer knows, and one scene object. A leaf module that the dataset writer (synthetic.py),
its questions (synthetic_vqa.py) and the tokenizer all import; it imports none of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (145, 60, 190),
    "orange": (245, 135, 25),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
SIZES: Dict[str, float] = {"small": 0.08, "large": 0.13}  # bounding-circle radius / image side
# (x, y) centre as a fraction of the image side; the dict order is the caption order.
POSITIONS: Dict[str, Tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: Dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Every word the demo tokenizer knows: the caption words, the captioning prompt ("a picture of")
# and a few question words for VQA-style demos. The demo vocabulary is built from this list only.
_CAPTION_WORDS = ["a", "and", "there", "is"] + list(SIZES) + list(COLOURS) + list(SHAPES) + sorted(
    {w for p in POSITION_PHRASES.values() for w in p.split()}
)
_EXTRA_WORDS = [
    "picture", "of", "an", "image", "photo", "this", "it", "are", "what", "which", "where", "how",
    "many", "color", "colour", "shape", "size", "object", "objects", "shapes", "circles", "squares",
    "triangles", "one", "two", "three", "yes", "no", "big", "middle", "side", "with", "next", "to",
    "?", ".", ",", "1", "2",
]
DEMO_WORDS: Tuple[str, ...] = tuple(dict.fromkeys(_CAPTION_WORDS + _EXTRA_WORDS))


@dataclass(frozen=True)
class SceneObject:
    size: str
    colour: str
    shape: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"
