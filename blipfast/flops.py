"""FLOP counts of a BLIP pre-training step from explicit formulas, and per-card peaks for MFU.

Conventions (the same for every provider, so MFU compares like with like):
  * Only matrix products are counted (linear layers, the patch-embedding convolution, the two
    attention products, the ITC logits); element-wise work (softmax, LayerNorm, GELU, losses,
    optimiser, EMA update) is not. A product of (m x k) by (k x n) costs 2*m*k*n.
  * Attention costs 4 * B * H * Lq * Lk * D forward (QK^T and PV), over the padded length and
    over the full square also when causal (the PaLM convention; text is ~30 tokens, so this is
    under 0.1% of a step).
  * Backward: a product whose two operands both need gradients costs 2x its forward; one with
    one operand needing a gradient costs 1x. That makes linear layers 3x forward in total
    (the usual "6 N" rule), the patch-embedding convolution 2x (images need no gradient), the
    ITC online logits 2x (the momentum features and queues need none), the momentum encoders 1x.
  * Model FLOPs (used for MFU) exclude recomputation by activation checkpointing; hardware FLOPs
    include it (the checkpointed ViT blocks rerun their forward, less the last product).
  * Text length is the padded length L (max_text_len); the LM head runs on L-1 positions.
    With exact work (config.exact_work, the default) the model skips what changes no result
    (packed text, cross-attention K/V once per image, used rows only): `pretrain_step` then
    counts from the real caption lengths (see `_pretrain_step_exact`).

The trainer's MFU and the benchmarks both count with this module. `tests/benchmarks/test_cpu_mode.py`
checks these formulas against `torch.utils.flop_counter` on the
reference path of a tiny model, so a formula that drifts from the model fails CI.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

# ---------------------------------------------------------------------------------------------
# building blocks (forward FLOPs)


def linear(tokens: int, d_in: int, d_out: int) -> int:
    """(tokens x d_in) @ (d_in x d_out)."""
    return 2 * tokens * d_in * d_out


def attention_core(batch: int, q_len: int, k_len: int, width: int) -> int:
    """QK^T plus PV summed over heads (heads x head_dim = width)."""
    return 4 * batch * q_len * k_len * width


def vit_forward(vision, batch: int) -> Dict[str, int]:
    """ViT forward: {'patch_embed', 'blocks'} (blocks = all transformer blocks together)."""
    C, P, T = vision.width, vision.patch_size, vision.num_patches + 1
    hidden = int(C * vision.mlp_ratio)
    patch = linear(batch * vision.num_patches, vision.in_chans * P * P, C)  # conv with stride = kernel
    per_block = (
        linear(batch * T, C, 3 * C)  # qkv
        + attention_core(batch, T, T, C)
        + linear(batch * T, C, C)  # attention output projection
        + linear(batch * T, C, hidden) + linear(batch * T, hidden, C)  # MLP
    )
    return {"patch_embed": patch, "blocks": vision.depth * per_block}


def vit_block_recompute(vision, batch: int) -> int:
    """Products one checkpointed ViT block reruns in the backward.

    PyTorch's non-reentrant checkpoint stops recomputing once the last tensor the backward
    needs is rebuilt; the block's last product (MLP fc2) saves only its input, so it is skipped.
    """
    T, C = vision.num_patches + 1, vision.width
    fc2 = linear(batch * T, int(C * vision.mlp_ratio), C)
    return vit_forward(vision, batch)["blocks"] // vision.depth - fc2


def med_forward(text, batch: int, length: int, image_tokens: int = 0, image_width: int = 0) -> int:
    """MED text transformer forward over `batch` sequences of `length` tokens.

    With image_tokens > 0 every layer also cross-attends to that many image tokens of width
    image_width (the image-grounded encoder / decoder); without, it is the unimodal encoder.
    """
    D, F = text.hidden_size, text.intermediate_size
    n = batch * length
    per_layer = linear(n, D, 3 * D) + attention_core(batch, length, length, D) + linear(n, D, D)
    if image_tokens:
        per_layer += (
            linear(n, D, D)  # cross-attention query
            + 2 * linear(batch * image_tokens, image_width, D)  # cross-attention key and value
            + attention_core(batch, length, image_tokens, D)
            + linear(n, D, D)  # cross-attention output projection
        )
    per_layer += linear(n, D, F) + linear(n, F, D)  # feed-forward
    return text.num_hidden_layers * per_layer


def med_forward_packed(text, lengths, image_tokens: int = 0, image_width: int = 0, first_only: bool = False,
                       image_kv: bool = True, memories: int = 0) -> int:
    """MED forward with exact work (config.exact_work): per-token products on the real tokens
    only (sum(lengths)); attention over the longest sequence (the backends without a packed
    kernel pad around attention, and that is what runs here); first_only: the last layer
    computes only each sequence's first row. With image_tokens, cross-attention reads keys/values
    projected once for `memories` images (image_kv=False: counted elsewhere, shared)."""
    D, F = text.hidden_size, text.intermediate_size
    B, n, Lmax = len(lengths), sum(lengths), max(lengths)

    def layer(rows: int, q_len: int) -> int:  # rows: tokens that get a query and a feed-forward
        f = linear(n, D, 2 * D) + linear(rows, D, D) + attention_core(B, q_len, Lmax, D) + linear(rows, D, D)
        if image_tokens:
            f += linear(rows, D, D) + attention_core(B, q_len, image_tokens, D) + linear(rows, D, D)
        return f + linear(rows, D, F) + linear(rows, F, D)

    L = text.num_hidden_layers
    total = (L - 1) * layer(n, Lmax) + (layer(B, 1) if first_only else layer(n, Lmax))
    if image_tokens and image_kv:
        total += L * 2 * linear(memories * image_tokens, image_width, D)
    return total


def vit_last_block_first_row_saving(vision, batch: int) -> int:
    """Forward products the momentum ViT skips when its last block computes only [CLS]."""
    T, C = vision.num_patches + 1, vision.width
    hidden = int(C * vision.mlp_ratio)
    rows = batch * (T - 1)  # every row but [CLS] loses its query, output projection and MLP
    return (linear(rows, C, C) + attention_core(batch, T, T, C) - attention_core(batch, 1, T, C)
            + linear(rows, C, C) + linear(rows, C, hidden) + linear(rows, hidden, C))


def lm_head_forward(text, batch: int, length: int) -> int:
    """Prediction transform plus tied output projection on the L-1 positions that have a target."""
    n = batch * (length - 1)
    return linear(n, text.hidden_size, text.hidden_size) + linear(n, text.hidden_size, text.vocab_size)


def itc_logits(batch: int, queue_size: int, embed_dim: int) -> int:
    """One direction's (B x E) @ (E x (B + Q)) similarity matrix."""
    return 2 * batch * (batch + queue_size) * embed_dim


