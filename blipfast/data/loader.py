"""The loaders the trainer uses: pre-training batches (sharded, resumable) and the held-out eval set.

Order and sharding: epoch e visits the samples in the permutation drawn from (seed, e), the same
on every rank. Global batch g is the slice [g*B*W, (g+1)*B*W) of it, and rank r takes the r-th
B-sized part, so ranks never overlap and together cover every global batch. The last
N mod (B*W) samples of each epoch's permutation are dropped (a different tail every epoch): the
ITC queue needs the same global batch at every step. `len(loader)` = N // (B*W).

Resume: a sample's augmentation depends only on (seed, epoch, dataset index) (augment.py), so
`epoch(e, start_step=k)` computes batches k, k+1, ... directly, equal bit for bit to those of a
full epoch on the same backend and machine.
"""
from __future__ import annotations

import io
import logging
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from .augment import TrainAug, sample_rng, sample_train_aug
from .config import DataConfig, DataError
from .index import SampleIndex, build_eval_index, build_train_index, check_image
from .tokenizer import tokenize

log = logging.getLogger("blipfast.data")


class _ByteReader:
    """Reads an image's bytes for the decoder, which must never see bytes it cannot decode (a DALI
    decoder error stops the pipeline). An image that vanished or became unreadable after indexing
    (stats['read_errors']), or whose bytes no longer decode (stats['corrupt_at_read']), is replaced
    by a flat grey JPEG of the same size and logged with its name.

    Bytes are fully decoded here (PIL) when they differ from the bytes that passed the index check
    (CRC-32: bit rot behind a warm check cache), and once per image per process when the index only
    checked headers (`check_images: header`)."""

    def __init__(self, index: SampleIndex, stats: Dict[str, int]):
        self.index, self.stats = index, stats
        self.lock = threading.Lock()
        self.grey: Dict[tuple, bytes] = {}
        self.decoded = np.zeros(index.num_images, dtype=bool)  # fully decoded once in this process

    def _stand_in(self, row: int, counter: str, why: str) -> bytes:
        from PIL import Image

        w, h = int(self.index.widths[row]), int(self.index.heights[row])
        with self.lock:
            self.stats[counter] = self.stats.get(counter, 0) + 1
            if (w, h) not in self.grey:
                buf = io.BytesIO()
                Image.new("RGB", (w, h), (128, 128, 128)).save(buf, format="JPEG")
                self.grey[(w, h)] = buf.getvalue()
        log.warning("skipping %s (%s): a grey image stands in for it (%s so far: %d)", self.index.names[row], why,
                    counter, self.stats[counter])
        return self.grey[(w, h)]

    def __call__(self, row: int) -> bytes:
        try:
            data = self.index.read_image_bytes(row)
        except OSError as e:
            return self._stand_in(row, "read_errors", f"cannot read it: {e}")
        crcs = self.index.crcs
        changed = crcs is not None and crcs[row] >= 0 and zlib.crc32(data) != crcs[row]
        if changed or (self.index.check_mode == "header" and not self.decoded[row]):
            ok, _, _, reason = check_image(data, "decode")
            if not ok:
                return self._stand_in(row, "corrupt_at_read", ("changed since it was checked: " if changed else "")
                                      + reason)
            self.decoded[row] = True
        return data


