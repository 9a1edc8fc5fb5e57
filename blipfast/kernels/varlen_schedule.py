"""Tile schedules of the packed (variable-length) attention layout, built with device ops (no host sync).

The kernels run the packed layout as B = 1, Lq = total_q, Lk = total_k; a schedule gives each
program a span of whole sequences, so that several short captions share one tile and no program
touches a row outside the packed tensors. `varlen_schedule` serves the forward, dQ and dK/dV
kernels, `varlen_fused_schedule` the fused backward (which also needs the query rows each program
owns).
"""
from __future__ import annotations

import torch
import triton


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
