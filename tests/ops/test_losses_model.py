"""A tiny BlipForPretraining gives the same losses and gradients with loss_backend="triton"
(the fused kernels, interpreted on the CPU) as with the reference backend, over two training
steps (momentum update, queue overwrite right after the ITC loss) with fixed negatives; and the
triton backend's own sampling draws valid negatives. Also: backend resolution, and the
retrieval helpers (`LossBackend.itc_loss` with ids, `retrieval_negatives`, the gathers)."""
import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from blipfast import BlipForPretraining
from blipfast.ops import losses as L

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf arithmetic in the interpreter

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes exact fp32 dots; on a GPU the fused ITC uses "tf32x3" (about fp32)
RTOL = 1e-4 if DEV == "cuda" else 1e-5


def tiny_models(cfg):
    cfg.text.hidden_dropout_prob = 0.0
    cfg.text.attention_probs_dropout_prob = 0.0
    cfg.loss_backend = "reference"
    torch.manual_seed(0)
    ref_model = BlipForPretraining(cfg).to(DEV).train()
    fused_cfg = copy.deepcopy(cfg)
    fused_cfg.loss_backend = "triton"
    fused = BlipForPretraining(fused_cfg).to(DEV).train()
    fused.load_state_dict(ref_model.state_dict())
    return ref_model, fused


def batch(cfg, B=4, L_=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(7, cfg.text.vocab_size, (B, L_), generator=g)
    lengths = torch.tensor([L_, L_ - 3, 5, L_ - 1])[:B]
    mask = (torch.arange(L_)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, cfg.text.pad_token_id)
    ids[:, 0] = cfg.text.cls_token_id
    return images.to(DEV), ids.to(DEV), mask.to(DEV)


def test_tiny_pretraining_same_losses_and_grads(tiny_config):
    ref_model, fused = tiny_models(tiny_config)
    assert fused.losses.name == "triton" and ref_model.losses.name == "reference"
    for step, negatives in enumerate([(torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1])),
                                      (torch.tensor([3, 2, 1, 0]), torch.tensor([1, 2, 3, 0]))]):
        images, ids, mask = batch(tiny_config, seed=step)
        negatives = tuple(n.to(DEV) for n in negatives)
        out_r = ref_model(images, ids, mask, alpha=0.4, negatives=negatives)
        out_f = fused(images, ids, mask, alpha=0.4, negatives=negatives)
        for name in ("loss_itc", "loss_itm", "loss_lm", "loss"):
            a, b = getattr(out_f, name), getattr(out_r, name)
            assert torch.allclose(a.float(), b.float(), rtol=RTOL, atol=1e-6), f"step {step} {name}: {a} vs {b}"
        out_r.loss.backward()
        out_f.loss.backward()  # the queues were overwritten in place during this forward
        for name in ("image_queue", "text_queue", "queue_ptr"):
            assert torch.equal(getattr(fused, name), getattr(ref_model, name)), name
    # gradients accumulated over both steps, parameter by parameter
    grads_r = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    grads_f = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    assert grads_r.keys() == grads_f.keys() and "temp" in grads_r and "text_decoder.cls.predictions.bias" in grads_r
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads_r.values()))
    for n, g in grads_r.items():
        # relative to the parameter's own gradient, with a floor at 1e-6 of the total (grads
        # that are zero in exact arithmetic are rounding noise in both)
        err = float((grads_f[n].double() - g.double()).norm())
        assert err <= 10 * RTOL * float(g.double().norm()) + 1e-6 * float(total), f"{n}: grad err {err:.3e}"


def test_fused_backend_samples_valid_negatives(tiny_config):
    _, fused = tiny_models(tiny_config)
    images, ids, mask = batch(tiny_config)
    torch.manual_seed(1)
    out = fused(images, ids, mask, alpha=0.4)
    neg_img, neg_txt = out.negatives
    rows = torch.arange(4, device=DEV)
    assert bool(((neg_img != rows) & (neg_txt != rows)).all())
    assert bool(((neg_img >= 0) & (neg_img < 4) & (neg_txt >= 0) & (neg_txt < 4)).all())
    assert torch.isfinite(out.loss)
    out.loss.backward()  # the sampled negatives feed a differentiable ITM pass


def test_resolve_losses():
    assert L.resolve_losses("reference").name == "reference"
    assert L.resolve_losses("triton").name == "triton"  # interpreter on CPU, kernels on CUDA
    expected = "triton" if torch.cuda.is_available() else "reference"
    assert L.resolve_losses("auto").name == expected
    with pytest.raises(L.BackendUnavailable, match="unknown loss backend 'nope'"):
        L.resolve_losses("nope")


