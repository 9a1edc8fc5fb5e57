"""Attention microbenchmarks at BLIP's shapes: blipfast's Triton kernels against every SDPA backend
that accepts the case, xformers and flash-attn when importable, and the plain-PyTorch reference.

    pytest benchmarks/bench_attention.py --benchmark-enable                # all cases (GPU)
    pytest benchmarks/bench_attention.py --benchmark-enable -k "vit_b_197 and fwd+bwd"
    pytest benchmarks/bench_attention.py --benchmark-enable -k dropout     # BLIP's text dropout, 0.1

GPU only: without CUDA every case is skipped, except under BLIPFAST_BENCH_DRY_RUN=1, where tiny
fp32 versions of the cases run on the CPU through the providers that can (reference, SDPA math),
to exercise the code path. Inputs are bf16, laid out as the model holds them (ViT: strided views
of a fused (B, N, 3, H, D) qkv; text: (B, L, H, D) viewed as (B, H, L, D)).

The text, decoder and cross-attention cases run a second time with BLIP's attention dropout
(DROPOUT_CASES, dropout_p = 0.1; `test_attention_dropout`, `test_varlen_attention_dropout`): each
provider draws its own mask, so the check against the reference runs without dropout, and the rows
compare the providers' dropout against each other and against the same case's rows without it.

Each case records in `extra_info` (read by benchmarks/harness.py into result rows; dropout_p is part
of the case):
  p20/p50/p80_ms  device time per call (CUDA events, harness.time_iterations);
  flops           FlashAttention convention: forward 4*B*H*Lq*Lk*D, halved when causal;
                  backward 2.5x forward (5 matmuls, one of them recomputing QK^T); fwd+bwd 3.5x;
  bytes           the memory floor, each tensor touched once at the input element size e:
                    fwd  e*(2*B*H*Lq*D + 2*B*H*Lk*D) + 4*B*H*Lq     (read q, k, v; write o; fp32 LSE)
                    bwd  e*(4*B*H*Lq*D + 4*B*H*Lk*D) + 4*B*H*Lq     (read q, o, dO, k, v, LSE;
                                                                      write dq, dk, dv)
                    fwd+bwd the sum; plus B*Lk bytes when a key padding mask is read;
  hbm_peak_gbps   the card's HBM bandwidth (table below): the row's gbps / hbm_peak_gbps is the
                  fraction of the memory floor achieved.
Before timing, each provider's forward is checked against the fp32 reference on the case's
inputs; a provider that is wrong fails its test instead of producing a fast row.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling scripts (harness) are not a package
    sys.path.insert(0, HERE)

import harness  # noqa: E402

from blipfast.kernels import reference as ref  # noqa: E402
from blipfast.ops.attention import (  # noqa: E402
    BackendUnavailable, BackendUnsupported, FlashAttnAttention, XformersAttention,
)

CUDA = torch.cuda.is_available()
DRY = harness.is_dry_run() and not CUDA
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
pytestmark = pytest.mark.skipif(not (CUDA or DRY), reason="attention benchmarks need a CUDA GPU "
                                "(BLIPFAST_BENCH_DRY_RUN=1 runs tiny CPU versions)")

# name: (B, H, Lq, Lk, D, causal, key padding, layout). Batches: ViT at the pre-training batch,
# text at B, cross-attention at 3B (ITM runs positives plus two sets of hard negatives).
CASES = {
    "vit_b_197": (256, 12, 197, 197, 64, False, False, "fused_qkv"),
    "vit_b_577": (64, 12, 577, 577, 64, False, False, "fused_qkv"),
    "vit_l_577": (64, 16, 577, 577, 64, False, False, "fused_qkv"),
    "text_35_padded": (256, 12, 35, 35, 64, False, True, "heads_view"),
    "causal_35_padded": (256, 12, 35, 35, 64, True, True, "heads_view"),
    "cross_35x197": (768, 12, 35, 197, 64, False, False, "heads_view"),
    "cross_35x577": (192, 12, 35, 577, 64, False, False, "heads_view"),
}
PROVIDERS = ("triton", "triton-bwd5", "triton-bwd7", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers",
             "flash_attn", "reference")
# blipfast's backward schedules, forced (plain "triton": the one measured faster per tuning key,
# `flash_attention.FUSED_DQ`): the fused 5-matmul kernel, or the dQ and dK/dV kernels (7 matmuls).
FORCED_BWD = {"triton-bwd5": True, "triton-bwd7": False, "triton-varlen-bwd5": True, "triton-varlen-bwd7": False}
MODES = ("fwd", "bwd", "fwd+bwd")
DRY_CASES = ("vit_b_197", "causal_35_padded", "cross_35x197")  # one per kind keeps the dry run short
# BLIP's text attention trains with dropout 0.1 (BERT's attention_probs_dropout_prob; its ViT has none):
# the text encoder, the causal decoder and the cross-attention, with dropout, fwd and fwd+bwd.
DROPOUT_P = 0.1
DROPOUT_CASES = ("text_35_padded", "causal_35_padded", "cross_35x197")
DROPOUT_MODES = ("fwd", "fwd+bwd")
HBM_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}  # most specific first


def shape_of(case: str):
    B, H, Lq, Lk, D, causal, padded, layout = CASES[case]
    if DRY:  # the same case, small enough for the CPU
        B, H = 2, 2
    return B, H, Lq, Lk, D, causal, padded, layout


def make_inputs(case: str, seed: int = 0):
    B, H, Lq, Lk, D, causal, padded, layout = shape_of(case)
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE, dtype=DTYPE)

    if layout == "fused_qkv":
        q, k, v = rnd(B, Lq, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), strided
    else:
        q, k, v = (rnd(B, L, H, D).transpose(1, 2) for L in (Lq, Lk, Lk))  # (B, H, L, D) views
    mask = None
    if padded:  # BERT right padding: lengths from 8 to Lk
        lens = torch.randint(8, Lk + 1, (B,), generator=g, device=DEVICE)
        mask = torch.arange(Lk, device=DEVICE)[None, :] < lens[:, None]  # (B, Lk) bool
    dout = rnd(B, Lq, H, D).transpose(1, 2)  # the gradient arrives in the merged-heads layout
    return [x.requires_grad_() for x in (q, k, v)], mask, dout


def sdpa_provider(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend_name]

    def call(q, k, v, mask, causal, dropout_p=0.0):
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :]  # (B, 1, 1, Lk)
            if causal:
                tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
                attn_mask = attn_mask & tri  # (B, 1, Lq, Lk)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=causal and attn_mask is None)

    return call


def make_provider(name: str) -> Callable:
    """call(q, k, v, mask, causal, dropout_p=0.0) -> (B, H, Lq, D); pytest.skip when it cannot run here."""
    if name == "reference":
        return lambda q, k, v, mask, causal, dropout_p=0.0: ref.attention(q, k, v, key_padding_mask=mask,
                                                                          causal=causal, dropout_p=dropout_p)
    if name.startswith("sdpa-"):
        if DRY:  # the CPU has only SDPA's math backend: run it once, under the efficient name
            if name != "sdpa-efficient":
                pytest.skip(f"{name} needs CUDA")
            return sdpa_provider("math")
        return sdpa_provider(name.split("-", 1)[1])
    if name == "triton" or name in FORCED_BWD:
        if not CUDA:
            pytest.skip("the Triton kernels need CUDA here (the interpreter is for tests)")
        from blipfast.kernels import attention
        return lambda q, k, v, mask, causal, dropout_p=0.0: attention(q, k, v, key_padding_mask=mask, causal=causal,
                                                                      dropout_p=dropout_p)
    factory = {"xformers": XformersAttention, "flash_attn": FlashAttnAttention}[name]
    try:
        backend = factory()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    return lambda q, k, v, mask, causal, dropout_p=0.0: backend(q, k, v, key_padding_mask=mask, causal=causal,
                                                                dropout_p=dropout_p)


def forced_backward(provider: str, mode: str, run: Callable[[], object]) -> Callable[[], object]:
    """`run` with the provider's backward schedule forced (FORCED_BWD); a forced provider's forward
    is plain "triton"'s, so its fwd rows are skipped."""
    if provider not in FORCED_BWD:
        return run
    if mode == "fwd":
        pytest.skip(f"{provider}: the same forward as triton")
    from blipfast.kernels import flash_attention as fa

    def call():
        before, fa.FUSED_DQ = fa.FUSED_DQ, FORCED_BWD[provider]
        try:
            return run()
        finally:
            fa.FUSED_DQ = before
    return call


