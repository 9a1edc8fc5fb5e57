"""Driver of benchmarks/gpu_check.sh: every GPU check in one call, stages in order of value under
ONE hard deadline, rows copied to $OUT after every stage.

Stages (default order; `--stages` picks a subset, in this order):
  env      card, driver, versions; a line for each optional component (carried wheels included)
  compile  benchmarks/warmup.py: every Triton kernel variant and tiling the run will use,
           compiled up front in a process pool (one worker per core), into Triton's disk cache
  tests    (a) kernel parity on the GPU: `pytest -m gpu`, one process per test file that has
           GPU-marked tests, losses first (cross-entropy, ITC + sampler), then attention
           (dropout, variable length), then the rest; new files are picked up by their marker
  e2e      (b) bench_e2e.py: the pre-training step at BLIP base 224 (reference-fp32, switches-only,
           blipfast's default, ...): images/s, ms/step by phase, peak memory, MFU
  micro    (c) kernel microbenchmarks vs SDPA / flash-attn / xformers (bench_losses.py first)
  trainer  (d) `deepspeed --num_gpus 1 train.py` at BLIP base 224, bf16, ZeRO-2, synthetic data,
           torch decoding: images/s and MFU from the trainer's own log, loss finite and falling
then the summary table, printed last.

Time: the deadline (`--deadline-s`, BLIPFAST_DEADLINE_S; counted from gpu_check.sh's start,
BLIPFAST_T0, so the wheel install counts) is hard. Each stage runs as subprocesses and gets its
cap, or more when the later stages' caps leave time over (what an earlier stage saved goes to the
next most valuable stage), never more than what is left of the deadline less a reserve for the
summary (`stage_budget`); at its own deadline a
stage's processes get SIGINT (pytest then writes what finished), then SIGKILL. After every stage
rows.jsonl, summary.txt and logs.tar.gz are rewritten in $OUT (atomically), so a call killed from
outside still returns every finished stage. Caps: BLIPFAST_CAP_<STAGE> seconds.

Narrowing: BLIPFAST_GPU_TESTS (test files or folders, default tests/), BLIPFAST_GPU_TESTS_K (a
pytest -k expression), BLIPFAST_MICRO_BENCHES (files), BLIPFAST_MICRO_K (a pytest -k expression for
them), BLIPFAST_E2E_CASES (MODEL:BATCH:PROVIDER,...),
BLIPFAST_TRAINER_ARGS (extra key=value overrides for train.py). --dry-run (BLIPFAST_BENCH_DRY_RUN=1)
runs everything on the CPU at tiny sizes (the trainer on 2 CPU ranks). BLIPFAST_INJECT_HANG=STAGE
makes that stage's first process hang (tests of the deadline machinery).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling scripts are not a package
    sys.path.insert(0, HERE)

import harness  # noqa: E402

REPO = harness.REPO
STAGES = ("env", "compile", "tests", "e2e", "micro", "trainer")
EXPECTED_MICRO = ("bench_attention.py", "bench_losses.py")  # written by the kernel issues
MICRO_ORDER = ("bench_losses.py", "bench_attention.py")  # the rest follow, alphabetically
# Seconds per stage at most (each also stops at the hard deadline). On the GPU: 450 s in all
# (gpu_check.sh's start to the summary), inside a device call of 480 s.
CAPS = {"env": 20.0, "compile": 60.0, "tests": 90.0, "e2e": 150.0, "micro": 60.0, "trainer": 100.0}
DRY_CAPS = {"env": 20.0, "compile": 60.0, "tests": 150.0, "e2e": 200.0, "micro": 150.0, "trainer": 240.0}
DEADLINE_S = 450.0
DRY_DEADLINE_S = 900.0
FINAL_RESERVE_S = 8.0  # kept after the last stage: summary table and the last copy to $OUT
MIN_STAGE_S = 5.0  # a stage with less than this left is skipped
FILE_RESERVE_S = 8.0  # tests/micro: kept for each file still to run
INJECT_ENV = "BLIPFAST_INJECT_HANG"
TRAINER_CONFIG = os.path.join(HERE, "train_gpu_check.yaml")
LOSS_WORDS = ("cross_entropy", "itc", "loss", "sampl")  # tests run first: never cut off
ATTENTION_WORDS = ("attention", "varlen", "flash")


def stage_budget(caps: Dict[str, float], todo: List[str], left: float) -> float:
    """Seconds for todo[0]: its cap, or more when the stages after it cannot use the rest (their
    caps summed): time an earlier stage saved goes to the most valuable stage still to run; never
    more than is left of the hard deadline."""
    later = sum(caps[s] for s in todo[1:])
    return max(min(max(caps[todo[0]], left - later), left), 0.0)


def run_stage(stage: str, cmd: List[str], deadline: float, log_path: str, env: Optional[dict] = None,
              interrupt_grace: float = 10.0) -> Tuple[object, float]:
    """Run cmd in its own process group until `deadline` (epoch seconds), tee its output to log_path.

    `interrupt_grace` seconds before the deadline the process gets SIGINT (pytest then ends its
    session as interrupted and still writes its JUnit XML and pytest-benchmark JSON); at the
    deadline the whole group gets SIGTERM, then SIGKILL. Returns (exit code or 'timeout', seconds)."""
    t0 = time.time()
    if stage in os.environ.get(INJECT_ENV, "").split(","):
        os.environ[INJECT_ENV] = ",".join(s for s in os.environ[INJECT_ENV].split(",") if s != stage)
        cmd = [sys.executable, "-c", f"import time; print('[inject] stage {stage} hangs', flush=True); "
                                     "time.sleep(3600)"]
    timeout = max(deadline - t0, 0.1)
    with open(log_path, "a") as log:
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
        grace = min(interrupt_grace, timeout / 4)  # taken out of the timeout, not added to it
        try:
            rc: object = proc.wait(timeout=timeout - grace)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # stragglers of this stage's own process group (compile workers, ranks) hold its output open
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        reader.join(timeout=5)
        log.write(f"\n[exit {rc} after {time.time() - t0:.1f} s]\n")
    return rc, time.time() - t0


def _row(run_id: str, suite: str, group: str, op: str, provider: str, config: dict, status="ok", reason=None,
         **fields) -> dict:
    return harness.make_row(run_id, suite, group, op, provider, "run", config, status=status, reason=reason,
                            **fields)


def _killed(rc) -> bool:
    return rc == "timeout"


# ---------------------------------------------------------------------------------------------
# env


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
         "not installed (carry it: bash scripts/build_gpu_wheels.sh, then carry ['.whl']); "
         "the trainer stage needs it", None),
        ("dali", "nvidia.dali", "nvidia-dali-cuda130",
         "not installed here (nvidia-dali-cuda130 is a 199 MB wheel, over the device tool's 64 MiB carry "
         "limit); the trainer stage decodes with data.backend=torch, the DALI pipeline is tested on the CPU",
         "installed, but the trainer stage decodes with data.backend=torch"),
        ("xformers", "xformers", "xformers",
         "not installed (bash scripts/build_gpu_wheels.sh carries it: the xformers-bf16 peer)", None),
        ("flash_attn", "flash_attn", "flash-attn",
         "not installed (flash-attn has no wheel on PyPI, only a long CUDA source build)", None),
    ]
    for name, mod, dist, absent, present_note in checks:
        ok = present(mod)
        status = "ok" if ok and present_note is None else "skip"
        reason = None if status == "ok" else (present_note if ok else absent)
        row = _row(run_id, "env", "optional components", name, name, {"version": version(dist) if ok else None},
                   status=status, reason=reason)
        rows.append(row)
        print(f"[env] {status.upper()} {name}" + (f" {row['config']['version']}" if ok else "")
              + (f": {reason}" if reason else ""), flush=True)
    wheels = os.environ.get("BLIPFAST_WHEELS", "").split()
    print(f"[env] carried wheels installed: {', '.join(wheels) if wheels else 'none'}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# compile


def stage_compile(run_id: str, logdir: str, deadline: float, py: str, dry: bool, results: str) -> List[dict]:
    budget = max(deadline - time.time() - 5.0, 1.0)  # the pool stops submitting; run_stage kills at the deadline
    cmd = [py, os.path.join(HERE, "warmup.py"), "--budget-s", f"{budget:.0f}", "--results", results,
           "--run-id", run_id, "--plan-out", os.path.join(logdir, "warmup_plan.json")]
    if dry:
        cmd.append("--dry-run")
    rc, secs = run_stage("compile", cmd, deadline, os.path.join(logdir, "compile.log"))
    rows = [r for r in harness.read_rows(results, run_id) if r["suite"] == "compile"]
    if rc == 0 and rows and rows[-1]["status"] == "ok" and not dry:
        os.environ["BLIPFAST_KERNELS_WARMED"] = "1"  # bench_e2e's time estimate sees it
    if rows:
        return []  # warmup.py wrote its own row
    why = "killed at the stage deadline" if _killed(rc) else f"warmup.py exit {rc}"
    return [_row(run_id, "compile", "kernel warmup", "triton kernels", "warmup", {"seconds": round(secs, 1)},
                 status="error", reason=f"{why} after {secs:.0f} s (see compile.log); kernels compile on first use")]


# ---------------------------------------------------------------------------------------------
# tests


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


GPU_MARK = re.compile(r"\bmark\.gpu\b")


def test_priority(path: str) -> Tuple[int, str]:
    """Losses first (never cut off), then attention, then the rest; alphabetical inside."""
    name = os.path.basename(path)
    if any(w in name for w in LOSS_WORDS):
        return 0, name
    if any(w in name for w in ATTENTION_WORDS):
        return 1, name
    return 2, name


def gpu_test_files(paths: List[str]) -> List[str]:
    """Test files with GPU-marked tests under `paths` (folders searched recursively: tests/ mirrors the
    package; files are taken as given), in priority order."""
    files = []
    for p in paths:
        p = p if os.path.isabs(p) else os.path.join(REPO, p)
        if os.path.isdir(p):
            for f in sorted(glob.glob(os.path.join(p, "**", "test_*.py"), recursive=True)):
                try:
                    if GPU_MARK.search(open(f, errors="replace").read()):
                        files.append(f)
                except OSError:
                    pass
        elif os.path.exists(p):
            files.append(p)
    return sorted(dict.fromkeys(files), key=test_priority)


def stage_tests(run_id: str, logdir: str, deadline: float, py: str) -> List[dict]:
    files = gpu_test_files(os.environ.get("BLIPFAST_GPU_TESTS", "tests").split())
    kexpr = os.environ.get("BLIPFAST_GPU_TESTS_K")
    print(f"[tests] {len(files)} files with GPU tests, in this order: "
          f"{', '.join(os.path.relpath(f, REPO) for f in files)}", flush=True)
    rows = []
    for i, path in enumerate(files):
        rel = os.path.relpath(path, REPO)
        stem = rel[:-3].replace(os.sep, "_")  # test file names repeat across tests/ folders
        left = deadline - time.time()
        file_deadline = time.time() + max(left - FILE_RESERVE_S * (len(files) - i - 1), min(left, FILE_RESERVE_S))
        if left < MIN_STAGE_S:
            rows.append(_row(run_id, "tests", "gpu tests", rel, "pytest", {"file": rel}, status="skip",
                             reason="the tests stage's time ran out before this file"))
            continue
        junit = os.path.join(logdir, f"pytest_{stem}.xml")
        # --continue-on-collection-errors: a module that cannot import here must not stop the others
        cmd = [py, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}", rel, *(["-k", kexpr] if kexpr else [])]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.append("--timeout=90")  # one hung test must not eat the whole stage
        log = os.path.join(logdir, f"pytest_{stem}.log")
        rc, secs = run_stage("tests", cmd, file_deadline, log)
        counts = _count_from_junit(junit) or _count_from_log(open(log, errors="replace").read())
        config = {**counts, "seconds": round(secs, 1), "file": rel, "returncode": rc}
        if _killed(rc):
            status, reason = "error", (f"killed at its deadline after {secs:.0f} s "
                                       f"({counts['passed']} passed, {counts['failed']} failed before that)")
        elif rc == 5:
            status, reason = "ok", None  # nothing selected by -m gpu (or -k)
        elif rc == 0:
            status, reason = "ok", None
        else:
            status, reason = "fail", f"pytest exit {rc}: {counts['failed']} failed, {counts['errors']} errors"
        print(f"[tests] {rel}: {status} ({counts['passed']} passed, {counts['failed']} failed, "
              f"{counts['skipped']} skipped, {secs:.0f} s)", flush=True)
        rows.append(_row(run_id, "tests", "gpu tests", rel, "pytest", config, status=status, reason=reason))
    if not files:
        rows.append(_row(run_id, "tests", "gpu tests", "pytest -m gpu", "pytest", {}, status="skip",
                         reason="no test file with GPU-marked tests"))
    return rows


# ---------------------------------------------------------------------------------------------
# e2e


def stage_e2e(run_id: str, logdir: str, deadline: float, py: str, dry: bool, results: str) -> List[dict]:
    grace = 20.0
    budget = max(deadline - time.time() - grace - 3.0, 1.0)
    cmd = [py, os.path.join(HERE, "bench_e2e.py"), "--run-id", run_id, "--results", results,
           "--budget-s", f"{budget:.0f}", "--grace-s", f"{grace:.0f}", "--no-summary"]
    if dry:
        cmd.append("--dry-run")
    if os.environ.get("BLIPFAST_E2E_CASES"):
        cmd += ["--cases", os.environ["BLIPFAST_E2E_CASES"]]
    rc, secs = run_stage("e2e", cmd, deadline, os.path.join(logdir, "e2e.log"))
    done = [r for r in harness.read_rows(results, run_id) if r["suite"] == "e2e"]
    if _killed(rc) or not done:
        why = "killed at the stage deadline" if _killed(rc) else f"exit {rc}"
        return [_row(run_id, "e2e", "driver", "bench_e2e", "-", {"seconds": round(secs, 1), "cases_done": len(done)},
                     status="error", reason=f"bench_e2e.py {why} after {secs:.0f} s (see e2e.log)")]
    return []  # bench_e2e.py appended a row per case


# ---------------------------------------------------------------------------------------------
# micro


def stage_micro(run_id: str, logdir: str, deadline: float, py: str, dry: bool) -> List[dict]:
    rows = []
    override = os.environ.get("BLIPFAST_MICRO_BENCHES", "").split()
    kexpr = os.environ.get("BLIPFAST_MICRO_K")  # e.g. "dropout": only BLIP's text attention with dropout
    files = override or glob.glob(os.path.join(HERE, "bench_*.py"))
    files = [f for f in files if os.path.basename(f) != "bench_e2e.py"]
    rank = {name: i for i, name in enumerate(MICRO_ORDER)}
    files.sort(key=lambda f: (rank.get(os.path.basename(f), len(rank)), os.path.basename(f)))
    for name in () if override else EXPECTED_MICRO:
        if not os.path.exists(os.path.join(HERE, name)):
            stem = name[:-3]
            reason = f"benchmarks/{name} does not exist yet (written by its kernel issue)"
            rows.append(_row(run_id, stem, stem, stem, "-", {}, status="skip", reason=reason))
    if dry:
        bench = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.000001", "--benchmark-warmup=off"]
    else:
        bench = ["--benchmark-min-rounds=10", "--benchmark-max-time=0.1", "--benchmark-warmup=on",
                 "--benchmark-warmup-iterations=3"]
    for i, path in enumerate(files):
        stem = os.path.basename(path)[:-3]
        left = deadline - time.time()
        if left < MIN_STAGE_S:
            rows.append(_row(run_id, stem, stem, stem, "pytest", {}, status="skip",
                             reason="the micro stage's time ran out before this file"))
            continue
        # Each file may use what is left, less a minimum kept for each file still to come.
        file_deadline = time.time() + max(left - FILE_RESERVE_S * 2 * (len(files) - i - 1), min(left, FILE_RESERVE_S))
        out_json = os.path.join(logdir, f"{stem}.json")
        cmd = [py, "-m", "pytest", path, "-q", "-rs", "-p", "no:cacheprovider", "--benchmark-enable",
               f"--benchmark-json={out_json}", "--benchmark-save-data", "--benchmark-disable-gc",
               "--benchmark-sort=name", "--benchmark-columns=min,median,max,rounds", *bench,
               *(["-k", kexpr] if kexpr else [])]
        rc, secs = run_stage("micro", cmd, file_deadline, os.path.join(logdir, f"{stem}.log"))
        got = []
        if os.path.exists(out_json):
            try:
                got = harness.rows_from_pytest_benchmark(out_json, run_id, stem)
            except (ValueError, KeyError, TypeError) as e:
                rows.append(_row(run_id, stem, stem, stem, "-", {}, status="error",
                                 reason=f"could not read {os.path.basename(out_json)}: {e}"))
        rows += got
        if rc not in (0, 5):
            why = (f"killed at its deadline after {secs:.0f} s" if _killed(rc) else f"pytest exit {rc} (see {stem}.log)")
            rows.append(_row(run_id, stem, stem, stem, "pytest", {"seconds": round(secs, 1)},
                             status="error" if _killed(rc) else "fail", reason=why))
        print(f"[micro] {stem}: exit {rc}, {len(got)} rows, {secs:.0f} s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# trainer


STEP_LINE = re.compile(r"^step (\d+)\s+(.*)$")


def parse_trainer_log(text: str) -> List[Dict[str, float]]:
    """The trainer's periodic console lines ('step N  key value  key value ...') as dicts."""
    out = []
    for line in text.splitlines():
        m = STEP_LINE.match(line.strip())
        if not m:
            continue
        toks = m.group(2).split()
        rec: Dict[str, float] = {"step": float(m.group(1))}
        for k, v in zip(toks[::2], toks[1::2]):
            try:
                rec[k] = float(v)
            except ValueError:
                pass
        if "images_per_s" in rec:
            out.append(rec)
    return out


