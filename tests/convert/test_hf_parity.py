"""blipfast against HF transformers' Blip* models, through the HF converter (fp32, random weights).

HF models are built from a transformers BlipConfig with BLIP-correct values (12-style head
counts as blipfast's, vision eps 1e-6), given random weights at a scale where attention is sharp
(std 1.5/sqrt(fan_in), LayerNorm gains near 1, biases ~0.2), converted with `load_hf`, and every
output is compared norm-wise (relative error <= 1e-5). HF never inserts [ENC] or [DEC]: both sides
get identical input_ids. Then the way back: `export_hf` -> HF `from_pretrained` -> same outputs.

The helpers here (configs, models, inputs) are shared with test_hf.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from blipfast import BlipConfig, TextConfig, VisionConfig  # noqa: E402
from blipfast.convert import export_hf, load_hf  # noqa: E402
from blipfast.models.caption import BlipForCaptioning  # noqa: E402
from blipfast.models.retrieval import BlipForRetrieval  # noqa: E402
from blipfast.models.vqa import BlipForVQA  # noqa: E402
from blipfast.ops import resolve_losses  # noqa: E402
from tests.helpers import assert_close, sharpen_  # noqa: E402

HF_CLASSES = {
    "captioning": transformers.BlipForConditionalGeneration,
    "retrieval": transformers.BlipForImageTextRetrieval,
    "vqa": transformers.BlipForQuestionAnswering,
}
TOL = 1e-5

# ---------------------------------------------------------------------------------------------
# configurations: non-power-of-two tiny widths, and the real ViT-B / BERT-base widths at depth 1


def blip_config(kind: str = "tiny") -> BlipConfig:
    if kind == "tiny":
        vision = VisionConfig(image_size=48, patch_size=16, width=72, depth=2, num_heads=6, mlp_ratio=136 / 72)
        text = TextConfig(vocab_size=99, hidden_size=72, num_hidden_layers=2, num_attention_heads=6,
                          intermediate_size=200, max_position_embeddings=40, cls_token_id=2, sep_token_id=3,
                          dec_token_id=5, enc_token_id=6)
        embed_dim = 40
    elif kind == "base1":
        vision = VisionConfig(image_size=32, patch_size=16, width=768, depth=1, num_heads=12)
        text = TextConfig(vocab_size=300, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                          intermediate_size=3072, max_position_embeddings=40, cls_token_id=2, sep_token_id=3,
                          dec_token_id=5, enc_token_id=6)
        embed_dim = 256
    else:
        raise ValueError(kind)
    # Dropout 0 so that training-mode details cannot hide a difference; label smoothing as BLIP.
    text = dataclasses.replace(text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = BlipConfig(vision=vision, text=text, embed_dim=embed_dim, queue_size=8, attention_backend="reference")
    cfg.validate()
    return cfg


def hf_config_for(cfg: BlipConfig):
    """The transformers BlipConfig of `cfg`, written out field by field (independent of export_hf)."""
    v, t = cfg.vision, cfg.text
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                           num_hidden_layers=v.depth, num_attention_heads=v.num_heads, image_size=v.image_size,
                           patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps),
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                         bos_token_id=t.dec_token_id, pad_token_id=t.pad_token_id, sep_token_id=t.sep_token_id,
                         eos_token_id=t.sep_token_id, label_smoothing=cfg.label_smoothing),
        image_text_hidden_size=cfg.embed_dim,
    )


# ---------------------------------------------------------------------------------------------
# blipfast task models

BLIPFAST_CLASSES = {"captioning": BlipForCaptioning, "retrieval": BlipForRetrieval, "vqa": BlipForVQA}


def blipfast_model(task: str, cfg: BlipConfig) -> nn.Module:
    return BLIPFAST_CLASSES[task](cfg).eval()


def hf_model(task: str, cfg: BlipConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return sharpen_(HF_CLASSES[task](hf_config_for(cfg)), seed).eval()


def inputs(cfg: BlipConfig, B: int = 3, L: int = 9, seed: int = 1):
    """Images, and text with [CLS]-like first token, padding on all but the first row."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.text
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(7, t.vocab_size, (B, L), generator=g)
    ids[:, 0] = t.cls_token_id
    lengths = torch.tensor([L] + [L - 2 - i for i in range(B - 1)])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()  # (B, L), right-padded
    ids = ids.masked_fill(mask == 0, t.pad_token_id)
    ids[torch.arange(B), lengths - 1] = t.sep_token_id
    return images, ids, mask


# ---------------------------------------------------------------------------------------------
# what each side computes


