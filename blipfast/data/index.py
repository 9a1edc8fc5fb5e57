"""The sample index: every (image, caption) pair of a dataset, with its image vetted before use.

Why an index, and why vet images here: DALI's decoders cannot skip a corrupt image (one bad
JPEG stops the whole pipeline), so nothing reaches DALI that has not been checked. When the
index is built, every image is opened with PIL: `check_images: decode` decodes it fully,
`header` reads the header and checks that a JPEG ends with its EOI marker and a PNG with IEND
(catches truncation, the common failure, at a fraction of the cost). A missing, unreadable,
corrupt or non-DALI-format image is skipped, counted in `stats` and logged. Results are cached
per source (annotation file or tar shard) in `cache_dir`, keyed on file sizes and mtimes, so a
restart re-checks nothing that did not change.

Both formats become the same table of byte ranges: a JSON annotation's image is a whole file,
a webdataset sample's image is an (offset, size) range inside its tar, found by scanning the
tar headers once (the information a wds2idx index holds). The loader then reads exactly those
bytes and hands them to DALI through `external_source`, which keeps the GPU path (`mixed`
nvJPEG decoding) and lets every rank address any sample of a global, seeded order.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import stat
import zlib
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .captions import pre_caption
from ..atomic import atomic_write_json
from .config import DataConfig, DataError

log = logging.getLogger("blipfast.data")

# Formats DALI's image decoder reads (PIL format names).
DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # webdataset image components, in order of preference
CACHE_VERSION = 2  # 2: checks record the bytes' CRC-32
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # DataConfig.max_image_bytes


@dataclass
class SampleIndex:
    """(image, caption) pairs: `sample_image[i]` is the image row of sample i, `captions[i]` its text."""

    names: List[str]  # per image: path, or "shard.tar::member" (for messages)
    files: List[str]  # per image: the file that holds its bytes
    offsets: np.ndarray  # int64 per image: byte offset in the file (0 for plain files)
    sizes: np.ndarray  # int64 per image: byte length (-1: the whole file)
    widths: np.ndarray  # int32 per image
    heights: np.ndarray  # int32 per image
    sample_image: np.ndarray  # int64 per sample: image row
    captions: List[str]  # per sample: cleaned caption
    stats: Dict[str, int] = field(default_factory=dict)
    max_bytes: int = DEFAULT_MAX_BYTES  # data.max_image_bytes: a whole-file image larger than this is not read
    crcs: Optional[np.ndarray] = None  # int64 per image: CRC-32 of the bytes that passed the check (-1: unknown)
    check_mode: str = ""  # data.check_images the index was built with ("header": not decoded yet)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_images(self) -> int:
        return len(self.names)

    def read_image_bytes(self, row: int) -> bytes:
        if self.sizes[row] < 0:
            return read_regular_file(self.files[row], self.max_bytes)
        with open(self.files[row], "rb") as f:
            f.seek(int(self.offsets[row]))
            data = f.read(int(self.sizes[row]))
        if len(data) != self.sizes[row]:
            raise OSError(f"{self.names[row]}: read {len(data)} of {self.sizes[row]} bytes")
        return data


# ---------------------------------------------------------------------------------------------
# reading untrusted paths


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes; OSError otherwise. Opened non-blocking, so
    a FIFO or device named by an annotation cannot hang the reader."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise OSError(f"{path}: {st.st_size} bytes, more than data.max_image_bytes ({max_bytes})")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"{path}: more than data.max_image_bytes ({max_bytes}) bytes")
    return data


def inside_root(path: str, root: str) -> bool:
    """path (symlinks resolved) lies under root (symlinks resolved)."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def confined_paths(root: str, images: Sequence[str], allow_outside: bool) -> Tuple[List[str], set]:
    """(joined paths, the set of those outside root). Absolute paths and '..' are joined as given
    and then judged: with allow_outside false, anything that resolves outside root is refused."""
    paths = [os.path.join(root, im) for im in images]
    outside = set() if allow_outside else {p for p in paths if not inside_root(p, root)}
    return paths, outside


