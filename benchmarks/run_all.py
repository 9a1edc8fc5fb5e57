"""Driver of benchmarks/gpu_check.sh: every GPU check in one call, each stage on a time budget.

Stages, in order (a stage that fails or times out is recorded and the next one runs):
  env    card, driver, versions; a skip line for each component that cannot run here
  tests  `pytest -m gpu` (kernel parity in bf16/fp16 and the other GPU-marked tests)
  micro  the kernel microbenchmarks (benchmarks/bench_*.py, pytest-benchmark suites), as rows
  e2e    benchmarks/bench_e2e.py (pre-training step throughput, memory, MFU)
then the summary table of this run, printed last, and (when $OUT is set) rows.jsonl,
summary.txt and logs.tar.gz copied to $OUT for the device tool to bring back.

Budgets (seconds) default to fit 8 minutes on an H100; override with BLIPFAST_BUDGET_TESTS,
BLIPFAST_BUDGET_MICRO, BLIPFAST_BUDGET_E2E, BLIPFAST_BUDGET_TOTAL (the e2e stage also gets what
the earlier stages left of the total). What runs can be narrowed with BLIPFAST_GPU_TESTS
(test paths, default tests/), BLIPFAST_MICRO_BENCHES (benchmark files, default benchmarks/bench_*.py)
and BLIPFAST_E2E_CASES (MODEL:BATCH:PROVIDER,..., default bench_e2e.py's plan). --dry-run (or BLIPFAST_BENCH_DRY_RUN=1) runs it all
on the CPU at tiny sizes; rows then go to a temporary results file unless --results is given.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling scripts are not a package
    sys.path.insert(0, HERE)

import harness  # noqa: E402

REPO = harness.REPO
EXPECTED_MICRO = ("bench_attention.py", "bench_losses.py")  # written by the kernel issues
# Seconds. tests and micro are caps; e2e gets at least its own and also whatever the earlier
# stages left of TOTAL (counted from gpu_check.sh's start, set-up included): 8 minutes on an H100.
BUDGETS = {"tests": 120.0, "micro": 120.0, "e2e": 180.0, "total": 470.0}
DRY_BUDGETS = {"tests": 120.0, "micro": 120.0, "e2e": 150.0, "total": 600.0}
E2E_RESERVE_S = 45.0  # bench_e2e's grace for a running case + the summary, kept inside TOTAL
MICRO_RESERVE_S = 25.0  # kept for each microbenchmark file still to run


def run_stage(cmd: List[str], timeout: float, log_path: str, env: Optional[dict] = None,
              interrupt_grace: float = 15.0) -> Tuple[object, float]:
    """Run cmd in its own process group, tee its output to log_path; stop it on timeout.

    `interrupt_grace` seconds before the timeout the process gets SIGINT: pytest then ends its
    session as interrupted and still writes its JUnit XML and pytest-benchmark JSON for what ran.
    At the timeout the whole group gets SIGTERM, then SIGKILL. Returns (exit code or 'timeout', seconds)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        grace = min(interrupt_grace, timeout / 2)  # taken out of the timeout, not added to it
        try:
            rc: object = proc.wait(timeout=timeout - grace)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            try:
                os.kill(proc.pid, signal.SIGINT)
                proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # stragglers of this stage's own process group (e.g. compile workers) hold its output open
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        reader.join(timeout=10)
        log.write(f"\n[exit {rc} after {time.time() - t0:.1f} s]\n")
    return rc, time.time() - t0


# ---------------------------------------------------------------------------------------------
# stages


def stage_env(run_id: str) -> List[dict]:
    """Rows for the optional components: present (ok) or why they are skipped here."""
    rows = []

    def present(mod: str) -> bool:
        try:
            return importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            return False

    def version(dist: str) -> Optional[str]:
        import importlib.metadata as md

        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    checks = [
        ("deepspeed", "deepspeed", "deepspeed",
         "not installed here (the GPU image has none, and ZeRO runs need several processes); "
         "the DeepSpeed paths are tested on the CPU in CI",
         "installed, but this script runs single-GPU checks only: no ZeRO stage is timed"),
        ("dali", "nvidia.dali", "nvidia-dali-cuda130",
         "not installed here (nvidia-dali-cuda130 is a 199 MB wheel, over the device tool's 64 MiB carry "
         "limit); the DALI pipeline is tested on the CPU in CI",
         "installed, but no DALI stage is timed by this script yet"),
        ("xformers", "xformers", "xformers",
         "not installed (carry the xformers wheel in .whl/ to add the xformers-bf16 peer)", None),
        ("flash_attn", "flash_attn", "flash-attn",
         "not installed (flash-attn has no wheel on PyPI, only a long CUDA source build)", None),
    ]
    for name, mod, dist, absent, present_note in checks:
        ok = present(mod)
        status = "ok" if ok and present_note is None else "skip"
        reason = None if status == "ok" else (present_note if ok else absent)
        row = harness.make_row(run_id, "env", "optional components", name, name, "run",
                               {"version": version(dist) if ok else None}, status=status, reason=reason)
        rows.append(row)
        print(f"[env] {status.upper()} {name}" + (f" {row['config']['version']}" if ok else "")
              + (f": {reason}" if reason else ""), flush=True)
    wheels = os.environ.get("BLIPFAST_WHEELS", "").split()
    print(f"[env] carried wheels installed: {', '.join(wheels) if wheels else 'none'}", flush=True)
    return rows


