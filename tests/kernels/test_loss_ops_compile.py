"""The fused losses as PyTorch custom ops ("blipfast::itc_loss", "blipfast::lm_cross_entropy"):
torch.compile(fullgraph=True) forward + backward equals eager, torch.library.opcheck, and the
fake (meta) implementations give the real outputs' shapes and dtypes. Runs under
TRITON_INTERPRET=1 on the CPU (fp32, small sizes: the compiled graph calls the op, which runs
the interpreted kernels)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from blipfast.kernels import cross_entropy as ce
from blipfast.kernels import itc
from tests.helpers import assert_close

pytestmark = [pytest.mark.kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy inf arithmetic in the interpreter

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ITC_OP = torch.ops.blipfast.itc_loss.default
CE_OP = torch.ops.blipfast.lm_cross_entropy.default
SAMPLE_OP = torch.ops.blipfast.sample_negatives.default
# op arguments after the tensors: alpha, need_grad, ItcKernelConfig's fields (block_m, block_m_grad,
# block_n, num_splits, num_warps, num_stages, precision)
ITC_CFG_ARGS = (None, None, 16, 2, None, None, "ieee")


def itc_inputs(B=6, E=32, Q=40, seed=0, idx=False):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(DEV)

    x = dict(image_feat=unit(B, E), text_feat=unit(B, E), image_feat_m=unit(B, E), text_feat_m=unit(B, E),
             image_queue=unit(Q, E).T.contiguous(), text_queue=unit(Q, E).T.contiguous(),
             temp=torch.tensor([0.07], device=DEV))
    if idx:
        x["idx"] = torch.randint(0, B // 2, (B,), generator=g).to(DEV)
        x["idx_queue"] = torch.randint(0, B, (Q,), generator=g).to(DEV)
    return x


def ce_inputs(N=20, C=32, V=100, n_ignored=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) * (2.0 / C**0.5)
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return [t.to(DEV) for t in (hidden, weight, bias, labels)]


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_itc_compile_fullgraph_matches_eager():
    x = itc_inputs()
    cfg = itc.ItcKernelConfig(block_n=16, num_splits=2, precision="ieee")

    def f(image_feat, text_feat, temp):
        loss, s_i2t, s_t2i = itc.itc_loss(image_feat, text_feat, x["image_feat_m"], x["text_feat_m"],
                                          x["image_queue"], x["text_queue"], temp, 0.4, config=cfg)
        return 2 * loss, s_i2t, s_t2i

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        img, txt, temp = leaves(x["image_feat"], x["text_feat"], x["temp"])
        loss, s_i2t, s_t2i = fn(img, txt, temp)
        assert not s_i2t.requires_grad and not s_t2i.requires_grad
        loss.backward()
        results.append((loss.detach(), s_i2t, s_t2i, img.grad, txt.grad, temp.grad))
    for name, got, want in zip(("loss", "s_i2t", "s_t2i", "d image_feat", "d text_feat", "d temp"), *results[::-1]):
        assert got.dtype == want.dtype, f"compiled {name}: {got.dtype} vs eager {want.dtype}"
        assert_close(f"compiled {name}", got, want, 1e-5 * max(1.0, want.abs().max().item()))


def test_lm_cross_entropy_compile_fullgraph_matches_eager():
    """Also under fp16 autocast: the compute dtype is read from the autocast state in the traced
    wrapper, so the same compiled function must recompile (guard) when autocast turns on."""
    h0, w0, b0, labels = ce_inputs()

    def f(hidden, weight, bias):
        return 3 * ce.lm_cross_entropy(hidden, weight, bias, labels, label_smoothing=0.1, chunk_rows=8)

    compiled = torch.compile(f, fullgraph=True)
    losses = {}
    for autocast in (False, True):
        results = []
        for fn in (f, compiled):
            h, w, b = leaves(h0, w0, b0)
            with torch.autocast(DEV, dtype=torch.float16, enabled=autocast):
                loss = fn(h, w, b)
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad, b.grad))
        for name, got, want in zip(("loss", "d hidden", "d weight", "d bias"), *results[::-1]):
            assert got.dtype == want.dtype, f"compiled {name} (autocast {autocast}): {got.dtype} vs eager {want.dtype}"
            assert_close(f"compiled {name} (autocast {autocast})", got, want, 1e-5 * max(1.0, want.abs().max().item()))
        losses[autocast] = results[1][0]
    assert losses[True] != losses[False]  # fp16 matmuls under autocast: not a stale fp32 graph


# ---------------------------------------------------------------------------------------------
# opcheck: schema (no undeclared mutation or aliasing), autograd registration, fake tensor vs
# real outputs, and AOT dispatch (the op traced by aot_autograd, dynamic shapes, forward and
# backward compared with eager)


def _itc_op_args(need_grad, idx=False):
    x = itc_inputs(B=4, Q=24, seed=1, idx=idx)
    img, txt, temp = (leaves(x["image_feat"], x["text_feat"], x["temp"]) if need_grad
                      else (x["image_feat"], x["text_feat"], x["temp"]))
    return (img, txt, x["image_feat_m"], x["text_feat_m"], x["image_queue"], x["text_queue"], temp, 0.4,
            x.get("idx"), x.get("idx_queue"), need_grad, *ITC_CFG_ARGS)


def _ce_op_args(need_grad, bias=True):
    h, w, b, labels = ce_inputs(N=12, V=60, n_ignored=3, seed=2)
    if need_grad:
        h, w, b = leaves(h, w, b)
    return (h, w, b if bias else None, labels, 0.1, -100, 8, 32, torch.float32, need_grad, need_grad,
            need_grad and bias)


def _sampler_op_args(by_idx=False):
    g = torch.Generator().manual_seed(3)
    sims = torch.randn(6, 5, generator=g) * 3
    ids = (torch.tensor([0, 1, 2, 0, 1, 3]), torch.tensor([0, 1, 2, 3, 4])) if by_idx else (None, None)
    return (sims, torch.tensor(2**40), 2, *ids, True, "bad row")


OPCHECK_CASES = {
    "sampler": (SAMPLE_OP, lambda: _sampler_op_args()),
    "sampler_ids": (SAMPLE_OP, lambda: _sampler_op_args(by_idx=True)),
    "itc": (ITC_OP, lambda: _itc_op_args(True)),
    "itc_ids": (ITC_OP, lambda: _itc_op_args(True, idx=True)),
    "itc_no_grad": (ITC_OP, lambda: _itc_op_args(False)),
    "ce": (CE_OP, lambda: _ce_op_args(True)),
    "ce_no_bias": (CE_OP, lambda: _ce_op_args(True, bias=False)),
    "ce_no_grad": (CE_OP, lambda: _ce_op_args(False)),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(op, make_args())


# ---------------------------------------------------------------------------------------------
# fake implementations (what torch.compile plans with) against the real outputs


@pytest.mark.parametrize("case", list(OPCHECK_CASES) + ["ce_fp16_compute"])
def test_fake_outputs_match_real_shapes_and_dtypes(case):
    if case == "ce_fp16_compute":  # an autocast-style call: fp32 inputs, fp16 matmuls and grad_h
        op, args = CE_OP, list(_ce_op_args(True))
        args[8] = torch.float16
    else:
        op, make_args = OPCHECK_CASES[case]
        args = make_args()
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    if isinstance(real, torch.Tensor):
        real, fake = (real,), (fake,)
    assert len(fake) == len(real)
    for i, (f, r) in enumerate(zip(fake, real)):
        assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device), f"output {i}"
