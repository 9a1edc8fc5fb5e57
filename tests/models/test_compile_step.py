"""torch.compile(fullgraph=True) of the whole tiny pre-training step on the Triton backends
(attention, ITC, hard-negative sampler, LM cross-entropy; all custom ops, run by the interpreter
on the CPU): no graph break anywhere, and the compiled forward + backward equals eager."""
import copy
import dataclasses

import pytest
import torch

from blipfast.models.blip import BlipForPretraining

from tests.helpers import sharpen_
from tests.ops.test_attention_model import inputs, tiny

pytestmark = [pytest.mark.kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def triton_model(tiny_config, exact_work=False):
    # exact_work off: the packed layout is data-dependent (lengths read on the host), which
    # fullgraph cannot capture; test_packed_step_breaks_only_at_the_packing_layout covers it.
    cfg = dataclasses.replace(tiny(tiny_config, "triton"), loss_backend="triton", exact_work=exact_work)
    torch.manual_seed(0)
    model = BlipForPretraining(cfg)
    sharpen_(model, 0)
    return model.train()


def loss_fn(model):
    def f(images, ids, mask):
        out = model(images, ids, mask, alpha=0.4)  # hard negatives drawn by the fused sampler
        return out.loss, out.loss_itc, out.loss_itm, out.loss_lm
    return f


def test_whole_step_has_no_graph_break(tiny_config):
    model = triton_model(tiny_config)
    images, ids, mask, _ = inputs(model.config)
    explained = torch._dynamo.explain(loss_fn(model))(images, ids, mask)
    reasons = [r.reason for r in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ("flash_attention_fwd", "itc_loss", "sample_negatives", "lm_cross_entropy"):
        assert any(op in t for t in ops), f"blipfast::{op} is not in the captured graph"


@pytest.mark.slow  # 33 s (aot_eager), 76 s (inductor) with cold compile caches; 10-13 s warm
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_equals_eager(tiny_config, backend):
    eager = triton_model(tiny_config)
    compiled_model = triton_model(tiny_config)
    compiled_model.load_state_dict(copy.deepcopy(eager.state_dict()))
    images, ids, mask, _ = inputs(eager.config)

    torch.manual_seed(7)
    want = loss_fn(eager)(images, ids, mask)
    want[0].backward()
    # fallback_random: inductor draws the kernels' seeds with aten's RNG, as eager does
    with torch._inductor.config.patch(fallback_random=True):
        step = torch.compile(loss_fn(compiled_model), fullgraph=True, backend=backend)
        torch.manual_seed(7)
        got = step(images, ids, mask)
        got[0].backward()
    for name, a, e in zip(("loss", "itc", "itm", "lm"), got, want):
        assert abs(a.item() - e.item()) <= 1e-5 * max(1.0, abs(e.item())), f"{name}: {a.item()} vs {e.item()}"
    grads = dict(compiled_model.named_parameters())
    n_compared = 0
    for name, p in eager.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        n_compared += 1
    assert n_compared > 20
    assert torch.equal(compiled_model.queue_ptr, eager.queue_ptr)


def test_packed_step_breaks_only_at_the_packing_layout(tiny_config):
    """With exact work (the default) the step graph-breaks where the packed layout is read on the
    host, and nowhere in attention or the losses."""
    model = triton_model(tiny_config, exact_work=True)
    images, ids, mask, _ = inputs(model.config)
    explained = torch._dynamo.explain(loss_fn(model))(images, ids, mask)
    frames = ["\n".join(str(f) for f in (r.user_stack or [])[-2:]) for r in explained.break_reasons]
    for frame in frames:
        assert "kernels" not in frame and "losses" not in frame and "attention" not in frame, frame
    assert explained.graph_break_count > 0, "the packed step was expected to read its layout on the host"
