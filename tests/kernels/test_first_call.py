"""The first call of every blipfast custom op in a brand-new process: eagerly on CPU tensors
(the Triton interpreter) and on fake tensors. A fresh process is what a user's first call is,
and what an earlier CI flake (MemoryError('std::bad_alloc') from the dispatcher on the first
call of blipfast::flash_attention_fwd in the first pytest process after a fresh venv) hit."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernels

FIRST_CALLS = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import blipfast.kernels as K
from blipfast.kernels import cross_entropy, itc

def calls(t):
    q = t(2, 2, 5, 16)
    out = K.attention(q, q, q, causal=True)
    assert out.shape == (2, 2, 5, 16)
    f = torch.nn.functional.normalize(t(4, 8), dim=-1)
    queue = torch.nn.functional.normalize(t(8, 6), dim=0)
    loss, s1, s2 = itc.itc_loss(f, f, f, f, queue, queue, torch.full((1,), 0.07), 0.4)
    assert s1.shape == (4, 4)
    n1, n2 = itc.sample_hard_negatives(s1, s2, seed=3)
    assert n1.shape == (4,)
    ce = cross_entropy.lm_cross_entropy(t(6, 16), t(30, 16), t(30), torch.arange(6) % 30)
    return out, loss, ce

torch.manual_seed(0)
real = calls(lambda *s: torch.randn(*s))
assert all(torch.isfinite(x).all() for x in real), real
with FakeTensorMode():
    calls(lambda *s: torch.randn(*s))
print("first calls ok")
"""


def test_first_custom_op_calls_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", FIRST_CALLS], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "first calls ok" in res.stdout, res.stderr[-4000:]