OUTSIDE_HINT = "outside the image root; set data.allow_outside_root: true to allow it"


# ---------------------------------------------------------------------------------------------
# image checks


def check_image(data: bytes, mode: str = "decode") -> Tuple[bool, int, int, str]:
    """(ok, width, height, reason) for encoded image bytes; never raises."""
    from PIL import Image

    if not data:
        return False, 0, 0, "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            fmt, (w, h) = im.format, im.size
            if fmt not in DALI_FORMATS:
                return False, 0, 0, f"unsupported image format {fmt}"
            tail = data.rstrip(b"\x00\r\n ")[-12:]
            if fmt == "JPEG" and not tail.endswith(b"\xff\xd9"):
                return False, 0, 0, "truncated JPEG (no end-of-image marker)"
            if fmt == "PNG" and b"IEND" not in tail:
                return False, 0, 0, "truncated PNG (no IEND chunk)"
            if mode == "decode":
                im.load()  # raises on truncated or broken data (PIL's LOAD_TRUNCATED_IMAGES must stay False)
    except Exception as e:  # PIL raises many types for bad data: all mean "skip it"
        return False, 0, 0, f"cannot decode: {type(e).__name__}: {e}"
    if w < 1 or h < 1:
        return False, 0, 0, f"empty image {w}x{h}"
    return True, int(w), int(h), ""


class _Cache:
    """Per-source JSON cache of image checks, written atomically."""

    def __init__(self, cache_dir: str, kind: str, source: str, extra: str):
        self.path = None
        if cache_dir == "none":
            return
        if cache_dir == "auto":
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            cache_dir = os.path.join(base, "blipfast", "data")
        key = hashlib.sha1(f"{CACHE_VERSION}|{kind}|{os.path.abspath(source)}|{extra}".encode()).hexdigest()
        self.path = os.path.join(cache_dir, f"{kind}-{key[:20]}.json")

    def load(self) -> dict:
        if self.path and os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    return json.load(f)
            except (OSError, ValueError):
                log.warning("ignoring unreadable data cache %s", self.path)
        return {}

    def save(self, data: dict) -> None:
        if not self.path:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write_json(self.path, data)
        except OSError as e:  # a read-only cache location only costs speed
            log.warning("cannot write data cache %s: %s", self.path, e)


