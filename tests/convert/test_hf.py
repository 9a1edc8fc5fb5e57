"""The HF converter's rules: key names, file formats, round trips, config handling, strict errors.

Numerical parity with HF's models is in test_hf_parity.py (whose helpers these tests share).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blipfast import BlipForPretraining  # noqa: E402
from blipfast.convert import export_hf, load_hf  # noqa: E402
from blipfast.convert.hf import (  # noqa: E402
    HFConversionError,
    blipfast_config_from_hf,
    blipfast_to_hf_key,
    hf_to_blipfast_key,
)
from blipfast.convert.original import CheckpointError  # noqa: E402
from tests.convert.test_hf_parity import HF_CLASSES, blip_config, blipfast_model, hf_config_for, hf_model  # noqa: E402
from tests.helpers import sharpen_  # noqa: E402

TASKS = ["captioning", "retrieval", "vqa"]


def _assert_same_state(a: dict, b: dict, keys=None) -> None:
    keys = sorted(a) if keys is None else keys
    for k in keys:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def cfg():
    return blip_config("tiny")


@pytest.fixture(scope="module")
def hf_caption(cfg):
    return hf_model("captioning", cfg)


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("hf_key, ours", [
    # The rename table of HF's conversion script (blip_reference.md §7.2), applied in reverse.
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.patch_embedding.weight", "visual_encoder.patch_embed.proj.weight"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.encoder.layers.11.self_attn.qkv.bias", "visual_encoder.blocks.11.attn.qkv.bias"),
    ("vision_model.encoder.layers.0.self_attn.projection.weight", "visual_encoder.blocks.0.attn.proj.weight"),
    ("vision_model.encoder.layers.3.layer_norm1.weight", "visual_encoder.blocks.3.norm1.weight"),
    ("vision_model.encoder.layers.3.layer_norm2.bias", "visual_encoder.blocks.3.norm2.bias"),
    ("vision_model.encoder.layers.7.mlp.fc2.weight", "visual_encoder.blocks.7.mlp.fc2.weight"),
    ("vision_model.post_layernorm.bias", "visual_encoder.norm.bias"),
    ("text_encoder.encoder.layer.2.crossattention.self.key.weight",
     "text_encoder.encoder.layer.2.crossattention.self.key.weight"),
    ("text_decoder.cls.predictions.transform.dense.bias", "text_decoder.cls.predictions.transform.dense.bias"),
    ("itm_head.weight", "itm_head.weight"),
])
def test_key_names(hf_key, ours):
    assert hf_to_blipfast_key(hf_key) == ours
    assert blipfast_to_hf_key(ours) == hf_key


def test_unknown_names_have_no_counterpart():
    for key in ("vision_model.encoder.layers.0.self_attn.qkv.scale", "visual_projection.weight", "logit_scale",
                "text_model.pooler.dense.weight"):
        assert hf_to_blipfast_key(key) is None
    assert blipfast_to_hf_key("visual_encoder_m.cls_token") is None
    assert blipfast_to_hf_key("temp") is None


# ---------------------------------------------------------------------------------------------
# files and round trips


def test_load_from_hf_directories(cfg, hf_caption, tmp_path):
    """save_pretrained (safetensors, then sharded), and an old-style pytorch_model.bin with the
    position_ids buffer and the tied LM-head copies, all load to the same weights."""
    ref = load_hf(blipfast_model("captioning", cfg), hf_caption.state_dict()).state_dict()
    single, sharded, binary = tmp_path / "single", tmp_path / "sharded", tmp_path / "bin"
    hf_caption.save_pretrained(single)
    hf_caption.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary.mkdir()
    old = dict(hf_caption.state_dict())
    old["text_decoder.bert.embeddings.position_ids"] = torch.arange(cfg.text.max_position_embeddings)[None]
    torch.save(old, binary / "pytorch_model.bin")
    (binary / "config.json").write_text((single / "config.json").read_text())
    for d in (single, sharded, binary):
        _assert_same_state(load_hf(blipfast_model("captioning", cfg), d).state_dict(), ref)


@pytest.mark.parametrize("task", TASKS)
def test_export_then_load_is_identity(cfg, task, tmp_path):
    src = sharpen_(blipfast_model(task, cfg), seed=7)
    export_hf(src, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [HF_CLASSES[task].__name__]
    dst = blipfast_model(task, cfg)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    load_hf(dst, tmp_path)
    a, b = src.state_dict(), dst.state_dict()
    kept = ("temp", "image_queue", "text_queue", "idx_queue", "ptr_queue")
    online = [k for k in a if not k.partition(".")[0].endswith("_m") and k not in kept]
    _assert_same_state(a, b, online)
    for k in b:
        head, _, rest = k.partition(".")
        if head.endswith("_m"):  # momentum copies start from the loaded online weights
            assert torch.equal(b[k], b[f"{head[:-2]}.{rest}"]), k
        elif k not in online:  # queues, pointers and temp: HF has none, the model keeps its own
            assert torch.equal(b[k], before[k]), k


def test_pretraining_model_exports_as_captioning(cfg, tmp_path):
    """As HF's conversion script did with the pre-training CapFilt checkpoint: a task must be named."""
    model = sharpen_(BlipForPretraining(cfg).eval(), seed=8)
    with pytest.raises(HFConversionError, match="pass task="):
        export_hf(model, tmp_path / "x")
    export_hf(model, tmp_path / "cap", task="captioning")
    hf, info = HF_CLASSES["captioning"].from_pretrained(tmp_path / "cap", output_loading_info=True)
    assert not any(info.values()), info
    captioner = load_hf(blipfast_model("captioning", cfg), tmp_path / "cap")
    ours = model.state_dict()
    for k, v in captioner.state_dict().items():
        assert torch.equal(v, ours[k]), k


