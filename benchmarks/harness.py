"""Shared benchmark harness: one row schema, timing, peak memory, environment, results file, summary.

Every benchmark (end-to-end steps, kernel microbenchmarks, the GPU test run) produces rows of
the same schema (`ROW_KEYS`), appended as JSON lines to `benchmarks/results/results.jsonl`.
A row belongs to a run (`run_id`: one invocation of gpu_check.sh) and a `group` (the rows
that are comparable: same op, mode and shape/config); `summary_table` prints each row's
ratio against the row of its group marked `baseline` in the same run.

    python benchmarks/harness.py summary [RESULTS.jsonl] [--run-id ID]   # re-print a table
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from typing import Callable, Dict, Iterable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:  # benchmarks/ is a folder of scripts, not a package: let siblings import
    sys.path.insert(0, HERE)
DEFAULT_RESULTS = os.path.join(HERE, "results", "results.jsonl")
DRY_RUN_ENV = "BLIPFAST_BENCH_DRY_RUN"

# The row schema. Times are milliseconds; None where a value does not apply or is unknown.
ROW_KEYS = (
    "run_id",  # one invocation of the suite (gpu_check.sh), shared by all its rows
    "timestamp",  # UTC ISO-8601, when the row was made
    "suite",  # e2e | tests | env | the microbenchmark file's stem (bench_attention, ...)
    "group",  # rows that are comparable (ratios are taken inside a group of one run)
    "op",  # model or op measured
    "provider",  # implementation (reference-fp32, sdpa-bf16, triton, ...)
    "mode",  # fwd | bwd | fwd+bwd | step | run
    "config",  # dict: shapes, dtype, backends, batch, ... (everything that defines the case)
    "status",  # ok | skip | error | oom | fail
    "reason",  # why a row is skip/error/oom/fail (None when ok)
    "baseline",  # True for the row of its group that ratios are taken against
    "p20_ms", "p50_ms", "p80_ms",  # quantiles of the per-iteration time
    "n_samples",  # how many timed iterations the quantiles come from
    "throughput", "throughput_unit",  # e.g. images/s for e2e steps
    "flops",  # FLOPs per iteration from blipfast/flops.py formulas (model FLOPs)
    "tflops",  # achieved: flops / p50
    "bytes",  # minimum bytes moved per iteration (kernels), when known
    "gbps",  # achieved: bytes / p50
    "mfu",  # flops / p50 / card peak at the row's precision (blipfast/flops.py table)
    "peak_mem_mb",  # peak allocated device memory during the timed iterations (None on CPU)
    "phases_ms",  # dict: median ms per phase of a step, where measurable
    "device", "card", "driver", "cuda", "torch", "triton", "python", "host",
    "git_rev", "git_dirty",
)
STATUSES = ("ok", "skip", "error", "oom", "fail")


def is_dry_run() -> bool:
    return os.environ.get(DRY_RUN_ENV, "0") not in ("", "0", "false", "False")


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# environment


def git_revision(repo: str = REPO):
    """(revision, dirty) of the checkout; BLIPFAST_GIT_REV wins (the GPU machine has no .git)."""
    env = os.environ.get("BLIPFAST_GIT_REV")
    if env:
        return env, None
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if rev:
            status = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=20).stdout
            return rev, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    head = os.path.join(repo, ".git", "HEAD")  # no git binary: read the ref by hand
    try:
        ref = open(head).read().strip()
        if ref.startswith("ref: "):
            ref = open(os.path.join(repo, ".git", ref[5:])).read().strip()
        return ref, None
    except OSError:
        return "unknown", None


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


_ENV_CACHE: Optional[dict] = None


def environment() -> dict:
    """Card, driver and versions (cached): the environment columns of every row."""
    global _ENV_CACHE
    if _ENV_CACHE is None:
        import torch

        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # noqa: BLE001 - triton is optional on the CPU
            triton_version = None
        cuda = torch.cuda.is_available()
        rev, dirty = git_revision()
        _ENV_CACHE = {
            "device": "cuda" if cuda else "cpu",
            "card": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
            "driver": _driver_version() if cuda else None,
            "cuda": torch.version.cuda,
            "torch": torch.__version__,
            "triton": triton_version,
            "python": platform.python_version(),
            "host": platform.node(),
            "git_rev": rev,
            "git_dirty": dirty,
        }
    return dict(_ENV_CACHE)


# ---------------------------------------------------------------------------------------------
# timing and memory


def quantiles(samples: Sequence[float], qs: Sequence[float] = (0.2, 0.5, 0.8)) -> List[float]:
    """Linear-interpolation quantiles (numpy's default method) of a non-empty sample."""
    if not samples:
        raise ValueError("quantiles of an empty sample")
    xs = sorted(samples)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


class Clock:
    """Timestamps on the device's own timeline: CUDA events on a GPU, perf_counter on the CPU.

    `mark()` is cheap and does not synchronise; `elapsed_ms(a, b)` needs `sync()` first on CUDA.
    """

    def __init__(self, device: str):
        import torch

        self.cuda = str(device).startswith("cuda")
        self._torch = torch

    def mark(self):
        if self.cuda:
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize()

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def time_iterations(fn: Callable[[], object], device: str, warmup: int = 2, iters: int = 10,
                    max_seconds: float = float("inf"), min_iters: int = 3) -> List[float]:
    """Run `fn` `warmup` times, then time up to `iters` calls (ms each).

    Stops early once `max_seconds` of wall time have gone into the timed calls, but never
    before `min_iters`. Each call is bracketed by device events (no synchronisation between
    calls), so on a GPU a time is the span the device spent on that call.
    """
    if iters < 1 or min_iters < 1:
        raise ValueError("iters and min_iters must be >= 1")
    clock = Clock(device)
    for _ in range(warmup):
        fn()
    clock.sync()
    marks = []
    t0 = time.perf_counter()
    for i in range(iters):
        a = clock.mark()
        fn()
        marks.append((a, clock.mark()))
        if i + 1 >= min_iters and time.perf_counter() - t0 > max_seconds:
            break
    clock.sync()
    return [clock.elapsed_ms(a, b) for a, b in marks]


@contextlib.contextmanager
def peak_memory(device: str):
    """Yields a dict whose 'mb' is the peak allocated device memory inside the block (None on CPU)."""
    import torch

    box = {"mb": None}
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield box
    finally:
        if cuda:
            torch.cuda.synchronize()
            box["mb"] = torch.cuda.max_memory_allocated() / 2**20


def synchronized(fn: Callable[[], object]) -> Callable[[], object]:
    """Wrap fn so it waits for the GPU: use inside pytest-benchmark, whose timer is the host clock."""
    import torch

    if not torch.cuda.is_available():
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


# ---------------------------------------------------------------------------------------------
# rows


def make_row(run_id: str, suite: str, group: str, op: str, provider: str, mode: str, config: dict,
             status: str = "ok", reason: Optional[str] = None, times_ms: Optional[Sequence[float]] = None,
             baseline: bool = False, **fields) -> dict:
    """Build a schema row; quantiles come from `times_ms`, derived rates from flops/bytes."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row field(s): {sorted(unknown)}")
    row = {k: None for k in ROW_KEYS}
    row.update(environment())
    row.update(run_id=run_id, timestamp=utc_now(), suite=suite, group=group, op=op, provider=provider,
               mode=mode, config=dict(config), status=status, reason=reason, baseline=bool(baseline))
    row.update(fields)
    if times_ms:
        row["p20_ms"], row["p50_ms"], row["p80_ms"] = quantiles(times_ms)
        row["n_samples"] = len(times_ms)
    p50 = row["p50_ms"]
    if p50:
        if row["flops"] and row["tflops"] is None:
            row["tflops"] = row["flops"] / (p50 * 1e-3) / 1e12
        if row["bytes"] and row["gbps"] is None:
            row["gbps"] = row["bytes"] / (p50 * 1e-3) / 1e9
    return row


def validate_row(row: dict) -> None:
    """Raise ValueError naming what is wrong with a row (used by tests and when reading)."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"row misses key(s) {missing}")
    if row["status"] not in STATUSES:
        raise ValueError(f"bad status {row['status']!r}")
    for k in ("run_id", "suite", "group", "op", "provider", "mode", "torch", "python", "git_rev", "card"):
        if not row[k] or not isinstance(row[k], str):
            raise ValueError(f"row field {k!r} must be a non-empty string, got {row[k]!r}")
    if not isinstance(row["config"], dict):
        raise ValueError("row field 'config' must be a dict")
    if row["status"] == "ok":
        if row["suite"] not in ("tests", "env", "compile"):
            q = [row["p20_ms"], row["p50_ms"], row["p80_ms"]]
            if any(v is None or not v > 0 for v in q) or not q[0] <= q[1] <= q[2]:
                raise ValueError(f"ok row needs positive ordered p20/p50/p80, got {q}")
    elif not row["reason"]:
        raise ValueError(f"a {row['status']} row needs a reason")


def append_rows(rows: Iterable[dict], path: str = DEFAULT_RESULTS) -> None:
    """Append rows as JSON lines (one write and flush per row, so a killed run keeps its rows)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # key order kept: phases are listed in step order
            f.flush()


def read_rows(path: str, run_id: Optional[str] = None) -> List[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                if run_id is None or row.get("run_id") == run_id:
                    rows.append(row)
    return rows


def last_run_id(rows: Sequence[dict]) -> Optional[str]:
    return rows[-1]["run_id"] if rows else None


# ---------------------------------------------------------------------------------------------
# pytest-benchmark JSON -> rows


def rows_from_pytest_benchmark(path: str, run_id: str, suite: str) -> List[dict]:
    """Convert a `--benchmark-json` file (written with --benchmark-save-data) into rows.

    A microbenchmark describes itself in `benchmark.extra_info`: op, provider, mode, shape
    (or any config keys), flops, bytes, baseline (bool), peak_mem_mb, precision, group; and may
    give its own device-timed p20_ms/p50_ms/p80_ms (e.g. from harness.time_iterations), which then
    win over pytest-benchmark's host-clock samples. Missing names fall back to the test's
    parameters (provider/backend/impl, mode) and name. Rows are compared (ratios) within a
    group: extra_info['group'] if given, else op + mode + the test's other parameters.
    """
    from blipfast.flops import mfu as _mfu

    with open(path) as f:
        data = json.load(f)
    card = environment()["card"]
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        params = dict(b.get("params") or {})
        # Pop from both places, so that neither stays in the case identity below.
        named = info.pop("provider", None)
        param = params.pop("provider", None) or params.pop("backend", None) or params.pop("impl", None)
        provider = str(named or param or "default")
        named, param = info.pop("mode", None), params.pop("mode", None)
        mode = str(named or param or "fwd")
        op = str(info.pop("op", None) or b.get("group") or b["name"].split("[")[0])
        baseline = bool(info.pop("baseline", False))
        flops, nbytes = info.pop("flops", None), info.pop("bytes", None)
        peak_mb = info.pop("peak_mem_mb", None)
        precision = info.pop("precision", None)
        own = [info.pop(k, None) for k in ("p20_ms", "p50_ms", "p80_ms")]
        # The case identity: an explicit extra_info['group'], else the test's parameters other than
        # provider and mode (extra_info also carries per-provider outputs such as errors).
        explicit = info.pop("group", None)
        config = {**params, **info, "test": b.get("fullname", b["name"])}
        case = json.dumps(params if params else {k: v for k, v in info.items()}, sort_keys=True, default=str)
        group = str(explicit) if explicit else f"{op} {mode} {case}"
        fields = dict(flops=flops, bytes=nbytes, peak_mem_mb=peak_mb)
        if all(v is not None for v in own):
            times = None
            fields.update(p20_ms=own[0], p50_ms=own[1], p80_ms=own[2], n_samples=b["stats"].get("rounds"))
        else:
            times = [t * 1e3 for t in b["stats"].get("data") or []] or None
            if times is None:  # saved without --benchmark-save-data: use the summary stats
                st = b["stats"]
                fields.update(p20_ms=st["q1"] * 1e3, p50_ms=st["median"] * 1e3, p80_ms=st["q3"] * 1e3,
                              n_samples=st.get("rounds"))
        row = make_row(run_id, suite, group, op, provider, mode, config, times_ms=times, baseline=baseline, **fields)
        if flops and precision and row["p50_ms"]:
            row["mfu"] = _mfu(flops, row["p50_ms"] * 1e-3, card, precision)
        rows.append(row)
    _default_baselines(rows)
    return rows


BASELINE_PROVIDERS = ("reference", "torch", "eager", "sdpa")


def _default_baselines(rows: List[dict]) -> None:
    """In groups with no row marked baseline, mark the first of BASELINE_PROVIDERS present."""
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for members in groups.values():
        if any(r["baseline"] for r in members):
            continue
        for name in BASELINE_PROVIDERS:
            hit = [r for r in members if r["provider"] == name and r["status"] == "ok"]
            if hit:
                hit[0]["baseline"] = True
                break


# ---------------------------------------------------------------------------------------------
# summary


def add_ratios(rows: List[dict]) -> None:
    """row['speedup'] = baseline p50 / row p50 inside each (run, group); e2e rows also get
    row['vs_switches'] against the fastest 'switches' tier row of their group."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["run_id"], r["suite"], r["group"]), []).append(r)
    for members in groups.values():
        ok = [r for r in members if r["status"] == "ok" and r["p50_ms"]]
        base = next((r for r in ok if r["baseline"]), None)
        switches = [r for r in ok if (r.get("config") or {}).get("tier") == "switches"]
        best = min(switches, key=lambda r: r["p50_ms"]) if switches else None
        for r in ok:
            r["speedup"] = base["p50_ms"] / r["p50_ms"] if base else None
            r["vs_switches"] = best["p50_ms"] / r["p50_ms"] if best else None


def _fmt(v, spec: str = ".3g", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return format(v, spec)


def summary_table(rows: List[dict], max_kernel_lines: Optional[int] = None, reason_chars: int = 300) -> str:
    """A compact text table of one run: e2e, kernels, tests, then every skip/error line.

    max_kernel_lines / reason_chars shorten what is printed (the device tool returns only the
    last 12,000 characters of output); the copy in summary.txt is complete."""
    rows = [dict(r) for r in rows]
    add_ratios(rows)
    out: List[str] = []
    if rows:
        r0 = rows[0]
        out.append(f"run {r0['run_id']} | {r0['card']} | driver {r0['driver']} | torch {r0['torch']} | "
                   f"triton {r0['triton']} | git {str(r0['git_rev'])[:12]}{'+dirty' if r0['git_dirty'] else ''}")
    e2e = [r for r in rows if r["suite"] == "e2e" and r["status"] == "ok"]
    if e2e:
        out.append("")
        out.append("end-to-end pre-training step (ITC+ITM+LM fwd+bwd+AdamW+EMA+queue)")
        out.append(f"{'group':<17}{'provider':<22}{'img/s':>8}{'ms p50':>9}{'p20-p80':>15}{'mem GB':>8}"
                   f"{'TFLOP/s':>8}{'MFU':>6}{'x ref':>7}{'x sw':>6}")
        for r in e2e:
            spread = f"{_fmt(r['p20_ms'], '.1f')}-{_fmt(r['p80_ms'], '.1f')}"
            mem = r["peak_mem_mb"] / 1024 if r["peak_mem_mb"] else None
            out.append(
                f"{r['group'][:16]:<17}{r['provider'][:21]:<22}{_fmt(r['throughput'], '.1f'):>8}"
                f"{_fmt(r['p50_ms'], '.1f'):>9}{spread:>15}{_fmt(mem, '.1f'):>8}{_fmt(r['tflops'], '.1f'):>8}"
                f"{(format(r['mfu'] * 100, '.0f') + '%') if r['mfu'] is not None else '-':>6}"
                f"{_fmt(r.get('speedup'), '.2f'):>7}{_fmt(r.get('vs_switches'), '.2f'):>6}"
            )
        phased = [r for r in e2e if r.get("phases_ms")]
        if phased:
            first_group = phased[0]["group"]
            out.append(f"phases, ms per step ({first_group}; forward phases by module hooks, eager only):")
            for r in phased:
                if r["group"] != first_group:
                    continue
                ph = " ".join(f"{k}={v:.1f}" for k, v in r["phases_ms"].items())
                out.append(f"  {r['provider']}: {ph}")
    trainer = [r for r in rows if r["suite"] == "trainer" and r["status"] == "ok"]
    if trainer:
        out.append("")
        out.append("trainer (deepspeed train.py; steady-state log windows)")
        for r in trainer:
            c = r["config"]
            mfu = f"{r['mfu'] * 100:.0f}%" if r["mfu"] is not None else "-"
            out.append(f"  {c.get('what')}: {_fmt(r['throughput'], '.1f')} images/s, {_fmt(r['p50_ms'], '.1f')} ms/step, "
                       f"MFU {mfu}, loss {_fmt(c.get('loss_first'), '.4g')} -> {_fmt(c.get('loss_last'), '.4g')} "
                       f"over {c.get('steps_logged')} steps")
    kern = [r for r in rows if r["suite"] not in ("e2e", "tests", "env", "compile", "trainer") and r["status"] == "ok"]
    if kern:
        groups: Dict[tuple, List[dict]] = {}
        for r in kern:
            groups.setdefault((r["suite"], r["group"]), []).append(r)
        out.append("")
        out.append("kernels: one line per shape, baseline first; provider p50, achieved GB/s (or TFLOP/s), x = baseline p50 / p50")
        lines = []
        for (suite, _), members in groups.items():
            members.sort(key=lambda r: (not r["baseline"], r["p50_ms"]))
            r0 = members[0]
            shape = r0["group"]
            prefix = f"{r0['op']} {r0['mode']} "
            if shape.startswith(prefix):  # the default group: op, mode, then the case's parameters
                try:
                    shape = ",".join(f"{k}={v}" for k, v in json.loads(shape[len(prefix):]).items())
                except (ValueError, AttributeError):
                    pass
            cells = []
            for r in members:  # one rate per cell: GB/s where bytes are known (memory-bound ops), else TFLOP/s
                rate = f" {r['gbps']:.3g}GB/s" if r["gbps"] else (f" {r['tflops']:.3g}TF/s" if r["tflops"] else "")
                cells.append(f"{r['provider']} {_fmt(r['p50_ms'], '.3g')}ms{rate}"
                             + ("" if r["baseline"] else f" x{_fmt(r.get('speedup'), '.2f')}"))
            lines.append(f"{(suite.replace('bench_', '') + '/' + r0['op'])[:24]:<25}{r0['mode'][:7]:<8}"
                         f"{shape[:40]:<41}" + " | ".join(cells))
        if max_kernel_lines is not None and len(lines) > max_kernel_lines:
            more = len(lines) - max_kernel_lines
            lines = lines[:max_kernel_lines] + [f"... {more} more shapes in summary.txt / rows.jsonl"]
        out += lines
    for r in rows:
        if r["suite"] == "compile" and r["status"] == "ok":
            c = r["config"]
            out.append("")
            out.append(f"compile ({c.get('mode')}): {c.get('jobs')} jobs, {c.get('units')} kernel units, "
                       f"{c.get('done')} done, {c.get('failed')} failed, {c.get('seconds')} s on {c.get('workers')} workers")
    tests = [r for r in rows if r["suite"] == "tests"]
    if tests:
        out.append("")
        for r in tests:
            c = r["config"]
            out.append(f"tests {r['op']}: {r['status'].upper()} passed={c.get('passed')} failed={c.get('failed')} "
                       f"errors={c.get('errors')} skipped={c.get('skipped')}"
                       + (f" ({r['reason']})" if r["reason"] else ""))
            for name in (c.get("failed_tests") or [])[:10]:
                out.append(f"  FAILED {name}")
    bad = [r for r in rows if r["status"] != "ok" and r["suite"] != "tests"]
    if bad:
        out.append("")
        for r in bad:
            out.append(f"{r['status'].upper()} {r['suite']} {r['group']} {r['provider']}: {r['reason']}"[:reason_chars])
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="print the summary table of one run")
    s.add_argument("results", nargs="?", default=DEFAULT_RESULTS)
    s.add_argument("--run-id", default=None, help="default: the last run in the file")
    args = ap.parse_args(argv)
    rows = read_rows(args.results)
    run_id = args.run_id or last_run_id(rows)
    if run_id is None:
        print(f"no rows in {args.results}")
        return 1
    print(summary_table([r for r in rows if r["run_id"] == run_id]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
