"""Loss microbenchmarks at BLIP's pre-training shapes (queue 57,600, embed 256, vocab 30,524,
text length 30): the fused Triton losses against the original unfused PyTorch code, torch.compile
of the reference, and peers (inf-cl, liger-kernel, cut-cross-entropy) when importable.

    pytest benchmarks/bench_losses.py --benchmark-enable              # all cases (GPU)
    pytest benchmarks/bench_losses.py --benchmark-enable -k "itc and 256"

GPU only: without CUDA every case is skipped, except under BLIPFAST_BENCH_DRY_RUN=1, where tiny
versions of the plain-PyTorch providers run on the CPU to exercise the code path.

ITC (mode fwd+bwd): loss over [in-batch momentum features | queue] in both directions with
momentum-distillation targets (alpha 0.4), hard-negative sampling for both directions, and the
backward to the online features and the temperature. Providers:
  original   the original code path: `reference.itc_loss` then, per row, torch.multinomial(...)
             .item() (2B host-device syncs), as blip_pretrain.py does;
  reference  the same loss with one batched torch.multinomial (no sync);
  compile    torch.compile of `reference.itc_loss` + batched multinomial (only at B = 256 in
             bf16: each case costs a compilation);
  triton     blipfast.kernels.itc (streaming loss, sync-free sampling);
  inf_cl     inf-cl's streaming contrastive loss with hard (one-hot) targets and no queue
             distillation: a speed peer computing less, marked in its config.
LM (mode fwd+bwd): hidden (B*29, 768) x tied embeddings (30524, 768)^T + bias, label smoothing
0.1, ignore_index -100 (about 10% padding). Providers: reference (F.linear + F.cross_entropy, the
original), compile, triton (blipfast.kernels.cross_entropy), liger (its fused linear CE, label
smoothing supported), cce (cut-cross-entropy: no label smoothing, so it computes eps = 0; marked).

Each case records in extra_info: p20/p50/p80_ms (CUDA events), peak_mem_mb (peak allocated during
the timed calls, inputs included) and extra_mem_mb (that peak minus what was allocated before),
flops (matmul FLOPs of the unfused math), and the provider's error against the fp32 reference.
A provider whose loss is wrong fails instead of producing a fast row.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling scripts (harness) are not a package
    sys.path.insert(0, HERE)

import harness  # noqa: E402

from blipfast.kernels import reference as ref  # noqa: E402

CUDA = torch.cuda.is_available()
DRY = harness.is_dry_run() and not CUDA
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or DRY), reason="loss benchmarks need a CUDA GPU "
                                "(BLIPFAST_BENCH_DRY_RUN=1 runs tiny CPU versions)")

QUEUE, EMBED, VOCAB, HIDDEN, TEXT_LEN, ALPHA, TEMP = 57600, 256, 30524, 768, 30, 0.4, 0.07
# (batch per GPU, dtype of the online features / LM hidden states): bf16 is the training path;
# fp32 (the original's precision) at the target batch of 256
# Order of value, as a budget may interrupt the file: the training batch 256 in bf16 first.
CASES = [(256, "bf16"), (64, "bf16"), (1024, "bf16"), (256, "fp32")]
# torch.compile providers ("compile") are separate tests at the end of the file: each costs a
# compilation, and they must not delay the fused-kernel rows (pytest runs tests in file order:
# test_lm, test_itc, then test_lm_compile, test_itc_compile).
ITC_PROVIDERS = ("original", "reference", "triton", "inf_cl")
LM_PROVIDERS = ("reference", "triton", "liger", "cce")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sizes(B: int):
    if DRY:  # the same case, small enough for the CPU
        return 4, 64, 32, 500, 48
    return B, QUEUE, EMBED, VOCAB, HIDDEN


def timed(benchmark, run: Callable[[], object], **info):
    warmup, iters = (1, 2) if DRY else (2, 8)
    before = torch.cuda.memory_allocated() / 2**20 if CUDA else None
    with harness.peak_memory(DEVICE) as mem:
        times = harness.time_iterations(run, DEVICE, warmup=warmup, iters=iters, max_seconds=1.0)
    p20, p50, p80 = harness.quantiles(times)
    extra = None if mem["mb"] is None else mem["mb"] - before
    benchmark.extra_info.update(p20_ms=p20, p50_ms=p50, p80_ms=p80, peak_mem_mb=mem["mb"], extra_mem_mb=extra,
                                **info)
    benchmark.pedantic(harness.synchronized(run), rounds=1 if DRY else 2, iterations=1, warmup_rounds=0)


def autocast(dtype):
    """bf16 runs the PyTorch providers under autocast, as the model does (queues stay fp32)."""
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# ITC + hard negatives


def itc_inputs(B, dtype, seed=0):
    B, Q, E, _, _ = sizes(B)
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def unit(*shape, dim=-1):
        return F.normalize(torch.randn(*shape, generator=g, device=DEVICE), dim=dim)

    feats = [unit(B, E).to(dtype) for _ in range(4)]  # image, text, image_m, text_m
    for f in feats[:2]:
        f.requires_grad_(True)
    queues = [unit(E, Q, dim=0), unit(E, Q, dim=0)]  # model buffers: fp32
    temp = torch.tensor([TEMP], device=DEVICE, requires_grad=True)
    return feats, queues, temp


def original_negatives(s_i2t, s_t2i):
    """blip_pretrain.py's loop: one multinomial and one .item() per row and direction."""
    B = s_i2t.shape[0]
    with torch.no_grad():
        w_t2i = F.softmax(s_t2i.float(), dim=1) + 1e-4
        w_t2i.fill_diagonal_(0)
        w_i2t = F.softmax(s_i2t.float(), dim=1) + 1e-4
        w_i2t.fill_diagonal_(0)
    neg_img = [torch.multinomial(w_t2i[b], 1).item() for b in range(B)]
    neg_txt = [torch.multinomial(w_i2t[b], 1).item() for b in range(B)]
    return neg_img, neg_txt


