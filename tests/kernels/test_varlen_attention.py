"""`blipfast.kernels.varlen_attention` (packed sequences, cumulative lengths) against the fp64
`reference.varlen_attention`, and the dropout of the attention kernel family.

Under the interpreter (CPU) each program instance costs ~10-20 ms, so the packed totals stay small;
odd lengths (1, 13, the tails of 197 and 577), several sequences per query tile, empty sequences,
causal and cross attention are each covered. Tolerances follow the flash-attention rule used in
test_attention.py: error vs fp64 <= 2x PyTorch's own error in the same dtype + a small atol.
Gradient tests run on both backwards (the `backward_path` fixture): the dQ and dK/dV kernels, and
the deterministic fused one (`varlen_backward(fused_dq=True)`).
"""
import importlib
import math

import pytest
import torch

import blipfast.kernels as K
from blipfast.kernels import reference as ref
from tests.helpers import assert_close
from tests.kernels.test_attention import ATOL, DEVICE

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
        assert_close(name, a, e, 2 * torch_err + ATOL[dtype] * max(1.0, e.abs().max().item() if e.numel() else 0.0))
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
def test_varlen_matches_reference(case, dtype, backward_path):
    lens_q, lens_k, H, D, causal = CASES[case]
    check_varlen(lens_q, lens_k if lens_k is not None else lens_q, H, D, causal, dtype)


def test_varlen_vit_577_tail(backward_path):
    check_varlen([577], [577], 1, 16, False, torch.float16)


@pytest.mark.parametrize("config", [(16, 32), (32, 16), (128, 64)], ids=["bm16_bn32", "bm32_bn16", "bm128_bn64"])
def test_varlen_tilings(config, backward_path):
    """Other tilings pack differently (more or fewer sequences per tile, chunked long sequences)."""
    check_varlen(TEXT + [70], TEXT + [40], 1, 32, True, torch.float32, config=config)


def test_varlen_strided_views_of_a_fused_qkv(backward_path):
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
        assert_close(name, a, e, 1e-5 * max(1.0, e.abs().max().item()))


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
        assert_close(f"sequence {b}", packed[a:e], dense[b, :, :e - a].transpose(0, 1), 1e-6)


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


def test_fused_schedule_gives_each_sequence_to_one_program():
    """`varlen_fused_schedule`: program p's key tiles [p * group, (p + 1) * group) hold whole key
    sequences, exactly those whose query rows are its span; spans are disjoint and every query row
    of a sequence with keys is in one. Both schedules: packed (short keys) and chunked (197 keys)."""
    g = torch.Generator().manual_seed(2)
    lens_q = torch.randint(0, 31, (40,), generator=g).tolist() + [0, 7]
    for lens_k, block, chunked in ((torch.randint(0, 31, (42,), generator=g).tolist(), 64, False),
                                   ([197] * 40 + [0, 197], 64, True), ([5, 0] * 21, 32, False)):
        cu_q, cu_k = cu_of(lens_q).cpu(), cu_of(lens_k).cpu()
        tiles, spans, group = fa.varlen_fused_schedule(cu_q, cu_k, int(cu_k[-1]), max(lens_k), block)
        assert (group > 1) == chunked and tiles.shape[0] == spans.shape[0] * group
        owner_q = torch.full((int(cu_q[-1]),), -1)
        owner_k = torch.full((int(cu_k[-1]),), -1)
        for p, (qlo, qhi) in enumerate(spans.tolist()):
            assert (owner_q[qlo:qhi] == -1).all(), "query rows owned twice"
            owner_q[qlo:qhi] = p
            for lo, hi in tiles[p * group:(p + 1) * group].tolist():
                assert hi - (lo - lo % 16) <= block
                owner_k[lo:hi] = p
        for b in range(len(lens_q)):  # a sequence's keys and queries have one owner (or none: no keys)
            keys, queries = owner_k[cu_k[b]:cu_k[b + 1]], owner_q[cu_q[b]:cu_q[b + 1]]
            assert keys.numel() == 0 or (keys == keys[0]).all() and keys[0] >= 0
            if keys.numel() and queries.numel():
                assert (queries == keys[0]).all(), f"sequence {b}: keys in program {keys[0]}, queries elsewhere"


