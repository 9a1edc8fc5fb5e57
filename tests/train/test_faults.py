"""Faults and hostile input (issue 15), in one process on one rank (ZeRO-2, CPU): no code runs
from a checkpoint directory, a refused --resume writes nothing, a committed checkpoint is never
deleted before its replacement is committed, export names the tag it read and refuses a damaged
newest one, and bad inputs end with one clear line."""
import json
import os
import shutil

import pytest
import torch

from blipfast.config import ConfigError
from blipfast.train import checkpoint
from tests.dist.train_common import tiny_model_config
from tests.train.test_tasks import SameBatchLoader, run_config


@pytest.fixture(scope="module")
def tokenizer():
    from blipfast.data import build_demo_tokenizer

    return build_demo_tokenizer()


def zero2_run(tmp_path, task="pretrain", **kw):
    run = run_config(tmp_path, task, **kw)
    run.deepspeed = {"zero_optimization": {"stage": 2}}
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A committed ZeRO-2 pre-training run (1 step): its output_dir, copied fresh by each test."""
    from blipfast.train.trainer import Trainer

    root = tmp_path_factory.mktemp("trained")
    run = zero2_run(root, max_steps=1)
    Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer).fit()
    return run.train.output_dir


def copy_run(src, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst)
    return dst


def only_tag(output_dir):
    ckpt = os.path.join(output_dir, "checkpoints")
    tag = checkpoint.find_latest(ckpt)
    assert tag is not None
    return os.path.join(ckpt, tag)


# -- finding 1: no code execution from a checkpoint directory --------------------------------


class Payload:
    """A pickle that would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(tag_dir, name, marker):
    """Replace one file of a committed tag by a malicious pickle and fix up the COMMITTED manifest
    (whoever controls the directory controls the marker too)."""
    path = os.path.join(tag_dir, name)
    torch.save({"x": Payload(marker)}, path)
    info = json.load(open(os.path.join(tag_dir, checkpoint.COMMITTED)))
    info["files"][name] = os.path.getsize(path)
    with open(os.path.join(tag_dir, checkpoint.COMMITTED), "w") as f:
        json.dump(info, f)
    assert checkpoint.is_committed(tag_dir)


SHARDS = ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank0.pt", "mp_rank_00_model_states.pt", "momentum.pt"]


@pytest.mark.parametrize("shard", SHARDS)
def test_malicious_pickle_in_checkpoint_runs_nothing(trained, tmp_path, tokenizer, shard, capsys):
    from blipfast.capfilt import load_model
    from blipfast.train import export
    from blipfast.train.trainer import Trainer

    out = copy_run(trained, tmp_path)
    marker = tmp_path / "PWNED"
    plant(only_tag(out), shard, marker)

    # export CLI: one clear line, exit 2
    assert export.main([out, "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and shard in err, err
    assert not marker.exists() and not (tmp_path / "x.pth").exists()

    # eval / capfilt: eval.checkpoint=DIR
    with pytest.raises(ConfigError, match="refusing"):
        load_model(_pretrain_model(), out)
    assert not marker.exists()

    # train.init_from=DIR
    run = zero2_run(tmp_path / "init", task="retrieval", init_from=out, max_steps=1)
    with pytest.raises(ConfigError, match="refusing"):
        Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer)
    assert not marker.exists()

    # --resume
    run = zero2_run(tmp_path, max_steps=2)
    run.train.output_dir = out
    tr = Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer, resume=True)
    with pytest.raises(ConfigError, match="refusing"):
        tr.resume()
    assert not marker.exists()


def _pretrain_model():
    from blipfast import BlipForPretraining

    return BlipForPretraining(tiny_model_config())


# -- findings 2 and 3: --resume checks the configuration before writing anything ---------------


def snapshot(output_dir):
    out = {}
    for root, _, names in os.walk(output_dir):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, output_dir)] = f.read()
    return out


