"""The fused Triton attention (`blipfast.kernels.attention`) against the fp64 reference.

On a CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), about
10-20 ms per program instance: shapes here use few (batch, head) pairs. Tolerances follow the
flash-attention rule: the kernel's error against an fp64 reference may be at most twice PyTorch's
own error in the same dtype (the reference run in that dtype), plus a small atol. GPU-marked tests
repeat the grid in fp16/bf16 at BLIP's real sizes.
"""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import blipfast.kernels as K
from blipfast.kernels import reference as ref
from tests.helpers import assert_close

pytestmark = pytest.mark.kernels  # also run under triton 3.6, the GPU machine's (scripts/test.sh)

fa = importlib.import_module("blipfast.kernels.flash_attention")
attn_mod = importlib.import_module("blipfast.kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ---------------------------------------------------------------------------------------------
# helpers


def make_qkv(B, H, Lq, Lk, D, dtype, layout="contiguous", seed=0):
    """q (B, H, Lq, D), k/v (B, H, Lk, D) in one of the layouts the model produces."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    if layout == "fused_qkv":  # ViT: qkv (B, N, 3, H, D) permuted to three (B, H, N, D) views
        assert Lq == Lk
        q, k, v = rnd(B, Lq, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "heads_view":  # BERT: (B, L, H, D) viewed as (B, H, L, D)
        q = rnd(B, Lq, H, D).transpose(1, 2)
        k = rnd(B, Lk, H, D).transpose(1, 2)
        v = rnd(B, Lk, H, D).transpose(1, 2)
    elif layout == "strided_d":  # every other element of the head dim: stride_d != 1
        q = rnd(B, H, Lq, 2 * D)[..., ::2]
        k = rnd(B, H, Lk, 2 * D)[..., ::2]
        v = rnd(B, H, Lk, 2 * D)[..., ::2]
    else:
        q, k, v = rnd(B, H, Lq, D), rnd(B, H, Lk, D), rnd(B, H, Lk, D)
    return q, k, v


def make_mask(kind, B, Lk, seed=1):
    """None; 'padded': batch 0 has all keys masked, batch 1 right padding, others random;
    'prefix': right padding of varying length (BERT's attention_mask)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "prefix":
        lens = torch.randint(1, Lk + 1, (B,), generator=g)
        lens[0] = max(1, Lk // 2)
        return (torch.arange(Lk)[None, :] < lens[:, None]).to(DEVICE)
    m = torch.rand(B, Lk, generator=g) > 0.3
    m[0] = False  # every query of batch 0 attends to nothing
    if B > 1:
        m[1] = torch.arange(Lk) < max(1, Lk - 3)
    return m.to(DEVICE)


def run_kernel(q, k, v, dout, mask, causal, scale=None, config=None):
    """Kernel output and grads; with `config` the launchers are called with that tiling."""
    if config is None:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = K.attention(q, k, v, key_padding_mask=mask, causal=causal, softmax_scale=scale)
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    out, lse = fa.forward(q, k, v, mask, causal, 0.0, scale, 0, config=config)
    return (out, *fa.backward(dout, q, k, v, out, lse, mask, causal, 0.0, scale, 0, config=config))


def run_reference(q, k, v, dout, mask, causal, dtype, scale=None, dropout_p=0.0, dropout_mask=None):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = ref.attention(q, k, v, key_padding_mask=mask, causal=causal, softmax_scale=scale,
                        dropout_p=dropout_p, dropout_mask=dropout_mask)
    out.backward(dout.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def check_against_reference(q, k, v, mask, causal, scale=None, config=None, seed=3):
    """Output, dq, dk, dv within 2x PyTorch's own error in q's dtype (+ atol) of the fp64 reference."""
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    got = run_kernel(q, k, v, dout, mask, causal, scale, config)
    exact = run_reference(q, k, v, dout, mask, causal, torch.float64, scale)
    torch_same_dtype = run_reference(q, k, v, dout, mask, causal, dtype, scale)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, torch_same_dtype):
        torch_err = (t.double() - e).abs().max().item()
        assert_close(name, a, e, 2 * torch_err + ATOL[dtype] * max(1.0, e.abs().max().item()))
    return got


# ---------------------------------------------------------------------------------------------
# forward and gradients against the fp64 reference

# (B, H, Lq, Lk, D, causal, mask kind, layout)
CASES = {
    "single_token": (1, 2, 1, 1, 32, False, None, "contiguous"),
    "text_35": (1, 2, 35, 35, 64, False, "prefix", "heads_view"),
    "vit_197_fused_qkv": (1, 1, 197, 197, 64, False, None, "fused_qkv"),
    "causal_35_padded": (2, 1, 35, 35, 64, True, "prefix", "heads_view"),
    "cross_35x197": (2, 1, 35, 197, 64, False, None, "heads_view"),
    "cross_35x197_masked": (2, 1, 35, 197, 32, False, "padded", "contiguous"),
    "self_masked_empty_rows": (2, 1, 35, 35, 32, False, "padded", "contiguous"),
    "causal_cross_odd": (2, 1, 37, 20, 32, True, "padded", "strided_d"),
    "causal_lq_lt_lk": (1, 1, 20, 45, 16, True, None, "contiguous"),
    "head_dim_128": (1, 1, 35, 35, 128, False, None, "contiguous"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, dtype, backward_path):
    B, H, Lq, Lk, D, causal, mask_kind, layout = CASES[case]
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype, layout)
    check_against_reference(q, k, v, make_mask(mask_kind, B, Lk), causal)


@pytest.mark.parametrize("config", [(16, 32), (32, 16), (16, 64)], ids=["bm16_bn32", "bm32_bn16", "bm16_bn64"])
def test_tilings_where_blocks_differ(config, backward_path):
    """Causal bounds (first/last tile per block) with BLOCK_M != BLOCK_N, ragged tails, a mask."""
    q, k, v = make_qkv(2, 1, 45, 38, 32, torch.float32)
    check_against_reference(q, k, v, make_mask("padded", 2, 38), causal=True, config=config)


def test_thin_tails_run_as_a_second_launch(backward_path):
    """69 queries x 67 keys in 32-wide tiles: 64 + a 5-row (3-key) tail launched with 16-wide
    tiles (`thin_tail_split`), causal and masked."""
    assert [fa.thin_tail_split(n, 64) for n in (197, 577, 35, 100, 64, 70)] == [192, 576, 35, 100, 64, 64]
    q, k, v = make_qkv(2, 1, 69, 67, 32, torch.float32)
    check_against_reference(q, k, v, make_mask("padded", 2, 67), causal=True, config=(32, 32))


def test_custom_scale(backward_path):
    q, k, v = make_qkv(1, 1, 35, 35, 32, torch.float32)
    check_against_reference(q, k, v, None, False, scale=0.37)


def test_rows_without_keys_are_zero_with_zero_grads(backward_path):
    q, k, v = make_qkv(2, 2, 9, 12, 16, torch.float32)
    mask = make_mask("padded", 2, 12)  # batch 0: no key at all
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = K.attention(q, k, v, key_padding_mask=mask)
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for name, g in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.equal(g[0], torch.zeros_like(g[0])), name
        assert torch.isfinite(g).all(), name
    assert out[1].abs().sum() > 0


def test_output_layout_and_determinism(backward_path):
    """Output stored (B, L, H, D) (the merge of heads is a view); two backwards are bitwise equal."""
    q, k, v = make_qkv(1, 2, 35, 35, 32, torch.float32, "heads_view")
    mask = make_mask("prefix", 1, 35)
    grads = []
    for _ in range(2):
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = K.attention(qq, kk, vv, key_padding_mask=mask, causal=True)
        out.backward(torch.ones_like(out))
        grads.append((qq.grad, kk.grad, vv.grad))
    assert out.transpose(1, 2).is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ---------------------------------------------------------------------------------------------
# dropout


def test_dropout_keep_fraction_and_independence():
    p = fa.effective_dropout_p(0.3)
    keep = attn_mod.dropout_keep_mask(1234, (2, 2, 64, 64), p, device=DEVICE)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep, attn_mod.dropout_keep_mask(1235, (2, 2, 64, 64), p, device=DEVICE))
    assert torch.equal(keep, attn_mod.dropout_keep_mask(1234, (2, 2, 64, 64), p, device=DEVICE))


def test_dropout_expectation_matches_no_dropout():
    """Averaged over 64 heads holding the same q, k, v (each with its own dropout pattern), the
    output approaches the no-dropout output within 6 sigma, sigma from the exact variance."""
    p, n_copies = 0.25, 64
    q, k, v = make_qkv(1, 1, 40, 40, 32, torch.float32)
    expand = lambda x: x.expand(1, n_copies, *x.shape[2:])  # noqa: E731 (stride-0 heads)
    out = K.attention(expand(q), expand(k), expand(v), dropout_p=p)
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32), -1)  # (1, 1, L, L)
    exact = probs @ v.double()
    var = (probs ** 2) @ (v.double() ** 2) * (p / (1 - p))  # per output element, one copy
    sigma = (var / n_copies).sqrt()
    assert_close("mean over copies", out.double().mean(1, keepdim=True), exact, 6 * sigma + 1e-6)  # per element


