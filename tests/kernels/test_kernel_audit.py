"""The static sm_90 audit (benchmarks/kernel_audit.py) as CI checks: every attention kernel variant
and autotune config compiles for Hopper with the installed Triton and with triton 3.6 (the GPU
machine's version), without a GPU, and meets the thresholds of THRESHOLDS.

The audit runs once per Triton version in a subprocess (no TRITON_INTERPRET: it compiles real
GPU code with the ptxas and cuobjdump inside the triton wheel). Triton 3.6 is looked up in
$BLIPFAST_TRITON36 or .tri36/ (scripts/setup_venvs.sh installs it there with --no-deps).
"""
import json
import os
import subprocess
import sys

import pytest

from kernel_audit import DROPOUT_GROUPS, THRESHOLDS, dropout_cost, loop_body  # benchmarks/ is on pytest's
# pythonpath; importing it compiles nothing
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # each Triton's audit compiles every variant: ~2 min with a cold Triton cache (~20 s warm)

TRITON36 = os.environ.get("BLIPFAST_TRITON36", os.path.join(REPO, ".tri36"))


def _run_audit(tmp_path_factory, extra_path):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([p for p in (extra_path, REPO, env.get("PYTHONPATH")) if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_audit.py"), "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    print(res.stdout)
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=["installed", "3.6"])
def audit(request, tmp_path_factory):
    if request.param == "3.6":
        if not os.path.isdir(os.path.join(TRITON36, "triton")):
            msg = f"triton 3.6 not found at {TRITON36} (scripts/setup_venvs.sh installs it)"
            if os.environ.get("CI"):  # CI must audit the GPU machine's compiler, never skip it
                pytest.fail(msg, pytrace=False)
            pytest.skip(msg)
        result = _run_audit(tmp_path_factory, TRITON36)
        assert result["triton"].startswith("3.6"), result["triton"]
        return result
    return _run_audit(tmp_path_factory, None)


def test_every_kernel_compiles_to_wgmma_without_spills(audit):
    rows = [r for r in audit["rows"] if r["variant"] != "candidate"]  # candidates are reported, not used
    assert len(rows) >= 30, f"only {len(rows)} kernels audited"
    # dkdvq: the fused 5-matmul backward (checked for wgmma below)
    assert {r["kernel"] for r in rows} == {"fwd", "dq", "dkdv", "dkdvq", "itc_st", "itc_gr", "ce"}
    assert any("varlen" in r["variant"] for r in rows)
    fused = {r["variant"] for r in rows if r["kernel"] == "dkdvq"}  # dense and packed, with and without dropout
    assert {"dense", "varlen", "varlen+causal", "varlen+dropout", "varlen+causal+dropout"} <= fused, fused
    # the fp32 path (FMA dots) of every attention kernel, each variant with and without dropout
    fp32 = {(r["kernel"], r["variant"]) for r in rows if r["variant"].endswith(" fp32")}
    assert {(k, v + d + " fp32") for k in ("fwd", "dq", "dkdv", "dkdvq") for v in ("dense", "causal+kpm", "varlen")
            for d in ("", "+dropout")} <= fp32, fp32
    # the ITC kernels: bf16 (wgmma) and fp32 (3xTF32 mma.sync, streamed features), with and without image ids
    itc = {(r["kernel"], r["variant"]) for r in rows if r["kernel"].startswith("itc")}
    assert {(k, v) for k in ("itc_st", "itc_gr")
            for v in ("default", "ids", "default fp32", "ids fp32", "E1024 fp32")} <= itc, itc
    spilling = [(r["kernel"], r["variant"], r["config"], r["spills"]) for r in rows if r["spills"] > THRESHOLDS["spills"]]
    assert not spilling, f"spills: {spilling}"
    # thin-tail launches (16 rows of 197, `thin_tail_split`) are too narrow for wgmma: mma.sync there;
    # fp32 runs true fp32 dots on the FMA units
    attention = [r for r in rows if r["kernel"] in ("fwd", "dq", "dkdv") and "thin-tail" not in r["variant"]
                 and not r["variant"].endswith(" fp32")]
    not_wgmma = [(r["kernel"], r["variant"], r["config"], r["mma"]) for r in attention if r["mma"] != "wgmma"]
    assert not not_wgmma, f"not on wgmma: {not_wgmma}"
    # the fused backward: its fifth dot runs transposed (K^T dS^T, head dim on the M side), so the
    # packed kernel is all wgmma; the dense one also walks the thin key tail of 197 in 16-key tiles
    # (mma.sync, as the two-kernel path's thin-tail launch does)
    fused = [r for r in rows if r["kernel"] == "dkdvq" and not r["variant"].endswith(" fp32")]
    odd = [(r["variant"], r["config"], r["mma"]) for r in fused
           if r["mma"] != ("wgmma" if r["variant"].startswith("varlen") else "wgmma+mma.sync")]
    assert fused and not odd, f"fused backward not on wgmma: {odd}"


def test_loss_kernels_on_wgmma(audit):
    rows = [r for r in audit["rows"] if r["kernel"].startswith("itc") and r["variant"] in ("default", "ids")]
    assert len(rows) == 4 and all(r["mma"] == "wgmma" for r in rows), rows
    assert all(r["loop"] > 0 for r in rows), "a main loop was not found in the SASS"


def test_ce_aligned_loads_are_vectorised(audit):
    """The LM cross-entropy kernel at V = 30522 (bf16 logits and bias, 16 per thread per tile).
    ALIGNED (the op's buffers, V stored as 30528): every tile of logits and bias, body and tail,
    both sweeps, is read with 128-bit loads; the only narrower loads are the row's label and
    1/n_valid (32-bit) and its target logit and bias entry (16-bit, one element each). The
    unaligned fall-back (a contiguous (n, 30522) tensor) reads the logits 16 bits at a time: what
    the aligned path removes, and proof that the count tells the two apart."""
    ce = {r["variant"]: r for r in audit["rows"] if r["kernel"] == "ce"}
    assert set(ce) == {"aligned", "unaligned"}, set(ce)
    a, u = ce["aligned"], ce["unaligned"]
    assert a["spills"] == 0 and u["spills"] == 0, (a["spills"], u["spills"])
    assert a["ldg"].get("128", 0) >= 4, a["ldg"]  # at least a body and a tail tile per sweep
    assert a["ldg"].get("16", 0) <= 2 and a["ldg"].get("32", 0) <= 2 and "64" not in a["ldg"], a["ldg"]
    assert a["stg"].get("128", 0) >= 1 and a["stg"].get("16", 0) == 0, a["stg"]  # tail stores: 32-bit (V is even)
    assert u["ldg"].get("16", 0) >= 16, u["ldg"]


@pytest.mark.xfail(strict=True, reason="not met: with 8-bit thresholds, Philox-4x32-7 and draws laid out in the "
                   "accumulator's registers (8 elements of a thread per call, no layout conversion) the dropout loop is "
                   "1.23-1.79x the loop without it under triton 3.9 and 1.25-1.90x under 3.6 (was 1.6-2.8x). The fused "
                   "backward, which draws once for dK, dV and dQ, is at 1.23-1.28x (3.9) and 1.25-1.35x (3.6); under 3.9 fwd is "
                   "at 1.32-1.64x, dq at 1.30-1.79x, dkdv at 1.32-1.50x. kernel_audit.py --dropout-cost: the dense 64 x 64 "
                   "forward's +221 is 106 Philox (4 calls per thread, each computed by two lanes), 89 per element (a "
                   "byte rotation, a compare, a select) and 26 other. Even without that redundancy (warp shuffles) and "
                   "with packed half2 masks (inline PTX) the forward would add ~128 to 348 (1.37x) and dQ ~1.45x")
def test_dropout_loop_cost(audit):
    ratios = {(r["kernel"], r["variant"], r["config"]): r["loop_ratio"] for r in audit["rows"] if r["loop_ratio"]}
    assert ratios
    over = {k: round(v, 2) for k, v in ratios.items() if v > THRESHOLDS["dropout_loop_ratio"]}
    assert not over, f"dropout loops over {THRESHOLDS['dropout_loop_ratio']}x: {over}"


def test_dropout_cost_breakdown_matches_the_audited_loops(audit):
    """`--dropout-cost` (where the extra instructions go) reads the same loops the audit rows count:
    its totals equal the rows' loop lengths, and its groups add up to the difference."""
    loops = {(r["kernel"], r["variant"], r["config"]): r["loop"] for r in audit["rows"]}
    rows = audit["dropout_cost"]
    assert {(r["kernel"], r["variant"]) for r in rows} == {(k, v) for k in ("fwd", "dq", "dkdv") for v in ("dense", "varlen")}
    for r in rows:
        assert r["base"] == loops[(r["kernel"], r["variant"], r["config"])], r
        assert r["dropout"] == loops[(r["kernel"], r["variant"] + "+dropout", r["config"])], r
        assert sum(r[g] for g, _ in DROPOUT_GROUPS) + r["other"] == r["dropout"] - r["base"], r
        assert r["mul"] > 0 and r["cmp"] == r["elems"], r  # Philox products; one compare per element


def test_loop_body_and_dropout_cost_on_hand_written_sass():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32 gdesc[UR4], RZ, !UPT ;
        /*0020*/                   NOP ;
        /*0030*/                   IMAD R2, R3, R4, R5 ;
        /*0040*/              @P0   BRA 0x10 ;
        /*0050*/                   FADD R6, R7, R8 ;
        /*0060*/              @!P1  BRA 0x50 ;
        /*0070*/                   EXIT ;
    """
    # the backward branch at 0x60 spans no MMA; NOPs are not counted
    assert [op.split(".")[0] for op in loop_body(sass)] == ["HGMMA", "IMAD", "BRA"]
    base = ["HGMMA", "IMAD", "FADD"]
    drop = ["HGMMA", "IMAD.WIDE.U32", "LOP3.LUT", "SHF.L.W.U32.HI", "ISETP.GE.U32.AND", "FSEL", "FFMA", "MOV"]
    cost = dropout_cost(base, drop)
    assert cost == dict(mul=1, lop3=1, rot=1, cmp=1, sel=1, fp=0, other=0)  # FFMA for FADD; MOV for IMAD
    assert sum(cost.values()) == len(drop) - len(base)


def test_vit_computed_over_useful_work(audit):
    for w in audit["work"]:
        if w["shape"].startswith("vit"):
            assert w["work_ratio"] <= THRESHOLDS["vit_work_ratio"], w


def test_packed_text_and_cross_bytes_near_the_floor(audit):
    packed = [w for w in audit["work"] if w["path"] == "packed"]
    assert {w["shape"] for w in packed} == {"text_self", "text_causal", "cross_text_x197"}
    for w in packed:
        assert w["bytes_ratio"] <= THRESHOLDS["text_bytes_ratio"], w
