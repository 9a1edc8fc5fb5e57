"""`blipfast.kernels.varlen_attention` (packed sequences, cumulative lengths) against the fp64
`reference.varlen_attention`, and the dropout of the attention kernel family.

Under the interpreter (CPU) each program instance costs ~10-20 ms, so the packed totals stay small;
odd lengths (1, 13, the tails of 197 and 577), several sequences per query tile, empty sequences,
causal and cross attention are each covered. Tolerances follow the flash-attention rule used in
test_attention.py: error vs fp64 <= 2x PyTorch's own error in the same dtype + a small atol.
"""
import importlib
import math

import pytest
import torch

import blipfast.kernels as K
from blipfast.kernels import reference as ref

from tests.kernels.test_attention import ATOL, DEVICE, assert_within

pytestmark = pytest.mark.kernels  # also run under triton 3.6, the GPU machine's (scripts/test.sh)

fa = importlib.import_module("blipfast.kernels.flash_attention")
attn_mod = importlib.import_module("blipfast.kernels.attention")


def cu_of(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)


def make_packed(lens_q, lens_k, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(sum(lens_k), H, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(sum(lens_k), H, D, generator=g).to(DEVICE, dtype)
    return q, k, v, cu_of(lens_q), cu_of(lens_k)


def run_varlen(q, k, v, cu_q, cu_k, dout, causal, config=None, dropout_p=0.0, seed=0):
    """Kernel output and grads (through the public op, or the launchers with a forced `config`)."""
    mq = int((cu_q[1:] - cu_q[:-1]).max())
    mk = int((cu_k[1:] - cu_k[:-1]).max())
    if config is None and dropout_p == 0.0:
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = K.varlen_attention(qq, kk, vv, cu_q, cu_k, mq, mk, causal=causal)
        out.backward(dout)
        return out.detach(), qq.grad, kk.grad, vv.grad
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = fa.varlen_forward(q, k, v, cu_q, cu_k, mq, mk, causal, dropout_p, scale, seed, config=config)
    return (out, *fa.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal, dropout_p, scale, seed,
                                     config=config))


def run_ref(q, k, v, cu_q, cu_k, dout, causal, dtype, dropout_p=0.0, masks=None):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = ref.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, dropout_p=dropout_p, dropout_masks=masks)
    out.backward(dout.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def check_varlen(lens_q, lens_k, H, D, causal, dtype, config=None):
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, H, D, dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    got = run_varlen(q, k, v, cu_q, cu_k, dout, causal, config)
    exact = run_ref(q, k, v, cu_q, cu_k, dout, causal, torch.float64)
    same = run_ref(q, k, v, cu_q, cu_k, dout, causal, dtype)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, same):
        torch_err = (t.double() - e).abs().max().item() if e.numel() else 0.0
        assert_within(a, e, 2 * torch_err + ATOL[dtype] * max(1.0, e.abs().max().item() if e.numel() else 0.0), name)
    return got


# (lens_q, lens_k (None = self), H, D, causal)
TEXT = [13, 1, 30, 5, 17, 13, 2, 9, 13, 24, 7]  # caption-like lengths: many per 64-row tile
CASES = {
    "text_self": (TEXT, None, 2, 32, False),
    "text_causal": (TEXT, None, 2, 32, True),
    "cross_text_x197": ([13, 1, 20], [197, 197, 197], 1, 64, False),
    "vit_197_tail": ([197, 197], None, 1, 32, False),
    "empty_sequences": ([5, 0, 7, 3], [4, 6, 0, 9], 2, 16, False),
    "causal_lq_ne_lk": ([9, 20, 3], [14, 6, 3], 1, 16, True),
    "single_token": ([1], None, 2, 32, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_varlen_matches_reference(case, dtype):
    lens_q, lens_k, H, D, causal = CASES[case]
    check_varlen(lens_q, lens_k if lens_k is not None else lens_q, H, D, causal, dtype)


def test_varlen_vit_577_tail():
    check_varlen([577], [577], 1, 16, False, torch.float16)


@pytest.mark.parametrize("config", [(16, 32), (32, 16), (128, 64)], ids=["bm16_bn32", "bm32_bn16", "bm128_bn64"])
def test_varlen_tilings(config):
    """Other tilings pack differently (more or fewer sequences per tile, chunked long sequences)."""
    check_varlen(TEXT + [70], TEXT + [40], 1, 32, True, torch.float32, config=config)


def test_varlen_strided_views_of_a_fused_qkv():
    """q, k, v as views of one packed (total, 3, H, D) projection (row stride 3 H D), causal."""
    lens = [13, 1, 30, 7]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lens), 3, 2, 32, generator=g).to(DEVICE)
    q, k, v = qkv.unbind(1)
    cu = cu_of(lens)
    dout = torch.randn(q.shape, generator=g).to(DEVICE)
    got = run_varlen(q, k, v, cu, cu, dout, True)
    exact = run_ref(q, k, v, cu, cu, dout, True, torch.float64)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exact):
        assert_within(a, e, 1e-5 * max(1.0, e.abs().max().item()), name)