@pytest.mark.parametrize("causal,mask_kind,Lq,Lk", [(True, "prefix", 35, 35), (False, "padded", 21, 70)],
                         ids=["causal_padded", "cross_masked"])
def test_dropout_gradients_use_the_forward_mask(causal, mask_kind, Lq, Lk, backward_path):
    """The public call's output and gradients equal the reference given the kernel's own mask."""
    p = 0.2
    q, k, v = make_qkv(2, 2, Lq, Lk, 32, torch.float32)
    mask = make_mask(mask_kind, 2, Lk)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    torch.manual_seed(42)
    out = K.attention(qq, kk, vv, key_padding_mask=mask, causal=causal, dropout_p=p)
    out.backward(dout)
    torch.manual_seed(42)
    keep = attn_mod.dropout_keep_mask(attn_mod.draw_dropout_seed(), (2, 2, Lq, Lk), p, device=DEVICE)
    p_eff = fa.effective_dropout_p(p)  # the kernels realise p in steps of 1/256
    exact = run_reference(q, k, v, dout, mask, causal, torch.float64, dropout_p=p_eff, dropout_mask=keep)
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out.detach(), qq.grad, kk.grad, vv.grad), exact):
        assert_close(name, a, e, 1e-5 * max(1.0, e.abs().max().item()))
    # and the dropout did something: the no-dropout output differs
    assert (out.detach() - ref.attention(q, k, v, mask, causal)).abs().max() > 1e-2