def _one_program_at_a_time(monkeypatch, checked):
    """Replace the fused launch by one launch per program (its slice of the schedule), with
    sentinels around it: DELTA NaN and DQACC -0.0 everywhere before each program, and after it
    outside the program's query rows DELTA still NaN, DQACC still -0.0 (adding +0.0, the dQ term of
    a row the keys do not see, turns -0.0 into +0.0: a write shows even when it changes no value),
    and DQ, DK, DV bitwise unchanged outside its rows and keys. Appends each program's span to
    `checked`. On a GPU programs run concurrently, and a write to another program's rows (even of
    +0) can lose that program's update; here they run one by one, so the writes are checked instead."""
    real_launch = fa._launch

    def launch(kind, grid, config, **kw):
        if kind != "dkdv_fused":
            return real_launch(kind, grid, config, **kw)
        tiles, spans, group, H = kw["TILES"], kw["QSPANS"], kw["group"], kw["H"]
        total_q, total_k = kw["DQ"].shape[0], kw["DK"].shape[0]
        for p, (qlo, qhi) in enumerate(spans.tolist()):
            mine = tiles[p * group:(p + 1) * group].clone()
            kw["DELTA"].fill_(float("nan"))
            kw["DQACC"].fill_(-0.0)
            before = {n: kw[n].clone() for n in ("DQ", "DK", "DV")}
            one = {**kw, "TILES": mine, "QSPANS": spans[p:p + 1].clone()}  # program p as program 0 of a 1-program grid
            real_launch(kind, lambda bm, bn: (1, H, 1), config, **one)
            rows = torch.ones(total_q, dtype=torch.bool)
            rows[qlo:qhi] = False  # rows outside the program's span
            keys = torch.ones(total_k, dtype=torch.bool)
            for lo, hi in mine.tolist():
                keys[lo:hi] = False
            assert kw["DELTA"][:, rows].isnan().all(), f"program {p} wrote delta outside rows [{qlo}, {qhi})"
            acc = kw["DQACC"][:, rows]
            assert ((acc == 0) & acc.signbit()).all(), f"program {p} wrote DQACC outside rows [{qlo}, {qhi})"
            assert torch.isfinite(kw["DELTA"][:, qlo:qhi]).all(), f"program {p}: delta of its rows"
            for name, outside in (("DQ", rows), ("DK", keys), ("DV", keys)):
                was, now = before[name][outside], kw[name][outside]
                assert torch.equal(was.view(torch.int32), now.view(torch.int32)), f"program {p} wrote {name} outside"
                assert torch.isfinite(kw[name]).all(), f"program {p}: {name} not finite"
            checked.append((qlo, qhi))

    monkeypatch.setattr(fa, "_launch", launch)


# Lengths not multiples of 16, several sequences per key tile or chunked keys, so that with dropout
# query tiles (rounded down to 16 rows) start inside the sequences of the program before.
FUSED_OWNERSHIP = {
    "packed_self": ([13, 7, 20, 5, 30, 11], None, False),
    "packed_causal": ([13, 7, 20, 5, 30, 11], None, True),
    "chunked_cross_x197": ([13, 7, 20, 9], [197, 197, 197, 197], False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(FUSED_OWNERSHIP))
def test_fused_varlen_programs_write_only_their_own_rows(case, dtype, monkeypatch):
    """The fused backward with dropout, run one program at a time (`_one_program_at_a_time`):
    no program writes delta, dQ, its fp32 scratch, dK or dV outside its own rows and keys (a
    foreign write races with the owner on a GPU), and the gradients still equal the fp64 reference
    given the kernels' dropout mask (programs are independent). fp32 adds dS K with queries on the
    dot's M side, fp16 as K^T dS^T into transposed scratch pointers: both are checked. fp16's
    gradients are held bitwise to the same backward launched as one grid (the interpreter runs its
    programs in turn, so ownership changes nothing there); that backward is held to the reference
    by `check_fused_varlen_dropout`."""
    p, seed, (lens_q, lens_k, causal) = 0.3, 21, FUSED_OWNERSHIP[case]
    lens_k = lens_k or lens_q
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, 2, 16, dtype, seed=4)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
    scale = fa.default_scale(16)
    out, lse = fa.varlen_forward(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, p, scale, seed)
    args = (dout, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k), causal, p, scale, seed)
    whole = fa.varlen_backward(*args, fused_dq=True) if dtype == torch.float16 else None
    checked = []
    _one_program_at_a_time(monkeypatch, checked)
    got = fa.varlen_backward(*args, fused_dq=True)
    foreign = [lo for lo, hi in checked if hi > lo and lo % 16]
    assert len(checked) > 1 and foreign, f"no program whose first query tile holds foreign rows: {checked}"
    if dtype == torch.float16:
        for name, a, w in zip(("dq", "dk", "dv"), got, whole):
            assert torch.equal(a, w), f"{name}: one program at a time differs from the whole grid"
        return
    masks = fa.varlen_dropout_keep_masks(seed, cu_q, cu_k, 2, p)
    exact = run_ref(q, k, v, cu_q, cu_k, dout, causal, torch.float64, fa.effective_dropout_p(p), masks)
    for name, a, e in zip(("dq", "dk", "dv"), got, exact[1:]):
        assert_close(name, a, e, 1e-5 * max(1.0, e.abs().max().item()))


