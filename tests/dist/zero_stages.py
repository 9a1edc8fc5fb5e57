"""Run by tests/train/test_distributed.py as `deepspeed --num_gpus 2 tests/dist/zero_stages.py --out DIR`
with the repository root on PYTHONPATH (helpers.repo_env), for `tests.dist.train_common`.

In one launch (each costs ~20 s of start-up): the tiny model trained for 3 steps under ZeRO-1,
2 and 3 (fp32, fixed batches and hard negatives), recording per step each rank's losses, the
reduced gradients, the momentum state and the learning rate; ZeRO-2 with gradient accumulation
(2 micro-batches per step); then ZeRO-2 and ZeRO-3 under
bf16 (EMA precision); then nan_policy skip and stop under ZeRO-3 with a NaN image on rank 1
only. Everything goes to DIR/<case>_rank<r>.pt for the test to compare.
"""
import argparse
import os
import sys
import traceback

import torch

from tests.dist.train_common import STEPS, FixedLoader, fixed_negatives, run_config


def full_grads(trainer):
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in trainer.model.named_parameters():
        g = safe_get_full_grad(p)
        out[name] = None if g is None else g.detach().float().cpu().clone()
    return out


def run_fp32(stage, out_dir, rank):
    from blipfast.train.trainer import Trainer

    run = run_config(os.path.join(out_dir, f"run_z{stage}"), stage)
    tr = Trainer(run, loader=FixedLoader(rank), negatives_fn=fixed_negatives)
    rec = {"steps": [], "initial": tr.full_state_dict()}
    for i, batch in enumerate(tr.loader.epoch(0)):
        res = tr.forward_backward(batch, 0, i)
        grads = full_grads(tr)
        lr_before = tr.optimizer.param_groups[0]["lr"]
        stepped = tr.optimizer_step(0, i)
        rec["steps"].append({"local": res.local, "mean": res.losses, "grads": grads, "stepped": stepped,
                             "lr": tr.optimizer.param_groups[0]["lr"], "lr_before": lr_before,
                             "momentum": tr.momentum.state_dict()})
    rec["final"] = tr.full_state_dict()
    rec["global_step"] = tr.global_step
    tr.position.batch = STEPS
    tr.save()  # for the export test
    rec["ckpt_dir"] = tr.ckpt_dir
    return rec


def run_accum(stage, out_dir, rank):
    """grad_accum=2: 4 micro-batches, 2 optimizer steps."""
    from blipfast.train.trainer import Trainer

    run = run_config(os.path.join(out_dir, f"run_accum_z{stage}"), stage, grad_accum=2)
    tr = Trainer(run, loader=FixedLoader(rank, n=4), negatives_fn=fixed_negatives)
    rec = {"micro": [], "steps": []}
    for i, batch in enumerate(tr.loader.epoch(0)):
        res = tr.forward_backward(batch, 0, i)
        grads = full_grads(tr) if tr.engine.is_gradient_accumulation_boundary() else None
        stepped = tr.optimizer_step(0, i)
        rec["micro"].append({"local": res.local, "momentum": tr.momentum.state_dict(), "stepped": stepped})
        if stepped:
            rec["steps"].append({"grads": grads, "lr": tr.optimizer.param_groups[0]["lr"]})
    rec["final"] = tr.full_state_dict()
    rec["global_step"] = tr.global_step
    return rec


def run_bf16(stage, out_dir, rank):
    from blipfast.train.trainer import Trainer

    run = run_config(os.path.join(out_dir, f"run_bf16_z{stage}"), stage, precision="bf16")
    tr = Trainer(run, loader=FixedLoader(rank), negatives_fn=fixed_negatives)
    rec = {"steps": []}
    for i, batch in enumerate(tr.loader.epoch(0)):
        online = tr.full_state_dict()  # online weights as the forward sees them, and the momentum state
        res = tr.forward_backward(batch, 0, i)
        tr.optimizer_step(0, i)
        rec["steps"].append({"before": online, "after": tr.momentum.state_dict(), "local": res.local,
                             "momentum_dtypes": {k: str(v.dtype) for k, v in tr.momentum.module.state_dict().items()},
                             "param_dtype": str(tr.model.visual_encoder.cls_token.dtype)})
    rec["final"] = tr.full_state_dict()
    tr.position.batch = STEPS
    tr.save()  # for the export test
    rec["ckpt_dir"] = tr.ckpt_dir
    return rec


def run_nan(stage, out_dir, rank, policy):
    from blipfast.train.trainer import NonFiniteLoss, Trainer

    run = run_config(os.path.join(out_dir, f"run_nan_{policy}_z{stage}"), stage, nan_policy=policy)
    tr = Trainer(run, loader=FixedLoader(rank, nan_at={(0, 1, 1)}), negatives_fn=fixed_negatives)
    rec = {"steps": [], "error": None}
    try:
        for i, batch in enumerate(tr.loader.epoch(0)):
            before = tr.full_state_dict()
            res = tr.forward_backward(batch, 0, i)
            if not res.skipped:
                tr.optimizer_step(0, i)
            rec["steps"].append({"before": before, "after": tr.full_state_dict(), "skipped": res.skipped,
                                 "nonfinite": res.nonfinite, "local": res.local, "mean": res.losses})
    except NonFiniteLoss as e:
        rec["error"] = str(e)
    rec["global_step"] = tr.global_step
    return rec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--cases", default="fp32,accum,bf16,nan")
    args = p.parse_args()
    from blipfast.train.trainer import init_distributed

    rank, world, _ = init_distributed()
    cases = args.cases.split(",")
    jobs = []
    if "fp32" in cases:
        jobs += [(f"z{s}", lambda s=s: run_fp32(s, args.out, rank)) for s in (1, 2, 3)]
    if "accum" in cases:
        jobs += [("accum_z2", lambda: run_accum(2, args.out, rank))]
    if "bf16" in cases:
        jobs += [(f"bf16_z{s}", lambda s=s: run_bf16(s, args.out, rank)) for s in (2, 3)]
    if "nan" in cases:
        jobs += [(f"nan_{pol}_z3", lambda pol=pol: run_nan(3, args.out, rank, pol)) for pol in ("skip", "stop")]
    for name, job in jobs:
        try:
            rec = job()
        except Exception:  # record it for the test's message, and keep the other ranks in step
            rec = {"crash": traceback.format_exc()}
            print(rec["crash"], file=sys.stderr, flush=True)
        torch.save(rec, os.path.join(args.out, f"{name}_rank{rank}.pt"))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
