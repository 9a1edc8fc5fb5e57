"""DeepSpeed ZeRO-1/2/3 on 2 CPU ranks (gloo) against a one-process replay of the same work.

One `deepspeed --num_gpus 2 tests/dist/zero_stages.py` launch (start-up costs ~20 s) runs every
case; the tests here read what each rank recorded. The replay (tests/dist/train_replay.py) computes
BLIP's semantics directly: per-rank ITC columns and hard negatives, gradients averaged over the
ranks, the queue filled with both ranks' momentum features, AdamW with the original schedule.
"""
import os
import subprocess
import sys

import pytest
import torch

from tests.dist.train_replay import compare_dicts, replay
from tests.helpers import REPO, free_port, repo_env

DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # the shared deepspeed launch: 24-64 s


def launch(script, args, timeout=900):
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script] + args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=repo_env())
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_stages")
    launch(os.path.join(REPO, "tests", "dist", "zero_stages.py"), ["--out", str(out)])

    def load(case, rank):
        rec = torch.load(out / f"{case}_rank{rank}.pt", weights_only=False)
        assert "crash" not in rec, f"{case} on rank {rank} crashed:\n{rec['crash']}"
        return rec

    return load


@pytest.fixture(scope="module")
def ref():
    return replay()


# Tolerances, relative to each tensor's largest value (and, for gradients, to 1e-4 of the
# largest gradient: attention key biases get exactly-zero gradients in exact arithmetic, pure
# rounding noise here). ZeRO-1/2 came out bitwise equal to the replay on this machine; ZeRO-3
# reduces and accumulates shared (encoder/decoder) gradients in another order.
TOL = {1: 1e-6, 2: 1e-6, 3: 2e-5}


def grads_close(got, want, tol, what, summands=None, atol=0.0):
    """summands: per parameter, the largest entry of the gradients that were summed into it
    (rounding is relative to those, not to their possibly much smaller sum); atol: an absolute
    floor."""
    scale = max(float(v.abs().max()) for v in want.values())
    for k, w in want.items():
        g = got[k]
        assert g is not None, f"{what}: no gradient for {k}"
        err = float((g.double() - w.double()).abs().max())
        ref = max(float(w.abs().max()), 1e-4 * scale, (summands or {}).get(k, 0.0))
        assert err <= tol * ref + atol, f"{what}: {k} differs by {err:.3g}"


# Attention key biases (also the middle third of the ViT's fused qkv bias) get exactly-zero
# gradients in exact arithmetic, so their AdamW steps (about lr * noise / eps) depend on rounding
# order: under ZeRO-3 weights may also differ by ATOL, 3% of the largest possible AdamW step
# over the 3 steps (lr 1e-3), far below what a wrong update would change.
ATOL = {1: 0.0, 2: 0.0, 3: 3 * 1e-3 * 1e-2}


def params_close(got, want, tol, atol, what):
    scale = max(float(v.abs().max()) for v in want.values() if v.is_floating_point())
    for k, w in want.items():
        err = float((got[k].double() - w.double()).abs().max())
        assert err <= tol * max(float(w.double().abs().max()), 1e-4 * scale) + atol, f"{what}: {k} differs by {err:.3g}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_one_process_replay(runs, ref, stage):
    for rank in (0, 1):
        rec = runs(f"z{stage}", rank)
        compare_dicts(rec["initial"], ref["initial"], 0.0, f"ZeRO-{stage} rank {rank} initial weights")
        assert rec["global_step"] == 3
        for i, (got, want) in enumerate(zip(rec["steps"], ref["steps"])):
            what = f"ZeRO-{stage} rank {rank} step {i}"
            assert got["stepped"]
            for name, value in want["losses"][rank].items():  # this rank's own batch
                assert got["local"][name] == pytest.approx(value, rel=TOL[stage], abs=1e-7), f"{what}: {name}"
            mean = sum(want["losses"][r]["loss"] for r in (0, 1)) / 2
            assert got["mean"]["loss"] == pytest.approx(mean, rel=1e-6), f"{what}: loss averaged over ranks"
            assert got["lr"] == pytest.approx(want["lr"], rel=1e-12), f"{what}: learning rate"
            grads_close(got["grads"], want["grads"], TOL[stage], what + " reduced gradients")
            params_close(got["momentum"], want["momentum"], TOL[stage], ATOL[stage], what + " momentum encoders / queues")
        params_close(rec["final"], ref["final"], TOL[stage], ATOL[stage], f"ZeRO-{stage} rank {rank} final weights")


