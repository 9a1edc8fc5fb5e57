"""Text generation for BLIP's decoders: beam search, nucleus sampling and greedy decoding.

The semantics are those the original BLIP gets from HF transformers' `generate` (the version in
the reference venv, 4.46), so captions and answers match token for token:

* lengths count the prompt: `max_length` and `min_length` are total sequence lengths, prompt
  tokens included ("[DEC] a picture of" is 4 of the 20 caption tokens);
* `min_length`: the EOS token ([SEP]) is banned while the sequence is shorter than min_length;
* repetition penalty (CTRL-style): every token already in the sequence, prompt included, has its
  score divided by the penalty when positive and multiplied by it when negative. Beam search
  applies it (and the EOS ban) to log-probabilities, greedy/sampling to raw logits, as HF does;
* beam search keeps the best `num_beams` finished hypotheses, scored sum(log p) / L**length_penalty
  with L the number of generated tokens (EOS included); a batch item stops once it has num_beams
  hypotheses and none of its running beams can beat the worst (HF's default `early_stopping=False`
  heuristic); when max_length is reached the running beams are added as hypotheses;
* sampling filters top-k (HF's default k=50, which the original inherits) then top-p, and samples
  from the softmax; finished rows are padded.

transformers 5.x rewrote beam search and changed rare edge cases (which candidates may finish at
max_length, the early-stop estimate): on random toy models 2 of 60 batches differed from 4.46,
none from 4.46 itself (tests/parity/test_task_inference.py checks this in the reference venv).

Decoding runs incrementally: a key/value cache holds the decoder's self-attention keys/values
(reordered by index when beams are re-ranked) and the cross-attention keys/values of the memory
(image or question tokens) are projected once per memory item, then indexed per beam.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

KV = Tuple[torch.Tensor, torch.Tensor]

__all__ = [
    "IncrementalDecoder",
    "apply_repetition_penalty",
    "ban_eos_before_min_length",
    "top_k_filter",
    "top_p_filter",
    "greedy_search",
    "sample",
    "beam_search",
    "generate",
]


class IncrementalDecoder:
    """A `TextDecoder` run one step at a time.

    decoder: a `blipfast.models.med.TextDecoder`; memory: (B, N, W) tokens it cross-attends to;
    memory_mask: optional bool (B, N), True = real token; expand: rows per memory item (beams),
    so the decoder sees B * expand rows, row r reading memory item r // expand.

    step(ids (R, T)) -> logits (R, V) of the last position, appending to the self-attention cache
    (the first call takes the whole prompt, later calls one token per row); reorder(rows) permutes
    the cache rows (beam re-ranking). The memory's keys/values never move: beams of one item
    share them.
    """

    def __init__(self, decoder, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None,
                 expand: int = 1):
        if memory.ndim != 3:
            raise ValueError(f"memory must be (B, N, W), got {tuple(memory.shape)}")
        if memory_mask is not None and memory_mask.shape != memory.shape[:2]:
            raise ValueError(f"memory_mask {tuple(memory_mask.shape)} does not match memory {tuple(memory.shape[:2])}")
        self.decoder = decoder
        kv = decoder.bert.image_kv(memory)  # per layer (B, H, N, D): projected once per item
        if expand > 1:
            rows = torch.arange(memory.shape[0], device=memory.device).repeat_interleave(expand)
            kv = [(k[rows], v[rows]) for k, v in kv]  # (B * expand, H, N, D)
            memory_mask = None if memory_mask is None else memory_mask[rows]
        self.memory_kv: List[KV] = kv
        self.memory_mask = memory_mask
        self.past: Optional[List[KV]] = None

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, self.past = self.decoder.bert(
            ids, None, image_mask=self.memory_mask, causal=True, image_kv=self.memory_kv,
            past_kv=self.past, return_kv=True,
        )  # hidden: (R, T, C)
        return self.decoder.logits(hidden[:, -1])  # (R, V)

    def reorder(self, rows: torch.Tensor) -> None:
        if self.past is not None:
            self.past = [(k[rows], v[rows]) for k, v in self.past]


# ---------------------------------------------------------------------------------------------
# score processors: each takes (R, V) float scores and returns new scores


def apply_repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token present in seqs (R, T): s / penalty if s > 0 else s * penalty."""
    if penalty == 1.0:
        return scores
    seen = torch.gather(scores, 1, seqs)  # (R, T): repeated tokens get the same value, written once
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, seqs, seen)