class PretrainLoader:
    """Pre-training batches for one rank. Iterate `loader.epoch(e, start_step=0)`."""

    def __init__(self, cfg: DataConfig, index: SampleIndex, tokenizer, image_size: int, batch_size: int,
                 max_length: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device_id: Optional[int] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1 or image_size < 1 or max_length < 2:
            raise ValueError(f"bad loader sizes: batch_size {batch_size}, image_size {image_size}, max_length {max_length}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if len(index) < batch_size * world_size:
            raise DataError(
                f"the dataset has {len(index)} samples, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks)"
            )
        if cfg.backend == "dali":
            from .dali_pipeline import require_dali, resolve_device

            require_dali()  # fail at start-up, not at the first batch
            resolve_device(cfg.decode, device_id)
        self.cfg, self.index, self.tokenizer = cfg, index, tokenizer
        self.image_size, self.batch_size, self.max_length = image_size, batch_size, max_length
        self.rank, self.world_size, self.seed, self.device_id = rank, world_size, seed, device_id
        self.stats: Dict[str, int] = dict(index.stats, read_errors=0)
        self._read = _ByteReader(index, self.stats)

    def __len__(self) -> int:
        return len(self.index) // (self.batch_size * self.world_size)

    @property
    def num_samples(self) -> int:
        return len(self.index)

    def order(self, epoch: int) -> np.ndarray:
        """The global visiting order of epoch `epoch` (identical on every rank)."""
        return np.random.default_rng([2, self.seed, epoch]).permutation(len(self.index))

    def plan(self, epoch: int) -> np.ndarray:
        """(len(self), batch_size) dataset indices of this rank's batches in epoch `epoch`."""
        B, W = self.batch_size, self.world_size
        steps = len(self)
        glob = self.order(epoch)[: steps * B * W].reshape(steps, W, B)  # (steps, ranks, B)
        return glob[:, self.rank]

    def augment(self, epoch: int, sample: int) -> TrainAug:
        row = self.index.sample_image[sample]
        c = self.cfg
        return sample_train_aug(
            sample_rng(self.seed, epoch, int(sample)), int(self.index.widths[row]), int(self.index.heights[row]),
            self.image_size, scale=(c.min_scale, c.max_scale), hflip=c.hflip, rand_augment=c.rand_augment,
        )

    def _text(self, idx: np.ndarray) -> Dict[str, torch.Tensor]:
        ids, mask = tokenize(self.tokenizer, [self.index.captions[i] for i in idx], self.max_length)
        return {"input_ids": ids, "attention_mask": mask, "index": torch.as_tensor(idx, dtype=torch.int64),
                # the image row of each sample: all captions of one image share it (retrieval positives)
                "image_id": torch.as_tensor(self.index.sample_image[idx], dtype=torch.int64)}

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches start_step, start_step+1, ... of epoch `epoch`: {'images' (B,3,S,S) float32,
        'input_ids' (B,L) int64, 'attention_mask' (B,L) int64, 'index' (B,) int64 (dataset samples),
        'image_id' (B,) int64 (their images)}."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} is outside the epoch (0..{len(self)})")
        plan = self.plan(epoch)[start_step:]
        if len(plan) == 0:
            return iter(())
        if self.cfg.backend == "dali":
            return self._dali_epoch(epoch, plan)
        return self._torch_epoch(epoch, plan)

    # -- backends --------------------------------------------------------------------------------

    def _torch_epoch(self, epoch: int, plan: np.ndarray) -> Iterator[Dict[str, torch.Tensor]]:
        from . import torch_pipeline as tp

        S = self.image_size
        rows = self.index.sample_image

        def sample(i):
            return tp.train_image(self._read(int(rows[i])), self.augment(epoch, i), S)

        def make(idx):
            images = torch.from_numpy(np.stack(list(pool.map(sample, idx))))  # (B, 3, S, S)
            return {"images": images, **self._text(idx)}

        # One producer thread prepares the next batch while the caller trains on this one;
        # the per-sample work runs on the pool (no nesting, so no deadlock).
        with ThreadPoolExecutor(self.cfg.num_threads) as pool, ThreadPoolExecutor(1) as producer:
            pending = producer.submit(make, plan[0])
            for s in range(len(plan)):
                batch = pending.result()
                if s + 1 < len(plan):
                    pending = producer.submit(make, plan[s + 1])
                yield batch

    def _dali_epoch(self, epoch: int, plan: np.ndarray) -> Iterator[Dict[str, torch.Tensor]]:
        from . import dali_pipeline

        S, rows = self.image_size, self.index.sample_image
        pool = ThreadPoolExecutor(self.cfg.num_threads)

        def source(info):
            if info.iteration >= len(plan):
                raise StopIteration
            idx = plan[info.iteration]
            augs = [self.augment(epoch, i) for i in idx]
            datas = list(pool.map(lambda i: np.frombuffer(self._read(int(rows[i])), dtype=np.uint8), idx))
            f32, i32 = np.float32, np.int32
            return (
                datas,
                [np.asarray(a.crop[:2], f32) for a in augs],  # anchor (x, y)
                [np.asarray(a.crop[2:], f32) for a in augs],  # shape (w, h)
                [np.asarray(a.flip, i32) for a in augs],
                [np.asarray(a.pre, i32) for a in augs],
                [np.asarray(a.warp is not None) for a in augs],
                [a.warp_inverse(S, flip_last=True) for a in augs],  # (2, 3) destination -> source
                [np.asarray(a.post, i32) for a in augs],
                [np.asarray(i, np.int64) for i in idx],
            )

        try:
            for step, out in enumerate(
                dali_pipeline.run("train", source, batch_size=self.batch_size, size=S,
                                  num_threads=self.cfg.num_threads, decode=self.cfg.decode,
                                  device_id=self.device_id)
            ):
                idx = out["index"].numpy()
                if not np.array_equal(idx, plan[step]):  # DALI keeps order; this guards the contract
                    raise RuntimeError(f"DALI returned samples {idx[:4]}... for step {step}, expected {plan[step][:4]}...")
                yield {"images": out["images"], **self._text(idx)}
        finally:
            pool.shutdown(wait=True)


@dataclass
class EvalSet:
    """The held-out split, transformed for evaluation (resize to S x S, normalise)."""

    images: torch.Tensor  # (N_img, 3, S, S) float32, CPU
    input_ids: torch.Tensor  # (N_txt, L) int64
    attention_mask: torch.Tensor  # (N_txt, L) int64
    txt2img: torch.Tensor  # (N_txt,) int64: the image of each text
    img2txt: List[List[int]]  # the texts of each image
    captions: List[str]  # (N_txt) cleaned captions
    image_names: List[str]  # (N_img) image paths
    stats: Dict[str, int]


def build_pretrain_loader(cfg: DataConfig, tokenizer, image_size: int, batch_size: int, max_length: int,
                          rank: int = 0, world_size: int = 1, seed: int = 0,
                          device_id: Optional[int] = None) -> PretrainLoader:
    """Index the pre-training data (vetting every image) and return this rank's loader."""
    return PretrainLoader(cfg, build_train_index(cfg), tokenizer, image_size, batch_size, max_length,
                          rank, world_size, seed, device_id)


def build_eval_set(cfg: DataConfig, tokenizer, image_size: int, max_length: int, batch_size: int = 64,
                   device_id: Optional[int] = None) -> EvalSet:
    """Decode the whole held-out split with the eval transform (CPU tensors) and tokenize its captions."""
    index = build_eval_index(cfg)
    stats = dict(index.stats, read_errors=0)
    images = decode_eval_images(cfg, index, image_size, batch_size, stats, device_id)
    ids, mask = tokenize(tokenizer, index.captions, max_length)
    txt2img = torch.as_tensor(index.sample_image, dtype=torch.int64)
    img2txt: List[List[int]] = [[] for _ in range(index.num_images)]
    for t, i in enumerate(index.sample_image.tolist()):
        img2txt[i].append(t)
    return EvalSet(images, ids, mask, txt2img, img2txt, list(index.captions), list(index.names), stats)


def decode_eval_images(cfg: DataConfig, index: SampleIndex, image_size: int, batch_size: int,
                       stats: Dict[str, int], device_id: Optional[int] = None) -> torch.Tensor:
    """(N_img, 3, S, S) float32 CPU: every image of `index`, resized and normalised (eval transform)."""
    read = _ByteReader(index, stats)
    n = index.num_images
    chunks = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if cfg.backend == "dali":
        from . import dali_pipeline

        dali_pipeline.require_dali()
        with ThreadPoolExecutor(cfg.num_threads) as pool:

            def source(info):
                if info.iteration >= len(chunks):
                    raise StopIteration
                rows = chunks[info.iteration]
                datas = list(pool.map(lambda r: np.frombuffer(read(int(r)), dtype=np.uint8), rows))
                return datas, [np.asarray(r, np.int64) for r in rows]

            parts = [out["images"].cpu() for out in dali_pipeline.run(
                "eval", source, batch_size=batch_size, size=image_size, num_threads=cfg.num_threads,
                decode=cfg.decode, device_id=device_id)]
    else:
        from . import torch_pipeline as tp

        with ThreadPoolExecutor(cfg.num_threads) as pool:
            parts = [tp.eval_batch(pool, [read(int(r)) for r in rows], image_size) for rows in chunks]
    images = torch.cat(parts)  # (N_img, 3, S, S)
    if images.shape[0] != n:
        raise RuntimeError(f"eval decoding returned {images.shape[0]} images, expected {n}")
    return images