def test_resume_refuses_math_changes_before_writing_anything(trained, tmp_path, tokenizer, capsys):
    from blipfast.train.trainer import Trainer

    out = copy_run(trained, tmp_path)
    before = snapshot(out)
    run = zero2_run(tmp_path, max_steps=3)
    run.train.output_dir = out
    run.model.queue_size = 32  # the queue: refused
    run.train.batch_size = 8  # the data position (finding 3): refused
    run.model.text.intermediate_size = 128  # the width: refused
    run.train.log_every = 7  # safe
    with pytest.raises(ConfigError) as e:
        Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer, resume=True)
    msg = str(e.value)
    for key in ("model.queue_size: 16 -> 32", "train.batch_size: 4 -> 8", "model.text.intermediate_size: 64 -> 128"):
        assert key in msg, msg
    assert "log_every" not in msg and "max_steps" not in msg and "\n" not in msg
    assert snapshot(out) == before  # config.yaml untouched, nothing written

    # A changed world size (here: the checkpoint says 2 ranks) is refused the same way.
    tag_dir = only_tag(out)
    info = json.load(open(os.path.join(tag_dir, checkpoint.COMMITTED)))
    info["meta"]["world_size"] = 2
    with open(os.path.join(tag_dir, checkpoint.COMMITTED), "w") as f:
        json.dump(info, f)
    before = snapshot(out)
    run = zero2_run(tmp_path, max_steps=3)
    run.train.output_dir = out
    with pytest.raises(ConfigError, match=r"world size: 2 -> 1"):
        Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer, resume=True)
    assert snapshot(out) == before


def test_resume_allows_and_logs_safe_changes(trained, tmp_path, tokenizer, capsys):
    from blipfast.train.trainer import Trainer

    out = copy_run(trained, tmp_path)
    run = zero2_run(tmp_path, max_steps=2, log_every=5, keep_last=1)
    run.deepspeed = {"zero_optimization": {"stage": 1}}  # stages 1 and 2 share the checkpoint layout
    run.train.output_dir = out
    tr = Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer, resume=True)
    printed = capsys.readouterr().out
    for change in ("train.max_steps: 1 -> 2", "train.log_every: 1 -> 5", "deepspeed.zero_optimization.stage: 2 -> 1"):
        assert change in printed, printed
    assert tr.resume() == checkpoint.tag_for(1)
    assert tr.fit()["steps"] == 2


# -- finding 8: a committed checkpoint is never deleted before its replacement is committed -----


def test_saving_a_committed_step_again_keeps_the_committed_checkpoint(tmp_path, tokenizer):
    """The end-of-epoch save after a periodic save of the same step used to delete the committed
    tag and rewrite it (a SIGKILL in between left latest_good pointing at nothing)."""
    from blipfast.train.trainer import Trainer

    run = zero2_run(tmp_path, save_every_steps=2, epochs=1)  # 4 steps: saves at 2 and 4, epoch end at 4
    tr = Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer)
    tr.fit()
    tag_dir = only_tag(run.train.output_dir)
    committed = open(os.path.join(tag_dir, checkpoint.COMMITTED)).read()
    sentinel = os.path.join(tag_dir, "sentinel")  # not in the manifest: any rmtree of the tag removes it
    open(sentinel, "w").close()
    tr.save()  # the same step again
    assert os.path.exists(sentinel), "the committed checkpoint was deleted to be rewritten"
    assert open(os.path.join(tag_dir, checkpoint.COMMITTED)).read() == committed
    assert checkpoint.is_committed(tag_dir)


# -- finding 9: export names the tag it read and refuses a damaged newest checkpoint ------------


def test_export_names_its_tag_and_refuses_a_damaged_newest(trained, tmp_path, capsys):
    from blipfast.train import export

    out = copy_run(trained, tmp_path)
    good = os.path.basename(only_tag(out))
    assert export.main([out, "--out", str(tmp_path / "a.pth")]) == 0
    assert f"exported checkpoint {good}" in capsys.readouterr().out

    newer = os.path.join(out, "checkpoints", checkpoint.tag_for(2))
    shutil.copytree(only_tag(out), newer)
    os.truncate(os.path.join(newer, "rank0.pt"), 10)  # a truncated file
    assert export.main([out, "--out", str(tmp_path / "b.pth")]) == 2
    err = capsys.readouterr().err
    assert checkpoint.tag_for(2) in err and f"--tag {good}" in err, err
    assert not (tmp_path / "b.pth").exists()
    assert export.main([out, "--out", str(tmp_path / "b.pth"), "--tag", good]) == 0
    assert f"exported checkpoint {good}" in capsys.readouterr().out


# -- finding 7: a forward that raises changes no state ------------------------------------------