def ban_eos_before_min_length(scores: torch.Tensor, cur_len: int, min_length: int, eos_token_id: int) -> torch.Tensor:
    """EOS gets -inf while the sequence (prompt included) is shorter than min_length."""
    if cur_len >= min_length:
        return scores
    scores = scores.clone()
    scores[:, eos_token_id] = float("-inf")
    return scores


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep tokens scoring at least the k-th best (ties kept); the rest get -inf."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # (R, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, top_p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability is at most 1 - top_p.

    Equivalently, keep a token when the probability mass of the tokens less likely than it
    exceeds 1 - top_p; at least `min_keep` tokens (the most likely) stay.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return scores
    ascending, order = torch.sort(scores, dim=-1)  # least likely first
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)  # (R, V): mass of this token and all less likely
    drop = cum <= 1.0 - top_p
    drop[:, -min_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


# ---------------------------------------------------------------------------------------------
# decoding loops


def _check_lengths(prompt: torch.Tensor, max_length: int, min_length: int) -> None:
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt ids must be (B, P) with P >= 1, got {tuple(prompt.shape)}")
    if max_length <= prompt.shape[1]:
        raise ValueError(
            f"max_length={max_length} leaves no room to generate after a {prompt.shape[1]}-token prompt "
            f"(lengths count the prompt)"
        )
    if min_length > max_length:
        raise ValueError(f"min_length={min_length} exceeds max_length={max_length}")


@torch.no_grad()
def _greedy_or_sample(stepper, prompt, max_length, min_length, eos_token_id, pad_token_id,
                      repetition_penalty, do_sample, top_k=0, top_p=1.0, generator=None):
    _check_lengths(prompt, max_length, min_length)
    seqs = prompt
    unfinished = torch.ones(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    logits = stepper.step(prompt)
    while True:
        scores = apply_repetition_penalty(logits.float(), seqs, repetition_penalty)
        scores = ban_eos_before_min_length(scores, seqs.shape[1], min_length, eos_token_id)
        if do_sample:
            scores = top_p_filter(top_k_filter(scores, top_k), top_p)
            nxt = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))  # finished rows: pad
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        unfinished &= nxt != eos_token_id
        if seqs.shape[1] >= max_length or not bool(unfinished.any()):
            return seqs
        logits = stepper.step(nxt[:, None])


def greedy_search(stepper, prompt: torch.Tensor, max_length: int, min_length: int, eos_token_id: int,
                  pad_token_id: int, repetition_penalty: float = 1.0) -> torch.Tensor:
    """Argmax decoding. prompt (B, P) -> (B, T) ids, prompt included; rows after EOS are padded."""
    return _greedy_or_sample(stepper, prompt, max_length, min_length, eos_token_id, pad_token_id,
                             repetition_penalty, do_sample=False)