def test_varlen_equals_padded_attention():
    """The packed call equals the padded `attention` with a key padding mask on the real rows."""
    lens = [13, 1, 30, 7]
    q, k, v, cu, _ = make_packed(lens, lens, 2, 32, torch.float32)
    L = max(lens)
    mask = torch.arange(L, device=DEVICE)[None, :] < torch.tensor(lens, device=DEVICE)[:, None]
    pad = lambda x: torch.stack([torch.nn.functional.pad(x[a:b], (0, 0, 0, 0, 0, L - (b - a)))  # noqa: E731
                                 for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]).transpose(1, 2)
    dense = K.attention(pad(q), pad(k), pad(v), key_padding_mask=mask, causal=True)  # (B, H, L, D)
    packed = K.varlen_attention(q, k, v, cu, cu, L, L, causal=True)
    for b, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert_within(packed[a:e], dense[b, :, :e - a].transpose(0, 1), 1e-6, f"sequence {b}")


# ---------------------------------------------------------------------------------------------
# the schedule: whole short sequences share a tile; nothing is read twice or skipped


@pytest.mark.parametrize("block,align", [(64, 1), (64, 16), (32, 1), (128, 1)])
def test_schedule_covers_every_row_once_and_packs_short_sequences(block, align):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(0, 31, (200,), generator=g).tolist() + [1, 30, 0]
    cu = cu_of(lens).cpu()
    total, mx = int(cu[-1]), max(lens)
    tiles = fa.varlen_schedule(cu, total, mx, block, align).tolist()
    covered = torch.zeros(total, dtype=torch.int64)
    for lo, hi in tiles:
        assert lo <= hi
        covered[lo:hi] += 1
        assert hi - (lo - lo % align) <= block, "a tile spans more rows than the block"
    assert torch.equal(covered, torch.ones_like(covered)), "rows covered not exactly once"
    starts = set(cu.tolist())
    for lo, hi in tiles:  # tiles begin and end at sequence boundaries: no sequence is split
        assert lo == hi or (lo in starts and hi in starts)
    if align == 1 and block >= 2 * mx:  # several sequences per tile on average
        assert sum(hi > lo for lo, hi in tiles) < len(lens) / 2


def test_schedule_chunks_long_sequences():
    cu = cu_of([197, 5, 577]).cpu()
    tiles = [(lo, hi) for lo, hi in fa.varlen_schedule(cu, 779, 577, 64, 16).tolist() if hi > lo]
    assert sum(hi - lo for lo, hi in tiles) == 779
    assert all(hi - (lo - lo % 16) <= 64 for lo, hi in tiles)


# ---------------------------------------------------------------------------------------------
# dropout: the mask's statistics, and gradients against the reference given the kernel's mask


def test_varlen_dropout_gradients_use_the_forward_mask():
    p, lens_q, lens_k = 0.2, [13, 1, 30, 5, 17], [20, 3, 30, 5, 40]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, 2, 32, torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    for causal in (False, True):
        got = run_varlen(q, k, v, cu_q, cu_k, dout, causal, dropout_p=p, seed=1234)
        masks = fa.varlen_dropout_keep_masks(1234, cu_q, cu_k, 2, p)
        exact = run_ref(q, k, v, cu_q, cu_k, dout, causal, torch.float64, fa.effective_dropout_p(p), masks)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, exact):
            assert_within(a, e, 1e-5 * max(1.0, e.abs().max().item()), f"{name} causal={causal}")
        no_drop = ref.varlen_attention(q, k, v, cu_q, cu_k, causal=causal)
        assert (got[0] - no_drop).abs().max() > 1e-2  # the dropout did something