def make_run(call: Callable, mode: str, qkv, mask, dout, causal: bool) -> Callable[[], object]:
    """The function timed for `mode`; bwd reuses one forward graph (retain_graph)."""
    if mode == "fwd":
        return lambda: call(*qkv, mask, causal)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(call(*qkv, mask, causal), qkv, dout)
    out = call(*qkv, mask, causal)
    return lambda: torch.autograd.grad(out, qkv, dout, retain_graph=True)


def flops_and_bytes(case: str, mode: str):
    B, H, Lq, Lk, D, causal, padded, _ = shape_of(case)
    e = torch.finfo(DTYPE).bits // 8
    fwd = 4 * B * H * Lq * Lk * D // (2 if causal else 1)
    lse = 4 * B * H * Lq
    mask = B * Lk if padded else 0
    fwd_bytes = e * (2 * B * H * Lq * D + 2 * B * H * Lk * D) + lse + mask
    bwd_bytes = e * (4 * B * H * Lq * D + 4 * B * H * Lk * D) + lse + mask
    return {"fwd": (fwd, fwd_bytes), "bwd": (int(2.5 * fwd), bwd_bytes),
            "fwd+bwd": (int(3.5 * fwd), fwd_bytes + bwd_bytes)}[mode]


def hbm_gbps() -> Optional[float]:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in HBM_GBPS.items() if key in name), None)


