"""The benchmark suite's CPU mode (CI): the harness, the FLOP formulas, and gpu_check.sh --dry-run.

Speed is never asserted: these tests check that the suite runs and writes well-formed rows, and
that benchmarks/flops.py counts what the model really does (against torch's FLOP counter).
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

import bench_e2e  # noqa: E402
import flops  # noqa: E402
import harness  # noqa: E402

from blipfast import BlipConfig, BlipForPretraining  # noqa: E402


def _tiny(**overrides):
    over = {"attention_backend": "reference", "loss_backend": "reference", **overrides}
    return BlipConfig.from_yaml(os.path.join(REPO, "configs", "blip_tiny.yaml"), over)


# ---------------------------------------------------------------------------------------------
# FLOP formulas against a brute-force count


@pytest.mark.parametrize("checkpointing,exact_work", [(False, False), (True, False), (False, True), (True, True)])
def test_flop_formulas_match_torch_flop_counter(checkpointing, exact_work):
    cfg = _tiny(max_text_len=8, exact_work=exact_work,
                **{"vision.grad_checkpointing": checkpointing, "vision.ckpt_layer": 2})
    torch.manual_seed(0)
    model = BlipForPretraining(cfg).train()
    B, L = 2, 8
    images, ids, mask = bench_e2e.make_batch(cfg, B, "cpu")  # padded captions of L tokens
    with FlopCounterMode(display=False) as fwd_counter:
        out = model(images, ids, mask, alpha=0.4)
    with FlopCounterMode(display=False) as bwd_counter:
        out.loss.backward()
    # exact work counts from the real lengths and the sampled negative texts
    expected = flops.pretrain_step(cfg, B, L, lengths=mask.sum(1).tolist(), neg_text=out.negatives[1].tolist())

    assert fwd_counter.get_total_flops() == expected.forward_total
    assert bwd_counter.get_total_flops() == expected.backward_total + expected.recompute_total
    assert (expected.recompute_total > 0) == checkpointing
    # The phase split, where the counter can attribute forward FLOPs to modules.
    per_module = {k: sum(v.values()) for k, v in fwd_counter.get_flop_counts().items()}
    assert per_module["BlipForPretraining.visual_encoder"] == expected.forward["vit"]
    if not exact_work:  # (with exact work the shared K/V and the momentum parts are not per module)
        assert per_module["BlipForPretraining.visual_encoder_m"] == expected.forward["vit"]
        assert per_module["BlipForPretraining.text_encoder_m"] == expected.forward["text_encoder"]
        itm_head = flops.linear(3 * B, cfg.text.hidden_size, 2)
        assert per_module["BlipForPretraining.text_encoder"] == (
            expected.forward["text_encoder"] + expected.forward["itm"] - itm_head
        )
    else:
        assert expected.model_flops < flops.pretrain_step(cfg, B, L, exact_work=False).model_flops


def test_peak_table_matches_card_names(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert flops.peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert flops.card_family("NVIDIA A100-SXM4-80GB") == "A100"
    assert flops.card_family("NVIDIA A10") == "A10"  # not A100
    assert flops.card_family("NVIDIA L40S") == "L40S"  # not L4
    assert flops.card_family("NVIDIA L4") == "L4"
    assert flops.peak_tflops("cpu: AMD EPYC", "bf16") is None
    assert flops.mfu(989.4e12, 2.0, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(0.5)
    monkeypatch.setenv(flops.PEAK_ENV, "100")
    assert flops.peak_tflops("anything", "fp32") == 100.0
    with pytest.raises(ValueError, match="precision"):
        flops.peak_tflops("NVIDIA H100", "int8")


# ---------------------------------------------------------------------------------------------
# harness


def test_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        xs = rng.exponential(size=n).tolist()
        assert harness.quantiles(xs) == pytest.approx(np.percentile(xs, [20, 50, 80]).tolist())
    with pytest.raises(ValueError):
        harness.quantiles([])


def test_time_iterations_measures_the_call():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    times = harness.time_iterations(fn, "cpu", warmup=2, iters=4)
    assert len(calls) == 6 and len(times) == 4 and min(times) >= 2.0
    times = harness.time_iterations(fn, "cpu", warmup=0, iters=50, max_seconds=0.0, min_iters=3)
    assert len(times) == 3  # stops at min_iters once the time budget is spent


def test_rows_ratios_and_validation():
    run = harness.new_run_id()
    base = harness.make_row(run, "e2e", "g", "step", "reference-fp32", "step", {"tier": "reference"},
                            times_ms=[40.0, 40.0, 40.0], baseline=True, flops=4e12)
    sw = harness.make_row(run, "e2e", "g", "step", "sdpa-bf16", "step", {"tier": "switches"}, times_ms=[20.0] * 3)
    fused = harness.make_row(run, "e2e", "g", "step", "triton-bf16", "step", {"tier": "fused"},
                             times_ms=[9.0, 10.0, 11.0])
    skip = harness.make_row(run, "e2e", "g", "step", "original-fp32", "step", {}, status="skip", reason="absent")
    for r in (base, sw, fused, skip):
        harness.validate_row(r)
    assert base["tflops"] == pytest.approx(100.0)  # 4e12 FLOP in 40 ms
    assert (fused["p20_ms"], fused["p50_ms"], fused["p80_ms"]) == pytest.approx((9.4, 10.0, 10.6))
    rows = [dict(r) for r in (base, sw, fused, skip)]
    harness.add_ratios(rows)
    assert rows[2]["speedup"] == pytest.approx(4.0) and rows[2]["vs_switches"] == pytest.approx(2.0)
    table = harness.summary_table(rows)
    assert "triton-bf16" in table and "SKIP e2e g original-fp32: absent" in table

    bad = dict(fused, p20_ms=12.0)
    with pytest.raises(ValueError, match="ordered"):
        harness.validate_row(bad)
    with pytest.raises(ValueError, match="reason"):
        harness.validate_row(dict(skip, reason=None))
    with pytest.raises(ValueError, match="misses"):
        harness.validate_row({k: v for k, v in fused.items() if k != "git_rev"})
    with pytest.raises(ValueError, match="unknown row field"):
        harness.make_row(run, "e2e", "g", "step", "x", "step", {}, speed=1)


def test_pytest_benchmark_json_becomes_rows(tmp_path):
    bench = tmp_path / "bench_toy.py"
    bench.write_text(textwrap.dedent("""
        import pytest, time

        @pytest.mark.parametrize("provider", ["reference", "fast"])
        @pytest.mark.parametrize("n", [8])
        def test_toy(benchmark, provider, n):
            benchmark.extra_info.update(op="toy", mode="fwd", flops=2e6, bytes=1e6)
            benchmark(time.sleep, 0.002 if provider == "reference" else 0.001)
    """))
    out = tmp_path / "toy.json"
    subprocess.run([sys.executable, "-m", "pytest", str(bench), "-q", "-p", "no:cacheprovider", "--benchmark-enable",
                    f"--benchmark-json={out}", "--benchmark-save-data", "--benchmark-min-rounds=3",
                    "--benchmark-max-time=0.000001", "--benchmark-warmup=off"], check=True, cwd=tmp_path,
                   capture_output=True)
    rows = harness.rows_from_pytest_benchmark(str(out), "r1", "bench_toy")
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"reference", "fast"}
    for r in rows:
        harness.validate_row(r)
        assert r["op"] == "toy" and r["mode"] == "fwd" and r["config"]["n"] == 8
        assert r["tflops"] == pytest.approx(2e6 / (r["p50_ms"] * 1e-3) / 1e12)
    assert by["reference"]["baseline"] and not by["fast"]["baseline"]
    assert by["reference"]["group"] == by["fast"]["group"]
    raw = json.loads(out.read_text())["benchmarks"]
    data = next(b for b in raw if b["params"]["provider"] == "fast")["stats"]["data"]
    assert by["fast"]["p50_ms"] == pytest.approx(np.median(data) * 1e3)
    assert by["fast"]["p50_ms"] >= 1.0 and by["reference"]["p50_ms"] >= 2.0


def test_e2e_parent_survives_a_dying_worker(tmp_path, monkeypatch):
    """A case that kills its worker (as a CUDA fault would) gets an error row; the rest still run."""
    stub = tmp_path / "stub_worker.py"
    stub.write_text(textwrap.dedent("""
        import json, os, signal, sys
        args = sys.argv[1:]
        cases = args[args.index("--cases") + 1].split(",")
        results, run_id = args[args.index("--results") + 1], args[args.index("--run-id") + 1]
        for case in cases:
            if "sdpa" in case:
                os.kill(os.getpid(), signal.SIGKILL)  # dies without writing a row
            with open(results, "a") as f:
                f.write(json.dumps({"run_id": run_id, "suite": "e2e", "config": {"case": case}}) + "\\n")
    """))
    monkeypatch.setattr(bench_e2e, "__file__", str(stub))
    results = tmp_path / "r.jsonl"
    opts = bench_e2e.build_parser().parse_args(["--dry-run", "--results", str(results), "--budget-s", "60"])
    bench_e2e.resolve_options(opts)
    cases = [("tiny", 2, "reference-fp32"), ("tiny", 2, "sdpa-bf16"), ("tiny", 2, "xformers-bf16")]
    assert bench_e2e.run_plan(opts, cases) == 0
    rows = {r["config"]["case"]: r for r in harness.read_rows(str(results), opts.run_id)}
    assert list(rows) == ["tiny:2:reference-fp32", "tiny:2:sdpa-bf16", "tiny:2:xformers-bf16"]
    assert rows["tiny:2:sdpa-bf16"]["status"] == "error" and "died" in rows["tiny:2:sdpa-bf16"]["reason"]
    harness.validate_row(rows["tiny:2:sdpa-bf16"])


# ---------------------------------------------------------------------------------------------
# the one-call script, dry-run


def test_gpu_check_dry_run(tmp_path):
    """gpu_check.sh --dry-run end to end: every stage, rows on disk, the table printed last, $OUT."""
    toy = tmp_path / "bench_toy.py"
    toy.write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("provider", ["torch", "triton"])
        def test_toy(benchmark, provider):
            benchmark.extra_info.update(op="toy", bytes=1e3)
            benchmark(sum, range(1000 if provider == "torch" else 10))
    """))
    results, out = tmp_path / "results.jsonl", tmp_path / "out"
    env = dict(
        os.environ, PYTHON=sys.executable, OUT=str(out), BLIPFAST_GPU_TESTS="tests/test_benchmarks_cpu.py",
        BLIPFAST_MICRO_BENCHES=str(toy),
        BLIPFAST_E2E_CASES="tiny:2:original-fp32,tiny:2:reference-fp32,tiny:2:sdpa-bf16,"
                           "tiny:2:sdpa-bf16-compile,tiny:2:triton-bf16",
    )
    env.pop("TRITON_INTERPRET", None)  # as on a user's machine: the dry run must not need it
    env["TMPDIR"] = str(tmp_path)  # the run's logs
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run", "--results", str(results)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert "stages: env" in log.splitlines()[-1], log[-3000:]

    rows = harness.read_rows(str(results))
    assert rows and len({r["run_id"] for r in rows}) == 1, log[-3000:]
    for r in rows:
        harness.validate_row(r)
        assert r["git_rev"] and r["torch"] == torch.__version__ and r["python"]
    by_suite = {}
    for r in rows:
        by_suite.setdefault(r["suite"], []).append(r)
    assert {"env", "tests", "bench_toy", "e2e"} <= set(by_suite), sorted(by_suite)
    assert by_suite["tests"][0]["status"] == "ok"  # the gpu-marked tests are skipped on the CPU
    toy_rows = {r["provider"]: r for r in by_suite["bench_toy"]}
    assert toy_rows["torch"]["baseline"] and toy_rows["triton"]["gbps"] > 0
    e2e = {r["provider"]: r for r in by_suite["e2e"]}
    for name in ("reference-fp32", "sdpa-bf16", "sdpa-bf16-compile"):
        r = e2e[name]
        assert r["status"] == "ok", r["reason"]
        assert r["throughput"] > 0 and r["flops"] == flops.pretrain_step(_tiny(), 2).model_flops
        assert r["config"]["attention_backend"] == ("reference" if name == "reference-fp32" else "sdpa")
        assert r["phases_ms"] and all(v >= 0 for v in r["phases_ms"].values())
    assert {"vit", "itm", "lm", "bwd", "opt"} <= set(e2e["sdpa-bf16"]["phases_ms"])
    assert e2e["reference-fp32"]["baseline"]
    assert e2e["original-fp32"]["status"] == "skip" and e2e["triton-bf16"]["status"] == "skip"
    assert "SKIP e2e tiny B=2 triton-bf16" in log
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "rows.jsonl", "summary.txt"]


# ---------------------------------------------------------------------------------------------
# on a GPU (run by gpu_check.sh): the CUDA-event timing and memory path of a real step


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["sdpa-bf16", "triton-bf16"])
def test_e2e_case_on_gpu(provider, tmp_path):
    # Head dim 32 (96 / 3): the Triton kernels serve head dims 16, 32, 64 and 128.
    opts = bench_e2e.build_parser().parse_args(["--cases", f"tiny:4:{provider}", "--results", str(tmp_path / "r.jsonl"),
                                                "--set", "vision.num_heads=3", "--set", "text.num_attention_heads=3"])
    bench_e2e.resolve_options(opts)
    row = bench_e2e.run_case("tiny", 4, bench_e2e.PROVIDERS[provider], opts)
    harness.validate_row(row)
    assert row["status"] == "ok", row["reason"]
    assert row["device"] == "cuda" and row["peak_mem_mb"] > 0 and row["driver"]
    assert row["config"]["attention_backend"] == provider.split("-")[0]