def test_varlen_public_call_draws_the_seed_like_attention():
    p, lens = 0.3, [13, 5, 30]
    q, k, v, cu, _ = make_packed(lens, lens, 2, 16, torch.float32)
    torch.manual_seed(7)
    out = K.varlen_attention(q, k, v, cu, cu, 30, 30, dropout_p=p)
    torch.manual_seed(7)
    masks = fa.varlen_dropout_keep_masks(int(attn_mod.draw_dropout_seed()), cu, cu, 2, p)
    exact = ref.varlen_attention(q.double(), k.double(), v.double(), cu, cu, dropout_p=fa.effective_dropout_p(p),
                                 dropout_masks=masks)
    assert_within(out, exact, 1e-5, "out")


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(p):
    """Kept fraction within 5 sigma of 1 - effective p, and no correlation beyond 5 / sqrt(n)
    between elements sharing a Philox call (neighbouring bytes and words), neighbouring rows and
    columns across calls, heads, and batch rows. n is the number of pairs in each comparison."""
    pe = fa.effective_dropout_p(p)
    keep = attn_mod.dropout_keep_mask(99, (4, 4, 64, 128), p, device=DEVICE).cpu()
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - pe)) <= 5 * math.sqrt(pe * (1 - pe) / n)
    pairs = {
        "adjacent bytes of a word": (keep[..., 0::4], keep[..., 1::4]),
        "same byte of adjacent words": (keep[..., 0::16], keep[..., 4::16]),
        "adjacent Philox calls": (keep[..., 0:64], keep[..., 16:80]),
        "adjacent rows": (keep[:, :, :-1], keep[:, :, 1:]),
        "heads": (keep[:, 0], keep[:, 1]),
        "batch rows": (keep[0], keep[1]),
    }
    for name, (a, b) in pairs.items():
        bound = 5 / math.sqrt(a.numel())
        c = _corr(a, b)
        assert abs(c) <= bound, f"{name}: correlation {c:.4f} > {bound:.4f}"


def test_dropout_draws_are_uniform():
    """The 16-bit draws behind the mask are uniform: the kept fraction at thresholds t/65536
    spread over the range (15 of them, the low byte included) matches 1 - t/65536 (chi-square
    over the thresholds, 0.1% level)."""
    stats = []
    for t in [1 + 4369 * i + 255 * (i % 2) for i in range(15)]:
        q = t / 65536
        keep = attn_mod.dropout_keep_mask(5, (1, 2, 64, 64), q, device=DEVICE)
        n, kept = keep.numel(), int(keep.sum())
        expect = n * (1 - q)
        stats.append((kept - expect) ** 2 / (n * q * (1 - q)))  # binomial variance n p (1 - p)
    assert sum(stats) < 39.25, f"chi-square {sum(stats):.1f} over {len(stats)} thresholds"  # chi2(15) 99.9%


def test_effective_dropout_p():
    assert fa.effective_dropout_p(0.0) == 0.0
    assert fa.effective_dropout_p(0.1) == 6554 / 65536  # 0.100006: BERT's rate, not 26/256 = 0.1016
    assert abs(fa.effective_dropout_p(0.1) - 0.1) < 1e-5
    assert fa.effective_dropout_p(0.25) == 0.25
    assert fa.effective_dropout_p(0.99999) == 65535 / 65536


# ---------------------------------------------------------------------------------------------
# torch.compile and bad inputs


def test_varlen_torch_compile_fullgraph_matches_eager():
    lens = [5, 1, 9]
    q, k, v, cu, _ = make_packed(lens, lens, 1, 16, torch.float32)

    def f(q, k, v):
        return K.varlen_attention(q, k, v, cu, cu, 9, 9, causal=True) * 2

    compiled = torch.compile(f, fullgraph=True)
    q1, k1, v1 = (x.detach().requires_grad_() for x in (q, k, v))
    out = compiled(q1, k1, v1)
    out.sum().backward()
    exact = run_ref(q, k, v, cu, cu, torch.full(q.shape, 2.0), True, torch.float64)
    assert_within(out.detach(), 2 * exact[0], 1e-5, "compiled out")
    for name, a, e in zip(("dq", "dk", "dv"), (q1.grad, k1.grad, v1.grad), exact[1:]):
        assert_within(a, e, 1e-5, f"compiled {name}")


