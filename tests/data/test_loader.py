"""The pre-training loader and eval set: DALI on the CPU and the PIL backend, both formats,
transforms, sharding, resume, bad data and clear errors."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from blipfast.config import ConfigError
from blipfast.data import (
    DataConfig, DataError, build_demo_tokenizer, build_eval_set, build_pretrain_loader, generate_synthetic,
    pre_caption, tokenize,
)
from blipfast.data.augment import CLIP_MEAN, CLIP_STD, EQUALIZE

BACKENDS = ["dali", "torch"]
S, B, L = 32, 4, 16  # output image side, per-rank batch, text length


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("synth")), num_train=40, num_val=8, seed=0, image_size=48)


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def make_cfg(synth, cache, **kw):
    base = {"format": "synthetic", "synthetic": {"out_dir": synth.root, "num_train": 40, "num_val": 8,
                                                 "seed": 0, "image_size": 48}, "cache_dir": cache}
    return DataConfig.from_dict({**base, **kw})


def collect(loader, epoch, start_step=0):
    return [{k: v.clone() for k, v in b.items()} for b in loader.epoch(epoch, start_step)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_contract(synth, cache, tok, backend):
    loader = build_pretrain_loader(make_cfg(synth, cache, backend=backend), tok, S, B, L, rank=0, world_size=2, seed=0)
    assert len(loader) == 40 // (B * 2)
    batches = collect(loader, 0)
    assert len(batches) == len(loader)
    with open(synth.train_json) as f:
        entries = json.load(f)
    captions = [pre_caption(e["caption"], 30) for e in entries]
    for b in batches:
        assert b["images"].shape == (B, 3, S, S) and b["images"].dtype == torch.float32
        assert b["input_ids"].shape == b["attention_mask"].shape == (B, L)
        assert b["input_ids"].dtype == b["attention_mask"].dtype == b["index"].dtype == torch.int64
        ids, mask = tokenize(tok, [captions[i] for i in b["index"].tolist()], L)  # captions follow the index
        assert torch.equal(b["input_ids"], ids) and torch.equal(b["attention_mask"], mask)
        assert torch.isfinite(b["images"]).all()
        # image ids: each sample's image row, shared by all captions of one image
        assert b["image_id"].dtype == torch.int64 and b["image_id"].shape == (B,)
        for i, r in zip(b["index"].tolist(), b["image_id"].tolist()):
            assert loader.index.names[r].endswith(entries[i]["image"]), (loader.index.names[r], entries[i]["image"])
    assert loader.stats["skipped_corrupt"] == loader.stats["missing"] == 0
    assert loader.stats["num_samples"] == 40


def test_json_and_webdataset_readers_agree(synth, cache, tok):
    """The same synthetic data read from its JSON and from its tar shards gives identical batches."""
    out = {}
    for reader in ("json", "webdataset"):
        cfg = make_cfg(synth, cache)
        cfg.synthetic.reader = reader
        out[reader] = collect(build_pretrain_loader(cfg, tok, S, B, L, seed=5), 2)
    assert len(out["json"]) == len(out["webdataset"]) == 10
    for a, b in zip(out["json"], out["webdataset"]):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def _flat_dataset(root, colours, sizes):
    os.makedirs(root / "img", exist_ok=True)
    ann = []
    for i, (c, wh) in enumerate(zip(colours, sizes)):
        Image.new("RGB", wh, c).save(root / "img" / f"{i}.png")  # lossless: the colour is exact
        ann.append({"image": f"img/{i}.png", "caption": f"colour {i}"})
    (root / "ann.json").write_text(json.dumps(ann))
    return str(root / "ann.json")


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalisation_on_flat_images(tmp_path, cache, tok, backend):
    colours = [(200, 100, 50), (0, 255, 128), (10, 20, 30), (255, 255, 255)]
    ann = _flat_dataset(tmp_path, colours, [(40, 30), (17, 50), (64, 64), (33, 33)])
    cfg = DataConfig.from_dict({"format": "json", "ann_files": [ann], "backend": backend, "cache_dir": cache,
                                "rand_augment": False, "eval_ann_file": ann})
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expect = [(torch.tensor(c, dtype=torch.float32)[:, None, None] / 255 - mean) / std for c in colours]
    (batch,) = collect(build_pretrain_loader(cfg, tok, S, 4, L), 0)
    for img, i in zip(batch["images"], batch["index"].tolist()):
        torch.testing.assert_close(img, expect[i].expand(3, S, S), atol=1e-4, rtol=0)
    ev = build_eval_set(cfg, tok, S, L)
    for i in range(4):
        torch.testing.assert_close(ev.images[i], expect[i].expand(3, S, S), atol=1e-4, rtol=0)


def test_dali_matches_pil_backend(synth, cache, tok):
    """Same draws, two implementations: DALI flips last and conjugates the warp, PIL follows BLIP's order.
    Samples that drew equalize are left out: DALI's equalize is OpenCV's rule, not PIL's (documented)."""
    out = {b: build_pretrain_loader(make_cfg(synth, cache, backend=b), tok, S, 8, L, seed=1) for b in BACKENDS}
    dali, pil = (collect(out[b], 0) for b in BACKENDS)
    checked_flip_warp = 0
    for a, b in zip(dali, pil):
        assert torch.equal(a["index"], b["index"])
        for j, i in enumerate(a["index"].tolist()):
            aug = out["dali"].augment(0, i)
            if EQUALIZE in (aug.pre, aug.post):
                continue
            err = (a["images"][j] - b["images"][j]).abs().mean().item()
            assert err < 0.05, (i, aug.ops, err)
            checked_flip_warp += bool(aug.flip and aug.warp is not None)
    assert checked_flip_warp >= 1
    ev = {b: build_eval_set(make_cfg(synth, cache, backend=b), tok, S, L) for b in BACKENDS}
    torch.testing.assert_close(ev["dali"].images, ev["torch"].images, atol=0.02, rtol=0)  # <= 1 grey level


