"""Streaming image-text contrastive (ITC) loss with momentum distillation, and hard-negative sampling.

The math is `reference.itc_loss` (and `reference.itc_loss_retrieval` with image ids): for each
direction, with online query rows q_i, momentum query rows qm_i and the columns
k_j = [in-batch momentum features of the other modality | that modality's queue]:

    s_ij = q_i . k_j / temp,   sm_ij = qm_i . k_j / temp,   p = softmax_j(s),
    t_ij = alpha * softmax_j(sm)_ij + (1 - alpha) * y_ij     (y = onehot(i), or pos / pos.sum)
    loss_i = logsumexp_j(s_ij) - sum_j t_ij s_ij

Design: the B x (B + Q) matrices are never materialised. Kernel 1 (`_itc_stats_kernel`) streams
column tiles with running max / sum-exp for s and sm and carries, with online rescaling (flash-
attention style), sum_j softmax(sm)_ij (s_ij - c_i) and sum_j y_ij (s_ij - c_i), where c_i is
the row's paired logit (a shift that keeps these sums at the size of the logits' spread rather
than |s|, up to 1 / temp = 1000). The columns are split across programs (split-K style) so
that a small batch still fills the GPU; the per-split partial statistics (O(splits x B)) are
merged with a log-sum-exp in PyTorch. Only the query side gets a gradient (the columns are
momentum features and queue):
    d loss_i / d q_i   = sum_j (p_ij - t_ij) k_j / temp
    d loss_i / d temp  = -sum_j (p_ij - t_ij) s_ij / temp
Kernel 2 (`_itc_grad_kernel`) recomputes the tiles from the merged per-row log-sum-exps and
accumulates both sums (summing the products (p - t) s directly avoids the cancellation of
sum p s - sum t s). It runs inside the forward (when any gradient is needed), so the backward
is elementwise and keeps no reference to the queue: the model overwrites the queue in place
right after the loss (dequeue-and-enqueue), and a backward that re-read it would see the new
features. Cost: 5 matmul passes over the columns (2 + 3) instead of a backward's re-read of the
queue. Extra memory: the gradient kernel's fp32 partials, about 2 x SMs x 64 x E floats
(17 MB on an H100 at E = 256) whatever B and Q, plus O(splits x B); never O(B x (B + Q)).
Both kernels stream their columns with one helper, `_column_sweep` (load a column tile, compute
its two logit tiles, fold them into the kernel's state with `_stats_tile` or `_grad_tile`); with
16-bit features the two logit tiles come from one dot of the stacked operand [q; qm].

Hard negatives (`blipfast.kernels.sampling`, re-exported here): the stats kernel also writes the
B x B in-batch logits (cheap), and the sampler draws, per row, from exactly the original distribution
softmax(s[:, :B]) + 1e-4 with the diagonal zeroed, as a mixture: with probability
soft / (soft + (B - 1) * 1e-4), where soft = sum_{j != i} softmax_j, a Gumbel-max draw over
the off-diagonal logits (the softmax part), otherwise a uniform draw over the off-diagonal
columns (the 1e-4 floor). Seeded philox noise, no host sync. The retrieval variant
(`sample_negatives_by_idx`) draws from softmax(s) with the columns of the same image id
removed (no floor).

Precision: the dot products run in the online features' dtype (fp16/bf16: tensor cores with
fp32 accumulation, momentum features and queue cast to it on load, as PyTorch autocast would;
fp32: `precision`, default "tf32x3", about fp32-accurate; the 1/temp = 1000 scale makes plain
TF32 too coarse). With fp32 features the kernels walk the features in FP32_CHUNK_E-wide chunks
(`_streamed_logits`), and the gradient kernel accumulates in its output partial chunk by chunk
(`_grad_tile_in_out`): 3xTF32 mma.sync operands live in registers, and whole (16, E) operands
spilled. All softmax statistics are fp32. Under TRITON_INTERPRET=1, bf16 tiles are
upcast to fp32 (the interpreter's bf16 arithmetic is broken, triton#11584).

`itc_loss` runs as the PyTorch custom op "blipfast::itc_loss" (a fake implementation for
tracing, an autograd formula that scales the forward's gradients), so torch.compile keeps it in
one graph (fullgraph=True) as an opaque call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_device, interpreting  # noqa: F401  (interpreting re-exported)
from .sampling import FLOOR, sample_hard_negatives, sample_negatives_by_idx  # noqa: F401  (re-exported)

__all__ = ["itc_loss", "sample_hard_negatives", "sample_negatives_by_idx", "ItcKernelConfig"]

NEG = tl.constexpr(-3.0e38)  # finite "minus infinity" for running maxima (no inf - inf = NaN)


# ---------------------------------------------------------------------------------------------
# kernels: a statistics and a gradient program over one column sweep (`_column_sweep`: load a
# column tile, compute its logits, fold them into the program's state with its tile update)


@triton.jit
def _load_queries(q_ptr, qm_ptr, rows, row_ok, offs_e, e_ok, stride_q, stride_qm, UPCAST: tl.constexpr,
                  STACK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """The row block's online and momentum features q and qm (BLOCK_M, BLOCK_E) as the logits' dot
    operand: with STACK_Q one (2 * BLOCK_M, BLOCK_E) matrix [q; qm], loaded once; without, the rows'
    base pointers (q rows, qm rows, row mask), for `_streamed_logits` to load in feature chunks.

    Stacked, one dot gives both logit tiles, and with 8 warps and 64 rows each warpgroup computes
    one of them: two 64-row dots each run on both warpgroups, and keep twice the loop-invariant
    wgmma descriptors live (the gradient kernel spilled). fp32 features run 3xTF32 mma.sync, whose
    A operand every warp holds whole: a (16, 256) q and qm in registers would be 256 registers per
    thread, so they are streamed instead (they are re-read from L1/L2 per column tile)."""
    if STACK_Q:
        mask = row_ok[:, None] & e_ok[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_q + offs_e[None, :], mask=mask, other=0.0)
        qm = tl.load(qm_ptr + rows[:, None] * stride_qm + offs_e[None, :], mask=mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        qm = qm.to(q.dtype)  # momentum features may be kept in another dtype (e.g. fp32 EMA weights)
        qq = tl.permute(tl.join(q, qm), (2, 0, 1))  # (BLOCK_M, BLOCK_E, 2) -> (2, BLOCK_M, BLOCK_E)
        return tl.reshape(qq, (2 * BLOCK_M, BLOCK_E))
    else:
        return q_ptr + rows * stride_q, qm_ptr + rows * stride_qm, row_ok


@triton.jit
def _logits(queries, kT, inv_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's logits (s, sm), 2 x (BLOCK_M, BLOCK_N), s = q k / temp, sm = qm k / temp, from
    the stacked [q; qm] (16-bit features)."""
    ss = tl.dot(queries, kT) * inv_t  # (2 * BLOCK_M, BLOCK_N) = [s; sm]
    ss = tl.permute(tl.reshape(ss, (2, BLOCK_M, BLOCK_N)), (1, 2, 0))  # (BLOCK_M, BLOCK_N, 2)
    return tl.split(ss)


