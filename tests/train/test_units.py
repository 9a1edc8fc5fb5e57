"""Single-process pieces of the trainer: the detached fp32 momentum state, the commit-marker
rules that decide which checkpoint --resume trusts, and the MFU FLOP count."""
import json
import os

import pytest
import torch

from blipfast.train import checkpoint


def test_detach_momentum_keeps_the_model_and_its_state_layout(tiny_config):
    from blipfast import BlipForPretraining

    torch.manual_seed(0)
    model = BlipForPretraining(tiny_config).eval()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    B, L = 3, tiny_config.max_text_len
    images = torch.randn(B, 3, tiny_config.vision.image_size, tiny_config.vision.image_size)
    ids = torch.randint(7, tiny_config.text.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    neg = (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    before = model(images, ids, mask, 0.4, negatives=neg)

    holder = model.detach_momentum()
    online, ema = model.state_dict(), holder.state_dict()
    assert set(online) | set(ema) == set(full) and not set(online) & set(ema)
    assert all(k.split(".")[0] in ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m",
                                   "image_queue", "text_queue", "queue_ptr") for k in ema)
    assert not any(p is q for p in model.parameters() for q in holder.parameters())
    after = model(images, ids, mask, 0.4, negatives=neg)
    for name in ("loss", "loss_itc", "loss_itm", "loss_lm"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name

    model.to(torch.float64)  # what DeepSpeed's casting does to the wrapped module: the EMA stays fp32
    assert model.visual_encoder.cls_token.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in holder.parameters()) and holder.queue_ptr.dtype == torch.int64
    model.train()
    assert holder.training and holder.visual_encoder_m.training

    model.float()
    m = model.config.momentum
    expect = {k: v * m + model.state_dict()[k.replace("_m.", ".", 1)] * (1 - m)
              for k, v in ema.items() if k.endswith("weight") or k.endswith("bias")}
    model.momentum_update()  # reads the online weights, writes the detached fp32 copies
    for k, v in expect.items():
        assert torch.allclose(holder.state_dict()[k], v, rtol=1e-6, atol=1e-7), k
    with pytest.raises(RuntimeError, match="already detached"):
        model.detach_momentum()


def _tag(root, step, committed=True, files=None):
    d = root / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    files = files or {"model.pt": b"x" * 10, "rank0.pt": b"y" * 5}
    for name, data in files.items():
        (d / name).write_bytes(data)
    if committed:
        (d / checkpoint.COMMITTED).write_text(json.dumps(
            {"tag": d.name, "meta": {"global_step": step}, "files": {n: len(b) for n, b in files.items()}}))
    return d


def test_find_latest_ignores_torn_checkpoints(tmp_path):
    assert checkpoint.find_latest(str(tmp_path / "none")) is None
    _tag(tmp_path, 100)
    _tag(tmp_path, 200)
    _tag(tmp_path, 300, committed=False)  # died before the commit marker
    assert checkpoint.find_latest(str(tmp_path)) == checkpoint.tag_for(200)
    d = _tag(tmp_path, 400)
    (d / "model.pt").write_bytes(b"x" * 3)  # a file truncated after the marker was written
    assert checkpoint.find_latest(str(tmp_path)) == checkpoint.tag_for(200)
    (d / checkpoint.COMMITTED).write_text("{not json")
    assert checkpoint.find_latest(str(tmp_path)) == checkpoint.tag_for(200)
    assert checkpoint.read_meta(str(tmp_path), checkpoint.tag_for(200)) == {"global_step": 200}


def test_prune_keeps_the_newest(tmp_path):
    for s in (1, 2, 3, 4):
        _tag(tmp_path, s)
    _tag(tmp_path, 5, committed=False)
    _tag(tmp_path, 6)
    checkpoint.prune(str(tmp_path), keep_last=2, newest=checkpoint.tag_for(6))
    assert sorted(os.listdir(tmp_path)) == [checkpoint.tag_for(4), checkpoint.tag_for(6)]


def test_flop_count_matches_a_hand_count_for_the_vit():
    from blipfast import BlipConfig, flops

    cfg = BlipConfig()  # ViT-B/16 at 224: 197 tokens, width 768, 12 blocks
    n, c = 197, 768
    per_block = 2 * n * (3 * c * c + c * c + 2 * 4 * c * c) + 2 * 2 * n * n * c
    patch = 2 * 196 * (3 * 16 * 16) * c
    vit = flops.vit_forward(cfg.vision, 1)
    assert vit["blocks"] == 12 * per_block and vit["patch_embed"] == patch
    assert abs((vit["blocks"] + patch) / 1e9 - 35.2) < 0.5  # the usual ~17.6 GMACs of ViT-B/16 at 224