"""Crash safety through the real entry point (`deepspeed --num_gpus 2 train.py`): a run killed with
SIGKILL and resumed with --resume reproduces the uninterrupted run's losses bit for bit (CPU,
fp32, dropout on, hard negatives sampled), ignoring a torn (uncommitted) checkpoint; the final
weights are equal too."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.dist.train_common import tiny_model_config
from tests.helpers import REPO, free_port

DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 26-81 s each: two deepspeed runs per test

EPOCHS, BATCH, NUM_TRAIN = 4, 4, 48  # 6 steps per epoch on 2 ranks, 24 in all
TOTAL = EPOCHS * NUM_TRAIN // (2 * BATCH)


def write_config(tmp_path, name, data_dir):
    model = tiny_model_config(queue_size=32)
    model.text.hidden_dropout_prob = 0.1  # dropout on: the RNG state must be restored on resume
    model.text.attention_probs_dropout_prob = 0.1
    import dataclasses

    cfg = {
        "model": dataclasses.asdict(model),
        "data": {"format": "synthetic", "synthetic": {"out_dir": str(data_dir), "num_train": NUM_TRAIN,
                                                      "num_val": 8, "image_size": 32},
                 "backend": "torch", "hflip": True, "min_scale": 0.5, "num_threads": 1},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 1e-3, "warmup_steps": 5, "seed": 7,
                  "output_dir": str(tmp_path / name), "save_every_steps": 4, "keep_last": 2,
                  "log_every": 1000, "progress_bar": False, "eval": {"enabled": False}},
        "deepspeed": os.path.join(REPO, "configs", "deepspeed", "zero2.json"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start(config, *extra, ranks=2):
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), "train.py", "--config", config,
           *extra]
    # Own session: the launcher and both ranks form one process group we can kill together.
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(p, timeout=600):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def losses(output_dir):
    """step -> record; a resumed run appends, so the last record of a step wins."""
    out = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r
    return out


def assert_no_repeated_rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats steps after a resume: {steps}"


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    from blipfast.data import generate_synthetic
    from blipfast.train import checkpoint
    from blipfast.train.export import consolidated_state_dict

    data_dir = tmp_path / "synthetic"
    generate_synthetic(str(data_dir), num_train=NUM_TRAIN, num_val=8, image_size=32)
    cfg_a, cfg_b = write_config(tmp_path, "a", data_dir), write_config(tmp_path, "b", data_dir)
    ckpt_b = tmp_path / "b" / "checkpoints"

    a = start(cfg_a)  # uninterrupted reference, in parallel with the run we kill
    b = start(cfg_b)
    deadline = time.time() + 600
    while checkpoint.find_latest(str(ckpt_b)) is None:
        assert b.poll() is None, "run b ended before its first checkpoint:\n" + b.stdout.read()[-4000:]
        assert time.time() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    os.killpg(b.pid, signal.SIGKILL)
    b.wait()
    b.stdout.close()
    finish(a)
    killed_at = max(losses(str(tmp_path / "b")), default=0)
    assert killed_at < TOTAL, f"run b was not killed mid-training (it logged step {killed_at} of {TOTAL})"

    # A save that died half-way, newer than anything committed: must be ignored.
    good = checkpoint.find_latest(str(ckpt_b))
    torn = ckpt_b / checkpoint.tag_for(TOTAL - 1)
    if torn.exists():
        shutil.rmtree(torn)
    shutil.copytree(ckpt_b / good, torn)
    (torn / checkpoint.COMMITTED).unlink()
    (torn / "momentum.pt").write_bytes(b"torn")

    out = finish(start(cfg_b, "--resume"))
    assert f"resumed from {ckpt_b / good}" in out, out[-3000:]
    assert_no_repeated_rows(str(tmp_path / "b"))  # the steps logged after `good` were run again

    ref, got = losses(str(tmp_path / "a")), losses(str(tmp_path / "b"))
    assert sorted(ref) == list(range(1, TOTAL + 1)) and sorted(got) == sorted(ref)
    for step in sorted(ref):
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm", "lr", "alpha"):
            assert got[step][k] == ref[step][k], f"step {step}: {k} {got[step][k]!r} != {ref[step][k]!r}"

    wa = consolidated_state_dict(str(tmp_path / "a"))
    wb = consolidated_state_dict(str(tmp_path / "b"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"final {k} differs"
    assert checkpoint.find_latest(str(ckpt_b)) == checkpoint.tag_for(TOTAL)
    committed = checkpoint.committed_tags(str(ckpt_b))
    assert len(committed) <= 2  # keep_last


def rank_processes(launcher_pid):
    import psutil

    procs = [p for p in psutil.Process(launcher_pid).children(recursive=True)
             if "train.py" in " ".join(p.cmdline()) and any(a.startswith("--local_rank") for a in p.cmdline())]
    return sorted(procs, key=lambda p: [a for a in p.cmdline() if a.startswith("--local_rank")][0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_finishes_the_step_commits_and_resumes_bitwise(tmp_path, sig):
    """A signal to ONE rank mid-run (a cluster preempting the job): both ranks finish the step,
    commit a checkpoint and exit 0; --resume then reproduces the uninterrupted run bit for bit."""
    from blipfast.data import generate_synthetic
    from blipfast.train import checkpoint

    data_dir = tmp_path / "synthetic"
    generate_synthetic(str(data_dir), num_train=NUM_TRAIN, num_val=8, image_size=32)
    cfg_a, cfg_c = write_config(tmp_path, "a", data_dir), write_config(tmp_path, "c", data_dir)
    a = start(cfg_a)
    c = start(cfg_c)
    metrics = tmp_path / "c" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert c.poll() is None, "run c ended early:\n" + c.stdout.read()[-4000:]
        assert time.time() < deadline, "run c logged no steps within 600 s"
        time.sleep(0.05)
    ranks = rank_processes(c.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1].pid, sig)  # rank 1 only: the ranks must agree to stop together
    out = finish(c)
    stopped = losses(str(tmp_path / "c"))
    last = max(stopped)
    assert last < TOTAL, f"run c was not stopped mid-training (it logged step {last} of {TOTAL})"
    assert f"stopping on {signal.Signals(sig).name}" in out, out[-3000:]
    assert checkpoint.find_latest(str(tmp_path / "c" / "checkpoints")) == checkpoint.tag_for(last)

    out = finish(start(cfg_c, "--resume"))
    finish(a)
    assert f"step {last}" in out and "resumed from" in out, out[-3000:]
    assert_no_repeated_rows(str(tmp_path / "c"))
    ref, got = losses(str(tmp_path / "a")), losses(str(tmp_path / "c"))
    assert sorted(got) == sorted(ref) == list(range(1, TOTAL + 1))
    for step in sorted(ref):
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm", "lr", "alpha"):
            assert got[step][k] == ref[step][k], f"step {step}: {k} {got[step][k]!r} != {ref[step][k]!r}"

    if sig == signal.SIGTERM:  # a resume that would change the math: refused, one line, nothing written
        saved = (tmp_path / "c" / "config.yaml").read_text()
        p = start(cfg_c, "--resume", "train.batch_size=8", "train.max_steps=30", ranks=1)
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 2, out[-3000:]
        line = [x for x in out.splitlines() if x.startswith("error: --resume")]
        assert line and "train.batch_size: 4 -> 8" in line[0] and "world size: 2 -> 1" in line[0], out[-3000:]
        assert "max_steps" not in line[0] and "Traceback" not in out, out[-3000:]
        assert (tmp_path / "c" / "config.yaml").read_text() == saved
