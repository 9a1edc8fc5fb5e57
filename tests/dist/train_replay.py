"""One-process replay of what the 2-rank runs in tests/dist compute (the reference the
distributed tests compare with). Written from BLIP's semantics, not from the trainer:

per micro-batch: the momentum (EMA) update; each rank's forward on its own batch (ITC in-batch
columns and hard negatives per rank, the same queue); the queue receives both ranks' momentum
features (rank 0's first). Per optimizer step: gradients summed over micro-batches (loss /
grad_accum) and averaged over the ranks; one AdamW step with the original schedule's learning
rate and weight decay on every parameter.
"""
from __future__ import annotations

import torch

from tests.dist.train_common import SEED, STEPS, WORLD, fixed_negatives, make_batch, tiny_model_config


def original_lr(lr, warmup_lr, warmup_steps, decay, min_lr, epoch, i):
    if epoch == 0:
        return min(lr, warmup_lr + (lr - warmup_lr) * i / warmup_steps)
    return max(min_lr, lr * decay ** epoch)


def replay(*args, **kwargs):
    """Single-threaded, like each of the two ranks on a 2-core machine (same summation order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _replay(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _replay(steps: int = STEPS, lr=1e-3, warmup_lr=1e-5, warmup_steps=2, weight_decay=0.05, alpha_max=0.4,
            batches_per_epoch: int = STEPS, grad_accum: int = 1):
    """`steps` optimizer steps of `grad_accum` micro-batches each (batch index i = step * grad_accum + k)."""
    import random

    import numpy as np

    from blipfast import BlipForPretraining

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    model = BlipForPretraining(tiny_model_config())
    model.eval()  # dropout is 0; eval() stops forward's own EMA update and enqueue (replayed below)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=warmup_lr, weight_decay=weight_decay)
    out = {"initial": {k: v.clone() for k, v in model.state_dict().items()}, "steps": [], "micro": []}
    for step in range(steps):
        acc = [None] * WORLD  # per-rank sums over the micro-batches (each rank accumulates its own)
        summand_max = {}  # per parameter, the largest gradient entry summed: the scale of rounding errors
        for k in range(grad_accum):
            i = step * grad_accum + k
            a = alpha_max * min(1.0, i / (2 * batches_per_epoch))
            model.momentum_update()  # every forward of the original updates the EMA
            losses, feats = [], []
            for r in range(WORLD):
                b = make_batch(0, i, r)
                o = model(b["images"], b["input_ids"], b["attention_mask"], a, negatives=fixed_negatives(0, i, r))
                g = torch.autograd.grad(o.loss / grad_accum, params)
                acc[r] = list(g) if acc[r] is None else [x + y for x, y in zip(acc[r], g)]
                for n, x in zip(names, g):
                    summand_max[n] = max(summand_max.get(n, 0.0), float(x.abs().max()))
                losses.append({"loss": o.loss.item(), "loss_itc": o.loss_itc.item(), "loss_itm": o.loss_itm.item(),
                               "loss_lm": o.loss_lm.item()})
                with torch.no_grad():  # the momentum features as the forward computes them (same rounding)
                    packing = _packing(model, b["input_ids"], b["attention_mask"])
                    first_only = packing is not None  # exact work: the last ViT block on [CLS] only
                    feats.append((model.image_features(model.visual_encoder_m(b["images"], first_only=first_only),
                                                       momentum=True),
                                  model.text_features(b["input_ids"], b["attention_mask"], momentum=True,
                                                      packing=packing)))
            model.dequeue_and_enqueue(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]))
            out["micro"].append({"losses": losses, "momentum": _momentum_state(model)})
        grads = {}
        for n, p, *per_rank in zip(names, params, *acc):
            p.grad = sum(per_rank[1:], per_rank[0]) / WORLD  # averaged over the ranks
            grads[n] = p.grad.clone()
        for g in opt.param_groups:
            g["lr"] = original_lr(lr, warmup_lr, warmup_steps, 0.9, 1e-6, 0, step)
        opt.step()
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        out["steps"].append({"losses": out["micro"][-1]["losses"], "grads": grads, "summand_max": summand_max,
                             "momentum": _momentum_state(model), "lr": opt.param_groups[0]["lr"]})
    out["final"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _packing(model, input_ids, attention_mask):
    """The text layout BlipForPretraining's forward uses (None: the padded path)."""
    from blipfast.ops.packing import Packing

    if not model.config.exact_work:
        return None
    tc = model.config.text
    ok = (input_ids == tc.pad_token_id) | attention_mask.bool()
    ok[:, 0] = True
    return Packing.from_mask(attention_mask, extra_ok=ok)


def _momentum_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.split(".")[0] in ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m",
                                   "image_queue", "text_queue", "queue_ptr")}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (max |b| + tiny): a norm-wise relative error for one tensor."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12)) if b.numel() else 0.0


def compare_dicts(got, want, tol, what: str):
    """Every tensor of `want` has a match in `got` within `tol` (relative to want's max); reports
    the worst keys on failure."""
    missing = sorted(set(want) - set(got))
    assert not missing, f"{what}: missing {missing[:5]}"
    errs = sorted(((max_rel_err(got[k], want[k]), k) for k in want), reverse=True)
    bad = [(e, k) for e, k in errs if not e <= tol]
    assert not bad, f"{what}: {len(bad)} tensors differ beyond {tol:g}; worst: " + ", ".join(
        f"{k} {e:.3g}" for e, k in bad[:5])
    return errs[0][0] if errs else 0.0