@pytest.mark.parametrize("config", [(16, 32), (32, 16), (64, 64)], ids=["bm16_bn32", "bm32_bn16", "bm64_bn64"])
def test_dropout_mask_does_not_depend_on_the_tiling(config, backward_path):
    """Forward, dQ and dK/dV under 16-, 32- and 64-wide query and key tiles (and 16-wide tails)
    regenerate the mask `dropout_keep_mask` returns (a 32 x 32 tiling of its own)."""
    p, seed, Lq, Lk = 0.3, 77, 70, 70
    q, k, v = make_qkv(2, 2, Lq, Lk, 32, torch.float32)
    mask = make_mask("padded", 2, Lk)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    out, lse = fa.forward(q, k, v, mask, True, p, fa.default_scale(32), seed, config=config)
    got = (out, *fa.backward(dout, q, k, v, out, lse, mask, True, p, fa.default_scale(32), seed, config=config))
    keep = attn_mod.dropout_keep_mask(seed, (2, 2, Lq, Lk), p, device=DEVICE)
    exact = run_reference(q, k, v, dout, mask, True, torch.float64, dropout_p=fa.effective_dropout_p(p),
                          dropout_mask=keep)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exact):
        assert_close(f"{name} {config}", a, e, 1e-5 * max(1.0, e.abs().max().item()))


