"""Flash-attention Triton kernels and their host launchers (forward, backward, dropout mask).

One kernel family serves every attention BLIP runs: bidirectional or causal self-attention and
cross-attention (Lq != Lk), with an optional key padding mask, in-kernel Philox dropout, and two
layouts: padded (B, H, L, D) tensors and packed variable-length (total, H, D) sequences with
cumulative lengths. The variants are `tl.constexpr` specialisations (IS_CAUSAL, HAS_MASK, VARLEN,
HAS_DROPOUT, EVEN_M, EVEN_N, UPCAST), not copies.

Padded layout: q (B, H, Lq, D), k/v (B, H, Lk, D) with any strides (the model hands over strided
views of a fused qkv projection); every kernel takes all four strides of every tensor. The output
and the gradients are allocated (B, L, H, D) in memory and returned as (B, H, L, D) views, which is
the layout the model merges heads from without a copy. With a key padding mask, key tiles after a
batch row's last real key are not visited.

Tiles: loops run full BLOCK tiles, then the ragged rest in 16-wide tiles (TAIL); a thin tail of
rows (197 = 3 x 64 + 5; `thin_tail_split`) is a second launch with 16-row tiles, so ViT's 197
tokens compute 208 x 208, not 256 x 256. Masks are applied only where a tile needs them.

Packed layout (VARLEN): the same kernels with B = 1, Lq = total_q, Lk = total_k; a host-built
schedule (`varlen_schedule`, device ops, no sync) gives each program a span of whole sequences, so
several short captions share one query tile (block-diagonal masking) and no program touches a row
outside the packed tensors. Masking is by per-row intervals: query row i sees keys [klo_i, khi_i)
of its own sequence (cut at the diagonal when causal); the dK/dV kernel uses the transposed form.

Numerics: scores, softmax statistics and accumulators are fp32. The softmax runs in base 2
(qk_scale = softmax_scale * log2(e)); the forward stores LSE2 = m + log2(l) per row, and +inf for
a row with no allowed key, so that every recomputed probability of such a row is exactly 0
(output 0, gradients 0: `reference.attention`'s definition).

Dropout: element (b, h, i, j) of the (B, H, Lq, Lk) scores (packed: (1, H, total_q, total_k)) is
kept when its random byte is >= 256 p: one Philox-4x32-7 call serves 8 elements, laid out so that
they are 8 registers of one thread of the MMA accumulator (`_dropout_draws`); p is realised in steps
of 1/256 (p = 0.1 runs at 26/256 = 0.1016, as in FlashAttention-2; `effective_dropout_p`). The
forward and both backward kernels regenerate the same bits; `dropout_keep_mask` materialises them
for tests, `dropout_draws` the bytes. With dropout, packed query tiles start at a multiple of 16
rows (as key tiles always do).

Backward: two schedules, both deterministic. A dQ kernel (S, dP, dQ: 3 matmuls per (query tile,
key tile)) and a dK/dV kernel (S, dP, dV, dK: 4); or the dK/dV kernel alone with FUSED_DQ, 5 matmuls
per tile: each program walks its key tiles in order and adds dS K into fp32 dQ rows only it
touches, so it needs no atomics (16-bit: computed as K^T dS^T, the head dim on the M side of the dot,
so that it runs on wgmma with 16-query tiles); it needs more registers and runs fewer programs
(benchmarks/kernel_audit.py --fused-bwd). Dense: one program per (batch, head). Packed: one per
group of key tiles holding whole sequences (`varlen_fused_schedule`: a tile of several short
sequences, or all chunks of a long one), owning those sequences' query rows; with dropout its query
tiles may start in the sequence before (16-row alignment), and those rows are masked out of its
delta reads and dQ writes. On a GPU the faster schedule is measured per tuning key at the first
backward (`FUSED_DQ`; `backward(fused_dq=...)`, `varlen_backward(fused_dq=...)` force one).

This module holds no autograd logic; `attention.py` builds the custom ops and the public functions.
"""
from __future__ import annotations

import contextlib
import functools
import math
import zlib
from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

from ._common import interpreting  # noqa: F401  (re-exported: flash_attention.interpreting)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# shared device helpers. Masking is by intervals: query row i may attend to keys [klo_i, khi_i)
# (its own sequence's keys, cut at the diagonal when causal), plus the key padding bits in the
# dense layout; the dK/dV kernel uses the transposed form, key j is seen by queries [qlo_j, qhi_j).


@triton.jit
def _key_mask(KPM, cols, smn, Lk, HAS_MASK: tl.constexpr):
    """Key padding bits of `cols` (True = real key); all True (and unused) without a mask."""
    if HAS_MASK:
        return tl.load(KPM + cols * smn, mask=cols < Lk, other=0) != 0
    return cols >= 0


DROPOUT_BITS = 8  # random bits per element: one Philox call (128 bits) covers 16 elements
DROPOUT_LEVELS = 1 << DROPOUT_BITS  # dropout_p is realised as round(256 p) / 256 (`effective_dropout_p`)
# Philox-4x32 with 7 rounds, not Triton's default 10: 7 is the fewest that Salmon et al. (SC 2011,
# "Parallel random numbers: as easy as 1, 2, 3") found to pass TestU01's BigCrush; 10 is their safety margin.
DROPOUT_ROUNDS = tl.constexpr(7)


@triton.jit
def _dropout_threshold(dropout_p):
    """The keep threshold in the top byte: an element is kept when its random byte is >= 256 p."""
    return tl.cast(dropout_p * 256.0 + 0.5, tl.uint32) << 24  # dropout_p is a multiple of 1/256 here


@triton.jit
def _philox(seed, c0, c1, c2):
    """Philox-4x32-R (R = DROPOUT_ROUNDS) of the counter (c0, c1, c2, 0) under the 64-bit key `seed`:
    the same function as tl.philox, written with one 32 x 32 -> 64-bit product per multiplication
    (tl.philox asks for the high and the low half separately, two multiplies where ptxas does not
    merge them)."""
    key = seed.to(tl.uint64)
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    c3 = c0 * 0  # uint32 zeros
    for _ in tl.static_range(DROPOUT_ROUNDS):
        prod0 = c0.to(tl.uint64) * 0xD2511F53
        prod2 = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1, c2, c3 = ((prod2 >> 32).to(tl.uint32) ^ c1 ^ k0, prod2.to(tl.uint32),
                          (prod0 >> 32).to(tl.uint32) ^ c3 ^ k1, prod0.to(tl.uint32))
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(seed, bh, i16, i_off, j16, j_off, threshold):
    """Keep-bits of query rows i = 16 * i16 + i_off and keys j = 16 * j16 + j_off (i_off, j_off
    broadcastable int32 tensors: (R, 1) and (1, C), or transposed for dK/dV) of head `bh`: the
    element's random byte (`_dropout_draws`) is >= 256 p (`threshold` = 256 p << 24,
    `_dropout_threshold`). Callers pass offsets that are a bare arange: the compiler then knows
    each register's word and byte (no per-element selects)."""
    # byte >= t exactly when the word holding the byte on top is >= t << 24 (the bits below the top
    # byte add less than 2**24): one compare per element.
    return _dropout_draws(seed, bh, i16, i_off, j16, j_off) >= threshold


@triton.jit
def _dropout_draws(seed, bh, i16, i_off, j16, j_off):
    """uint32 words whose top byte is the random byte of element (i, j) (`_dropout_keep`'s arguments).

    Element (i, j) draws byte 2 * i[3] + j[3] of word 2 * i[0] + j[0] of
    Philox-4x32-7(seed; 4 * (j >> 4) + j[2:1], 4 * (i >> 4) + i[2:1], bh, 0) (x[k]: bit k of x;
    bytes counted from the least significant). The mask depends only on (seed, bh, i, j), never on
    the tiling, so the forward and both backward kernels regenerate it exactly.

    Why this layout: in every 16 x 16 block, a thread of an MMA accumulator holds rows r, r + 8 and
    columns c, c + 1, c + 8, c + 9 (r, c fixed by its lane; c even): bits 0 and 3 of the row or key
    index change between its registers, bits 1-2 do not. In the (query, key) orientation of the
    forward and dQ, bits i[0] and j[1:2] are the lane's; in dK/dV's (key, query) orientation, j[0:2]
    and i[1:2]. Counters built from neither orientation's register bits, and word and byte picks
    from bits that are register bits in at least one of them, give each thread 8 of a call's 16
    bytes in both orientations (two lanes compute each call), with compile-time word and byte picks
    and no layout conversion. A layout giving a thread all 16 bytes in the forward (a call spanning
    two 16-key blocks) leaves it 4 in dK/dV, the kernel with the fewest elements per thread: 8 and 8
    costs the same Philox work over the three kernels and keeps the worst one cheaper."""
    ih = i16 + (i_off >> 4)
    il = i_off & 15
    jh = j16 + (j_off >> 4)
    jl = j_off & 15
    c0 = (jh * 4 + ((jl >> 1) & 3)).to(tl.uint32)
    c1 = (ih * 4 + ((il >> 1) & 3)).to(tl.uint32)
    r0, r1, r2, r3 = _philox(seed, c0, c1, bh.to(tl.uint32))
    word_sel = (il & 1) * 2 + (jl & 1)
    word = tl.where(word_sel == 0, r0, tl.where(word_sel == 1, r1, tl.where(word_sel == 2, r2, r3)))
    # byte k goes on top by a rotation left by 24 - 8k, not a shift: the compiler pushes a shift into
    # the last Philox round and redoes that round's xor for every element.
    shift = (24 - 8 * (((il >> 3) & 1) * 2 + ((jl >> 3) & 1))).to(tl.uint32)
    return (word << shift) | (word >> ((32 - shift) & 31))


