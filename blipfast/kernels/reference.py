"""Plain-PyTorch definition of every op blipfast fuses: the ground truth for tests and benchmarks,
and the CPU path.

Each function here states the semantics that the Triton kernels in this package must match.
They are written for clarity, not speed, and work in any dtype (tests run them in fp64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "attention_dropout_mask",
    "varlen_attention",
    "itc_logits",
    "itc_loss",
    "hard_negative_weights",
    "sample_hard_negatives",
    "lm_cross_entropy",
    "itc_loss_retrieval",
    "retrieval_negative_weights",
    "sample_retrieval_negatives",
]


# ---------------------------------------------------------------------------------------------
# attention


def attention_dropout_mask(shape, dropout_p: float, generator: Optional[torch.Generator] = None,
                           device=None) -> torch.Tensor:
    """Bernoulli keep-mask (True = kept) of `shape` = (B, H, Lq, Lk) for attention dropout."""
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scaled dot-product attention, the semantics every attention backend must match.

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, D) values.
        key_padding_mask: optional bool (B, Lk); True where the key is real (like BERT's
            attention_mask == 1), False where it is padding and must get no weight.
        causal: query i may attend only to keys j <= i (top-left aligned, also when Lq != Lk).
        dropout_p: probability of zeroing an attention probability; kept ones are scaled by
            1 / (1 - dropout_p). Applied after the softmax, as BERT does.
        softmax_scale: multiplier of q.k; default 1 / sqrt(D).
        dropout_mask: optional bool (B, H, Lq, Lk) keep-mask to use instead of drawing one
            (tests pass a kernel's own mask here to check its gradients).

    Returns:
        (B, H, Lq, D). A query row whose keys are all masked (by padding and/or causality)
        returns zeros, and its gradients are zero: it attends to nothing.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(torch.bool)[:, None, None, :]
    if causal:
        tri = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        allowed = allowed & tri
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A fully masked row would be softmax(-inf...) = NaN; define it as attending to nothing.
    row_has_key = allowed.any(-1, keepdim=True)  # (B, 1|H, Lq, 1)
    scores = scores.masked_fill(~row_has_key, 0.0)
    probs = torch.softmax(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, dim=-1)
    probs = probs.masked_fill(~row_has_key, 0.0).to(q.dtype)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p) if dropout_p > 0 else probs * dropout_mask
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    dropout_masks: Optional[list] = None,
) -> torch.Tensor:
    """Attention over packed sequences: the semantics of the variable-length kernel.

    Args:
        q: (total_q, H, D) queries of B sequences laid end to end, no padding.
        k, v: (total_k, H, D) keys and values, packed the same way.
        cu_seqlens_q, cu_seqlens_k: int (B + 1,) cumulative lengths, starting at 0; sequence b
            is rows cu[b]:cu[b + 1]. Query sequence b attends only to key sequence b.
        causal: top-left aligned within each sequence pair (query i sees keys j <= i).
        dropout_p, softmax_scale: as in `attention`.
        dropout_masks: optional list of B bool keep-masks, mask b of shape (H, Lq_b, Lk_b).

    Returns:
        (total_q, H, D). A sequence with no keys (Lk_b = 0) returns zeros.
    """
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be (B + 1,)")
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b] or ck[b + 1] == ck[b]:
            continue
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]  # (1, H, Lq_b, D)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]  # (1, H, Lk_b, D)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        mask = None if dropout_masks is None else dropout_masks[b][None]
        ob = attention(qb, kb, vb, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale,
                       dropout_mask=mask)
        out[cq[b]:cq[b + 1]] = ob[0].transpose(0, 1)  # (Lq_b, H, D)
    return out


# ---------------------------------------------------------------------------------------------
# image-text contrastive loss (ITC) with momentum distillation and feature queues


def itc_logits(feat: torch.Tensor, feat_m_other: torch.Tensor, queue_other: torch.Tensor,
               temp: torch.Tensor) -> torch.Tensor:
    """s = feat @ [feat_m_other^T | queue_other] / temp.

    feat: (B, E) normalised online features of one modality; feat_m_other: (B, E) normalised
    momentum features of the other modality; queue_other: (E, Q) that modality's queue;
    temp: scalar or 1-element tensor. Returns (B, B + Q).
    """
    all_other = torch.cat([feat_m_other.t(), queue_other], dim=1)  # (E, B + Q)
    return feat @ all_other / temp.reshape(())


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    return_logits: bool = False,
):
    """BLIP's ITC loss, exactly as the original `blip_pretrain.py` computes it.

    For each direction (image->text, text->image), with s the online logits and s_m the
    momentum logits (both over [in-batch momentum features | queue]):
        t = alpha * softmax(s_m) + (1 - alpha) * onehot(i)
        loss = mean_i( -sum_j t_ij * log_softmax(s)_ij )
    and the result is the mean of the two directions. The momentum side carries no gradient.

    Returns the scalar loss, or (loss, sim_i2t, sim_t2i) with `return_logits`: the online
    logits (B, B + Q), whose first B columns feed hard-negative sampling.
    """
    B = image_feat.shape[0]
    with torch.no_grad():
        sim_i2t_m = itc_logits(image_feat_m, text_feat_m, text_queue, temp)
        sim_t2i_m = itc_logits(text_feat_m, image_feat_m, image_queue, temp)
        onehot = torch.zeros_like(sim_i2t_m)
        onehot.fill_diagonal_(1)
        t_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * onehot
        t_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * onehot
    sim_i2t = itc_logits(image_feat, text_feat_m, text_queue, temp)
    sim_t2i = itc_logits(text_feat, image_feat_m, image_queue, temp)
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * t_i2t, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t_t2i, dim=1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    assert sim_i2t.shape[0] == B
    if return_logits:
        return loss, sim_i2t, sim_t2i
    return loss


# ---------------------------------------------------------------------------------------------
# hard negatives for ITM


def hard_negative_weights(sim_inbatch: torch.Tensor) -> torch.Tensor:
    """The original's sampling weights: softmax(s[:, :B]) + 1e-4 with the diagonal zeroed.

    sim_inbatch: (B, B) online-vs-momentum logits of the in-batch columns (already / temp).
    Row i is the (unnormalised) distribution of the negative drawn for sample i.
    Raises ValueError for non-finite similarities (the original crashes in multinomial).
    """
    if not torch.isfinite(sim_inbatch).all():
        raise ValueError(
            "non-finite ITC similarity while sampling hard negatives (the model has diverged: "
            "NaN/inf in the image or text features)"
        )
    w = F.softmax(sim_inbatch.float(), dim=1) + 1e-4
    w.fill_diagonal_(0)
    return w


def sample_hard_negatives(sim_t2i_inbatch: torch.Tensor, sim_i2t_inbatch: torch.Tensor,
                          generator: Optional[torch.Generator] = None):
    """Draw one negative per row from `hard_negative_weights`, in one batched call, no host sync.

    Returns (neg_image_for_text, neg_text_for_image): int64 (B,) index tensors.
    B must be at least 2 (with one sample there is no negative to draw).
    """
    B = sim_t2i_inbatch.shape[0]
    if B < 2:
        raise ValueError(f"hard-negative sampling needs a batch of at least 2 per rank, got {B}")
    w_t2i = hard_negative_weights(sim_t2i_inbatch)
    w_i2t = hard_negative_weights(sim_i2t_inbatch)
    neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_img, neg_txt


# ---------------------------------------------------------------------------------------------
# LM head + label-smoothed cross-entropy


def lm_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """cross_entropy(hidden @ weight^T + bias, labels) with label smoothing and ignore_index.

    hidden: (N, C) rows (already transformed by the LM head's dense/GELU/LayerNorm); weight:
    (V, C) (tied word embeddings); bias: (V,); labels: (N,) int64. reduction 'mean' averages
    over the non-ignored rows (PyTorch's convention), 'none' returns (N,) with 0 at ignored rows,
    'sum' sums them. Shifting for next-token prediction is the caller's job.
    """
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):  # 16-bit logits up to fp32; fp64 stays fp64
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


# ---------------------------------------------------------------------------------------------
# retrieval fine-tuning variants (original `blip_retrieval.py`): targets and negatives by image id


def itc_loss_retrieval(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    idx: torch.Tensor,
    idx_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    return_logits: bool = False,
):
    """ITC of retrieval fine-tuning: as `itc_loss`, but the hard targets are every column with
    the same image id, y = pos / pos.sum(1) with pos = (idx_i == [idx | idx_queue]_j).

    idx: (B,) image ids of the batch; idx_queue: (Q,) ids stored beside the queues (the original
    initialises them to -100). Other arguments and `return_logits` as `itc_loss`.
    """
    idx_all = torch.cat([idx.view(-1), idx_queue.view(-1)])  # (B + Q,)
    pos = (idx.view(-1, 1) == idx_all.view(1, -1)).to(image_feat.dtype)  # (B, B + Q)
    y = pos / pos.sum(1, keepdim=True)
    with torch.no_grad():
        t_i2t = alpha * F.softmax(itc_logits(image_feat_m, text_feat_m, text_queue, temp), dim=1) + (1 - alpha) * y
        t_t2i = alpha * F.softmax(itc_logits(text_feat_m, image_feat_m, image_queue, temp), dim=1) + (1 - alpha) * y
    sim_i2t = itc_logits(image_feat, text_feat_m, text_queue, temp)
    sim_t2i = itc_logits(text_feat, image_feat_m, image_queue, temp)
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * t_i2t, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t_t2i, dim=1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    if return_logits:
        return loss, sim_i2t, sim_t2i
    return loss


def retrieval_negative_weights(sim: torch.Tensor, idx_row: torch.Tensor, idx_col: torch.Tensor) -> torch.Tensor:
    """Retrieval sampling weights: softmax(sim) with the columns of the row's own image id zeroed
    (no 1e-4 floor). sim: (R, C) logits (online features vs the [gathered] batch, / temp);
    idx_row: (R,), idx_col: (C,). Raises ValueError for non-finite logits, or when a row has no
    column left (the original's multinomial then crashes)."""
    if not torch.isfinite(sim).all():
        raise ValueError("non-finite similarity while sampling retrieval negatives (NaN/inf features)")
    w = F.softmax(sim, dim=1).masked_fill(idx_row.view(-1, 1) == idx_col.view(1, -1), 0)
    if not (w.sum(1) > 0).all():
        raise ValueError("cannot sample a retrieval negative: every candidate shares the row's image id")
    return w


def sample_retrieval_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx_row: torch.Tensor,
                               idx_col: torch.Tensor, generator: Optional[torch.Generator] = None):
    """One draw per row from `retrieval_negative_weights`, batched (no host sync).

    sim_i2t: (B, C) local images vs candidate texts; sim_t2i: (B, C) local texts vs candidate
    images. Returns (neg_image_for_text, neg_text_for_image): int64 (B,) column indices.
    """
    w_t2i = retrieval_negative_weights(sim_t2i, idx_row, idx_col)
    w_i2t = retrieval_negative_weights(sim_i2t, idx_row, idx_col)
    neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_img, neg_txt
