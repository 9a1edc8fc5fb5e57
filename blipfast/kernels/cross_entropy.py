"""LM head fused with label-smoothed cross-entropy: the (N, V) logits are never held in full.

Semantics: `reference.lm_cross_entropy` with reduction "mean":
    loss = mean over rows with labels != ignore_index of
           (1 - eps) * (lse_i - x_{i,y_i}) + eps * (lse_i - mean_j x_ij),   x = hidden @ weight^T + bias
which is PyTorch's `cross_entropy(label_smoothing=eps)`.

Design (the Liger-Kernel "fused linear cross-entropy" layout): rows are processed in chunks.
For each chunk, cuBLAS computes hidden @ weight^T (chunk x V, in the compute dtype, into a buffer
whose rows are padded to a multiple of 16 elements so that the kernel's loads are 128-bit vectors),
one Triton program per row adds the bias and streams over the vocabulary with a running max /
sum-exp (plus the sum of the logits for the smoothing term; the target logit is read once),
writes the row loss, and in a second sweep overwrites the logits in place with d loss / d logits =
(softmax - eps / V - (1 - eps) * onehot) / n_valid. Then cuBLAS turns that chunk into its share of
the gradients: d hidden = dlogits @ weight, d weight += dlogits^T @ hidden, d bias += sum(dlogits).
The gradients are therefore computed during the forward (when any input needs one), and the
backward only scales them by the incoming gradient. Why this split rather than one Triton
kernel doing the matmuls too: the three matmuls are 99% of the FLOPs and cuBLAS runs them at
peak, while the part worth fusing is the memory-bound softmax/CE over the logits, which the
Triton kernel reads twice and writes once per chunk (the unfused path makes about six full
passes over an fp32 (N, V) tensor and keeps several alive). Peak extra memory is
O(chunk x V) for the logits plus the fp32 weight-gradient accumulator (V x C), not O(N x V).

`lm_cross_entropy` runs as the PyTorch custom op "blipfast::lm_cross_entropy" (a fake
implementation for tracing, an autograd formula that scales the forward's gradients), so
torch.compile keeps it in one graph (fullgraph=True) as an opaque call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_device, interpreting

__all__ = ["lm_cross_entropy"]

# The GPU launch is fixed, not autotuned (so there is no tuning key and no on-disk tuning result to
# go stale): the kernel streams rows at memory speed, and its compile cache keys on V, the flags
# and the dtypes. benchmarks/kernel_audit.py audits exactly this launch.
GPU_BLOCK_V = 4096  # vocabulary tile on a GPU (8 warps: 16 logits per thread per tile)
NUM_WARPS = 8


@triton.jit
def _ce_fold(m_v, l_v, sx_v, x, x_sum):
    """Fold one (ROWS, BLOCK_V) tile of logits into the per-lane running max, sum of exp and sum of
    logits. x: -inf outside the row; x_sum: the same tile with 0 there."""
    m_new = tl.maximum(m_v, x)
    return m_new, l_v * tl.exp(m_v - m_new) + tl.exp(x - m_new), sx_v + x_sum


@triton.jit
def _ce_grad(x, cols, y, lse, scale, eps, V: tl.constexpr):
    """d loss / d logits of one tile: (softmax - eps / V - (1 - eps) onehot(y)) x scale, per row."""
    g = tl.exp(x - lse[:, None]) - eps / V - tl.where(cols[None, :] == y[:, None], 1.0 - eps, 0.0)
    return g * scale[:, None]


@triton.jit
def _ce_load(base, bias_ptr, cols, TAIL: tl.constexpr, V_LOAD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One (ROWS, BLOCK_V) tile of logits (+ bias) in fp32: a body tile unmasked, the tail masked to
    V_LOAD columns (whatever it holds past V is the caller's to drop)."""
    if TAIL:
        x = tl.load(base + cols[None, :], mask=(cols < V_LOAD)[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=cols < V_LOAD, other=0.0).to(tl.float32)[None, :]
    else:
        x = tl.load(base + cols[None, :]).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    return x


@triton.jit
def _ce_kernel(logits_ptr, stride_row, bias_ptr, labels_ptr, loss_ptr, scale_ptr, n_rows, eps, ignore_index,
               V: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, WRITE_GRAD: tl.constexpr,
               ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """ROWS rows per program of z = logits (+ bias, added here in fp32): loss_ptr[row] = smoothed CE
    of z (0 if ignored); with WRITE_GRAD, logits[row] <- d loss / d z. (ROWS is 1 on a GPU; the
    interpreter takes 16 at a time.)

    The full BLOCK_V tiles of a row (the body) are loaded without a column mask, the last partial
    tile (the tail) with one. ALIGNED (the caller checks it, see `_ce_aligned`): the logits and
    bias pointers are 16-byte aligned, stride_row is a multiple of 16 elements, and each row and
    the bias may be read up to V rounded up to 16 (padding). Then every load of logits and bias is
    a 128-bit vector load, the tail's too (it reads the padding and drops it). Otherwise (BERT's
    V = 30522 as a contiguous tensor: rows start 4-byte aligned) the same code runs with 16-bit
    scalar loads."""
    if ALIGNED:
        stride_row = tl.multiple_of(stride_row, 16)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    # rows past the end (interpreter only) re-read the last row: the body's loads need no mask
    base = logits_ptr + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * stride_row  # (ROWS, 1)
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int32)
    offs = tl.arange(0, BLOCK_V)
    V_BODY: tl.constexpr = V // BLOCK_V * BLOCK_V  # columns in full tiles
    V_LOAD: tl.constexpr = (V + 15) // 16 * 16 if ALIGNED else V  # columns a tail load may touch
    # per-lane running statistics, reduced once at the end
    m_v = tl.full((ROWS, BLOCK_V), -3.0e38, tl.float32)
    l_v = tl.zeros((ROWS, BLOCK_V), tl.float32)
    sx_v = tl.zeros((ROWS, BLOCK_V), tl.float32)
    for v0 in range(0, V_BODY, BLOCK_V):
        x = _ce_load(base, bias_ptr, v0 + offs, False, V_LOAD, HAS_BIAS)
        m_v, l_v, sx_v = _ce_fold(m_v, l_v, sx_v, x, x)
    if V_BODY < V:
        cols = V_BODY + offs
        x = _ce_load(base, bias_ptr, cols, True, V_LOAD, HAS_BIAS)
        in_row = (cols < V)[None, :]  # padding read by an ALIGNED tail load is dropped here
        m_v, l_v, sx_v = _ce_fold(m_v, l_v, sx_v, tl.where(in_row, x, float("-inf")), tl.where(in_row, x, 0.0))
    m = tl.max(m_v, 1)
    lse = m + tl.log(tl.sum(l_v * tl.exp(m_v - m[:, None]), 1))
    ignored = y == ignore_index
    # the target logit: one element per row, read directly (not picked out of every tile); a label
    # out of range (reported by the op's asynchronous check) must not become an out-of-bounds read
    y_ok = (y >= 0) & (y < V) & ~ignored
    y_col = tl.where(y_ok, y, 0)
    z_y = tl.load(base + y_col[:, None], mask=y_ok[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y_col, mask=y_ok, other=0.0).to(tl.float32)[:, None]
    loss = lse - (1.0 - eps) * tl.sum(z_y, 1) - eps * tl.sum(sx_v, 1) / V
    tl.store(loss_ptr + rows, tl.where(ignored, 0.0, loss), mask=row_ok)
    if WRITE_GRAD:
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr))  # 1 / number of non-ignored rows
        for v0 in range(0, V_BODY, BLOCK_V):
            cols = v0 + offs
            g = _ce_grad(_ce_load(base, bias_ptr, cols, False, V_LOAD, HAS_BIAS), cols, y, lse, scale, eps, V)
            tl.store(base + cols[None, :], g.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None])
        if V_BODY < V:
            cols = V_BODY + offs
            g = _ce_grad(_ce_load(base, bias_ptr, cols, True, V_LOAD, HAS_BIAS), cols, y, lse, scale, eps, V)
            tl.store(base + cols[None, :], g.to(logits_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < V)[None, :])