def sample(stepper, prompt: torch.Tensor, max_length: int, min_length: int, eos_token_id: int,
           pad_token_id: int, repetition_penalty: float = 1.1, top_p: float = 0.9, top_k: int = 50,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Top-k then nucleus (top-p) sampling; `generator` seeds it. Returns (B, T) as greedy_search."""
    return _greedy_or_sample(stepper, prompt, max_length, min_length, eos_token_id, pad_token_id,
                             repetition_penalty, do_sample=True, top_k=top_k, top_p=top_p, generator=generator)


class _Hypotheses:
    """The best `num_beams` finished sequences of every batch item (HF's BeamHypotheses, batched)."""

    def __init__(self, B: int, K: int, max_length: int, pad_token_id: int, device):
        self.K = K
        self.tokens = torch.full((B, K, max_length), pad_token_id, dtype=torch.long, device=device)
        self.lengths = torch.zeros(B, K, dtype=torch.long, device=device)
        self.scores = torch.full((B, K), float("-inf"), device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)

    def worst(self) -> torch.Tensor:
        return self.scores.min(dim=1).values

    def add(self, which: torch.Tensor, seqs: torch.Tensor, scores: torch.Tensor) -> None:
        """which: bool (B,) items that get a hypothesis; seqs: (B, T) its tokens; scores: (B,)."""
        full = self.count >= self.K
        accept = which & (~full | (scores > self.worst()))
        slot = torch.where(full, self.scores.argmin(dim=1), self.count.clamp(max=self.K - 1))  # replace the worst
        b = accept.nonzero().squeeze(1)
        if b.numel() == 0:
            return
        T = seqs.shape[1]
        self.tokens[b, slot[b], :T] = seqs[b]
        self.lengths[b, slot[b]] = T
        self.scores[b, slot[b]] = scores[b]
        self.count[b] += 1


@torch.no_grad()
def beam_search(stepper, prompt: torch.Tensor, num_beams: int, max_length: int, min_length: int,
                eos_token_id: int, pad_token_id: int, repetition_penalty: float = 1.0,
                length_penalty: float = 1.0, early_stopping: bool = False) -> torch.Tensor:
    """Beam search with HF's scoring and stopping (see the module docstring).

    stepper: an IncrementalDecoder (or any object with step/reorder) built with expand=num_beams;
    prompt: (B, P) ids shared by all beams of an item. Returns (B, T) ids of each item's best
    hypothesis, prompt included, EOS appended when it fits, right-padded with pad_token_id.
    """
    _check_lengths(prompt, max_length, min_length)
    B, P = prompt.shape
    K = num_beams
    dev = prompt.device
    seqs = prompt.repeat_interleave(K, dim=0)  # (B*K, P)
    beam_scores = torch.zeros(B, K, device=dev)
    beam_scores[:, 1:] = -1e9  # all beams start identical: only beam 0 may expand at first
    hyps = _Hypotheses(B, K, max_length, pad_token_id, dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    base = (torch.arange(B, device=dev) * K)[:, None]  # (B, 1) first row of each item
    ranks = torch.arange(2 * K, device=dev)

    logits = stepper.step(seqs)
    while True:
        cur_len = seqs.shape[1]
        scores = F.log_softmax(logits.float(), dim=-1)
        scores = apply_repetition_penalty(scores, seqs, repetition_penalty)
        scores = ban_eos_before_min_length(scores, cur_len, min_length, eos_token_id)
        V = scores.shape[-1]
        total = (scores + beam_scores.view(-1, 1)).view(B, K * V)
        top_scores, top_idx = total.topk(2 * K, dim=1)  # (B, 2K), best first
        src_beam, tok = top_idx // V, top_idx % V
        is_eos = tok == eos_token_id

        # Finished hypotheses: EOS among the top K candidates (sequence stored without the EOS).
        gen_len = cur_len + 1 - P
        for r in range(K):
            rows = (base[:, 0] + src_beam[:, r])
            hyps.add(is_eos[:, r] & ~done, seqs[rows], top_scores[:, r] / gen_len ** length_penalty)

        # Running beams: the first K candidates that are not EOS, in rank order.
        pick = torch.argsort(is_eos.long() * 2 * K + ranks, dim=1)[:, :K]  # (B, K)
        new_scores = top_scores.gather(1, pick)
        new_src = base + src_beam.gather(1, pick)  # (B, K) rows of seqs
        new_tok = tok.gather(1, pick)

        # An item is done once K hypotheses exist and the best candidate cannot beat the worst.
        full = hyps.count >= K
        if early_stopping:
            done |= full
        else:
            done |= full & (hyps.worst() >= top_scores[:, 0] / gen_len ** length_penalty)

        rows = new_src.view(-1)
        seqs = torch.cat([seqs[rows], new_tok.view(-1, 1)], dim=1)
        beam_scores = new_scores
        if seqs.shape[1] >= max_length or bool(done.all()):
            break
        stepper.reorder(rows)
        logits = stepper.step(new_tok.view(-1, 1))

    # Items still running at the end: their beams become hypotheses as they are.
    final_len = seqs.shape[1] - P
    open_items = ~done
    # `done` items stopped updating their beams in HF; their running beams are never added.
    for j in range(K):
        hyps.add(open_items, seqs.view(B, K, -1)[:, j], beam_scores[:, j] / final_len ** length_penalty)

    best = hyps.scores.argmax(dim=1)  # (B,)
    lengths = hyps.lengths[torch.arange(B, device=dev), best]
    out_len = min(int(lengths.max()) + 1, max_length)
    out = torch.full((B, out_len), pad_token_id, dtype=torch.long, device=dev)
    for b in range(B):
        n = int(lengths[b])
        out[b, :n] = hyps.tokens[b, best[b], :n]
        if n < out_len:
            out[b, n] = eos_token_id
    return out


def generate(decoder, memory: torch.Tensor, prompt: torch.Tensor, *, memory_mask: Optional[torch.Tensor] = None,
             sample_mode: bool = False, num_beams: int = 3, max_length: int = 20, min_length: int = 5,
             top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Decode from a TextDecoder cross-attending `memory` (B, N, W), starting from `prompt` (B, P).

    sample_mode: top-k/nucleus sampling (one sequence per item); otherwise beam search with
    num_beams (greedy when num_beams == 1). EOS / pad default to the decoder config's [SEP] / [PAD].
    Returns (B, T) token ids, prompt included.
    """
    cfg = decoder.cfg
    eos = cfg.sep_token_id if eos_token_id is None else eos_token_id
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if prompt.shape[0] != memory.shape[0]:
        raise ValueError(f"{prompt.shape[0]} prompts for {memory.shape[0]} memory items")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if sample_mode:
        stepper = IncrementalDecoder(decoder, memory, memory_mask)
        return sample(stepper, prompt, max_length, min_length, eos, pad, repetition_penalty, top_p, top_k, generator)
    if num_beams == 1:
        stepper = IncrementalDecoder(decoder, memory, memory_mask)
        return greedy_search(stepper, prompt, max_length, min_length, eos, pad, repetition_penalty)
    stepper = IncrementalDecoder(decoder, memory, memory_mask, expand=num_beams)
    return beam_search(stepper, prompt, num_beams, max_length, min_length, eos, pad, repetition_penalty,
                       length_penalty)