def test_fused_dq_vit_577_ragged_tail_with_dropout_is_deterministic():
    """The fused backward at ViT-L's 577 tokens (9 x 64 + a 1-key thin tail walked in 16-wide key
    tiles, and a 1-row query tail), dropout on: gradients equal the fp64 reference given the
    kernels' mask, and two backwards are bitwise equal (on a GPU this is the check that the fixed
    per-row order of the dQ sums, without atomics, holds; on a CPU that the scratch is initialised)."""
    p, seed, L = 0.1, 11, 577
    q, k, v = make_qkv(1, 1, L, L, 16, torch.float32, "fused_qkv")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out, lse = fa.forward(q, k, v, None, False, p, fa.default_scale(16), seed)
    runs = [fa.backward(dout, q, k, v, out, lse, None, False, p, fa.default_scale(16), seed, fused_dq=True)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    keep = attn_mod.dropout_keep_mask(seed, (1, 1, L, L), p, device=DEVICE)
    exact = run_reference(q, k, v, dout, None, False, torch.float64, dropout_p=fa.effective_dropout_p(p),
                          dropout_mask=keep)
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out, *runs[0]), exact):
        assert_close(name, a, e, 1e-5 * max(1.0, e.abs().max().item()))


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = make_qkv(1, 1, 20, 20, 16, torch.float32)
    mask = make_mask("prefix", 1, 20)

    def f(q, k, v):
        return (K.attention(q, k, v, key_padding_mask=mask, causal=True) * 2).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    q1, k1, v1 = (x.detach().requires_grad_() for x in (q, k, v))
    out = compiled(q1, k1, v1)
    out.sum().backward()
    exact = run_reference(q, k, v, torch.full((1, 1, 20, 16), 2.0), mask, True, torch.float64)
    assert_close("compiled out", out.detach(), 2 * exact[0].sum(-1), 1e-5)
    for name, a, e in zip(("dq", "dk", "dv"), (q1.grad, k1.grad, v1.grad), exact[1:]):
        assert_close(f"compiled {name}", a, e, 1e-5)


# ---------------------------------------------------------------------------------------------
# bad inputs


