"""Turn what users pass (image paths, PIL images, tensors; strings) into model inputs, in batches.

Images: a path, a PIL image, a list of either, or a float tensor (3, S, S) / (B, 3, S, S) that is
already the model's input (resized and normalised). Paths and PIL images get the evaluation
transform of blipfast's data pipelines (bicubic resize to the model's size, CLIP mean / std),
one batch at a time, so a long list of files is never decoded all at once.
Texts: a string or a list of strings, used as given (pass `clean=True` where offered for the
original's `pre_caption`).
"""
from __future__ import annotations

import os
from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch

ImageLike = Union[str, os.PathLike, "PIL.Image.Image"]  # noqa: F821
Images = Union[torch.Tensor, ImageLike, Sequence[ImageLike]]


def as_image_list(images: Images) -> Union[torch.Tensor, List]:
    """A (B, 3, S, S) tensor, or a list of paths / PIL images."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"an image tensor must be float (3, S, S) or (B, 3, S, S), already resized and "
                             f"normalised; got {tuple(images.shape)} {images.dtype}")
        return images
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, Sequence):
        bad = [type(x).__name__ for x in images if not isinstance(x, (str, os.PathLike, Image.Image))]
        if bad:
            raise TypeError(f"images must be paths or PIL images (or one tensor); got {sorted(set(bad))}")
        return list(images)
    raise TypeError(f"images must be a path, a PIL image, a list of those, or a tensor; got {type(images).__name__}")


def count(images) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def _open(item) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    path = os.fspath(item)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None


def preprocess(items: Sequence, size: int) -> torch.Tensor:
    """(B, 3, size, size) float32: the evaluation transform (blipfast.data.torch_pipeline)."""
    from PIL import Image

    from blipfast.data.torch_pipeline import normalize

    arrays = [normalize(_open(x).resize((size, size), Image.BICUBIC)) for x in items]  # each (3, S, S)
    return torch.from_numpy(np.stack(arrays))


def image_batches(images, size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of model input from `as_image_list`'s output; tensors must already be size x size."""
    if isinstance(images, torch.Tensor):
        if images.shape[-2:] != (size, size):
            raise ValueError(f"image tensors must be {size}x{size} for this model, got {tuple(images.shape[-2:])}")
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
        return
    for i in range(0, len(images), batch_size):
        yield preprocess(images[i:i + batch_size], size)


def as_texts(texts: Union[str, Sequence[str]], clean: bool = False) -> List[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError("no texts given")
    if clean:
        from blipfast.data import pre_caption

        texts = [pre_caption(t) for t in texts]
    return list(texts)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), (B, L) int64: [CLS] ... [SEP], padded to the longest, truncated."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: blipfast.load(..., tokenizer=...) (a vocab.txt or 'demo')")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()