def check_fused_varlen_dropout(lens_q, lens_k, causal, H, D, dtype, ref_dtype, seed, qkv_seed=0, p=0.1):
    """The fused packed backward with dropout: two runs bitwise equal, and output and gradients
    within the flash-attention rule (2x PyTorch's own `dtype` error + atol) of the `ref_dtype`
    reference given the kernels' mask."""
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, H, D, dtype, seed=qkv_seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    scale, mq, mk = fa.default_scale(D), max(lens_q), max(lens_k)
    out, lse = fa.varlen_forward(q, k, v, cu_q, cu_k, mq, mk, causal, p, scale, seed)
    runs = [fa.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal, p, scale, seed, fused_dq=True)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs)), f"causal={causal}: not deterministic"
    masks = fa.varlen_dropout_keep_masks(seed, cu_q, cu_k, H, p)
    pe = fa.effective_dropout_p(p)
    exact = run_ref(q, k, v, cu_q, cu_k, dout, causal, ref_dtype, pe, masks)
    same = run_ref(q, k, v, cu_q, cu_k, dout, causal, dtype, pe, masks)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), (out, *runs[0]), exact, same):
        torch_err = (t.to(e.dtype) - e).abs().max().item()
        assert_close(f"{name} causal={causal}", a, e, 2 * torch_err + ATOL[dtype] * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_varlen_dropout_is_deterministic_and_matches_reference(dtype):
    """Text queries (lengths 1..30) against 197 image keys each (the chunked schedule: one program
    walks a caption's key chunks in order) and causal packed text, with dropout: two fused
    backwards are bitwise equal, and within the flash-attention rule of the fp64 reference given
    the kernels' mask (fp16: 2x PyTorch's own fp16 error + atol)."""
    for lens_q, lens_k, causal in (([1, 30, 13, 2], [197] * 4, False), ([1, 30, 13, 2, 17, 9], None, True)):
        check_fused_varlen_dropout(lens_q, lens_k or lens_q, causal, 2, 32, dtype, torch.float64, seed=5, qkv_seed=6)


# ---------------------------------------------------------------------------------------------
# dropout: the mask's statistics, and gradients against the reference given the kernel's mask


def test_varlen_dropout_gradients_use_the_forward_mask(backward_path):
    p, lens_q, lens_k = 0.2, [13, 1, 30, 5, 17], [20, 3, 30, 5, 40]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, 2, 32, torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    for causal in (False, True):
        got = run_varlen(q, k, v, cu_q, cu_k, dout, causal, dropout_p=p, seed=1234)
        masks = fa.varlen_dropout_keep_masks(1234, cu_q, cu_k, 2, p)
        exact = run_ref(q, k, v, cu_q, cu_k, dout, causal, torch.float64, fa.effective_dropout_p(p), masks)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, exact):
            assert_close(f"{name} causal={causal}", a, e, 1e-5 * max(1.0, e.abs().max().item()))
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
    assert_close("out", out, exact, 1e-5)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _pairs(x: torch.Tensor, dim: int, where, shift: int):
    """(x at positions i of axis `dim` where where(i), x at i + shift): two equal-shape tensors."""
    n = x.shape[dim]
    idx = torch.arange(n)
    idx = idx[where(idx) & (idx + shift < n)]
    return x.index_select(dim, idx), x.index_select(dim, idx + shift)