@torch.no_grad()
def hf_outputs(task: str, hf: nn.Module, images, ids, mask) -> dict:
    out = {"vision": hf.vision_model(pixel_values=images).last_hidden_state}
    img = out["vision"]
    if task == "captioning":
        out["decoder_logits"] = hf(pixel_values=images, input_ids=ids, attention_mask=mask).logits
    if task == "retrieval":
        itm = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=True)
        itc = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False)
        out.update(grounded=itm.question_embeds, itm_logits=itm.itm_score, unimodal=itc.question_embeds,
                   itc_sim=itc.itm_score)
    if task == "vqa":
        q = hf.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=img).last_hidden_state
        out["unimodal"] = hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out["grounded"] = q
        # The answer decoder reads the question states. No question mask: transformers 5.24's BLIP
        # cross-attention ignores `encoder_attention_mask` (BlipTextAttention does not pass it on),
        # so HF attends to padded question tokens where the original (and blipfast) do not.
        out["decoder_logits"] = hf.text_decoder(input_ids=ids[:, :6], attention_mask=mask[:, :6],
                                                encoder_hidden_states=q).logits
    return out


@torch.no_grad()
def blipfast_outputs(task: str, model: nn.Module, images, ids, mask) -> dict:
    img = model.visual_encoder(images)
    out = {"vision": img}
    if task == "captioning":
        dec = model.text_decoder
        out["decoder_logits"] = dec.logits(dec(ids, mask, image_embeds=img))
    if task == "retrieval":
        grounded = model.text_encoder(ids, mask, image_embeds=img)
        unimodal = model.text_encoder(ids, mask)
        image_feat = F.normalize(model.vision_proj(img[:, 0]), dim=-1)
        text_feat = F.normalize(model.text_proj(unimodal[:, 0]), dim=-1)
        out.update(grounded=grounded, itm_logits=model.itm_head(grounded[:, 0]), unimodal=unimodal,
                   itc_sim=image_feat @ text_feat.T)
    if task == "vqa":
        q = model.text_encoder(ids, mask, image_embeds=img)
        out["unimodal"] = model.text_encoder(ids, mask)
        out["grounded"] = q
        dec = model.text_decoder
        out["decoder_logits"] = dec.logits(dec(ids[:, :6], mask[:, :6], image_embeds=q))
    return out


def compare(task: str, ours: dict, theirs: dict, label: str) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert_close(f"{label} {task} {name}", ours[name], theirs[name], TOL, norm=True)


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("kind", ["tiny", "base1"])
@pytest.mark.parametrize("task", ["captioning", "retrieval", "vqa"])
def test_hf_to_blipfast_outputs_match(task, kind):
    cfg = blip_config(kind)
    hf = hf_model(task, cfg)
    model = load_hf(blipfast_model(task, cfg), hf.state_dict(), hf_config=hf.config)
    images, ids, mask = inputs(cfg)
    ours, theirs = blipfast_outputs(task, model, images, ids, mask), hf_outputs(task, hf, images, ids, mask)
    compare(task, ours, theirs, "HF->bf")


@pytest.mark.parametrize("task", ["captioning", "retrieval", "vqa"])
def test_blipfast_to_hf_outputs_match(task, tmp_path):
    """export_hf -> from_pretrained: no missing/unexpected keys, same outputs, BLIP's label smoothing."""
    cfg = blip_config("tiny")
    model = sharpen_(blipfast_model(task, cfg), seed=3)
    export_hf(model, tmp_path)
    hf, info = HF_CLASSES[task].from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert not any(info.values()), f"HF loading reported {info}"
    assert hf.config.text_config.num_attention_heads == cfg.text.num_attention_heads
    assert hf.config.vision_config.layer_norm_eps == cfg.vision.layer_norm_eps
    images, ids, mask = inputs(cfg, seed=4)
    ours, theirs = blipfast_outputs(task, model, images, ids, mask), hf_outputs(task, hf, images, ids, mask)
    compare(task, ours, theirs, "bf->HF")
    if task == "captioning":
        # HF's LM loss with the exported config vs blipfast's (label smoothing 0.1, padding ignored).
        labels = ids.masked_fill(mask == 0, -100)
        with torch.no_grad():
            hf_loss = hf(pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels).loss
            hidden = model.text_decoder(ids, mask, image_embeds=ours["vision"])
            loss = model.text_decoder.lm_loss(hidden, labels, resolve_losses("reference"),
                                              label_smoothing=cfg.label_smoothing)
        assert_close("LM loss", loss, hf_loss, TOL, norm=True)


def test_position_table_interpolated_like_hf():
    """An HF checkpoint at 48 px loaded into a 32 px model = HF run at 32 px with interpolation."""
    cfg48 = blip_config("tiny")
    cfg32 = dataclasses.replace(cfg48, vision=dataclasses.replace(cfg48.vision, image_size=32))
    hf = hf_model("captioning", cfg48)
    model = load_hf(blipfast_model("captioning", cfg32), hf.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = hf.vision_model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        ours = model.visual_encoder(images)
    assert_close("interpolated vision", ours, theirs, TOL, norm=True)