def test_sharding_two_ranks(synth, cache, tok):
    cfg = make_cfg(synth, cache)
    ranks = [build_pretrain_loader(cfg, tok, S, B, L, rank=r, world_size=2, seed=7) for r in range(2)]
    seen = [torch.cat([b["index"] for b in collect(ld, 3)]).tolist() for ld in ranks]
    assert not set(seen[0]) & set(seen[1])
    order = ranks[0].order(3)
    assert np.array_equal(order, ranks[1].order(3))  # the same global order on every rank
    assert sorted(seen[0] + seen[1]) == sorted(order[: len(ranks[0]) * B * 2].tolist())
    # Global step g is rank 0's batch then rank 1's batch, in the order.
    assert seen[0][:B] + seen[1][:B] == order[: 2 * B].tolist()
    assert not np.array_equal(order, ranks[0].order(4))  # reshuffled every epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bitwise(synth, cache, tok, backend):
    cfg = make_cfg(synth, cache, backend=backend)
    full = collect(build_pretrain_loader(cfg, tok, S, B, L, rank=1, world_size=2, seed=2), 1)
    tail = collect(build_pretrain_loader(cfg, tok, S, B, L, rank=1, world_size=2, seed=2), 1, start_step=3)
    assert len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert collect(build_pretrain_loader(cfg, tok, S, B, L, rank=1, world_size=2, seed=2), 1, start_step=len(full)) == []


