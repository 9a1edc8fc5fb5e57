"""Flash-attention Triton kernels and their host launchers (forward, backward, dropout mask).

One kernel family serves every attention BLIP runs: bidirectional or causal self-attention and
cross-attention (Lq != Lk), with an optional key padding mask and in-kernel Philox dropout. The
variants are `tl.constexpr` specialisations (IS_CAUSAL, HAS_MASK, HAS_DROPOUT, EVEN_M, EVEN_N,
UPCAST), not copies.

Layout: q (B, H, Lq, D), k/v (B, H, Lk, D) with any strides (the model hands over strided views
of a fused qkv projection); every kernel takes all four strides of every tensor. The output and
the gradients are allocated (B, L, H, D) in memory and returned as (B, H, L, D) views, which is
the layout the model merges heads from without a copy.

Numerics: scores, softmax statistics and accumulators are fp32. The softmax runs in base 2
(qk_scale = softmax_scale * log2(e)); the forward stores LSE2 = m + log2(l) per row, and +inf for
a row with no allowed key, so that every recomputed probability of such a row is exactly 0
(output 0, gradients 0: `reference.attention`'s definition).

Dropout: element (b, h, i, j) is kept when `tl.rand(seed, ((b*H + h)*Lq + i)*Lk + j) >= p`; the
forward and both backward kernels regenerate the same bits, and `dropout_keep_mask` materialises
them for tests.

This module holds no autograd logic; `attention.py` builds the custom op and the public function.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _allowed(rows, cols, kpm, Lk, CHECK_BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
             IS_CAUSAL: tl.constexpr):
    """Which (row, col) scores may be attended. rows/cols/kpm broadcast against each other."""
    ok = cols >= 0  # all True, in the broadcast shape of cols
    if CHECK_BOUNDS:
        ok = ok & (cols < Lk)
    if HAS_MASK:
        ok = ok & kpm
    if IS_CAUSAL:
        ok = ok & (cols <= rows)  # top-left aligned: query i sees keys j <= i
    return ok


@triton.jit
def _key_mask(KPM, cols, smn, Lk, HAS_MASK: tl.constexpr):
    """Key padding bits of `cols` (True = real key); all True (and unused) without a mask."""
    if HAS_MASK:
        return tl.load(KPM + cols * smn, mask=cols < Lk, other=0) != 0
    return cols >= 0


@triton.jit
def _dropout_keep(seed, bh, Lq, Lk, rows, cols, dropout_p):
    """Keep-bits of elements (bh, rows, cols); rows/cols broadcast (either orientation)."""
    offsets = (bh.to(tl.int64) * Lq + rows) * Lk + cols  # int64: B*H*Lq*Lk can pass 2**31
    return tl.rand(seed, offsets) >= dropout_p


# ---------------------------------------------------------------------------------------------
# loop bodies. Each kernel runs its loop as `for ... in range(lo, hi, BLOCK)` on a GPU (pipelined
# by num_stages) and as a `while` loop under the interpreter: with numpy >= 2.4 the interpreter's
# `range` rejects a runtime bound (its scalars are 1-element arrays), while `while` only needs bool.


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, KPM, start_n, offs_m, offs_n, offs_d, skn, skd, svn, svd, smn,
              Lq, Lk, bh, qk_scale, dropout_p, seed,
              IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_N: tl.constexpr):
    """One key tile of the online softmax: returns the updated (acc, m_i, l_i)."""
    cols = start_n + offs_n
    k_ptrs = K + cols[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + cols[:, None] * svn + offs_d[None, :] * svd
    if EVEN_N:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=cols[:, None] < Lk, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < Lk, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
    if HAS_MASK or IS_CAUSAL or not EVEN_N:
        kpm = _key_mask(KPM, cols, smn, Lk, HAS_MASK)
        ok = _allowed(offs_m[:, None], cols[None, :], kpm[None, :], Lk, not EVEN_N, HAS_MASK, IS_CAUSAL)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no allowed key so far has m_new = -inf: shift by 0 instead (exp2(-inf) = 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, Lq, Lk, offs_m[:, None], cols[None, :], dropout_p)
        p = tl.where(keep, p, 0.0)  # the 1 / (1 - p) rescale is applied once, at the end
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, KPM, start_n, offs_m, offs_n, offs_d, skn, skd, svn, svd, smn,
             Lq, Lk, bh, qk_scale, dropout_p, seed,
             IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_N: tl.constexpr):
    """One key tile of dQ += dS K, with dS = P * (dP - delta) recomputed from the stored LSE."""
    cols = start_n + offs_n
    k_ptrs = K + cols[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + cols[:, None] * svn + offs_d[None, :] * svd
    if EVEN_N:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=cols[:, None] < Lk, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < Lk, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    # Keys past Lk need no bounds mask here: they were loaded as 0, so they add ds * 0 to dq.
    if HAS_MASK or IS_CAUSAL:
        kpm = _key_mask(KPM, cols, smn, Lk, HAS_MASK)
        ok = _allowed(offs_m[:, None], cols[None, :], kpm[None, :], Lk, False, HAS_MASK, IS_CAUSAL)
        s = tl.where(ok, s, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])  # exact probabilities; 0 in rows with lse = +inf
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, Lq, Lk, offs_m[:, None], cols[None, :], dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit
def _dkdv_step(dk, dv, k, v, kpm, Q, DO, LSE, DELTA, start_m, offs_m, offs_n, offs_d, sqm, sqd, sdom, sdod,
               Lq, Lk, bh, qk_scale, dropout_p, seed,
               IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_M: tl.constexpr):
    """One query tile of dV += P^T dO and dK += dS^T Q, computed transposed (keys along rows)."""
    rows = start_m + offs_m
    q_ptrs = Q + rows[:, None] * sqm + offs_d[None, :] * sqd
    do_ptrs = DO + rows[:, None] * sdom + offs_d[None, :] * sdod
    if EVEN_M:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(LSE + rows)
        delta = tl.load(DELTA + rows)
    else:
        q = tl.load(q_ptrs, mask=rows[:, None] < Lq, other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None] < Lq, other=0.0)
        # lse = +inf makes every probability of a query row past Lq exactly 0.
        lse = tl.load(LSE + rows, mask=rows < Lq, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < Lq, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
    # Keys past Lk need no bounds mask: their dK/dV rows are never stored.
    if HAS_MASK or IS_CAUSAL:
        ok = _allowed(rows[None, :], offs_n[:, None], kpm[:, None], Lk, False, HAS_MASK, IS_CAUSAL)
        s_t = tl.where(ok, s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse[None, :])
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
    if HAS_DROPOUT:
        keep_t = _dropout_keep(seed, bh, Lq, Lk, rows[None, :], offs_n[:, None], dropout_p)
        pd_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
        dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
    else:
        pd_t = p_t
    dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_fwd(
    Q, K, V, O, LSE, KPM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, smb, smn,
    H, Lq, Lk, qk_scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET,  # only read by the autotuner's key
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64 so that batch offsets cannot overflow
    bh = b * H + h
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    KPM += b * smb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    if EVEN_M:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < Lq, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)  # keys past the block's last query are unseen
    if INTERPRET:
        start_n = 0
        while start_n < hi:
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, KPM, start_n, offs_m, offs_n, offs_d, skn, skd,
                                      svn, svd, smn, Lq, Lk, bh, qk_scale, dropout_p, seed, IS_CAUSAL,
                                      HAS_MASK, HAS_DROPOUT, UPCAST, DOT_PREC, EVEN_N)
            start_n += BLOCK_N
    else:
        for start_n in range(0, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, KPM, start_n, offs_m, offs_n, offs_d, skn, skd,
                                      svn, svd, smn, Lq, Lk, bh, qk_scale, dropout_p, seed, IS_CAUSAL,
                                      HAS_MASK, HAS_DROPOUT, UPCAST, DOT_PREC, EVEN_N)

    empty = l_i == 0.0  # no allowed key in the whole row
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + offs_m[:, None] * som + offs_d[None, :] * sod
    if EVEN_M:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
        tl.store(LSE + bh * Lq + offs_m, lse)
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Lq)
        tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)


# ---------------------------------------------------------------------------------------------
# backward: dQ (also computes delta = rowsum(dO * O)), then dK and dV. No atomics: each program
# owns its output rows, so the backward is deterministic.


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, KPM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd, smb, smn,
    H, Lq, Lk, qk_scale, sm_scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    DO += b * sdob + h * sdoh
    DQ += b * sdqb + h * sdqh
    KPM += b * smb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    q_ptrs = Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    o_ptrs = O + offs_m[:, None] * som + offs_d[None, :] * sod
    do_ptrs = DO + offs_m[:, None] * sdom + offs_d[None, :] * sdod
    if EVEN_M:
        q = tl.load(q_ptrs)
        o = tl.load(o_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(LSE + bh * Lq + offs_m)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,) rowsum(dO * O)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=row_ok)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    if INTERPRET:
        start_n = 0
        while start_n < hi:
            dq = _dq_step(dq, q, do, lse, delta, K, V, KPM, start_n, offs_m, offs_n, offs_d, skn, skd, svn, svd,
                          smn, Lq, Lk, bh, qk_scale, dropout_p, seed, IS_CAUSAL, HAS_MASK, HAS_DROPOUT,
                          UPCAST, DOT_PREC, EVEN_N)
            start_n += BLOCK_N
    else:
        for start_n in range(0, hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, K, V, KPM, start_n, offs_m, offs_n, offs_d, skn, skd, svn, svd,
                          smn, Lq, Lk, bh, qk_scale, dropout_p, seed, IS_CAUSAL, HAS_MASK, HAS_DROPOUT,
                          UPCAST, DOT_PREC, EVEN_N)

    dq = dq * sm_scale
    dq_ptrs = DQ + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd
    if EVEN_M:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smn,
    H, Lq, Lk, qk_scale, sm_scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DK += b * sdkb + h * sdkh
    DV += b * sdvb + h * sdvh
    LSE += bh * Lq
    DELTA += bh * Lq
    KPM += b * smb

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Lk
    k_ptrs = K + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + offs_n[:, None] * svn + offs_d[None, :] * svd
    if EVEN_N:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kpm = _key_mask(KPM, offs_n, smn, Lk, HAS_MASK)  # (BLOCK_N,), fixed for the whole program

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = pid_n * BLOCK_N  # queries before the block's first key see none of its keys
    if INTERPRET:
        start_m = lo
        while start_m < Lq:
            dk, dv = _dkdv_step(dk, dv, k, v, kpm, Q, DO, LSE, DELTA, start_m, offs_m, offs_n, offs_d, sqm, sqd,
                                sdom, sdod, Lq, Lk, bh, qk_scale, dropout_p, seed, IS_CAUSAL, HAS_MASK,
                                HAS_DROPOUT, UPCAST, DOT_PREC, EVEN_M)
            start_m += BLOCK_M
    else:
        for start_m in range(lo, Lq, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, kpm, Q, DO, LSE, DELTA, start_m, offs_m, offs_n, offs_d, sqm, sqd,
                                sdom, sdod, Lq, Lk, bh, qk_scale, dropout_p, seed, IS_CAUSAL, HAS_MASK,
                                HAS_DROPOUT, UPCAST, DOT_PREC, EVEN_M)

    dk = dk * sm_scale
    dk_ptrs = DK + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
    dv_ptrs = DV + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd
    if EVEN_N:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(OUT, H, Lq, Lk, dropout_p, seed,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT: int8 (B, H, Lq, Lk) contiguous, 1 where the attention kernels keep the element."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, Lq, Lk, rows[:, None], cols[None, :], dropout_p)
    ptrs = OUT + (bh * Lq + rows[:, None]) * Lk + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < Lq) & (cols[None, :] < Lk))


# ---------------------------------------------------------------------------------------------
# block sizes: one fixed config under the interpreter (its autotuner cannot benchmark), a small
# autotuned space on a GPU keyed on power-of-2 length buckets, head dim and the variant flags.


def interpreting() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_attn_fwd, InterpretedFunction)


# (BLOCK_M, BLOCK_N) under the interpreter, whose cost is per tile, not per element: 64 x 64 was the
# fastest there (N = 197 runs 4 ragged tiles). Tests pass other tilings explicitly.
INTERPRETER_BLOCKS = {"fwd": (64, 64), "dq": (64, 64), "dkdv": (64, 64)}
# fp32 on a GPU (true fp32 dots on FMA units, not a speed path): one fixed (BLOCK_M, BLOCK_N,
# warps, stages); small tiles, because ptxas took a minute over a 64 x 64 tile at head dim 128.
FP32_BLOCKS = {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 4, 2)}

_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT"]


def _gpu_configs(kind: str):
    """A small space (each config costs a compile per variant). wgmma on Hopper wants the M side
    of a dot >= 64: fwd/dq tile queries by 64 or 128; dkdv's dots have keys on the M side."""
    shapes = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4)],
        "dq": [(64, 64, 4, 3), (64, 32, 4, 3)],
        "dkdv": [(32, 64, 4, 3), (64, 128, 8, 2)],
    }[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the sequence (a 128-row tile for 35 queries is mostly padding)
    and the largest tiles at head dim 128 (register pressure)."""
    args = {**named_args, **kwargs}
    lq, lk, d = args["LQ_BUCKET"], args["LK_BUCKET"], args["HEAD_DIM"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(64, lq) and c.kwargs["BLOCK_N"] <= max(64, lk)
            and not (d >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    return kept or configs[:1]


def _quick_bench(kernel_call, quantiles):
    # Short timing runs: these kernels take microseconds, and tuning time counts in every GPU job.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_EVEN = {
    "EVEN_M": lambda a: a["Lq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Lk"] % a["BLOCK_N"] == 0,
}
_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}


@functools.lru_cache(maxsize=None)
def _launcher(kind: str, tuned: bool):
    """The kernel wrapped with the EVEN_* heuristics, and with the autotuner when `tuned` (built
    lazily: nothing here may touch a GPU driver at import time). Tuning results are cached on
    disk (cache_results), so later processes on the same machine skip the search."""
    fn = triton.heuristics(_EVEN)(_KERNELS[kind])
    if tuned:
        fn = triton.autotune(_gpu_configs(kind), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                             do_bench=_quick_bench, cache_results=True)(fn)
    return fn


def _launch(kind: str, grid_rows: int, rows_block: str, n_heads: int, n_batch: int, config, **kwargs):
    """Launch kernel `kind` over (row blocks, heads, batch).

    `config`: (BLOCK_M, BLOCK_N[, num_warps, num_stages]) to force a tiling, or a dict of them by
    kind ("fwd", "dq", "dkdv"); None picks one: the interpreter's fixed blocks, the fixed fp32
    blocks, or the autotuner (fp16/bf16 on a GPU).
    """
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None and interpreting():
        config = INTERPRETER_BLOCKS[kind]
    elif config is None and kwargs["UPCAST"]:
        config = FP32_BLOCKS[kind]
    if config is not None:
        bm, bn, *launch = config
        launch = dict(zip(("num_warps", "num_stages"), launch))
        block = {"BLOCK_M": bm, "BLOCK_N": bn}[rows_block]
        _launcher(kind, False)[(triton.cdiv(grid_rows, block), n_heads, n_batch)](
            BLOCK_M=bm, BLOCK_N=bn, **launch, **kwargs)
    else:
        grid = lambda meta: (triton.cdiv(grid_rows, meta[rows_block]), n_heads, n_batch)  # noqa: E731
        _launcher(kind, True)[grid](**kwargs)


# ---------------------------------------------------------------------------------------------
# host launchers


def _strides(x: torch.Tensor, names: str) -> dict:
    return dict(zip(names.split(), x.stride()))


def _common(q, k, key_padding_mask, causal, dropout_p, seed):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)  # same bytes, a dtype Triton loads everywhere
        mask_strides = {"smb": kpm.stride(0), "smn": kpm.stride(1)}
    else:
        kpm, mask_strides = q, {"smb": 0, "smn": 0}  # dummy pointer, never read (HAS_MASK=False)
    # The interpreter computes bf16 wrongly (triton#11584): there bf16 runs in fp32 tiles. fp16 runs
    # the GPU's own path (fp16 operands, fp32 accumulation), which the interpreter gets right.
    upcast = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting())
    return dict(
        KPM=kpm, **mask_strides, H=H, Lq=Lq, Lk=Lk, dropout_p=float(dropout_p), seed=int(seed),
        LQ_BUCKET=triton.next_power_of_2(Lq), LK_BUCKET=triton.next_power_of_2(Lk),
        HEAD_DIM=D, IS_CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        UPCAST=upcast,
        INTERPRET=interpreting(),
        # fp32 inputs get true fp32 dots (a GPU's default for fp32 tl.dot is TF32).
        DOT_PREC="ieee" if upcast else "tf32",
    )


def empty_blhd(B: int, H: int, L: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, L, D) tensor stored as (B, L, H, D): merging heads afterwards is a free view."""
    return torch.empty(B, L, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _device_guard(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def forward(q, k, v, key_padding_mask: Optional[torch.Tensor], causal: bool, dropout_p: float,
            softmax_scale: float, seed: int, config=None):
    """Launch the forward kernel on validated inputs. Returns (out (B, H, Lq, D), lse2 fp32 (B, H, Lq)).

    `config` (see `_launch`) bypasses the autotuner: tests use it to vary the tiling.
    """
    B, H, Lq, D = q.shape
    out = empty_blhd(B, H, Lq, D, q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    args = _common(q, k, key_padding_mask, causal, dropout_p, seed)
    with _device_guard(q):
        _launch("fwd", Lq, "BLOCK_M", H, B, config, Q=q, K=k, V=v, O=out, LSE=lse,
                **_strides(q, "sqb sqh sqm sqd"), **_strides(k, "skb skh skn skd"),
                **_strides(v, "svb svh svn svd"), **_strides(out, "sob soh som sod"),
                qk_scale=softmax_scale * LOG2E, **args)
    return out, lse


def backward(dout, q, k, v, out, lse, key_padding_mask, causal: bool, dropout_p: float,
             softmax_scale: float, seed: int, config=None):
    """Launch the dQ kernel (which also writes delta), then the dK/dV kernel. Returns (dq, dk, dv)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq = empty_blhd(B, H, Lq, D, q)
    dk = empty_blhd(B, H, Lk, D, k)
    dv = empty_blhd(B, H, Lk, D, v)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    args = _common(q, k, key_padding_mask, causal, dropout_p, seed)
    args.update(qk_scale=softmax_scale * LOG2E, sm_scale=softmax_scale)
    qkv = {**_strides(q, "sqb sqh sqm sqd"), **_strides(k, "skb skh skn skd"), **_strides(v, "svb svh svn svd"),
           **_strides(dout, "sdob sdoh sdom sdod")}
    with _device_guard(q):
        _launch("dq", Lq, "BLOCK_M", H, B, config, Q=q, K=k, V=v, O=out, DO=dout, DQ=dq, LSE=lse,
                DELTA=delta, **qkv, **_strides(out, "sob soh som sod"), **_strides(dq, "sdqb sdqh sdqm sdqd"),
                **args)
        _launch("dkdv", Lk, "BLOCK_N", H, B, config, Q=q, K=k, V=v, DO=dout, DK=dk, DV=dv, LSE=lse,
                DELTA=delta, **qkv, **_strides(dk, "sdkb sdkh sdkn sdkd"),
                **_strides(dv, "sdvb sdvh sdvn sdvd"), **args)
    return dq, dk, dv


def dropout_keep_mask(seed: int, shape, dropout_p: float, device="cpu") -> torch.Tensor:
    """The keep-mask (bool (B, H, Lq, Lk), True = kept) the kernels use for `seed` and `dropout_p`.

    Pass it to `reference.attention(..., dropout_mask=...)` to reproduce a kernel call exactly.
    """
    B, H, Lq, Lk = shape
    out = torch.empty(B, H, Lq, Lk, dtype=torch.int8, device=device)
    if out.numel():
        bm, bn = 32, 32
        with _device_guard(out):
            _dropout_mask_kernel[(triton.cdiv(Lq, bm), triton.cdiv(Lk, bn), B * H)](
                out, H, Lq, Lk, float(dropout_p), int(seed), BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