def _bad_cases():
    q, k, v = make_qkv(1, 2, 8, 8, 16, torch.float32)
    m = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    return {
        "3d": ((q[0], k, v), {}, "must be 4-D"),
        "batch_heads": ((q, k[:, :1], v[:, :1]), {}, "batch and head dims differ"),
        "head_dim_mismatch": ((q, k[..., :8], v), {}, "share the head dim"),
        "kv_length": ((q, k, v[:, :, :5]), {}, "same length"),
        "dtype_mismatch": ((q, k.half(), v), {}, "share a dtype"),
        "float64": ((q.double(), k.double(), v.double()), {}, "float64 is not supported"),
        "head_dim_48": ((*make_qkv(1, 1, 8, 8, 48, torch.float32),), {}, "head dim 48 is not supported"),
        "device_mismatch": ((q, k.to("meta"), v), {}, "one device"),
        "mask_shape": ((q, k, v), {"key_padding_mask": m[:, :5]}, r"must be \(B, Lk\)"),
        "mask_dtype": ((q, k, v), {"key_padding_mask": m.float()}, "must be a bool tensor"),
        "dropout_1": ((q, k, v), {"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
        "not_tensor": ((q.tolist(), k, v), {}, "must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_raise_clear_errors(case):
    args, kwargs, match = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError), match=match):
        K.attention(*args, **kwargs)


def test_autotune_key_names_the_gpu_model():
    """Triton's on-disk tuning cache keys on the architecture (sm_90) only: our key adds the GPU
    model, so an H100's tuning is not reused on an H200 (same sm_90, other bandwidth)."""
    h100 = fa.device_key("NVIDIA H100 80GB HBM3", 132, 85_029_158_912)
    h100_pcie = fa.device_key("NVIDIA H100 PCIe", 114, 85_029_158_912)
    h200 = fa.device_key("NVIDIA H200", 132, 150_754_820_096)
    assert len({h100, h100_pcie, h200}) == 3 and all(0 <= x < 2**31 for x in (h100, h100_pcie, h200))
    assert "DEVICE_KEY" in fa.TUNE_KEY
    for kind in fa._KERNELS:
        assert "DEVICE_KEY" in fa._launcher(kind, True).keys, kind  # the autotuner keys (and caches) on it
        assert "DEVICE_KEY" in fa._KERNELS[kind].arg_names
    q = torch.zeros(1, 1, 4, 16)
    assert fa._common(q, 4, 4, 1, 1, False, 0.0, 0, False, False)["DEVICE_KEY"] == 0  # CPU: not tuned


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter path")
def test_cpu_without_interpreter_is_refused():
    """Without TRITON_INTERPRET, CPU tensors are refused with a pointer to sdpa/reference, and the
    'triton' backend is unavailable."""
    code = (
        "import torch, blipfast.kernels as K\n"
        "from blipfast.ops.attention import resolve_attention, BackendUnavailable\n"
        "x = torch.randn(1, 1, 4, 16)\n"
        "try:\n    K.attention(x, x, x)\nexcept ValueError as e:\n    print('KERNEL:', e)\n"
        "try:\n    resolve_attention('triton')\nexcept BackendUnavailable as e:\n    print('BACKEND:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BLIPFAST_ATTENTION_BACKEND")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "KERNEL:" in res.stdout and "need CUDA tensors" in res.stdout and "'sdpa'" in res.stdout
    assert "BACKEND:" in res.stdout and "needs a CUDA GPU" in res.stdout


# ---------------------------------------------------------------------------------------------
# GPU: BLIP's real sizes in fp16/bf16 with the flash-attention tolerance rule

# (B, H, Lq, Lk, D, causal, mask kind, layout). Few kernel variants (flags x head dim x dtype):
# each costs the autotuner one compile per config on a fresh machine.
GPU_CASES = {
    "vit_b_197": (16, 12, 197, 197, 64, False, None, "fused_qkv"),
    "vit_l_577": (4, 16, 577, 577, 64, False, None, "fused_qkv"),
    "text_35_padded": (32, 12, 35, 35, 64, False, "prefix", "heads_view"),
    "causal_35_padded": (32, 12, 35, 35, 64, True, "prefix", "heads_view"),
    "cross_35x197": (32, 12, 35, 197, 64, False, None, "heads_view"),
    "cross_35x577_masked": (8, 12, 35, 577, 64, False, "padded", "heads_view"),
    "odd_97x203_causal": (4, 4, 97, 203, 64, True, "padded", "contiguous"),
    "hd128_197": (4, 8, 197, 197, 128, False, None, "contiguous"),
}
GPU_GRID = [(c, torch.bfloat16) for c in GPU_CASES] + [(c, torch.float16) for c in ("vit_b_197", "causal_35_padded")]


def check_low_precision(q, k, v, mask, causal, dtype, config=None):
    """The flash-attention rule on a GPU: error vs fp32 math on the same inputs <= 2x PyTorch's own."""
    dout = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    got = run_kernel(q, k, v, dout, mask, causal, config=config)
    exact = run_reference(q, k, v, dout, mask, causal, torch.float32)
    low = run_reference(q, k, v, dout, mask, causal, dtype)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, low):
        torch_err = (t.float() - e).abs().max().item()
        assert_close(name, a, e, 2 * torch_err + ATOL[dtype] * max(1.0, e.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", GPU_GRID, ids=[f"{c}-{str(d)[6:]}" for c, d in GPU_GRID])
def test_gpu_matches_reference(case, dtype):
    B, H, Lq, Lk, D, causal, mask_kind, layout = GPU_CASES[case]
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype, layout)
    check_low_precision(q, k, v, make_mask(mask_kind, B, Lk), causal, dtype)


@pytest.mark.gpu
def test_gpu_every_tuning_config_is_correct():
    """The autotuner may pick any config: check each one (a ragged causal masked case)."""
    q, k, v = make_qkv(4, 4, 97, 203, 64, torch.bfloat16, "heads_view")
    mask = make_mask("padded", 4, 203)
    for kind in ("fwd", "dq", "dkdv"):
        for c in fa.gpu_configs(kind):
            cfg = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            check_low_precision(q, k, v, mask, True, torch.bfloat16, config={kind: cfg})


@pytest.mark.gpu
def test_gpu_fp32_is_ieee_accurate():
    q, k, v = make_qkv(2, 4, 197, 197, 64, torch.float32, "fused_qkv")
    check_against_reference(q, k, v, make_mask("padded", 2, 197), causal=False)


@pytest.mark.gpu
def test_gpu_dropout_matches_reference_given_mask():
    p, (B, H, L, D) = 0.1, (4, 12, 35, 64)
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, "heads_view")
    mask = make_mask("prefix", B, L)
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    torch.manual_seed(0)
    out = K.attention(qq, kk, vv, key_padding_mask=mask, causal=True, dropout_p=p)
    dout = torch.randn_like(out)
    out.backward(dout)
    torch.manual_seed(0)
    keep = attn_mod.dropout_keep_mask(attn_mod.draw_dropout_seed(), (B, H, L, L), p, device=DEVICE)
    p = fa.effective_dropout_p(p)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    exact = run_reference(q, k, v, dout, mask, True, torch.float32, dropout_p=p, dropout_mask=keep)
    low = run_reference(q, k, v, dout, mask, True, torch.bfloat16, dropout_p=p, dropout_mask=keep)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), (out.detach(), qq.grad, kk.grad, vv.grad), exact, low):
        torch_err = (t.float() - e).abs().max().item()
        assert_close(name, a, e, 2 * torch_err + ATOL[torch.bfloat16] * max(1.0, e.abs().max().item()))


