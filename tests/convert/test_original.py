"""blipfast.convert.original: the official BLIP checkpoint layout, without the original code.

(What the original code itself accepts and computes is tested in tests/parity/test_pretraining.py and test_task_training.py.)
"""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blipfast import BlipConfig, BlipForPretraining, TextConfig, VisionConfig
from blipfast.convert.original import (
    CheckpointError,
    export_original_state_dict,
    load_original_checkpoint,
    load_original_state_dict,
)
from blipfast.models import TextDecoder, TextTransformer, VisionTransformer

SHARED = "encoder.layer.0.intermediate.dense.weight"  # one of the tensors pre-training shares


def small_config(image_size=32):
    return BlipConfig(
        vision=VisionConfig(image_size=image_size, patch_size=16, width=24, depth=1, num_heads=2),
        text=TextConfig(vocab_size=40, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, pad_token_id=0, cls_token_id=1,
                        sep_token_id=2, dec_token_id=38, enc_token_id=39),
        embed_dim=8, queue_size=8,
    )


def random_model(seed=0, image_size=32):
    torch.manual_seed(seed)
    model = BlipForPretraining(small_config(image_size))
    with torch.no_grad():  # every tensor distinct, so a wrong copy cannot go unnoticed
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        model.queue_ptr.fill_(4)
    return model


@pytest.fixture(scope="module")
def exported():
    return {k: v.clone() for k, v in export_original_state_dict(random_model(seed=1)).items()}


def assert_same_state(model, sd):
    ours = model.state_dict()
    for k, v in sd.items():
        if k in ours:
            assert torch.equal(ours[k].reshape(v.shape), v), k


def test_export_has_the_official_layout(exported):
    sd = exported
    assert sd["temp"].shape == ()  # 0-dim, as the original's nn.Parameter(0.07 * ones([]))
    for stem in ("text_encoder.", "text_encoder_m.", "text_decoder.bert."):
        ids = sd[stem + "embeddings.position_ids"]
        assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(16)[None])
    assert torch.equal(sd["text_decoder.cls.predictions.decoder.weight"],
                       sd["text_decoder.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(sd["text_decoder.cls.predictions.decoder.bias"], sd["text_decoder.cls.predictions.bias"])
    # pre-training saves shared tensors under both prefixes; self-attention is the decoder's own
    assert torch.equal(sd["text_encoder." + SHARED], sd["text_decoder.bert." + SHARED])
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(sd["text_encoder." + q], sd["text_decoder.bert." + q])
    for key in ("image_queue", "text_queue", "queue_ptr", "visual_encoder_m.pos_embed", "text_proj_m.bias"):
        assert key in sd


def test_round_trip_restores_every_tensor(exported):
    model = random_model(seed=2)
    load_original_state_dict(model, exported)
    assert model.temp.shape == (1,)
    assert_same_state(model, exported)
    assert int(model.queue_ptr) == 4
    # sharing survives loading: encoder and decoder still hold one tensor
    assert model.text_encoder.encoder.layer[0].output is model.text_decoder.bert.encoder.layer[0].output


def test_every_problem_is_listed_in_one_error(exported):
    sd = dict(exported)
    del sd["vision_proj.weight"], sd["visual_encoder.blocks.0.mlp.fc1.bias"]
    sd["text_encoder.pooler.dense.weight"] = torch.zeros(24, 24)
    sd["itm_head.weight"] = torch.zeros(3, 24)
    with pytest.raises(CheckpointError) as e:
        load_original_state_dict(random_model(), sd)
    msg = str(e.value)
    for name in ("vision_proj.weight", "visual_encoder.blocks.0.mlp.fc1.bias", "text_encoder.pooler.dense.weight",
                 "itm_head.weight: file (3, 24) vs model (2, 24)"):
        assert name in msg, msg


@pytest.mark.parametrize("key,what", [
    ("text_decoder.cls.predictions.decoder.weight", "must equal"),
    ("text_decoder.cls.predictions.decoder.bias", "must equal"),
    ("text_decoder.bert." + SHARED, "shares one tensor"),
])
def test_inconsistent_aliases_are_refused(exported, key, what):
    sd = dict(exported)
    sd[key] = sd[key] + 1e-3
    with pytest.raises(CheckpointError, match=what):
        load_original_state_dict(random_model(), sd)


def test_position_ids_must_be_arange(exported):
    sd = dict(exported)
    sd["text_encoder.embeddings.position_ids"] = torch.arange(16)[None].flip(1)
    with pytest.raises(CheckpointError, match="position_ids is not arange"):
        load_original_state_dict(random_model(), sd)


def test_a_single_copy_of_shared_or_tied_tensors_is_enough(exported):
    """Files that saved a shared tensor once (or only the LM head's alias of the embeddings)."""
    sd = {k: v for k, v in exported.items()
          if not (k.startswith("text_decoder.bert.") and not k.startswith("text_decoder.bert.encoder.layer.0.attention."))}
    sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.embeddings.word_embeddings")}
    model = random_model(seed=3)
    load_original_state_dict(model, sd)
    assert_same_state(model, exported)


def test_position_embeddings_are_interpolated(exported):
    """A 32 px (2x2 grid) checkpoint into a 64 px (4x4) model: CLS row kept, grid bicubic."""
    model = random_model(seed=4, image_size=64)
    load_original_state_dict(model, exported)
    for name in ("visual_encoder", "visual_encoder_m"):
        old = exported[name + ".pos_embed"]  # (1, 1 + 4, 24)
        grid = old[0, 1:].T.reshape(1, 24, 2, 2)  # (1, C, 2, 2)
        want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).reshape(24, 16).T
        got = getattr(model, name).pos_embed[0]
        assert torch.equal(got[0], old[0, 0])
        torch.testing.assert_close(got[1:], want, rtol=0, atol=1e-6)
    assert_same_state(model, {k: v for k, v in exported.items() if not k.endswith("pos_embed")})


def test_non_square_position_grid_is_refused(exported):
    sd = dict(exported)
    sd["visual_encoder.pos_embed"] = torch.zeros(1, 1 + 6, 24)
    with pytest.raises(CheckpointError, match="visual_encoder.pos_embed.*non-square"):
        load_original_state_dict(random_model(), sd)


class RetrievalLike(nn.Module):
    """The retrieval model's buffer names (BLIP's blip_retrieval.py: idx_queue, ptr_queue)."""

    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.full((1,), 0.07))
        self.register_buffer("idx_queue", torch.full((1, 8), -100))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))


