"""The benchmark suite's CPU mode (CI): the harness, the FLOP formulas, and gpu_check.sh --dry-run.

Speed is never asserted: these tests check that the suite runs and writes well-formed rows, and
that blipfast/flops.py counts what the model really does (against torch's FLOP counter).
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

import bench_e2e  # benchmarks/ is on pytest's pythonpath: these are its scripts' own module names
import harness
from blipfast import BlipConfig, BlipForPretraining, flops
from tests.helpers import REPO

BENCH = os.path.join(REPO, "benchmarks")


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


def test_attention_bench_dropout_rows_are_their_own_cases(tmp_path):
    """bench_attention.py's dry run (CPU, tiny; the providers that run there): the dropout rows
    (BLIP's text attention at p = 0.1) form their own groups, beside the same case without dropout,
    for the padded and the packed layouts."""
    out = tmp_path / "attn.json"
    env = dict(os.environ, BLIPFAST_BENCH_DRY_RUN="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "pytest", os.path.join(BENCH, "bench_attention.py"), "-q",
                          "-p", "no:cacheprovider", "-k", "(causal_35_padded or packed_text_causal) and fwd and not bwd",
                          "--benchmark-enable", f"--benchmark-json={out}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    rows = harness.rows_from_pytest_benchmark(str(out), "r1", "bench_attention")
    for r in rows:
        harness.validate_row(r)
    got = {(r["op"], r["provider"], r["config"]["dropout_p"]) for r in rows}
    assert got == {(op, prov, p) for op, prov in (("attention", "reference"), ("attention", "sdpa-efficient"),
                                                   ("varlen_attention", "sdpa-padded")) for p in (0.0, 0.1)}, got
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add((r["op"], r["config"]["dropout_p"]))
    assert len(groups) == 4 and all(len(g) == 1 for g in groups.values()), groups


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


def _toy_bench(tmp_path):
    toy = tmp_path / "bench_toy.py"
    toy.write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("provider", ["torch", "triton"])
        def test_toy(benchmark, provider):
            benchmark.extra_info.update(op="toy", bytes=1e3)
            benchmark(sum, range(1000 if provider == "torch" else 10))
    """))
    return toy


def test_micro_stage_narrowed_by_a_k_expression(tmp_path, monkeypatch):
    """BLIPFAST_MICRO_K reaches the micro stage's pytest as -k (e.g. "dropout" on a GPU run)."""
    import run_all

    monkeypatch.setenv("BLIPFAST_MICRO_BENCHES", str(_toy_bench(tmp_path)))
    monkeypatch.setenv("BLIPFAST_MICRO_K", "triton")
    rows = run_all.stage_micro("r1", str(tmp_path), time.time() + 120, sys.executable, dry=True)
    assert [r["provider"] for r in rows] == ["triton"], rows


def _suites(rows):
    by = {}
    for r in rows:
        by.setdefault(r["suite"], []).append(r)
    return by


