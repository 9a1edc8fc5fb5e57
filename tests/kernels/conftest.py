"""Fixtures shared by the kernel tests."""
import importlib

import pytest

fa = importlib.import_module("blipfast.kernels.flash_attention")


@pytest.fixture(params=[False, True], ids=["two_kernel", "fused_dq"])
def backward_path(request, monkeypatch):
    """Runs a test under both backwards: dQ and dK/dV kernels (7 matmuls per tile), and the
    deterministic fused one (`fa.backward` / `fa.varlen_backward` with FUSED_DQ: 5 matmuls, one
    program per (batch, head), or per group of packed sequences; test_varlen_attention uses it too).
    The spy checks the path really taken: a fused backward launches one kernel, "dkdv_fused"."""
    monkeypatch.setattr(fa, "FUSED_DQ", request.param)
    kinds = []
    real_launch = fa._launch

    def spy(kind, *args, **kwargs):
        kinds.append(kind)
        return real_launch(kind, *args, **kwargs)

    monkeypatch.setattr(fa, "_launch", spy)
    yield request.param
    backward_kinds = [k for k in kinds if k != "fwd"]
    if backward_kinds:  # (a test may run forwards only)
        if request.param:
            assert set(backward_kinds) == {"dkdv_fused"}, kinds
        else:
            assert "dkdv_fused" not in backward_kinds and {"dq", "dkdv"} <= set(backward_kinds), kinds