def _layout_pairs(x: torch.Tensor) -> dict:
    """Element pairs of a (B, H, L, K) tensor that share a Philox word, share a call, or sit in
    neighbouring calls, in `attention_dropout._dropout_draws`' layout (byte 2 * i[3] + j[3] of word
    2 * i[0] + j[0]; the call is (j >> 4, j[2:1], i >> 4, i[2:1], head)); then heads and batch rows."""
    return {
        "bytes of a word (key bit 3)": _pairs(x, 3, lambda j: j % 16 < 8, 8),
        "bytes of a word (row bit 3)": _pairs(x, 2, lambda i: i % 16 < 8, 8),
        "words of a call (key bit 0)": _pairs(x, 3, lambda j: j % 2 == 0, 1),
        "words of a call (row bit 0)": _pairs(x, 2, lambda i: i % 2 == 0, 1),
        "neighbouring calls (key bits 1-2)": _pairs(x, 3, lambda j: (j // 2) % 4 < 3, 2),
        "neighbouring calls (row bits 1-2)": _pairs(x, 2, lambda i: (i // 2) % 4 < 3, 2),
        "neighbouring calls (16 keys on)": _pairs(x, 3, lambda j: j >= 0, 16),
        "neighbouring calls (16 rows on)": _pairs(x, 2, lambda i: i >= 0, 16),
        "heads": (x[:, 0], x[:, 1]),
        "batch rows": (x[0], x[1]),
    }


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(p):
    """Kept fraction within 5 sigma of 1 - effective p (binomial sigma), and no correlation beyond
    5 / sqrt(n) (the sample correlation of n independent pairs has sigma 1 / sqrt(n)) between
    elements sharing a Philox word or call, in neighbouring calls, across heads and batch rows."""
    pe = fa.effective_dropout_p(p)
    keep = attn_mod.dropout_keep_mask(99, (4, 4, 64, 128), p, device=DEVICE).cpu()
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - pe)) <= 5 * math.sqrt(pe * (1 - pe) / n)
    for name, (a, b) in _layout_pairs(keep).items():
        bound = 5 / math.sqrt(a.numel())
        c = _corr(a, b)
        assert abs(c) <= bound, f"{name}: correlation {c:.4f} > {bound:.4f}"


def _chi2_critical(dof: int, level: float = 0.001) -> float:
    from scipy.stats import chi2

    return float(chi2.isf(level, dof))


def test_dropout_draws_are_uniform_and_independent():
    """The random bytes behind the mask: their 256-bin histogram is uniform, and for each kind of
    neighbour (same word, same call, next call, other head or batch row) the joint histogram of
    the two elements' top nibbles (16 x 16 cells) is uniform: chi-square tests at the 0.1% level."""
    draws = fa.dropout_draws(5, (4, 4, 64, 128), device=DEVICE).cpu().long()
    n = draws.numel()
    counts = torch.bincount(draws.flatten(), minlength=256).double()
    stat = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert stat < _chi2_critical(255), f"bytes: chi-square {stat:.1f} over 256 bins"
    for name, (a, b) in _layout_pairs(draws).items():
        cells = torch.bincount(((a >> 4) * 16 + (b >> 4)).flatten(), minlength=256).double()
        e = a.numel() / 256
        stat = float(((cells - e) ** 2 / e).sum())
        assert stat < _chi2_critical(255), f"{name}: chi-square {stat:.1f} over 16 x 16 cells"


def test_dropout_mask_is_the_draws_against_the_threshold():
    """The mask kernel's keep-bits are exactly `byte >= 256 p_eff` of the draws (two kernel paths)."""
    draws = fa.dropout_draws(11, (1, 2, 40, 70), device=DEVICE).cpu()
    for p in (0.1, 0.5, 255 / 256):
        keep = attn_mod.dropout_keep_mask(11, (1, 2, 40, 70), p, device=DEVICE).cpu()
        assert torch.equal(keep, draws.long() >= round(256 * fa.effective_dropout_p(p)))


_M32 = 0xFFFFFFFF


def _philox4x32(counter, key, rounds):
    """Philox-4x32 (Salmon et al. 2011) in Python: 4 x uint32 counter, 2 x uint32 key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & _M32, (p0 >> 32) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def test_python_philox_matches_random123_answers():
    """The Python Philox above reproduces Random123's known-answer vectors for Philox-4x32-10."""
    assert _philox4x32((0, 0, 0, 0), (0, 0), 10) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _philox4x32((_M32,) * 4, (_M32, _M32), 10) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _philox4x32((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), 10) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_dropout_draws_follow_the_documented_layout():
    """Every byte the kernels draw equals the documented one: byte 2 * i[3] + j[3] (from the least
    significant) of word 2 * i[0] + j[0] of Philox-4x32-7(seed; (4 * (j >> 4) + j[2:1],
    4 * (i >> 4) + i[2:1], b * H + h, 0)), with a seed above 2**32 (both key words used)."""
    B, H, L, Kn, seed = 2, 3, 40, 70, 0x1234_5678_9ABC
    draws = fa.dropout_draws(seed, (B, H, L, Kn), device=DEVICE).cpu()
    key = (seed & _M32, seed >> 32)
    cache = {}
    expect = torch.empty(B, H, L, Kn, dtype=torch.uint8)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(Kn):
                    ctr = (4 * (j >> 4) + ((j >> 1) & 3), 4 * (i >> 4) + ((i >> 1) & 3), b * H + h, 0)
                    if ctr not in cache:
                        cache[ctr] = _philox4x32(ctr, key, 7)
                    word = cache[ctr][2 * (i & 1) + (j & 1)]
                    expect[b, h, i, j] = (word >> (8 * (2 * ((i >> 3) & 1) + ((j >> 3) & 1)))) & 0xFF
    assert torch.equal(draws, expect)


def test_effective_dropout_p():
    assert fa.effective_dropout_p(0.0) == 0.0
    assert fa.effective_dropout_p(0.1) == 26 / 256  # 0.1016: 8-bit thresholds, as FlashAttention-2
    assert fa.effective_dropout_p(0.25) == 0.25
    assert fa.effective_dropout_p(0.99999) == 255 / 256
    assert fa.effective_dropout_p(1e-4) == 0.0  # below half a step: no dropout at all


# ---------------------------------------------------------------------------------------------
# torch.compile and bad inputs


def test_varlen_torch_compile_fullgraph_matches_eager(backward_path):
    lens = [5, 1, 9]
    q, k, v, cu, _ = make_packed(lens, lens, 1, 16, torch.float32)

    def f(q, k, v):
        return K.varlen_attention(q, k, v, cu, cu, 9, 9, causal=True) * 2

    compiled = torch.compile(f, fullgraph=True)
    q1, k1, v1 = (x.detach().requires_grad_() for x in (q, k, v))
    out = compiled(q1, k1, v1)
    out.sum().backward()
    exact = run_ref(q, k, v, cu, cu, torch.full(q.shape, 2.0), True, torch.float64)
    assert_close("compiled out", out.detach(), 2 * exact[0], 1e-5)
    for name, a, e in zip(("dq", "dk", "dv"), (q1.grad, k1.grad, v1.grad), exact[1:]):
        assert_close(f"compiled {name}", a, e, 1e-5)


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
        assert_close(name, a, e, 2 * torch_err + ATOL[dtype] * max(1.0, e.abs().max().item()))


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
        assert_close(name, a, e, 2 * torch_err + ATOL[torch.bfloat16] * max(1.0, e.abs().max().item()))


@pytest.mark.gpu
def test_gpu_fused_varlen_dropout_is_correct_and_deterministic():
    """The fused packed backward (`varlen_backward(fused_dq=True)`, VARLEN_BLOCKS["dkdv_fused"]) in
    bf16 with dropout at BLIP's text shapes: causal packed captions (several per key tile, and
    programs running concurrently next to each other's rows) and captions against 197 image keys
    (chunked): bitwise equal over two runs (no atomics; each dQ row summed in a fixed order by one
    program) and within the flash-attention rule of the reference given the kernels' mask."""
    lens = torch.randint(1, 31, (256,), generator=torch.Generator().manual_seed(2)).tolist()
    for lens_k, causal in ((lens, True), ([197] * len(lens), False)):
        check_fused_varlen_dropout(lens, lens_k, causal, 12, 64, torch.bfloat16, torch.float32, seed=31)


def test_default_varlen_backward_on_cpu_runs_the_two_kernel_path(monkeypatch):
    """`FUSED_DQ = None` (the default) measures on a GPU only: here the packed backward runs the
    dQ and dK/dV kernels and times nothing."""
    monkeypatch.setattr(fa, "FUSED_DQ", None)
    monkeypatch.setattr(fa, "_measured_fused_choice", lambda *a, **k: pytest.fail("measured off-GPU"))
    kinds = []
    real_launch = fa._launch
    monkeypatch.setattr(fa, "_launch", lambda kind, *a, **k: (kinds.append(kind), real_launch(kind, *a, **k))[1])
    q, k, v, cu_q, cu_k = make_packed([5, 13, 1], [5, 13, 1], 2, 16, torch.float32)
    run_varlen(q, k, v, cu_q, cu_k, torch.ones_like(q), True)
    assert kinds == ["fwd", "dq", "dkdv"]