def _retrieval_inputs(B=6, E=32, Q=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    feats = [unit(B, E) for _ in range(4)]
    queues = [unit(Q, E).T.contiguous() for _ in range(2)]
    idx = torch.tensor([5, 1, 5, 2, 9, 1])[:B]
    idx_queue = torch.randint(0, 10, (Q,), generator=g)
    idx_queue[::4] = -100
    return feats, queues, idx, idx_queue


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_backend_retrieval_itc_matches_reference(name):
    feats, queues, idx, idx_queue = _retrieval_inputs()
    backend = L.resolve_losses(name)
    temp = torch.tensor([0.07])
    f0 = feats[0].clone().requires_grad_(True)
    loss, s_i2t, s_t2i = backend.itc_loss(f0.to(DEV), feats[1].to(DEV), feats[2].to(DEV), feats[3].to(DEV),
                                          queues[0].to(DEV), queues[1].to(DEV), temp.to(DEV), 0.4,
                                          idx=idx.to(DEV), idx_queue=idx_queue.to(DEV))
    f0r = feats[0].double().requires_grad_(True)
    want = L.ref.itc_loss_retrieval(f0r, *(t.double() for t in feats[1:] + queues), idx, idx_queue,
                                    temp.double(), 0.4)
    loss.backward()
    want.backward()
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-5
    assert float((f0.grad.double() - f0r.grad).abs().max()) < 1e-5
    assert s_i2t.shape == (6, 6) and not s_i2t.requires_grad


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_backend_retrieval_negatives_single_process(name):
    """World size 1: candidates are the local batch; the same-id columns are never drawn."""
    feats, _, idx, _ = _retrieval_inputs()
    backend = L.resolve_losses(name)
    temp = torch.tensor([0.07], device=DEV)
    gen = torch.Generator(device="cpu" if name == "triton" else DEV).manual_seed(0)
    for _ in range(5):
        neg_img, neg_txt = backend.retrieval_negatives(feats[0].to(DEV), feats[1].to(DEV), idx.to(DEV), temp,
                                                       all_ranks=True, generator=gen)
        for neg in (neg_img, neg_txt):
            assert neg.shape == (6,) and neg.dtype == torch.int64
            assert bool((idx.to(DEV)[neg] != idx.to(DEV)).all())
    x = torch.randn(3, 2, requires_grad=True)
    assert L.all_gather_with_grad(x) is x and L.concat_all_gather(x) is x


def _gloo_worker(rank, world, store, name, result_q):
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from blipfast.ops import losses as L_

        feats, _, idx, _ = _retrieval_inputs(seed=0)  # the same global data on both ranks
        lo, hi = rank * 3, rank * 3 + 3
        backend = L_.resolve_losses(name)
        temp = torch.tensor([0.07])
        neg_img, neg_txt = backend.retrieval_negatives(feats[0][lo:hi], feats[1][lo:hi], idx[lo:hi], temp,
                                                       all_ranks=True, generator=torch.Generator().manual_seed(rank))
        # gradient through the gather: rank r's slice gets the sum of both ranks' upstream grads
        x = (torch.arange(3.0) + 10 * rank).requires_grad_(True)
        gathered = L_.all_gather_with_grad(x)
        (gathered * (torch.arange(6.0) + 1) * (rank + 1)).sum().backward()
        result_q.put((rank, neg_img.tolist(), neg_txt.tolist(), gathered.tolist(), x.grad.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_retrieval_negatives_and_gather_two_processes_gloo():
    """2 ranks x 3 samples: negatives index the gathered 6-sample batch, skip same-id samples,
    and all_gather_with_grad's backward sums both ranks' gradients."""
    import torch.multiprocessing as mp

    # a file store, not a TCP port: a port picked here could be taken before the workers bind it
    store = os.path.join(tempfile.mkdtemp(), "store")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, store, "triton", q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    idx = [5, 1, 5, 2, 9, 1]
    for rank, (neg_img, neg_txt, gathered, grad) in results.items():
        assert gathered == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
        lo = rank * 3
        for neg in (neg_img, neg_txt):
            assert all(0 <= j < 6 and idx[j] != idx[lo + i] for i, j in enumerate(neg))
        # d/dx of sum_r (r + 1) * sum_j (j + 1) * gathered_j, for this rank's slice
        assert grad == [3.0 * (lo + i + 1) for i in range(3)]