def _count_from_log(log_text: str) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log_text, re.M):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(m.group(2), "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            counts["failed_tests"].append(m.group(1))
    return counts


def _count_from_junit(path: str) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname')}::{case.get('name')}"
        if "failure" in kinds:
            counts["failed"] += 1
            counts["failed_tests"].append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            counts["failed_tests"].append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def stage_tests(run_id: str, logdir: str, budget: float, py: str) -> List[dict]:
    paths = os.environ.get("BLIPFAST_GPU_TESTS", "tests").split()
    junit = os.path.join(logdir, "pytest_gpu.xml")
    # --continue-on-collection-errors: one module that cannot import here (deepspeed, DALI) must
    # not stop every other GPU test from running.
    cmd = [py, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={junit}", *paths]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=120")  # one hung test must not eat the whole stage
    log = os.path.join(logdir, "pytest_gpu.log")
    rc, secs = run_stage(cmd, budget, log)
    counts = _count_from_junit(junit) or _count_from_log(open(log, errors="replace").read())
    config = {**counts, "seconds": round(secs, 1), "paths": paths, "returncode": rc}
    if rc == "timeout":
        status, reason = "error", f"timed out after {budget:.0f} s (counts are of the tests that finished)"
    elif rc == 5:
        status, reason = "ok", "no test selected by -m gpu"
    elif rc == 0:
        status, reason = "ok", None
    else:
        status, reason = "fail", f"pytest exit {rc}: {counts['failed']} failed, {counts['errors']} errors"
    return [harness.make_row(run_id, "tests", "gpu tests", "pytest -m gpu", "pytest", "run", config,
                             status=status, reason=reason)]


def stage_micro(run_id: str, logdir: str, budget: float, py: str, dry: bool) -> List[dict]:
    rows = []
    override = os.environ.get("BLIPFAST_MICRO_BENCHES", "").split()
    files = override or sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    files = [f for f in files if os.path.basename(f) != "bench_e2e.py"]
    for name in () if override else EXPECTED_MICRO:
        if not os.path.exists(os.path.join(HERE, name)):
            stem = name[:-3]
            reason = f"benchmarks/{name} does not exist yet (written by its kernel issue)"
            print(f"[micro] SKIP {stem}: {reason}", flush=True)
            rows.append(harness.make_row(run_id, stem, stem, stem, "-", "run", {}, status="skip", reason=reason))
    if dry:
        bench = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.000001", "--benchmark-warmup=off"]
    else:
        bench = ["--benchmark-min-rounds=10", "--benchmark-max-time=0.1", "--benchmark-warmup=on",
                 "--benchmark-warmup-iterations=3"]
    deadline = time.time() + budget
    for i, path in enumerate(files):
        stem = os.path.basename(path)[:-3]
        # Each file may use what is left, less a minimum kept for each file still to come.
        share = max(deadline - time.time() - MICRO_RESERVE_S * (len(files) - i - 1), MICRO_RESERVE_S)
        out_json = os.path.join(logdir, f"{stem}.json")
        cmd = [py, "-m", "pytest", path, "-q", "-rs", "-p", "no:cacheprovider", "--benchmark-enable",
               f"--benchmark-json={out_json}", "--benchmark-save-data", "--benchmark-disable-gc",
               "--benchmark-sort=name", "--benchmark-columns=min,median,max,rounds", *bench]
        rc, secs = run_stage(cmd, share, os.path.join(logdir, f"{stem}.log"))
        got = []
        if os.path.exists(out_json):
            try:
                got = harness.rows_from_pytest_benchmark(out_json, run_id, stem)
            except (ValueError, KeyError, TypeError) as e:
                rows.append(harness.make_row(run_id, stem, stem, stem, "-", "run", {}, status="error",
                                             reason=f"could not read {os.path.basename(out_json)}: {e}"))
        rows += got
        if rc not in (0, 5):
            why = (f"timed out after {share:.0f} s" if rc == "timeout" else f"pytest exit {rc} (see {stem}.log)")
            rows.append(harness.make_row(run_id, stem, stem, stem, "pytest", "run", {"seconds": round(secs, 1)},
                                         status="error" if rc == "timeout" else "fail", reason=why))
        print(f"[micro] {stem}: exit {rc}, {len(got)} rows, {secs:.0f} s", flush=True)
    return rows


def stage_e2e(run_id: str, logdir: str, budget: float, py: str, dry: bool, results: str) -> None:
    cmd = [py, os.path.join(HERE, "bench_e2e.py"), "--run-id", run_id, "--results", results,
           "--budget-s", str(budget), "--no-summary"]
    if dry:
        cmd.append("--dry-run")
    if os.environ.get("BLIPFAST_E2E_CASES"):
        cmd += ["--cases", os.environ["BLIPFAST_E2E_CASES"]]
    rc, secs = run_stage(cmd, budget + 60, os.path.join(logdir, "e2e.log"))
    done = [r for r in harness.read_rows(results, run_id) if r["suite"] == "e2e"]
    if rc == "timeout" or not done:
        reason = f"bench_e2e.py {'timed out' if rc == 'timeout' else f'exit {rc}'} after {secs:.0f} s (see e2e.log)"
        harness.append_rows([harness.make_row(run_id, "e2e", "driver", "bench_e2e", "-", "run", {},
                                              status="error", reason=reason)], results)


def copy_out(out: str, run_rows: List[dict], logdir: str, summary: str) -> None:
    """rows.jsonl, summary.txt and logs.tar.gz into $OUT (the device tool's return folder)."""
    import json

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rows.jsonl"), "w") as f:
        for r in run_rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    with tarfile.open(os.path.join(out, "logs.tar.gz"), "w:gz") as tar:
        tar.add(logdir, arcname=os.path.basename(logdir))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", default=harness.is_dry_run())
    ap.add_argument("--results", default=None, help="JSON-lines results file to append to")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder to copy results into (default $OUT)")
    ap.add_argument("--stages", default="env,tests,micro,e2e", help="comma-separated subset to run")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if dry:
        os.environ[harness.DRY_RUN_ENV] = "1"  # the microbenchmarks and bench_e2e see it too
    py = sys.executable
    run_id = harness.new_run_id()
    results = args.results or (os.path.join(tempfile.gettempdir(), "blipfast-bench-dry-run", "results.jsonl")
                               if dry else harness.DEFAULT_RESULTS)
    logdir = os.path.join(tempfile.gettempdir(), "blipfast-bench", run_id)
    os.makedirs(logdir, exist_ok=True)
    budgets = dict(DRY_BUDGETS if dry else BUDGETS)
    for k in budgets:
        budgets[k] = float(os.environ.get(f"BLIPFAST_BUDGET_{k.upper()}", budgets[k]))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    t_start = float(os.environ.get("BLIPFAST_T0") or time.time())  # gpu_check.sh's start
    env = harness.environment()
    print(f"[gpu_check] run {run_id}{' (DRY RUN on the CPU)' if dry else ''}: {env['card']}, driver {env['driver']}, "
          f"torch {env['torch']}, triton {env['triton']}, git {env['git_rev']}; results -> {results}; "
          f"logs -> {logdir}; budgets {budgets}", flush=True)
    timings = []
    for stage in stages:
        t0 = time.time()
        print(f"\n[gpu_check] === stage {stage} ===", flush=True)
        try:
            if stage == "env":
                harness.append_rows(stage_env(run_id), results)
            elif stage == "tests":
                harness.append_rows(stage_tests(run_id, logdir, budgets["tests"], py), results)
            elif stage == "micro":
                harness.append_rows(stage_micro(run_id, logdir, budgets["micro"], py, dry), results)
            elif stage == "e2e":
                left = budgets["total"] - (time.time() - t_start) - E2E_RESERVE_S
                stage_e2e(run_id, logdir, max(budgets["e2e"], left), py, dry, results)
            else:
                print(f"[gpu_check] unknown stage {stage!r} (known: env, tests, micro, e2e)", flush=True)
                continue
        except Exception as e:  # noqa: BLE001 - the next stage runs whatever happened here
            import traceback

            traceback.print_exc()
            harness.append_rows([harness.make_row(run_id, stage, "driver", stage, "-", "run", {}, status="error",
                                                  reason=f"{type(e).__name__}: {e}"[:300])], results)
        timings.append(f"{stage} {time.time() - t0:.0f} s")
    run_rows = harness.read_rows(results, run_id)
    tail = f"\n\nstages: {' | '.join(timings)} | total {time.time() - t_start:.0f} s; rows: {results}"
    full = harness.summary_table(run_rows) + tail
    with open(os.path.join(logdir, "summary.txt"), "w") as f:
        f.write(full + "\n")
    if args.out:
        try:
            copy_out(args.out, run_rows, logdir, full)
            tail += f"; copied rows.jsonl, summary.txt, logs.tar.gz to {args.out}"
        except OSError as e:
            tail += f"; could not copy to {args.out}: {e}"
    # Printed last and kept short: the device tool returns only the last 12,000 characters.
    short = harness.summary_table(run_rows, max_kernel_lines=30, reason_chars=170) + tail
    print("\n" + "=" * 100 + "\n" + short, flush=True)
    return 1 if any(r["status"] in ("error", "fail") for r in run_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
