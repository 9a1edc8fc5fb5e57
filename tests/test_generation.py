"""blipfast.generation: cached decoding, beam search, greedy and nucleus sampling.

Independent references: full recomputation of the decoder for every prefix, a plain argmax loop,
brute-force enumeration of every sequence over a tiny vocabulary, and the nucleus set computed
by sorting probabilities in Python.
"""
import itertools
import math

import pytest
import torch

from blipfast.config import TextConfig
from blipfast.generation import (
    IncrementalDecoder,
    apply_repetition_penalty,
    beam_search,
    generate,
    greedy_search,
    sample,
    top_p_filter,
)
from blipfast.models.med import TextDecoder, TextTransformer
from tests.helpers import sharpen_

EOS, PAD = 3, 0


def _sharp_decoder(seed=0, vocab=24, width=32, memory_width=20):
    """A tiny decoder in fp64 whose weights are large enough for attention to be sharp."""
    torch.manual_seed(seed)
    cfg = TextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=40, cls_token_id=2, sep_token_id=EOS,
                     dec_token_id=5, enc_token_id=6, encoder_width=memory_width,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dec = TextDecoder(TextTransformer(cfg, attention_backend="reference")).double().eval()
    return sharpen_(dec, seed)


def _full_logits(dec, seqs, memory, memory_mask=None):
    """Logits after the last token of each row, recomputing the whole sequence (no cache)."""
    h = dec(seqs, None, image_embeds=memory, image_mask=memory_mask)
    return dec.logits(h[:, -1])


class CheckingStepper:
    """Wraps IncrementalDecoder and checks each step's logits against full recomputation."""

    def __init__(self, dec, memory, expand):
        self.inner = IncrementalDecoder(dec, memory, expand=expand)
        self.dec, self.expand = dec, expand
        self.memory = memory.repeat_interleave(expand, dim=0)
        self.seqs = None
        self.max_err = 0.0
        self.steps = 0

    def step(self, ids):
        self.seqs = ids if self.seqs is None else torch.cat([self.seqs, ids], dim=1)
        got = self.inner.step(ids)
        want = _full_logits(self.dec, self.seqs, self.memory)
        self.max_err = max(self.max_err, (got - want).abs().max().item())
        self.steps += 1
        return got

    def reorder(self, rows):
        self.inner.reorder(rows)
        self.seqs = self.seqs[rows]


def test_cached_decoding_matches_full_recomputation_through_beam_reordering():
    dec = _sharp_decoder()
    memory = torch.randn(2, 7, 20, dtype=torch.float64)
    prompt = torch.tensor([[5, 9, 10], [5, 11, 12]])
    stepper = CheckingStepper(dec, memory, expand=3)
    beam_search(stepper, prompt, num_beams=3, max_length=12, min_length=12, eos_token_id=EOS, pad_token_id=PAD)
    assert stepper.steps == 12 - 3  # min_length = max_length: every step is taken
    assert stepper.max_err < 1e-12, stepper.max_err