def test_queue_pointer_name_is_mapped_both_ways(exported):
    model = RetrievalLike()
    load_original_state_dict(model, {"temp": torch.tensor(0.05), "idx_queue": torch.arange(8)[None],
                                     "queue_ptr": torch.tensor([6])})
    assert int(model.ptr_queue) == 6 and model.temp.item() == pytest.approx(0.05)
    sd = dict(exported)
    sd["ptr_queue"] = sd.pop("queue_ptr")
    pretrain = random_model()
    load_original_state_dict(pretrain, sd)
    assert int(pretrain.queue_ptr) == 4


class CaptionLike(nn.Module):
    """A captioning model's layout: visual_encoder + an unshared text_decoder (bert + cls)."""

    def __init__(self, cfg):
        super().__init__()
        self.visual_encoder = VisionTransformer(cfg.vision)
        self.text_decoder = TextDecoder(TextTransformer(cfg.text))


def test_partial_loads_are_explicit(exported):
    """Pre-training weights into a captioner: refused unless the extra keys are named."""
    with pytest.raises(CheckpointError, match="unexpected keys") as e:
        load_original_state_dict(CaptionLike(small_config()), exported)
    assert "text_encoder_m.embeddings.word_embeddings.weight" in str(e.value)
    extra = ("visual_encoder_m", "text_encoder", "text_encoder_m", "vision_proj", "vision_proj_m", "text_proj",
             "text_proj_m", "itm_head", "temp", "image_queue", "text_queue", "queue_ptr")
    model = CaptionLike(small_config())
    load_original_state_dict(model, exported, ignore_unexpected=extra)
    assert_same_state(model, exported)
    # the decoder's cross-attention / FFN come from the (shared) pre-training tensors
    assert torch.equal(model.text_decoder.bert.encoder.layer[0].intermediate.dense.weight,
                       exported["text_encoder." + SHARED])

    with pytest.raises(CheckpointError, match="missing keys"):
        load_original_state_dict(random_model(), {k: v for k, v in exported.items() if k != "image_queue"})
    model = random_model(seed=5)
    before = model.image_queue.clone()
    load_original_state_dict(model, {k: v for k, v in exported.items() if k != "image_queue"},
                             allow_missing=("image_queue",))
    assert torch.equal(model.image_queue, before)


def test_checkpoint_files(exported, tmp_path):
    for i, obj in enumerate([{"model": exported, "optimizer": {"state": {}}, "config": {"lr": 1e-4}, "epoch": 3},
                             exported]):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(obj, path)
        model = random_model(seed=6 + i)
        load_original_checkpoint(model, path)
        assert_same_state(model, exported)

    unsafe = tmp_path / "with_namespace.pth"
    torch.save({"model": exported, "args": argparse.Namespace(lr=1e-4)}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_original_checkpoint(random_model(), unsafe)
    load_original_checkpoint(random_model(), unsafe, weights_only=False)

    odd = tmp_path / "list.pth"
    torch.save([1, 2], odd)
    with pytest.raises(CheckpointError, match="neither a state dict"):
        load_original_checkpoint(random_model(), odd)
    with pytest.raises(FileNotFoundError):
        load_original_checkpoint(random_model(), tmp_path / "absent.pth")


def test_detached_momentum_state_is_part_of_the_layout(exported):
    """A trainer may move the momentum encoders and queues out of the module tree
    (detach_momentum); export and load still cover the whole official layout."""
    model = random_model(seed=8)
    holder = model.detach_momentum()
    assert "visual_encoder_m.pos_embed" not in model.state_dict()
    load_original_state_dict(model, exported)
    assert_same_state(holder, exported)
    assert_same_state(model, exported)
    out = export_original_state_dict(model)
    assert out.keys() == exported.keys()
    assert all(torch.equal(out[k], exported[k]) for k in out)