def trainer_command(dry: bool, out_dir: str, data_dir: str) -> Tuple[List[str], str]:
    """(launcher command, what it runs): 2 CPU ranks with the tiny demo model in the dry run, else
    one GPU with benchmarks/train_gpu_check.yaml."""
    ds = [sys.executable, "-m", "deepspeed.launcher.runner"]
    with socket.socket() as sock:  # a free port: other launches may share this machine
        sock.bind(("127.0.0.1", 0))
        port = ["--master_port", str(sock.getsockname()[1])]
    if dry:
        over = ["train.max_steps=6", "train.epochs=1", "train.batch_size=4", "train.log_every=2",
                "train.warmup_steps=2", "train.lr=1e-3", "train.progress_bar=false", "train.eval.enabled=false",
                "train.precision=fp32", "data.backend=torch", "data.num_threads=1",
                "data.synthetic.num_train=64", "data.synthetic.num_val=8", "data.synthetic.image_size=32",
                f"data.synthetic.out_dir={data_dir}", f"train.output_dir={out_dir}"]
        return ds + ["--num_gpus", "2", *port, "train.py", "--config", "configs/demo.yaml", *over], \
            "tiny demo model, 2 CPU ranks, ZeRO-2, fp32, 6 steps"
    over = [f"train.output_dir={out_dir}", f"data.synthetic.out_dir={data_dir}",
            *os.environ.get("BLIPFAST_TRAINER_ARGS", "").split()]
    return ds + ["--num_gpus", "1", *port, "train.py", "--config", os.path.relpath(TRAINER_CONFIG, REPO), *over], \
        "BLIP base 224, 1 GPU, ZeRO-2, bf16, batch 64, synthetic data, torch decoding"


