"""DALI graphs for pre-training and evaluation images.

Inputs come from `fn.external_source`: encoded bytes that the index has vetted (DALI cannot skip a
corrupt image), plus each sample's augmentation parameters and dataset index, all drawn in
Python (see augment.py). Decoding is nvJPEG on the GPU (`mixed`) when CUDA is present, else the
CPU decoder with `device_id=None`; everything after decoding runs where the image is.

Train graph (one sample):
    image_slice (decode only the crop window)  -> resize S x S (cubic, antialiased)
    -> [autocontrast | equalize]  -> warp_affine (bilinear, fill 128)  -> [autocontrast | equalize]
    -> crop_mirror_normalize (flip, CLIP mean/std, CHW float32)
The bracketed stages and the warp run only for the samples that drew them (DALI conditionals).
The flip comes last here and first in BLIP; the warp matrix is conjugated by the flip so the
result is the same. Approximations: `fn.equalize` is OpenCV-style equalisation, not PIL's rule
that BLIP's RandomAugment copies; DALI's cubic and linear kernels are not cv2's or PIL's.

Eval graph: decode -> resize S x S (cubic, antialiased) -> normalise, as BLIP's test transform.
Captions never enter DALI: the dataset index goes through, and the loader looks captions up.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    HAVE_DALI = True
except ImportError:  # the module stays importable; require_dali() explains what to install
    HAVE_DALI = False

from .augment import CLIP_MEAN, CLIP_STD, FILL

TRAIN_OUTPUTS = ("data", "anchor", "shape", "flip", "pre", "do_warp", "warp", "post", "index")


def require_dali() -> None:
    if not HAVE_DALI:
        raise ImportError(
            "data.backend is 'dali' but NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 "
            "(or nvidia-dali-cuda120), or set data.backend: torch to use the PIL loader"
        )


def resolve_device(decode: str, device_id: Optional[int] = None) -> Tuple[str, Optional[int]]:
    """('mixed', gpu id) or ('cpu', None) from the `decode` setting and the machine."""
    has_cuda = torch.cuda.is_available()
    if decode == "mixed" and not has_cuda:
        raise RuntimeError("data.decode is 'mixed' (GPU decoding) but CUDA is not available; use auto or cpu")
    if decode == "cpu" or (decode == "auto" and not has_cuda):
        return "cpu", None  # CPU_ONLY_DEVICE_ID: no CUDA context at all
    return "mixed", torch.cuda.current_device() if device_id is None else device_id


if HAVE_DALI:
    _MEAN = [m * 255 for m in CLIP_MEAN]
    _STD = [s * 255 for s in CLIP_STD]

    def _autocontrast(img):
        """Per channel, stretch [min, max] to [0, 255], truncating like the original's uint8 cast."""
        lo = fn.cast(fn.reductions.min(img, axes=[0, 1]), dtype=types.FLOAT)  # (3,)
        hi = fn.cast(fn.reductions.max(img, axes=[0, 1]), dtype=types.FLOAT)  # (3,)
        stretch = hi > lo  # a flat channel is left alone
        scale = stretch * (255.0 / dmath.max(hi - lo, 1.0)) + (1 - stretch)
        out = fn.cast(img, dtype=types.FLOAT) * scale - lo * scale * stretch  # (H, W, 3)
        return fn.cast(dmath.floor(dmath.clamp(out, 0.0, 255.0)), dtype=types.UINT8)

    def _photometric(img, code):
        if code == 1:
            img = _autocontrast(img)
        elif code == 2:
            img = fn.equalize(img)
        return img

    @pipeline_def(enable_conditionals=True)
    def _train_graph(source: Callable, size: int, decode_device: str):
        data, anchor, shape, flip, pre, do_warp, warp, post, index = fn.external_source(
            source=source, num_outputs=len(TRAIN_OUTPUTS), batch=True, batch_info=True,
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT32, types.BOOL,
                   types.FLOAT, types.INT32, types.INT64],
        )
        img = fn.decoders.image_slice(
            data, anchor, shape, device=decode_device, output_type=types.RGB, axis_names="WH",
            normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
        )
        img = fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
        img = _photometric(img, pre)
        if do_warp:
            img = fn.warp_affine(img, matrix=warp, fill_value=FILL, interp_type=types.INTERP_LINEAR)
        img = _photometric(img, post)
        img = fn.crop_mirror_normalize(
            img, dtype=types.FLOAT, output_layout="CHW", mirror=flip, mean=_MEAN, std=_STD
        )
        return img, index

    @pipeline_def
    def _eval_graph(source: Callable, size: int, decode_device: str):
        data, index = fn.external_source(
            source=source, num_outputs=2, batch=True, batch_info=True, dtype=[types.UINT8, types.INT64]
        )
        img = fn.decoders.image(data, device=decode_device, output_type=types.RGB, adjust_orientation=False)
        img = fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
        img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=_MEAN, std=_STD)
        return img, index


def run(kind: str, source: Callable, *, batch_size: int, size: int, num_threads: int, decode: str,
        device_id: Optional[int] = None, prefetch: int = 2) -> Iterator[Dict[str, torch.Tensor]]:
    """Build a `kind` ('train' | 'eval') pipeline over `source` and yield {'images', 'index'} batches
    until the source raises StopIteration. `source(batch_info)` returns one list per graph input."""
    require_dali()
    device, dev_id = resolve_device(decode, device_id)
    graph = _train_graph if kind == "train" else _eval_graph
    pipe = graph(
        source=source, size=size, decode_device=device, batch_size=batch_size, num_threads=num_threads,
        device_id=dev_id, prefetch_queue_depth=prefetch, seed=0,  # no DALI random operator is used
    )
    pipe.build()
    it = DALIGenericIterator([pipe], ["images", "index"], auto_reset=False)
    try:
        for (out,) in it:
            # The iterator may hand out views of DALI's buffers that the next run overwrites.
            yield {"images": out["images"].clone(), "index": out["index"].clone().reshape(-1).long()}
    finally:
        del it, pipe