def skip_in_dry_run(B: int, dt: str) -> None:
    if DRY and (B, dt) != (256, "fp32"):
        pytest.skip("dry run: one case (at tiny size)")


def itc_provider(name: str, B: int, dtype):
    """call(feats, queues, temp) -> loss, having sampled the negatives; pytest.skip if unavailable."""
    if name in ("original", "reference", "compile"):
        if name == "compile" and (DRY or B != 256 or dtype != torch.bfloat16):
            pytest.skip("torch.compile is timed at B = 256 in bf16 only (a compilation per case)")
        loss_fn = torch.compile(ref.itc_loss) if name == "compile" else ref.itc_loss

        def call(feats, queues, temp):
            with autocast(dtype):
                loss, s_i2t, s_t2i = loss_fn(*feats, *queues, temp, ALPHA, return_logits=True)
            Bn = feats[0].shape[0]
            if name == "original":
                original_negatives(s_i2t[:, :Bn], s_t2i[:, :Bn])
            else:
                ref.sample_hard_negatives(s_t2i[:, :Bn].detach(), s_i2t[:, :Bn].detach())
            return loss
        return call
    if name == "triton":
        if not CUDA:
            pytest.skip("the Triton kernels need CUDA here (the interpreter is for tests)")
        from blipfast.kernels import itc

        def call(feats, queues, temp):
            loss, s_i2t, s_t2i = itc.itc_loss(*feats, *queues, temp, ALPHA)
            itc.sample_hard_negatives(s_i2t, s_t2i)
            return loss
        return call
    if name == "inf_cl":
        try:
            from inf_cl import cal_inf_loss
        except ImportError as e:
            pytest.skip(f"inf-cl not importable: {e}")

        def call(feats, queues, temp):
            # hard targets over [in-batch | queue] only: no momentum distillation, no sampling
            Bn = feats[0].shape[0]
            labels = torch.arange(Bn, device=DEVICE)
            k_t = torch.cat([feats[3], queues[1].T.to(feats[3].dtype)])  # (B + Q, E) copy, as inf-cl needs rows
            k_i = torch.cat([feats[2], queues[0].T.to(feats[2].dtype)])
            scale = 1.0 / temp
            return (cal_inf_loss(feats[0], k_t, labels=labels, scale=scale).mean()
                    + cal_inf_loss(feats[1], k_i, labels=labels, scale=scale).mean()) / 2
        return call
    raise ValueError(name)


def itc_flops(B):
    B, Q, E, _, _ = sizes(B)
    return 2 * 2 * B * (B + Q) * E * 3  # per direction: s and s_m forward, (p - t) @ K backward


