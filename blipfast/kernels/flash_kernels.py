"""The flash-attention Triton kernels: forward, dQ and dK/dV (optionally fused with dQ), as
`tl.constexpr` specialisations (IS_CAUSAL, HAS_MASK, VARLEN, HAS_DROPOUT, EVEN_M, EVEN_N, UPCAST,
FUSED_DQ) of one family. `flash_attention` launches them; its docstring describes the layouts,
tiling and numerics. Device code only: nothing here runs on the host.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_dropout import _dropout_keep, _dropout_threshold


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
