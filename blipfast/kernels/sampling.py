"""Hard-negative sampling without a host sync: one batched draw per row from the original's
distributions, inside one Triton kernel (`_sample_kernel`) run as the custom op
"blipfast::sample_negatives".

Pre-training (`sample_hard_negatives`): per row, exactly softmax(s[:, :B]) + 1e-4 with the
diagonal zeroed, drawn as a mixture: with probability soft / (soft + (B - 1) * 1e-4), where
soft = sum_{j != i} softmax_j, a Gumbel-max draw over the off-diagonal logits (the softmax part),
otherwise a uniform draw over the off-diagonal columns (the 1e-4 floor). Retrieval
(`sample_negatives_by_idx`): softmax(s) with the columns of the same image id removed (no floor).
Seeded Philox noise; `reference.sample_hard_negatives` / `sample_retrieval_negatives` are the
semantics.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_device, interpreting

__all__ = ["sample_hard_negatives", "sample_negatives_by_idx"]

FLOOR = 1e-4  # the original's additive weight on every off-diagonal in-batch column
NEG = tl.constexpr(-3.0e38)  # finite "minus infinity" (no inf - inf = NaN)


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(
    sims_ptr, out_ptr, bad_ptr, seed, idx_row_ptr, idx_col_ptr,
    R, S, stride_r, floor, C: tl.constexpr,
    BY_IDX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One draw per virtual row v = row * S + draw, over the C columns of sims[row].

    BY_IDX False (pre-training): column row % C excluded, weights softmax(row) + floor, drawn
    as a mixture of a Gumbel-max draw (softmax part) and a uniform one (floor part).
    BY_IDX True (retrieval): columns with idx_col == idx_row[row] excluded, weights softmax.
    Noise for virtual row v lives at philox offsets v * (C + 2) + [0, C + 2).
    """
    pid = tl.program_id(0)
    v = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) virtual rows
    v_ok = v < R * S
    row = tl.where(v_ok, v // S, 0)
    offs_c = tl.arange(0, BLOCK_C)
    if BY_IDX:
        idx_r = tl.load(idx_row_ptr + row)
    else:
        excl = row % C
    best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    best_j = tl.zeros((BLOCK_R,), tl.int32)
    m_all = tl.full((BLOCK_R,), NEG, tl.float32)
    l_all = tl.zeros((BLOCK_R,), tl.float32)
    m_off = tl.full((BLOCK_R,), NEG, tl.float32)
    l_off = tl.zeros((BLOCK_R,), tl.float32)
    bad = tl.zeros((BLOCK_R,), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        c_ok = cols < C
        ok2 = v_ok[:, None] & c_ok[None, :]
        x = tl.load(sims_ptr + row[:, None] * stride_r + cols[None, :], mask=ok2, other=0.0).to(tl.float32)
        bad = tl.maximum(bad, tl.max((ok2 & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32), 1))
        if BY_IDX:
            idx_c = tl.load(idx_col_ptr + cols, mask=c_ok, other=0)
            allowed = ok2 & (idx_c[None, :] != idx_r[:, None])
        else:
            allowed = ok2 & (cols[None, :] != excl[:, None])
        u = tl.rand(seed, v[:, None] * (C + 2) + cols[None, :])
        u = tl.minimum(u, 0.99999994)  # keep -log(u) > 0 (u rounds to 1.0 about once in 2^25)
        g = tl.where(allowed, x - tl.log(-tl.log(u)), float("-inf"))  # Gumbel-perturbed logits
        tile_best = tl.max(g, 1)
        tile_j = tl.argmax(g, 1).to(tl.int32) + c0
        take = tile_best > best
        best_j = tl.where(take, tile_j, best_j)
        best = tl.where(take, tile_best, best)
        if not BY_IDX:
            xa = tl.where(ok2, x, float("-inf"))
            mn = tl.maximum(m_all, tl.max(xa, 1))
            l_all = l_all * tl.exp(m_all - mn) + tl.sum(tl.exp(xa - mn[:, None]), 1)
            m_all = mn
            xo = tl.where(allowed, x, float("-inf"))
            mn = tl.maximum(m_off, tl.max(xo, 1))
            l_off = l_off * tl.exp(m_off - mn) + tl.sum(tl.exp(xo - mn[:, None]), 1)
            m_off = mn
    if BY_IDX:
        choice = best_j
        bad = tl.maximum(bad, (best == float("-inf")).to(tl.int32))  # no column left to draw
        fallback = row % C
    else:
        # soft = sum_{j != i} softmax_j; the floor part has total mass floor * (C - 1)
        soft = tl.exp((m_off + tl.log(l_off)) - (m_all + tl.log(l_all)))
        p_soft = soft / (soft + floor * (C - 1))
        u_branch = tl.rand(seed, v * (C + 2) + C)
        u_pick = tl.rand(seed, v * (C + 2) + C + 1)
        k = tl.minimum((u_pick * (C - 1)).to(tl.int32), C - 2)
        uniform_j = k + (k >= excl).to(tl.int32)  # skip the excluded column
        choice = tl.where(u_branch < p_soft, best_j, uniform_j)
        fallback = (row + 1) % C
    choice = tl.where(bad != 0, fallback, choice)  # always a valid index, even for bad rows
    tl.store(out_ptr + v, choice.to(tl.int64), mask=v_ok)
    tl.store(bad_ptr + v, bad, mask=v_ok)


# ---------------------------------------------------------------------------------------------
# launchers


def _seed_from(generator: Optional[torch.Generator], seed: Optional[int]) -> Tensor:
    """A philox seed drawn on the host (no device sync), as a 0-dim CPU int64 tensor so that
    drawing it stays inside a torch.compile graph: explicit, from a CPU generator, or from
    PyTorch's default CPU generator (so torch.manual_seed makes runs repeatable)."""
    if seed is not None:
        return torch.tensor(int(seed), dtype=torch.int64)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator (or seed=): drawing the seed from a CUDA "
                         "generator would need a host-device sync")
    # >= 2^31: Triton then always passes it as int64 (one compiled variant)
    return torch.randint(2**31, 2**62, (), generator=generator, dtype=torch.int64)


def _launch_sampler(sims, num_samples, seed, idx_row=None, idx_col=None):
    R, C = sims.shape
    by_idx = idx_row is not None
    if sims.stride(1) != 1:
        sims = sims.contiguous()
    total = R * num_samples
    if total * (C + 2) >= 2**31:
        raise ValueError(f"too many draws for 32-bit noise offsets: {R} rows x {num_samples} x {C + 2}")
    out = torch.empty(total, dtype=torch.int64, device=sims.device)
    bad = torch.empty(total, dtype=torch.int32, device=sims.device)
    interp = interpreting()
    block_c = min(triton.next_power_of_2(C), 16 if interp else 256)
    block_r = 8192 if interp else max(1, 4096 // block_c)
    dummy = torch.zeros(1, dtype=torch.int64, device=sims.device)
    grid = (triton.cdiv(total, block_r),)
    _sample_kernel[grid](
        sims, out, bad, seed, idx_row if by_idx else dummy, idx_col if by_idx else dummy,
        R, num_samples, sims.stride(0), FLOOR, C, BY_IDX=by_idx, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out.view(R, num_samples), bad.view(R, num_samples)


# A custom op, so that torch.compile treats the draw as one opaque call (no graph break, no
# tracing into the launcher). The non-finite check runs inside it: on the CPU it costs nothing,
# and on CUDA it is asked for explicitly (check=True), since it is a host-device sync.
@torch.library.custom_op("blipfast::sample_negatives", mutates_args=())
def _sample_op(sims: Tensor, seed: Tensor, num_samples: int, idx_row: Optional[Tensor],
               idx_col: Optional[Tensor], check: bool, message: str) -> Tensor:
    out, bad = _launch_sampler(sims, num_samples, int(seed.item()), idx_row, idx_col)
    if check and bool(bad.any()):
        raise ValueError(message)
    return out


@_sample_op.register_fake
def _sample_fake(sims, seed, num_samples, idx_row, idx_col, check, message):
    return sims.new_empty((sims.shape[0], num_samples), dtype=torch.int64)


def _sample(sims, num_samples, seed, check, message, idx_row=None, idx_col=None) -> Tensor:
    """Non-finite rows: raised on CPU (no sync to avoid); on CUDA only when check=True."""
    if check is None:
        check = sims.device.type == "cpu"
    return _sample_op(sims, seed, num_samples, idx_row, idx_col, bool(check), message)


def _check_sims(sims: torch.Tensor, name: str) -> None:
    if not isinstance(sims, torch.Tensor) or sims.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor of logits")
    if sims.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {sims.dtype}")
    check_device(sims, name, "the Triton loss kernels")


def sample_hard_negatives(
    sim_i2t_inbatch: torch.Tensor,
    sim_t2i_inbatch: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    num_samples: int = 1,
    check: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pre-training hard negatives, drawn from `reference.hard_negative_weights` without a sync.

    sim_i2t_inbatch, sim_t2i_inbatch: (B, B) in-batch logits (already / temp), B >= 2.
    Returns (neg_image_for_text, neg_text_for_image): int64 (B,) (or (B, num_samples)), drawn
    from the t2i and the i2t rows respectively. Seed: `seed`, else a CPU `generator`, else
    torch's default CPU generator. Non-finite similarities raise ValueError when `check` (default:
    on CPU tensors only); on CUDA the draw does not wait for the GPU: a non-finite row draws
    (i + 1) % B, and the same non-finite values make the ITC loss non-finite, which is where a
    diverged run surfaces (pass check=True to pay one sync and raise here).
    """
    _check_sims(sim_i2t_inbatch, "sim_i2t_inbatch")
    _check_sims(sim_t2i_inbatch, "sim_t2i_inbatch")
    B = sim_i2t_inbatch.shape[0]
    if sim_i2t_inbatch.shape != (B, B) or sim_t2i_inbatch.shape != (B, B):
        raise ValueError(f"in-batch sims must both be (B, B), got {tuple(sim_i2t_inbatch.shape)} "
                         f"and {tuple(sim_t2i_inbatch.shape)}")
    if B < 2:
        raise ValueError(f"hard-negative sampling needs a batch of at least 2 per rank, got {B}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    # rows 0..B-1: t2i (a negative image per text), rows B..2B-1: i2t (a negative text per image)
    sims = torch.cat([sim_t2i_inbatch, sim_i2t_inbatch], dim=0)  # (2B, B); row r excludes r % B
    out = _sample(sims, num_samples, _seed_from(generator, seed), check,
                  "non-finite ITC similarity while sampling hard negatives (the model "
                  "has diverged: NaN/inf in the image or text features)")
    neg_img, neg_txt = out[:B], out[B:]
    if num_samples == 1:
        return neg_img.squeeze(1), neg_txt.squeeze(1)
    return neg_img, neg_txt


def sample_negatives_by_idx(
    sims: torch.Tensor,
    idx_row: torch.Tensor,
    idx_col: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    num_samples: int = 1,
    check: Optional[bool] = None,
) -> torch.Tensor:
    """Retrieval negatives: per row r, one column drawn from softmax(sims[r]) with the columns
    of the same image id (idx_col == idx_row[r]) removed, as `reference.retrieval_negative_weights`.

    sims: (R, C) logits; idx_row: (R,), idx_col: (C,) int ids. Returns int64 (R,) (or
    (R, num_samples)). A row with no allowed column (every column shares its id) or with
    non-finite logits raises ValueError when `check` (default on CPU); on CUDA it draws
    r % C, without a sync (see `sample_hard_negatives`).
    """
    _check_sims(sims, "sims")
    R, C = sims.shape
    if idx_row.shape != (R,) or idx_col.shape != (C,):
        raise ValueError(f"idx_row must be (R,) = ({R},) and idx_col (C,) = ({C},), got "
                         f"{tuple(idx_row.shape)} and {tuple(idx_col.shape)}")
    for name, t in (("idx_row", idx_row), ("idx_col", idx_col)):
        if t.dtype not in (torch.int64, torch.int32) or t.device != sims.device:
            raise ValueError(f"{name} must be an int64/int32 tensor on {sims.device}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    out = _sample(sims, num_samples, _seed_from(generator, seed), check,
                  "cannot sample a retrieval negative: a row has non-finite similarities "
                  "or every candidate shares its image id", idx_row.contiguous(), idx_col.contiguous())
    return out.squeeze(1) if num_samples == 1 else out