@triton.jit
def _query_tile(pid, b, TILES, SEQ_Q, CU_Q, CU_K, KV_LEN, Lq, Lk, first,
                BLOCK_M: tl.constexpr, VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_DROPOUT: tl.constexpr):
    """This program's query rows (row0 + arange(BLOCK_M); row0 a multiple of 16 with dropout), which
    of them it owns, each row's key interval [klo, khi) and the tile's key range [k_start, k_end)
    (k_start a multiple of 16; empty when no row has a key)."""
    if VARLEN:  # rows = a span of the packed queries from the schedule (whole short sequences)
        lo = tl.load(TILES + 2 * pid)
        hi = tl.load(TILES + 2 * pid + 1)
        row0 = lo
        if HAS_DROPOUT:  # dropout words are laid out per 16 rows (the schedule leaves room: align=16)
            row0 = lo - lo % 16
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = (rows >= lo) & (rows < hi)
        sid = tl.load(SEQ_Q + rows, mask=row_ok, other=0)
        klo = tl.load(CU_K + sid, mask=row_ok, other=0)
        khi = tl.load(CU_K + sid + 1, mask=row_ok, other=0)
        if IS_CAUSAL:  # local key position <= local query position
            khi = tl.minimum(khi, klo + rows - tl.load(CU_Q + sid, mask=row_ok, other=0) + 1)
    else:
        row0 = first + pid * BLOCK_M  # first > 0: a launch over a thin tail (a multiple of 64)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        klo = tl.zeros([BLOCK_M], dtype=tl.int32)
        if HAS_MASK:  # keys after the batch row's last real key are never visited
            khi = tl.where(row_ok, tl.load(KV_LEN + b), 0)
        else:
            khi = tl.where(row_ok, Lk, 0)
        if IS_CAUSAL:  # top-left aligned: query i sees keys j <= i
            khi = tl.minimum(khi, rows + 1)
    khi = tl.maximum(khi, klo)
    k_start = tl.min(tl.where(khi > klo, klo, 2**30))
    k_start = k_start - k_start % 16
    k_end = tl.max(khi)
    return rows, row_ok, klo, khi, k_start, k_end, row0


@triton.jit
def _key_tile(pid, b, TILES, SEQ_K, CU_Q, CU_K, KV_LEN, KPM, smn, Lq, Lk, first,
              BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_DROPOUT: tl.constexpr):
    """The dK/dV program's key columns (base a multiple of 16), which it owns (stores), each key's
    query interval [qlo, qhi) and the query range [q_start, q_end) to visit (q_start a multiple of
    16 with dropout)."""
    if VARLEN:
        lo = tl.load(TILES + 2 * pid)
        hi = tl.load(TILES + 2 * pid + 1)
        cols = lo - lo % 16 + tl.arange(0, BLOCK_N)  # aligned: dropout words are laid out per 16 keys
        col_own = (cols >= lo) & (cols < hi)
        sid = tl.load(SEQ_K + cols, mask=col_own, other=0)
        qlo = tl.load(CU_Q + sid, mask=col_own, other=0)
        qhi = tl.load(CU_Q + sid + 1, mask=col_own, other=0)
        if IS_CAUSAL:  # the first query that sees key j has j's local position
            qlo = qlo + cols - tl.load(CU_K + sid, mask=col_own, other=0)
    else:
        cols = first + pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_own = cols < Lk
        seen = col_own
        if HAS_MASK:
            seen = seen & _key_mask(KPM, cols, smn, Lk, HAS_MASK)
        qhi = tl.where(seen, Lq, 0)
        if IS_CAUSAL:
            qlo = cols
        else:
            qlo = tl.zeros([BLOCK_N], dtype=tl.int32)
    qlo = tl.minimum(qlo, qhi)
    q_start = tl.min(tl.where(qhi > qlo, qlo, 2**30))
    if HAS_DROPOUT:  # dropout words are laid out per 16 query rows
        q_start = q_start - q_start % 16
    q_end = tl.max(qhi)
    return cols, col_own, qlo, qhi, q_start, q_end


# ---------------------------------------------------------------------------------------------
# loop bodies. Each kernel runs its loop as `for ... in range(lo, hi, BLOCK)` on a GPU (pipelined
# by num_stages) and as a `while` loop under the interpreter: with numpy >= 2.4 the interpreter's
# `range` rejects a runtime bound (its scalars are 1-element arrays), while `while` only needs bool.