def stage_trainer(run_id: str, logdir: str, deadline: float, dry: bool) -> List[dict]:
    if importlib.util.find_spec("deepspeed") is None:
        return [_row(run_id, "trainer", "trainer", "deepspeed train.py", "deepspeed", {}, status="skip",
                     reason="deepspeed is not installed: carry it (bash scripts/build_gpu_wheels.sh; carry ['.whl'])")]
    if not dry:
        import torch

        if not torch.cuda.is_available():
            return [_row(run_id, "trainer", "trainer", "deepspeed train.py", "deepspeed", {}, status="skip",
                         reason="no CUDA GPU (the dry run trains on 2 CPU ranks)")]
    work = os.path.join(tempfile.gettempdir(), "blipfast-trainer", run_id)  # checkpoints: not in the logs
    out_dir, data_dir = os.path.join(work, "output"), os.path.join(tempfile.gettempdir(), "blipfast-synthetic-check")
    cmd, what = trainer_command(dry, out_dir, data_dir)
    env = dict(os.environ)
    if dry:
        env["OMP_NUM_THREADS"] = "1"  # 2 ranks on a shared CPU
    log_path = os.path.join(logdir, "trainer.log")
    rc, secs = run_stage("trainer", cmd, deadline, log_path, env=env, interrupt_grace=3.0)
    text = open(log_path, errors="replace").read()
    windows = parse_trainer_log(text)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    losses = []
    if os.path.exists(metrics):
        shutil.copy(metrics, os.path.join(logdir, "trainer_metrics.jsonl"))
        for line in open(metrics):
            try:
                losses.append(float(json.loads(line)["loss"]))
            except (ValueError, KeyError):
                pass
    # Steady state: the windows after the first (which holds start-up, compilation and autotuning).
    steady = windows[1:] or windows
    ips = [w["images_per_s"] for w in steady]
    mfu = [w["mfu"] for w in steady if "mfu" in w]
    step_ms = [w["step_time_s"] * 1e3 for w in steady if "step_time_s" in w]
    k = max(1, len(losses) // 4)
    first, last = (sum(losses[:k]) / k, sum(losses[-k:]) / k) if losses else (math.nan, math.nan)
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    falling = finite and last < first
    config = {"what": what, "returncode": rc, "seconds": round(secs, 1), "steps_logged": len(losses),
              "windows": len(windows), "images_per_s_windows": [round(w["images_per_s"], 2) for w in windows],
              "mfu_windows": [round(w["mfu"], 4) for w in windows if "mfu" in w],
              "data_wait_frac": [round(w.get("data_wait_frac", 0.0), 4) for w in windows],
              "loss_first": first, "loss_last": last, "loss_finite": finite, "loss_falling": falling,
              "command": " ".join(cmd[2:])}
    fields = {}
    if step_ms:
        fields = dict(times_ms=step_ms, throughput=sum(ips) / len(ips), throughput_unit="images/s",
                      mfu=(sum(mfu) / len(mfu)) if mfu else None)
    if not losses:
        status, reason = "error", f"no training step logged (exit {rc} after {secs:.0f} s; see trainer.log)"
    elif not finite:
        status, reason = "fail", "non-finite loss"
    elif not falling:
        status, reason = "fail", f"loss did not fall: mean of the first quarter {first:.4g}, last quarter {last:.4g}"
    elif not step_ms:
        status, reason = "error", f"no throughput line logged (exit {rc} after {secs:.0f} s)"
    elif _killed(rc):
        status, reason = "error", (f"killed at the stage deadline after {len(losses)} steps "
                                   f"(throughput from {len(windows)} log windows)")
    elif rc != 0:
        status, reason = "fail", f"train.py exit {rc}"
    else:
        status, reason = "ok", None
    print(f"[trainer] {status}: {len(losses)} steps, loss {first:.4g} -> {last:.4g}"
          + (f", {fields['throughput']:.1f} images/s" if fields else "")
          + (f", MFU {fields['mfu']:.1%}" if fields.get("mfu") else "") + (f" ({reason})" if reason else ""),
          flush=True)
    return [_row(run_id, "trainer", "trainer", "deepspeed train.py", "deepspeed-zero2", config, status=status,
                 reason=reason, **fields)]


# ---------------------------------------------------------------------------------------------
# $OUT


def copy_out(out: str, run_rows: List[dict], logdir: str, summary: str) -> None:
    """rows.jsonl, summary.txt and logs.tar.gz into $OUT (the device tool's return folder), each
    written under a temporary name and renamed: a kill mid-copy leaves the previous stage's files."""
    os.makedirs(out, exist_ok=True)

    def put(name, write):
        tmp = os.path.join(out, f".{name}.tmp")
        write(tmp)
        os.replace(tmp, os.path.join(out, name))

    def rows(p):
        with open(p, "w") as f:
            for r in run_rows:
                f.write(json.dumps(r) + "\n")

    def text(p):
        with open(p, "w") as f:
            f.write(summary + "\n")

    def logs(p):
        with tarfile.open(p, "w:gz") as tar:
            tar.add(logdir, arcname=os.path.basename(logdir))

    put("rows.jsonl", rows)
    put("summary.txt", text)
    put("logs.tar.gz", logs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", default=harness.is_dry_run())
    ap.add_argument("--results", default=None, help="JSON-lines results file to append to")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder to copy results into (default $OUT)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset to run (run in the "
                    "standard order)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help=f"hard total in seconds from gpu_check.sh's start (default {DEADLINE_S:.0f}; "
                         f"dry run {DRY_DEADLINE_S:.0f}; or BLIPFAST_DEADLINE_S)")
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
    caps = dict(DRY_CAPS if dry else CAPS)
    for k in caps:
        caps[k] = float(os.environ.get(f"BLIPFAST_CAP_{k.upper()}", caps[k]))
    t_start = float(os.environ.get("BLIPFAST_T0") or time.time())  # gpu_check.sh's start
    total = args.deadline_s or float(os.environ.get("BLIPFAST_DEADLINE_S") or (DRY_DEADLINE_S if dry else DEADLINE_S))
    hard_deadline = t_start + total
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        print(f"[gpu_check] unknown stage(s) {unknown} (known: {', '.join(STAGES)})", flush=True)
    stages = [s for s in STAGES if s in wanted]
    env = harness.environment()
    print(f"[gpu_check] run {run_id}{' (DRY RUN on the CPU)' if dry else ''}: {env['card']}, driver {env['driver']}, "
          f"torch {env['torch']}, triton {env['triton']}, git {env['git_rev']}; results -> {results}; "
          f"logs -> {logdir}; hard deadline {total:.0f} s from start ({hard_deadline - time.time():.0f} s left); "
          f"caps {caps}", flush=True)
    timings = []

    def summary_text() -> Tuple[List[dict], str, str]:
        run_rows = harness.read_rows(results, run_id)
        tail = (f"\n\nstages: {' | '.join(timings)} | total {time.time() - t_start:.0f} s of {total:.0f}; "
                f"rows: {results}")
        return run_rows, harness.summary_table(run_rows) + tail, tail

    for i, stage in enumerate(stages):
        t0 = time.time()
        stage_deadline = t0 + stage_budget(caps, stages[i:], hard_deadline - FINAL_RESERVE_S - t0)
        print(f"\n[gpu_check] === stage {stage}: {stage_deadline - t0:.0f} s (cap {caps[stage]:.0f}, "
              f"{hard_deadline - t0:.0f} s left of the deadline) ===", flush=True)
        try:
            if stage_deadline - t0 < MIN_STAGE_S:
                rows = [_row(run_id, stage, "driver", stage, "-", {}, status="skip",
                             reason=f"the hard deadline ({total:.0f} s) left no time for this stage")]
            elif stage == "env":
                rows = stage_env(run_id)
            elif stage == "compile":
                rows = stage_compile(run_id, logdir, stage_deadline, py, dry, results)
            elif stage == "tests":
                rows = stage_tests(run_id, logdir, stage_deadline, py)
            elif stage == "e2e":
                rows = stage_e2e(run_id, logdir, stage_deadline, py, dry, results)
            elif stage == "micro":
                rows = stage_micro(run_id, logdir, stage_deadline, py, dry)
            else:
                rows = stage_trainer(run_id, logdir, stage_deadline, dry)
            harness.append_rows(rows, results)
        except Exception as e:  # noqa: BLE001 - the next stage runs whatever happened here
            import traceback

            traceback.print_exc()
            harness.append_rows([_row(run_id, stage, "driver", stage, "-", {}, status="error",
                                      reason=f"{type(e).__name__}: {e}"[:300])], results)
        timings.append(f"{stage} {time.time() - t0:.0f} s")
        if args.out:  # after EVERY stage: a call killed later still returns this much
            run_rows, full, _ = summary_text()
            try:
                copy_out(args.out, run_rows, logdir, full)
                print(f"[gpu_check] stage {stage} done in {time.time() - t0:.0f} s; {len(run_rows)} rows copied to "
                      f"{args.out}", flush=True)
            except OSError as e:
                print(f"[gpu_check] could not copy to {args.out}: {e}", flush=True)
    run_rows, full, tail = summary_text()
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
