"""What several test files share: the repository root and subprocess environments, one closeness
assert, one weight-sharpening rule, and the launcher of multi-rank CLI runs.

Plain torch and the standard library only: the parity scripts import this module in the original
code's venv too (tests/parity/run_original.py), where neither blipfast nor pytest is installed.
Test files import it as `tests.helpers` (pytest.ini puts the repository root on sys.path).
"""
import math
import os
import socket
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# subprocesses


def tiny_model(depth: int = 1) -> dict:
    """A tiny BLIP `model:` section (32 wide, `depth` layers per tower, the demo tokenizer's ids,
    reference backends) for tests that build models or write run / eval YAML files."""
    return {
        "vision": {"image_size": 32, "patch_size": 16, "width": 32, "depth": depth, "num_heads": 2},
        "text": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": depth, "num_attention_heads": 2,
                 "intermediate_size": 64, "max_position_embeddings": 64, "cls_token_id": 2, "sep_token_id": 3,
                 "dec_token_id": 5, "enc_token_id": 6},
        "embed_dim": 16, "queue_size": 32, "attention_backend": "reference", "loss_backend": "reference",
    }


def repo_env(**extra) -> dict:
    """os.environ for a child process that imports `tests.*` (and blipfast) from this checkout:
    the repository root first on PYTHONPATH, what was there after it; `extra` set on top."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli_ranks(module: str, args, world: int = 2, timeout: float = 120) -> str:
    """Run `python -m MODULE ARGS` as `world` gloo processes, as torchrun would; return rank 0's
    stdout. Every rank must exit 0 and only rank 0 may print."""
    env = repo_env(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err
        outs.append(out)
    assert all(o == "" for o in outs[1:]), outs[1:]  # only rank 0 reports
    return outs[0]


# ---------------------------------------------------------------------------------------------
# closeness


def _nonfinite_mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    """'' when both hold the same non-finite values at the same places (NaN with NaN, +inf with
    +inf, -inf with -inf), else what differs and where (first few flat indices)."""
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = (test(got) != test(want)).flatten()
        if differ.any():
            return f"{what} in one tensor only, at flat indices {differ.nonzero().flatten()[:5].tolist()}"
    return ""


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """||got - want|| / max(||want||, floor) over the finite entries, in fp64 (the plain norm of
    the difference when that is 0); inf when the element counts or the non-finite entries differ.
    A different shape with the same element count is compared after a reshape."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        if got.numel() != want.numel():
            return math.inf
        got = got.reshape(want.shape)
    if _nonfinite_mismatch(got, want):
        return math.inf
    finite = torch.isfinite(want)
    diff, want = torch.where(finite, got - want, 0.0), torch.where(finite, want, 0.0)
    denom = max(want.norm().item(), floor)
    return diff.norm().item() / denom if denom > 0 else diff.norm().item()


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol, *, norm: bool = False) -> None:
    """Fail, naming `name`, unless `got` matches `want` (compared in fp64 on the CPU):

    * same shape, and the same non-finite entries at the same places (NaN with NaN, +inf with
      +inf, -inf with -inf);
    * norm=False: every finite |got - want| <= tol, `tol` a number or a tensor broadcast to
      want's shape (per-element bounds);
    * norm=True: the whole tensor's relative error ||got - want|| / ||want|| <= tol.

    The message gives the worst element (its error and bound, got and want there) and the max and
    mean errors.
    """
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    mismatch = _nonfinite_mismatch(got, want)
    assert not mismatch, f"{name}: {mismatch}"
    if not got.numel():
        return
    err = torch.where(torch.isfinite(want), got - want, 0.0).abs()  # non-finite entries are equal (above)
    if norm:
        rel = rel_err(got, want)
        if rel <= tol:
            return
        at = int(err.argmax())
        head = f"relative error {rel:.3e} > tol {float(tol):.1e}; largest difference at flat index {at}"
    else:
        bound = torch.as_tensor(tol, dtype=torch.float64).cpu().expand_as(err)
        over = err - bound
        if not (over > 0).any():
            return
        at = int(over.argmax())
        head = (f"{int((over > 0).sum())} of {err.numel()} elements beyond tol; worst at flat index {at}: "
                f"err {err.flatten()[at].item():.3e} > tol {bound.flatten()[at].item():.3e}")
    raise AssertionError(
        f"{name}: {head} (got {got.flatten()[at].item():.6g}, want {want.flatten()[at].item():.6g}); "
        f"max err {err.max().item():.3e}, mean err {err.mean().item():.3e}")


# ---------------------------------------------------------------------------------------------
# weights


@torch.no_grad()
def sharpen_(model: torch.nn.Module, seed: int, *, temp: float = 0.09, momentum: str = "copy") -> torch.nn.Module:
    """Re-draw every parameter of `model` at a scale where attention is sharp; returns `model`.

    With BERT's init (std 0.02) attention is nearly uniform, and a 0.1% change to one attention
    weight (or a wrong mask) moves no loss by even 1e-8; at this scale it is visible.

    Rules, by leaf name and shape, for `model.named_parameters()` in order (shared ones once):
      `temp` -> `temp` (no draw);
      1-dim `*bias` -> N(0, 0.2^2); other 1-dim (LayerNorm gains) -> 1 + N(0, 0.1^2);
      3-dim (CLS token and position tables, (1, n, D)) -> N(0, 1);
      the rest (Linear, Conv2d, Embedding) -> N(0, (1.5 / sqrt(fan_in))^2), fan_in = one output row.
    Draws are fp32 from torch.Generator().manual_seed(seed), then cast to each parameter's dtype
    and device: the same seed gives the same weights at any precision. Plain torch and official
    parameter names, so the original BLIP code (tests/parity/run_original.py) uses it too.

    momentum: for models with momentum encoders (`copy_params`), "copy" starts them equal to the
    online weights, as the models do at init; "draw" keeps their independent draws (parity tests:
    the momentum update is then visible).
    """
    if momentum not in ("copy", "draw"):
        raise ValueError(f"momentum must be 'copy' or 'draw', not {momentum!r}")
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "temp":
            p.fill_(temp)
            continue
        if p.ndim == 1 and leaf.endswith("bias"):
            new = 0.2 * torch.randn(p.shape, generator=g)
        elif p.ndim == 1:
            new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif p.ndim == 3:
            new = torch.randn(p.shape, generator=g)
        else:
            new = torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p[0].numel()))
        p.copy_(new)
    if momentum == "copy" and hasattr(model, "copy_params"):
        model.copy_params()
    return model


@torch.no_grad()
def random_queues_(image_queue: torch.Tensor, text_queue: torch.Tensor, seed: int) -> None:
    """Unit-norm random columns, as the original initialises its (E, Q) feature queues."""
    g = torch.Generator().manual_seed(seed)
    for q in (image_queue, text_queue):
        q.copy_(torch.nn.functional.normalize(torch.randn(q.shape, generator=g), dim=0))