def _jpeg(colour, size=(24, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("check", ["decode", "header"])
def test_skips_corrupt_and_missing_images(tmp_path, cache, tok, caplog, check):
    (tmp_path / "img").mkdir()
    ann = []
    for i in range(8):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg((30 * i, 50, 90)))
        ann.append({"image": f"img/{i}.jpg", "caption": [f"good {i}"]})
    good = _jpeg((1, 2, 3), (64, 48))
    (tmp_path / "img" / "garbage.jpg").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)))
    (tmp_path / "img" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")  # decodable by PIL, not by DALI
    (tmp_path / "img" / "anim.jpg").write_bytes(buf.getvalue())
    ann += [{"image": f"img/{n}.jpg", "caption": "bad"} for n in ("garbage", "truncated", "anim", "absent")]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    cfg = DataConfig.from_dict({"format": "json", "ann_files": [str(tmp_path / "ann.json")],
                                "image_root": str(tmp_path), "cache_dir": cache, "num_threads": 1,
                                "check_images": check})
    with caplog.at_level("WARNING", logger="blipfast.data"):
        loader = build_pretrain_loader(cfg, tok, S, 2, L)
    st = loader.stats
    assert (st["skipped_corrupt"], st["missing"], st["num_samples"]) == (3, 1, 8)
    assert "garbage.jpg" in caplog.text and "absent.jpg" in caplog.text
    batches = collect(loader, 0)  # DALI decodes only vetted images: no crash
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(8))
    # An image that disappears after indexing is replaced and counted, never a crash.
    os.remove(tmp_path / "img" / "3.jpg")
    assert len(collect(loader, 1)) == 4 and loader.stats["read_errors"] == 1


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_captions_and_bad_members(tmp_path, cache, tok):
    _tar(tmp_path / "a-000.tar", [
        ("s0.jpg", _jpeg((200, 0, 0))), ("s0.txt", b"A Red image."),
        ("s1.jpg", _jpeg((0, 200, 0))), ("s1.json", json.dumps({"caption": "green (json)"}).encode()),
        ("s2.jpg", b"\xff\xd8not a jpeg\xff\xd9"), ("s2.txt", b"corrupt"),
        ("s3.jpg", _jpeg((0, 0, 200))),  # no caption
        ("s4.txt", b"no image"),
    ])
    # webdataset keys run to the first dot of the file name: "k5.seg.png" is component "seg.png" of k5.
    _tar(tmp_path / "a-001.tar", [("d/k5.jpg", _jpeg((9, 9, 9))), ("d/k5.seg.png", b"x"), ("d/k5.txt", b"in a dir")])
    cfg = DataConfig.from_dict({"format": "webdataset", "shards": [str(tmp_path / "a-{000..001}.tar")],
                                "cache_dir": cache})
    loader = build_pretrain_loader(cfg, tok, S, 1, L)
    st = loader.stats
    assert (st["num_samples"], st["skipped_corrupt"], st["missing_caption"], st["missing"]) == (3, 1, 1, 1)
    assert loader.index.captions == ["a red image", "green json", "in a dir"]
    assert len(collect(loader, 0)) == 3