@pytest.mark.slow  # 45-58 s
@pytest.mark.distributed  # the trainer stage runs 2 CPU ranks
def test_gpu_check_dry_run_every_stage_and_a_stage_killed_at_its_deadline(tmp_path):
    """gpu_check.sh --dry-run end to end, every stage (the trainer on 2 CPU ranks), with the micro
    stage made to hang: while it hangs, $OUT already holds the earlier stages' rows; it is killed
    at its own deadline with an error row, and the trainer stage after it still runs."""
    results, out = tmp_path / "results.jsonl", tmp_path / "out"
    env = dict(
        os.environ, PYTHON=sys.executable, OUT=str(out), BLIPFAST_GPU_TESTS="tests/benchmarks/test_cpu_mode.py",
        BLIPFAST_MICRO_BENCHES=str(_toy_bench(tmp_path)),
        BLIPFAST_E2E_CASES="tiny:2:original-fp32,tiny:2:reference-fp32,tiny:2:sdpa-bf16-compile,"
                           "tiny:2:blipfast,tiny:2:triton-bf16",
        # micro hangs and is killed at its 6 s cap: the trainer's huge cap leaves it no slack
        BLIPFAST_INJECT_HANG="micro", BLIPFAST_CAP_MICRO="6", BLIPFAST_CAP_TRAINER="100000",
    )
    env.pop("TRITON_INTERPRET", None)  # as on a user's machine: the dry run must not need it
    env["TMPDIR"] = str(tmp_path)  # the run's logs, the trainer's output and data
    proc = subprocess.Popen(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run", "--results", str(results)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, during = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "[inject] stage micro hangs" in line:  # the micro stage is hanging right now
                during = _suites(harness.read_rows(str(out / "rows.jsonl")))
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert "stages: env" in lines[-1], log[-3000:]
    assert during is not None, log[-3000:]
    assert {"env", "compile", "tests", "e2e"} <= set(during) and "trainer" not in during, sorted(during)

    rows = harness.read_rows(str(results))
    assert rows and len({r["run_id"] for r in rows}) == 1, log[-3000:]
    for r in rows:
        harness.validate_row(r)
        assert r["git_rev"] and r["torch"] == torch.__version__ and r["python"]
    by_suite = _suites(rows)
    assert set(by_suite) == {"env", "compile", "tests", "e2e", "bench_toy", "trainer"}, sorted(by_suite)
    # the copy in $OUT after the last stage holds every row
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "rows.jsonl", "summary.txt"]
    assert [r["timestamp"] for r in harness.read_rows(str(out / "rows.jsonl"))] == [r["timestamp"] for r in rows]

    comp = by_suite["compile"][0]
    assert comp["status"] == "ok" and comp["config"]["mode"] == "enumerate" and comp["config"]["units"] > 0
    assert by_suite["tests"][0]["status"] == "ok" and by_suite["tests"][0]["op"] == "tests/benchmarks/test_cpu_mode.py"
    (killed,) = by_suite["bench_toy"]
    assert killed["status"] == "error" and "killed at its deadline" in killed["reason"]

    e2e = {r["provider"]: r for r in by_suite["e2e"]}
    for name in ("reference-fp32", "sdpa-bf16-compile", "blipfast"):
        r = e2e[name]
        assert r["status"] == "ok", r["reason"]
        # the row's own arithmetic: exact work on (blipfast) or off (the original's math)
        want = flops.pretrain_step(_tiny(exact_work=r["config"]["exact_work"]), 2).model_flops
        assert r["throughput"] > 0 and r["flops"] == want
        assert r["phases_ms"] and all(v >= 0 for v in r["phases_ms"].values())
        assert r["config"]["setup_s"] >= 0 and r["config"]["first_steps_s"] >= 0
    assert e2e["reference-fp32"]["config"]["attention_backend"] == "reference"
    assert e2e["sdpa-bf16-compile"]["config"]["attention_backend"] == "sdpa"
    assert e2e["blipfast"]["config"]["provider_overrides"] == {}  # the config's defaults
    assert {"vit", "itm", "lm", "bwd", "opt"} <= set(e2e["blipfast"]["phases_ms"])
    assert e2e["reference-fp32"]["baseline"]
    assert e2e["original-fp32"]["status"] == "skip" and e2e["triton-bf16"]["status"] == "skip"

    (tr,) = by_suite["trainer"]
    assert tr["status"] == "ok", (tr["reason"], log[-3000:])
    c = tr["config"]
    assert c["steps_logged"] == 6 and c["loss_finite"] and c["loss_last"] < c["loss_first"]
    assert tr["throughput"] > 0 and tr["p50_ms"] > 0 and c["windows"] == 3
    assert "2 CPU ranks" in c["what"]
    assert "trainer (deepspeed train.py" in log and "SKIP e2e tiny B=2 triton-bf16" in log


@pytest.mark.slow  # waits out a ~30 s deadline by design
def test_hard_deadline_kills_a_hanging_stage_and_still_reports(tmp_path):
    """A stage whose cap is far beyond the hard deadline is killed at the deadline (less the
    summary's reserve); the earlier stage's rows and the killed stage's error row reach $OUT.
    (The deadline leaves ~30 s for start-up and the env stage: a loaded CI machine may import
    torch slowly, and a stage with under 5 s left would be skipped instead of killed.)"""
    import run_all

    results, out = tmp_path / "results.jsonl", tmp_path / "out"
    env = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path), BLIPFAST_INJECT_HANG="trainer",
               BLIPFAST_CAP_TRAINER="10000", BLIPFAST_T0="")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run_all.py"), "--dry-run", "--stages", "env,trainer",
                           "--deadline-s", str(run_all.FINAL_RESERVE_S + 32), "--results", str(results)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "[inject] stage trainer hangs" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = harness.read_rows(str(out / "rows.jsonl"))
    by = _suites(rows)
    assert len(by["env"]) == 4
    (tr,) = by["trainer"]
    assert tr["status"] == "error" and "no training step logged" in tr["reason"] and tr["config"]["returncode"] == "timeout"
    assert proc.returncode == 1


