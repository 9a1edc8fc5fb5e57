"""blipfast's BlipForPretraining against the ORIGINAL BLIP code (PyPI blip-vit), in fp32.

One subprocess runs every original-code job (tests/parity/run_original.py); each test then runs
blipfast on the same weights, inputs and hard-negative indices and compares. Weights are drawn
at a scale where attention is sharp (tests/helpers.py's sharpen_), dropout is 0 on both sides,
the momentum copies differ from the online weights (so the momentum update shows), and the
queue pointer starts near the end (so the enqueue wraps around).

Tolerances (norm-wise relative): outputs and losses 1e-5, gradients 1e-4 (with a floor of 1e-3
of the total gradient norm for tensors that are zero in exact arithmetic: attention key biases).
"""
import os

import pytest
import torch

from blipfast import BlipForPretraining
from blipfast.convert.original import export_original_state_dict, load_original_checkpoint, load_original_state_dict
from tests.parity import harness as H
from tests.parity.harness import base_width_config, odd_config

pytestmark = [pytest.mark.parity, pytest.mark.slow]  # the module's original-code run: 11-81 s (cold imports)

OUT_TOL, GRAD_TOL, GRAD_FLOOR = 1e-5, 1e-4, 1e-3
ALPHA = 0.4
OUTPUTS = ("image_embeds", "image_feat", "text_feat", "itm_logits", "weights_t2i", "weights_i2t")
LOSSES = ("loss_itc", "loss_itm", "loss_lm")


# name -> (config builder, text lengths per step (rows padded differently), queue_ptr, seed,
#          image scale: < 1 also shrinks the ViT's first LayerNorm input so its eps shows)
CASES = {
    "odd": (odd_config, ([11, 7, 4, 11, 9], [6, 11, 11, 3, 8]), 15, 1, 2e-3),
    "base_width": (base_width_config, ([30, 17, 9, 24], [12, 30, 5, 30]), 4, 2, 1.0),
}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Prepare every job, run the original code once; returns (inputs, jobs, results)."""
    H.require_reference()
    work = str(tmp_path_factory.mktemp("parity"))
    jobs, inputs = {}, {}
    for name, (make_cfg, lengths, ptr, seed, image_scale) in CASES.items():
        cfg = make_cfg()
        model = BlipForPretraining(cfg)
        H.sharpen_model_(model, seed=seed, queue_ptr=ptr)
        if image_scale != 1.0:
            H.quiet_vit_input_(model)
        sd = export_original_state_dict(model)
        batches = [H.make_batch(cfg, ls, seed=100 * seed + i, image_scale=image_scale) for i, ls in enumerate(lengths)]
        jobs[name] = {"config": cfg.to_dict(), "weights": "state_dict", "state_dict": sd, "batches": batches,
                      "alpha": ALPHA, "adamw": H.ADAMW}
        inputs[name] = {"state_dict": sd, "batches": batches, "make_cfg": make_cfg, "queue_ptr": ptr}
        del model

    # The converter the other way: the original's own state_dict, loaded into blipfast.
    own = odd_config()
    jobs["own"] = {"config": own.to_dict(), "weights": "own", "seed": 7, "queue_ptr": 10,
                   "batches": [H.make_batch(own, [9, 11, 5, 11, 2], seed=70)], "alpha": ALPHA, "adamw": H.ADAMW}

    # A checkpoint trained at 48 px loaded at 80 px (3x3 -> 5x5 position grid) by the original's
    # own load_checkpoint; blipfast reads the same file with load_original_checkpoint.
    small = BlipForPretraining(odd_config(48))
    H.sharpen_model_(small, seed=3, queue_ptr=5)
    ckpt = os.path.join(work, "model_48px.pth")
    torch.save({"model": export_original_state_dict(small), "epoch": 3}, ckpt)
    big = odd_config(80)
    jobs["ckpt"] = {"config": big.to_dict(), "weights": "checkpoint", "path": ckpt,
                    "batches": [H.make_batch(big, [11, 8, 10, 4, 11], seed=90)], "alpha": ALPHA, "adamw": H.ADAMW}
    inputs["ckpt"] = {"path": ckpt}

    results = H.run_reference(jobs, work)
    return inputs, jobs, results


def check_steps(ours, ref, what):
    """Outputs, losses and sampling weights of every step; gradients of the first."""
    for i, (o, r) in enumerate(zip(ours, ref)):
        H.compare({k: o[k] for k in OUTPUTS + LOSSES}, {k: r[k] for k in OUTPUTS + LOSSES}, OUT_TOL,
                  f"{what}, step {i + 1}: outputs and losses")
    H.compare(ours[0]["grads"], ref[0]["grads"], GRAD_TOL, f"{what}: gradients", floor_frac=GRAD_FLOOR)


def run_case(parity, name, attention_backend):
    inputs, _, results = parity
    ref = H.job_result(results, name)
    inp = inputs[name]
    model = BlipForPretraining(inp["make_cfg"](attention_backend=attention_backend))
    load_original_state_dict(model, inp["state_dict"])
    steps = H.run_blipfast_steps(model, inp["batches"], [H.negatives_of(s) for s in ref["steps"]], ALPHA)
    return steps, ref, inp


@pytest.mark.parametrize("name,backend", [("odd", "reference"), ("odd", "sdpa"), ("base_width", "sdpa")])
def test_pretraining_matches_original(parity, name, backend):
    """Image embeddings, features, ITM logits, the sampling weights of the hard negatives, the
    three losses and every parameter gradient; then, after one AdamW step on both sides, the
    second forward's outputs, the momentum weights and the queues."""
    ours, ref, inp = run_case(parity, name, backend)
    check_steps(ours, ref["steps"], f"{name} ({backend})")

    # After the AdamW step: online weights (key-bias entries aside: their gradient is rounding
    # noise, which AdamW's first step turns into +-lr steps of either sign on each side).
    after_ours, after_ref = ours[0]["params_after_opt"], ref["steps"][0]["params_after_opt"]
    lr = H.ADAMW["lr"]
    masked_ours, masked_ref = {}, {}
    for k, r in after_ref.items():
        o = after_ours[k].reshape(r.shape)
        kb = H.key_bias_entries(k, r.shape)
        if kb is not None:
            assert (o[kb] - r[kb]).abs().max() <= 2 * lr, f"{k}: key-bias step larger than 2 lr"
            o, r = o.masked_fill(kb, 0), r.masked_fill(kb, 0)
        masked_ours[k], masked_ref[k] = o, r
    H.compare(masked_ours, masked_ref, OUT_TOL, f"{name}: weights after one AdamW step")

    # Momentum weights after each forward (the original updates them at the start of forward).
    for i in range(2):
        H.compare(ours[i]["momentum"], ref["steps"][i]["momentum"], OUT_TOL, f"{name}: momentum weights after step {i + 1}")

    # Queues: the columns written by each step (the pointer starts near the end and wraps), the
    # untouched columns bit-identical, and the pointer.
    B, Q, ptr = inp["batches"][0]["images"].shape[0], ours[0]["buffers"]["image_queue"].shape[1], inp["queue_ptr"]
    untouched = torch.ones(Q, dtype=torch.bool)
    for i in range(2):
        o, r = ours[i]["buffers"], ref["steps"][i]["buffers"]
        assert int(o["queue_ptr"]) == int(r["queue_ptr"]) == (ptr + (i + 1) * B) % Q
        cols = torch.arange(ptr + i * B, ptr + (i + 1) * B) % Q
        untouched[cols] = False
        for q in ("image_queue", "text_queue"):
            H.compare({q: o[q][:, cols]}, {q: r[q][:, cols]}, OUT_TOL, f"{name}: {q} columns written by step {i + 1}")
            assert torch.equal(o[q][:, untouched], r[q][:, untouched]), f"{q}: columns no step wrote changed"


