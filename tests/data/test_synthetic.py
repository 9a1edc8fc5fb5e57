"""The embedded synthetic dataset: deterministic, idempotent, captions that match the pixels."""
import hashlib
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from blipfast.data import build_demo_tokenizer, generate_synthetic
from blipfast.data.synthetic import COLOURS, POSITIONS, POSITION_PHRASES, SHAPES, SIZES

N_TRAIN, N_VAL, SIZE = 48, 24, 64


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name in ("manifest.json", ".lock"):
                continue  # the manifest holds absolute paths
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("synth")), N_TRAIN, N_VAL, seed=3, image_size=SIZE)


def test_deterministic_and_seeded(synth, tmp_path):
    again = generate_synthetic(str(tmp_path / "again"), N_TRAIN, N_VAL, seed=3, image_size=SIZE)
    other = generate_synthetic(str(tmp_path / "other"), N_TRAIN, N_VAL, seed=4, image_size=SIZE)
    assert _digest(synth.root) == _digest(again.root)
    assert _digest(synth.root) != _digest(other.root)


def test_idempotent(synth):
    stamp = os.stat(synth.train_json).st_mtime_ns, os.stat(synth.train_shards[0]).st_mtime_ns
    assert generate_synthetic(synth.root, N_TRAIN, N_VAL, seed=3, image_size=SIZE) == synth
    assert (os.stat(synth.train_json).st_mtime_ns, os.stat(synth.train_shards[0]).st_mtime_ns) == stamp
    with open(synth.manifest) as f:
        assert json.load(f)["params"]["num_train"] == N_TRAIN


def test_annotations_and_splits(synth):
    with open(synth.train_json) as f:
        train = json.load(f)
    with open(synth.val_json) as f:
        val = json.load(f)
    assert len(train) == N_TRAIN and len(val) == N_VAL
    assert all(isinstance(e["caption"], str) for e in train)
    assert all(isinstance(e["caption"], list) and len(e["caption"]) == 2 for e in val)
    assert len({e["caption"][0] for e in val}) == N_VAL  # unique held-out scenes: recall@1 is well defined
    assert not {e["image"] for e in train} & {e["image"] for e in val}
    for e in train + val:
        with Image.open(os.path.join(synth.image_root, e["image"])) as im:
            assert im.size == (SIZE, SIZE) and im.format == "JPEG"
    tok = build_demo_tokenizer()
    for e in train + val:
        for c in e["caption"] if isinstance(e["caption"], list) else [e["caption"]]:
            assert tok.unk_token_id not in tok(c)["input_ids"], c


def test_shards_mirror_the_json(synth):
    with open(synth.val_json) as f:
        val = json.load(f)
    with tarfile.open(synth.val_shards[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000.jpg", "000000.txt", "000000.json"]
        for i, e in enumerate(val):
            key = f"{i:06d}"
            assert tar.extractfile(f"{key}.txt").read().decode() == e["caption"][0]
            assert json.loads(tar.extractfile(f"{key}.json").read())["caption"] == e["caption"][0]
            with open(os.path.join(synth.image_root, e["image"]), "rb") as f:
                assert tar.extractfile(f"{key}.jpg").read() == f.read()


def _parse(caption):
    """[(size, colour, shape, position)] from a canonical caption."""
    phrase_to_pos = {v: k for k, v in POSITION_PHRASES.items()}
    out = []
    for part in caption.split(" and "):
        words = part.split()
        assert words[0] == "a" and words[1] in SIZES and words[2] in COLOURS and words[3] in SHAPES, part
        out.append((words[1], words[2], words[3], phrase_to_pos[" ".join(words[4:])]))
    return out


def test_captions_describe_the_pixels(synth):
    """Independent check from the pixels: the named colour sits at each named position, the other
    positions show grey background, and large objects cover more pixels than small ones."""
    with open(synth.val_json) as f:
        val = json.load(f)
    areas = {"small": [], "large": []}
    for e in val:
        img = np.asarray(Image.open(os.path.join(synth.image_root, e["image"])), dtype=np.float32)
        objs = _parse(e["caption"][0])
        assert e["caption"][1] == "there is " + " and ".join(
            " ".join(["a", s, c, sh, POSITION_PHRASES[p]]) for s, c, sh, p in reversed(objs))
        named = {p for *_, p in objs}
        for pos, (fx, fy) in POSITIONS.items():
            x, y = int(fx * SIZE), int(fy * SIZE)
            patch = img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)  # 3x3 around the nominal centre
            if pos in named:
                size, colour, _, _ = next(o for o in objs if o[3] == pos)
                assert np.abs(patch - np.array(COLOURS[colour])).max() < 45, (e, pos, patch)
                r = int(0.2 * SIZE)
                win = img[max(0, y - r) : y + r, max(0, x - r) : x + r]
                areas[size].append(int((np.abs(win - np.array(COLOURS[colour])).max(-1) < 45).sum()))
            else:
                assert np.ptp(patch) < 20 and patch.mean() > 180, (e, pos, patch)  # grey background
    assert areas["small"] and areas["large"]
    assert max(areas["small"]) < min(areas["large"])