def test_stage_budgets_pass_saved_time_forward_but_never_past_the_deadline():
    import run_all

    caps = {"a": 10.0, "b": 50.0, "c": 20.0}
    assert run_all.stage_budget(caps, ["a", "b", "c"], 200.0) == 130.0  # slack: nothing after can use it
    assert run_all.stage_budget(caps, ["a", "b", "c"], 60.0) == 10.0  # its cap
    assert run_all.stage_budget(caps, ["b", "c"], 30.0) == 30.0  # the deadline wins over the cap
    assert run_all.stage_budget(caps, ["c"], -5.0) == 0.0
    assert sum(run_all.CAPS.values()) > run_all.DEADLINE_S - run_all.FINAL_RESERVE_S  # every stage has work


def test_gpu_test_files_run_losses_first_and_pick_up_new_gpu_files(tmp_path):
    import run_all

    names = ["kernels/test_attention.py", "kernels/test_varlen_attention.py", "kernels/test_itc.py",
             "kernels/test_cross_entropy.py", "test_zeta.py", "benchmarks/test_cpu_mode.py", "test_cpu_only.py",
             "ops/deeper/test_sampler.py"]  # folders, as tests/ mirrors the package
    for n in names:
        marker = "" if n == "test_cpu_only.py" else "@pytest.mark.gpu\n"
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text(f"import pytest\n{marker}def test_x():\n    pass\n")
    got = [os.path.relpath(f, tmp_path) for f in run_all.gpu_test_files([str(tmp_path)])]
    assert got == ["kernels/test_cross_entropy.py", "kernels/test_itc.py", "ops/deeper/test_sampler.py",  # losses first
                   "kernels/test_attention.py", "kernels/test_varlen_attention.py",  # attention (incl. variable length)
                   "benchmarks/test_cpu_mode.py", "test_zeta.py"]  # the rest; no file without GPU tests


def test_trainer_log_lines_are_parsed():
    import run_all

    text = ("noise\nstep 20  loss 9.5  loss_itc 3.1  lr 1e-06  images_per_s 512.5  tokens_per_s 9e+03  "
            "data_wait_frac 0.01  step_time_s 0.125  mfu 0.41\n[INFO] step 3 of nothing\n"
            "step 40  loss 8.25  images_per_s 600  step_time_s 0.1067\n")
    got = run_all.parse_trainer_log(text)
    assert [g["step"] for g in got] == [20, 40]
    assert got[0]["images_per_s"] == 512.5 and got[0]["mfu"] == 0.41 and got[1]["loss"] == 8.25


def test_warmup_plan_covers_the_run_and_dedups():
    """The compile stage's plan (CPU: enumeration only) covers the e2e model, the GPU tests and the
    microbenchmarks, each compile unit once, every tiling the autotuner may try."""
    import warmup
    from blipfast.kernels import flash_attention as fa

    jobs = warmup.build_plan(dry=False)
    units = [u for j in jobs for u in j.units]
    assert len(units) == len(set(units))
    attn = [j for j in jobs if j.family == "attention"]
    # BLIP base 224 (the e2e headline): ViT 197 tokens on a fused qkv, text with dropout, causal decoder
    base = {(j.workload.Lq, j.workload.Lk, j.workload.causal, j.workload.dropout, j.workload.layout)
            for j in attn if "e2e" in j.sources}
    assert {(30, 30, False, True, "heads_view"), (30, 30, True, True, "heads_view"),
            (30, 197, False, True, "heads_view")} <= base
    # exact work: the e2e model's text runs packed (varlen_attention), each variant with its fused backward
    packed = {(j.workload.Lk, j.workload.causal, j.workload.dropout): {json.loads(u)["kernel"] for u in j.units}
              for j in attn if j.workload.layout == "packed" and "e2e" in j.sources}
    assert set(packed) == {(30, False, True), (30, True, True), (197, False, True)}, packed
    assert packed[(30, False, True)] == {"fwd", "dq", "dkdv", "dkdv_fused"}
    # the cross-attention adds only its fused unit: 197 keys per caption are chunked, so the fused
    # kernel's key-tile group is a runtime value, not the constant 1 (the other units are the text's)
    assert packed[(197, False, True)] == {"dkdv_fused"}
    # the microbenchmarks' text, decoder and cross cases also run with dropout (bench_attention.DROPOUT_CASES):
    # their compile units are in the plan (at 35 tokens they are the e2e text's units, planned once)
    micro_drop = [w for w in warmup.micro_workloads(dry=False)[0] if w.dropout]
    assert {(w.Lq, w.Lk, w.causal, w.layout) for w in micro_drop} == {
        (35, 35, False, "heads_view"), (35, 35, True, "heads_view"), (35, 197, False, "heads_view"),
        (30, 30, False, "packed"), (30, 30, True, "packed"), (30, 197, False, "packed")}
    assert {u for w in micro_drop for us in warmup.attention_units(w) for u in us} <= set(units)
    vit = [j for j in attn if (j.workload.Lq, j.workload.layout, j.workload.dtype) == (197, "fused_qkv", "bf16")
           and not j.workload.mask]
    assert {"e2e", "tests", "micro"} <= {s for j in vit for s in j.sources}
    # every pruned config of each kernel is compiled for the ViT workload
    ws = vit[0].workload
    q, k, v, mask, _ = warmup.make_qkv(ws, 2, "meta")
    args = fa._dense_args(q, k, mask, False, 0.0, 1)
    for kind in fa._KERNELS:
        want = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in fa.prune(fa.gpu_configs(kind), dict(args))}
        have = {(u["BLOCK_M"], u["BLOCK_N"], u["num_warps"], u["num_stages"])
                for j in vit for u in map(json.loads, j.units) if u["kernel"] == kind}
        assert want == have, kind
    assert {"itc", "ce"} <= {j.family for j in jobs}
    assert any(j.workload.dtype == "fp16" for j in attn) and any(j.workload.dtype == "fp32" for j in attn)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf arithmetic in the interpreter