def test_gradient_accumulation_matches_replay(runs):
    """grad_accum=2: every micro-batch updates the EMA and the queue (as every forward of the
    original does); gradients are the mean over micro-batches and ranks."""
    want = replay(steps=2, grad_accum=2, batches_per_epoch=4)
    for rank in (0, 1):
        rec = runs("accum_z2", rank)
        assert rec["global_step"] == 2 and [m["stepped"] for m in rec["micro"]] == [False, True, False, True]
        for i, (got, ref_m) in enumerate(zip(rec["micro"], want["micro"])):
            what = f"accumulation rank {rank} micro-batch {i}"
            for name, value in ref_m["losses"][rank].items():
                assert got["local"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{what}: {name}"
            params_close(got["momentum"], ref_m["momentum"], 1e-6, 0.0, what + " momentum / queues")
        for s, (got, ref_s) in enumerate(zip(rec["steps"], want["steps"])):
            assert got["lr"] == pytest.approx(ref_s["lr"], rel=1e-12)
            # Micro-batch gradients partly cancel in the sum, and ZeRO-2 adds them in another order:
            # rounding is relative to the summands, not to their (smaller) mean. DeepSpeed's
            # second step also carries rounding-level residue (~4e-8) of the first step's much
            # larger gradients: atol is 1e-7 of the run's largest gradient entry.
            first = max(float(v.abs().max()) for v in want["steps"][0]["grads"].values())
            grads_close(got["grads"], ref_s["grads"], 1e-5, f"accumulation rank {rank} step {s} gradients",
                        summands=ref_s["summand_max"], atol=1e-7 * first)
        params_close(rec["final"], want["final"], 1e-5, ATOL[3], f"accumulation rank {rank} final weights")


def test_ranks_hold_identical_momentum_state(runs):
    for case in ("z1", "z2", "z3", "bf16_z2", "bf16_z3"):
        r0, r1 = runs(case, 0), runs(case, 1)
        for i, (a, b) in enumerate(zip(r0["steps"], r1["steps"])):
            key = "momentum" if "momentum" in a else "after"
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), f"{case} step {i}: {k} differs between ranks"


def test_zero_stages_agree(runs):
    z = {s: runs(f"z{s}", 0) for s in (1, 2, 3)}
    compare_dicts(z[2]["final"], z[1]["final"], 0.0, "ZeRO-2 vs ZeRO-1 final weights")
    params_close(z[3]["final"], z[1]["final"], TOL[3], ATOL[3], "ZeRO-3 vs ZeRO-1 final weights")
    for i in range(3):
        assert z[3]["steps"][i]["local"]["loss"] == pytest.approx(z[1]["steps"][i]["local"]["loss"], rel=TOL[3])


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_keeps_ema_and_queues_fp32(runs, stage):
    """DeepSpeed casts the engine's parameters to bf16; the EMA must still be exact fp32 math:
    theta_m' = m theta_m + (1 - m) theta, with theta the (bf16) weights the step started from."""
    m = 0.995
    for rank in (0, 1):
        rec = runs(f"bf16_z{stage}", rank)
        for i, st in enumerate(rec["steps"]):
            assert st["param_dtype"] == "torch.bfloat16"
            assert set(st["momentum_dtypes"].values()) == {"torch.float32", "torch.int64"}
            assert st["momentum_dtypes"]["queue_ptr"] == "torch.int64"
            before, after = st["before"], st["after"]
            for k, v in after.items():
                if k.split(".")[0] not in ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m"):
                    continue
                online = before[k.replace("_m.", ".", 1)]
                want = before[k] * m + online * (1 - m)
                assert v.dtype == torch.float32
                assert torch.allclose(v, want, rtol=1e-6, atol=1e-7), f"bf16 ZeRO-{stage} step {i}: EMA of {k}"
            assert all(torch.isfinite(torch.tensor(x)) for x in st["local"].values())


