"""The whole tiny BLIP pre-training step on each attention backend equals the reference backend.

Covers every attention the model runs: ViT self-attention (strided views of the fused qkv),
the unimodal text encoder (padding mask), the image-grounded encoder (cross-attention over 3B
pairs), and the decoder (causal + padding), online and momentum encoders, in training mode.
Weights are re-drawn at a scale where attention is sharp (with BERT's init it is nearly uniform,
and a wrong mask would barely move a loss).
"""
import copy
import dataclasses
import importlib.util

import pytest
import torch

from blipfast.models.blip import BlipForPretraining
from blipfast.ops.attention import BackendUnavailable, resolve_attention
from tests.helpers import sharpen_


def tiny(cfg, backend):
    """tiny_config shrunk further: 32 px images (5 tokens), head dims 32 (text) / 16 (vision)."""
    vision = dataclasses.replace(cfg.vision, image_size=32, width=64, depth=1, num_heads=4)
    text = dataclasses.replace(cfg.text, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, encoder_width=0)
    return dataclasses.replace(cfg, vision=vision, text=text, embed_dim=32, queue_size=8,
                               attention_backend=backend, loss_backend="reference")


def inputs(cfg):
    g = torch.Generator().manual_seed(1)
    B, L = 2, 7
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(10, cfg.text.vocab_size, (B, L), generator=g)
    ids[:, 0] = cfg.text.cls_token_id
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0  # the second caption is padded
    ids[1, 3] = cfg.text.sep_token_id
    ids[mask == 0] = cfg.text.pad_token_id
    negatives = (torch.tensor([1, 0]), torch.tensor([1, 0]))
    return images, ids, mask, negatives


def step(model, cfg):
    images, ids, mask, negatives = inputs(cfg)
    model.train()
    out = model(images, ids, mask, alpha=0.4, negatives=negatives)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_pretraining_losses_and_grads_match_reference(tiny_config, backend):
    torch.manual_seed(0)
    ref_model = BlipForPretraining(tiny(tiny_config, "reference"))
    sharpen_(ref_model, 0)
    model = BlipForPretraining(tiny(tiny_config, backend))
    model.load_state_dict(copy.deepcopy(ref_model.state_dict()))

    ref_out, ref_grads = step(ref_model, ref_model.config)
    out, grads = step(model, model.config)

    for name in ("loss_itc", "loss_itm", "loss_lm"):
        a, e = getattr(out, name).item(), getattr(ref_out, name).item()
        assert abs(a - e) <= 1e-5 * max(1.0, abs(e)), f"{name}: {backend} {a:.8f} vs reference {e:.8f}"
    assert grads.keys() == ref_grads.keys()
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
    for name, e in ref_grads.items():
        err = (grads[name].double() - e.double()).norm().item()
        # Some gradients are zero in exact arithmetic (e.g. key biases): measure against the total too.
        tol = 1e-4 * e.double().norm().item() + 1e-6 * total
        assert err <= tol, f"grad {name}: |{backend} - reference| = {err:.3e} > {tol:.3e} (|ref| = {e.norm():.3e})"
    # the momentum update and the queues ran identically
    assert torch.equal(model.queue_ptr, ref_model.queue_ptr)
    torch.testing.assert_close(model.image_queue, ref_model.image_queue, rtol=1e-5, atol=1e-6)


def test_backend_is_visible_in_repr(tiny_config):
    model = BlipForPretraining(tiny(tiny_config, "triton"))
    text = repr(model)
    assert "backend=triton" in text and "backend=sdpa" not in text and "backend=reference" not in text


def test_environment_variable_overrides_config(tiny_config, monkeypatch):
    monkeypatch.setenv("BLIPFAST_ATTENTION_BACKEND", "reference")
    assert "backend=reference" in repr(BlipForPretraining(tiny(tiny_config, "triton")))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_unavailable_explicit_backend_raises(tiny_config):
    with pytest.raises(BackendUnavailable, match="flash-attn package"):
        BlipForPretraining(tiny(tiny_config, "flash_attn"))
    with pytest.raises(BackendUnavailable, match="unknown attention backend 'nope'"):
        resolve_attention("nope")