def test_shared_weights_must_agree(cfg):
    """A pre-training model shares all but self-attention between encoder and decoder: an HF
    VQA checkpoint (separate weights) fits its keys but not its sharing, unless they are equal."""
    hf_sd = dict(hf_model("vqa", cfg).state_dict())
    E, C = cfg.embed_dim, cfg.text.hidden_size
    hf_sd.update({"vision_proj.weight": torch.randn(E, cfg.vision.width), "vision_proj.bias": torch.randn(E),
                  "text_proj.weight": torch.randn(E, C), "text_proj.bias": torch.randn(E),
                  "itm_head.weight": torch.randn(2, C), "itm_head.bias": torch.randn(2)})
    with pytest.raises(HFConversionError, match="shares one tensor"):
        load_hf(BlipForPretraining(cfg), hf_sd)
    for k in list(hf_sd):  # make the decoder's shared tensors equal to the encoder's
        if k.startswith("text_decoder.bert.") and ".attention." not in k:
            hf_sd[k] = hf_sd["text_encoder." + k[len("text_decoder.bert."):]]
    hf_sd.pop("text_decoder.cls.predictions.decoder.weight")  # tied: now an alias of the encoder's embeddings
    model = load_hf(BlipForPretraining(cfg), hf_sd)
    assert torch.equal(model.text_encoder_m.encoder.layer[0].output.dense.weight,
                       hf_sd["text_encoder.encoder.layer.0.output.dense.weight"])


# ---------------------------------------------------------------------------------------------
# strict errors


def test_missing_key(cfg, hf_caption):
    sd = dict(hf_caption.state_dict())
    del sd["vision_model.encoder.layers.1.mlp.fc1.bias"]
    with pytest.raises(HFConversionError) as e:
        load_hf(blipfast_model("captioning", cfg), sd)
    assert e.value.missing == [
        "vision_model.encoder.layers.1.mlp.fc1.bias  (blipfast visual_encoder.blocks.1.mlp.fc1.bias)"]
    assert not e.value.unexpected and "1 missing" in str(e.value)
    assert isinstance(e.value, CheckpointError)


