"""MED: BLIP's BERT-based multimodal mixture of encoder-decoder.

Built by composition from the same parts:
  * `TextTransformer` in encoder form: bidirectional self-attention, optional cross-attention
    to image tokens (the unimodal encoder when no image is given, the image-grounded encoder
    when one is);
  * `TextTransformer.sharing(other)`: a transformer that owns new self-attention layers and
    shares everything else (embeddings, cross-attention, feed-forward) with `other`. This is
    how the pre-training decoder relates to the encoder;
  * `TextDecoder`: a transformer run with causal self-attention plus the LM head, whose output
    projection is the word-embedding matrix.

Parameter names follow the official checkpoint (`embeddings.*`, `encoder.layer.{i}.attention.*`,
`crossattention.*`, `intermediate.*`, `output.*`, `cls.predictions.*`). BERT is post-norm with
exact GELU. Every attention goes through one backend call.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from blipfast.config import TextConfig
from blipfast.ops import resolve_attention
from blipfast.ops.packing import Packing, Seqs

KV = Tuple[torch.Tensor, torch.Tensor]


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.max_positions = cfg.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        L = input_ids.shape[1]
        if past_length + L > self.max_positions:
            raise ValueError(f"text of {past_length + L} tokens exceeds max_position_embeddings={self.max_positions}")
        pos = torch.arange(past_length, past_length + L, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        return self.dropout(self.LayerNorm(x))

    def forward_packed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: (T,) real tokens and their position ids -> (T, C)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class SelfOutput(nn.Module):
    """Post-norm residual: LayerNorm(x + dropout(dense(h)))."""

    def __init__(self, cfg: TextConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class HeadProjection(nn.Module):
    """query / key / value projections, named as BERT's `attention.self`."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, L, C = x.shape
    return x.view(B, L, num_heads, C // num_heads).transpose(1, 2)  # (B, L, C) -> (B, H, L, D)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)  # (B, H, L, D) -> (B, L, C)


class Attention(nn.Module):
    """Self- or cross-attention sub-block: `self` (q/k/v) + `output` (dense + residual LN).

    Self-attention keys come from the text itself; cross-attention keys from `memory`.
    """

    def __init__(self, cfg: TextConfig, attn_fn, kv_width: Optional[int] = None):
        super().__init__()
        self.self = HeadProjection(cfg, kv_width or cfg.hidden_size)
        self.output = SelfOutput(cfg, cfg.hidden_size)
        self.num_heads = cfg.num_attention_heads
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.attn_fn = attn_fn

    def project_kv(self, memory: torch.Tensor) -> KV:
        return _heads(self.self.key(memory), self.num_heads), _heads(self.self.value(memory), self.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        memory: Optional[torch.Tensor] = None,
        kv: Optional[KV] = None,
        past_kv: Optional[KV] = None,
    ) -> Tuple[torch.Tensor, KV]:
        """x: (B, L, C). Keys/values: from `kv` if given (precomputed cross-attention memory),
        else projected from `memory` (cross-attention) or `x` (self-attention); `past_kv` is
        prepended for incremental decoding. Returns (output (B, L, C), the keys/values used)."""
        q = _heads(self.self.query(x), self.num_heads)  # (B, H, L, D)
        if kv is None:
            kv = self.project_kv(memory if memory is not None else x)
        if past_kv is not None:
            kv = (torch.cat([past_kv[0], kv[0]], dim=2), torch.cat([past_kv[1], kv[1]], dim=2))
        p = self.dropout_p if self.training else 0.0
        ctx = self.attn_fn(q, kv[0], kv[1], key_padding_mask=key_padding_mask, causal=causal, dropout_p=p)
        return self.output(_merge(ctx), x), kv

    def forward_packed(self, x: torch.Tensor, seqs: Seqs, causal: bool = False,
                       q_rows: Optional[torch.Tensor] = None, q_seqs: Optional[Seqs] = None,
                       kv: Optional[KV] = None, kv_seqs: Optional[Seqs] = None) -> torch.Tensor:
        """x: (T, C) packed tokens of the sequences `seqs`. Queries come from the rows `q_rows`
        of x (sequences `q_seqs`: e.g. one [CLS] row each) or from every row; keys/values are
        the packed `kv` ((Tk, H, D) each, sequences `kv_seqs`: cross-attention) or are projected
        from x (self-attention). Returns (Tq, C)."""
        H, C = self.num_heads, x.shape[-1]
        xq = x if q_rows is None else x[q_rows]  # (Tq, C)
        q = self.self.query(xq).view(-1, H, C // H)  # (Tq, H, D)
        if kv is None:
            k = self.self.key(x).view(-1, H, C // H)  # (T, H, D)
            kv, kv_seqs = (k, self.self.value(x).view(-1, H, C // H)), seqs
        q_seqs = seqs if q_rows is None else q_seqs
        p = self.dropout_p if self.training else 0.0
        ctx = self.attn_fn.varlen(q, kv[0], kv[1], q_seqs.cu_seqlens, kv_seqs.cu_seqlens, q_seqs.max_len,
                                  kv_seqs.max_len, causal=causal, dropout_p=p)  # (Tq, H, D)
        return self.output(ctx.reshape(-1, C), xq)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, backend={self.attn_fn.name}"


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = nn.GELU()  # BERT's exact erf GELU

    def forward(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    """self-attention -> cross-attention (only when image memory is given) -> feed-forward."""

    def __init__(self, attention: Attention, crossattention: Attention, intermediate: Intermediate,
                 output: SelfOutput):
        super().__init__()
        self.attention = attention
        self.crossattention = crossattention
        self.intermediate = intermediate
        self.output = output

    def forward(self, x, mask, causal, memory=None, memory_mask=None, memory_kv=None, past_kv=None):
        x, self_kv = self.attention(x, key_padding_mask=mask, causal=causal, past_kv=past_kv)
        if memory is not None or memory_kv is not None:
            x, _ = self.crossattention(x, key_padding_mask=memory_mask, memory=memory, kv=memory_kv)
        return self.output(self.intermediate(x), x), self_kv

    def forward_packed(self, x, seqs: Seqs, causal: bool, memory: Optional[KV] = None,
                       memory_seqs: Optional[Seqs] = None, first_only: bool = False):
        """x: (T, C) packed. first_only: compute only each sequence's first row (keys and values
        still from every row) and return (B, C); else (T, C)."""
        q_rows = q_seqs = None
        if first_only:
            B = seqs.cu_seqlens.shape[0] - 1
            q_rows = seqs.cu_seqlens[:-1].long()  # (B,) packed row of each first token
            q_seqs = Seqs(torch.arange(B + 1, dtype=torch.int32, device=x.device), 1)
        x = self.attention.forward_packed(x, seqs, causal, q_rows=q_rows, q_seqs=q_seqs)
        out_seqs = seqs if q_seqs is None else q_seqs
        if memory is not None:
            x = self.crossattention.forward_packed(x, out_seqs, kv=memory, kv_seqs=memory_seqs)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, layers: List[Layer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextTransformer(nn.Module):
    """BERT with cross-attention in every layer (BLIP's `BertModel`, without pooler).

    forward(input_ids, attention_mask, image_embeds=None) -> (B, L, C) hidden states. Without
    `image_embeds` the cross-attention is skipped (the unimodal text encoder, the original's
    mode='text'); with them it runs (the image-grounded encoder / decoder).
    """

    def __init__(self, cfg: TextConfig, attention_backend: str = "auto", _shared: "TextTransformer" = None):
        super().__init__()
        self.cfg = cfg
        attn_fn = resolve_attention(attention_backend)
        self.attention_backend = attn_fn.name
        if _shared is None:
            self.embeddings = TextEmbeddings(cfg)
            layers = [
                Layer(Attention(cfg, attn_fn), Attention(cfg, attn_fn, kv_width=cfg.encoder_width),
                      Intermediate(cfg), SelfOutput(cfg, cfg.intermediate_size))
                for _ in range(cfg.num_hidden_layers)
            ]
        else:
            # New self-attention, everything else is the same module objects as `_shared`.
            self.embeddings = _shared.embeddings
            layers = [
                Layer(Attention(cfg, attn_fn), s.crossattention, s.intermediate, s.output)
                for s in _shared.encoder.layer
            ]
        self.encoder = Encoder(layers)
        if _shared is None:
            self.reset_parameters()
        else:
            for layer in self.encoder.layer:
                _init_bert(layer.attention)

    @classmethod
    def sharing(cls, other: "TextTransformer", attention_backend: str = "auto") -> "TextTransformer":
        """A transformer with its own self-attention that shares all other weights with `other`."""
        return cls(other.cfg, attention_backend, _shared=other)

    def reset_parameters(self) -> None:
        _init_bert(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_embeds: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        image_kv: Optional[List[KV]] = None,
        past_kv: Optional[List[KV]] = None,
        return_kv: bool = False,
        packing: Optional[Packing] = None,
        image_index: Optional[torch.Tensor] = None,
        first_only: bool = False,
    ):
        """With `packing`: `forward_packed` (exact work; image_index, first_only are its
        arguments), through the module call so that hooks and `module.compile()` see it.

        input_ids: (B, L) int64; attention_mask: (B, L) (1/True = real token) or None;
        image_embeds: (B, N, W) cross-attention memory, image_mask: bool (B, N) or None (all real);
        image_kv: per-layer precomputed cross-attention (k, v), instead of image_embeds;
        past_kv: per-layer self-attention (k, v) of earlier positions (decoding; the attention
        mask then covers past + current keys). Returns (B, L, C), plus per-layer self (k, v)
        with return_kv."""
        if packing is not None:
            return self.forward_packed(input_ids, packing, causal, image_kv, image_index, image_mask, first_only)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (input_ids.shape[0], past_len + input_ids.shape[1]):
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                    f"{tuple(input_ids.shape)}" + (f" plus {past_len} cached positions" if past_len else "")
                )
            mask = attention_mask.to(torch.bool)
        if image_mask is not None:
            image_mask = image_mask.to(torch.bool)
        x = self.embeddings(input_ids, past_length=past_len)
        new_kv = []
        for i, layer in enumerate(self.encoder.layer):
            x, kv = layer(
                x, mask, causal and past_kv is None,
                memory=image_embeds, memory_mask=image_mask,
                memory_kv=None if image_kv is None else image_kv[i],
                past_kv=None if past_kv is None else past_kv[i],
            )
            new_kv.append(kv)
        return (x, new_kv) if return_kv else x

    def image_kv(self, image_embeds: torch.Tensor) -> List[KV]:
        """Cross-attention keys/values of every layer for `image_embeds`, computed once."""
        return [layer.crossattention.project_kv(image_embeds) for layer in self.encoder.layer]

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        packing: Packing,
        causal: bool = False,
        image_kv: Optional[List[KV]] = None,
        image_index: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        first_only: bool = False,
    ) -> torch.Tensor:
        """The same transformer on the real tokens only (exact work: no per-token work on padding).

        input_ids: (P, L) padded ids, `packing` their layout (Packing.from_mask / from_lengths);
        image_kv: per-layer cross-attention (k, v), each (M, H, N, D), as `image_kv()` returns:
        computed once per image and shared by every text that reads it; image_index: (P,) int64
        image of each text (default: text p reads image p); image_mask: bool (M, N) real memory
        rows (default all). first_only: the last layer computes only each text's first row
        ([CLS] / [ENC]) and (P, C) is returned; else (T, C), the packed hidden states."""
        ids = packing.pack(input_ids)  # (T,), on the ids' device
        packing = packing.to(self.embeddings.word_embeddings.weight.device)
        x = self.embeddings.forward_packed(ids, packing.positions)  # (T, C)
        memory, memory_seqs = [None] * len(self.encoder.layer), None
        if image_kv is not None:
            memory, memory_seqs = _pack_memory(image_kv, image_index, image_mask)
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            x = layer.forward_packed(x, packing.seqs, causal, memory[i], memory_seqs, first_only and i == last)
        return x


    def first_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_kv: Optional[List[KV]] = None, image_index: Optional[torch.Tensor] = None,
                     exact_work: bool = True) -> torch.Tensor:
        """(P, C) output at each text's first token ([CLS] / [ENC]), the only row ITC, ITM and
        the filters read. image_kv / image_index as in `forward_packed` (text p reads memory
        image_index[p]). exact_work: packed, last layer on the first rows only; a mask that is
        not right-padded (or exact_work False) takes the padded forward."""
        packing = Packing.from_mask(attention_mask) if exact_work else None
        if packing is not None:
            return self(input_ids, packing=packing, image_kv=image_kv, image_index=image_index, first_only=True)
        if image_kv is not None and image_index is not None:
            image_kv = [(k[image_index], v[image_index]) for k, v in image_kv]  # (P, H, N, D) each
        return self(input_ids, attention_mask, image_kv=image_kv)[:, 0, :]


def _pack_memory(image_kv: List[KV], index: Optional[torch.Tensor], mask: Optional[torch.Tensor]):
    """Per-layer (k, v) of M memories, (M, H, N, D) each -> packed (P * N or fewer, H, D) rows of
    the P texts' memories, gathered by `index` (no re-projection: the backward sums every text's
    gradient into its memory's keys/values), plus their Seqs."""
    M, H, N, D = image_kv[0][0].shape
    device = image_kv[0][0].device
    P = M if index is None else index.shape[0]
    rows = None
    if mask is None:
        seqs = Seqs(torch.arange(0, (P + 1) * N, N, dtype=torch.int32, device=device), N)
    else:
        m = mask.to(torch.bool) if index is None else mask.to(torch.bool)[index]  # (P, N)
        pk = Packing.from_lengths(m.sum(1), N)
        rows = m.flatten().nonzero().squeeze(1)  # (Tk,) real memory rows, sequence by sequence
        seqs = pk.seqs

    def gather(t):  # (M, H, N, D) -> (Tk, H, D)
        t = t.transpose(1, 2)  # (M, N, H, D): the projection's own (contiguous) layout
        t = (t if index is None else t[index]).reshape(P * N, H, D)
        return t if rows is None else t[rows]

    return [(gather(k), gather(v)) for k, v in image_kv], seqs


class PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = nn.GELU()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class LMPredictionHead(nn.Module):
    """transform (dense, GELU, LN) then logits = h @ word_embeddings^T + bias (tied weights)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class LMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = LMPredictionHead(cfg)


class TextDecoder(nn.Module):
    """Image-grounded text decoder: `bert` run causally + the tied LM head (`cls`).

    `bert` is a TextTransformer of its own, or one that shares all but self-attention with
    the encoder (pre-training). The LM loss and logits use `bert.embeddings.word_embeddings`
    as the output matrix.
    """

    def __init__(self, bert: TextTransformer):
        super().__init__()
        self.cfg = bert.cfg
        self.bert = bert
        self.cls = LMHead(bert.cfg)
        _init_bert(self.cls)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.cls.predictions.transform(hidden)
        return torch.nn.functional.linear(h, self.output_weight, self.cls.predictions.bias)

    def forward(self, input_ids, attention_mask, image_embeds=None, image_mask=None, **kw):
        """Hidden states (B, L, C) of the causal decoder (LM head not applied)."""
        return self.bert(input_ids, attention_mask, image_embeds=image_embeds, image_mask=image_mask,
                         causal=True, **kw)

    def lm_loss(self, hidden, labels, loss_backend, label_smoothing=0.1, reduction="mean"):
        """Next-token loss: position t predicts labels[t + 1]; labels -100 are ignored.

        hidden: (B, L, C), labels: (B, L). reduction 'mean' over all non-ignored tokens (as the
        original), or 'none' for the per-sequence sum (B,) (VQA answer scoring)."""
        h = self.cls.predictions.transform(hidden[:, :-1])  # (B, L-1, C)
        tgt = labels[:, 1:]
        C = h.shape[-1]
        if reduction == "mean":
            return loss_backend.lm_loss(h.reshape(-1, C), self.output_weight, self.cls.predictions.bias,
                                        tgt.reshape(-1), label_smoothing=label_smoothing)
        from blipfast.kernels.reference import lm_cross_entropy

        per_tok = lm_cross_entropy(h.reshape(-1, C), self.output_weight, self.cls.predictions.bias,
                                   tgt.reshape(-1), label_smoothing=label_smoothing, reduction="none")
        return per_tok.view(tgt.shape).sum(1)

    def lm_loss_exact(self, input_ids, attention_mask, labels, loss_backend, label_smoothing=0.1,
                      image_kv: Optional[List[KV]] = None, image_index=None, image_mask=None,
                      reduction: str = "mean", packing: Optional[Packing] = None):
        """`lm_loss(self(input_ids, attention_mask, ...), labels)` with exact work, or None when
        the batch cannot be packed exactly (a mask that is not right-padded, a target on padding).

        The decoder runs on each text's first length - 1 tokens (causal: the last real token is
        read by no other row and predicts nothing), reading the memories through `image_kv` /
        `image_index` / `image_mask` (see `TextTransformer.forward_packed`); the LM head runs on
        the rows that have a target. packing: the mask's layout, when the caller has checked it
        (no target on padding) already. reduction as `lm_loss`."""
        if packing is None:
            packing = Packing.from_mask(attention_mask, extra_ok=(labels == -100) | attention_mask.bool())
            if packing is None:
                return None
        B = packing.batch
        dec = Packing.from_lengths(packing.lengths - 1, packing.width, packing.total - B, packing.max_len - 1)
        hidden = self(input_ids, None, image_mask=image_mask, packing=dec, image_kv=image_kv,
                      image_index=image_index)  # (T - B, C), causal
        targets = lm_targets_packed(labels, dec)  # (T - B,)
        if reduction == "mean":
            return self.lm_loss_packed(hidden, targets, loss_backend, label_smoothing)
        from blipfast.kernels.reference import lm_cross_entropy

        rows = (targets != -100).nonzero().squeeze(1)  # (n,)
        h = self.cls.predictions.transform(hidden[rows.to(hidden.device)])
        per_tok = lm_cross_entropy(h, self.output_weight, self.cls.predictions.bias, targets[rows].to(h.device),
                                   label_smoothing=label_smoothing, reduction="none")  # (n,)
        seq = (dec.index.to(rows.device)[rows] // dec.width).to(h.device)  # (n,) text of each row
        return per_tok.new_zeros(B).index_add(0, seq, per_tok)  # (B,) summed per text

    def lm_loss_packed(self, hidden: torch.Tensor, targets: torch.Tensor, loss_backend, label_smoothing=0.1):
        """Mean next-token loss on packed rows: hidden (T, C), targets (T,) (-100 = no target).
        The LM head runs only on the rows that have a target."""
        rows = (targets != -100).nonzero().squeeze(1)  # (n,)
        h = self.cls.predictions.transform(hidden[rows.to(hidden.device)])  # (n, C)
        return loss_backend.lm_loss(h, self.output_weight, self.cls.predictions.bias,
                                    targets[rows].to(hidden.device), label_smoothing=label_smoothing)


def lm_targets_packed(labels: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(T,) label of the next token for each packed decoder row (labels: (B, L), -100 = none).

    The decoder packing must stop before each sequence's last column (row t predicts t + 1)."""
    return labels.flatten()[packing.index.to(labels.device) + 1]


def _init_bert(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