@pytest.mark.gpu
def test_gpu_fused_dq_every_config_is_correct_and_deterministic():
    """The fused backward (`fa.backward(fused_dq=True)`) under each of its configs on a ragged
    causal masked bf16 case, with dropout: within the flash-attention rule of the reference given
    the kernels' mask, and bitwise equal over two runs (the per-row order of the dQ sums is fixed
    by the key-tile loop and its barriers: no atomics)."""
    p, seed, (B, H, Lq, Lk, D) = 0.1, 5, (4, 4, 97, 203, 64)
    q, k, v = make_qkv(B, H, Lq, Lk, D, torch.bfloat16, "heads_view")
    mask = make_mask("padded", B, Lk)
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.bfloat16)
    keep = attn_mod.dropout_keep_mask(seed, (B, H, Lq, Lk), p, device=DEVICE)
    p_eff = fa.effective_dropout_p(p)
    exact = run_reference(q, k, v, dout, mask, True, torch.float32, dropout_p=p_eff, dropout_mask=keep)
    low = run_reference(q, k, v, dout, mask, True, torch.bfloat16, dropout_p=p_eff, dropout_mask=keep)
    out, lse = fa.forward(q, k, v, mask, True, p, fa.default_scale(D), seed)
    for c in fa.gpu_configs("dkdv_fused"):
        cfg = {"dkdv_fused": (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)}
        runs = [fa.backward(dout, q, k, v, out, lse, mask, True, p, fa.default_scale(D), seed, config=cfg,
                            fused_dq=True) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(*runs)), cfg
        for name, a, e, t in zip(("dq", "dk", "dv"), runs[0], exact[1:], low[1:]):
            torch_err = (t.float() - e).abs().max().item()
            assert_close(f"{name} {cfg}", a, e, 2 * torch_err + ATOL[torch.bfloat16] * max(1.0, e.abs().max().item()))


# ---------------------------------------------------------------------------------------------
# which backward runs: forced, or measured per tuning key on a GPU (`fa.FUSED_DQ = None`)


def test_measured_backward_choice_takes_the_faster_once_per_key(monkeypatch):
    monkeypatch.setattr(fa, "_FUSED_CHOICE", {})
    timed = []

    def bench(times):
        def run(fn):
            timed.append(fn)
            return times[fn]
        return run

    fused, two = object(), object()
    assert fa._measured_fused_choice(("a",), fused, two, bench({fused: 1.0, two: 2.0})) is True
    assert fa._measured_fused_choice(("b",), fused, two, bench({fused: 3.0, two: 2.0})) is False
    assert len(timed) == 4
    # cached per key: no timing the second time, whatever the clock would say now
    assert fa._measured_fused_choice(("a",), fused, two, bench({fused: 9.0, two: 1.0})) is True
    assert len(timed) == 4


