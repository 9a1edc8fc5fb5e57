"""BLIP's pre-training augmentation as per-sample parameters, drawn in Python, applied by a backend.

The original transform (`data/__init__.py`): RandomResizedCrop(S, scale=(min_scale, 1), bicubic)
-> RandomHorizontalFlip -> RandomAugment(N=2, M=5) -> ToTensor -> Normalize(CLIP mean/std).
RandomAugment picks 2 of 10 ops (with replacement) and applies each with probability 0.5. At
M=5 Brightness and Sharpness get factor (5/10)*1.8+0.1 = 1.0, i.e. they do nothing, so the
effective ops are identity, autocontrast, equalize, shear x/y (0.15), translate x/y (5 px) and
rotate (15 degrees), each with a random sign, filling with grey 128 (bilinear, like cv2).

Every random number comes from a generator seeded by (seed, epoch, dataset index) alone, so a
sample's augmentation does not depend on the rank, the batch or the thread that processes it.
That is what makes `loader.epoch(e, start_step=k)` reproduce a full epoch's tail bit for bit,
and what lets the DALI and PIL backends apply the same draw. DALI's own random operators are
not used: their state advances per pipeline, so a resumed pipeline would draw differently.

The 2 ops are mapped onto three fixed stages: a photometric op, one affine warp, a photometric
op. With N=2 every sequence fits exactly (geometric ops in a row compose into one matrix, which
resamples once where the original resamples twice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FILL = 128  # RandomAugment's border fill

NONE, AUTOCONTRAST, EQUALIZE = 0, 1, 2  # photometric stage codes
RA_OPS = (
    "identity", "autocontrast", "equalize", "brightness", "sharpness",
    "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
)
RA_N, RA_PROB = 2, 0.5
SHEAR, TRANSLATE_PX, ROTATE_DEG = 0.15, 5.0, 15.0  # level 5 of 10 (translate_const 10)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation (the leading 1 separates it from other streams)."""
    return np.random.default_rng([1, seed, epoch, index])


def random_resized_crop(rng: np.random.Generator, width: int, height: int, scale: Tuple[float, float],
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(x, y, w, h) of a crop window, by torchvision's RandomResizedCrop rule (10 tries, then centre)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _op_matrix(op: str, magnitude: float, size: int) -> np.ndarray:
    """Forward (source -> destination) 3x3 map of one geometric op, in cv2's pixel-index coordinates."""
    m = np.eye(3)
    if op == "shear_x":
        m[0, 1] = magnitude
    elif op == "shear_y":
        m[1, 0] = magnitude
    elif op == "translate_x":
        m[0, 2] = -magnitude
    elif op == "translate_y":
        m[1, 2] = -magnitude
    elif op == "rotate":  # cv2.getRotationMatrix2D((S/2, S/2), degrees, 1): counter-clockwise on screen
        a, b = math.cos(math.radians(magnitude)), math.sin(math.radians(magnitude))
        c = size / 2
        m[:2] = [[a, b, (1 - a) * c - b * c], [-b, a, b * c + (1 - a) * c]]
    else:
        raise ValueError(f"not a geometric op: {op}")
    return m


def _to_continuous(m_index: np.ndarray) -> np.ndarray:
    """Index coordinates (pixel centres at integers, cv2) -> continuous ones (centres at +0.5, DALI and PIL)."""
    t = np.array([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    return t @ m_index @ np.linalg.inv(t)


@dataclass(frozen=True)
class TrainAug:
    """One sample's augmentation."""

    crop: Tuple[int, int, int, int]  # x, y, w, h in source pixels
    flip: bool  # horizontal flip, applied right after the crop (as in BLIP)
    pre: int  # photometric op before the warp: NONE | AUTOCONTRAST | EQUALIZE
    post: int  # photometric op after the warp
    warp: Optional[np.ndarray]  # 3x3 forward map in continuous coords of the flipped S x S image; None: no warp
    ops: Tuple[Tuple[str, float], ...]  # the applied RandomAugment ops and magnitudes, in order (for logs/tests)

    def warp_inverse(self, size: int, flip_last: bool) -> np.ndarray:
        """2x3 destination -> source map. `flip_last`: the backend flips after the warp (DALI does, in
        crop_mirror_normalize), so the warp is conjugated by the flip: flip(W'(x)) == W(flip(x))."""
        m = np.eye(3) if self.warp is None else self.warp
        if flip_last and self.flip:
            f = np.array([[-1.0, 0, size], [0, 1, 0], [0, 0, 1]])  # its own inverse
            m = f @ m @ f
        return np.linalg.inv(m)[:2].astype(np.float32)


def sample_train_aug(rng: np.random.Generator, width: int, height: int, size: int,
                     scale: Tuple[float, float] = (0.5, 1.0), hflip: bool = True,
                     rand_augment: bool = True) -> TrainAug:
    """Draw one sample's crop, flip and RandomAugment(2, 5) ops for an output of `size` x `size`."""
    crop = random_resized_crop(rng, width, height, scale)
    flip = bool(hflip and rng.random() < 0.5)
    pre = post = NONE
    warp = None
    applied = []
    if rand_augment:
        for op in (RA_OPS[i] for i in rng.integers(0, len(RA_OPS), size=RA_N)):
            if rng.random() > RA_PROB:
                continue
            if op in ("identity", "brightness", "sharpness"):  # identity at M=5 (see module docstring)
                applied.append((op, 0.0))
            elif op in ("autocontrast", "equalize"):
                code = AUTOCONTRAST if op == "autocontrast" else EQUALIZE
                if warp is None and pre == NONE:
                    pre = code
                else:  # after a geometric op, or a second photometric op: the post stage
                    post = code
                applied.append((op, 0.0))
            else:
                if post != NONE:  # cannot happen with N=2; guards a change of RA_N
                    raise AssertionError("RandomAugment sequence does not fit photometric-warp-photometric")
                sign = -1.0 if rng.random() < 0.5 else 1.0
                mag = sign * {"rotate": ROTATE_DEG, "shear_x": SHEAR, "shear_y": SHEAR}.get(op, TRANSLATE_PX)
                m = _to_continuous(_op_matrix(op, mag, size))
                warp = m if warp is None else m @ warp
                applied.append((op, mag))
    return TrainAug(crop=crop, flip=flip, pre=pre, post=post, warp=warp, ops=tuple(applied))