def test_cached_decoding_with_memory_padding_mask():
    dec = _sharp_decoder(seed=1)
    memory = torch.randn(2, 6, 20, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    prompt = torch.tensor([[5, 9], [5, 7]])
    inc = IncrementalDecoder(dec, memory, mask)
    seqs = prompt
    logits = inc.step(prompt)
    for t in range(4):
        torch.testing.assert_close(logits, _full_logits(dec, seqs, memory, mask), rtol=0, atol=1e-12)
        nxt = logits.argmax(-1, keepdim=True)
        seqs = torch.cat([seqs, nxt], 1)
        logits = inc.step(nxt)
    # The padded memory positions matter: masking them changes the result.
    assert not torch.allclose(_full_logits(dec, seqs, memory, mask), _full_logits(dec, seqs, memory))


def _naive_greedy(dec, memory, prompt, max_length, min_length, penalty):
    seqs = prompt.clone()
    done = torch.zeros(len(seqs), dtype=torch.bool)
    while seqs.shape[1] < max_length and not done.all():
        logits = _full_logits(dec, seqs, memory).float()
        for r in range(len(seqs)):
            for tok in set(seqs[r].tolist()):
                v = logits[r, tok]
                logits[r, tok] = v * penalty if v < 0 else v / penalty
        if seqs.shape[1] < min_length:
            logits[:, EOS] = -math.inf
        nxt = torch.where(done, torch.full((len(seqs),), PAD), logits.argmax(-1))
        done |= nxt == EOS
        seqs = torch.cat([seqs, nxt[:, None]], 1)
    return seqs


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_matches_naive_loop(penalty):
    dec = _sharp_decoder(seed=2, vocab=12)
    memory = torch.randn(3, 5, 20, dtype=torch.float64)
    prompt = torch.tensor([[5, 7]] * 3)
    got = generate(dec, memory, prompt, num_beams=1, max_length=14, min_length=4, repetition_penalty=penalty,
                   eos_token_id=EOS, pad_token_id=PAD)
    want = _naive_greedy(dec, memory, prompt, 14, 4, penalty)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("min_length,length_penalty", [(10, 1.0), (4, 0.0)])
def test_greedy_equals_one_beam(min_length, length_penalty):
    """Equal whenever one beam cannot prefer a later, length-normalised hypothesis: all sequences
    have the same length (EOS banned to the end), or there is no length normalisation."""
    dec = _sharp_decoder(seed=3, vocab=10)
    memory = torch.randn(4, 5, 20, dtype=torch.float64)
    prompt = torch.tensor([[5, 7]] * 4)
    greedy = greedy_search(IncrementalDecoder(dec, memory), prompt, 10, min_length, EOS, PAD)
    beam = beam_search(IncrementalDecoder(dec, memory), prompt, 1, 10, min_length, EOS, PAD,
                       length_penalty=length_penalty)
    # Both pad after EOS; greedy's rows are as long as its longest row, beam's as its longest hypothesis.
    T = max(greedy.shape[1], beam.shape[1])
    pad = lambda x: torch.cat([x, x.new_full((x.shape[0], T - x.shape[1]), PAD)], 1)  # noqa: E731
    assert torch.equal(pad(greedy), pad(beam)), (greedy, beam)


class TableStepper:
    """A toy decoder over a tiny vocabulary: log-probs depend on position and the last two tokens."""

    def __init__(self, table):
        self.table = table  # (positions, V, V, V) logits
        self.seqs = None

    def step(self, ids):
        self.seqs = ids if self.seqs is None else torch.cat([self.seqs, ids], dim=1)
        s = self.seqs
        return self.table[s.shape[1] - 1, s[:, -2], s[:, -1]]

    def reorder(self, rows):
        self.seqs = self.seqs[rows]


def _brute_force_best(table, prompt, max_length, min_length, penalty, length_penalty, eos):
    """Enumerate every continuation: EOS-terminated ones and those reaching max_length."""
    V = table.shape[-1]
    best, best_seq = -math.inf, None
    P = len(prompt)
    for n in range(1, max_length - P + 1):
        for cont in itertools.product(range(V), repeat=n):
            if eos in cont[:-1] or (n < max_length - P and cont[-1] != eos):
                continue
            seq, total = list(prompt), 0.0
            for tok in cont:
                lp = torch.log_softmax(table[len(seq) - 1, seq[-2], seq[-1]].double(), -1)
                for t in set(seq):
                    lp[t] = lp[t] * penalty if lp[t] < 0 else lp[t] / penalty
                if len(seq) < min_length:
                    lp[eos] = -math.inf
                total += lp[tok].item()
                seq.append(tok)
            score = total / n ** length_penalty
            if score > best:
                best, best_seq = score, seq
    return best_seq


@pytest.mark.parametrize("min_length,penalty,length_penalty", [(3, 1.0, 0.0), (4, 1.7, 0.0), (5, 1.3, 1.0)])
def test_exhaustive_beam_search_finds_the_brute_force_optimum(min_length, penalty, length_penalty):
    """With as many beams as sequences, beam search is exact whenever its stopping rule is
    (no length normalisation, or all sequences the same length: min_length = max_length)."""
    V, P, max_length, eos = 4, 2, 5, 3
    g = torch.Generator().manual_seed(min_length)
    for trial in range(3):
        table = 2.0 * torch.randn(max_length, V, V, V, generator=g, dtype=torch.float64)
        prompt = [0, 0]  # tokens 1 and 2 start unpenalised
        K = V ** (max_length - P)  # every prefix fits in the beam
        got = beam_search(TableStepper(table), torch.tensor([prompt]), K, max_length, min_length, eos,
                          pad_token_id=0, repetition_penalty=penalty, length_penalty=length_penalty)[0].tolist()
        want = _brute_force_best(table, prompt, max_length, min_length, penalty, length_penalty, eos)
        assert got == want, (trial, got, want)  # EOS-terminated: the EOS is part of the output


def test_beam_search_lengths_count_the_prompt():
    dec = _sharp_decoder(seed=4)
    memory = torch.randn(2, 5, 20, dtype=torch.float64)
    prompt = torch.tensor([[5, 7, 8, 9]] * 2)
    out = generate(dec, memory, prompt, num_beams=3, max_length=9, min_length=7, eos_token_id=EOS, pad_token_id=PAD)
    assert out.shape[1] <= 9 and torch.equal(out[:, :4], prompt)
    for row in out.tolist():
        if EOS in row:
            assert row.index(EOS) >= 7  # no EOS before the sequence holds min_length tokens


def test_repetition_penalty_matches_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 9, generator=g)
    seqs = torch.tensor([[1, 1, 4], [0, 8, 2], [5, 5, 5]])
    got = apply_repetition_penalty(scores, seqs, 1.3)
    want = scores.clone()
    for r in range(3):
        for t in set(seqs[r].tolist()):
            want[r, t] = scores[r, t] * 1.3 if scores[r, t] < 0 else scores[r, t] / 1.3
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _nucleus(probs, top_p):
    """Most likely tokens first, until their total probability reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for i in order:
        keep.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return keep


def test_top_p_filter_keeps_exactly_the_nucleus():
    g = torch.Generator().manual_seed(1)
    for top_p in (0.3, 0.5, 0.9):
        scores = 2.0 * torch.randn(8, 30, generator=g, dtype=torch.float64)
        kept = torch.isfinite(top_p_filter(scores, top_p))
        for r in range(8):
            want = _nucleus(scores[r].softmax(-1).tolist(), top_p)
            assert set(kept[r].nonzero().flatten().tolist()) == want


class ConstantStepper:
    def __init__(self, logits):
        self.logits = logits

    def step(self, ids):
        return self.logits.expand(ids.shape[0], -1)

    def reorder(self, rows):
        pass


def test_nucleus_sampling_stays_in_the_nucleus_and_is_seeded():
    V = 12
    logits = torch.linspace(3.0, -3.0, V, dtype=torch.float64)[None]  # token 0 most likely
    logits[0, EOS] = -20.0  # EOS practically never drawn: long rows
    prompt = torch.tensor([[5, 7]] * 64)
    nucleus = _nucleus(logits[0].softmax(-1).tolist(), 0.9)
    outs = []
    for seed in (0, 0, 1):
        gen = torch.Generator().manual_seed(seed)
        outs.append(sample(ConstantStepper(logits), prompt, max_length=10, min_length=1, eos_token_id=EOS,
                           pad_token_id=PAD, repetition_penalty=1.0, top_p=0.9, top_k=0, generator=gen))
    drawn = set(outs[0][:, 2:].flatten().tolist())
    assert drawn <= nucleus
    assert len(drawn) >= len(nucleus) - 1  # 512 draws: (almost) every nucleus token shows up
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_sampling_pads_after_eos():
    V = 6
    logits = torch.zeros(1, V, dtype=torch.float64)
    logits[0, EOS] = 1.0
    prompt = torch.tensor([[5, 1]] * 32)
    out = sample(ConstantStepper(logits), prompt, 9, 3, EOS, PAD, repetition_penalty=1.0, top_p=1.0, top_k=0,
                 generator=torch.Generator().manual_seed(0))
    for row in out.tolist():
        assert EOS not in row[:3]  # min_length
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])


def test_bad_lengths_are_rejected():
    dec = _sharp_decoder()
    memory = torch.randn(1, 4, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_length"):
        generate(dec, memory, torch.tensor([[5, 7, 8]]), max_length=3)
    with pytest.raises(ValueError, match="prompts"):
        generate(dec, memory, torch.tensor([[5, 7]] * 2))