def test_backward_choice_key_and_forcing(monkeypatch):
    """The choice is keyed like the autotuner (shape buckets, flags, GPU model) plus dtype and
    layout; a forced path (argument, then module switch) is never measured; without a GPU (or
    under the interpreter, or in fp32) nothing is measured and the two-kernel path runs."""
    q = torch.zeros(2, 3, 40, 64)
    args = fa._common(q, 40, 40, 2, 3, True, 0.1, 0, True, False)
    key = fa._choice_key(args, torch.bfloat16, False)
    assert key != fa._choice_key(args, torch.float16, False) != fa._choice_key(args, torch.bfloat16, True)
    assert key != fa._choice_key(dict(args, DEVICE_KEY=1), torch.bfloat16, False)
    assert key != fa._choice_key(dict(args, BH_BUCKET=2 * args["BH_BUCKET"]), torch.bfloat16, False)

    def never(*a, **k):
        raise AssertionError("measured")

    monkeypatch.setattr(fa, "_measured_fused_choice", never)
    for module, arg, want in [(None, True, True), (None, False, False), (True, None, True), (False, None, False),
                              (True, False, False), (None, None, False)]:
        monkeypatch.setattr(fa, "FUSED_DQ", module)
        assert fa._use_fused(arg, args, q, False, None, None) is want, (module, arg)


def test_backward_choice_during_cuda_graph_capture(monkeypatch):
    """While a CUDA graph is captured nothing may be timed: a key measured before (a warm-up run)
    keeps its choice, an unmeasured one takes the two-kernel path and stays unmeasured."""
    class FakeCuda:  # stands for a CUDA tensor: only .is_cuda and .dtype are read
        is_cuda, dtype = True, torch.bfloat16

    args = dict(fa._common(torch.zeros(2, 3, 40, 64), 40, 40, 2, 3, False, 0.0, 0, False, False),
                UPCAST=False, INTERPRET=False)
    monkeypatch.setattr(fa, "FUSED_DQ", None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(fa, "_FUSED_CHOICE", {})
    monkeypatch.setattr(fa, "quick_bench", lambda *a, **k: pytest.fail("timed during capture"))
    assert fa._use_fused(None, args, FakeCuda(), False, None, None) is False
    assert fa._FUSED_CHOICE == {}
    fa._FUSED_CHOICE[fa._choice_key(args, torch.bfloat16, False)] = True
    assert fa._use_fused(None, args, FakeCuda(), False, None, None) is True


def test_default_backward_on_cpu_runs_the_two_kernel_path(monkeypatch):
    monkeypatch.setattr(fa, "FUSED_DQ", None)
    kinds = []
    real_launch = fa._launch
    monkeypatch.setattr(fa, "_launch", lambda kind, *a, **k: (kinds.append(kind), real_launch(kind, *a, **k))[1])
    q, k, v = make_qkv(1, 2, 20, 20, 16, torch.float32)
    out, lse = fa.forward(q, k, v, None, False, 0.0, 0.25, 0)
    fa.backward(torch.ones_like(out), q, k, v, out, lse, None, False, 0.0, 0.25, 0)
    assert kinds == ["fwd", "dq", "dkdv"]


@pytest.mark.gpu
def test_gpu_measured_backward_choice_is_cached_and_used(monkeypatch):
    """On a GPU, the default backward times both paths once for the key, caches the winner, and its
    gradients are then bitwise those of the forced winner."""
    monkeypatch.setattr(fa, "FUSED_DQ", None)
    monkeypatch.setattr(fa, "_FUSED_CHOICE", {})
    B, H, L, D, p, seed = 8, 12, 197, 64, 0.0, 3
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, "fused_qkv")
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.bfloat16)
    out, lse = fa.forward(q, k, v, None, False, p, fa.default_scale(D), seed)
    got = fa.backward(dout, q, k, v, out, lse, None, False, p, fa.default_scale(D), seed)
    (choice,) = fa._FUSED_CHOICE.values()
    forced = fa.backward(dout, q, k, v, out, lse, None, False, p, fa.default_scale(D), seed, fused_dq=choice)
    assert all(torch.equal(a, b) for a, b in zip(got, forced))
    print(f"measured backward choice at B={B} H={H} L={L}: {'fused 5-matmul' if choice else 'dq + dkdv'}")
