"""Packed text: the layout helpers, every backend's `varlen` attention against the packed
reference semantics (`blipfast.kernels.reference.varlen_attention`), and dropout on packed rows
(kept fraction, expectation, no draws for padding)."""
import dataclasses
import math

import pytest
import torch

from blipfast.kernels import reference as ref
from blipfast.models.med import TextTransformer
from blipfast.ops.attention import resolve_attention
from blipfast.ops.packing import Packing, pad_packed, unpad


def cu_of(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def test_layout_round_trip():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    p = Packing.from_mask(mask)
    assert (p.total, p.max_len) == (8, 4)
    assert p.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert p.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 8] and p.first_rows().tolist() == [0, 3, 4]
    x = torch.randn(3, 4, 5)
    packed = p.pack(x)
    padded, m = pad_packed(packed, p.cu_seqlens, p.max_len)
    assert torch.equal(m, mask.bool())
    assert torch.equal(padded[m], x[mask.bool()]) and torch.equal(padded[~m], torch.zeros(4, 5))
    assert torch.equal(unpad(padded, p.cu_seqlens, p.total), packed)


CASES = [  # (query lengths, key lengths, causal)
    ([1, 7, 3, 12], [1, 7, 3, 12], True),  # decoder self-attention
    ([1, 7, 3, 12], [1, 7, 3, 12], False),  # encoder self-attention
    ([1, 1, 1, 1], [1, 7, 3, 12], False),  # first rows only against every key
    ([2, 5, 1, 4], [9, 9, 9, 9], False),  # cross-attention to dense image tokens
    ([3, 2], [0, 4], False),  # a sequence with no key attends to nothing
]


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_varlen_matches_packed_reference(backend, case):
    lq, lk, causal = CASES[case]
    dtype = torch.float32 if backend == "triton" else torch.float64  # the Triton kernels take fp16/bf16/fp32
    g = torch.Generator().manual_seed(case)
    H, D = 2, 16
    q = torch.randn(sum(lq), H, D, generator=g, dtype=dtype) * 2
    k = torch.randn(sum(lk), H, D, generator=g, dtype=dtype) * 2
    v = torch.randn(sum(lk), H, D, generator=g, dtype=dtype)
    cu_q, cu_k = cu_of(lq), cu_of(lk)
    if causal:
        cu_k = cu_q  # self-attention: one layout
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    out = resolve_attention(backend).varlen(qa, ka, va, cu_q, cu_k, max(lq), max(lk), causal=causal)
    exp = ref.varlen_attention(qb, kb, vb, cu_q, cu_k, causal=causal)
    w = torch.randn(out.shape, generator=g, dtype=dtype)
    (out * w).sum().backward()
    (exp * w).sum().backward()
    # fp64: rounding only; fp32 (triton interpreter, exact fp32 dots): ~1e-6 relative per op
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in ((out, exp), (qa.grad, qb.grad), (ka.grad, kb.grad), (va.grad, vb.grad)):
        assert torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_varlen_dropout_kept_fraction_and_expectation(backend):
    """Uniform attention (q = 0) over values 1: each output is (kept keys / Lk) / (1 - p)."""
    attn = resolve_attention(backend)
    lengths, H, D, p = [1, 5, 16, 9], 4, 8, 0.3
    cu, T = cu_of(lengths), sum(lengths)
    q, k = torch.zeros(T, H, D, dtype=torch.float64), torch.randn(T, H, D, dtype=torch.float64)
    v = torch.ones(T, H, D, dtype=torch.float64)
    torch.manual_seed(0)
    n = 200
    kept = torch.stack([attn.varlen(q, k, v, cu, cu, max(lengths), max(lengths), dropout_p=p)[..., 0] * (1 - p)
                        for _ in range(n)])  # (n, T, H): kept fraction of each row's keys
    # a row of sequence b averages Lk_b Bernoulli(1 - p) draws: variance p (1 - p) / Lk_b
    var = torch.tensor([p * (1 - p) / L for L in lengths for _ in range(L)], dtype=torch.float64)  # (T,)
    sigma = math.sqrt(float(var.sum()) * H / n) / (T * H)
    assert abs(float(kept.mean()) - (1 - p)) < 5 * sigma
    # expectation of the output with real values: the dropout-free output
    v = torch.randn(T, H, D, dtype=torch.float64)
    q = torch.randn(T, H, D, dtype=torch.float64)
    exact = attn.varlen(q, k, v, cu, cu, max(lengths), max(lengths))
    draws = torch.stack([attn.varlen(q, k, v, cu, cu, max(lengths), max(lengths), dropout_p=p) for _ in range(n)])
    z = (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(n) + 1e-12)
    assert float(z.abs().max()) < 6.0  # 576 outputs: |z| > 6 has probability ~1e-6 under the null


def test_packed_text_dropout_draws_only_real_rows_and_keeps_the_distribution(tiny_config):
    """Hidden dropout in the packed encoder: drawn on the real rows only (no noise spent on or
    applied to padding), kept fraction 1 - p, and the same mean [CLS] state as the padded path."""
    p = 0.25
    tc = dataclasses.replace(tiny_config.text, hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    torch.manual_seed(0)
    enc = TextTransformer(tc, "reference").double().train()
    lengths, L = [1, 6, 3, 10], 10
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(10, tc.vocab_size, (4, L)).masked_fill(mask == 0, 0)
    ids[:, 0] = tc.cls_token_id
    packing = Packing.from_mask(mask)
    seen = []
    hook = enc.embeddings.dropout.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    out = enc.forward_packed(ids, packing)
    hook.remove()
    x_in, x_out = seen[0]
    assert out.shape == (sum(lengths), tc.hidden_size) and x_in.shape[0] == sum(lengths)  # real rows only
    kept = float((x_out != 0).double().mean())
    n = x_out.numel()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # same distribution: the [CLS] states' mean over draws agrees with the padded path's
    draws = 300
    with torch.no_grad():
        packed = torch.stack([enc.forward_packed(ids, packing, first_only=True) for _ in range(draws)])
        padded = torch.stack([enc(ids, mask)[:, 0] for _ in range(draws)])
    diff = packed.mean(0) - padded.mean(0)
    se = torch.sqrt(packed.var(0) / draws + padded.var(0) / draws)
    assert float((diff.abs() / se).max()) < 6.0  # 384 outputs: |z| > 6 has probability ~1e-6