def test_exported_layout_is_the_originals(parity):
    """The original's strict load accepted blipfast's export, and the export has exactly the
    original's keys, shapes and dtypes (0-dim temp, int64 position_ids, decoder aliases...)."""
    inputs, _, results = parity
    for name in CASES:
        ref = H.job_result(results, name)
        assert ref["strict_load"] == "ok"
        ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in inputs[name]["state_dict"].items()}
        assert ours == ref["original_layout"], f"{name}: keys / shapes / dtypes differ from the original's"


def test_original_state_dict_loads_into_blipfast(parity):
    """The original's own state_dict (its modules, re-drawn at a sharp scale in its venv) loaded
    with load_original_state_dict gives the original's outputs, losses and gradients."""
    _, jobs, results = parity
    ref = H.job_result(results, "own")
    model = BlipForPretraining(odd_config())
    load_original_state_dict(model, ref["state_dict"])
    ours = H.run_blipfast_steps(model, jobs["own"]["batches"], [H.negatives_of(ref["steps"][0])], ALPHA)
    check_steps(ours, ref["steps"], "original's own weights")
    H.compare(ours[0]["momentum"], ref["steps"][0]["momentum"], OUT_TOL, "original's own weights: momentum")


def test_checkpoint_at_another_image_size(parity):
    """A 48 px checkpoint file loaded at 80 px: blipfast's load_original_checkpoint and the
    original's load_checkpoint interpolate both position tables alike, and the models agree."""
    inputs, jobs, results = parity
    ref = H.job_result(results, "ckpt")
    assert ref["missing_keys"] == [] and ref["unexpected_keys"] == []
    model = BlipForPretraining(odd_config(80))
    load_original_checkpoint(model, inputs["ckpt"]["path"])
    H.compare({"pos_embed": model.visual_encoder.pos_embed, "pos_embed_m": model.visual_encoder_m.pos_embed},
              {"pos_embed": ref["pos_embed"], "pos_embed_m": ref["pos_embed_m"]}, OUT_TOL, "interpolated positions")
    ours = H.run_blipfast_steps(model, jobs["ckpt"]["batches"], [H.negatives_of(ref["steps"][0])], ALPHA)
    check_steps(ours, ref["steps"], "80 px from a 48 px checkpoint")