def test_unexpected_keys(cfg, hf_caption):
    sd = dict(hf_caption.state_dict())
    sd["text_decoder.bert.pooler.dense.bias"] = torch.zeros(cfg.text.hidden_size)
    sd["vision_model.encoder.layers.9.mlp.fc1.bias"] = torch.zeros(4)  # a layer the model lacks
    sd["logit_scale"] = torch.zeros(())
    with pytest.raises(HFConversionError) as e:
        load_hf(blipfast_model("captioning", cfg), sd)
    assert sorted(e.value.unexpected) == ["logit_scale", "text_decoder.bert.pooler.dense.bias",
                                          "vision_model.encoder.layers.9.mlp.fc1.bias"]
    assert not e.value.missing


def test_wrong_task_lists_everything(cfg, hf_caption):
    with pytest.raises(HFConversionError) as e:
        load_hf(blipfast_model("retrieval", cfg), hf_caption.state_dict())
    assert "itm_head.weight  (blipfast itm_head.weight)" in e.value.missing
    assert "text_decoder.cls.predictions.bias" in e.value.unexpected


def test_captioning_checkpoint_into_pretraining_model(cfg, hf_caption):
    """Shared encoder/decoder tensors with one side absent: reported as missing, nothing else."""
    with pytest.raises(HFConversionError) as e:
        load_hf(BlipForPretraining(cfg), hf_caption.state_dict())
    assert "itm_head.weight  (blipfast itm_head.weight)" in e.value.missing
    assert "text_encoder.embeddings.word_embeddings.weight  (blipfast text_encoder.embeddings.word_embeddings" \
           ".weight)" in e.value.missing
    assert not e.value.unexpected and not e.value.mismatched


def test_wrong_shape(cfg, hf_caption):
    sd = dict(hf_caption.state_dict())
    sd["text_decoder.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(7, cfg.text.hidden_size)
    with pytest.raises(HFConversionError, match=r"intermediate.dense.weight: checkpoint \(7, 72\)") as e:
        load_hf(blipfast_model("captioning", cfg), sd)
    assert len(e.value.mismatched) == 1


def test_untied_lm_head_and_bad_position_ids(cfg, hf_caption):
    sd = dict(hf_caption.state_dict())
    sd["text_decoder.cls.predictions.decoder.weight"] = sd["text_decoder.cls.predictions.decoder.weight"] + 1
    sd["text_decoder.bert.embeddings.position_ids"] = torch.arange(cfg.text.max_position_embeddings)[None] + 1
    with pytest.raises(HFConversionError) as e:
        load_hf(blipfast_model("captioning", cfg), sd)
    assert "cannot be represented" in str(e.value) and "absolute positions from 0" in str(e.value)


def _hf_dir(cfg, tmp_path, **changes):
    """An HF captioning directory whose config differs from `cfg` by `changes` (dotted keys)."""
    hcfg = hf_config_for(cfg)
    for dotted, value in changes.items():
        sub, name = dotted.split(".")
        setattr(getattr(hcfg, sub), name, value)
    torch.manual_seed(0)
    hf = HF_CLASSES["captioning"](hcfg)
    hf.save_pretrained(tmp_path)
    return tmp_path


def test_eight_head_hf_config(tmp_path):
    """HF's default of 8 text heads (old hub configs) against BLIP's 12: same shapes, other numerics."""
    base = blip_config("tiny")
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_attention_heads=12))
    path = _hf_dir(cfg, tmp_path, **{"text_config.num_attention_heads": 8})
    expected = r"(?s)num_attention_heads: HF 8 vs blipfast 12.*allow_known_hf_bugs=True"
    with pytest.raises(HFConversionError, match=expected):
        load_hf(blipfast_model("captioning", cfg), path)
    with pytest.warns(UserWarning, match="BLIP-wrong default"):
        model = load_hf(blipfast_model("captioning", cfg), path, allow_known_hf_bugs=True)
    assert model.text_decoder.bert.encoder.layer[0].attention.num_heads == 12
    load_hf(blipfast_model("captioning", cfg), path, check_config=False)


