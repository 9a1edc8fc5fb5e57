"""Packed (variable-length) text: B right-padded sequences laid end to end, no pad tokens.

`Packing` says where the real tokens of a padded (B, L) batch are: `index` into the flattened
(B * L) batch, their column (= BERT position id) and `cu_seqlens`, the cumulative lengths that
`varlen` attention takes. `pad_packed` / `unpad` move rows between the packed (total, ...) and
the padded (B, max_len, ...) layouts; the attention backends that have no packed kernel use
them around their padded call.

Sizes (total tokens, longest sequence) are Python ints: the layout is built with one host read,
and everything after it is sync-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F


class Seqs(NamedTuple):
    """Packed sequences as `varlen` attention takes them."""

    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_len: int


@dataclass(frozen=True)
class Packing:
    lengths: torch.Tensor  # (B,) int64 real tokens per sequence
    cu_seqlens: torch.Tensor  # (B + 1,) int32, starts at 0
    index: torch.Tensor  # (total,) int64 positions of the real tokens in the flattened (B * width) batch
    positions: torch.Tensor  # (total,) int64 column of each real token (its position id)
    width: int  # L, the padded length the index refers to
    total: int  # real tokens in all
    max_len: int  # longest sequence

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @staticmethod
    def from_lengths(lengths: torch.Tensor, width: int, total: Optional[int] = None,
                     max_len: Optional[int] = None) -> "Packing":
        """Sequence b is columns 0 .. lengths[b] - 1 of row b; one host read unless total and
        max_len are given."""
        lengths = lengths.long()
        if total is None or max_len is None:
            total, max_len = (int(v) for v in torch.stack([lengths.sum(), lengths.max()]).tolist())
        B = lengths.shape[0]
        seq = torch.repeat_interleave(torch.arange(B, device=lengths.device), lengths, output_size=total)  # (total,)
        starts = torch.cumsum(lengths, 0) - lengths  # (B,)
        positions = torch.arange(total, device=lengths.device) - starts[seq]  # (total,)
        cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))  # (B + 1,)
        return Packing(lengths, cu, seq * width + positions, positions, width, total, max_len)

    @staticmethod
    def from_mask(mask: torch.Tensor, extra_ok: Optional[torch.Tensor] = None) -> Optional["Packing"]:
        """Layout of a (B, L) attention mask, or None when the batch cannot be packed exactly:
        a row whose real tokens are not a prefix (left or holed padding), a row with no real
        token (its [CLS] output is still read), or `extra_ok` (a bool tensor) not all true."""
        mask = mask.to(torch.bool)
        B, L = mask.shape
        lengths = mask.sum(1)  # (B,)
        prefix = torch.arange(L, device=mask.device)[None, :] < lengths[:, None]  # (B, L)
        ok = (prefix == mask).all() & (lengths > 0).all()
        if extra_ok is not None:
            ok = ok & extra_ok.all()
        total, max_len, ok = torch.stack([lengths.sum(), lengths.max(), ok.long()]).tolist()  # one host read
        if not ok:
            return None
        return Packing.from_lengths(lengths, L, total, max_len)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (total, ...) real rows."""
        return x.flatten(0, 1)[self.index.to(x.device)]

    @property
    def seqs(self) -> Seqs:
        return Seqs(self.cu_seqlens, self.max_len)

    def first_rows(self) -> torch.Tensor:
        """(B,) packed row of each sequence's first token."""
        return self.cu_seqlens[:-1].long()

    def to(self, device) -> "Packing":
        if self.index.device == torch.device(device):
            return self
        return Packing(self.lengths.to(device), self.cu_seqlens.to(device), self.index.to(device),
                       self.positions.to(device), self.width, self.total, self.max_len)


def _padded_rows(cu_seqlens: torch.Tensor, total: int, max_len: int) -> torch.Tensor:
    """(total,) row of each packed token in the flattened (B * max_len) padded layout."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]  # (B,)
    B = lengths.shape[0]
    seq = torch.repeat_interleave(torch.arange(B, device=cu.device), lengths, output_size=total)  # (total,)
    return seq * max_len + torch.arange(total, device=cu.device) - cu[seq]


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(total, ...) packed rows -> ((B, max_len, ...) zero-padded, bool (B, max_len) real-row mask).

    When every sequence is max_len long (e.g. image tokens) this is a view and the mask is None."""
    B, total = cu_seqlens.shape[0] - 1, x.shape[0]
    if total == B * max_len:
        return x.view(B, max_len, *x.shape[1:]), None
    rows = _padded_rows(cu_seqlens, total, max_len)
    out = x.new_zeros(B * max_len, *x.shape[1:]).index_copy(0, rows, x)  # (B * max_len, ...)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    mask = torch.arange(max_len, device=x.device)[None, :] < lengths[:, None]  # (B, max_len)
    return out.view(B, max_len, *x.shape[1:]), mask


def unpad(x: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(B, max_len, ...) padded -> (total, ...) packed rows (the inverse of pad_packed)."""
    B, max_len = x.shape[:2]
    if total == B * max_len:
        return x.reshape(total, *x.shape[2:])
    return x.reshape(B * max_len, *x.shape[2:])[_padded_rows(cu_seqlens, total, max_len)]
