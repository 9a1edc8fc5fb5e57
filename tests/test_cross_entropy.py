"""Fused LM head + label-smoothed cross-entropy (blipfast.kernels.cross_entropy) against the fp64
reference: loss and the gradients of hidden, weight and bias, chunked over rows and vocabulary
at awkward sizes; ignore_index, bad inputs. Runs under TRITON_INTERPRET=1 on the CPU."""
import pytest
import torch

from blipfast.kernels import cross_entropy as ce
from blipfast.kernels import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy log(0) on masked rows in the interpreter

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(name, got, want, tol):
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{name}: NaN/inf pattern differs"
    err = (got - want).abs().nan_to_num(0.0)
    worst = int(err.argmax()) if err.numel() else 0
    assert float(err.max()) <= tol, (f"{name}: max err {float(err.max()):.3e} > tol {tol:.3e} at flat index "
                                     f"{worst}; mean err {float(err.mean()):.3e}")


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


def check(got, exact, baseline, dtype, slack=3.0):
    """err(kernel) <= slack * err(PyTorch baseline) + 2 ulps of the output dtype at its scale."""
    for name, g, w, b in zip(("loss", "hidden", "weight", "bias"), got, exact, baseline):
        if w is None:
            assert g is None
            continue
        eps = torch.finfo(dtype).eps
        scale = max(1e-6, float(w.abs().max()))
        base_err = float((b.double().cpu() - w).abs().max())
        assert_close(name, g, w, slack * base_err + 2 * eps * scale)


def run_case(N, C, V, n_ignored, dtype, eps=0.1, chunk_rows=None, bias=True, block_v=None):
    x = make_inputs(N, C, V, n_ignored, seed=N * 7 + V, bias=bias)
    rounded = [None if t is None else t.to(dtype).double() for t in x[:3]] + [x[3]]
    exact = grads_of(ref.lm_cross_entropy, rounded, torch.float64, "cpu", label_smoothing=eps)
    # PyTorch's own error in the same dtype (its logits are rounded to it too, as are the kernel's)
    baseline = grads_of(ref.lm_cross_entropy, rounded, dtype, "cpu", label_smoothing=eps)
    got = grads_of(ce.lm_cross_entropy, rounded, dtype, DEV, label_smoothing=eps, chunk_rows=chunk_rows,
                   block_v=block_v)
    check(got, exact, baseline, dtype)


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
    check(got, exact, baseline, dtype, slack=2.0)


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