def test_config_mismatches_that_are_not_known_bugs(cfg, tmp_path):
    path = _hf_dir(cfg, tmp_path, **{"vision_config.layer_norm_eps": 1e-5, "text_config.hidden_act": "gelu_new",
                                     "text_config.bos_token_id": 9})
    with pytest.raises(HFConversionError) as e, pytest.warns(UserWarning, match="layer_norm_eps=1e-05"):
        load_hf(blipfast_model("captioning", cfg), path, allow_known_hf_bugs=True)
    msg = str(e.value)
    assert "hidden_act: HF 'gelu_new' vs blipfast 'gelu'" in msg
    assert "bos_token_id ([DEC]): HF 9 vs blipfast 5" in msg
    assert "layer_norm_eps" not in msg  # 1e-5 vs 1e-6 is the known bug, accepted here with a warning


def test_eps_mismatch_is_refused_by_default(cfg, tmp_path):
    path = _hf_dir(cfg, tmp_path, **{"vision_config.layer_norm_eps": 1e-5})
    with pytest.raises(HFConversionError, match=r"vision_config.layer_norm_eps: HF 1e-05 vs blipfast 1e-06"):
        load_hf(blipfast_model("captioning", cfg), path)


# ---------------------------------------------------------------------------------------------
# configs


def test_hf_defaults_are_the_blip_wrong_ones():
    """The facts hf.py's docstring and fixes rely on (transformers' own defaults)."""
    assert transformers.BlipTextConfig().num_attention_heads == 8
    assert transformers.BlipVisionConfig().layer_norm_eps == 1e-5
    assert transformers.BlipTextConfig().label_smoothing == 0.0


def test_blipfast_config_from_hf_defaults():
    hf = transformers.BlipConfig().to_dict()  # HF's defaults: BLIP base widths, 8 heads, eps 1e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fixed = blipfast_config_from_hf(hf)
    assert len([w for w in caught if "BLIP" in str(w.message)]) == 2
    assert fixed.text.num_attention_heads == 12 and fixed.vision.layer_norm_eps == 1e-6
    assert fixed.label_smoothing == 0.1 and fixed.text.hidden_dropout_prob == 0.1
    assert (fixed.vision.image_size, fixed.vision.width, fixed.vision.mlp_ratio) == (384, 768, 4.0)
    assert (fixed.text.vocab_size, fixed.text.dec_token_id, fixed.embed_dim) == (30524, 30522, 256)
    faithful = blipfast_config_from_hf(hf, faithful_to_hf=True)
    assert faithful.text.num_attention_heads == 8 and faithful.vision.layer_norm_eps == 1e-5
    assert faithful.label_smoothing == 0.0 and faithful.text.hidden_dropout_prob == 0.0


def test_blipfast_config_round_trip(cfg, tmp_path):
    export_hf(blipfast_model("captioning", cfg), tmp_path)
    back = blipfast_config_from_hf(tmp_path, overrides={"text.cls_token_id": 2, "text.enc_token_id": 6,
                                                        "attention_backend": "reference", "queue_size": 8})
    assert back.vision == cfg.vision
    assert dataclasses.replace(back.text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) == cfg.text
    assert back.embed_dim == cfg.embed_dim and back.label_smoothing == cfg.label_smoothing
    # blipfast's defaults for [CLS]/[ENC] (real vocabulary) do not fit a 99-token vocabulary:
    with pytest.raises(ValueError, match="cls_token_id=101 is outside the vocabulary"):
        blipfast_config_from_hf(tmp_path)


def test_vqa_export_needs_equal_widths(tmp_path):
    base = blip_config("tiny")
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, width=48, num_heads=4, mlp_ratio=2.0))
    cfg.text.encoder_width = 48
    with pytest.raises(HFConversionError, match="vision width"):
        export_hf(blipfast_model("vqa", cfg), tmp_path)
    assert not os.path.exists(tmp_path / "config.json")
