"""Visual question answering: the original `blip_vqa.py` design, with its checkpoint names
(`visual_encoder`, `text_encoder`, `text_decoder.bert`, `text_decoder.cls`).

* The question is read by the image-grounded encoder ([ENC] first, cross-attending the image).
* The answer decoder cross-attends the question's hidden states, not the image: its
  cross-attention keys/values have the text width (`encoder_width = hidden_size`).
* Training: each question's states are repeated once per answer; the loss is
  sum(answer weight x per-answer summed label-smoothed CE) / B.
* Inference, `rank_answers`: the k answers of a fixed list whose first token is most probable
  after [DEC], then the best of those by -(label-smoothed summed CE) under teacher forcing.
  `generate`: beam search (3 beams, at most 10 tokens, [DEC] included).
"""
from __future__ import annotations

import dataclasses
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from blipfast.config import BlipConfig
from blipfast.generation import generate as _generate
from blipfast.ops.packing import Packing, pad_packed

from .med import TextDecoder, TextTransformer
from .vit import VisionTransformer


class BlipForVQA(nn.Module):
    """model(images, question_ids, question_mask, answer_ids, answer_mask, n_answers, weights) -> loss.

    question_ids / question_mask: (B, Lq) BERT-tokenised questions (the first token becomes
    [ENC]); answer_ids / answer_mask: (A, La) tokenised answers of all questions, in question
    order (the first token becomes [DEC]); n_answers: (B,) answers per question (sum = A);
    weights: (A,) answer weights (VQA: count / number of annotators; VG: 0.2).
    """

    def __init__(self, config: BlipConfig, tokenizer=None):
        super().__init__()
        config.validate()
        self.config = config
        tc, ab = config.text, config.attention_backend
        self.visual_encoder = VisionTransformer(config.vision, ab)
        self.text_encoder = TextTransformer(tc, ab)
        # The decoder's memory is the question encoder's output, so its cross-attention reads text width.
        self.text_decoder = TextDecoder(TextTransformer(dataclasses.replace(tc, encoder_width=tc.hidden_size), ab))
        self.tokenizer = tokenizer

    # -- pieces --------------------------------------------------------------------------------

    def _first(self, ids: torch.Tensor, token_id: int) -> torch.Tensor:
        ids = ids.clone()
        ids[:, 0] = token_id
        return ids

    def encode_question(self, images: torch.Tensor, question_ids: torch.Tensor,
                        question_mask: torch.Tensor, padding_read: bool = True) -> torch.Tensor:
        """(B, Lq, C) question states from the image-grounded encoder, [ENC] first.

        padding_read=False: the caller masks the padding rows out (they are zeros then), so with
        exact work only the real tokens are encoded."""
        if question_ids.ndim != 2 or question_mask is None or question_mask.shape != question_ids.shape:
            raise ValueError(f"question_ids and question_mask must both be (B, L); got {tuple(question_ids.shape)} "
                             f"and {None if question_mask is None else tuple(question_mask.shape)}")
        if images.shape[0] != question_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {question_ids.shape[0]} questions")
        image_embeds = self.visual_encoder(images)
        ids = self._first(question_ids, self.config.text.enc_token_id)
        packing = None if padding_read or not self.config.exact_work else Packing.from_mask(question_mask)
        if packing is None:
            return self.text_encoder(ids, question_mask, image_embeds=image_embeds)
        states = self.text_encoder(ids, packing=packing, image_kv=self.text_encoder.image_kv(image_embeds))  # (T, C)
        return pad_packed(states, packing.cu_seqlens.to(states.device), question_ids.shape[1])[0]  # (B, Lq, C)

    def answer_nll(self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, question_kv, question_mask,
                   rows: torch.Tensor) -> torch.Tensor:
        """(A,) summed label-smoothed CE of each answer under teacher forcing; answer a reads the
        question `rows[a]` through the precomputed cross-attention keys/values `question_kv`."""
        tc = self.config.text
        ids = self._first(answer_ids, tc.dec_token_id)
        labels = ids.masked_fill(ids == tc.pad_token_id, -100)
        if self.config.exact_work:  # answers on their real tokens; question K/V gathered per answer
            nll = self.text_decoder.lm_loss_exact(ids, answer_mask, labels, None, self.config.label_smoothing,
                                                  image_kv=question_kv, image_index=rows,
                                                  image_mask=question_mask, reduction="none")
            if nll is not None:
                return nll
        kv = [(k[rows], v[rows]) for k, v in question_kv]  # per answer, by indexing (no re-projection)
        hidden = self.text_decoder(ids, answer_mask, image_kv=kv, image_mask=question_mask[rows])
        return self.text_decoder.lm_loss(hidden, labels, None, self.config.label_smoothing, reduction="none")

    # -- training ------------------------------------------------------------------------------

    def forward(self, images, question_ids, question_mask, answer_ids, answer_mask, n_answers, weights) -> torch.Tensor:
        B = images.shape[0]
        n_answers = torch.as_tensor(n_answers, device=images.device).long().reshape(-1)
        if n_answers.shape != (B,) or bool((n_answers < 1).any()):
            raise ValueError(f"n_answers must give a positive answer count for each of the {B} questions")
        A = int(n_answers.sum())
        if answer_ids.shape[0] != A or answer_mask.shape != answer_ids.shape or weights.reshape(-1).shape != (A,):
            raise ValueError(f"{A} answers expected (sum of n_answers); got answer_ids {tuple(answer_ids.shape)}, "
                             f"answer_mask {tuple(answer_mask.shape)}, weights {tuple(weights.shape)}")
        states = self.encode_question(images, question_ids, question_mask, padding_read=False)  # (B, Lq, C)
        qkv = self.text_decoder.bert.image_kv(states)
        rows = torch.arange(B, device=images.device).repeat_interleave(n_answers)  # (A,) question of each answer
        nll = self.answer_nll(answer_ids, answer_mask, qkv, question_mask.bool(), rows)  # (A,)
        return (weights.reshape(-1).to(nll.dtype) * nll).sum() / B

    # -- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def rank_answers(self, images, question_ids, question_mask, answer_list_ids, answer_list_mask,
                     k: int = 128) -> torch.Tensor:
        """(B,) index into the answer list of each question's answer.

        answer_list_ids / answer_list_mask: (N, La) the candidate answers tokenised ([CLS] a [SEP]
        pad...; the first token becomes [DEC]). k is capped at N.
        """
        tc = self.config.text
        states = self.encode_question(images, question_ids, question_mask, padding_read=False)  # (B, Lq, C)
        qmask = question_mask.bool()
        qkv = self.text_decoder.bert.image_kv(states)
        B, N = states.shape[0], answer_list_ids.shape[0]
        k = min(k, N)
        start = torch.full((B, 1), tc.dec_token_id, dtype=torch.long, device=states.device)
        first = self.text_decoder(start, None, image_kv=qkv, image_mask=qmask)  # (B, 1, C)
        probs = F.softmax(self.text_decoder.logits(first[:, 0]).float(), dim=-1)  # (B, V)
        first_tok_prob = probs.index_select(1, answer_list_ids[:, 1])  # (B, N): p(answer's first token)
        topk_ids = first_tok_prob.topk(k, dim=1).indices  # (B, k)
        cand = topk_ids.reshape(-1)  # (B * k,) question-major
        rows = torch.arange(B, device=states.device).repeat_interleave(k)
        nll = self.answer_nll(answer_list_ids[cand], answer_list_mask[cand], qkv, qmask, rows)
        best = (-nll).view(B, k).argmax(dim=1)
        return topk_ids.gather(1, best[:, None]).squeeze(1)

    @torch.no_grad()
    def generate_ids(self, images, question_ids, question_mask, num_beams: int = 3, max_length: int = 10,
                     min_length: int = 1) -> torch.Tensor:
        """(B, T) answer ids, [DEC] first. As the original, the decoder attends every question
        position here, padding included (it passes an all-ones question mask to generate)."""
        states = self.encode_question(images, question_ids, question_mask)
        start = torch.full((states.shape[0], 1), self.config.text.dec_token_id, dtype=torch.long, device=states.device)
        return _generate(self.text_decoder, states, start, num_beams=num_beams, max_length=max_length,
                         min_length=min_length, repetition_penalty=1.0)

    def generate(self, images, question_ids, question_mask, num_beams: int = 3, max_length: int = 10,
                 min_length: int = 1, tokenizer=None) -> List[str]:
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("a tokenizer is needed to decode answers: BlipForVQA(config, tokenizer=...)")
        ids = self.generate_ids(images, question_ids, question_mask, num_beams, max_length, min_length)
        return [tok.decode(row, skip_special_tokens=True) for row in ids.tolist()]
