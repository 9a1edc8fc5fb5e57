"""Fused ITC loss (blipfast.kernels.itc) against the fp64 reference: loss, every gradient, the
in-batch logits, the retrieval (image-id) variant, and a backward that must not see the queue
the model overwrites right after the loss. Runs under TRITON_INTERPRET=1 on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from blipfast.kernels import itc
from blipfast.kernels import reference as ref
from tests.helpers import assert_close

pytestmark = [pytest.mark.kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy inf arithmetic in the interpreter

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# exact fp32 dots for the fp32 cases when these tests run on a GPU (the default "tf32x3" is
# checked against its own tolerance in the gpu-marked test); the interpreter is exact anyway
CFG = itc.ItcKernelConfig(precision="ieee")


def make_inputs(B, E, Q, temp, seed=0, idx=False):
    """Unit features whose cosine similarities spread over a few multiples of `temp`, so the
    logits s = cos / temp spread over a few units at every temperature (at temp = 0.001 random
    unit vectors would give a loss of exactly 0); paired rows are the most similar."""
    g = torch.Generator().manual_seed(seed)
    sigma = min(1.0, (3 * temp) ** 0.5)  # 1 - cos ~ sigma^2 between independent rows
    common = torch.randn(E, generator=g, dtype=torch.float64)
    common = common / common.norm()

    def near(n, base=None, scale=1.0):
        noise = torch.randn(n, E, generator=g, dtype=torch.float64) * (sigma * scale / E**0.5)
        return F.normalize((common if base is None else base) + noise, dim=-1)

    image_feat = near(B)
    x = dict(image_feat=image_feat, text_feat=near(B, image_feat, 0.5), image_feat_m=near(B, image_feat, 0.3),
             image_queue=near(Q).T.contiguous(), text_queue=near(Q).T.contiguous(),
             temp=torch.tensor([temp], dtype=torch.float32).double())  # fp32-representable
    x["text_feat_m"] = near(B, x["text_feat"], 0.3)
    if idx:
        x["idx"] = torch.randint(0, max(2, B // 2), (B,), generator=g)  # repeated image ids
        iq = torch.randint(0, B, (Q,), generator=g)
        iq[::3] = -100  # the original's "empty slot" id
        x["idx_queue"] = iq
    return x


def run_reference(x, alpha, dtype):
    """fp64 ground truth and a PyTorch baseline, both from the inputs rounded to `dtype`.

    The baseline runs in bf16 for bf16 (PyTorch's own low-precision error, the flash-attention
    test rule) and in fp32 otherwise: PyTorch's fp16 path overflows to NaN at temp = 0.001,
    and the kernel accumulates fp16 products in fp32 anyway."""
    out = {}
    base_dt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    for tag, dt in (("exact", torch.float64), ("torch", base_dt)):
        t = {k: (v.to(dtype if k != "temp" else torch.float32).to(dt) if v.is_floating_point() else v)
             for k, v in x.items()}
        for k in ("image_feat", "text_feat", "temp"):
            t[k].requires_grad_(True)
        args = [t[k] for k in ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue")]
        if "idx" in x:
            loss, s_i2t, s_t2i = ref.itc_loss_retrieval(*args, t["idx"], t["idx_queue"], t["temp"], alpha, return_logits=True)
        else:
            loss, s_i2t, s_t2i = ref.itc_loss(*args, t["temp"], alpha, return_logits=True)
        loss.backward()
        B = x["image_feat"].shape[0]
        out[tag] = dict(loss=loss.detach(), image_feat=t["image_feat"].grad, text_feat=t["text_feat"].grad,
                        temp=t["temp"].grad, s_i2t=s_i2t[:, :B].detach(), s_t2i=s_t2i[:, :B].detach())
    return out


def run_kernel(x, alpha, dtype, splits=None, precision="ieee", config=None):
    # temp stays fp32 as in the model (a parameter beside bf16 autocast features)
    t = {k: (v.to(dtype if k != "temp" else torch.float32).to(DEV) if v.is_floating_point() else v.to(DEV))
         for k, v in x.items()}
    for k in ("image_feat", "text_feat", "temp"):
        t[k].requires_grad_(True)
    loss, s_i2t, s_t2i = itc.itc_loss(
        t["image_feat"], t["text_feat"], t["image_feat_m"], t["text_feat_m"], t["image_queue"], t["text_queue"],
        t["temp"], alpha, idx=t.get("idx"), idx_queue=t.get("idx_queue"),
        # 16-wide tiles by default: several tiles per split
        config=config or itc.ItcKernelConfig(block_n=16, num_splits=splits, precision=precision))
    loss.backward()
    return dict(loss=loss.detach(), image_feat=t["image_feat"].grad, text_feat=t["text_feat"].grad,
                temp=t["temp"].grad, s_i2t=s_i2t, s_t2i=s_t2i)


def check_against_reference(got, refs, dtype, slack=3.0):
    """err(kernel) <= slack * err(PyTorch baseline) + rounding allowance, per output.

    The allowance is 2 fp32 ulps of the largest logit times the output's size (the logits
    carry |s| <= 1 / temp = 1000, and any fp32 implementation rounds them at that scale; which
    one happens to be luckier depends on the data) plus 2 ulps of the output's own dtype (the
    gradients come back in the features' dtype; 16-bit kernels also round p - t to it)."""
    exact, torch_ = refs["exact"], refs["torch"]
    max_s = float(torch.cat([exact["s_i2t"], exact["s_t2i"]]).abs().max())
    eps_out = torch.finfo(dtype).eps
    for key in ("loss", "image_feat", "text_feat", "temp", "s_i2t", "s_t2i"):
        want = exact[key]
        torch_err = float((torch_[key].double() - want).abs().max())
        scale = max(1e-3, float(want.abs().max()))
        eps_key = eps_out if key in ("image_feat", "text_feat") else 2.0**-23
        allowance = 2 * 2.0**-23 * max(1.0, max_s) * scale + 2 * eps_key * scale
        assert_close(key, got[key], want, slack * torch_err + allowance)