def test_clear_errors(tmp_path, cache, tok, synth, monkeypatch):
    def cfg(**kw):
        return DataConfig.from_dict({"format": "json", "cache_dir": cache, **kw})

    with pytest.raises(DataError, match="annotation file not found: .*nope.json"):
        build_pretrain_loader(cfg(ann_files=[str(tmp_path / "nope.json")]), tok, S, B, L)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json is empty"):
        build_pretrain_loader(cfg(ann_files=[str(tmp_path / "empty.json")]), tok, S, B, L)
    with pytest.raises(DataError, match="image_root not found: /no/such/root"):
        build_pretrain_loader(cfg(ann_files=[synth.train_json], image_root="/no/such/root"), tok, S, B, L)
    with pytest.raises(DataError, match=f"none of the 40 images .* under the image root {tmp_path}"):
        build_pretrain_loader(cfg(ann_files=[synth.train_json], image_root=str(tmp_path)), tok, S, B, L)
    (tmp_path / "bad.json").write_text(json.dumps([{"img": "x.jpg"}]))
    with pytest.raises(DataError, match="bad.json, entry 0"):
        build_pretrain_loader(cfg(ann_files=[str(tmp_path / "bad.json")]), tok, S, B, L)
    with pytest.raises(DataError, match="matches no file"):
        build_pretrain_loader(DataConfig.from_dict({"format": "webdataset", "shards": [str(tmp_path / "*.tar")]}),
                              tok, S, B, L)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_pretrain_loader(cfg(ann_files=[synth.train_json], image_root=synth.image_root), tok, S, 16, L,
                              rank=0, world_size=4)
    with pytest.raises(ConfigError, match="unknown key.*'annotation'"):
        DataConfig.from_dict({"annotation": "x.json"})
    with pytest.raises(ConfigError, match="needs ann_files"):
        DataConfig.from_dict({"format": "json"})
    with pytest.raises(DataError, match="eval_ann_file is not set"):
        build_eval_set(cfg(ann_files=[synth.train_json]), tok, S, L)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'mixed'.*CUDA is not available"):
            build_pretrain_loader(make_cfg(synth, cache, decode="mixed"), tok, S, B, L)
    from blipfast.data import dali_pipeline

    monkeypatch.setattr(dali_pipeline, "HAVE_DALI", False)  # as on a machine without the DALI wheel
    with pytest.raises(ImportError, match="nvidia-dali-cuda130.*backend: torch"):
        build_pretrain_loader(make_cfg(synth, cache), tok, S, B, L)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_set(synth, cache, tok, backend):
    ev = build_eval_set(make_cfg(synth, cache, backend=backend), tok, S, L)
    with open(synth.val_json) as f:
        val = json.load(f)
    assert ev.images.shape == (8, 3, S, S) and ev.images.dtype == torch.float32
    assert ev.input_ids.shape == ev.attention_mask.shape == (16, L)
    assert ev.captions == [pre_caption(c, 30) for e in val for c in e["caption"]]
    assert ev.txt2img.tolist() == [i for i in range(8) for _ in range(2)]
    assert ev.img2txt == [[2 * i, 2 * i + 1] for i in range(8)]
    # Independent eval transform: PIL bicubic resize to S x S, then CLIP normalisation.
    mean, std = np.array(CLIP_MEAN) * 255, np.array(CLIP_STD) * 255
    for i in (0, 7):
        img = Image.open(os.path.join(synth.image_root, val[i]["image"])).convert("RGB").resize((S, S), Image.BICUBIC)
        ref = torch.from_numpy(((np.asarray(img, np.float64) - mean) / std).transpose(2, 0, 1)).float()
        assert (ev.images[i] - ref).abs().mean() < 0.02
    # Several entries naming one image (COCO-train style) become one image with several texts.
    dup = os.path.join(synth.root, "dup.json")
    with open(dup, "w") as f:
        json.dump([{"image": val[0]["image"], "caption": "first"}, {"image": val[1]["image"], "caption": "x"},
                   {"image": val[0]["image"], "caption": "second"}], f)
    ev2 = build_eval_set(make_cfg(synth, cache, backend=backend, eval_ann_file=dup), tok, S, L)
    assert ev2.images.shape[0] == 2 and ev2.img2txt == [[0, 2], [1]] and ev2.txt2img.tolist() == [0, 1, 0]


def test_check_cache_follows_file_changes(tmp_path):
    from blipfast.data.index import build_train_index

    ann = _flat_dataset(tmp_path, [(1, 2, 3), (4, 5, 6)], [(8, 8), (9, 9)])
    cfg = DataConfig.from_dict({"format": "json", "ann_files": [ann], "cache_dir": str(tmp_path / "cache")})
    assert build_train_index(cfg).stats["skipped_corrupt"] == 0
    assert len(os.listdir(tmp_path / "cache")) == 1
    (tmp_path / "img" / "1.png").write_bytes(b"\x89PNG broken")  # new size and mtime: checked again
    assert build_train_index(cfg).stats["skipped_corrupt"] == 1
    cfg.cache_dir = "none"
    assert build_train_index(cfg).stats["skipped_corrupt"] == 1