def test_warmup_jobs_launch_through_the_real_launchers(monkeypatch):
    """Each job family's launch code, run under the interpreter on tiny shapes (the conftest sets
    TRITON_INTERPRET=1): the arguments the compile stage passes are the launchers' real ones. A
    16-bit job's first config also compiles the fused backward (the measured default may pick it)."""
    import warmup
    from blipfast.kernels import flash_attention as fa

    kinds = []
    real_launch = fa._launch
    monkeypatch.setattr(fa, "_launch", lambda kind, *a, **k: (kinds.append(kind), real_launch(kind, *a, **k))[1])
    monkeypatch.setattr(fa, "_measured_fused_choice", lambda *a, **k: pytest.fail("the warmup timed a backward"))
    jobs = [warmup.Job("attention", warmup.Attn(2, 35, 35, 32, True, True, True, "heads_view", "fp16"), 0),
            warmup.Job("attention", warmup.Attn(2, 35, 35, 32, True, True, True, "heads_view", "fp16"), 1),
            warmup.Job("attention", warmup.Attn(2, 20, 20, 16, False, False, False, "fused_qkv", "fp32"), 0),
            # packed text (exact work): cross-attention with dropout, and a causal fp32 one
            warmup.Job("attention", warmup.Attn(2, 20, 45, 16, False, False, True, "packed", "fp16"), 0),
            warmup.Job("attention", warmup.Attn(2, 20, 20, 16, True, False, False, "packed", "fp32"), 0),
            warmup.Job("itc", warmup.Itc(4, 64, 32, "fp32")),
            warmup.Job("ce", warmup.Ce(6, 128, 32, "fp32"))]
    for job in jobs:
        name, ok, _, err = warmup.run_job(job, dev="cpu")
        assert ok, f"{name}: {err}"
    # the dense job 0 and the 16-bit packed job; every job's two-kernel backward
    assert kinds.count("dkdv_fused") == 2 and kinds.count("dkdv") >= 5 and kinds.count("fwd") >= 5
    assert warmup.attention_configs(jobs[0].workload, 1)["fwd"] != warmup.attention_configs(jobs[0].workload, 0)["fwd"]


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


def test_e2e_rows_name_the_measured_backward_schedules(monkeypatch):
    """What the measured default picked (`flash_attention._FUSED_CHOICE`) goes into each e2e row's
    config, keyed readably, so the first GPU run reports it per BLIP shape."""
    import bench_e2e
    from blipfast.kernels import flash_attention as fa

    q = torch.zeros(2, 12, 35, 64)
    args = fa._common(q, 35, 35, 2, 12, True, 0.1, 0, False, True)
    monkeypatch.setattr(fa, "_FUSED_CHOICE", {fa._choice_key(args, torch.bfloat16, True): True,
                                              fa._choice_key(dict(args, IS_CAUSAL=False), torch.bfloat16, True): False})
    got = bench_e2e.attention_bwd_schedules()
    assert sorted(got.values()) == ["dq+dkdv", "fused"]
    causal_key = next(k for k, v in got.items() if v == "fused")
    assert "IS_CAUSAL=True" in causal_key and "varlen=True" in causal_key and "dtype=torch.bfloat16" in causal_key
    assert "LQ_BUCKET=64" in causal_key and "DEVICE_KEY" not in causal_key