# B, E, Q, alpha, temp, dtype, splits: awkward sizes (queues not multiples of the 16-wide
# interpreter tile, E = 24 not a power of two), both temperature clamps, alpha 0 and 0.4.
CASES = [
    (1, 16, 21, 0.4, 0.07, torch.float32, 2),
    (3, 256, 37, 0.0, 0.001, torch.float32, 3),
    (3, 256, 37, 0.4, 0.5, torch.float16, 1),
    (8, 24, 45, 0.4, 0.001, torch.float16, 2),
    (8, 256, 50, 0.4, 0.5, torch.float32, None),
    (8, 16, 19, 0.0, 0.07, torch.float32, 4),
    (4, 32, 20, 0.4, 0.07, torch.bfloat16, 2),  # interpreter: bf16 tiles upcast to fp32 (UPCAST)
    # fp32 streams the features in FP32_CHUNK_E-wide chunks: a ragged second chunk (E = 40 of 64),
    # and E = 300 (BLOCK_E 512: ten chunks, the last partly and six wholly past E)
    (5, 40, 33, 0.4, 0.07, torch.float32, 2),
    (6, 300, 29, 0.4, 0.02, torch.float32, 3),
]


@pytest.mark.parametrize("B,E,Q,alpha,temp,dtype,splits", CASES)
def test_itc_matches_reference(B, E, Q, alpha, temp, dtype, splits):
    x = make_inputs(B, E, Q, temp, seed=B * 1000 + Q)
    check_against_reference(run_kernel(x, alpha, dtype, splits), run_reference(x, alpha, dtype), dtype)


