"""The embedded default dataset: coloured shapes with captions that describe them, made by blipfast.

Each image (default 64 x 64 JPEG) shows one or two filled shapes on a noisy light-grey
background. An object is a size (small / large), a colour (6), a shape (circle / square /
triangle) and a position (left / right / top / bottom / center); two objects never share a
position. The caption names every object and nothing else, so it is determined by the image:

    "a large red circle on the left and a small blue square at the bottom"

Objects are listed in the fixed position order left, right, top, bottom, center. A second,
equally true phrasing lists them in reverse order after "there is". Train images carry one of
the two (chosen at random); held-out (val) images carry both, which makes image-to-text
retrieval a multi-caption problem as on COCO. Held-out canonical captions are unique within
the split (so text-to-image recall@1 has one right answer, chance = 1/num_val); most
two-object scenes in it never occur in the train split (the manifest records how many).

Outputs, under `out_dir`:
    images/{train,val}/NNNNNN.jpg
    train.json, val.json        BLIP annotation lists: {"image", "caption", "image_id"}
    vqa_train.json, vqa_val.json, answer_list.json
                                questions about the same images, in the original's VQA format
                                (synthetic_vqa.py)
    shards/{train,val}-NNNNN.tar  webdataset shards as img2dataset writes them:
                                 {key}.jpg, {key}.txt (caption), {key}.json ({"caption", ...})
    manifest.json               the parameters; generation is skipped when they match.

Note for training on it: horizontal flips swap "left" and "right", and strong random crops can
cut an object out, so the demo configs turn flipping off and crop gently (min_scale ~0.9).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from ..atomic import atomic_write_json
from PIL import Image, ImageDraw

FORMAT_VERSION = 2  # 2: VQA annotations (vqa_train.json, vqa_val.json, answer_list.json)

from .scenes import (  # noqa: F401  (re-exported: the dataset's public vocabulary)
    COLOURS, DEMO_WORDS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES, SceneObject)
from .synthetic_vqa import answer_list, make_questions

JITTER = 0.03  # centre jitter, fraction of the side
SHARD_SIZE = 1000

def captions_for(objects: Sequence[SceneObject]) -> Tuple[str, str]:
    """(canonical, variant) captions of a scene; both describe exactly the objects shown."""
    order = list(POSITIONS)
    objs = sorted(objects, key=lambda o: order.index(o.position))
    canonical = " and ".join(o.phrase() for o in objs)
    variant = "there is " + " and ".join(o.phrase() for o in reversed(objs))
    return canonical, variant


def _sample_scene(rng: np.random.Generator) -> List[SceneObject]:
    n = 1 + int(rng.integers(2))
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    objs = []
    for p in positions:
        objs.append(
            SceneObject(
                size=list(SIZES)[rng.integers(len(SIZES))],
                colour=list(COLOURS)[rng.integers(len(COLOURS))],
                shape=SHAPES[rng.integers(len(SHAPES))],
                position=list(POSITIONS)[p],
            )
        )
    return objs


def render_scene(objects: Sequence[SceneObject], rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw `objects` on a noisy grey background; centres are jittered, shapes never overlap."""
    S = image_size
    grey = float(rng.uniform(200, 245))
    for _ in range(100):  # re-draw jitter until no two bounding circles touch
        placed = []
        for o in objects:
            cx, cy = POSITIONS[o.position]
            cx = (cx + rng.uniform(-JITTER, JITTER)) * S
            cy = (cy + rng.uniform(-JITTER, JITTER)) * S
            r = SIZES[o.size] * S * rng.uniform(0.95, 1.05)
            placed.append((o, cx, cy, r))
        if all(
            np.hypot(a[1] - b[1], a[2] - b[2]) > a[3] + b[3] + 1.0
            for i, a in enumerate(placed)
            for b in placed[i + 1 :]
        ):
            break
    img = Image.new("RGB", (S, S), (int(grey),) * 3)
    draw = ImageDraw.Draw(img)
    for o, cx, cy, r in placed:
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif o.shape == "square":
            h = 0.85 * r  # half side: about the circle's area
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
        else:  # upward triangle inscribed in a slightly larger circle (again about equal area)
            R = 1.15 * r
            pts = [(cx + R * np.sin(a), cy - R * np.cos(a)) for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
            draw.polygon(pts, fill=colour)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, size=(S, S, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


@dataclass(frozen=True)
class SyntheticData:
    """Paths of a generated synthetic dataset."""

    root: str
    image_root: str  # the root the JSON "image" paths are relative to
    train_json: str
    val_json: str
    train_shards: Tuple[str, ...]
    val_shards: Tuple[str, ...]
    manifest: str
    vqa_train_json: str = ""  # questions about the train images (synthetic_vqa.py)
    vqa_val_json: str = ""  # questions about the held-out images, answers included
    answer_list: str = ""  # every possible answer (VQA answer ranking's candidates)


def _paths(out_dir: str, num_train: int, num_val: int) -> SyntheticData:
    def shards(split, n):
        return tuple(os.path.join(out_dir, "shards", f"{split}-{i:05d}.tar") for i in range(-(-n // SHARD_SIZE)))

    return SyntheticData(
        root=out_dir,
        image_root=os.path.join(out_dir, "images"),
        train_json=os.path.join(out_dir, "train.json"),
        val_json=os.path.join(out_dir, "val.json"),
        train_shards=shards("train", num_train),
        val_shards=shards("val", num_val),
        manifest=os.path.join(out_dir, "manifest.json"),
        vqa_train_json=os.path.join(out_dir, "vqa_train.json"),
        vqa_val_json=os.path.join(out_dir, "vqa_val.json"),
        answer_list=os.path.join(out_dir, "answer_list.json"),
    )


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the shards are byte-for-byte reproducible
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_split(paths: SyntheticData, split: str, records: List[dict], jpegs: List[bytes]) -> None:
    img_dir = os.path.join(paths.image_root, split)
    os.makedirs(img_dir, exist_ok=True)
    for rec, data in zip(records, jpegs):
        with open(os.path.join(paths.image_root, rec["image"]), "wb") as f:
            f.write(data)
    ann = paths.train_json if split == "train" else paths.val_json
    with open(ann, "w") as f:
        json.dump(records, f, indent=0)
    os.makedirs(os.path.join(paths.root, "shards"), exist_ok=True)
    shard_paths = paths.train_shards if split == "train" else paths.val_shards
    for s, shard in enumerate(shard_paths):
        with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(s * SHARD_SIZE, min((s + 1) * SHARD_SIZE, len(records))):
                rec = records[i]
                key = f"{i:06d}"
                caps = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
                meta = {"caption": caps[0], "captions": caps, "image_id": rec["image_id"], "key": key}
                _tar_add(tar, f"{key}.jpg", jpegs[i])
                _tar_add(tar, f"{key}.txt", caps[0].encode())
                _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())


def _write_vqa(paths: SyntheticData, seed: int, train_scenes, train_records, val_scenes, val_records) -> None:
    """Questions about every image (their own random stream: images and captions do not change)."""

    rng = np.random.default_rng([seed, 0, 3])
    train = make_questions(train_scenes, [r["image"] for r in train_records], rng, per_image=3, first_id=0)
    val = make_questions(val_scenes, [r["image"] for r in val_records], rng, per_image=3, first_id=len(train))
    for path, data in ((paths.vqa_train_json, train), (paths.vqa_val_json, val), (paths.answer_list, answer_list())):
        with open(path, "w") as f:
            json.dump(data, f, indent=0)


@contextlib.contextmanager
def _locked(out_dir: str):
    """Serialise generation between processes (every rank of a launch may call this at once)."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def generate_synthetic(
    out_dir: str, num_train: int = 2000, num_val: int = 200, seed: int = 0, image_size: int = 64
) -> SyntheticData:
    """Write the synthetic dataset to `out_dir` (deterministic in all arguments) and return its paths.

    Idempotent: when `out_dir/manifest.json` records the same parameters, nothing is rewritten.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be positive, got {num_train} and {num_val}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    out_dir = os.path.abspath(out_dir)
    params = dict(version=FORMAT_VERSION, num_train=num_train, num_val=num_val, seed=seed, image_size=image_size)
    paths = _paths(out_dir, num_train, num_val)
    with _locked(out_dir):
        if os.path.isfile(paths.manifest):
            with open(paths.manifest) as f:
                if json.load(f).get("params") == params:
                    return paths
            os.remove(paths.manifest)  # parameters changed: regenerate (old files are overwritten)

        # Independent streams: val never depends on num_train and vice versa.
        scene_rng = {s: np.random.default_rng([seed, k, 0]) for k, s in enumerate(("train", "val"))}
        pixel_rng = {s: np.random.default_rng([seed, k, 1]) for k, s in enumerate(("train", "val"))}
        pick_rng = np.random.default_rng([seed, 0, 2])

        val_records, val_jpegs, seen, val_scenes, train_scenes = [], [], set(), [], []
        for i in range(num_val):
            for _ in range(1000):
                objs = _sample_scene(scene_rng["val"])
                canonical, variant = captions_for(objs)
                if canonical not in seen:
                    break
            else:
                raise ValueError(f"cannot draw {num_val} distinct held-out scenes; use a smaller num_val")
            seen.add(canonical)
            val_scenes.append(objs)
            val_jpegs.append(_jpeg_bytes(render_scene(objs, pixel_rng["val"], image_size)))
            val_records.append({"image": f"val/{i:06d}.jpg", "caption": [canonical, variant], "image_id": f"val_{i:06d}"})

        train_records, train_jpegs, train_canonical = [], [], set()
        for i in range(num_train):
            objs = _sample_scene(scene_rng["train"])
            canonical, variant = captions_for(objs)
            train_canonical.add(canonical)
            train_scenes.append(objs)
            caption = canonical if pick_rng.random() < 0.5 else variant
            train_jpegs.append(_jpeg_bytes(render_scene(objs, pixel_rng["train"], image_size)))
            train_records.append({"image": f"train/{i:06d}.jpg", "caption": caption, "image_id": f"train_{i:06d}"})

        _write_split(paths, "val", val_records, val_jpegs)
        _write_split(paths, "train", train_records, train_jpegs)
        _write_vqa(paths, seed, train_scenes, train_records, val_scenes, val_records)
        unseen = sum(r["caption"][0] not in train_canonical for r in val_records)
        manifest = {
            "params": params,
            "paths": dataclasses.asdict(paths),
            "val_scenes_unseen_in_train": unseen,
            "val_scenes": num_val,
        }
        # the manifest is written last: its presence means "complete"
        atomic_write_json(paths.manifest, manifest, indent=1)
    return paths