def _bad_varlen():
    q, k, v, cu, _ = make_packed([3, 5], [3, 5], 2, 16, torch.float32)
    return {
        "4d": ((q[None], k, v, cu, cu, 5, 5), "must be 3-D"),
        "heads": ((q, k[:, :1], v[:, :1], cu, cu, 5, 5), r"must share \(H, D\)"),
        "kv_total": ((q, k, v[:4], cu, cu, 5, 5), "same total length"),
        "dtype": ((q.half(), k, v, cu, cu, 5, 5), "share a dtype"),
        "cu_dtype": ((q, k, v, cu.long(), cu, 5, 5), "int32"),
        "cu_count": ((q, k, v, cu, cu[:2], 5, 5), "must both be"),
        "cu_total": ((q, k, v, cu - 0, torch.tensor([0, 3, 7], dtype=torch.int32), 5, 5), "packed length 8"),
        "cu_start": ((q, k, v, cu + 1, cu, 5, 5), "rise from 0"),
        "max_too_small": ((q, k, v, cu, cu, 4, 5), "more than max_seqlen_q = 4"),
        "max_not_int": ((q, k, v, cu, cu, 5.0, 5), "max_seqlen_q must be a non-negative int"),
        "head_dim": ((*make_packed([3], [3], 1, 48, torch.float32),  3, 3), "head dim 48"),
        "not_tensor": ((q.tolist(), k, v, cu, cu, 5, 5), "must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(_bad_varlen()))
def test_varlen_bad_inputs_raise_clear_errors(case):
    args, match = _bad_varlen()[case]
    with pytest.raises((ValueError, TypeError), match=match):
        K.varlen_attention(*args)


def test_varlen_dropout_p_out_of_range():
    q, k, v, cu, _ = make_packed([3], [3], 1, 16, torch.float32)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        K.varlen_attention(q, k, v, cu, cu, 3, 3, dropout_p=1.0)


# ---------------------------------------------------------------------------------------------
# GPU: bf16/fp16 at BLIP sizes, the flash-attention rule against fp32 math


GPU_VARLEN = {
    "text_self": (256, None, False),
    "text_causal": (256, None, True),
    "cross_text_x197": (256, 197, False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_VARLEN))
def test_gpu_varlen_matches_reference(case, dtype):
    B, lk, causal = GPU_VARLEN[case]
    g = torch.Generator().manual_seed(0)
    lens_q = torch.randint(5, 31, (B,), generator=g).tolist()
    lens_k = lens_q if lk is None else [lk] * B
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, 12, 64, dtype)
    dout = torch.randn_like(q)
    got = run_varlen(q, k, v, cu_q, cu_k, dout, causal)
    exact = run_ref(q, k, v, cu_q, cu_k, dout, causal, torch.float32)
    low = run_ref(q, k, v, cu_q, cu_k, dout, causal, dtype)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, low):
        torch_err = (t.float() - e).abs().max().item()
        assert_within(a, e, 2 * torch_err + ATOL[dtype] * max(1.0, e.abs().max().item()), name)


@pytest.mark.gpu
def test_gpu_varlen_dropout_matches_reference_given_mask():
    p, lens = 0.1, torch.randint(5, 31, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    q, k, v, cu, _ = make_packed(lens, lens, 12, 64, torch.bfloat16)
    dout = torch.randn_like(q)
    got = run_varlen(q, k, v, cu, cu, dout, True, dropout_p=p, seed=77)
    masks = fa.varlen_dropout_keep_masks(77, cu, cu, 12, p)
    pe = fa.effective_dropout_p(p)
    exact = run_ref(q, k, v, cu, cu, dout, True, torch.float32, pe, masks)
    low = run_ref(q, k, v, cu, cu, dout, True, torch.bfloat16, pe, masks)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, low):
        torch_err = (t.float() - e).abs().max().item()
        assert_within(a, e, 2 * torch_err + ATOL[torch.bfloat16] * max(1.0, e.abs().max().item()), name)
