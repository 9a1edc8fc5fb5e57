"""Exact work elimination (config `exact_work`) changes no result.

The same tiny models, with the savings on and off, in fp64 (where any real difference stands out
from rounding by many orders of magnitude): equal losses, ITM logits and every gradient, on
batches of very uneven caption lengths (1 real token up to the padded length), with fixed and
with sampled negatives. Weights are drawn at a scale where attention is sharp (with BERT's init
a wrong mask would barely move a loss).
"""
import dataclasses
import math
import os

import pytest
import torch

from blipfast.models.blip import BlipForPretraining
from blipfast.models.caption import BlipForCaptioning
from blipfast.models.vqa import BlipForVQA
from blipfast.models.retrieval import BlipForRetrieval
from blipfast.ops.packing import Packing

from tests.helpers import REPO, sharpen_

# fp64: both paths are exact up to summation order, ~1e-16 relative per op; 1e-10 leaves room
# for the ~1e3 condition of a few layers and is still ~1e6 below any real difference (the
# smallest seen when a mask is wrong is ~1e-3).
RTOL = 1e-10


def tiny(cfg, exact, backend="reference", dropout=0.0):
    vision = dataclasses.replace(cfg.vision, image_size=32, width=64, depth=2, num_heads=4)
    text = dataclasses.replace(cfg.text, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout, encoder_width=0)
    return dataclasses.replace(cfg, vision=vision, text=text, embed_dim=32, queue_size=12,
                               attention_backend=backend, loss_backend="reference", exact_work=exact)


