"""The PIL/numpy backend (`data.backend: torch`): the same transforms as the DALI pipeline, no DALI.

Used when DALI is not installed, and as an independent check of the DALI graph: it applies the
augmentation in BLIP's order (crop, flip, photometric, warp, photometric), while the DALI graph
flips last and conjugates the warp instead. Differences are interpolation details: PIL's
bicubic/bilinear kernels versus DALI's, and equalize (PIL's rule here, DALI's `fn.equalize` there).
"""
from __future__ import annotations

import io
from concurrent.futures import Executor
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .augment import AUTOCONTRAST, CLIP_MEAN, CLIP_STD, EQUALIZE, FILL, TrainAug

_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32) * 255
_STD = np.asarray(CLIP_STD, dtype=np.float32) * 255


_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_rgb(data: bytes) -> Image.Image:
    """8-bit RGB, as DALI's decoder gives it. EXIF orientation is not applied (as in BLIP).

    16-bit grayscale PNGs: PIL's convert() clips values above 255 (a white image); DALI scales
    to 8 bits with round(v / 257), and so does this. (16-bit colour PNGs: PIL keeps the high
    byte, v >> 8, at most one level below DALI's rounding.)"""
    im = Image.open(io.BytesIO(data))
    if im.mode in _WIDE_GRAY and im.format == "PNG":
        a = np.asarray(im).astype(np.float64)
        g = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2))
    return im.convert("RGB")


def autocontrast(img: Image.Image) -> Image.Image:
    """Per channel, stretch [min, max] to [0, 255] (truncating); a flat channel is left alone."""
    a = np.asarray(img)
    out = np.empty_like(a)
    ramp = np.arange(256, dtype=np.float64)
    for c in range(a.shape[2]):
        lo, hi = int(a[..., c].min()), int(a[..., c].max())
        if hi <= lo:
            out[..., c] = a[..., c]
            continue
        scale = 255.0 / (hi - lo)
        table = np.clip(ramp * scale - lo * scale, 0, 255).astype(np.uint8)
        out[..., c] = table[a[..., c]]
    return Image.fromarray(out)


def _photometric(img: Image.Image, code: int) -> Image.Image:
    if code == AUTOCONTRAST:
        return autocontrast(img)
    if code == EQUALIZE:
        return ImageOps.equalize(img)
    return img


def normalize(img: Image.Image) -> np.ndarray:
    """HWC uint8 -> CHW float32 with CLIP mean/std."""
    a = (np.asarray(img, dtype=np.float32) - _MEAN) / _STD  # (S, S, 3)
    return np.ascontiguousarray(a.transpose(2, 0, 1))  # (3, S, S)


def train_image(data: bytes, aug: TrainAug, size: int) -> np.ndarray:
    img = decode_rgb(data)
    x, y, w, h = aug.crop
    img = img.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
    if aug.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = _photometric(img, aug.pre)
    if aug.warp is not None:
        inv = aug.warp_inverse(size, flip_last=False)  # (2, 3) destination -> source
        img = img.transform((size, size), Image.AFFINE, tuple(float(v) for v in inv.ravel()),
                            resample=Image.BILINEAR, fillcolor=(FILL,) * 3)
    img = _photometric(img, aug.post)
    return normalize(img)


def eval_image(data: bytes, size: int) -> np.ndarray:
    return normalize(decode_rgb(data).resize((size, size), Image.BICUBIC))


def eval_batch(pool: Executor, datas: Sequence[bytes], size: int) -> torch.Tensor:
    """(B, 3, S, S) float32; PIL releases the GIL while decoding and resampling, so threads help."""
    return torch.from_numpy(np.stack(list(pool.map(lambda d: eval_image(d, size), datas))))