def _batch(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(7, cfg.text.vocab_size, (B, cfg.max_text_len), generator=g)
    ids[:, 0] = 2
    return images, ids, torch.ones_like(ids)


@pytest.mark.parametrize("fault", ["nan_pixel", "batch_of_one"])
def test_a_forward_that_raises_leaves_queue_and_pointer_untouched(fault):
    from blipfast import BlipForPretraining

    torch.manual_seed(0)
    model = BlipForPretraining(tiny_model_config(queue_size=16)).train()
    images, ids, mask = _batch(model.config, 4)
    model(images, ids, mask, 0.4)  # one clean step: the pointer is now 4
    state = {k: v.clone() for k, v in model.state_dict().items() if k in ("image_queue", "text_queue", "queue_ptr")}
    if fault == "nan_pixel":
        bad_images, bad_ids, bad_mask = images.clone(), ids, mask
        bad_images[1, 0, 3, 3] = float("nan")
    else:
        bad_images, bad_ids, bad_mask = images[:1], ids[:1], mask[:1]
    with pytest.raises(ValueError):
        model(bad_images, bad_ids, bad_mask, 0.4)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), f"{k} changed by a forward that raised"
    out = model(*_batch(model.config, 4, seed=1), 0.4)
    assert torch.isfinite(out.loss_itc)


# -- finding 6: 16-bit PNGs under data.backend=torch are scaled as DALI scales them -------------


def test_16bit_grayscale_png_is_scaled_like_dali():
    import io

    import numpy as np
    from PIL import Image

    from blipfast.data.torch_pipeline import decode_rgb

    vals = np.array([0, 1, 128, 255, 256, 1000, 20000, 32767, 32768, 65280, 65535], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.tile(vals, (3, 1))).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    got = np.asarray(decode_rgb(buf.getvalue()))
    want = np.rint(vals / 257.0).astype(np.uint8)  # what DALI's decoder gives (checked below when installed)
    assert got.shape == (3, len(vals), 3) and got.dtype == np.uint8
    for c in range(3):
        assert got[0, :, c].tolist() == want.tolist()
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
    except ImportError:
        return

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [np.frombuffer(buf.getvalue(), np.uint8)], batch=True,
                               dtype=types.UINT8)
        return fn.decoders.image(x, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    assert np.array_equal(np.array(p.run()[0][0]), got)


# -- finding 10: one clear line and exit 2 instead of a traceback --------------------------------


def test_unwritable_output_directory_is_a_config_error(tmp_path, tokenizer):
    from blipfast.train.trainer import Trainer

    (tmp_path / "file").write_text("not a directory")
    run = zero2_run(tmp_path, max_steps=1)
    run.train.output_dir = str(tmp_path / "file" / "run")
    with pytest.raises(ConfigError, match=r"train.output_dir .*file/run.* cannot be written"):
        Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer)


def test_checkpoint_directory_that_becomes_unwritable_names_it(tmp_path, tokenizer):
    from blipfast.train.checkpoint import CheckpointWriteError
    from blipfast.train.trainer import Trainer

    run = zero2_run(tmp_path, max_steps=2, save_every_steps=1)
    tr = Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer)
    with open(tr.ckpt_dir, "w") as f:  # where the checkpoints go is now a file
        f.write("x")
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*checkpoints"):
        tr.fit()


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, "truncated"])
def test_bad_weight_files_in_eval_and_capfilt_are_config_errors(trained, tmp_path, content):
    from blipfast.capfilt import load_model
    from blipfast.train.export import export

    path = tmp_path / "w.pth"
    if content == "truncated":
        export(trained, str(path))
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=str(path)):
        load_model(_pretrain_model(), str(path))