def _readable_to(t: torch.Tensor, end: int) -> bool:
    """Whether t's storage holds `end` elements from t's first one (an aligned tail reads that far)."""
    return (t.storage_offset() + end) * t.element_size() <= t.untyped_storage().nbytes()


def _ce_aligned(logits: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether `logits` (n, V) and `bias` (V,) meet `_ce_kernel`'s ALIGNED contract: 16-byte aligned
    starts, unit column stride, a row stride of a multiple of 16 elements (so every row starts
    16-byte aligned), and storage behind the last row and the bias up to V rounded up to 16 (earlier
    rows have it: their stride is at least that)."""
    n, V = logits.shape
    V16 = triton.cdiv(V, 16) * 16
    if logits.stride(1) != 1 or logits.stride(0) % 16 or logits.data_ptr() % 16:
        return False
    if bias is not None and (bias.stride(0) != 1 or bias.data_ptr() % 16 or not _readable_to(bias, V16)):
        return False
    return _readable_to(logits, (n - 1) * logits.stride(0) + V16)


def _padded(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised view of `shape` whose last dimension V is stored rounded up to 16 (30522 ->
    30528): rows start 16-byte aligned and the padding is readable (`_ce_aligned`)."""
    V = shape[-1]
    return torch.empty(*shape[:-1], triton.cdiv(V, 16) * 16, dtype=dtype, device=device)[..., :V]


def _launch_ce(logits, bias, labels, loss_rows, scale, eps: float, ignore_index: int, write_grad: bool,
               block_v: int) -> None:
    """`_ce_kernel` over the rows of `logits` (n, V) (any row stride) plus `bias` (V,) or None: the
    ALIGNED specialisation when `_ce_aligned` holds, the scalar-load one otherwise."""
    n, V = logits.shape
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    rows_per_program = 16 if interpreting() else 1
    _ce_kernel[(triton.cdiv(n, rows_per_program),)](
        logits, logits.stride(0), logits if bias is None else bias, labels, loss_rows, scale, n, float(eps),
        int(ignore_index), V=V, HAS_BIAS=bias is not None, ALIGNED=_ce_aligned(logits, bias), WRITE_GRAD=write_grad,
        ROWS=rows_per_program, BLOCK_V=block_v, num_warps=NUM_WARPS,
    )


_OUT_DTYPE_MM = {}  # device type -> whether torch.addmm(..., out_dtype=float32) works there


def _acc_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, with a, b in a 16-bit dtype accumulated in fp32 without a full temp."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    dev = acc.device.type
    if _OUT_DTYPE_MM.get(dev, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_MM[dev] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM[dev] = False
    acc += torch.mm(a, b).float()


def _check_inputs(hidden, weight, bias, labels, label_smoothing):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    check_device(hidden, "hidden", "the fused LM loss kernels")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, C) and weight (V, C); got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must be (V,) = ({V},), got {tuple(bias.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be (N,) = ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not torch.is_autocast_enabled(hidden.device.type) and (
            weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype)):
        raise ValueError(f"hidden, weight and bias must share a dtype outside autocast, got {hidden.dtype}, "
                         f"{weight.dtype}, {None if bias is None else bias.dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _check_labels(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < V))
    msg = f"labels must be in [0, {V}) or equal ignore_index ({ignore_index})"
    if labels.device.type == "cpu":
        if not bool(valid.all()):
            raise ValueError(msg)
    else:
        torch._assert_async(valid.all(), msg)  # no host sync; fails like PyTorch's own CE on CUDA


# A PyTorch custom op (not an autograd.Function) so that torch.compile traces it as one opaque
# node (fullgraph=True works) and never looks inside the Triton launch. Everything that depends
# on thread-local state is decided by the caller (`lm_cross_entropy`) and passed in: the compute
# dtype (the autocast dtype, if autocast is on there) and which gradients are needed. The op
# returns the gradients the forward computes (grad_h in the compute dtype, grad_w and grad_b in
# fp32; (0,)-shaped when not needed) and the backward (`_ce_backward`) only scales them.
@torch.library.custom_op("blipfast::lm_cross_entropy", mutates_args=())
def _ce_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, eps: float,
           ignore_index: int, chunk_rows: int, block_v: int, compute_dtype: torch.dtype, need_h: bool,
           need_w: bool, need_b: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss (), d loss / d hidden (N, C), d loss / d weight (V, C), d loss / d bias (V,))."""
    N, C = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    # here, not in lm_cross_entropy: on CPU the check reads the labels' values, which a traced
    # (torch.compile) caller cannot do without a graph break; inside the op they are real tensors
    _check_labels(labels, V, ignore_index)
    dtype = compute_dtype
    want_grad = need_h or need_w or (bias is not None and need_b)
    with torch.autocast(dev.type, enabled=False):  # explicit casts below, one dtype throughout
        h = hidden.to(dtype).contiguous()
        w = weight.to(dtype).contiguous()
        # (V,) in a buffer of V rounded up to 16, as the kernel's aligned loads want
        b = _padded((V,), dtype, dev).copy_(bias) if bias is not None else None
        labels = labels.contiguous()
        n_valid = (labels != ignore_index).sum()
        scale = (1.0 / n_valid.clamp(min=1).float()).reshape(1)  # device scalar: no sync
        loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
        none = lambda: hidden.new_empty(0, dtype=torch.float32)  # noqa: E731  (a gradient not asked for)
        grad_h = torch.empty_like(h) if need_h else none()
        grad_w = torch.zeros(V, C, dtype=torch.float32, device=dev) if need_w else none()
        grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if (b is not None and need_b) else none()
        buf = _padded((min(chunk_rows, N), V), dtype, dev)  # (chunk, V) view, row stride V rounded up to 16
        for r0 in range(0, N, chunk_rows):
            r1 = min(r0 + chunk_rows, N)
            h_c = h[r0:r1]  # (n, C)
            logits = buf[:r1 - r0]  # (n, V); cuBLAS writes it with leading dimension V rounded up to 16
            # no bias here: cuBLASLt adds it in its epilogue only into a contiguous output (else
            # PyTorch first copies it into every row); the kernel adds it instead, in fp32
            torch.mm(h_c, w.t(), out=logits)
            _launch_ce(logits, b, labels[r0:r1], loss_rows[r0:r1], scale, eps, ignore_index, want_grad, block_v)
            if not want_grad:
                continue
            dlogits = logits  # overwritten in place by the kernel: (n, V)
            if need_h:
                torch.mm(dlogits, w, out=grad_h[r0:r1])
            if need_w:
                _acc_mm_(grad_w, dlogits.t(), h_c)
            if b is not None and need_b:
                grad_b += dlogits.sum(0, dtype=torch.float32)
        loss = loss_rows.sum() / n_valid  # NaN when every row is ignored, like PyTorch
    return loss, grad_h, grad_w, grad_b


@_ce_op.register_fake
def _ce_fake(hidden, weight, bias, labels, eps, ignore_index, chunk_rows, block_v, compute_dtype, need_h,
             need_w, need_b):
    N, C = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((), **f32),
            hidden.new_empty(N, C, dtype=compute_dtype) if need_h else hidden.new_empty(0, **f32),
            hidden.new_empty(V, C, **f32) if need_w else hidden.new_empty(0, **f32),
            hidden.new_empty(V, **f32) if (bias is not None and need_b) else hidden.new_empty(0, **f32))


def _ce_setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _loss, grad_h, grad_w, grad_b = output
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)


def _ce_backward(ctx, g, _g_h, _g_w, _g_b):
    out = []
    for i, (grad, dt) in enumerate(zip(ctx.saved_tensors, ctx.dtypes)):
        out.append((grad.float() * g).to(dt) if ctx.needs_input_grad[i] else None)
    return out[0], out[1], out[2], *([None] * 9)


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def lm_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.1,
    ignore_index: int = -100,
    chunk_rows: Optional[int] = None,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """Mean label-smoothed cross-entropy of `hidden @ weight^T + bias` against `labels`.

    hidden: (N, C) (the LM head's transformed states); weight: (V, C) (tied word embeddings);
    bias: (V,) or None; labels: (N,) int, `ignore_index` rows excluded from the mean. Returns a
    0-dim fp32 loss; gradients flow to hidden, weight and bias. Under autocast the matmuls run
    in the autocast dtype (as F.linear would). chunk_rows: rows per chunk (default: about
    4 x N x C / V, at least 64, so a chunk's logits are a few times the size of `hidden`);
    block_v: vocabulary tile of the CE kernel (default 4096, 128 under the interpreter).
    """
    _check_inputs(hidden, weight, bias, labels, label_smoothing)
    V, C = weight.shape
    N = hidden.shape[0]
    if chunk_rows is None:
        chunk_rows = max(64, triton.next_power_of_2(max(1, 4 * N * C // V)))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if block_v is None:
        block_v = min(triton.next_power_of_2(V), 128 if interpreting() else GPU_BLOCK_V)
    dev = hidden.device.type
    # decided here, not inside the op: a custom op must not depend on the caller's autocast state
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    grad_on = torch.is_grad_enabled()
    return _ce_op(hidden, weight, bias, labels, float(label_smoothing), int(ignore_index), int(chunk_rows),
                  int(block_v), dtype, grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                  grad_on and bias is not None and bias.requires_grad)[0]