def _stamp(path: str) -> List[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------------------------------------
# sources


class _Builder:
    """Accumulates images and samples from several sources, with counters for what was skipped."""

    def __init__(self, max_words: int):
        self.max_words = max_words
        self.names: List[str] = []
        self.files: List[str] = []
        self.offsets: List[int] = []
        self.sizes: List[int] = []
        self.widths: List[int] = []
        self.heights: List[int] = []
        self.sample_image: List[int] = []
        self.captions: List[str] = []
        self.crcs: List[int] = []
        self.stats = dict(missing=0, skipped_corrupt=0, skipped_samples=0, missing_caption=0, empty_caption=0)
        self.examples: Dict[str, List[str]] = {}
        self.rows: Dict[object, int] = {}  # image key (image_id, else the path) -> row

    def note(self, what: str, text: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1
        ex = self.examples.setdefault(what, [])
        if len(ex) < 3:
            ex.append(text)

    def add(self, name, file, offset, size, w, h, captions: Sequence[str], key=None, crc: int = -1) -> None:
        """key: what identifies the image (an annotation's image_id, else its name): entries with the
        same key share one row, i.e. one image id (the original maps each image_id to one index)."""
        cleaned = [pre_caption(c, self.max_words) for c in captions]
        kept = [c for c in cleaned if c]
        for _ in range(len(cleaned) - len(kept)):
            self.note("empty_caption", name)
        if not kept:
            return
        key = ("name", name) if key is None else key
        if key in self.rows:
            row = self.rows[key]
            if self.names[row] != name:
                raise DataError(f"image_id {key[-1]!r} names two different images: {self.names[row]} and {name}")
            for c in kept:
                self.sample_image.append(row)
                self.captions.append(c)
            return
        row = len(self.names)
        self.rows[key] = row
        self.names.append(name)
        self.files.append(file)
        self.offsets.append(offset)
        self.sizes.append(size)
        self.widths.append(w)
        self.heights.append(h)
        self.crcs.append(crc)
        for c in kept:
            self.sample_image.append(row)
            self.captions.append(c)

    def finish(self, what: str) -> SampleIndex:
        for key, ex in self.examples.items():
            log.warning("%s: %d %s, e.g. %s", what, self.stats[key], key.replace("_", " "), "; ".join(ex))
        self.stats.update(num_images=len(self.names), num_samples=len(self.captions))
        return SampleIndex(
            names=self.names,
            files=self.files,
            offsets=np.asarray(self.offsets, dtype=np.int64),
            sizes=np.asarray(self.sizes, dtype=np.int64),
            widths=np.asarray(self.widths, dtype=np.int32),
            heights=np.asarray(self.heights, dtype=np.int32),
            sample_image=np.asarray(self.sample_image, dtype=np.int64),
            captions=self.captions,
            stats=dict(self.stats),
            crcs=np.asarray(self.crcs, dtype=np.int64),
        )


def read_json(path: str, what: str):
    """The JSON document in `path`; DataError naming `what` and the file when it is missing or
    not valid JSON (UTF-8 errors included)."""
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{what} {path} is not valid JSON: {e}") from None


def load_annotations(path: str) -> List[dict]:
    """A BLIP annotation file: a JSON list of {"image": str, "caption": str | [str, ...], ...}."""
    ann = read_json(path, "annotation file")
    if not isinstance(ann, list):
        raise DataError(f"annotation file {path}: expected a JSON list of {{image, caption}}, got {type(ann).__name__}")
    if not ann:
        raise DataError(f"annotation file {path} is empty (no entries)")
    for i, e in enumerate(ann):
        ok = isinstance(e, dict) and isinstance(e.get("image"), str)
        cap = e.get("caption") if isinstance(e, dict) else None
        ok = ok and (isinstance(cap, str) or (isinstance(cap, list) and all(isinstance(c, str) for c in cap)))
        if not ok:
            raise DataError(
                f"annotation file {path}, entry {i}: expected {{'image': str, 'caption': str or list of str}}, got {e!r:.200}"
            )
    return ann


def _check_files(paths: List[str], mode: str, threads: int, cache: _Cache,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> Dict[str, list]:
    """path -> [size, mtime_ns, ok, w, h, reason, crc32] ('missing' reason when absent), using the cache.
    Only regular files of at most max_bytes are read."""
    cached = cache.load().get("images", {})
    out, todo = {}, []
    for p in dict.fromkeys(paths):
        try:
            stamp = _stamp(p)
        except OSError:
            out[p] = [-1, -1, False, 0, 0, "missing", -1]
            continue
        hit = cached.get(p)
        if hit and hit[:2] == stamp:
            out[p] = hit
        else:
            todo.append((p, stamp))

    def run(item):
        p, stamp = item
        try:
            data = read_regular_file(p, max_bytes)
        except OSError as e:
            return p, [-1, -1, False, 0, 0, f"unreadable: {e}", -1]
        return p, stamp + list(check_image(data, mode)) + [zlib.crc32(data)]

    if todo:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            out.update(pool.map(run, todo))
        cache.save({"images": {p: v for p, v in out.items() if v[0] >= 0}})
    return out


def _add_json_source(b: _Builder, ann_file: str, image_root: str, cfg: DataConfig) -> None:
    ann = load_annotations(ann_file)
    root = image_root or os.path.dirname(os.path.abspath(ann_file))
    if not os.path.isdir(root):
        raise DataError(f"image root not found: {root} (images of {ann_file} are looked up there)")
    paths, outside = confined_paths(root, [e["image"] for e in ann], cfg.allow_outside_root)
    cache = _Cache(cfg.cache_dir, "json", ann_file, f"{root}|{cfg.check_images}|{cfg.max_image_bytes}")
    checks = _check_files([p for p in paths if p not in outside], cfg.check_images, cfg.num_threads, cache,
                          cfg.max_image_bytes)
    before = b.stats["missing"]
    for e, p in zip(ann, paths):
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        if p in outside:
            b.note("outside_root", f"{p} ({OUTSIDE_HINT})")
            b.stats["skipped_samples"] += len(caps)
            continue
        size, _, ok, w, h, reason, crc = checks[p]
        if not ok:
            b.note("missing" if reason == "missing" else "skipped_corrupt", f"{p} ({reason})")
            b.stats["skipped_samples"] += len(caps)
            continue
        b.add(p, p, 0, -1, w, h, caps, key=("image_id", ann_file, e["image_id"]) if "image_id" in e else None,
              crc=crc)
    if b.stats["missing"] - before == len(ann) - len(outside) and not outside:
        raise DataError(
            f"none of the {len(ann)} images of {ann_file} exist under the image root {root} "
            f"(first: {paths[0]}); is image_root right?"
        )


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(patterns: Sequence[str]) -> List[str]:
    """Shard paths from patterns with globs and brace ranges ("data/{00000..00099}.tar")."""
    out = []
    for pat in patterns:
        pats = [pat]
        while any(_RANGE.search(p) for p in pats):
            nxt = []
            for p in pats:
                m = _RANGE.search(p)
                if not m:
                    nxt.append(p)
                    continue
                lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
                nxt += [p[: m.start()] + str(i).zfill(width) + p[m.end() :] for i in range(lo, hi + 1)]
            pats = nxt
        found = []
        for p in pats:
            found += sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
        if not found:
            raise DataError(f"webdataset shard pattern {pat!r} matches no file")
        out += found
    return list(dict.fromkeys(out))


def _split_key(name: str) -> Tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def scan_tar(path: str, mode: str, threads: int = 1) -> dict:
    """One pass over a tar: per sample key its image range, caption and check result."""
    samples: Dict[str, dict] = {}
    error = ""
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                s = samples.setdefault(key, {})
                if ext in IMAGE_EXTS and "image" not in s:
                    s["image"] = [m.name, m.offset_data, m.size]
                elif ext == "txt":
                    s["txt"] = tar.extractfile(m).read().decode("utf-8", "replace")
                elif ext == "json":
                    try:
                        meta = json.loads(tar.extractfile(m).read())
                        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                            s["json_caption"] = meta["caption"]
                    except ValueError:
                        pass
    except (tarfile.TarError, OSError) as e:  # a damaged tar: keep what was read before the damage
        error = f"{type(e).__name__}: {e}"
    def check(s):
        _, off, size = s["image"]
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(size)
            s["check"] = list(check_image(data, mode)) + [zlib.crc32(data)]

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(check, [s for s in samples.values() if "image" in s]))
    return {"samples": samples, "error": error}


def _add_tar_source(b: _Builder, path: str, cfg: DataConfig) -> None:
    cache = _Cache(cfg.cache_dir, "tar", path, cfg.check_images)
    stamp = _stamp(path)
    cached = cache.load()
    if cached.get("stamp") == stamp:
        scan = cached["scan"]
    else:
        scan = scan_tar(path, cfg.check_images, cfg.num_threads)
        cache.save({"stamp": stamp, "scan": scan})
    if scan["error"]:
        b.note("damaged_shards", f"{path} ({scan['error']})")
    for key, s in sorted(scan["samples"].items()):
        caption = s.get("txt", s.get("json_caption"))
        if "image" not in s:
            b.note("missing", f"{path}::{key} (no image component)")
            continue
        name, off, size = s["image"]
        ok, w, h, reason, crc = s["check"]
        if not ok:
            b.note("skipped_corrupt", f"{path}::{name} ({reason})")
            b.stats["skipped_samples"] += 1
            continue
        if caption is None:
            b.note("missing_caption", f"{path}::{key}")
            continue
        b.add(f"{path}::{name}", path, off, size, w, h, [caption], crc=crc)


# ---------------------------------------------------------------------------------------------
# entry points


def _synthetic(cfg: DataConfig):
    from .synthetic import generate_synthetic

    s = cfg.synthetic
    return generate_synthetic(s.out_dir, s.num_train, s.num_val, s.seed, s.image_size)


def _require_nonempty(index: SampleIndex, what: str) -> SampleIndex:
    if len(index) == 0:
        st = index.stats
        raise DataError(
            f"{what}: no usable samples (missing images {st.get('missing', 0)}, corrupt images "
            f"{st.get('skipped_corrupt', 0)}, empty captions {st.get('empty_caption', 0)}, "
            f"missing captions {st.get('missing_caption', 0)})"
        )
    return index


def build_train_index(cfg: DataConfig) -> SampleIndex:
    """Index of the pre-training split; raises DataError (naming the path) when it is unusable."""
    index = _build_train_index(cfg)
    index.max_bytes, index.check_mode = cfg.max_image_bytes, cfg.check_images
    return index


def _build_train_index(cfg: DataConfig) -> SampleIndex:
    b = _Builder(cfg.max_words)
    fmt = cfg.format
    if fmt == "synthetic":
        paths = _synthetic(cfg)
        if cfg.synthetic.reader == "json":
            _add_json_source(b, paths.train_json, paths.image_root, cfg)
        else:
            for shard in paths.train_shards:
                _add_tar_source(b, shard, cfg)
        what = f"synthetic data in {paths.root}"
    elif fmt == "json":
        if cfg.image_root and not os.path.isdir(cfg.image_root):
            raise DataError(f"image_root not found: {cfg.image_root}")
        for ann in cfg.ann_files:
            _add_json_source(b, ann, cfg.image_root, cfg)
        what = f"annotations {', '.join(cfg.ann_files)}"
    else:
        shards = expand_shards(cfg.shards)
        for shard in shards:
            _add_tar_source(b, shard, cfg)
        what = f"webdataset shards {', '.join(cfg.shards)}"
    return _require_nonempty(b.finish(what), what)


def build_eval_index(cfg: DataConfig) -> SampleIndex:
    """Index of the held-out split (one sample per caption; captions of an image share its row)."""
    b = _Builder(cfg.max_words)
    if cfg.eval_ann_file:
        root = cfg.eval_image_root or cfg.image_root
        if not root and cfg.format == "synthetic":  # paths relative to the synthetic images
            root = _synthetic(cfg).image_root
        if root and not os.path.isdir(root):
            raise DataError(f"eval image root not found: {root}")
        ann_file = cfg.eval_ann_file
    elif cfg.format == "synthetic":
        paths = _synthetic(cfg)
        ann_file, root = paths.val_json, paths.image_root
    else:
        raise DataError("data.eval_ann_file is not set: give a held-out annotation JSON for evaluation")
    _add_json_source(b, ann_file, root, cfg)
    # The same image listed in several entries (one caption each, as in COCO Karpathy train) is one image.
    index = _require_nonempty(_merge_duplicate_images(b.finish(ann_file)), ann_file)
    index.max_bytes, index.check_mode = cfg.max_image_bytes, cfg.check_images
    return index


def _merge_duplicate_images(index: SampleIndex) -> SampleIndex:
    first: Dict[str, int] = {}
    remap = np.empty(index.num_images, dtype=np.int64)
    keep = []
    for row, name in enumerate(index.names):
        if name not in first:
            first[name] = len(keep)
            keep.append(row)
        remap[row] = first[name]
    if len(keep) == index.num_images:
        return index
    rows = np.asarray(keep)
    index.names = [index.names[r] for r in keep]
    index.files = [index.files[r] for r in keep]
    index.offsets, index.sizes = index.offsets[rows], index.sizes[rows]
    index.widths, index.heights = index.widths[rows], index.heights[rows]
    if index.crcs is not None:
        index.crcs = index.crcs[rows]
    index.sample_image = remap[index.sample_image]
    index.stats["num_images"] = len(keep)
    return index