@triton.jit
def _streamed_logits(queries, col_ptr, cols, col_ok, stride_ce, stride_cn, e_lim, inv_t, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_E: tl.constexpr):
    """(s, sm) as `_logits`, for fp32 features: the dots walk the features in CHUNK_E-wide chunks,
    loading q, qm and the columns chunk by chunk, so no operand wider than CHUNK_E is live."""
    q_rows, qm_rows, row_ok = queries
    s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    sm = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for c in range(BLOCK_E // CHUNK_E):
        offs_e = c * CHUNK_E + tl.arange(0, CHUNK_E)
        e_ok = offs_e < e_lim
        kT = tl.load(col_ptr + offs_e[:, None] * stride_ce + cols[None, :] * stride_cn,
                     mask=e_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # (CHUNK_E, BLOCK_N)
        mask = row_ok[:, None] & e_ok[None, :]
        q = tl.load(q_rows[:, None] + offs_e[None, :], mask=mask, other=0.0)  # (BLOCK_M, CHUNK_E)
        qm = tl.load(qm_rows[:, None] + offs_e[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.dot(q, kT, s, input_precision=PRECISION)
        sm = tl.dot(qm, kT, sm, input_precision=PRECISION)
    return s * inv_t, sm * inv_t


@triton.jit
def _stats_tile(state, s, sm, col_ok, pos, shift):
    """Fold one tile's logits s, sm (BLOCK_M, BLOCK_N) into the running per-row statistics
    (m_s, l_s, m_m, l_m, ts, pos_s, pos_n): max and rescaled sum-exp of s and of sm, with online
    rescaling sum_j exp(sm_ij - m_m) (s_ij - shift_i), and the sum and count of the positives' s - shift.

    The target-weighted sums accumulate s - shift (shift: the row's paired logit), so they stay
    of the size of the logits' spread, not of |s| (up to 1000 at temp = 0.001)."""
    m_s, l_s, m_m, l_m, ts, pos_s, pos_n = state
    s_safe = tl.where(col_ok[None, :], s - shift[:, None], 0.0)  # 0 * -inf would be NaN
    s = tl.where(col_ok[None, :], s, float("-inf"))
    sm = tl.where(col_ok[None, :], sm, float("-inf"))
    m_s_new = tl.maximum(m_s, tl.max(s, 1))
    l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new[:, None]), 1)
    m_m_new = tl.maximum(m_m, tl.max(sm, 1))
    r_m = tl.exp(m_m - m_m_new)
    e_m = tl.exp(sm - m_m_new[:, None])
    l_m = l_m * r_m + tl.sum(e_m, 1)
    ts = ts * r_m + tl.sum(e_m * s_safe, 1)
    pos_s += tl.sum(tl.where(pos, s_safe, 0.0), 1)
    pos_n += tl.sum(pos.to(tl.float32), 1)
    return m_s_new, l_s, m_m_new, l_m, ts, pos_s, pos_n


@triton.jit
def _grad_weights(s, sm, col_ok, pos, lse, alpha):
    """The tile's weights p - t (BLOCK_M, BLOCK_N), 0 in the columns past the end.
    lse: the merged per-row (mx, lz, mx_m, lz_m, posw)."""
    mx, lz, mx_m, lz_m, posw = lse
    # log-sum-exps as (row max, log of the rescaled sum): exp((s - max) - log_sum) keeps the
    # probabilities' relative precision where exp(s - lse) would lose it to |s| up to 1000
    p = tl.exp((s - mx[:, None]) - lz[:, None])
    pm = tl.exp((sm - mx_m[:, None]) - lz_m[:, None])
    w = p - alpha * pm - tl.where(pos, posw[:, None], 0.0)
    return tl.where(col_ok[None, :], w, 0.0)


@triton.jit
def _grad_tile(state, s, sm, kT, col_ok, pos, shift, lse, alpha, PRECISION: tl.constexpr):
    """Fold one tile into (acc, ws, wsum): acc += (p - t) @ K, ws += sum_j (p - t)(s - shift) and
    wsum += sum_j (p - t) as rounded for the dot."""
    acc, ws, wsum = state
    w = _grad_weights(s, sm, col_ok, pos, lse, alpha)
    ws += tl.sum(w * (s - shift[:, None]), 1)  # sum_j w_ij = 0: the shift only removes rounding
    w_lp = w.to(kT.dtype)
    wsum += tl.sum(w_lp.to(tl.float32), 1)
    acc = tl.dot(w_lp, tl.trans(kT), acc, input_precision=PRECISION)
    return acc, ws, wsum


@triton.jit
def _grad_tile_in_out(state, s, sm, col_ptr, cols, col_ok, stride_ce, stride_cn, e_lim, pos, shift, lse, alpha,
                      inv_t, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_E: tl.constexpr):
    """`_grad_tile` for fp32 features (not STACK_Q): the (BLOCK_M, E) accumulator lives in the
    program's own rows of the output partial, `out_rows` (BLOCK_M,) pointers, and each tile adds to
    it chunk by chunk, (BLOCK_M, CHUNK_E) at a time, with the column tile's matching chunk: no
    operand or accumulator wider than CHUNK_E is in registers, whatever E. It holds
    sum_j (p - t) k_j / temp (the register path's `acc * inv_t`)."""
    out_rows, row_ok, ws, wsum = state
    w = _grad_weights(s, sm, col_ok, pos, lse, alpha)  # fp32: no rounding for the dot
    ws += tl.sum(w * (s - shift[:, None]), 1)
    wsum += tl.sum(w, 1)
    for c in range(BLOCK_E // CHUNK_E):
        offs_e = c * CHUNK_E + tl.arange(0, CHUNK_E)
        e_ok = offs_e < e_lim
        kT = tl.load(col_ptr + offs_e[:, None] * stride_ce + cols[None, :] * stride_cn,
                     mask=e_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # (CHUNK_E, BLOCK_N)
        ptrs = out_rows[:, None] + offs_e[None, :]
        mask = row_ok[:, None] & e_ok[None, :]
        acc = tl.load(ptrs, mask=mask, other=0.0)
        # the chunk is read by every thread holding a copy of it before any thread overwrites it, and
        # (the barrier after the loop) written before the next tile reads it: correct whatever
        # layouts the compiler picks (today its layout conversions around the dot also synchronise)
        tl.debug_barrier()
        tl.store(ptrs, tl.dot(w * inv_t, tl.trans(kT), acc, input_precision=PRECISION), mask=mask)
    tl.debug_barrier()
    return out_rows, row_ok, ws, wsum


@triton.jit
def _column_sweep(state, queries, col_ptr, col_idx_ptr, first_tile, n_cols, stride_ce, stride_cn, e_lim,
                  rows, row_ok, key_row, shift, lse, alpha, inv_t, sims_ptr, B,
                  IN_BATCH: tl.constexpr, GRAD: tl.constexpr, HAS_IDX: tl.constexpr, WRITE_SIMS: tl.constexpr,
                  STACK_Q: tl.constexpr, TILES: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_E: tl.constexpr):
    """Stream TILES column tiles from tile `first_tile` on and fold each into `state`: the gradient's
    (GRAD, `_grad_tile`) or the statistics' (`_stats_tile`, and with WRITE_SIMS the in-batch logits
    into sims (B, B)). The columns are in-batch momentum features (IN_BATCH: rows of a (B, E)
    matrix) or a queue's ((E, Q), read in place); column j's feature e is at
    col_ptr + e * stride_ce + j * stride_cn, for j < n_cols and e < e_lim."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < e_lim
    for i in range(0, TILES):
        cols = (first_tile + i) * BLOCK_N + offs_n
        col_ok = cols < n_cols
        if STACK_Q:  # the whole tile, the stacked dot's operand (fp32 loads it in chunks)
            kT = tl.load(col_ptr + offs_e[:, None] * stride_ce + cols[None, :] * stride_cn,
                         mask=e_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_E, BLOCK_N)
            kT = kT.to(queries.dtype)
        if HAS_IDX:  # positives: every column with the row's image id
            idx_col = tl.load(col_idx_ptr + cols, mask=col_ok, other=0)
            pos = (idx_col[None, :] == key_row[:, None]) & col_ok[None, :]
        elif IN_BATCH:  # positive: the paired sample, the diagonal
            pos = (cols[None, :] == rows[:, None]) & col_ok[None, :]
        else:  # no positives in the queue
            pos = (cols[None, :] < 0) & row_ok[:, None]
        if STACK_Q:
            s, sm = _logits(queries, kT, inv_t, BLOCK_M, BLOCK_N)
        else:
            s, sm = _streamed_logits(queries, col_ptr, cols, col_ok, stride_ce, stride_cn, e_lim, inv_t, PRECISION,
                                     BLOCK_M, BLOCK_N, BLOCK_E, CHUNK_E)
        if GRAD and not STACK_Q:
            state = _grad_tile_in_out(state, s, sm, col_ptr, cols, col_ok, stride_ce, stride_cn, e_lim, pos, shift,
                                      lse, alpha, inv_t, PRECISION, BLOCK_E, CHUNK_E)
        elif GRAD:
            state = _grad_tile(state, s, sm, kT, col_ok, pos, shift, lse, alpha, PRECISION)
        else:
            state = _stats_tile(state, s, sm, col_ok, pos, shift)
            if WRITE_SIMS and IN_BATCH:
                tl.store(sims_ptr + rows[:, None] * B + cols[None, :], s, mask=row_ok[:, None] & col_ok[None, :])
    return state


@triton.jit
def _sweep_split(state, queries, k_ptr, queue_ptr, idx_ptr, idxq_ptr, pid_s, splits_b, B, Q, e_lim, stride_k,
                 stride_ue, stride_un, rows, row_ok, key_row, shift, lse, alpha, inv_t, sims_ptr,
                 GRAD: tl.constexpr, HAS_IDX: tl.constexpr, WRITE_SIMS: tl.constexpr, STACK_Q: tl.constexpr,
                 TILES: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_E: tl.constexpr):
    """`_column_sweep` over the program's column split: splits [0, splits_b) cover the in-batch
    columns (rows of k, (B, E)), the others the queue ((E, Q)); the program branches once, not per tile."""
    if pid_s < splits_b:
        state = _column_sweep(state, queries, k_ptr, idx_ptr, pid_s * TILES, B, 1, stride_k, e_lim,
                              rows, row_ok, key_row, shift, lse, alpha, inv_t, sims_ptr, B,
                              True, GRAD, HAS_IDX, WRITE_SIMS, STACK_Q, TILES, PRECISION, BLOCK_M, BLOCK_N, BLOCK_E,
                              CHUNK_E)
    else:
        state = _column_sweep(state, queries, queue_ptr, idxq_ptr, (pid_s - splits_b) * TILES, Q, stride_ue, stride_un,
                              e_lim, rows, row_ok, key_row, shift, lse, alpha, inv_t, sims_ptr, B,
                              False, GRAD, HAS_IDX, WRITE_SIMS, STACK_Q, TILES, PRECISION, BLOCK_M, BLOCK_N, BLOCK_E,
                              CHUNK_E)
    return state


@triton.jit
def _itc_stats_kernel(
    q_ptr, qm_ptr, k_ptr, queue_ptr, temp_ptr, idx_ptr, idxq_ptr, shift_ptr, part_ptr, sims_ptr,
    B, Q, E, stride_q, stride_qm, stride_k, stride_ue, stride_un, splits_b,
    TILES_PER_SPLIT: tl.constexpr, HAS_IDX: tl.constexpr, WRITE_SIMS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    EVEN_E: tl.constexpr, STACK_Q: tl.constexpr, CHUNK_E: tl.constexpr,
):
    """Program (row block, column split): partial statistics of its columns, 7 x (BLOCK_M,).

    Splits [0, splits_b) cover the in-batch columns, the others the queue; each split streams
    TILES_PER_SPLIT tiles. EVEN_E: E == BLOCK_E (no feature mask)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = rows < B
    e_lim = BLOCK_E if EVEN_E else E  # a constant bound lets the column loads become async copies
    queries = _load_queries(q_ptr, qm_ptr, rows, row_ok, offs_e, offs_e < e_lim, stride_q, stride_qm, UPCAST,
                            STACK_Q, BLOCK_M, BLOCK_E)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    key_row = tl.load(idx_ptr + rows, mask=row_ok, other=0) if HAS_IDX else rows
    shift = tl.load(shift_ptr + rows, mask=row_ok, other=0.0)

    m0 = tl.full((BLOCK_M,), NEG, tl.float32)
    z = tl.zeros((BLOCK_M,), tl.float32)
    state = _sweep_split((m0, z, m0, z, z, z, z), queries, k_ptr, queue_ptr, idx_ptr, idxq_ptr, pid_s, splits_b,
                         B, Q, e_lim, stride_k, stride_ue, stride_un, rows, row_ok, key_row, shift, (), 0.0, inv_t,
                         sims_ptr, False, HAS_IDX, WRITE_SIMS, STACK_Q, TILES_PER_SPLIT, PRECISION,
                         BLOCK_M, BLOCK_N, BLOCK_E, CHUNK_E)

    base = part_ptr + pid_s * B + rows
    for k in tl.static_range(7):  # m_s, l_s, m_m, l_m, ts, pos_s, pos_n: part is (7, splits, B)
        tl.store(base + k * n_splits * B, state[k], mask=row_ok)


@triton.jit
def _itc_grad_kernel(
    q_ptr, qm_ptr, k_ptr, queue_ptr, temp_ptr, idx_ptr, idxq_ptr, shift_ptr, stat_ptr, posw_ptr,
    gpart_ptr, tpart_ptr, alpha,
    B, Q, E, stride_q, stride_qm, stride_k, stride_ue, stride_un, splits_b,
    TILES_PER_SPLIT: tl.constexpr, HAS_IDX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, EVEN_E: tl.constexpr,
    STACK_Q: tl.constexpr, CHUNK_E: tl.constexpr,
):
    """Program (row block, column split): partial sum_j (p_ij - t_ij) k_j / temp, (BLOCK_M, E);
    partial sum_j (p_ij - t_ij) s_ij, (BLOCK_M,) (for the temperature: summing the products
    avoids the cancellation of sum p s - sum t s, two large nearly equal numbers); and the partial
    sum of the weights p - t as rounded for the dot, (BLOCK_M,) (the launcher removes it times
    the row's own feature: reloading q here would be merged with the first load and keep it live)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = rows < B
    e_lim = BLOCK_E if EVEN_E else E
    e_ok = offs_e < e_lim
    queries = _load_queries(q_ptr, qm_ptr, rows, row_ok, offs_e, e_ok, stride_q, stride_qm, UPCAST, STACK_Q,
                            BLOCK_M, BLOCK_E)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    key_row = tl.load(idx_ptr + rows, mask=row_ok, other=0) if HAS_IDX else rows
    shift = tl.load(shift_ptr + rows, mask=row_ok, other=0.0)
    lse = (tl.load(stat_ptr + rows, mask=row_ok, other=0.0),  # mx, lz, mx_m, lz_m: stat is (4, B)
           tl.load(stat_ptr + B + rows, mask=row_ok, other=0.0),
           tl.load(stat_ptr + 2 * B + rows, mask=row_ok, other=0.0),
           tl.load(stat_ptr + 3 * B + rows, mask=row_ok, other=0.0),
           tl.load(posw_ptr + rows, mask=row_ok, other=0.0))  # posw = (1 - alpha) / number of positives
    z = tl.zeros((BLOCK_M,), tl.float32)
    if not STACK_Q:  # fp32: the accumulator is the output partial itself (`_grad_tile_in_out`): zero it first
        out_rows = gpart_ptr + pid_s * B * E + rows * E
        for c in range(BLOCK_E // CHUNK_E):
            offs_c = c * CHUNK_E + tl.arange(0, CHUNK_E)
            tl.store(out_rows[:, None] + offs_c[None, :], tl.zeros((BLOCK_M, CHUNK_E), tl.float32),
                     mask=row_ok[:, None] & (offs_c < e_lim)[None, :])
        tl.debug_barrier()
        state = (out_rows, row_ok, z, z)
    else:
        state = (tl.zeros((BLOCK_M, BLOCK_E), tl.float32), z, z)
    state = _sweep_split(state, queries, k_ptr, queue_ptr, idx_ptr, idxq_ptr, pid_s, splits_b, B, Q, e_lim,
                         stride_k, stride_ue, stride_un, rows, row_ok, key_row, shift, lse, alpha, inv_t, gpart_ptr,
                         True, HAS_IDX, False, STACK_Q, TILES_PER_SPLIT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_E,
                         CHUNK_E)
    if not STACK_Q:
        _, _, ws, wsum = state
    else:
        acc, ws, wsum = state
        out = gpart_ptr + pid_s * B * E + rows[:, None] * E + offs_e[None, :]  # computed here: not live in the loop
        tl.store(out, acc * inv_t, mask=row_ok[:, None] & e_ok[None, :])
    tl.store(tpart_ptr + pid_s * B + rows, ws, mask=row_ok)  # tpart is (2, splits, B)
    tl.store(tpart_ptr + (n_splits + pid_s) * B + rows, wsum, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# launchers


@dataclass(frozen=True)
class ItcKernelConfig:
    """Launch parameters; None picks the defaults below. Both kernels use the same column tile
    width; each picks its own row tile and number of column splits (num_splits, when given,
    applies to both).

    GPU defaults (chosen by compiling for sm_90 and reading ptxas' register/spill report,
    benchmarks/kernel_audit.py, not yet timed on a GPU): 16-bit features: both kernels 64 x 16
    tiles, 8 warps, 2 stages (wgmma, no spills under triton 3.6 and 3.9, 88 KB shared memory;
    32-column tiles spill in the gradient kernel under 3.9); fp32 features: 16 x 16 tiles,
    8 warps, 1 stage with "tf32x3" dots (plain TF32 is too coarse for logits up to
    1 / temp = 1000; the fp32 path is the accurate one, bf16 the fast one). The fp32 kernels
    stream the features in 32-wide chunks (`_streamed_logits`, `_grad_tile_in_out`): 160-190
    registers and no spills for E from 64 to 1024 under both Tritons, where holding q, qm and the
    gradient in registers spilled 0.4-1.2 KB at E = 256. Splits: about 4 programs per SM
    (gradient kernel: 2). Interpreter: 16 x 64 tiles, 2 splits."""

    block_m: Optional[int] = None  # rows per program of the stats kernel
    block_m_grad: Optional[int] = None  # rows per program of the gradient kernel
    block_n: Optional[int] = None  # columns per tile
    num_splits: Optional[int] = None  # column splits (target; rounded to whole tiles)
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    precision: str = "tf32x3"  # dot precision for fp32 features on a GPU: "ieee", "tf32x3" or "tf32"

    def resolved(self, dtype: torch.dtype, interp: bool) -> "ItcKernelConfig":
        if interp:
            d = dict(block_m=16, block_m_grad=16, block_n=64, num_warps=4, num_stages=1)
        elif dtype == torch.float32:
            d = dict(block_m=16, block_m_grad=16, block_n=16, num_warps=8, num_stages=1)
        else:
            d = dict(block_m=64, block_m_grad=64, block_n=16, num_warps=8, num_stages=2)
        given = {k: getattr(self, k) for k in d if getattr(self, k) is not None}
        return ItcKernelConfig(**{**d, **given}, num_splits=self.num_splits, precision=self.precision)


_SM_COUNT = {}


def _programs_target(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return 4 * _SM_COUNT[device]


def _check_device(t: torch.Tensor, what: str) -> None:
    check_device(t, what, "the Triton loss kernels")


def _check_itc_inputs(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                      temp, idx, idx_queue):
    named = dict(image_feat=image_feat, text_feat=text_feat, image_feat_m=image_feat_m,
                 text_feat_m=text_feat_m, image_queue=image_queue, text_queue=text_queue, temp=temp)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != image_feat.device:
            raise ValueError(f"{name} is on {t.device} but image_feat is on {image_feat.device}")
    _check_device(image_feat, "image_feat")
    if image_feat.ndim != 2:
        raise ValueError(f"image_feat must be (B, E), got {tuple(image_feat.shape)}")
    B, E = image_feat.shape
    for name in ("text_feat", "image_feat_m", "text_feat_m"):
        if named[name].shape != (B, E):
            raise ValueError(f"{name} must be (B, E) = {(B, E)} like image_feat, got {tuple(named[name].shape)}")
    if image_queue.ndim != 2 or image_queue.shape[0] != E or text_queue.shape != image_queue.shape:
        raise ValueError(
            f"image_queue and text_queue must both be (E, Q) with E = {E}, got "
            f"{tuple(image_queue.shape)} and {tuple(text_queue.shape)}"
        )
    if temp.numel() != 1:
        raise ValueError(f"temp must have one element, got shape {tuple(temp.shape)}")
    if B < 1 or E < 1:
        raise ValueError(f"empty features: B = {B}, E = {E}")
    if E > 1024:
        raise ValueError(f"embed dim {E} > 1024 is not supported by the fused ITC kernel")
    if (idx is None) != (idx_queue is None):
        raise ValueError("idx and idx_queue must be given together (retrieval targets) or not at all")
    if idx is not None:
        Q = image_queue.shape[1]
        if idx.shape != (B,) or idx_queue.shape != (Q,):
            raise ValueError(f"idx must be (B,) = ({B},) and idx_queue (Q,) = ({Q},), got "
                             f"{tuple(idx.shape)} and {tuple(idx_queue.shape)}")
        for name, t in (("idx", idx), ("idx_queue", idx_queue)):
            if t.dtype not in (torch.int64, torch.int32) or t.device != image_feat.device:
                raise ValueError(f"{name} must be an int64/int32 tensor on {image_feat.device}")


def _column_splits(B: int, Q: int, bn: int, row_blocks: int, num_splits: Optional[int], target: int):
    """(tiles per split, in-batch splits, all splits) for about `target` programs in all.

    Tiles per split is a compile-time trip count: one kernel per (B, Q) shape, which is fixed
    in training. The in-batch and the queue columns get separate splits (the kernel branches
    once per program, not per tile); every split has at least one tile."""
    n_tb, n_tq = triton.cdiv(B, bn), triton.cdiv(Q, bn)
    n_t = n_tb + n_tq
    want = num_splits or max(1, target // row_blocks)
    tps = triton.cdiv(n_t, min(want, n_t))
    splits_b = triton.cdiv(n_tb, tps)
    return tps, splits_b, splits_b + triton.cdiv(n_tq, tps)


FP32_CHUNK_E = 32  # feature chunk of the fp32 logits (`_streamed_logits`); see `kernel_audit.itc_rows`


def _feature_constexprs(dtype: torch.dtype, E: int, precision: str, interp: bool) -> dict:
    """Both kernels' compile-time flags that follow from the features' dtype and width E."""
    be = max(16, triton.next_power_of_2(E))
    return dict(
        BLOCK_E=be,
        EVEN_E=E == be,
        UPCAST=dtype == torch.bfloat16 and interp,  # the interpreter's bf16 arithmetic is broken
        PRECISION=precision if dtype == torch.float32 else "tf32",  # ignored for 16-bit
        # one [q; qm] dot on wgmma; fp32 (3xTF32 mma.sync) streams them and accumulates the gradient in
        # its output (`_streamed_logits`, `_grad_tile_in_out`)
        STACK_Q=dtype != torch.float32,
        CHUNK_E=be if dtype != torch.float32 else min(be, FP32_CHUNK_E),
    )


def _itc_direction(q, qm, k, queue, temp, alpha, idx, idx_queue, need_grad, write_sims, cfg):
    """One direction's per-row loss, d loss_i / d q_i, d loss_i / d temp, and (B, B) logits."""
    B, E = q.shape
    Q = queue.shape[1]
    interp = interpreting()
    cfg = cfg.resolved(q.dtype, interp)
    bm, bn = cfg.block_m, cfg.block_n
    row_blocks = triton.cdiv(B, bm)
    tps, splits_b, splits = _column_splits(B, Q, bn, row_blocks, cfg.num_splits, _programs_target(q.device))
    row_blocks_g = triton.cdiv(B, cfg.block_m_grad)
    # the gradient kernel needs only the merged per-row statistics, so it splits the columns its
    # own way: fewer programs per SM, as each writes a (BLOCK_M, E) fp32 partial
    tps_g, splits_b_g, splits_g = _column_splits(B, Q, bn, row_blocks_g, cfg.num_splits,
                                                 max(1, _programs_target(q.device) // 2))
    if splits_g * B * E >= 2**31 or E * max(Q, 1) >= 2**31:
        raise ValueError("ITC problem too large for 32-bit offsets")
    dev = q.device
    has_idx = idx is not None
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    idx_a = idx if has_idx else dummy
    idx_b = idx_queue if has_idx else dummy
    part = torch.empty(7, splits, B, dtype=torch.float32, device=dev)
    # per-row shift for the weighted sums: the paired (diagonal) logit, a positive in both modes
    shift = (q.float() * k.float()).sum(1) / temp.reshape(()).float()
    sims = torch.empty(B, B, dtype=torch.float32, device=dev) if write_sims else part
    common = dict(HAS_IDX=has_idx, BLOCK_N=bn, **_feature_constexprs(q.dtype, E, cfg.precision, interp),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _itc_stats_kernel[(row_blocks, splits)](
        q, qm, k, queue, temp, idx_a, idx_b, shift, part, sims,
        B, Q, E, q.stride(0), qm.stride(0), k.stride(0), queue.stride(0), queue.stride(1), splits_b,
        TILES_PER_SPLIT=tps, WRITE_SIMS=write_sims, BLOCK_M=bm, **common,
    )
    # merge the column splits: (S, B) partials -> (B,) per-row statistics
    m_s, l_s, m_m, l_m, ts, pos_s, pos_n = part.unbind(0)
    mx = m_s.max(0).values
    lz = torch.log((l_s * torch.exp(m_s - mx)).sum(0))  # lse = mx + lz
    mx_m = m_m.max(0).values
    w_m = torch.exp(m_m - mx_m)
    l_tot_m = (l_m * w_m).sum(0)
    lz_m = torch.log(l_tot_m)
    et_s = (ts * w_m).sum(0) / l_tot_m  # sum_j softmax(sm)_ij (s_ij - shift_i)
    n_pos = pos_n.sum(0)
    tgt_s = alpha * et_s + (1.0 - alpha) * pos_s.sum(0) / n_pos  # sum_j t_ij (s_ij - shift_i)
    loss_rows = ((mx - shift) - tgt_s) + lz  # lse_i - sum_j t_ij s_ij
    g = dtemp_rows = None
    if need_grad:
        posw = (1.0 - alpha) / n_pos
        gpart = torch.empty(splits_g, B, E, dtype=torch.float32, device=dev)  # about 2 x SMs x BLOCK_M x E
        tpart = torch.empty(2, splits_g, B, dtype=torch.float32, device=dev)  # sum w (s - shift), sum w rounded
        _itc_grad_kernel[(row_blocks_g, splits_g)](
            q, qm, k, queue, temp, idx_a, idx_b, shift, torch.stack([mx, lz, mx_m, lz_m]), posw, gpart, tpart, float(alpha),
            B, Q, E, q.stride(0), qm.stride(0), k.stride(0), queue.stride(0), queue.stride(1), splits_b_g,
            TILES_PER_SPLIT=tps_g, BLOCK_M=cfg.block_m_grad, **common,
        )
        t = temp.reshape(()).float()
        ws, wsum = tpart.sum(1)  # (2, S, B) -> 2 x (B,)
        # sum_j w_ij = 0 exactly, but not once w is rounded to the dot's dtype: remove the rounded
        # weights' sum times the row's own feature, which is close to the columns carrying most weight
        g = gpart.sum(0) - (wsum / t)[:, None] * q.float()  # (B, E) = sum_j (p_ij - t_ij) k_j / temp
        dtemp_rows = -ws / t  # d loss_i / d temp
    return loss_rows, g, dtemp_rows, (sims if write_sims else None)


# The loss is a PyTorch custom op (not an autograd.Function) so that torch.compile traces it as
# one opaque node (fullgraph=True works) and never looks inside the Triton launches. Custom-op
# schemas take only primitive arguments, so ItcKernelConfig travels as its fields and is rebuilt
# inside, and `need_grad` is decided by the caller (`itc_loss`), not from autograd state here.
# The op also returns the fp32 input gradients computed by the forward, (0,)-shaped when not
# needed: the backward (`_itc_backward`) only scales them, and never re-reads the queues.
@torch.library.custom_op("blipfast::itc_loss", mutates_args=())
def _itc_op(image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor,
            image_queue: Tensor, text_queue: Tensor, temp: Tensor, alpha: float, idx: Optional[Tensor],
            idx_queue: Optional[Tensor], need_grad: bool, block_m: Optional[int], block_m_grad: Optional[int],
            block_n: Optional[int], num_splits: Optional[int], num_warps: Optional[int],
            num_stages: Optional[int], precision: str
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, sim_i2t (B, B), sim_t2i (B, B), d loss / d image_feat (B, E), d loss / d text_feat
    (B, E), d loss / d temp ()), all fp32; the three gradients are empty (0,) without need_grad."""
    cfg = ItcKernelConfig(block_m=block_m, block_m_grad=block_m_grad, block_n=block_n, num_splits=num_splits,
                          num_warps=num_warps, num_stages=num_stages, precision=precision)
    feats = [t.contiguous() for t in (image_feat, text_feat, image_feat_m, text_feat_m)]
    image_feat, text_feat, image_feat_m, text_feat_m = feats
    temp_c = temp.reshape(1).contiguous()
    # image -> text: image queries, text momentum features + text queue as columns
    l_i2t, g_i2t, dt_i2t, s_i2t = _itc_direction(image_feat, image_feat_m, text_feat_m, text_queue,
                                                 temp_c, alpha, idx, idx_queue, need_grad, True, cfg)
    l_t2i, g_t2i, dt_t2i, s_t2i = _itc_direction(text_feat, text_feat_m, image_feat_m, image_queue,
                                                 temp_c, alpha, idx, idx_queue, need_grad, True, cfg)
    B = image_feat.shape[0]
    loss = (l_i2t.sum() + l_t2i.sum()) / (2 * B)  # mean over rows, then over the two directions
    if not need_grad:
        # three distinct tensors: a custom op's outputs may not alias one another
        g_i2t, g_t2i, dtemp = (loss.new_empty(0) for _ in range(3))
    else:
        dtemp = dt_i2t.sum() + dt_t2i.sum()
    return loss, s_i2t, s_t2i, g_i2t, g_t2i, dtemp


@_itc_op.register_fake
def _itc_fake(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha, idx,
              idx_queue, need_grad, block_m, block_m_grad, block_n, num_splits, num_warps, num_stages, precision):
    B, E = image_feat.shape
    f32 = dict(dtype=torch.float32)
    grads = ((B, E), (B, E), ()) if need_grad else ((0,), (0,), (0,))
    return (image_feat.new_empty((), **f32), image_feat.new_empty(B, B, **f32), image_feat.new_empty(B, B, **f32),
            *(image_feat.new_empty(s, **f32) for s in grads))


def _itc_setup_context(ctx, inputs, output):
    image_feat, text_feat, temp = inputs[0], inputs[1], inputs[6]
    _loss, s_i2t, s_t2i, g_i2t, g_t2i, dtemp = output
    ctx.mark_non_differentiable(s_i2t, s_t2i, g_i2t, g_t2i, dtemp)
    ctx.save_for_backward(g_i2t, g_t2i, dtemp)
    ctx.B = image_feat.shape[0]
    ctx.dtypes = (image_feat.dtype, text_feat.dtype, temp.dtype)
    ctx.temp_shape = temp.shape


def _itc_backward(ctx, g_loss, _g_s1, _g_s2, _g_img, _g_txt, _g_temp):
    g_i2t, g_t2i, dtemp = ctx.saved_tensors
    c = g_loss.float() / (2 * ctx.B)
    d_img = d_txt = d_temp = None
    if ctx.needs_input_grad[0]:
        d_img = (c * g_i2t).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        d_txt = (c * g_t2i).to(ctx.dtypes[1])
    if ctx.needs_input_grad[6]:
        d_temp = (c * dtemp).reshape(ctx.temp_shape).to(ctx.dtypes[2])
    return d_img, d_txt, None, None, None, None, d_temp, *([None] * 11)


_itc_op.register_autograd(_itc_backward, setup_context=_itc_setup_context)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    idx: Optional[torch.Tensor] = None,
    idx_queue: Optional[torch.Tensor] = None,
    config: ItcKernelConfig = ItcKernelConfig(),
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ITC loss; returns (loss, sim_i2t_inbatch, sim_t2i_inbatch).

    image_feat, text_feat: (B, E) normalised online features (get gradients);
    image_feat_m, text_feat_m: (B, E) normalised momentum features (no gradient);
    image_queue, text_queue: (E, Q) feature queues (read in place, no gradient, not needed by
    the backward, so they may be overwritten right after this call);
    temp: 1-element tensor (gets a gradient); alpha: python float, distillation weight;
    idx, idx_queue: optional (B,) and (Q,) int image ids (retrieval fine-tuning): targets
    pos / pos.sum with pos = (idx_i == [idx | idx_queue]_j) instead of the diagonal.

    loss is a 0-dim fp32 tensor equal to `reference.itc_loss` (`reference.itc_loss_retrieval`
    with ids); the sims are the (B, B) fp32 online-vs-momentum in-batch logits (no gradient),
    which `sample_hard_negatives` takes.
    """
    _check_itc_inputs(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                      temp, idx, idx_queue)
    need_grad = torch.is_grad_enabled() and (image_feat.requires_grad or text_feat.requires_grad
                                             or temp.requires_grad)
    c = config
    loss, s_i2t, s_t2i, _, _, _ = _itc_op(
        image_feat, text_feat, image_feat_m.detach(), text_feat_m.detach(), image_queue.detach(),
        text_queue.detach(), temp, float(alpha), idx, idx_queue, need_grad, c.block_m, c.block_m_grad,
        c.block_n, c.num_splits, c.num_warps, c.num_stages, c.precision)
    return loss, s_i2t, s_t2i