@triton.jit
def _load_kv(K, V, cols, offs_d, skn, skd, svn, svd, k_end, UPCAST: tl.constexpr, BOUNDED: tl.constexpr):
    k_ptrs = K + cols[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + cols[:, None] * svn + offs_d[None, :] * svd
    if BOUNDED:
        k = tl.load(k_ptrs, mask=cols[:, None] < k_end, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < k_end, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _mask_scores(s, cols, klo, khi, KPM, smn, Lk, k_end, INTERVAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 BOUNDS: tl.constexpr):
    """-inf where query rows may not see key `cols`: per-row intervals (packed sequences, causal)
    as a 2-D test; padding bits and the key range as a cheaper per-column test (the same for
    every row of a padded call). Full tiles of a plain call need nothing."""
    if INTERVAL:
        ok = (cols[None, :] >= klo[:, None]) & (cols[None, :] < khi[:, None])
        if HAS_MASK:
            ok = ok & _key_mask(KPM, cols, smn, Lk, HAS_MASK)[None, :]
        s = tl.where(ok, s, float("-inf"))
    elif HAS_MASK or BOUNDS:
        ok_col = _key_mask(KPM, cols, smn, Lk, HAS_MASK)
        if BOUNDS:
            ok_col = ok_col & (cols < k_end)
        s = tl.where(ok_col[None, :], s, float("-inf"))
    return s


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, KPM, start_n, k_end, rows, klo, khi, offs_n, offs_d, skn, skd, svn, svd,
              smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed,
              INTERVAL: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile of the online softmax: returns the updated (acc, m_i, l_i)."""
    cols = start_n + offs_n
    k, v = _load_kv(K, V, cols, offs_d, skn, skd, svn, svd, k_end, UPCAST, BOUNDS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
    s = _mask_scores(s, cols, klo, khi, KPM, smn, Lk, k_end, INTERVAL, HAS_MASK, BOUNDS)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no allowed key so far has m_new = -inf: shift by 0 instead (exp2(-inf) = 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, r16, roffs[:, None], start_n >> 4, offs_n[None, :],
                             _dropout_threshold(dropout_p))
        # dropped: a zero the compiler cannot see (dropout_p * 0.0): against a literal 0 it moves the
        # select past the bf16 conversion, one 16-bit select plus unpacking per element.
        p = tl.where(keep, p, dropout_p * 0.0)  # the 1 / (1 - p) rescale is applied once, at the end
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, KPM, start_n, k_end, rows, klo, khi, offs_n, offs_d, skn, skd, svn,
             svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed,
             INTERVAL: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile of dQ += dS K, with dS = P * (dP - delta) recomputed from the stored LSE."""
    cols = start_n + offs_n
    k, v = _load_kv(K, V, cols, offs_d, skn, skd, svn, svd, k_end, UPCAST, BOUNDS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s = _mask_scores(s, cols, klo, khi, KPM, smn, Lk, k_end, INTERVAL, HAS_MASK, BOUNDS)
    p = tl.math.exp2(s - lse[:, None])  # exact probabilities; 0 in rows with lse = +inf
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, r16, roffs[:, None], start_n >> 4, offs_n[None, :],
                             _dropout_threshold(dropout_p))
        # kept: dP / (1 - p), dropped: 0, as a multiply by a per-element factor rather than a select:
        # selects keep one predicate per element alive until the dot lands (ptxas spills them)
        dp = dp * tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, DQACC, start_m, q_end, q_own, cols, col0, qlo, qhi, offs_m, offs_d,
               sqm, sqd, sdom, sdod, bh, qk_scale, dropout_p, seed,
               INTERVAL: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               FUSED_DQ: tl.constexpr, OWN_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One query tile of dV += P^T dO and dK += dS^T Q, computed transposed (keys along rows); with
    FUSED_DQ also dQ += dS K, added into the fp32 rows DQACC (HEAD_DIM-strided) of the query tile.
    OWN_ROWS (fused, packed, dropout): rows below `q_own` belong to another program's sequences:
    their delta is not read (that program may not have written it yet) and their DQACC not touched."""
    rows = start_m + offs_m
    q_ptrs = Q + rows[:, None] * sqm + offs_d[None, :] * sqd
    do_ptrs = DO + rows[:, None] * sdom + offs_d[None, :] * sdod
    if BOUNDS:
        q = tl.load(q_ptrs, mask=rows[:, None] < q_end, other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None] < q_end, other=0.0)
        # lse = +inf makes every probability of a query row past the range exactly 0.
        lse = tl.load(LSE + rows, mask=rows < q_end, other=float("inf"))
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(LSE + rows)
    if OWN_ROWS:  # the rows this program may read delta of and add dQ into
        mine = rows >= q_own
        if BOUNDS:
            mine = mine & (rows < q_end)
        # a foreign row has p = 0, but 0 * (dp - garbage) is NaN when garbage is: load 0 instead
        delta = tl.load(DELTA + rows, mask=mine, other=0.0)
    elif BOUNDS:
        delta = tl.load(DELTA + rows, mask=rows < q_end, other=0.0)
    else:
        delta = tl.load(DELTA + rows)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
    if INTERVAL:
        ok = (rows[None, :] >= qlo[:, None]) & (rows[None, :] < qhi[:, None])
        s_t = tl.where(ok, s_t, float("-inf"))
    elif HAS_MASK:  # padding keys (qhi = 0) get no probability: a per-key test
        s_t = tl.where((qhi > qlo)[:, None], s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse[None, :])
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
    if HAS_DROPOUT:
        # generated in the (keys, queries) orientation of s_t: no transpose
        keep_t = _dropout_keep(seed, bh, start_m >> 4, offs_m[None, :], col0 >> 4, tl.arange(0, BLOCK_N)[:, None],
                               _dropout_threshold(dropout_p))
        factor = tl.where(keep_t, 1.0 / (1.0 - dropout_p), 0.0)  # a factor, not selects: see `_dq_step`
        pd_t = p_t * factor
        dp_t = dp_t * factor
    else:
        pd_t = p_t
    dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    if FUSED_DQ:  # the fifth matmul: dQ_i += dS_ij K_j into fp32 rows only this program touches
        if UPCAST:  # fp32 FMA dots: queries on the M side (the transposed product spilled up to 1 KB there)
            dq_part = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PREC)  # (BLOCK_M, HEAD_DIM)
            acc_ptrs = DQACC + rows[:, None] * HEAD_DIM + offs_d[None, :]
            row_of = rows[:, None]
            if OWN_ROWS:
                own = mine[:, None]
        else:  # (dS K)^T = K^T dS^T: head dim (64) on the M side suits wgmma, BLOCK_M (16 or 32) does not
            dq_part = tl.dot(tl.trans(k), ds_t.to(k.dtype), input_precision=DOT_PREC)  # (HEAD_DIM, BLOCK_M)
            acc_ptrs = DQACC + rows[None, :] * HEAD_DIM + offs_d[:, None]
            row_of = rows[None, :]
            if OWN_ROWS:
                own = mine[None, :]
        if OWN_ROWS:  # adding 0 to a foreign row is still a write: it races with the owner's (a lost update)
            tl.store(acc_ptrs, tl.load(acc_ptrs, mask=own, other=0.0) + dq_part, mask=own)
        elif BOUNDS:
            tl.store(acc_ptrs, tl.load(acc_ptrs, mask=row_of < q_end, other=0.0) + dq_part, mask=row_of < q_end)
        else:
            tl.store(acc_ptrs, tl.load(acc_ptrs) + dq_part)
    return dk, dv


TAIL = tl.constexpr(16)  # width of the ragged last tile (197 keys = 3 x 64 + one 16-wide tile, not 4 x 64)


@triton.jit
def _fwd_range(acc, m_i, l_i, lo, hi, q, K, V, KPM, k_end, rows, klo, khi, offs_d, skn, skd, svn, svd, smn, Lk,
               r16, roffs, bh, qk_scale, dropout_p, seed, INTERVAL: tl.constexpr, HAS_MASK: tl.constexpr,
               BOUNDS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
               BLOCK_M: tl.constexpr, STEP: tl.constexpr):
    """Key tiles lo, lo + STEP, ... < hi of the forward."""
    offs_n = tl.arange(0, STEP)
    if INTERPRET:
        start_n = lo
        while start_n < hi:
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, KPM, start_n, k_end, rows, klo, khi, offs_n, offs_d,
                                      skn, skd, svn, svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed,
                                      INTERVAL, HAS_MASK, BOUNDS, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_M, STEP)
            start_n += STEP
    else:
        for start_n in range(lo, hi, STEP):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, KPM, start_n, k_end, rows, klo, khi, offs_n, offs_d,
                                      skn, skd, svn, svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed,
                                      INTERVAL, HAS_MASK, BOUNDS, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_M, STEP)
    return acc, m_i, l_i


@triton.jit
def _dq_range(dq, lo, hi, q, do, lse, delta, K, V, KPM, k_end, rows, klo, khi, offs_d, skn, skd, svn, svd, smn,
              Lk, r16, roffs, bh, qk_scale, dropout_p, seed, INTERVAL: tl.constexpr, HAS_MASK: tl.constexpr,
              BOUNDS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
              BLOCK_M: tl.constexpr, STEP: tl.constexpr):
    """Key tiles lo, lo + STEP, ... < hi of dQ."""
    offs_n = tl.arange(0, STEP)
    if INTERPRET:
        start_n = lo
        while start_n < hi:
            dq = _dq_step(dq, q, do, lse, delta, K, V, KPM, start_n, k_end, rows, klo, khi, offs_n, offs_d, skn,
                          skd, svn, svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed, INTERVAL, HAS_MASK,
                          BOUNDS, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_M, STEP)
            start_n += STEP
    else:
        for start_n in range(lo, hi, STEP):
            dq = _dq_step(dq, q, do, lse, delta, K, V, KPM, start_n, k_end, rows, klo, khi, offs_n, offs_d, skn,
                          skd, svn, svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed, INTERVAL, HAS_MASK,
                          BOUNDS, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_M, STEP)
    return dq


@triton.jit
def _dkdv_range(dk, dv, lo, hi, k, v, Q, DO, LSE, DELTA, DQACC, q_end, q_own, cols, col0, qlo, qhi, offs_d, sqm, sqd,
                sdom, sdod, bh, qk_scale, dropout_p, seed, INTERVAL: tl.constexpr, HAS_MASK: tl.constexpr,
                BOUNDS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr, STEP: tl.constexpr,
                BLOCK_N: tl.constexpr, FUSED_DQ: tl.constexpr, OWN_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Query tiles lo, lo + STEP, ... < hi of dK/dV."""
    offs_m = tl.arange(0, STEP)
    if INTERPRET:
        start_m = lo
        while start_m < hi:
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, DQACC, start_m, q_end, q_own, cols, col0, qlo, qhi,
                                offs_m, offs_d, sqm, sqd, sdom, sdod, bh, qk_scale, dropout_p, seed, INTERVAL,
                                HAS_MASK, BOUNDS, HAS_DROPOUT, UPCAST, DOT_PREC, STEP, BLOCK_N, FUSED_DQ, OWN_ROWS,
                                HEAD_DIM)
            start_m += STEP
    else:
        for start_m in range(lo, hi, STEP):
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, DQACC, start_m, q_end, q_own, cols, col0, qlo, qhi,
                                offs_m, offs_d, sqm, sqd, sdom, sdod, bh, qk_scale, dropout_p, seed, INTERVAL,
                                HAS_MASK, BOUNDS, HAS_DROPOUT, UPCAST, DOT_PREC, STEP, BLOCK_N, FUSED_DQ, OWN_ROWS,
                                HEAD_DIM)
    return dk, dv


# ---------------------------------------------------------------------------------------------
# forward. Grid (query tiles, heads, batch); with VARLEN the batch axis is 1 and the query tiles
# come from the schedule `TILES` (row spans of the packed (total_q, H, D) queries).


@triton.jit(do_not_specialize=["seed", "DEVICE_KEY"])  # a fresh seed per call must not recompile
def _attn_fwd(
    Q, K, V, O, LSE, KPM, KV_LEN, TILES, SEQ_Q, CU_Q, CU_K,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, smb, smn,
    H, Lq, Lk, first, qk_scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET, BH_BUCKET, DEVICE_KEY,  # only read by the autotuner's key
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
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
    LSE += bh * Lq
    # Masks are needed for anything but full tiles of a plain dense call.
    MASKED: tl.constexpr = VARLEN or IS_CAUSAL or HAS_MASK or not EVEN_N
    INTERVAL: tl.constexpr = VARLEN or IS_CAUSAL  # per-row key intervals (else per-column tests)
    HAS_TAIL: tl.constexpr = MASKED and BLOCK_N > TAIL  # full tiles, then TAIL-wide ones
    MAIN_BOUNDS: tl.constexpr = MASKED and not HAS_TAIL  # the main loop reaches past k_end
    ROWS_EXACT: tl.constexpr = EVEN_M and not VARLEN

    rows, row_ok, klo, khi, k_start, k_end, row0 = _query_tile(pid_m, b, TILES, SEQ_Q, CU_Q, CU_K, KV_LEN, Lq, Lk,
                                                               first, BLOCK_M, VARLEN, IS_CAUSAL, HAS_MASK, HAS_DROPOUT)
    offs_d = tl.arange(0, HEAD_DIM)
    r16 = row0 // 16  # dropout rows: 16 * r16 + roffs (row0 is a multiple of 16 with dropout)
    roffs = tl.arange(0, BLOCK_M)
    q_ptrs = Q + rows[:, None] * sqm + offs_d[None, :] * sqd
    if ROWS_EXACT:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Full BLOCK_N tiles, then the ragged rest in TAIL-wide tiles (the dropout groups stay aligned).
    k_full = k_end
    if HAS_TAIL:
        k_full = k_start + (k_end - k_start) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, k_start, k_full, q, K, V, KPM, k_end, rows, klo, khi, offs_d, skn,
                               skd, svn, svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed, INTERVAL,
                               HAS_MASK, MAIN_BOUNDS, HAS_DROPOUT, UPCAST, DOT_PREC, INTERPRET, BLOCK_M, BLOCK_N)
    if HAS_TAIL:
        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, k_full, k_end, q, K, V, KPM, k_end, rows, klo, khi, offs_d, skn,
                                   skd, svn, svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed, INTERVAL,
                                   HAS_MASK, True, HAS_DROPOUT, UPCAST, DOT_PREC, INTERPRET, BLOCK_M, TAIL)

    empty = l_i == 0.0  # no allowed key in the whole row
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + rows[:, None] * som + offs_d[None, :] * sod
    if ROWS_EXACT:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
        tl.store(LSE + rows, lse)
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# backward: dQ (also computes delta = rowsum(dO * O)), then dK and dV. No atomics: each program
# owns its output rows, so the backward is deterministic.


