"""Attention dropout: the Philox keep-mask the forward and both backward kernels regenerate.

Element (b, h, i, j) of the (B, H, Lq, Lk) scores (packed layout: (1, H, total_q, total_k)) is kept
when its random byte is >= 256 p. One Philox-4x32-7 call serves 16 elements, laid out so that each
thread of an MMA accumulator holds 8 of them in registers (`_dropout_draws`), in both the (query,
key) orientation of the forward and dQ and the (key, query) one of dK/dV. p is realised in steps of
1/256 (`effective_dropout_p`: p = 0.1 runs at 26/256 = 0.1016, as in FlashAttention-2). The mask
depends only on (seed, b * H + h, i, j), never on the tiling.

Device side: `_dropout_threshold`, `_dropout_keep`, `_dropout_draws` (called by the attention
kernels in `flash_kernels`). Host side, for tests and the reference: `dropout_keep_mask` and
`varlen_dropout_keep_masks` materialise the mask, `dropout_draws` the bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard

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


def effective_dropout_p(dropout_p: float) -> float:
    """The dropout probability the kernels realise: p rounded to a multiple of 1/256 (they compare
    one random byte per element against a threshold, as FlashAttention-2 does), at most 255/256.
    Outputs are scaled by 1 / (1 - effective p), so the expectation is exact. p = 0.1 -> 26/256 =
    0.1016 (BERT's and BLIP's rate runs 1.6% high)."""
    if dropout_p <= 0.0:
        return 0.0
    return min(round(dropout_p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1) / DROPOUT_LEVELS


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
        with device_guard(out):
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