_REFERENCE_OUT: Dict[str, torch.Tensor] = {}


def reference_output(case: str) -> torch.Tensor:
    """fp32 reference forward on this case's inputs (computed once per case)."""
    if case not in _REFERENCE_OUT:
        _REFERENCE_OUT.clear()  # one case's worth of memory at a time
        qkv, mask, _ = make_inputs(case)
        causal = shape_of(case)[5]
        with torch.no_grad():
            _REFERENCE_OUT[case] = ref.attention(*(x.float() for x in qkv), key_padding_mask=mask, causal=causal)
    return _REFERENCE_OUT[case]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_attention(benchmark, case, provider, mode):
    if DRY and case not in DRY_CASES:
        pytest.skip("dry run: one case per attention kind")
    run_case(benchmark, case, provider, mode, 0.0)


@pytest.mark.parametrize("dropout_p", [DROPOUT_P])
@pytest.mark.parametrize("mode", DROPOUT_MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_attention_dropout(benchmark, case, provider, mode, dropout_p):
    """The attention BLIP trains with dropout (text, decoder, cross), at its rate: the cost of the
    random mask against each provider's own dropout, and against the same case without it
    (test_attention's rows)."""
    if DRY and case not in DRY_CASES:
        pytest.skip("dry run: one case per attention kind")
    run_case(benchmark, case, provider, mode, dropout_p)


def run_case(benchmark, case: str, provider: str, mode: str, dropout_p: float):
    """Check `provider`'s forward on `case` against the fp32 reference (without dropout: a dropout
    mask is each provider's own draw; tests/kernels check blipfast's given its mask), then time
    `mode` with `dropout_p`."""
    B, H, Lq, Lk, D, causal, padded, layout = shape_of(case)
    call = make_provider(provider)
    qkv, mask, dout = make_inputs(case)
    try:  # probe calls: a provider that rejects the case is skipped, not failed
        with torch.no_grad():
            out = call(*qkv, mask, causal)
            if dropout_p:
                call(*qkv, mask, causal, dropout_p=dropout_p)
    except BackendUnsupported as e:
        pytest.skip(str(e))
    except RuntimeError as e:  # SDPA: "No available kernel", xformers: no operator for the inputs
        pytest.skip(f"{provider} rejects this case: {str(e).splitlines()[0][:200]}")
    max_err = (out.float() - reference_output(case)).abs().max().item()
    del out
    # A fast wrong answer is not a result (cuDNN attention has had bugs at lengths that are not
    # multiples of 128): fail loudly instead of recording it.
    tol = 0.05 if DTYPE == torch.bfloat16 else 1e-4
    assert max_err <= tol, f"{provider} forward differs from the fp32 reference by {max_err:.3g} (> {tol})"

    def timed(q, k, v, m, c):
        return call(q, k, v, m, c, dropout_p=dropout_p)

    run = forced_backward(provider, mode, make_run(timed, mode, qkv, mask, dout, causal))
    warmup, iters = (1, 3) if DRY else (3, 10)
    with harness.peak_memory(DEVICE) as mem:
        times = harness.time_iterations(run, DEVICE, warmup=warmup, iters=iters, max_seconds=0.5)
    p20, p50, p80 = harness.quantiles(times)
    flops, nbytes = flops_and_bytes(case, mode)
    # Only what defines the case goes in here (the harness groups rows by it); provider and mode
    # come from the test parameters. Fraction of the memory floor = row gbps / hbm_peak_gbps.
    benchmark.extra_info.update(
        op="attention", B=B, H=H, Lq=Lq, Lk=Lk, D=D, causal=causal, key_padding=padded, layout=layout,
        dropout_p=dropout_p, dtype=str(DTYPE).replace("torch.", ""), hbm_peak_gbps=hbm_gbps(),
        precision="bf16" if DTYPE == torch.bfloat16 else "fp32", flops=flops, bytes=nbytes,
        p20_ms=p20, p50_ms=p50, p80_ms=p80, peak_mem_mb=mem["mb"],
    )
    benchmark.pedantic(harness.synchronized(run), rounds=1 if DRY else 2, iterations=1, warmup_rounds=0)


# ---------------------------------------------------------------------------------------------
# packed (variable-length) text: blipfast.kernels.varlen_attention against flash-attn's varlen
# function, xformers' block-diagonal masks, and the padded path (Triton / SDPA with a key padding
# mask at the padded length 30) on the same real tokens.
#
#   pytest benchmarks/bench_attention.py --benchmark-enable -k varlen
#
# Lengths: BLIP's caption mix (kernel_audit.caption_lengths: mean about 13 of 30). bytes = the
# memory floor of the real tokens (no pad token), so every provider's gbps is comparable.

VARLEN_CASES = {  # name: (B, H, D, causal, keys per sequence: None = self-attention)
    "packed_text_self": (256, 12, 64, False, None),
    "packed_text_causal": (256, 12, 64, True, None),
    "packed_cross_x197": (768, 12, 64, False, 197),
}
VARLEN_PROVIDERS = ("triton-varlen", "triton-varlen-bwd5", "triton-varlen-bwd7", "triton-padded", "sdpa-padded",
                    "flash_attn-varlen", "xformers-blockdiag")


def varlen_inputs(case: str, seed: int = 0):
    from kernel_audit import caption_lengths

    B, H, D, causal, lk = VARLEN_CASES[case]
    if DRY:
        B, H = 4, 2
    lens_q = (caption_lengths() * (B // 256 + 1))[:B]
    lens_k = lens_q if lk is None else [lk] * B
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def cu(lens):
        return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)

    q = torch.randn(sum(lens_q), H, D, generator=g, device=DEVICE, dtype=DTYPE)
    k = torch.randn(sum(lens_k), H, D, generator=g, device=DEVICE, dtype=DTYPE)
    v = torch.randn(sum(lens_k), H, D, generator=g, device=DEVICE, dtype=DTYPE)
    return [x.requires_grad_() for x in (q, k, v)], lens_q, lens_k, cu(lens_q), cu(lens_k), causal


def _pad(x, cu, lens, L):
    """Packed (total, H, D) -> padded (B, H, L, D) (differentiable)."""
    rows = [torch.nn.functional.pad(x[a:a + n], (0, 0, 0, 0, 0, L - n)) for a, n in zip(cu[:-1].tolist(), lens)]
    return torch.stack(rows).transpose(1, 2)


def varlen_provider(name: str, lens_q, lens_k, cu_q, cu_k, causal, dropout_p: float = 0.0) -> Callable:
    """call(q, k, v) -> packed (total_q, H, D) output (padded providers pad, attend and unpad), with
    attention dropout `dropout_p`."""
    mq, mk = max(lens_q), max(lens_k)
    if name == "triton-varlen" or name in FORCED_BWD:
        if not CUDA:
            pytest.skip("the Triton kernels need CUDA here (the interpreter is for tests)")
        from blipfast.kernels import varlen_attention
        return lambda q, k, v: varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, dropout_p=dropout_p)
    if name in ("triton-padded", "sdpa-padded", "reference"):
        if name == "triton-padded" and not CUDA:
            pytest.skip("the Triton kernels need CUDA here")
        Lq, Lk = (30, 30) if mk <= 30 else (30, mk)
        mask = torch.arange(Lk, device=DEVICE)[None, :] < torch.tensor(lens_k, device=DEVICE)[:, None]
        keep = torch.cat([torch.arange(a, a + n, device=DEVICE) for a, n in zip(range(0, Lq * len(lens_q), Lq),
                                                                                 lens_q)])
        if name == "triton-padded":
            from blipfast.kernels import attention as attn
        elif name == "sdpa-padded":
            attn = make_provider("sdpa-efficient")  # noqa: E731 (SDPA's masked backend)
        else:
            attn = make_provider("reference")

        def call(q, k, v):
            qp, kp, vp = _pad(q, cu_q, lens_q, Lq), _pad(k, cu_k, lens_k, Lk), _pad(v, cu_k, lens_k, Lk)
            out = attn(qp, kp, vp, mask, causal, dropout_p=dropout_p) if name != "triton-padded" else \
                attn(qp, kp, vp, key_padding_mask=mask, causal=causal, dropout_p=dropout_p)
            return out.transpose(1, 2).reshape(-1, *q.shape[1:])[keep]
        return call
    if name == "flash_attn-varlen":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            pytest.skip("flash-attn is not installed")
        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, dropout_p=dropout_p, causal=causal)
    if name == "xformers-blockdiag":
        try:
            from xformers.ops import fmha
        except ImportError:
            pytest.skip("xformers is not installed")
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens_q, lens_k)
        if causal:
            bias = bias.make_causal()
        return lambda q, k, v: fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias,
                                                               p=dropout_p)[0]
    raise ValueError(name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_attention(benchmark, case, provider, mode):
    if DRY and provider not in ("sdpa-padded",):
        pytest.skip("dry run: only the padded SDPA path runs on the CPU")
    run_varlen_case(benchmark, case, provider, mode, 0.0)


@pytest.mark.parametrize("dropout_p", [DROPOUT_P])
@pytest.mark.parametrize("mode", DROPOUT_MODES)
@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_attention_dropout(benchmark, case, provider, mode, dropout_p):
    """Packed text with BLIP's attention dropout (see test_attention_dropout)."""
    if DRY and provider not in ("sdpa-padded",):
        pytest.skip("dry run: only the padded SDPA path runs on the CPU")
    run_varlen_case(benchmark, case, provider, mode, dropout_p)


def run_varlen_case(benchmark, case: str, provider: str, mode: str, dropout_p: float):
    """Check `provider` on packed `case` against the fp32 reference (without dropout), then time `mode`
    with `dropout_p`."""
    qkv, lens_q, lens_k, cu_q, cu_k, causal = varlen_inputs(case)
    call = varlen_provider(provider, lens_q, lens_k, cu_q, cu_k, causal)
    with torch.no_grad():
        out = call(*qkv)
        exact = varlen_provider("reference", lens_q, lens_k, cu_q, cu_k, causal)(*(x.float() for x in qkv))
    max_err = (out.float() - exact).abs().max().item()
    tol = 0.05 if DTYPE == torch.bfloat16 else 1e-4
    assert max_err <= tol, f"{provider} differs from the fp32 reference by {max_err:.3g} (> {tol})"
    dout = torch.randn_like(out)
    if dropout_p:
        call = varlen_provider(provider, lens_q, lens_k, cu_q, cu_k, causal, dropout_p)
    run = forced_backward(provider, mode, make_run(lambda q, k, v, _m, _c: call(q, k, v), mode, qkv, None, dout,
                                                   causal))
    warmup, iters = (1, 3) if DRY else (3, 10)
    with harness.peak_memory(DEVICE) as mem:
        times = harness.time_iterations(run, DEVICE, warmup=warmup, iters=iters, max_seconds=0.5)
    p20, p50, p80 = harness.quantiles(times)
    B, H, D = len(lens_q), qkv[0].shape[1], qkv[0].shape[2]
    e = torch.finfo(DTYPE).bits // 8
    pairs = sum(min(i + 1, lk) if causal else lk for lq, lk in zip(lens_q, lens_k) for i in range(lq))
    fwd = 4 * H * pairs * D
    tq, tk = sum(lens_q), sum(lens_k)
    fwd_bytes = e * H * D * (2 * tq + 2 * tk) + 4 * H * tq
    bwd_bytes = e * H * D * (4 * tq + 4 * tk) + 4 * H * tq
    flops, nbytes = {"fwd": (fwd, fwd_bytes), "bwd": (int(2.5 * fwd), bwd_bytes),
                     "fwd+bwd": (int(3.5 * fwd), fwd_bytes + bwd_bytes)}[mode]
    benchmark.extra_info.update(
        op="varlen_attention", B=B, H=H, Lq=max(lens_q), Lk=max(lens_k), D=D, causal=causal,
        total_q=tq, total_k=tk, layout="packed", dropout_p=dropout_p, dtype=str(DTYPE).replace("torch.", ""),
        hbm_peak_gbps=hbm_gbps(), precision="bf16" if DTYPE == torch.bfloat16 else "fp32", flops=flops,
        bytes=nbytes, p20_ms=p20, p50_ms=p50, p80_ms=p80, peak_mem_mb=mem["mb"],
    )
    benchmark.pedantic(harness.synchronized(run), rounds=1 if DRY else 2, iterations=1, warmup_rounds=0)