def test_nan_skip_is_consistent_across_ranks(runs):
    """Rank 1 alone gets a NaN image at batch 1: both ranks skip that batch (no update, queue
    restored) and go on; the other batches train."""
    for rank in (0, 1):
        rec = runs("nan_skip_z3", rank)
        assert rec["error"] is None and rec["global_step"] == 2
        skipped = [s["skipped"] for s in rec["steps"]]
        assert skipped == [False, True, False], f"rank {rank}: {skipped}"
        st = rec["steps"][1]
        assert "loss_itc" in st["nonfinite"]
        for k, v in st["before"].items():
            if k.split(".")[0] in ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m"):
                continue  # one EMA step toward the (unchanged, finite) online weights is kept
            assert torch.equal(v, st["after"][k]), f"rank {rank}: {k} changed in a skipped step"
        assert all(torch.isfinite(v).all() for k, v in rec["steps"][2]["after"].items() if v.is_floating_point())
    a, b = runs("nan_skip_z3", 0), runs("nan_skip_z3", 1)
    assert a["steps"][2]["mean"] == b["steps"][2]["mean"]


def test_nan_stop_names_step_and_loss(runs):
    for rank in (0, 1):
        rec = runs("nan_stop_z3", rank)
        assert rec["error"] is not None, f"rank {rank} did not stop"
        assert "non-finite loss_itc" in rec["error"] and "optimizer step 1 (epoch 0, batch 1)" in rec["error"]
        assert "1 of 2 rank(s)" in rec["error"]
        assert len(rec["steps"]) == 1 and rec["global_step"] == 1


@pytest.mark.parametrize("stage", [1, 3])
def test_export_from_zero_checkpoint(runs, tmp_path, stage):
    """Plain weights from a ZeRO checkpoint (zero_to_fp32 + the fp32 momentum file) equal the
    trained model; queue_ptr stays int64; the official layout loads strictly."""
    from blipfast import BlipForPretraining
    from blipfast.convert import load_original_checkpoint
    from blipfast.train.export import consolidated_state_dict, export, load_run_model_config

    rec = runs(f"z{stage}", 0)
    out_dir = os.path.dirname(rec["ckpt_dir"])
    sd = consolidated_state_dict(out_dir)
    compare_dicts(sd, rec["final"], 0.0, f"export of ZeRO-{stage}")
    assert sd["queue_ptr"].dtype == torch.int64 and int(sd["queue_ptr"]) == (3 * 8) % 16
    path = export(out_dir, str(tmp_path / "official.pth"), "original")
    model = load_original_checkpoint(BlipForPretraining(load_run_model_config(out_dir)), path)
    assert torch.equal(model.temp, rec["final"]["temp"])
    assert torch.load(path, weights_only=True)["model"]["temp"].ndim == 0  # the official 0-dim temp


def test_export_from_bf16_zero3_checkpoint(runs):
    """bf16 under ZeRO-3: exported weights are fp32 (DeepSpeed's fp32 master copies, which the
    bf16 weights the model ran with round), the momentum state is the exact fp32 EMA."""
    from blipfast.train.export import consolidated_state_dict

    rec = runs("bf16_z3", 0)
    sd = consolidated_state_dict(os.path.dirname(rec["ckpt_dir"]))
    for k, v in rec["final"].items():
        assert sd[k].dtype == (torch.int64 if k == "queue_ptr" else torch.float32), k
        if k.split(".")[0] in ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m",
                               "image_queue", "text_queue", "queue_ptr"):
            assert torch.equal(sd[k], v), f"{k}: the exported momentum state is not the trained fp32 one"
        else:  # rec holds the bf16 copies: the fp32 masters round to them
            assert torch.equal(sd[k].to(torch.bfloat16).float(), v), f"{k}: fp32 master does not round to the bf16 weight"