@pytest.mark.parametrize("B,Q,alpha", [(4, 30, 0.4), (8, 40, 0.0)])
def test_itc_retrieval_ids_match_reference(B, Q, alpha):
    x = make_inputs(B, 32, Q, 0.05, seed=7 + B, idx=True)
    check_against_reference(run_kernel(x, alpha, torch.float32, 2), run_reference(x, alpha, torch.float32),
                            torch.float32)


# the GPU's default tiles for the dtype in the interpreter (16-bit: 64 rows, the stacked [q; qm]
# operand is 128 rows; fp32: 16 x 16, features streamed in chunks), with a second, ragged row
# block (B = 70 = 64 + 6) and a ragged last column tile
@pytest.mark.parametrize("dtype,ids,E", [(torch.float16, False, 24), (torch.float16, True, 24),
                                         (torch.float32, False, 24), (torch.float32, True, 72)])
def test_itc_gpu_default_tiles_match_reference(dtype, ids, E):
    B, Q = 70, 45
    tiles = itc.ItcKernelConfig().resolved(dtype, interp=False)
    assert tiles.block_m < B and tiles.block_m_grad < B
    x = make_inputs(B, E, Q, 0.07, seed=21, idx=ids)
    cfg = itc.ItcKernelConfig(block_m=tiles.block_m, block_m_grad=tiles.block_m_grad,
                              block_n=tiles.block_n, num_splits=3, precision="ieee")
    check_against_reference(run_kernel(x, 0.4, dtype, config=cfg), run_reference(x, 0.4, dtype), dtype)


def test_backward_does_not_read_the_overwritten_queue():
    """The model overwrites queue columns in place right after the loss; gradients must be those
    of the queue the forward saw."""
    B, E, Q = 4, 32, 40
    x = make_inputs(B, E, Q, 0.05, seed=3)
    want = run_reference(x, 0.4, torch.float32)["exact"]
    t = {k: v.float().to(DEV) for k, v in x.items()}
    for k in ("image_feat", "text_feat", "temp"):
        t[k].requires_grad_(True)
    loss, _, _ = itc.itc_loss(t["image_feat"], t["text_feat"], t["image_feat_m"], t["text_feat_m"],
                              t["image_queue"], t["text_queue"], t["temp"], 0.4, config=CFG)
    with torch.no_grad():  # dequeue-and-enqueue of B new columns, then some more: in place
        t["image_queue"][:, :B] = t["image_feat_m"].T
        t["text_queue"][:, :B] = t["text_feat_m"].T
        t["image_queue"][:, B:].mul_(-1)
        t["text_queue"][:, B:].mul_(-1)
    loss.backward()
    # the same backward against the updated queues would be clearly different: the test can fail
    updated = dict(x, image_queue=t["image_queue"].detach().double().cpu(), text_queue=t["text_queue"].detach().double().cpu())
    stale = run_reference(updated, 0.4, torch.float32)["exact"]
    assert float((stale["image_feat"] - want["image_feat"]).abs().max()) > 1e-2
    for k in ("image_feat", "text_feat", "temp"):
        assert_close(k, t[k].grad, want[k], 1e-5 * max(1.0, float(want[k].abs().max())))


def test_forward_without_grad_and_gradient_scaling():
    x = make_inputs(5, 32, 23, 0.1, seed=11)
    want = run_reference(x, 0.4, torch.float32)["exact"]
    t = {k: v.float().to(DEV) for k, v in x.items()}
    with torch.no_grad():
        loss, _, _ = itc.itc_loss(t["image_feat"], t["text_feat"], t["image_feat_m"], t["text_feat_m"],
                                  t["image_queue"], t["text_queue"], t["temp"], 0.4, config=CFG)
    assert_close("loss (no_grad)", loss, want["loss"], 1e-5)
    # an upstream gradient other than 1 scales every gradient (loss * 3)
    t["image_feat"].requires_grad_(True)
    t["temp"].requires_grad_(True)
    loss, _, _ = itc.itc_loss(t["image_feat"], t["text_feat"], t["image_feat_m"], t["text_feat_m"],
                              t["image_queue"], t["text_queue"], t["temp"], 0.4, config=CFG)
    (3 * loss).backward()
    assert t["text_feat"].grad is None
    assert_close("3 x d image_feat", t["image_feat"].grad, 3 * want["image_feat"], 1e-4)
    assert_close("3 x d temp", t["temp"].grad, 3 * want["temp"], 1e-3)


