"""Fused LM head + label-smoothed cross-entropy (blipfast.kernels.cross_entropy) against the fp64
reference: loss and the gradients of hidden, weight and bias, chunked over rows and vocabulary
at awkward sizes; ignore_index, bad inputs. Runs under TRITON_INTERPRET=1 on the CPU."""
import math

import pytest
import torch

from blipfast.kernels import cross_entropy as ce
from blipfast.kernels import reference as ref
from tests.helpers import assert_close

pytestmark = [pytest.mark.kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy log(0) on masked rows in the interpreter

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(N, C, V, n_ignored, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64) * (2.0 / C**0.5)  # logits of a few units
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return hidden, weight, b, labels


def grads_of(fn, tensors, dtype, device, **kw):
    ts = [None if t is None else t.detach().to(dtype).to(device).clone().requires_grad_(True) for t in tensors[:3]]
    loss = fn(ts[0], ts[1], ts[2], tensors[3].to(device), **kw)
    loss.backward()
    return [loss.detach()] + [None if t is None else t.grad for t in ts]


U32 = 2.0 ** -24  # unit roundoff of fp32, the kernel's accumulation dtype


def rounding_bounds(hidden, weight, bias, labels, eps):
    """First-order bounds on the fp32 rounding error of each output, from the computation itself.

    A reduction of n terms computed in floating point errs by at most n*u*sum|terms| (Higham,
    "Accuracy and Stability of Numerical Algorithms", 3.1), and an error already in a term
    carries through. Here: logits z = h.W^T + b are C + 1 terms; the log-sum-exp adds V terms and
    an exp; dz = (softmax - target) / n; then bias = sum over rows of dz (N terms), weight =
    dz^T h (N terms) and hidden = dz W (V terms). Everything is evaluated in fp64 on the inputs.
    Returns (loss, d hidden, d weight, d bias) bounds, elementwise.
    """
    h, W = hidden.double(), weight.double()
    N, C = h.shape
    V = W.shape[0]
    b = torch.zeros(V, dtype=torch.float64) if bias is None else bias.double()
    valid = labels != -100
    n = max(int(valid.sum()), 1)
    z = h @ W.T + b  # (N, V)
    dz_in = (C + 1) * U32 * (h.abs() @ W.abs().T + b.abs())  # error of each logit
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    dlse = dz_in.max(dim=1, keepdim=True).values + (V + 2) * U32  # error of each row's log-sum-exp
    p = torch.exp(z - lse)
    target = torch.full_like(z, eps / V)
    target[valid, labels[valid]] += 1.0 - eps
    rows = valid[:, None].double()
    g = (p - target) * rows / n  # d loss / d z
    # error of each dz: the exp's relative error times p, plus the subtraction and the 1/n
    dg = (p * (dz_in + dlse + 2 * U32) + 2 * U32 * g.abs()) * rows / n
    b_bias = dg.sum(0) + N * U32 * g.abs().sum(0)
    b_weight = dg.T @ h.abs() + N * U32 * (g.abs().T @ h.abs())
    b_hidden = dg @ W.abs() + V * U32 * (g.abs() @ W.abs())
    row_loss = (lse - (target * z).sum(1, keepdim=True)).abs()
    b_loss = float(((dlse + (target * (dz_in + V * U32 * z.abs())).sum(1, keepdim=True)) * rows).sum() / n
                   + N * U32 * (row_loss * rows).sum() / n)
    return torch.tensor(b_loss), b_hidden, b_weight, (b_bias if bias is not None else None)


def check(got, exact, baseline, dtype, bounds, slack=2.0):
    """Each output within slack x PyTorch's own error in `dtype` (the flash-attention rule; it is
    what limits fp16/bf16), or within the fp32 rounding bound of the computation (what limits
    fp32, where both errors are a few ulps and which of two summation orders wins is chance),
    plus one rounding of the output to `dtype`."""
    eps = torch.finfo(dtype).eps
    for name, g, w, b, bound in zip(("loss", "hidden", "weight", "bias"), got, exact, baseline, bounds):
        if w is None:
            assert g is None
            continue
        base_err = float((b.double().cpu() - w).abs().max())
        tol = torch.maximum(torch.full_like(w, slack * base_err), bound) + eps * w.abs()
        assert_close(name, g, w, tol)


def run_case(N, C, V, n_ignored, dtype, eps=0.1, chunk_rows=None, bias=True, block_v=None, kernel_eps=None):
    x = make_inputs(N, C, V, n_ignored, seed=N * 7 + V, bias=bias)
    rounded = [None if t is None else t.to(dtype).double() for t in x[:3]] + [x[3]]
    exact = grads_of(ref.lm_cross_entropy, rounded, torch.float64, "cpu", label_smoothing=eps)
    # PyTorch's own error in the same dtype (its logits are rounded to it too, as are the kernel's)
    baseline = grads_of(ref.lm_cross_entropy, rounded, dtype, "cpu", label_smoothing=eps)
    got = grads_of(ce.lm_cross_entropy, rounded, dtype, DEV, label_smoothing=eps if kernel_eps is None else kernel_eps,
                   chunk_rows=chunk_rows, block_v=block_v)
    check(got, exact, baseline, dtype, rounding_bounds(*rounded, eps))


# N (rows), C, V (not a multiple of the 128-wide interpreter tile), ignored rows, dtype,
# smoothing, rows per chunk (ragged last chunk), bias
CASES = [
    (1, 24, 301, 0, torch.float32, 0.1, None, True),
    (3, 256, 130, 1, torch.float32, 0.1, 2, True),
    (13, 24, 301, 4, torch.float32, 0.1, 5, True),
    (13, 32, 257, 3, torch.float16, 0.1, 4, True),
    (8, 256, 50, 2, torch.float16, 0.0, 3, False),
    (7, 16, 200, 0, torch.float32, 0.0, None, False),
]


@pytest.mark.parametrize("N,C,V,n_ignored,dtype,eps,chunk_rows,bias", CASES)
def test_lm_cross_entropy_matches_reference(N, C, V, n_ignored, dtype, eps, chunk_rows, bias):
    run_case(N, C, V, n_ignored, dtype, eps, chunk_rows, bias)


@pytest.mark.parametrize("perturbed_eps", [0.1 * (1 + 1e-4), 0.1 * (1 - 1e-4)])
def test_the_bound_catches_a_slightly_wrong_kernel(perturbed_eps):
    """The case that once sat at its tolerance, computed with label smoothing off by 1e-4 relative
    (a change of 1e-5 in the target distribution): the derived bounds must reject it."""
    with pytest.raises(AssertionError, match="err .* > tol"):
        run_case(13, 24, 301, 4, torch.float32, 0.1, 5, True, kernel_eps=perturbed_eps)


def test_chunks_and_tiles_do_not_change_the_result():
    x = make_inputs(11, 24, 301, 2, seed=3)
    outs = [grads_of(ce.lm_cross_entropy, [t.float() if t is not None and t.is_floating_point() else t for t in x],
                     torch.float32, DEV, chunk_rows=cr, block_v=bv) for cr, bv in ((11, 512), (3, 64), (1, 128))]
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert_close("chunked", a, b, 1e-5 * max(1e-3, float(b.abs().max())))


def test_all_rows_ignored_gives_nan_loss_and_zero_grads_like_pytorch():
    h, w, b, y = make_inputs(4, 16, 40, 4)
    got = grads_of(ce.lm_cross_entropy, [h, w, b, y], torch.float32, DEV)
    want = grads_of(ref.lm_cross_entropy, [h, w, b, y], torch.float32, "cpu")
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    for g, r in zip(got[1:], want[1:]):
        assert torch.equal(g.cpu(), r) and not g.any()


def test_no_grad_and_upstream_scaling():
    h, w, b, y = (t.float() if t.is_floating_point() else t for t in make_inputs(6, 16, 90, 1, seed=4))
    want = ref.lm_cross_entropy(h, w, b, y)
    with torch.no_grad():
        assert_close("loss (no_grad)", ce.lm_cross_entropy(h.to(DEV), w.to(DEV), b.to(DEV), y.to(DEV)), want, 1e-5)
    hg = h.clone().requires_grad_(True)
    (2.5 * ce.lm_cross_entropy(hg.to(DEV), w.to(DEV), b.to(DEV), y.to(DEV))).backward()
    hr = h.clone().requires_grad_(True)
    (2.5 * ref.lm_cross_entropy(hr, w, b, y)).backward()
    assert_close("2.5 x d hidden", hg.grad, hr.grad, 1e-5 * float(hr.grad.abs().max()))


@pytest.mark.parametrize("args,match", [
    (lambda h, w, b, y: (h[:, :5], w, b, y), r"hidden must be \(N, C\) and weight \(V, C\)"),
    (lambda h, w, b, y: (h, w, b[:3], y), r"bias must be \(V,\)"),
    (lambda h, w, b, y: (h, w, b, y[:2]), r"labels must be \(N,\)"),
    (lambda h, w, b, y: (h, w, b, y.float()), "labels must be int64 or int32"),
    (lambda h, w, b, y: (h, w.double(), b, y), "float32, float16 or bfloat16"),
    (lambda h, w, b, y: (h, w.half(), b, y), "must share a dtype"),
    (lambda h, w, b, y: (h, w, b, torch.full_like(y, 40)), r"labels must be in \[0, 40\)"),
    (lambda h, w, b, y: (h, w, b, torch.full_like(y, -1)), r"labels must be in \[0, 40\)"),
])
def test_bad_inputs_raise_clear_errors(args, match):
    h, w, b, y = (t.float().to(DEV) if t.is_floating_point() else t.to(DEV) for t in make_inputs(4, 16, 40, 0))
    with pytest.raises(ValueError, match=match):
        ce.lm_cross_entropy(*args(h, w, b, y))


def test_bad_smoothing_and_device():
    h, w, b, y = (t.float() if t.is_floating_point() else t for t in make_inputs(4, 16, 40, 0))
    with pytest.raises(ValueError, match="label_smoothing"):
        ce.lm_cross_entropy(h.to(DEV), w.to(DEV), b.to(DEV), y.to(DEV), label_smoothing=1.0)
    with pytest.raises(ValueError, match="is on meta"):
        ce.lm_cross_entropy(h.to(DEV), w.to("meta"), b.to(DEV), y.to(DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lm_cross_entropy_gpu_realistic_size(dtype):
    """Training-like rows (B=16 x 29 tokens), BERT's vocabulary, against fp64 and PyTorch's own
    error in the same dtype."""
    N, C, V = 16 * 29, 768, 30524
    x = make_inputs(N, C, V, 60, seed=0)
    rounded = [t.to(dtype).double() for t in x[:3]] + [x[3]]
    exact = grads_of(ref.lm_cross_entropy, rounded, torch.float64, "cpu")
    baseline = grads_of(ref.lm_cross_entropy, rounded, dtype, "cuda")
    got = grads_of(ce.lm_cross_entropy, rounded, dtype, "cuda", chunk_rows=128)
    check(got, exact, baseline, dtype, rounding_bounds(*rounded, 0.1), slack=2.0)


def test_autocast_computes_in_the_autocast_dtype():
    """Under autocast the matmuls run in the autocast dtype (decided by `lm_cross_entropy`, not
    inside the custom op): fp32 inputs under fp16 autocast give the all-fp16 call's loss and
    gradients, returned in the inputs' own dtype (fp32)."""
    x = [t.float() if t.is_floating_point() else t for t in make_inputs(9, 16, 70, 2, seed=5)]
    with torch.autocast(DEV, dtype=torch.float16):
        mixed = grads_of(ce.lm_cross_entropy, x, torch.float32, DEV, chunk_rows=4)
    half = grads_of(ce.lm_cross_entropy, x, torch.float16, DEV, chunk_rows=4)
    assert all(t.dtype == torch.float32 for t in mixed)
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), mixed, half):
        # the same fp16 matmuls and fp32 gradient accumulators; only the final cast differs
        assert torch.equal(a.to(b.dtype), b), name
    # and the test can fail: the fp32 computation differs
    assert not torch.equal(mixed[1], grads_of(ce.lm_cross_entropy, x, torch.float32, DEV, chunk_rows=4)[1])


# ---------------------------------------------------------------------------------------------
# the CE kernel itself on logits of any layout: the ALIGNED specialisation (row stride a multiple
# of 16 elements, padding readable: 128-bit loads on a GPU) and the scalar fall-back


def logits_layout(n, V, dtype, layout, fill=float("nan")):
    """An (n, V) view whose storage outside the view holds `fill`, and whether `_ce_aligned` must accept it."""
    Vp = -(-V // 16) * 16  # V rounded up to 16
    if layout == "contiguous":  # BERT's 30522 is this: rows start misaligned
        t = torch.full((n, V), fill, dtype=dtype, device=DEV)
        aligned = V % 16 == 0
    elif layout in ("padded", "tight_bias"):  # what the op allocates
        t = torch.full((n, Vp), fill, dtype=dtype, device=DEV)[:, :V]
        aligned = True  # (as far as the logits go)
    elif layout == "padded_wide":
        t = torch.full((n, Vp + 16), fill, dtype=dtype, device=DEV)[:, :V]
        aligned = True
    elif layout == "shifted":  # a 16-element stride, but the first row starts one element late
        t = torch.full((n * Vp + 1,), fill, dtype=dtype, device=DEV)[1:].view(n, Vp)[:, :V]
        aligned = False
    elif layout == "tight_last_row":  # a 16-element stride, but no padding behind the last row
        t = torch.full(((n - 1) * Vp + V,), fill, dtype=dtype, device=DEV).as_strided((n, V), (Vp, 1))
        aligned = V % 16 == 0
    elif layout == "odd_stride":
        t = torch.full((n, V + 1), fill, dtype=dtype, device=DEV)[:, :V]
        aligned = False
    else:
        raise ValueError(layout)
    return t, aligned


def kernel_reference(x, labels, eps, ignore_index=-100):
    """fp64 row losses and d loss / d z of the mean smoothed CE of z (the kernel's outputs)."""
    x = x.double()
    V = x.shape[1]
    valid = labels != ignore_index
    lse = torch.logsumexp(x, 1)
    x_y = x.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    loss = torch.where(valid, lse - (1 - eps) * x_y - eps * x.mean(1), torch.zeros_like(lse))
    onehot = torch.zeros_like(x)
    onehot[valid, labels[valid]] = 1.0
    scale = valid.double() / max(int(valid.sum()), 1)
    grad = (torch.softmax(x, 1) - eps / V - (1 - eps) * onehot) * scale[:, None]
    return loss, grad, lse


def kernel_bounds(x, labels, eps, lse, bias):
    """First-order bounds on the kernel's fp32 rounding error (Higham 3.1: n terms summed err by at
    most n u sum|terms|), evaluated in fp64 on the exact inputs; x = logits + bias, where the
    kernel's one fp32 addition errs by u |x|. Each exp(a), a = x - m, errs relatively by the
    rounding of a, u (|a| + |x|), plus that of exp itself: on a GPU exp2(a log2 e), whose product
    rounds once more (u |a|) and whose ex2.approx errs by under 3 u (the interpreter: numpy's exp,
    within that); the sum of V such positive terms adds V u relatively; so lse errs by d_lse below.
    The smoothing term eps mean(x) sums V logits; three more roundings combine the loss. The
    gradient: p (d_lse + u (2 |x - lse| + |x|) + 3 u) from the exp, then three roundings of
    (p - eps / V - onehot) x scale."""
    x = x.double()
    V = x.shape[1]
    ax = x.abs() if bias is not None else torch.zeros_like(x)  # error of the bias addition / u
    m = x.max(1).values
    d_lse = U32 * (2 * (x - m[:, None]).abs().max(1).values + ax.max(1).values + V + 5 + lse.abs())
    valid = (labels != -100).double()
    x_y = x.gather(1, labels.clamp(min=0)[:, None])[:, 0].abs()
    b_loss = (d_lse + eps * U32 * (V + 3) * x.abs().mean(1) + 5 * U32 * (lse.abs() + x_y)) * valid
    p = torch.exp(x - lse[:, None])
    scale = (valid / max(int(valid.sum()), 1))[:, None]
    b_grad = (p * (d_lse[:, None] + U32 * (2 * (x - lse[:, None]).abs() + ax) + 3 * U32)
              + 3 * U32 * (p + eps / V + 1)) * scale
    return b_loss, b_grad


def bias_layout(V, dtype, layout, fill):
    """The bias (V,) for a logits layout: padded to 16 where the logits are (the op's), else exact."""
    if layout in ("padded", "padded_wide", "shifted"):
        return torch.full((-(-V // 16) * 16,), fill, dtype=dtype, device=DEV)[:V]
    return torch.full((V,), fill, dtype=dtype, device=DEV)  # "tight_bias": the logits padded, the bias not


LAYOUTS = ["contiguous", "padded", "padded_wide", "shifted", "tight_last_row", "odd_stride", "tight_bias"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("V,block_v,has_bias", [(130, 64, True), (301, 128, True), (50, 512, False), (256, 64, True),
                                                (112, 32, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fill", [float("nan"), 1000.0])
def test_ce_kernel_any_row_stride(layout, V, block_v, has_bias, dtype, fill):
    """V not a multiple of 16 (130, 301, 50; 256 and 112 are), a body of full tiles and a ragged tail
    (or a tail only: 50 < 512; or no tail: 256 = 4 x 64), 21 rows (the interpreter's 16-row
    programs run past the end); loss and in-place gradient against fp64, and nothing outside the
    view written. The storage outside the view (padding, which an ALIGNED tail also reads and must
    drop) holds NaN (caught if it leaks into a sum) or 1000 (a gradient written there from it is
    inf, visibly not 1000; from NaN it would be NaN again, indistinguishable)."""
    n, eps = 21, 0.1
    g = torch.Generator().manual_seed(V * 3 + block_v)
    logits, aligned = logits_layout(n, V, dtype, layout, fill)  # on DEV
    bias = bias_layout(V, dtype, layout, fill) if has_bias else None
    aligned = aligned and not (layout == "tight_bias" and bias is not None and V % 16)  # no padding behind the bias
    assert ce._ce_aligned(logits, bias) == aligned, "the test meant the other specialisation"
    logits.copy_((torch.randn(n, V, generator=g) * 3).to(dtype))
    z = logits.double().cpu()  # the kernel's inputs, exactly (fp16 or fp32), and their sum with the bias
    if bias is not None:
        bias.copy_((torch.randn(V, generator=g) * 2).to(dtype))
        z = z + bias.double().cpu()
        bias_before = bias.clone()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[[2, 7, 20]] = -100
    labels[[0, 5]] = torch.tensor([0, V - 1])  # first column, last column (in the tail)
    outside = torch.ones(logits.untyped_storage().nbytes() // logits.element_size(), dtype=torch.bool)  # (elements,)
    outside[torch.as_strided(torch.arange(outside.numel()), logits.shape, logits.stride(), logits.storage_offset())
            .flatten()] = False  # storage elements not in the view
    n_valid = int((labels != -100).sum())
    loss_rows = torch.full((n,), float("nan"), device=DEV)
    scale = torch.tensor([1.0 / n_valid], device=DEV)
    ce._launch_ce(logits, bias, labels.to(DEV), loss_rows, scale, eps, -100, True, block_v)

    want_loss, want_grad, lse = kernel_reference(z, labels, eps)
    b_loss, b_grad = kernel_bounds(z, labels, eps, lse, bias)
    assert_close("row loss", loss_rows, want_loss, b_loss)
    # plus one rounding of the stored gradient to the logits' dtype: half an ulp, subnormals included
    fi = torch.finfo(dtype)
    assert_close("d logits", logits, want_grad, b_grad + fi.eps / 2 * torch.clamp(want_grad.abs(), min=fi.tiny))
    flat = torch.empty(0, dtype=dtype, device=DEV).set_(logits.untyped_storage())
    rest = flat.cpu()[outside]
    untouched = torch.isnan(rest) if math.isnan(fill) else rest == fill
    assert bool(untouched.all()), "the kernel wrote outside the (n, V) view"
    if bias is not None:
        assert torch.equal(bias, bias_before), "the kernel wrote the bias"


def test_the_op_hands_the_kernel_aligned_logits():
    """The op's chunk buffer and bias: V stored rounded up to 16 (BERT: 30522 -> 30528), the ALIGNED case."""
    for V in (30522, 301, 256):
        buf, bias = ce._padded((7, V), torch.bfloat16, "cpu"), ce._padded((V,), torch.bfloat16, "cpu")
        assert buf.shape == (7, V) and buf.stride() == (-(-V // 16) * 16, 1) and bias.shape == (V,)
        assert ce._ce_aligned(buf, bias) and ce._ce_aligned(buf)