# ---------------------------------------------------------------------------------------------
# a whole pre-training step


@dataclass
class StepFlops:
    """FLOPs of one pre-training step, split by phase (forward, backward, recomputation)."""

    forward: Dict[str, int] = field(default_factory=dict)
    backward: Dict[str, int] = field(default_factory=dict)
    recompute: Dict[str, int] = field(default_factory=dict)

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> int:
        return sum(self.backward.values())

    @property
    def recompute_total(self) -> int:
        return sum(self.recompute.values())

    @property
    def model_flops(self) -> int:
        """Forward + backward, no recomputation: the numerator of MFU."""
        return self.forward_total + self.backward_total

    @property
    def hardware_flops(self) -> int:
        return self.model_flops + self.recompute_total

    def by_phase(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for part in (self.forward, self.backward, self.recompute):
            for k, v in part.items():
                out[k] = out.get(k, 0) + v
        return out


def pretrain_step(config, batch: int, text_len: Optional[int] = None, lengths: Optional[Sequence[int]] = None,
                  neg_text: Optional[Sequence[int]] = None, exact_work: Optional[bool] = None) -> StepFlops:
    """FLOPs of BlipForPretraining's training step (ITC + ITM + LM, forward and backward).

    config: a BlipConfig; batch: images per step (B); text_len: padded caption length
    (default config.max_text_len). ITM runs the image-grounded encoder on 3B pairs.
    exact_work (default config.exact_work): count what the model runs with the savings on; that
    depends on the real caption lengths (`lengths`, B of them; default: all text_len) and on
    which caption is each image's hard negative (`neg_text`, B indices; default: lengths cycled
    by one, which has the same total when all are equal).
    """
    vc, tc = config.vision, config.text
    L = text_len if text_len is not None else config.max_text_len
    B, E, Q = batch, config.embed_dim, config.queue_size
    T, Cv = vc.num_patches + 1, vc.width
    if config.exact_work if exact_work is None else exact_work:
        lengths = list(lengths) if lengths is not None else [L] * B
        neg_text = list(neg_text) if neg_text is not None else [(b + 1) % B for b in range(B)]
        return _pretrain_step_exact(config, B, lengths, neg_text)
    s = StepFlops()

    vit = vit_forward(vc, B)
    vit_total = vit["patch_embed"] + vit["blocks"]
    s.forward["vit"] = vit_total
    s.backward["vit"] = vit["patch_embed"] + 2 * vit["blocks"]  # images need no gradient
    if vc.grad_checkpointing:
        n_ckpt = vc.ckpt_layer if vc.ckpt_layer > 0 else vc.depth
        s.recompute["vit"] = n_ckpt * vit_block_recompute(vc, B)

    text = med_forward(tc, B, L)
    s.forward["text_encoder"] = text
    s.backward["text_encoder"] = 2 * text

    proj = linear(B, Cv, E) + linear(B, tc.hidden_size, E)  # vision_proj + text_proj on [CLS]
    s.forward["projections"] = proj
    s.backward["projections"] = 2 * proj

    # Momentum encoders and projections: forward only (no gradient).
    s.forward["momentum"] = vit_total + text + proj

    itc = itc_logits(B, Q, E)
    s.forward["itc"] = 4 * itc  # online and momentum logits, both directions
    s.backward["itc"] = 2 * itc  # gradient for the online features only

    itm = med_forward(tc, 3 * B, L, image_tokens=T, image_width=Cv) + linear(3 * B, tc.hidden_size, 2)
    s.forward["itm"] = itm
    s.backward["itm"] = 2 * itm

    lm = med_forward(tc, B, L, image_tokens=T, image_width=Cv) + lm_head_forward(tc, B, L)
    s.forward["lm"] = lm
    s.backward["lm"] = 2 * lm
    return s


def _pretrain_step_exact(config, B: int, lengths, neg_text) -> StepFlops:
    """pretrain_step with exact work: packed text, K/V once per image, used rows only."""
    vc, tc = config.vision, config.text
    E, Q, T, Cv, D = config.embed_dim, config.queue_size, vc.num_patches + 1, vc.width, tc.hidden_size
    if len(lengths) != B or len(neg_text) != B:
        raise ValueError(f"lengths and neg_text need one entry per sample ({B})")
    s = StepFlops()
    vit = vit_forward(vc, B)
    vit_total = vit["patch_embed"] + vit["blocks"]
    s.forward["vit"] = vit_total
    s.backward["vit"] = vit["patch_embed"] + 2 * vit["blocks"]
    if vc.grad_checkpointing:
        n_ckpt = vc.ckpt_layer if vc.ckpt_layer > 0 else vc.depth
        s.recompute["vit"] = n_ckpt * vit_block_recompute(vc, B)

    text = med_forward_packed(tc, lengths, first_only=True)  # unimodal: only [CLS] leaves the last layer
    s.forward["text_encoder"] = text
    s.backward["text_encoder"] = 2 * text
    proj = linear(B, Cv, E) + linear(B, D, E)
    s.forward["projections"] = proj
    s.backward["projections"] = 2 * proj
    s.forward["momentum"] = vit_total - vit_last_block_first_row_saving(vc, B) + text + proj
    itc = itc_logits(B, Q, E)
    s.forward["itc"] = 4 * itc
    s.backward["itc"] = 2 * itc

    pairs = list(lengths) * 2 + [lengths[j] for j in neg_text]  # positives, neg image, neg text
    itm = med_forward_packed(tc, pairs, T, Cv, first_only=True, memories=B) + linear(3 * B, D, 2)
    s.forward["itm"] = itm  # includes the B images' cross-attention K/V, shared with the LM
    s.backward["itm"] = 2 * itm
    dec = [n - 1 for n in lengths]  # causal: the last real token feeds no row and predicts nothing
    n_targets = sum(dec)
    lm = (med_forward_packed(tc, dec, T, Cv, image_kv=False)
          + linear(n_targets, D, D) + linear(n_targets, D, tc.vocab_size))
    s.forward["lm"] = lm
    s.backward["lm"] = 2 * lm
    return s


# ---------------------------------------------------------------------------------------------
# per-card peak throughput (dense, no sparsity), TFLOP/s, from the vendors' datasheets

# precision keys: "bf16" (also fp16 tensor cores), "tf32" (fp32 matmuls on tensor cores),
# "fp32" (plain fp32 on CUDA cores). Ordered: the first pattern that matches the name wins.
PEAK_TFLOPS = [
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"GH200", "GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "L40S", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"L40\b", "L40", {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", "RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
]
PEAK_ENV = "BLIPFAST_PEAK_TFLOPS"  # override: a number (TFLOP/s) used for every precision


def peak_tflops(card_name: str, precision: str) -> Optional[float]:
    """Datasheet dense peak of `card_name` (torch.cuda.get_device_name) at `precision`, or None.

    precision: bf16 | fp16 | tf32 | fp32. The env var BLIPFAST_PEAK_TFLOPS overrides the table
    (for a card it lacks, or a measured ceiling). None when the card is unknown (e.g. a CPU).
    """
    if precision not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"precision must be bf16, fp16, tf32 or fp32, got {precision!r}")
    override = os.environ.get(PEAK_ENV)
    if override:
        return float(override)
    key = "bf16" if precision == "fp16" else precision
    for pattern, _, peaks in PEAK_TFLOPS:
        if re.search(pattern, card_name or ""):
            return peaks[key]
    return None


def card_family(card_name: str) -> Optional[str]:
    for pattern, family, _ in PEAK_TFLOPS:
        if re.search(pattern, card_name or ""):
            return family
    return None


def mfu(flops: float, seconds: float, card_name: str, precision: str) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the card's peak (None if unknown)."""
    peak = peak_tflops(card_name, precision)
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)
