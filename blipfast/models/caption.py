"""Image captioning: ViT + image-grounded text decoder with the prompt "a picture of " (the
original `BLIP_Decoder`; checkpoint names `visual_encoder.*`, `text_decoder.bert.*`,
`text_decoder.cls.*`).

Training: captions are "a picture of " + caption, [DEC] first; the LM loss (label smoothing 0.1)
skips padding and the prompt tokens ("[DEC] a picture of" = `prompt_length` tokens).
Generation: beam search (COCO: 3 beams, max 20, min 5 tokens, prompt included, repetition
penalty 1.0) or nucleus sampling (top-p 0.9, repetition penalty 1.1: CapFilt's captioner); the
returned strings have the prompt stripped, as the original does (by character count).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from blipfast.config import BlipConfig
from blipfast.generation import generate as _generate
from blipfast.ops import resolve_losses

from .med import TextDecoder, TextTransformer
from .vit import VisionTransformer

DEFAULT_PROMPT = "a picture of "


class BlipForCaptioning(nn.Module):
    """model(images, input_ids, attention_mask) -> LM loss; model.generate(images) -> captions.

    input_ids / attention_mask: (B, L) BERT-tokenised "prompt + caption" (`tokenize` builds them;
    the first token is replaced by [DEC] here). A tokenizer (HF-style: `__call__`, `decode`)
    is needed for `tokenize`, `generate` and to know `prompt_length`; set it at construction or
    with `set_tokenizer`, or pass `prompt_length` to forward.
    """

    def __init__(self, config: BlipConfig, tokenizer=None, prompt: str = DEFAULT_PROMPT):
        super().__init__()
        config.validate()
        self.config = config
        ab = config.attention_backend
        self.visual_encoder = VisionTransformer(config.vision, ab)
        self.text_decoder = TextDecoder(TextTransformer(config.text, ab))
        self.losses = resolve_losses(config.loss_backend)
        self.prompt = prompt
        self.tokenizer = None
        self.prompt_length: Optional[int] = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        # "[CLS] a picture of [SEP]" minus [SEP]: [DEC] replaces [CLS]; 4 tokens with BERT's vocabulary.
        self.prompt_length = len(tokenizer(self.prompt).input_ids) - 1

    def _tok(self, tokenizer=None):
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("a tokenizer is needed: BlipForCaptioning(config, tokenizer=...) or set_tokenizer()")
        return tok

    def tokenize(self, captions: Sequence[str], max_length: int = 40, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training inputs as the original: prompt + caption, padded to the longest, at most max_length."""
        tok = self._tok()
        enc = tok([self.prompt + c for c in captions], padding="longest", truncation=True, max_length=max_length,
                  return_tensors="pt")
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_length: Optional[int] = None) -> torch.Tensor:
        P = self.prompt_length if prompt_length is None else prompt_length
        if P is None:
            raise ValueError("prompt_length is unknown: attach a tokenizer (set_tokenizer) or pass prompt_length")
        if input_ids.ndim != 2 or attention_mask is None or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)} and "
                             f"{None if attention_mask is None else tuple(attention_mask.shape)}")
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {input_ids.shape[0]} captions")
        tc = self.config.text
        image_embeds = self.visual_encoder(images)  # (B, 1 + N, Cv)
        ids = input_ids.clone()
        ids[:, 0] = tc.dec_token_id
        labels = ids.masked_fill(ids == tc.pad_token_id, -100)
        labels[:, :P] = -100  # the prompt is given, not learned
        if self.config.exact_work:  # real tokens only, LM head on the caption's rows (not the prompt's)
            loss = self.text_decoder.lm_loss_exact(ids, attention_mask, labels, self.losses, self.config.label_smoothing,
                                                   image_kv=self.text_decoder.bert.image_kv(image_embeds))
            if loss is not None:
                return loss
        hidden = self.text_decoder(ids, attention_mask, image_embeds=image_embeds)
        return self.text_decoder.lm_loss(hidden, labels, self.losses, self.config.label_smoothing)

    def prompt_ids(self, batch: int, device=None, prompt: Optional[str] = None, tokenizer=None) -> torch.Tensor:
        """(batch, P) decoder start: [DEC] + the prompt's tokens (its [SEP] dropped)."""
        ids = self._tok(tokenizer)([self.prompt if prompt is None else prompt], return_tensors="pt").input_ids
        ids[:, 0] = self.config.text.dec_token_id
        return ids[:, :-1].expand(batch, -1).to(device)

    @torch.no_grad()
    def generate_ids(self, images: torch.Tensor, sample: bool = False, num_beams: int = 3, max_length: int = 20,
                     min_length: int = 5, top_p: float = 0.9, repetition_penalty: Optional[float] = None,
                     prompt: Optional[str] = None, tokenizer=None, top_k: int = 50,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, T) token ids, prompt included. repetition_penalty defaults to 1.0 for beam search and
        1.1 for sampling (the original hard-codes 1.1 there); lengths include the prompt."""
        if repetition_penalty is None:
            repetition_penalty = 1.1 if sample else 1.0
        image_embeds = self.visual_encoder(images)
        start = self.prompt_ids(images.shape[0], images.device, prompt, tokenizer)
        return _generate(self.text_decoder, image_embeds, start, sample_mode=sample, num_beams=num_beams,
                         max_length=max_length, min_length=min_length, top_p=top_p, top_k=top_k,
                         repetition_penalty=repetition_penalty, generator=generator)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, sample: bool = False, num_beams: int = 3, max_length: int = 20,
                 min_length: int = 5, top_p: float = 0.9, repetition_penalty: Optional[float] = None,
                 prompt: Optional[str] = None, tokenizer=None, top_k: int = 50,
                 generator: Optional[torch.Generator] = None) -> List[str]:
        """Captions as strings with the prompt stripped (see generate_ids for the arguments)."""
        tok = self._tok(tokenizer)
        prompt = self.prompt if prompt is None else prompt
        ids = self.generate_ids(images, sample, num_beams, max_length, min_length, top_p, repetition_penalty,
                                prompt, tok, top_k, generator)
        # As the original: decode without special tokens, then cut the prompt's characters.
        return [tok.decode(row, skip_special_tokens=True)[len(prompt):] for row in ids.tolist()]