def itc_case(benchmark, B, dt, provider):
    skip_in_dry_run(B, dt)
    dtype = DTYPES[dt]
    call = itc_provider(provider, B, dtype)
    feats, queues, temp = itc_inputs(B, dtype)
    with torch.no_grad():
        want = ref.itc_loss(*(f.float() for f in feats), *queues, temp.float(), ALPHA).item()
        try:
            got = call(feats, queues, temp).item()
        except Exception as e:  # a peer whose API or limits do not fit is skipped, ours fails
            if provider == "inf_cl":
                pytest.skip(f"inf-cl rejects the case: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            raise
    err = abs(got - want)
    if provider != "inf_cl":  # inf-cl computes a different (hard-target) loss
        tol = 0.05 * max(1.0, abs(want)) if dtype == torch.bfloat16 else 1e-3 * max(1.0, abs(want))
        assert err <= tol, f"{provider} ITC loss {got} differs from the fp32 reference {want} (> {tol})"

    def run():
        for t in feats[:2] + [temp]:
            t.grad = None
        call(feats, queues, temp).backward()

    Bn, Q, E, _, _ = sizes(B)
    timed(benchmark, run, op="itc+sampling", mode="fwd+bwd", B=Bn, queue=Q, embed=E, dtype=dt,
          precision="bf16" if dtype == torch.bfloat16 else "fp32", flops=itc_flops(B), loss_err=err,
          hard_targets_only=provider == "inf_cl", baseline=provider == "original")


# ---------------------------------------------------------------------------------------------
# LM head + label-smoothed cross-entropy


def lm_inputs(B, dtype, seed=0):
    B, _, _, V, C = sizes(B)
    N = B * (TEXT_LEN - 1)  # shifted next-token rows
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, device=DEVICE).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, C, generator=g, device=DEVICE) * 0.05).to(dtype).requires_grad_(True)
    bias = torch.zeros(V, device=DEVICE).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    labels[torch.rand(N, generator=g, device=DEVICE) < 0.1] = -100  # padding
    return hidden, weight, bias, labels


def lm_provider(name: str, B: int, dtype):
    if name in ("reference", "compile"):
        if name == "compile" and (DRY or B != 256 or dtype != torch.bfloat16):
            pytest.skip("torch.compile is timed at B = 256 in bf16 only (a compilation per case)")
        return torch.compile(ref.lm_cross_entropy) if name == "compile" else ref.lm_cross_entropy
    if name == "triton":
        if not CUDA:
            pytest.skip("the Triton kernels need CUDA here (the interpreter is for tests)")
        from blipfast.kernels.cross_entropy import lm_cross_entropy
        return lm_cross_entropy
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            pytest.skip(f"liger-kernel not importable: {e}")
        fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)
        return lambda h, w, b, y: fn(w, h, y, b)
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            pytest.skip(f"cut-cross-entropy not importable: {e}")
        return lambda h, w, b, y: linear_cross_entropy(h, w, y, bias=b, ignore_index=-100)
    raise ValueError(name)


def lm_case(benchmark, B, dt, provider):
    skip_in_dry_run(B, dt)
    dtype = DTYPES[dt]
    call = lm_provider(provider, B, dtype)
    hidden, weight, bias, labels = lm_inputs(B, dtype)
    with torch.no_grad():
        want = ref.lm_cross_entropy(hidden.float(), weight.float(), bias.float(), labels,
                                    label_smoothing=0.0 if provider == "cce" else 0.1).item()
        try:
            got = call(hidden, weight, bias, labels).item()
        except Exception as e:  # a peer whose API or limits do not fit is skipped, ours fails
            if provider in ("liger", "cce"):
                pytest.skip(f"{provider} rejects the case: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            raise
    err = abs(got - want)
    tol = 0.02 * max(1.0, abs(want)) if dtype == torch.bfloat16 else 1e-3 * max(1.0, abs(want))
    assert err <= tol, f"{provider} LM loss {got} differs from the fp32 reference {want} (> {tol})"

    def run():
        for t in (hidden, weight, bias):
            t.grad = None
        call(hidden, weight, bias, labels).backward()

    N, (V, C) = hidden.shape[0], weight.shape
    timed(benchmark, run, op="lm_head+ce", mode="fwd+bwd", B=sizes(B)[0], rows=N, vocab=V, hidden=C, dtype=dt,
          precision="bf16" if dtype == torch.bfloat16 else "fp32", flops=3 * 2 * N * V * C, loss_err=err,
          label_smoothing=0.0 if provider == "cce" else 0.1, baseline=provider == "reference")


# ---------------------------------------------------------------------------------------------
# the tests, in the order they run: fused LM loss, ITC, then the torch.compile cases


@pytest.mark.parametrize("provider", LM_PROVIDERS)
@pytest.mark.parametrize("B,dt", CASES)
def test_lm(benchmark, B, dt, provider):
    lm_case(benchmark, B, dt, provider)


@pytest.mark.parametrize("provider", ITC_PROVIDERS)
@pytest.mark.parametrize("B,dt", CASES)
def test_itc(benchmark, B, dt, provider):
    itc_case(benchmark, B, dt, provider)


@pytest.mark.parametrize("B,dt", [(256, "bf16")])
def test_lm_compile(benchmark, B, dt):
    benchmark.extra_info["provider"] = "compile"
    lm_case(benchmark, B, dt, "compile")


@pytest.mark.parametrize("B,dt", [(256, "bf16")])
def test_itc_compile(benchmark, B, dt):
    benchmark.extra_info["provider"] = "compile"
    itc_case(benchmark, B, dt, "compile")