def uneven_batch(cfg, lengths, L, seed=1):
    """Right-padded captions: [CLS] words [SEP] [PAD]..., one row per length (1 = [CLS] alone)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g, dtype=torch.float64)
    ids = torch.randint(10, cfg.text.vocab_size, (B, L), generator=g)
    lengths = torch.tensor(lengths)
    pos = torch.arange(L)[None, :]
    ids[:, 0] = cfg.text.cls_token_id
    ids[(pos == lengths[:, None] - 1) & (lengths[:, None] > 1)] = cfg.text.sep_token_id
    mask = (pos < lengths[:, None]).long()
    return images, ids.masked_fill(mask == 0, cfg.text.pad_token_id), mask


def pair(tiny_config, model_cls, backend="reference", **kw):
    torch.manual_seed(0)
    padded = model_cls(tiny(tiny_config, False, backend), **kw).double()
    sharpen_(padded, 0)
    exact = model_cls(tiny(tiny_config, True, backend), **kw).double()
    exact.load_state_dict(padded.state_dict())
    return padded.train(), exact.train()


def run(model, *args, **kw):
    out = model(*args, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(out_a, grads_a, out_b, grads_b, names=("loss_itc", "loss_itm", "loss")):
    for n in names:
        a, b = getattr(out_a, n), getattr(out_b, n)
        assert torch.allclose(a, b, rtol=RTOL, atol=0), (n, a.item(), b.item())
    assert torch.allclose(out_a.itm_logits, out_b.itm_logits, rtol=RTOL, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads_a.values()))
    for n, ga in grads_a.items():
        err = float((ga - grads_b[n]).norm())
        # gradients that are zero in exact arithmetic (attention key biases) are rounding noise:
        # measured against the whole gradient's norm as well as their own
        assert err <= RTOL * max(float(ga.norm()), 1e-3 * total), (n, err, float(ga.norm()))


LENGTHS = [1, 9, 3, 12, 2, 7]  # 1 real token ([CLS] alone) up to the padded length L = 12
L = 12


@pytest.mark.parametrize("negatives,backend", [("fixed", "reference"), ("sampled", "reference"), ("fixed", "sdpa")])
def test_pretraining_packed_equals_padded(tiny_config, negatives, backend):
    padded, exact = pair(tiny_config, BlipForPretraining, backend)
    images, ids, mask = uneven_batch(padded.config, LENGTHS, L)
    kw = {}
    if negatives == "fixed":  # the length-1 and length-L captions as each other's negatives
        kw["negatives"] = (torch.tensor([3, 0, 5, 1, 0, 2]), torch.tensor([3, 5, 0, 0, 1, 4]))
    torch.manual_seed(5)
    out_p, g_p = run(padded, images, ids, mask, 0.4, **kw)
    torch.manual_seed(5)
    out_e, g_e = run(exact, images, ids, mask, 0.4, **kw)
    assert torch.equal(out_p.negatives[0], out_e.negatives[0]) and torch.equal(out_p.negatives[1], out_e.negatives[1])
    assert_same(out_p, g_p, out_e, g_e, names=("loss_itc", "loss_itm", "loss_lm", "loss"))
    # the state a step leaves behind is the same too
    assert torch.allclose(padded.image_queue, exact.image_queue, rtol=RTOL, atol=1e-13)
    assert torch.allclose(padded.text_queue, exact.text_queue, rtol=RTOL, atol=1e-13)


def test_retrieval_packed_equals_padded(tiny_config):
    padded, exact = pair(tiny_config, BlipForRetrieval)
    images, ids, mask = uneven_batch(padded.config, LENGTHS, L, seed=2)
    idx = torch.tensor([0, 1, 2, 0, 3, 4])  # image 0 twice: same-id positives
    torch.manual_seed(7)
    out_p, g_p = run(padded, images, ids, mask, 0.4, idx)
    torch.manual_seed(7)
    out_e, g_e = run(exact, images, ids, mask, 0.4, idx)
    assert_same(out_p, g_p, out_e, g_e)


def test_unpackable_masks_take_the_padded_path(tiny_config):
    """Left padding or an empty caption: the padded path runs (same result, nothing packed)."""
    padded, exact = pair(tiny_config, BlipForPretraining)
    images, ids, mask = uneven_batch(padded.config, [4, 12, 6, 5, 12, 3], L)
    mask = mask.flip(1)  # left-padded
    ids = ids.flip(1)
    assert Packing.from_mask(mask) is None
    negatives = (torch.tensor([1, 0, 3, 2, 5, 4]), torch.tensor([2, 3, 0, 1, 0, 1]))
    out_p, g_p = run(padded, images, ids, mask, 0.4, negatives=negatives)
    out_e, g_e = run(exact, images, ids, mask, 0.4, negatives=negatives)
    assert torch.equal(out_p.loss, out_e.loss)
    assert Packing.from_mask(torch.tensor([[1, 1, 0], [0, 0, 0]])) is None


def test_momentum_vit_first_row_equals_full(tiny_config):
    padded, _ = pair(tiny_config, BlipForPretraining)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    full = padded.visual_encoder_m(images)[:, :1]
    first = padded.visual_encoder_m(images, first_only=True)
    assert first.shape == full.shape
    assert torch.allclose(first, full, rtol=RTOL, atol=1e-13)


def grads_close(a, b):
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in a.values()))
    assert a.keys() == b.keys()
    for n, ga in a.items():
        err = float((ga - b[n]).norm())
        assert err <= RTOL * max(float(ga.norm()), 1e-3 * total), (n, err, float(ga.norm()))


def loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_captioning_packed_equals_padded(tiny_config):
    padded, exact = pair(tiny_config, BlipForCaptioning)
    images, ids, mask = uneven_batch(padded.config, [3, 12, 4, 7, 3, 9], L)  # the prompt is 2 tokens
    fn = lambda m: m(images, ids, mask, prompt_length=2)  # noqa: E731
    lp, gp = loss_and_grads(padded, fn)
    le, ge = loss_and_grads(exact, fn)
    assert torch.allclose(lp, le, rtol=RTOL, atol=0), (lp.item(), le.item())
    grads_close(gp, ge)


def test_vqa_packed_equals_padded(tiny_config):
    padded, exact = pair(tiny_config, BlipForVQA)
    images, q_ids, q_mask = uneven_batch(padded.config, [5, 2, 8], 8, seed=3)
    _, a_ids, a_mask = uneven_batch(padded.config, [2, 4, 3, 6, 2, 3], 6, seed=4)
    n, w = torch.tensor([1, 3, 2]), torch.tensor([1.0, 0.5, 0.3, 0.2, 0.6, 0.4], dtype=torch.float64)
    fn = lambda m: m(images, q_ids, q_mask, a_ids, a_mask, n, w)  # noqa: E731
    lp, gp = loss_and_grads(padded, fn)
    le, ge = loss_and_grads(exact, fn)
    assert torch.allclose(lp, le, rtol=RTOL, atol=0), (lp.item(), le.item())
    grads_close(gp, ge)
    padded.eval(), exact.eval()
    assert torch.equal(padded.rank_answers(images, q_ids, q_mask, a_ids, a_mask, k=4),
                       exact.rank_answers(images, q_ids, q_mask, a_ids, a_mask, k=4))


def test_retrieval_itm_logits_packed_equal_padded(tiny_config):
    """The re-ranking / CapFilt filter entry point: per-image K/V, packed texts."""
    padded, exact = pair(tiny_config, BlipForRetrieval)
    images, ids, mask = uneven_batch(padded.config, LENGTHS, L, seed=5)
    padded.eval(), exact.eval()
    with torch.no_grad():
        emb = padded.visual_encoder(images[:2])
        rows = torch.tensor([0, 1, 1, 0, 1, 0])
        kv = [(k[rows], v[rows]) for k, v in padded.text_encoder.image_kv(emb)]
        a = padded.itm_logits(ids, mask, image_kv=kv)
        b = exact.itm_logits(ids, mask, image_kv=kv)
        enc_ids = exact.with_first_token(ids, exact.config.text.enc_token_id)
        c = exact.itm_head(exact.text_encoder.first_states(enc_ids, mask, exact.text_encoder.image_kv(emb), rows))
    assert torch.allclose(a, b, rtol=RTOL, atol=1e-12) and torch.allclose(a, c, rtol=RTOL, atol=1e-12)


def _retrieval_world_worker(rank, world, store, out):
    """One rank of a 2-process retrieval step with negatives drawn from the other rank: the
    exact path projects K/V for its own images plus the gathered negatives (2B)."""
    import torch.distributed as dist

    from blipfast import BlipConfig

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = BlipConfig.from_yaml(os.path.join(REPO, "configs", "blip_tiny.yaml"))
    padded, exact = pair(cfg, BlipForRetrieval)  # same seed: the same weights on both ranks
    lengths = LENGTHS if rank == 0 else LENGTHS[::-1]
    images, ids, mask = uneven_batch(padded.config, lengths, L, seed=10 + rank)
    B = len(lengths)
    idx = torch.arange(B) + 100 * rank
    other = torch.arange(B).flip(0) + B * (1 - rank)  # every negative lives on the other rank
    negatives = (other, other.roll(1))
    results = []
    for model in (padded, exact):
        torch.manual_seed(3)
        out_m, grads = run(model, images, ids, mask, 0.4, idx, negatives=negatives)
        results.append((out_m, grads))
    (out_p, g_p), (out_e, g_e) = results
    errors = []
    try:
        assert_same(out_p, g_p, out_e, g_e)
    except AssertionError as e:
        errors.append(repr(e))
    torch.save({"errors": errors, "loss": float(out_e.loss)}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_retrieval_packed_equals_padded_with_negatives_from_another_rank(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_retrieval_world_worker, args=(2, str(tmp_path / "store"), out), nprocs=2)
    for rank in range(2):
        res = torch.load(f"{out}.{rank}")
        assert not res["errors"], res["errors"]
        assert math.isfinite(res["loss"])