def test_mixed_dtypes_compute_in_the_online_features_dtype():
    """fp16 online features beside fp32 momentum features and queues (EMA weights and buffers
    kept in fp32): the kernel casts everything to fp16 on load, so it equals the all-fp16 call."""
    x = make_inputs(4, 32, 24, 0.1, seed=9)
    names = ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue")
    half = [x[k].half().to(DEV) for k in names]
    mixed = half[:2] + [t.float() for t in half[2:]]
    temp = x["temp"].float().to(DEV)
    a = itc.itc_loss(*half, temp, 0.4, config=CFG)
    b = itc.itc_loss(*mixed, temp, 0.4, config=CFG)
    for name, u, v in zip(("loss", "sim_i2t", "sim_t2i"), a, b):
        assert_close(name, v, u, 1e-6 * max(1.0, float(u.abs().max())))


def test_strided_queue_view_is_read_in_place():
    """A transposed (non-contiguous) queue view gives the same loss as its contiguous copy."""
    x = make_inputs(4, 16, 33, 0.1, seed=5)
    t = {k: v.float().to(DEV) for k, v in x.items()}
    base = itc.itc_loss(*(t[k] for k in ("image_feat", "text_feat", "image_feat_m", "text_feat_m",
                                          "image_queue", "text_queue", "temp")), 0.4)[0]
    iq_t = t["image_queue"].t().contiguous().t()  # same values, strides (1, E)
    tq_t = t["text_queue"].t().contiguous().t()
    assert not iq_t.is_contiguous()
    other = itc.itc_loss(t["image_feat"], t["text_feat"], t["image_feat_m"], t["text_feat_m"], iq_t, tq_t,
                         t["temp"], 0.4)[0]
    assert_close("loss (strided queue)", other, base, 1e-6)