def test_capfilt_with_weights_of_another_model_size_exits_2(trained, tmp_path, capsys):
    from blipfast import capfilt

    import yaml

    cfg = tmp_path / "capfilt.yaml"
    shutil.copytree(trained, tmp_path / "run")
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]))
    cfg.write_text(
        f"model: {model}\n"
        f"data: {{format: synthetic, backend: torch, cache_dir: none, "
        f"synthetic: {{out_dir: {tmp_path / 'syn'}, num_train: 8, num_val: 4, image_size: 32}}}}\n"
        f"capfilt: {{captioner: {tmp_path / 'run'}, filter: {tmp_path / 'run'}, init_from_pretrain: true, "
        f"out_dir: {tmp_path / 'out'}}}\n")
    rc = capfilt.main(["--config", str(cfg), "model.text.intermediate_size=128", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "shape" in err and "Traceback" not in err, err


def test_export_into_a_missing_directory_exits_2(trained, tmp_path, capsys):
    from blipfast.train import export

    assert export.main([trained, "--out", str(tmp_path / "nowhere" / "x.pth")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_unquoted_brace_shards_are_caught():
    from blipfast.config import parse_overrides

    # what bash makes of data.shards=[d/{000..002}.tar] unquoted
    with pytest.raises(ConfigError, match="quote"):
        parse_overrides(["data.shards=[d/000.tar]", "data.shards=[d/001.tar]", "data.shards=[d/002.tar]"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["data.shards=[d/{000..002}.tar]"])  # braces in an unquoted YAML list
    assert parse_overrides(['data.shards=["d/{000..002}.tar"]', "train.lr=1"]) == {
        "data.shards": ["d/{000..002}.tar"], "train.lr": 1}


@pytest.mark.parametrize("bad", ["float", "out_of_vocab", "negative"])
def test_bad_input_ids_raise_a_clear_error(bad):
    from blipfast import BlipForPretraining

    model = BlipForPretraining(tiny_model_config()).train()
    images, ids, mask = _batch(model.config, 4)
    if bad == "float":
        ids = ids.float()
    else:
        ids[2, 3] = model.config.text.vocab_size + 5 if bad == "out_of_vocab" else -1
    with pytest.raises(ValueError, match="input_ids"):
        model(images, ids, mask, 0.4)


def test_eval_given_a_directory_that_is_not_a_training_output(tmp_path):
    from blipfast.capfilt import load_model

    with pytest.raises(FileNotFoundError, match="not a training output directory"):
        load_model(_pretrain_model(), str(tmp_path))


# -- finding 12 (in process): metrics.jsonl keeps one row per step across a resume --------------


def test_resume_from_an_older_checkpoint_does_not_repeat_metrics_rows(tmp_path, tokenizer):
    from blipfast.train.trainer import Trainer

    run = zero2_run(tmp_path, max_steps=3, save_every_steps=1, keep_last=0)
    Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer).fit()
    ckpt = os.path.join(run.train.output_dir, "checkpoints")
    for step in (2, 3):  # as if killed after logging step 3 with step 1 the newest checkpoint
        shutil.rmtree(os.path.join(ckpt, checkpoint.tag_for(step)))
    tr = Trainer(run, loader=SameBatchLoader(), tokenizer=tokenizer, resume=True)
    assert tr.resume() == checkpoint.tag_for(1)
    tr.fit()
    with open(os.path.join(run.train.output_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3]


# -- finding 4: annotation paths stay under data.image_root; only regular files, reads capped ----


def _jpeg(path, size=16, color=(200, 30, 30)):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, format="JPEG")


def _index_in_thread(cfg, timeout=120):
    import threading

    from blipfast.data.index import build_train_index

    box = {}

    def work():
        try:
            box["index"] = build_train_index(cfg)
        except Exception as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "indexing hangs (a FIFO opened for reading?)"
    if "error" in box:
        raise box["error"]
    return box["index"]


def test_annotation_paths_are_confined_to_the_image_root(tmp_path):
    from blipfast.data import DataConfig

    root = tmp_path / "data" / "images"
    _jpeg(str(root / "good.jpg"))
    _jpeg(str(tmp_path / "outside" / "x.jpg"))
    _jpeg(str(root / "big.jpg"), size=256)
    big = os.path.getsize(root / "big.jpg")
    os.mkfifo(root / "fifo.jpg")
    ann = [{"image": "good.jpg", "caption": "a red square"},
           {"image": "../../outside/x.jpg", "caption": "escape by dots"},
           {"image": str(tmp_path / "outside" / "x.jpg"), "caption": "escape by an absolute path"},
           {"image": "../../../../../../../../etc/passwd", "caption": "read a system file"},
           {"image": "fifo.jpg", "caption": "a fifo"},
           {"image": "big.jpg", "caption": "too large"}]
    (tmp_path / "data" / "ann.json").write_text(json.dumps(ann))
    cfg = DataConfig(format="json", ann_files=[str(tmp_path / "data" / "ann.json")], image_root=str(root),
                     cache_dir="none", max_image_bytes=big - 1)
    index = _index_in_thread(cfg)
    assert index.names == [str(root / "good.jpg")]
    assert index.stats["outside_root"] == 3 and index.stats["skipped_samples"] == 5, index.stats

    cfg.allow_outside_root = True
    cfg.max_image_bytes = big
    index = _index_in_thread(cfg)
    assert sorted(os.path.basename(n) for n in index.names) == ["big.jpg", "good.jpg", "x.jpg", "x.jpg"]
    assert index.stats["skipped_corrupt"] == 2  # /etc/passwd is no image, the fifo no regular file
    # a file that grew past the cap after indexing is not read in full either
    index.max_bytes = big - 1
    row = [os.path.basename(n) for n in index.names].index("big.jpg")
    with pytest.raises(OSError, match="max_image_bytes"):
        index.read_image_bytes(row)


# -- finding 11: retrieval fine-tuning gets its image ids, fp32 ITC and the non-finite guard ----


def test_train_index_merges_entries_of_the_same_image_id(tmp_path):
    from blipfast.data import DataConfig
    from blipfast.data.index import build_train_index

    root = tmp_path / "images"
    for name, color in (("a.jpg", (200, 0, 0)), ("b.jpg", (0, 200, 0))):
        _jpeg(str(root / name), color=color)
    ann = [{"image": "a.jpg", "caption": "a red square", "image_id": "coco_7"},  # Karpathy train: one entry
           {"image": "b.jpg", "caption": "a green square", "image_id": "coco_9"},  # per caption
           {"image": "a.jpg", "caption": "red again", "image_id": "coco_7"}]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    index = build_train_index(DataConfig(format="json", ann_files=[str(tmp_path / "ann.json")],
                                         image_root=str(root), cache_dir="none"))
    assert index.num_images == 2
    assert index.sample_image.tolist() == [0, 1, 0]  # both captions of coco_7 share one image id


def test_retrieval_itc_runs_in_fp32_without_autocast(monkeypatch):
    from blipfast.kernels import reference as ref
    from blipfast.models.retrieval import BlipForRetrieval

    seen = []
    real = ref.itc_loss_retrieval

    def recording(*args, **kwargs):  # calls the real loss; records how it was called
        floats = {a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()}
        seen.append((torch.is_autocast_enabled("cpu"), floats))
        return real(*args, **kwargs)

    monkeypatch.setattr(ref, "itc_loss_retrieval", recording)
    model = BlipForRetrieval(tiny_model_config()).train()
    images, ids, mask = _batch(model.config, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images, ids, mask, 0.4, idx=torch.tensor([0, 1, 0, 2]))
    assert seen == [(False, {torch.float32})], seen


class NanBatchLoader(SameBatchLoader):
    def epoch(self, epoch, start_step=0):
        for i, b in enumerate(super().epoch(epoch, start_step), start=start_step):
            if i == 1:
                b = dict(b, images=b["images"].clone())
                b["images"][0, 0, 0, 0] = float("nan")
            yield b


def test_nonfinite_guard_covers_retrieval_negatives(tmp_path, tokenizer):
    from blipfast.train.trainer import Trainer

    run = run_config(tmp_path, "retrieval", max_steps=3, nan_policy="skip")
    tr = Trainer(run, loader=NanBatchLoader(), tokenizer=tokenizer)
    result = tr.fit()  # the NaN batch is skipped on every rank, not raised half-way through a forward
    assert result["skipped"] == 1 and result["steps"] == 3


# -- finding 5: an image whose decode would fail inside DALI is skipped and counted, named ------


def _break_huffman_table(path):
    """Make the first DHT segment invalid (code counts summing past 256): the header still parses."""
    data = bytearray(open(path, "rb").read())
    at = data.index(b"\xff\xc4")
    data[at + 5:at + 21] = b"\xff" * 16
    st = os.stat(path)
    open(path, "wb").write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _bit_rot(path):
    """Zero the first bytes, same size and same mtime: a warm image-check cache still trusts it."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("fault", ["bit_rot_behind_warm_cache", "broken_huffman_header_mode"])
def test_an_image_that_fails_to_decode_at_read_time_is_skipped(tmp_path, tokenizer, backend, fault, caplog):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from blipfast.data import DataConfig
    from blipfast.data.index import build_train_index
    from blipfast.data.loader import PretrainLoader

    root = tmp_path / "images"
    ann = []
    for i in range(8):
        _jpeg(str(root / f"{i}.jpg"), size=24, color=(30 * i, 100, 200 - 20 * i))
        ann.append({"image": f"{i}.jpg", "caption": f"square number {i}"})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    mode = "header" if fault == "broken_huffman_header_mode" else "decode"
    cfg = DataConfig(format="json", ann_files=[str(tmp_path / "ann.json")], image_root=str(root), backend=backend,
                     decode="cpu", cache_dir=str(tmp_path / "cache"), check_images=mode, num_threads=1,
                     rand_augment=False)
    build_train_index(cfg)  # warms the cache
    bad = str(root / "3.jpg")
    (_bit_rot if fault == "bit_rot_behind_warm_cache" else _break_huffman_table)(bad)
    index = build_train_index(cfg)
    assert index.num_images == 8  # the change is invisible to the (cached or header) check
    loader = PretrainLoader(cfg, index, tokenizer, image_size=16, batch_size=4, max_length=8)
    with caplog.at_level("WARNING", logger="blipfast.data"):
        batches = list(loader.epoch(0))
    assert len(batches) == 2 and all(torch.isfinite(b["images"]).all() for b in batches)
    assert loader.stats["corrupt_at_read"] == 1, loader.stats
    assert bad in caplog.text