@triton.jit(do_not_specialize=["seed", "DEVICE_KEY"])
def _attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, KPM, KV_LEN, TILES, SEQ_Q, CU_Q, CU_K,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd, smb, smn,
    H, Lq, Lk, first, qk_scale, sm_scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET, BH_BUCKET, DEVICE_KEY,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
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
    LSE += bh * Lq
    DELTA += bh * Lq
    MASKED: tl.constexpr = VARLEN or IS_CAUSAL or HAS_MASK or not EVEN_N
    INTERVAL: tl.constexpr = VARLEN or IS_CAUSAL  # per-row key intervals (else per-column tests)
    HAS_TAIL: tl.constexpr = MASKED and BLOCK_N > TAIL  # full tiles, then TAIL-wide ones
    MAIN_BOUNDS: tl.constexpr = MASKED and not HAS_TAIL  # the main loop reaches past k_end
    ROWS_EXACT: tl.constexpr = EVEN_M and not VARLEN

    rows, row_ok, klo, khi, k_start, k_end, row0 = _query_tile(pid_m, b, TILES, SEQ_Q, CU_Q, CU_K, KV_LEN, Lq, Lk,
                                                               first, BLOCK_M, VARLEN, IS_CAUSAL, HAS_MASK, HAS_DROPOUT)
    offs_d = tl.arange(0, HEAD_DIM)
    r16 = row0 // 16  # dropout rows: 16 * r16 + roffs (row0 is a multiple of 16 with dropout)
    roffs = tl.arange(0, BLOCK_M)
    q_ptrs = Q + rows[:, None] * sqm + offs_d[None, :] * sqd
    o_ptrs = O + rows[:, None] * som + offs_d[None, :] * sod
    do_ptrs = DO + rows[:, None] * sdom + offs_d[None, :] * sdod
    if ROWS_EXACT:
        q = tl.load(q_ptrs)
        o = tl.load(o_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(LSE + rows)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,) rowsum(dO * O)
    tl.store(DELTA + rows, delta, mask=row_ok)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_full = k_end
    if HAS_TAIL:
        k_full = k_start + (k_end - k_start) // BLOCK_N * BLOCK_N
    dq = _dq_range(dq, k_start, k_full, q, do, lse, delta, K, V, KPM, k_end, rows, klo, khi, offs_d, skn, skd, svn,
                   svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed, INTERVAL, HAS_MASK, MAIN_BOUNDS,
                   HAS_DROPOUT, UPCAST, DOT_PREC, INTERPRET, BLOCK_M, BLOCK_N)
    if HAS_TAIL:
        dq = _dq_range(dq, k_full, k_end, q, do, lse, delta, K, V, KPM, k_end, rows, klo, khi, offs_d, skn, skd,
                       svn, svd, smn, Lk, r16, roffs, bh, qk_scale, dropout_p, seed, INTERVAL, HAS_MASK, True,
                       HAS_DROPOUT, UPCAST, DOT_PREC, INTERPRET, BLOCK_M, TAIL)

    dq = dq * sm_scale
    dq_ptrs = DQ + rows[:, None] * sdqm + offs_d[None, :] * sdqd
    if ROWS_EXACT:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(pid_n, first, q_own, Q, K, V, DO, DK, DV, LSE, DELTA, DQACC, KPM, KV_LEN, TILES, SEQ_K, CU_Q, CU_K,
               sqm, sqd, skn, skd, svn, svd, sdom, sdod, sdkn, sdkd, sdvn, sdvd, smn, b, bh, Lq, Lk,
               qk_scale, sm_scale, dropout_p, seed,
               HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, COLS_EXACT: tl.constexpr,
               FUSED_DQ: tl.constexpr):
    """dK and dV of key tile `pid_n` (keys first + pid_n * BLOCK_N + arange(BLOCK_N)), pointers
    already offset to the (batch, head); with FUSED_DQ also its dS K terms into DQACC (packed: only
    into query rows >= q_own, the program's first row)."""
    MASKED: tl.constexpr = VARLEN or IS_CAUSAL or HAS_MASK or not EVEN_M
    INTERVAL: tl.constexpr = VARLEN or IS_CAUSAL
    # With dropout, q_start is rounded down to 16 rows: the first query tile may hold rows of the
    # sequences before (another program's). Without dropout it starts at an owned row.
    OWN_ROWS: tl.constexpr = FUSED_DQ and VARLEN and HAS_DROPOUT
    HAS_TAIL: tl.constexpr = MASKED and BLOCK_M > TAIL
    MAIN_BOUNDS: tl.constexpr = MASKED and not HAS_TAIL

    cols, col_own, qlo, qhi, q_start, q_end = _key_tile(pid_n, b, TILES, SEQ_K, CU_Q, CU_K, KV_LEN, KPM, smn, Lq, Lk,
                                                        first, BLOCK_N, VARLEN, IS_CAUSAL, HAS_MASK, HAS_DROPOUT)
    offs_d = tl.arange(0, HEAD_DIM)
    col0 = tl.max(cols - tl.arange(0, BLOCK_N))  # the tile's first key (a multiple of 16)
    k_ptrs = K + cols[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + cols[:, None] * svn + offs_d[None, :] * svd
    if COLS_EXACT:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=col_own[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_own[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_full = q_end
    if HAS_TAIL:
        q_full = q_start + (q_end - q_start) // BLOCK_M * BLOCK_M
    dk, dv = _dkdv_range(dk, dv, q_start, q_full, k, v, Q, DO, LSE, DELTA, DQACC, q_end, q_own, cols, col0, qlo, qhi,
                         offs_d, sqm, sqd, sdom, sdod, bh, qk_scale, dropout_p, seed, INTERVAL, HAS_MASK, MAIN_BOUNDS,
                         HAS_DROPOUT, UPCAST, DOT_PREC, INTERPRET, BLOCK_M, BLOCK_N, FUSED_DQ, OWN_ROWS, HEAD_DIM)
    if HAS_TAIL:
        dk, dv = _dkdv_range(dk, dv, q_full, q_end, k, v, Q, DO, LSE, DELTA, DQACC, q_end, q_own, cols, col0, qlo, qhi,
                             offs_d, sqm, sqd, sdom, sdod, bh, qk_scale, dropout_p, seed, INTERVAL, HAS_MASK,
                             True, HAS_DROPOUT, UPCAST, DOT_PREC, INTERPRET, TAIL, BLOCK_N, FUSED_DQ, OWN_ROWS,
                             HEAD_DIM)

    dk = dk * sm_scale
    dk_ptrs = DK + cols[:, None] * sdkn + offs_d[None, :] * sdkd
    dv_ptrs = DV + cols[:, None] * sdvn + offs_d[None, :] * sdvd
    if COLS_EXACT:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_own[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_own[:, None])


@triton.jit
def _fused_dq_init_block(O, DO, DELTA, DQACC, som, sod, sdom, sdod, r0, hi,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows r0 + arange(BLOCK_M) < hi: delta = rowsum(dO * O), DQACC = 0."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = r0 + tl.arange(0, BLOCK_M)
    ok = rows < hi
    o = tl.load(O + rows[:, None] * som + offs_d[None, :] * sod, mask=ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * sdom + offs_d[None, :] * sdod, mask=ok[:, None], other=0.0)
    tl.store(DELTA + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=ok)
    tl.store(DQACC + rows[:, None] * HEAD_DIM + offs_d[None, :], tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32),
             mask=ok[:, None])


@triton.jit
def _fused_dq_prologue(O, DO, DELTA, DQACC, som, sod, sdom, sdod, lo, hi,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """FUSED_DQ, before any key tile: delta = rowsum(dO * O) and DQACC = 0 for the program's query
    rows [lo, hi) (the work `_attn_bwd_dq` does otherwise); no other row is written."""
    if INTERPRET:
        r0 = lo + hi * 0
        while r0 < hi:
            _fused_dq_init_block(O, DO, DELTA, DQACC, som, sod, sdom, sdod, r0, hi, HEAD_DIM, BLOCK_M)
            r0 += BLOCK_M
    else:
        for r0 in range(lo, hi, BLOCK_M):
            _fused_dq_init_block(O, DO, DELTA, DQACC, som, sod, sdom, sdod, r0, hi, HEAD_DIM, BLOCK_M)


@triton.jit
def _fused_dq_write_block(DQ, DQACC, sdqm, sdqd, r0, hi, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows r0 + arange(BLOCK_M) < hi: DQ = sm_scale * DQACC in DQ's dtype."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = r0 + tl.arange(0, BLOCK_M)
    ok = rows[:, None] < hi
    acc = tl.load(DQACC + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    tl.store(DQ + rows[:, None] * sdqm + offs_d[None, :] * sdqd, (acc * sm_scale).to(DQ.dtype.element_ty), mask=ok)


@triton.jit
def _fused_dq_epilogue(DQ, DQACC, sdqm, sdqd, lo, hi, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """FUSED_DQ, after the last key tile: DQ = sm_scale * DQACC in DQ's dtype, rows [lo, hi)."""
    if INTERPRET:
        r0 = lo + hi * 0
        while r0 < hi:
            _fused_dq_write_block(DQ, DQACC, sdqm, sdqd, r0, hi, sm_scale, HEAD_DIM, BLOCK_M)
            r0 += BLOCK_M
    else:
        for r0 in range(lo, hi, BLOCK_M):
            _fused_dq_write_block(DQ, DQACC, sdqm, sdqd, r0, hi, sm_scale, HEAD_DIM, BLOCK_M)


@triton.jit(do_not_specialize=["seed", "DEVICE_KEY"])
def _attn_bwd_dkdv(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, DQACC, KPM, KV_LEN, TILES, SEQ_K, CU_Q, CU_K, QSPANS,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smn,
    H, Lq, Lk, first, group, qk_scale, sm_scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET, BH_BUCKET, DEVICE_KEY,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    FUSED_DQ: tl.constexpr,
):
    """Without FUSED_DQ: grid (key tiles, heads, batch), dK/dV of one key tile (O, DQ, DQACC,
    QSPANS, group unused).

    FUSED_DQ: each program walks its key tiles in order, and for each query tile adds dS K into
    DQACC, an fp32 (B, H, Lq, HEAD_DIM) scratch, in rows that no other program touches: each dQ
    row sums its key tiles in a fixed order, without atomics, so the result is deterministic.
    5 matmuls per (query tile, key tile), not 3 + 4. Dense: grid (1, heads, batch), every key tile
    and query row of the (batch, head). Packed (VARLEN): grid (programs, heads, 1); program p walks
    key tiles [p * group, (p + 1) * group) of TILES, which hold whole key sequences
    (`varlen_fused_schedule`), and owns query rows QSPANS[p] = [lo, hi), those sequences' queries."""
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
    if FUSED_DQ:
        O += b * sob + h * soh
        DQ += b * sdqb + h * sdqh
        DQACC += bh * Lq * HEAD_DIM
        if VARLEN:
            pid = tl.program_id(0)
            q_lo = tl.load(QSPANS + 2 * pid)
            q_hi = tl.load(QSPANS + 2 * pid + 1)
            t_lo = pid * group
            t_hi = t_lo + group
        else:
            q_lo = 0
            q_hi = Lq
            # full BLOCK_N key tiles, then a thin tail of keys in TAIL-wide tiles (`thin_tail_split`)
            rest = Lk % BLOCK_N
            split = Lk
            if (Lk > BLOCK_N) & (rest > 0) & (rest <= BLOCK_N // 4):
                split = Lk - rest
            t_lo = 0
            t_hi = tl.cdiv(split, BLOCK_N)
            n_tail = tl.cdiv(Lk - split, TAIL)
        _fused_dq_prologue(O, DO, DELTA, DQACC, som, sod, sdom, sdod, q_lo, q_hi, HEAD_DIM, BLOCK_M, INTERPRET)
        # Stores above (and each key tile's below) are re-read by other threads of the program:
        # a CTA barrier orders them (bar.sync also makes global writes visible within the CTA).
        tl.debug_barrier()
        if INTERPRET:
            t = t_lo + Lq * 0
            while t < t_hi:
                _dkdv_tile(t, 0, q_lo, Q, K, V, DO, DK, DV, LSE, DELTA, DQACC, KPM, KV_LEN, TILES, SEQ_K, CU_Q, CU_K,
                           sqm, sqd, skn, skd, svn, svd, sdom, sdod, sdkn, sdkd, sdvn, sdvd, smn, b, bh, Lq, Lk,
                           qk_scale, sm_scale, dropout_p, seed, HEAD_DIM, IS_CAUSAL, HAS_MASK, VARLEN, HAS_DROPOUT,
                           UPCAST, DOT_PREC, INTERPRET, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N and not VARLEN, True)
                t += 1
            if not VARLEN:
                t = n_tail * 0
                while t < n_tail:
                    _dkdv_tile(t, split, q_lo, Q, K, V, DO, DK, DV, LSE, DELTA, DQACC, KPM, KV_LEN, TILES, SEQ_K,
                               CU_Q, CU_K, sqm, sqd, skn, skd, svn, svd, sdom, sdod, sdkn, sdkd, sdvn, sdvd, smn, b,
                               bh, Lq, Lk, qk_scale, sm_scale, dropout_p, seed, HEAD_DIM, IS_CAUSAL, HAS_MASK,
                               VARLEN, HAS_DROPOUT, UPCAST, DOT_PREC, INTERPRET, BLOCK_M, TAIL, EVEN_M, False, True)
                    t += 1
        else:
            for t in range(t_lo, t_hi):
                _dkdv_tile(t, 0, q_lo, Q, K, V, DO, DK, DV, LSE, DELTA, DQACC, KPM, KV_LEN, TILES, SEQ_K, CU_Q, CU_K,
                           sqm, sqd, skn, skd, svn, svd, sdom, sdod, sdkn, sdkd, sdvn, sdvd, smn, b, bh, Lq, Lk,
                           qk_scale, sm_scale, dropout_p, seed, HEAD_DIM, IS_CAUSAL, HAS_MASK, VARLEN, HAS_DROPOUT,
                           UPCAST, DOT_PREC, INTERPRET, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N and not VARLEN, True)
                tl.debug_barrier()  # key tile t's dQ stores before key tile t + 1 reads the same rows
            if not VARLEN:
                for t in range(0, n_tail):
                    _dkdv_tile(t, split, q_lo, Q, K, V, DO, DK, DV, LSE, DELTA, DQACC, KPM, KV_LEN, TILES, SEQ_K,
                               CU_Q, CU_K, sqm, sqd, skn, skd, svn, svd, sdom, sdod, sdkn, sdkd, sdvn, sdvd, smn, b,
                               bh, Lq, Lk, qk_scale, sm_scale, dropout_p, seed, HEAD_DIM, IS_CAUSAL, HAS_MASK,
                               VARLEN, HAS_DROPOUT, UPCAST, DOT_PREC, INTERPRET, BLOCK_M, TAIL, EVEN_M, False, True)
                    tl.debug_barrier()
        _fused_dq_epilogue(DQ, DQACC, sdqm, sdqd, q_lo, q_hi, sm_scale, HEAD_DIM, BLOCK_M, INTERPRET)
    else:
        _dkdv_tile(tl.program_id(0), first, 0, Q, K, V, DO, DK, DV, LSE, DELTA, DQACC, KPM, KV_LEN, TILES, SEQ_K, CU_Q,
                   CU_K, sqm, sqd, skn, skd, svn, svd, sdom, sdod, sdkn, sdkd, sdvn, sdvd, smn, b, bh, Lq, Lk,
                   qk_scale, sm_scale, dropout_p, seed, HEAD_DIM, IS_CAUSAL, HAS_MASK, VARLEN, HAS_DROPOUT,
                   UPCAST, DOT_PREC, INTERPRET, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N and not VARLEN, False)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(OUT, H, Lq, Lk, dropout_p, seed,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DRAWS: tl.constexpr):
    """OUT: (B, H, Lq, Lk) contiguous: int8, 1 where the attention kernels keep the element, or with
    DRAWS uint8, each element's random byte (dense layout; the packed layout is the dense one with
    B = 1, Lq = total_q, Lk = total_k)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    i_off = tl.arange(0, BLOCK_M)[:, None]
    j_off = tl.arange(0, BLOCK_N)[None, :]
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    if DRAWS:
        val = (_dropout_draws(seed, bh, pid_m * (BLOCK_M // 16), i_off, col0 // 16, j_off) >> 24).to(tl.uint8)
    else:
        val = _dropout_keep(seed, bh, pid_m * (BLOCK_M // 16), i_off, col0 // 16, j_off,
                            _dropout_threshold(dropout_p)).to(tl.int8)
    ptrs = OUT + (bh * Lq + rows[:, None]) * Lk + cols[None, :]
    tl.store(ptrs, val, mask=(rows[:, None] < Lq) & (cols[None, :] < Lk))


# ---------------------------------------------------------------------------------------------
# block sizes: one fixed config under the interpreter (its autotuner cannot benchmark), a small
# autotuned space on a GPU keyed on power-of-2 length and batch x heads buckets, head dim and the
# variant flags. The packed (varlen) layout uses fixed blocks: its tile schedule depends on them.


# (BLOCK_M, BLOCK_N) under the interpreter, whose cost is per tile, not per element: 64 x 64 was the
# fastest there (N = 197 runs 4 ragged tiles). Tests pass other tilings explicitly.
INTERPRETER_BLOCKS = {"fwd": (64, 64), "dq": (64, 64), "dkdv": (64, 64), "dkdv_fused": (64, 64)}
# fp32 on a GPU (true fp32 dots on FMA units, not a speed path): one fixed (BLOCK_M, BLOCK_N,
# warps, stages); small tiles, because ptxas took a minute over a 64 x 64 tile at head dim 128.
# dK/dV walks 16-query tiles: at 32 x 32 it sat at 255 registers and spilled 8-40 B (fused: 800 B);
# at 16 x 32 it needs 104-158 and spills nothing (benchmarks/kernel_audit.py, the fp32 rows).
FP32_BLOCKS = {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (16, 32, 4, 2), "dkdv_fused": (16, 32, 4, 2)}
# The packed layout on a GPU (fp16/bf16): 64-row query tiles hold several short sequences; dK/dV
# programs own 64 keys and walk 32-query tiles (wgmma wants the keys side >= 64), 16-query ones fused.
VARLEN_BLOCKS = {"fwd": (64, 64, 4, 3), "dq": (64, 64, 4, 3), "dkdv": (32, 64, 4, 3),
                 # the fused backward: `_gpu_configs("dkdv_fused")`'s tile (1 stage: see there)
                 "dkdv_fused": (16, 64, 4, 1)}

# BH_BUCKET: the same lengths at B*H = 192 and 3072 fill the GPU differently, so a config tuned on
# one must not be reused for the other (tuning results are also cached on disk, per key).
# DEVICE_KEY (`device_key`): Triton's own disk key names the architecture only (sm_90), so without
# it a result tuned on an H100 would be reused on an H200 sharing the cache (an NFS home).
_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "BH_BUCKET", "DEVICE_KEY", "HEAD_DIM", "IS_CAUSAL", "HAS_MASK",
             "HAS_DROPOUT"]


def device_key(name: str, sm_count: int, total_memory: int) -> int:
    """A 31-bit id of a GPU model (name, SM count, memory size: an H100 SXM, an H100 PCIe and an
    H200 differ in at least one), for the autotuner's key."""
    return zlib.crc32(f"{name}|{sm_count}|{total_memory}".encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=None)
def _cuda_device_key(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return device_key(props.name, props.multi_processor_count, props.total_memory)


def _device_key(device: torch.device) -> int:
    """`device_key` of a CUDA tensor's GPU; 0 elsewhere (the interpreter does not autotune)."""
    if device.type != "cuda":
        return 0
    return _cuda_device_key(device.index if device.index is not None else torch.cuda.current_device())


def _gpu_configs(kind: str):
    """A small space (each config costs a compile per variant). wgmma on Hopper wants the M side
    of a dot >= 64: fwd/dq tile queries by 64 or 128; dkdv's dots have keys on the M side.
    BLOCK_N is a multiple of 16 (the tail tiles and the dropout layout, `_dropout_draws`)."""
    shapes = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4)],
        "dq": [(64, 64, 4, 3), (64, 32, 4, 3)],
        # (16, 64): 123-164 registers, so 6-8 warps per SM (occupancy 0.19-0.25) where 32 x 64 gets
        # 4-6, at about 1.6x the instructions per query row (a 16-wide wgmma): only a timing can choose.
        "dkdv": [(32, 64, 4, 3), (16, 64, 4, 3), (64, 128, 8, 2)],
        # one program per (batch, head) walking every tile (`backward(fused_dq=True)`). Without
        # software pipelining (1 stage): with 2-3 stages, 64 x 64 and 64 x 128 tiles, the dropout or
        # causal variants spill under triton 3.9 or 3.6 (benchmarks/kernel_audit.py --fused-bwd).
        # The fifth dot runs transposed, K^T dS^T (head dim on its M side: wgmma); with it, 32-query
        # tiles sit at 255 registers and spill 8-72 B, 16-query tiles need 134-226 and spill nothing
        # under triton 3.9 and 3.6 (occupancy 0.125-0.188 against 0.125, ~1.45x instructions per row).
        "dkdv_fused": [(16, 64, 4, 1)],
    }[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def fits_registers(config, has_dropout: bool) -> bool:
    """False for the 128-key dK/dV tile with dropout: it sits at the 255-register cap and spills
    under triton 3.9 (benchmarks/kernel_audit.py, which skips it too)."""
    return not (has_dropout and config.kwargs["BLOCK_N"] >= 128)


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the sequence (a 128-row tile for 35 queries is mostly padding),
    the largest tiles at head dim 128 and the largest dK/dV tile with dropout (register pressure)."""
    args = {**named_args, **kwargs}
    lq, lk, d = args["LQ_BUCKET"], args["LK_BUCKET"], args["HEAD_DIM"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(64, lq) and c.kwargs["BLOCK_N"] <= max(64, lk)
            and not (d >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)
            and fits_registers(c, bool(args.get("HAS_DROPOUT", False)))]
    return kept or configs[:1]


def _quick_bench(kernel_call, quantiles):
    # Short timing runs: these kernels take microseconds, and tuning time counts in every GPU job.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_EVEN = {
    "EVEN_M": lambda a: a["Lq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Lk"] % a["BLOCK_N"] == 0,
}
_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}
# The deterministic fused backward (FUSED_DQ=True): the dK/dV kernel, one program per (batch, head)
# (packed: per group of key tiles holding whole sequences, `varlen_fused_schedule`).
_FUSED_KERNELS = {"dkdv_fused": _attn_bwd_dkdv}
# Which backward runs when a call does not say (`fused_dq=None`): True, the fused 5-matmul kernel;
# False, the dQ and dK/dV kernels (7 matmuls); None, measured: on a GPU, the first backward of each
# tuning key times both (each under its own autotuned tiles) and keeps the faster for that key
# (`_measured_fused_choice`). Static counts cannot settle it: the fused kernel does 16-26% fewer
# instructions per tile but runs fewer, unpipelined programs (benchmarks/kernel_audit.py --fused-bwd).
# The interpreter and fp32 take the two-kernel path.
FUSED_DQ: Optional[bool] = None
# tuning key (`_choice_key`) -> True when the fused backward was the faster there
_FUSED_CHOICE: dict = {}


def _choice_key(args: dict, dtype: torch.dtype, varlen: bool) -> tuple:
    return (varlen, str(dtype), *(args[k] for k in _TUNE_KEY))


def _measured_fused_choice(key: tuple, fused, two_kernel, bench=None) -> bool:
    """Whether to run the fused backward for `key`: cached, or timed now. fused / two_kernel:
    zero-argument launches of each path on the call's own tensors (they overwrite the same
    outputs, so the timing leaves nothing behind). bench(fn) -> ms (default: `_quick_bench`)."""
    if key not in _FUSED_CHOICE:
        bench = bench or (lambda fn: _quick_bench(fn, None))
        t_fused, t_two = bench(fused), bench(two_kernel)
        _FUSED_CHOICE[key] = t_fused < t_two
    return _FUSED_CHOICE[key]


def _use_fused(fused_dq: Optional[bool], args: dict, q: torch.Tensor, varlen: bool, fused, two_kernel) -> bool:
    """Resolve the backward path of one call (`FUSED_DQ`)."""
    choice = FUSED_DQ if fused_dq is None else fused_dq
    if choice is not None:
        return bool(choice)
    if not q.is_cuda or args["UPCAST"] or args["INTERPRET"]:
        return False  # nothing to measure
    key = _choice_key(args, q.dtype, varlen)
    if key not in _FUSED_CHOICE and torch.cuda.is_current_stream_capturing():
        return False  # no timing inside a CUDA graph capture (a warm-up run outside it has measured)
    return _measured_fused_choice(key, fused, two_kernel)


@functools.lru_cache(maxsize=None)
def _launcher(kind: str, tuned: bool):
    """The kernel wrapped with the EVEN_* heuristics, and with the autotuner when `tuned` (built
    lazily: nothing here may touch a GPU driver at import time). Tuning results are cached on
    disk (cache_results) under the full key, so later processes on the same machine skip the search."""
    fn = triton.heuristics(_EVEN)({**_KERNELS, **_FUSED_KERNELS}[kind])
    if tuned:
        fn = triton.autotune(_gpu_configs(kind), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                             do_bench=_quick_bench, cache_results=True)(fn)
    return fn


def _pick_config(kind: str, config, upcast: bool, varlen: bool):
    """`config`: (BLOCK_M, BLOCK_N[, num_warps, num_stages]) to force a tiling, or a dict of them by
    kind ("fwd", "dq", "dkdv"); None picks one: the interpreter's fixed blocks, the fixed fp32
    blocks, the packed layout's blocks, or None = the autotuner (dense fp16/bf16 on a GPU)."""
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None and interpreting():
        config = INTERPRETER_BLOCKS[kind]
    elif config is None and upcast:
        config = FP32_BLOCKS[kind]
    elif config is None and varlen:
        config = VARLEN_BLOCKS[kind]
    return config


def _launch(kind: str, grid, config, **kwargs):
    """Launch kernel `kind`. grid(block_m, block_n) -> the launch grid; config from `_pick_config`."""
    if config is not None:
        bm, bn, *launch = config
        launch = dict(zip(("num_warps", "num_stages"), launch))
        _launcher(kind, False)[grid(bm, bn)](BLOCK_M=bm, BLOCK_N=bn, **launch, **kwargs)
    else:
        _launcher(kind, True)[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](**kwargs)


def thin_tail_split(L: int, block: int) -> int:
    """Rows covered by full `block` tiles when the rest is a thin tail (at most block / 4 rows:
    197 = 3 x 64 + 5), which a second launch covers in TAIL-row tiles; L otherwise."""
    rest = L % block
    return L - rest if L > block and 0 < rest <= block // 4 else L


def _launch_dense(kind: str, length: int, along: int, n_heads: int, n_batch: int, config, **kwargs):
    """Launch kernel `kind` of the padded layout over `length` rows (along=0: query tiles of BLOCK_M) or
    keys (along=1: key tiles of BLOCK_N), then, when the last tile would be nearly empty, once
    more over the thin tail with TAIL-wide tiles (they lower to mma.sync, for a few rows), so
    that 197 tokens compute 208 rows, not 256."""
    def grid(bm, bn):
        block = (bm, bn)[along]
        return (triton.cdiv(thin_tail_split(length, block), block), n_heads, n_batch)

    _launch(kind, grid, config, first=0, **kwargs)
    if config is None:  # the autotuner's choice for this key
        best = _launcher(kind, True).best_config
        blocks, launch = [best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"]], (4, best.num_stages)
    else:
        blocks, launch = list(config[:2]), ((4, *config[3:]) if len(config) > 2 else ())
    split = thin_tail_split(length, blocks[along])
    if split < length:
        blocks[along] = TAIL.value if hasattr(TAIL, "value") else TAIL
        _launch(kind, lambda bm, bn: (triton.cdiv(length - split, blocks[along]), n_heads, n_batch), (*blocks, *launch), first=split,
                **{k: v for k, v in kwargs.items() if k != "first"})


# ---------------------------------------------------------------------------------------------
# host launchers


def _strides(x: torch.Tensor, names: str) -> dict:
    return dict(zip(names.split(), x.stride()))


def effective_dropout_p(dropout_p: float) -> float:
    """The dropout probability the kernels realise: p rounded to a multiple of 1/256 (they compare
    one random byte per element against a threshold, as FlashAttention-2 does), at most 255/256.
    Outputs are scaled by 1 / (1 - effective p), so the expectation is exact. p = 0.1 -> 26/256 =
    0.1016 (BERT's and BLIP's rate runs 1.6% high)."""
    if dropout_p <= 0.0:
        return 0.0
    return min(round(dropout_p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1) / DROPOUT_LEVELS


def _common(q, Lq, Lk, B, H, causal, dropout_p, seed, has_mask, varlen):
    # The interpreter computes bf16 wrongly (triton#11584): there bf16 runs in fp32 tiles. fp16 runs
    # the GPU's own path (fp16 operands, fp32 accumulation), which the interpreter gets right.
    upcast = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting())
    p = effective_dropout_p(dropout_p)
    return dict(
        H=H, Lq=Lq, Lk=Lk, dropout_p=p, seed=int(seed),
        LQ_BUCKET=triton.next_power_of_2(Lq), LK_BUCKET=triton.next_power_of_2(Lk),
        BH_BUCKET=triton.next_power_of_2(B * H), DEVICE_KEY=_device_key(q.device),
        HEAD_DIM=q.shape[-1], IS_CAUSAL=bool(causal), HAS_MASK=has_mask, VARLEN=varlen,
        HAS_DROPOUT=p > 0.0,
        UPCAST=upcast,
        INTERPRET=interpreting(),
        # fp32 inputs get true fp32 dots (a GPU's default for fp32 tl.dot is TF32).
        DOT_PREC="ieee" if upcast else "tf32",
    )


def _dense_args(q, k, key_padding_mask, causal, dropout_p, seed):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)  # same bytes, a dtype Triton loads everywhere
        mask_strides = {"smb": kpm.stride(0), "smn": kpm.stride(1)}
        # One past each batch row's last real key: key tiles after it are skipped (no sync: a device op).
        pos = torch.arange(1, Lk + 1, device=q.device, dtype=torch.int32)
        kv_len = (key_padding_mask.to(torch.int32) * pos).amax(1).to(torch.int32) if Lk else pos.new_zeros(B)
    else:
        kpm, kv_len, mask_strides = q, q, {"smb": 0, "smn": 0}  # dummy pointers, never read (HAS_MASK=False)
    varlen_dummies = dict(TILES=q, CU_Q=q, CU_K=q)  # never read (VARLEN=False)
    args = _common(q, Lq, Lk, B, H, causal, dropout_p, seed, key_padding_mask is not None, False)
    return dict(KPM=kpm, KV_LEN=kv_len, **mask_strides, **varlen_dummies, **args)


def empty_blhd(B: int, H: int, L: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, L, D) tensor stored as (B, L, H, D): merging heads afterwards is a free view."""
    return torch.empty(B, L, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _device_guard(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def forward(q, k, v, key_padding_mask: Optional[torch.Tensor], causal: bool, dropout_p: float,
            softmax_scale: float, seed: int, config=None):
    """Launch the forward kernel on validated inputs. Returns (out (B, H, Lq, D), lse2 fp32 (B, H, Lq)).

    `config` (see `_pick_config`) bypasses the autotuner: tests use it to vary the tiling.
    """
    B, H, Lq, D = q.shape
    out = empty_blhd(B, H, Lq, D, q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    args = _dense_args(q, k, key_padding_mask, causal, dropout_p, seed)
    cfg = _pick_config("fwd", config, args["UPCAST"], False)
    with _device_guard(q):
        _launch_dense("fwd", Lq, 0, H, B, cfg, Q=q, K=k, V=v, O=out, LSE=lse, SEQ_Q=q, **_strides(q, "sqb sqh sqm sqd"), **_strides(k, "skb skh skn skd"),
                **_strides(v, "svb svh svn svd"), **_strides(out, "sob soh som sod"),
                qk_scale=softmax_scale * LOG2E, **args)
    return out, lse


def backward(dout, q, k, v, out, lse, key_padding_mask, causal: bool, dropout_p: float,
             softmax_scale: float, seed: int, config=None, fused_dq: Optional[bool] = None):
    """Launch the dQ kernel (which also writes delta), then the dK/dV kernel. Returns (dq, dk, dv).

    fused_dq=True: one launch of the dK/dV kernel with FUSED_DQ, one program per (batch, head),
    5 matmuls per tile instead of 7, deterministic (no atomics), with an fp32 (B, H, Lq, D)
    scratch for dQ. None (default): the module's FUSED_DQ, by default the faster of the two as
    measured on this GPU for this tuning key."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq = empty_blhd(B, H, Lq, D, q)
    dk = empty_blhd(B, H, Lk, D, k)
    dv = empty_blhd(B, H, Lk, D, v)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    args = _dense_args(q, k, key_padding_mask, causal, dropout_p, seed)
    args.update(qk_scale=softmax_scale * LOG2E, sm_scale=softmax_scale)
    qkv = {**_strides(q, "sqb sqh sqm sqd"), **_strides(k, "skb skh skn skd"), **_strides(v, "svb svh svn svd"),
           **_strides(dout, "sdob sdoh sdom sdod")}
    outs = {**_strides(out, "sob soh som sod"), **_strides(dq, "sdqb sdqh sdqm sdqd"),
            **_strides(dk, "sdkb sdkh sdkn sdkd"), **_strides(dv, "sdvb sdvh sdvn sdvd")}

    def fused():
        dq_acc = torch.empty(B, H, Lq, D, dtype=torch.float32, device=q.device)  # zeroed by the kernel
        _launch("dkdv_fused", lambda bm, bn: (1, H, B), _pick_config("dkdv_fused", config, args["UPCAST"], False),
                first=0, Q=q, K=k, V=v, O=out, DO=dout, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=dq_acc,
                SEQ_K=q, QSPANS=q, group=1, FUSED_DQ=True, **qkv, **outs, **args)

    def two_kernel():
        _launch_dense("dq", Lq, 0, H, B, _pick_config("dq", config, args["UPCAST"], False), Q=q, K=k, V=v, O=out,
                      DO=dout, DQ=dq, LSE=lse, DELTA=delta, SEQ_Q=q, **qkv, **_strides(out, "sob soh som sod"),
                      **_strides(dq, "sdqb sdqh sdqm sdqd"), **args)
        _launch_dense("dkdv", Lk, 1, H, B, _pick_config("dkdv", config, args["UPCAST"], False), Q=q, K=k, V=v, O=out,
                      DO=dout, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=delta, SEQ_K=q, QSPANS=q, group=1,
                      FUSED_DQ=False, **qkv, **outs, **args)

    with _device_guard(q):
        (fused if _use_fused(fused_dq, args, q, False, fused, two_kernel) else two_kernel)()
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# the packed (variable-length) layout: the same kernels with VARLEN=True, B = 1, Lq = total_q,
# Lk = total_k, and a schedule of row spans per program.


def varlen_schedule(cu: torch.Tensor, total: int, max_len: int, block: int, align: int = 1) -> torch.Tensor:
    """Row spans (n_tiles, 2) int32 [lo, hi) of the packed rows, one per program, never splitting
    a sequence of at most `block` rows, built with device ops (no host sync).

    Packing: the sequences that start in window t of W = block - (align - 1) - max_len + 1 rows
    share tile t, which then spans at most `block` rows from `lo` rounded down to `align` (so a
    13-token caption does not hold a 64-row tile alone). Chunking: each sequence is cut into
    `block`-row spans, starting at its first row rounded down to `align`. The schedule with fewer
    tiles is used; spans may be empty (their program does nothing). `max_len` must bound every
    sequence's length (the callers check it)."""
    return _varlen_plan(cu, total, max_len, block, align)[0]


def _varlen_plan(cu: torch.Tensor, total: int, max_len: int, block: int, align: int):
    """`varlen_schedule`'s tiles, with the sequences they hold: (tiles, seqs, group). Consecutive
    groups of `group` tiles hold whole sequences: group g holds sequences [seqs[g], seqs[g + 1])
    and no key of any other (packing: group = 1, tile t holds the sequences starting in window t;
    chunking: group = chunks per sequence, group g is sequence g)."""
    B = cu.numel() - 1
    cu = cu.to(torch.int64)
    W = block - (align - 1) - max_len + 1
    n_chunks = triton.cdiv(max_len + align - 1, block)
    if W >= 1 and triton.cdiv(total, W) <= B * n_chunks:
        n = max(1, triton.cdiv(total, W))
        first = torch.searchsorted(cu[:-1].contiguous(), torch.arange(n + 1, device=cu.device) * W)  # (n + 1,)
        bounds = cu[first]  # first = B (no sequence left) gives cu[B] = total
        return torch.stack((bounds[:-1], bounds[1:]), 1).to(torch.int32).contiguous(), first, 1
    starts, ends = cu[:-1, None], cu[1:, None]  # (B, 1)
    base = starts - starts % align
    c = torch.arange(max(n_chunks, 1), device=cu.device)[None, :]  # (1, chunks)
    lo = torch.maximum(starts, base + c * block)
    hi = torch.maximum(torch.minimum(ends, base + (c + 1) * block), lo)
    tiles = torch.stack((lo, hi), -1).reshape(-1, 2)  # (B, chunks, 2) -> (B * chunks, 2), sequence-major
    return tiles.to(torch.int32).contiguous(), torch.arange(B + 1, device=cu.device), max(n_chunks, 1)


def varlen_fused_schedule(cu_q: torch.Tensor, cu_k: torch.Tensor, total_k: int, max_k: int, block: int):
    """The fused backward's schedule (device ops, no sync): (key tiles (n_programs * group, 2) int32,
    query spans (n_programs, 2) int32, group). Program p walks key tiles [p * group, (p + 1) * group)
    (`varlen_schedule` of the keys, 16-aligned), which hold whole key sequences and no key of
    another, and owns [lo, hi) = the query rows of those sequences: no other program's key tile
    touches them, so it alone adds into their dQ. A sequence left out (no keys, after the last
    window) gets no program: its dQ is 0, as it must be."""
    tiles, seqs, group = _varlen_plan(cu_k, total_k, max_k, block, 16)  # 16: dropout words per 16 keys
    rows = cu_q.to(torch.int64)[seqs]  # (n_programs + 1,)
    spans = torch.stack((rows[:-1], rows[1:]), 1).to(torch.int32).contiguous()
    return tiles, spans, group


def _sequence_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """int32 (total,): the sequence each packed row belongs to."""
    rows = torch.arange(total, device=cu.device, dtype=cu.dtype)
    return torch.searchsorted(cu[1:].contiguous(), rows, right=True).to(torch.int32)


def _varlen_args(q, k, cu_q, cu_k, causal, dropout_p, seed):
    total_q, H, D = q.shape
    total_k = k.shape[0]
    args = _common(q, total_q, total_k, 1, H, causal, dropout_p, seed, False, True)
    return dict(CU_Q=cu_q, CU_K=cu_k, KPM=q, KV_LEN=q, smb=0, smn=0, **args)


def _row_align(args: dict) -> int:
    """Where packed query tiles start (`_query_tile`): with dropout at a multiple of 16 rows (the
    dropout words are laid out per 16 rows), else anywhere."""
    return 16 if args["HAS_DROPOUT"] else 1


def _packed_strides(x: torch.Tensor, names: str) -> dict:
    """(total, H, D) seen as (1, H, total, D): batch stride 0."""
    b, h, m, d = names.split()
    return {b: 0, h: x.stride(1), m: x.stride(0), d: x.stride(2)}


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, dropout_p: float,
                   softmax_scale: float, seed: int, config=None):
    """Forward over packed sequences. Returns (out (total_q, H, D), lse2 fp32 (H, total_q))."""
    total_q, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    args = _varlen_args(q, k, cu_q, cu_k, causal, dropout_p, seed)
    bm, bn, *launch = _pick_config("fwd", config, args["UPCAST"], True)
    tiles = varlen_schedule(cu_q, total_q, max_q, bm, align=_row_align(args))
    with _device_guard(q):
        _launch("fwd", lambda _bm, _bn: (tiles.shape[0], H, 1), (bm, bn, *launch), first=0, Q=q, K=k, V=v, O=out,
                LSE=lse, TILES=tiles, SEQ_Q=_sequence_ids(cu_q, total_q), **_packed_strides(q, "sqb sqh sqm sqd"),
                **_packed_strides(k, "skb skh skn skd"), **_packed_strides(v, "svb svh svn svd"),
                **_packed_strides(out, "sob soh som sod"), qk_scale=softmax_scale * LOG2E, **args)
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, dropout_p: float,
                    softmax_scale: float, seed: int, config=None, fused_dq: Optional[bool] = None):
    """dQ then dK/dV over packed sequences. Returns (dq, dk, dv), shaped like q, k, v.

    fused_dq=True: one launch of the dK/dV kernel with FUSED_DQ, one program per group of key
    tiles holding whole sequences (`varlen_fused_schedule`), 5 matmuls per tile instead of 7,
    deterministic (no atomics), with an fp32 (H, total_q, D) scratch for dQ. None (default): the
    module's FUSED_DQ, by default the faster of the two as measured on this GPU for this key."""
    total_q, H, D = q.shape
    total_k = k.shape[0]
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq, dk, dv
    delta = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    args = _varlen_args(q, k, cu_q, cu_k, causal, dropout_p, seed)
    args.update(qk_scale=softmax_scale * LOG2E, sm_scale=softmax_scale)
    qkv = {**_packed_strides(q, "sqb sqh sqm sqd"), **_packed_strides(k, "skb skh skn skd"),
           **_packed_strides(v, "svb svh svn svd"), **_packed_strides(dout, "sdob sdoh sdom sdod")}
    outs = {**_packed_strides(out, "sob soh som sod"), **_packed_strides(dq, "sdqb sdqh sdqm sdqd"),
            **_packed_strides(dk, "sdkb sdkh sdkn sdkd"), **_packed_strides(dv, "sdvb sdvh sdvn sdvd")}

    def fused():
        cfg = _pick_config("dkdv_fused", config, args["UPCAST"], True)
        tiles, spans, group = varlen_fused_schedule(cu_q, cu_k, total_k, max_k, cfg[1])
        dq_acc = torch.empty(H, total_q, D, dtype=torch.float32, device=q.device)  # zeroed by the kernel, per program
        _launch("dkdv_fused", lambda bm, bn: (spans.shape[0], H, 1), cfg, first=0, Q=q, K=k, V=v, O=out,
                DO=dout, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=dq_acc, TILES=tiles, QSPANS=spans,
                group=group, SEQ_K=_sequence_ids(cu_k, total_k), FUSED_DQ=True, **qkv, **outs, **args)

    def two_kernel():
        cfg_dq = _pick_config("dq", config, args["UPCAST"], True)
        cfg_kv = _pick_config("dkdv", config, args["UPCAST"], True)
        q_tiles = varlen_schedule(cu_q, total_q, max_q, cfg_dq[0], align=_row_align(args))
        k_tiles = varlen_schedule(cu_k, total_k, max_k, cfg_kv[1], align=16)  # dropout words: 16 keys
        _launch("dq", lambda bm, bn: (q_tiles.shape[0], H, 1), cfg_dq, first=0, Q=q, K=k, V=v, O=out, DO=dout, DQ=dq,
                LSE=lse, DELTA=delta, TILES=q_tiles, SEQ_Q=_sequence_ids(cu_q, total_q), **qkv,
                **_packed_strides(out, "sob soh som sod"), **_packed_strides(dq, "sdqb sdqh sdqm sdqd"), **args)
        _launch("dkdv", lambda bm, bn: (k_tiles.shape[0], H, 1), cfg_kv, first=0, Q=q, K=k, V=v, O=out, DO=dout,
                DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=delta, TILES=k_tiles, QSPANS=k_tiles, group=1,
                SEQ_K=_sequence_ids(cu_k, total_k), FUSED_DQ=False, **qkv, **outs, **args)

    # both paths write the same rows (a row no key sees keeps its zero in either), so the timing
    # runs of a measured choice leave nothing the chosen path does not overwrite
    with _device_guard(q):
        (fused if _use_fused(fused_dq, args, q, True, fused, two_kernel) else two_kernel)()
    return dq, dk, dv
    cfg_dq = _pick_config("dq", config, args["UPCAST"], True)
    cfg_kv = _pick_config("dkdv", config, args["UPCAST"], True)
    q_tiles = varlen_schedule(cu_q, total_q, max_q, cfg_dq[0], align=_row_align(args))
    k_tiles = varlen_schedule(cu_k, total_k, max_k, cfg_kv[1], align=16)  # dropout words: 16 keys
    with _device_guard(q):
        _launch("dq", lambda bm, bn: (q_tiles.shape[0], H, 1), cfg_dq, first=0, Q=q, K=k, V=v, O=out, DO=dout, DQ=dq,
                LSE=lse, DELTA=delta, TILES=q_tiles, SEQ_Q=_sequence_ids(cu_q, total_q), **qkv,
                **_packed_strides(out, "sob soh som sod"), **_packed_strides(dq, "sdqb sdqh sdqm sdqd"), **args)
        _launch("dkdv", lambda bm, bn: (k_tiles.shape[0], H, 1), cfg_kv, first=0, Q=q, K=k, V=v, O=out, DO=dout,
                DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DQACC=delta, TILES=k_tiles, QSPANS=k_tiles, group=1,
                SEQ_K=_sequence_ids(cu_k, total_k), FUSED_DQ=False, **qkv, **outs, **args)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# dropout masks for tests


def dropout_keep_mask(seed: int, shape, dropout_p: float, device="cpu") -> torch.Tensor:
    """The keep-mask (bool (B, H, Lq, Lk), True = kept) the kernels use for `seed` and `dropout_p`
    (realised at `effective_dropout_p(dropout_p)`).

    Pass it to `reference.attention(..., dropout_p=effective_dropout_p(p), dropout_mask=...)` to
    reproduce a kernel call exactly.
    """
    return _run_mask_kernel(seed, shape, effective_dropout_p(dropout_p), device, draws=False).bool()


def dropout_draws(seed: int, shape, device="cpu") -> torch.Tensor:
    """uint8 (B, H, Lq, Lk): each element's random byte; the kernels keep an element when its byte
    is >= 256 * effective_dropout_p(p). For the statistical tests of the generator."""
    return _run_mask_kernel(seed, shape, 0.0, device, draws=True)


def _run_mask_kernel(seed: int, shape, p_eff: float, device, draws: bool) -> torch.Tensor:
    B, H, Lq, Lk = shape
    out = torch.empty(B, H, Lq, Lk, dtype=torch.uint8 if draws else torch.int8, device=device)
    if out.numel():
        bm, bn = 32, 32
        with _device_guard(out):
            _dropout_mask_kernel[(triton.cdiv(Lq, bm), triton.cdiv(Lk, bn), B * H)](
                out, H, Lq, Lk, p_eff, int(seed), BLOCK_M=bm, BLOCK_N=bn, DRAWS=draws)
    return out


def varlen_dropout_keep_masks(seed: int, cu_q: torch.Tensor, cu_k: torch.Tensor, n_heads: int,
                              dropout_p: float) -> list:
    """The packed layout's keep-masks, one bool (H, Lq_b, Lk_b) per sequence (the form
    `reference.varlen_attention(dropout_masks=...)` takes). Materialises (H, total_q, total_k):
    for tests at small sizes."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    full = dropout_keep_mask(seed, (1, n_heads, cq[-1], ck[-1]), dropout_p, device=cu_q.device)[0]
    return [full[:, cq[b]:cq[b + 1], ck[b]:ck[b + 1]] for b in range(len(cq) - 1)]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