def _args(B=4, E=16, Q=20, dtype=torch.float32):
    x = make_inputs(B, E, Q, 0.1)
    return [x[k].to(dtype).to(DEV) for k in ("image_feat", "text_feat", "image_feat_m", "text_feat_m",
                                     "image_queue", "text_queue", "temp")]


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(1, a[1][:3]), r"text_feat must be \(B, E\)"),
    (lambda a: a.__setitem__(4, a[4][:8]), r"must both be \(E, Q\)"),
    (lambda a: a.__setitem__(5, a[5][:, :7]), r"must both be \(E, Q\)"),
    (lambda a: a.__setitem__(0, a[0].long()), r"image_feat must be float32"),
    (lambda a: a.__setitem__(6, torch.ones(2)), r"temp must have one element"),
    (lambda a: a.__setitem__(0, a[0][None]), r"image_feat must be \(B, E\)"),
    (lambda a: a.__setitem__(2, a[2].to("meta")), r"image_feat_m is on meta"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
    a = _args()
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        itc.itc_loss(*a, 0.4)


def test_ids_must_come_together_and_match_shapes():
    a = _args()
    with pytest.raises(ValueError, match="idx and idx_queue must be given together"):
        itc.itc_loss(*a, 0.4, idx=torch.arange(4, device=DEV))
    with pytest.raises(ValueError, match=r"idx must be \(B,\)"):
        itc.itc_loss(*a, 0.4, idx=torch.arange(3, device=DEV), idx_queue=torch.arange(20, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_itc_gpu_realistic_size(dtype):
    """bf16 (and fp32 with tf32x3) on the GPU at a training-like size, against fp64."""
    x = make_inputs(64, 256, 4000, 0.05, seed=1)
    got = run_kernel(x, 0.4, dtype, precision="tf32x3")
    check_against_reference(got, run_reference(x, 0.4, dtype), dtype, slack=2.0 if dtype == torch.bfloat16 else 4.0)


# ---------------------------------------------------------------------------------------------
# hard-negative sampling


def chi2_critical(df: int, p: float) -> float:
    """Upper-p critical value of chi-square(df): scipy when installed, else the Wilson-Hilferty
    approximation (relative error well under 1% for df >= 10, the sizes used here)."""
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(1.0 - p, df))
    except ImportError:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1.0 - p)
        h = 2.0 / (9.0 * df)
        return df * (1.0 - h + z * h**0.5) ** 3


def chi_square(counts: torch.Tensor, weights: torch.Tensor):
    """Pearson chi-square of per-row draw counts against per-row weights (zero-weight cells must
    have zero counts); cells with an expected count below 5 are pooled per row."""
    stat, df = 0.0, 0
    for c, w in zip(counts.double(), weights.double()):
        assert float(c[w == 0].sum()) == 0, "drew a column of zero weight"
        n = float(c.sum())
        exp = n * w[w > 0] / w.sum()
        obs = c[w > 0]
        small = exp < 5
        if small.any():  # pool the sparse cells into one
            exp = torch.cat([exp[~small], exp[small].sum()[None]])
            obs = torch.cat([obs[~small], obs[small].sum()[None]])
        stat += float(((obs - exp) ** 2 / exp).sum())
        df += len(exp) - 1
    return stat, df


def designed_sims(B=8, seed=0):
    """(B, B) in-batch logits with rows of three kinds: spread-out, peaked off the diagonal, and
    a dominant diagonal where most off-diagonal mass is the 1e-4 floor (some columns at -30
    have softmax ~ 0 and weight = the floor alone)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, B, generator=g) * 1.5
    s[1] = torch.linspace(-3, 3, B)
    s[2, :] = 0.0
    s[2, 2] = 10.0
    s[2, 5:] = -30.0
    s[3, :] = -30.0
    s[3, 3] = 5.0
    s[3, 0] = -2.0
    return s


def test_sampling_matches_reference_distribution():
    B, n = 8, 10000
    s_i2t = designed_sims(B, seed=1)
    s_t2i = designed_sims(B, seed=2).flip(0).flip(1)  # other row kinds, diagonal still at (i, i)
    neg_img, neg_txt = itc.sample_hard_negatives(s_i2t.to(DEV), s_t2i.to(DEV), seed=1234, num_samples=n)
    counts_img = F.one_hot(neg_img.cpu(), B).sum(1)  # (B, B) draws per (row, column)
    counts_txt = F.one_hot(neg_txt.cpu(), B).sum(1)
    assert counts_img.diagonal().sum() == 0 and counts_txt.diagonal().sum() == 0, "drew the positive"
    # negative image for each text comes from the t2i rows, negative text from the i2t rows
    stat, df = chi_square(torch.cat([counts_img, counts_txt]),
                          torch.cat([ref.hard_negative_weights(s_t2i), ref.hard_negative_weights(s_i2t)]))
    crit = chi2_critical(df, 1e-3)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f} (df {df}): draws do not follow the weights"
    # the floor is what the dominant-diagonal row draws from: its -30 columns are not empty
    w = ref.hard_negative_weights(s_i2t)
    assert float(w[2, 5:].min()) == pytest.approx(1e-4, rel=1e-3)
    assert int(counts_txt[2, 5:].min()) > 500  # expected about 1130 each


def test_chi_square_detects_a_missing_floor():
    """The test above can fail: weights without the 1e-4 floor are rejected for the same draws."""
    B, n = 8, 4000
    s = designed_sims(B, seed=1)
    _, neg_txt = itc.sample_hard_negatives(s.to(DEV), s.to(DEV), seed=99, num_samples=n)
    counts = F.one_hot(neg_txt.cpu(), B).sum(1)
    no_floor = torch.softmax(s.double(), 1).fill_diagonal_(0)  # e^-40-sized weights stay > 0
    stat, df = chi_square(counts[2:3], no_floor[2:3])
    assert stat > chi2_critical(df, 1e-3)


def test_sampling_is_seeded_and_never_draws_the_diagonal():
    s1, s2 = designed_sims(8, 3).to(DEV), designed_sims(8, 4).to(DEV)
    a = itc.sample_hard_negatives(s1, s2, seed=7, num_samples=50)
    b = itc.sample_hard_negatives(s1, s2, seed=7, num_samples=50)
    c = itc.sample_hard_negatives(s1, s2, seed=8, num_samples=50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    rows = torch.arange(8, device=DEV)[:, None]
    for neg in a:
        assert neg.dtype == torch.int64 and neg.shape == (8, 50)
        assert bool(((neg >= 0) & (neg < 8) & (neg != rows)).all())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    one = itc.sample_hard_negatives(s1, s2, generator=g1)
    assert one[0].shape == (8,) and torch.equal(one[0], itc.sample_hard_negatives(s1, s2, generator=g2)[0])


def test_sampling_bad_inputs():
    s = torch.zeros(3, 3, device=DEV)
    with pytest.raises(ValueError, match="at least 2 per rank"):
        itc.sample_hard_negatives(torch.zeros(1, 1, device=DEV), torch.zeros(1, 1, device=DEV))
    with pytest.raises(ValueError, match=r"must both be \(B, B\)"):
        itc.sample_hard_negatives(s, torch.zeros(3, 4, device=DEV))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        itc.sample_hard_negatives(s.long(), s.long())
    for bad in (float("nan"), float("inf")):
        t = s.clone()
        t[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite ITC similarity"):
            itc.sample_hard_negatives(s, t)
    if DEV == "cpu":
        with pytest.raises(ValueError, match="TRITON_INTERPRET|CUDA"):
            itc.sample_hard_negatives(s.to("meta"), s.to("meta"))


def test_retrieval_sampling_matches_reference_distribution():
    """Negatives by image id: softmax without the row's own id's columns, no floor."""
    R, C, n = 4, 12, 12000
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(R, C, generator=g) * 1.2
    idx_col = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8])
    idx_row = torch.tensor([1, 3, 0, 8])
    draws = itc.sample_negatives_by_idx(sims.to(DEV), idx_row.to(DEV), idx_col.to(DEV), seed=3, num_samples=n)
    counts = F.one_hot(draws.cpu(), C).sum(1)
    w = ref.retrieval_negative_weights(sims, idx_row, idx_col)
    stat, df = chi_square(counts, w)
    assert stat < chi2_critical(df, 1e-3), f"chi-square {stat:.1f} (df {df})"
    same = idx_row[:, None] == idx_col[None, :]
    assert int(counts[same].sum()) == 0, "drew a candidate with the row's own image id"


def test_retrieval_sampling_errors():
    sims = torch.zeros(2, 3, device=DEV)
    with pytest.raises(ValueError, match="every candidate shares its image id"):
        itc.sample_negatives_by_idx(sims, torch.tensor([1, 2], device=DEV), torch.tensor([1, 1, 1], device=DEV))
    bad = sims.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        itc.sample_negatives_by_idx(bad, torch.tensor([0, 2], device=DEV), torch.tensor([1, 1, 1], device=DEV))
    with pytest.raises(ValueError, match=r"idx_col must be \(C,\)|idx_row must be"):
        itc.sample_negatives_by_idx(sims, torch.tensor([0, 2], device=DEV), torch.tensor([1, 1], device=DEV))
    with pytest.raises(ValueError, match="int64/int32"):
        itc.sample_negatives_by_idx(sims, torch.tensor([0.0, 2.0], device=DEV), torch.tensor([1, 1, 1], device=DEV))
