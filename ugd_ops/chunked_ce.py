"""Chunked linear + cross-entropy: the kernels of ``ugd_ops::linear_cross_entropy_fwd`` / ``_bwd``.

``logits = hidden @ weight.T (+ bias)`` is never built whole: the rows are taken ``chunk_size`` at a
time, and for each chunk the ``[chunk, V]`` logits are turned, in place, into the loss of its rows
and (when asked) the gradient of the logits, which two matmuls turn into the chunk's rows of
``grad_hidden`` and its share of ``grad_weight`` (the idea of Liger-Kernel's fused linear
cross-entropy: the gradients are computed in the forward, and the backward only scales them). The
``[chunk, V]`` buffer is all that grows with the vocabulary.

These are PyTorch code, registered by ``ugd_ops._backend`` as the ``CompositeExplicitAutograd``
kernel of the two operators (every device: CPU and CUDA alike; the heavy work is in cuBLAS / BLAS
matmuls). A fused CUDA kernel is future work (docs/losses.md). ``ugd_ops.ops`` holds the public
function, the fake kernels and the autograd formula.

Precision: the softmax, the loss and the accumulation of ``grad_weight`` / ``grad_bias`` over the
chunks are fp32 (fp64 for fp64 inputs). On CUDA, bf16 / fp16 logits come out of the matmul in
fp32 (``torch.mm(..., out_dtype=torch.float32)``) and ``grad_weight`` is accumulated by an fp32-out
``addmm``; on the CPU, which has neither, the logits are rounded to the input dtype before the
upcast and each chunk's ``grad_weight`` product is rounded before it is added to the fp32 sum.
"""

from __future__ import annotations

import torch

from . import _checks

REDUCTIONS = ("none", "sum", "mean")
# Default chunk: the largest power of two of rows whose [chunk, V] fp32 logits hold at most this many
# elements (2^27: 512 MiB of fp32 logits plus 256 MiB of bf16 gradient; 512 rows for V = 151,936).
DEFAULT_CHUNK_ELEMENTS = 1 << 27
MAX_DEFAULT_CHUNK = 4096
MIN_DEFAULT_CHUNK = 16

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LOW = (torch.bfloat16, torch.float16)

# Whether the fp32-output matmuls of bf16 / fp16 inputs work on this torch + device (CUDA only). They
# are tried once and remembered; a refusal falls back to a matmul in the input dtype.
_MM_OUT_DTYPE_OK = {"mm": True, "addmm": True}


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk when the caller gives none: a power of two in [16, 4096] (see DEFAULT_CHUNK_ELEMENTS)."""
    rows = max(1, DEFAULT_CHUNK_ELEMENTS // max(int(vocab), 1))
    chunk = 1 << (rows.bit_length() - 1)
    return max(MIN_DEFAULT_CHUNK, min(MAX_DEFAULT_CHUNK, chunk))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_args(hidden, weight, targets, bias, per_sample, reduction: str | None, chunk_size: int) -> None:
    """Shape, dtype and device checks (no data read: safe on fake tensors). ``reduction=None`` skips its check."""
    fail = _checks._fail
    if hidden.dtype not in _FLOATS:
        fail("hidden must be float32, float64, bfloat16 or float16, got ", hidden.dtype)
    if hidden.dim() != 2:
        fail("hidden must be [N, H], got shape ", list(hidden.shape))
    if weight.dim() != 2:
        fail("weight must be [V, H], got shape ", list(weight.shape))
    if weight.dtype != hidden.dtype:
        fail("weight must have the dtype of hidden (", hidden.dtype, "), got ", weight.dtype)
    if weight.device != hidden.device:
        fail("weight must be on the device of hidden (", hidden.device, "), got ", weight.device)
    N, H = hidden.shape
    if weight.shape[1] != H:
        fail("weight must be [V, H] with H = ", H, " (hidden's last dim), got shape ", list(weight.shape))
    if targets.dtype != torch.int64:
        fail("targets must be int64, got ", targets.dtype)
    if targets.dim() != 1 or targets.shape[0] != N:
        fail("targets must be [N] with N = ", N, " (hidden's rows), got shape ", list(targets.shape))
    if targets.device != hidden.device:
        fail("targets must be on the device of hidden (", hidden.device, "), got ", targets.device)
    if bias is not None:
        if bias.dtype != hidden.dtype:
            fail("bias must have the dtype of hidden (", hidden.dtype, "), got ", bias.dtype)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            fail("bias must be [V] with V = ", weight.shape[0], " (weight's rows), got shape ", list(bias.shape))
        if bias.device != hidden.device:
            fail("bias must be on the device of hidden (", hidden.device, "), got ", bias.device)
    if per_sample is not None:
        if per_sample.dtype != torch.int64:
            fail("per_sample must be int64, got ", per_sample.dtype)
        if per_sample.dim() != 1 or per_sample.shape[0] != N:
            fail("per_sample must be [N] with N = ", N, " (hidden's rows), got shape ", list(per_sample.shape))
        if per_sample.device != hidden.device:
            fail("per_sample must be on the device of hidden (", hidden.device, "), got ", per_sample.device)
    if reduction is not None:
        if reduction not in REDUCTIONS:
            fail("reduction must be one of ", REDUCTIONS, ", got '", reduction, "'")
        if per_sample is not None and reduction == "none":
            fail("per_sample needs reduction 'mean' or 'sum' (a mean per sample), got 'none'")
    if chunk_size < 1:
        fail("chunk_size must be positive, got ", chunk_size)


def _check_values(targets, per_sample, valid, vocab: int) -> None:
    """Value checks, on the CPU only (on CUDA they would synchronise; out-of-range indices trip the
    device-side bounds assert of gather / index_add instead)."""
    if targets.device.type != "cpu" or targets.numel() == 0:
        return
    t = targets[valid]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        _checks._fail("targets must lie in [0, V) = [0, ", vocab, ") or equal ignore_index, got values from ",
                      int(t.min()), " to ", int(t.max()))
    if per_sample is not None:
        s = per_sample[valid]
        n = targets.shape[0]
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= n):
            _checks._fail("per_sample ids of non-ignored rows must lie in [0, N) = [0, ", n, "), got values from ",
                          int(s.min()), " to ", int(s.max()))


def row_weights(targets, per_sample, ignore_index: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """d(reduced loss) / d(loss of row i), ``[N]``: 0 for ignored rows, else

    - ``"none"``, ``"sum"``: 1;
    - ``"mean"``: 1 / (number of non-ignored rows), and 0 everywhere when every row is ignored (the
      loss is then 0, not F.cross_entropy's 0/0 = NaN);
    - with ``per_sample``: 1 / (non-ignored rows of the row's sample), further divided by the number of
      samples with a non-ignored row for ``"mean"`` (docs/spec.md section 5, paper eq. 3; samples without
      one are left out).
    """
    valid = targets != ignore_index
    w = valid.to(dtype)
    if per_sample is None:
        if reduction == "mean":
            w = w / w.sum().clamp_min(1)
        return w
    ids = torch.where(valid, per_sample, 0)
    counts = torch.zeros(targets.shape[0], dtype=dtype, device=targets.device).index_add_(0, ids, w)
    inv = 1.0 / counts.clamp_min(1)
    w = w * inv[ids]
    if reduction == "mean":
        w = w / (counts > 0).sum().clamp_min(1).to(dtype)
    return w


def _logits(h: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``h @ weight.T`` as a fresh tensor of the accumulation dtype."""
    if h.dtype in _LOW and h.is_cuda and _MM_OUT_DTYPE_OK["mm"]:
        try:
            return torch.mm(h, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE_OK["mm"] = False
    return torch.mm(h, weight.t()).to(acc)


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32 (or fp64), a and b in the input dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _MM_OUT_DTYPE_OK["addmm"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE_OK["addmm"] = False
    acc.add_(torch.mm(a, b))  # the product is rounded to the input dtype, the sum kept in fp32


def _chunked(hidden, weight, targets, bias, weights_of_rows, ignore_index: int, chunk_size: int, want_loss: bool,
             grad_hidden: bool, grad_weight: bool, grad_bias: bool):
    """Per-row losses (fp32 / fp64, 0 for ignored rows) and the gradients of ``sum_i w_i * loss_i``
    with ``w = weights_of_rows`` (which must be 0 on ignored rows), chunk by chunk. Returns
    (loss_rows or None, gh, gw, gb) with empty ``[0]`` tensors for the gradients not asked for."""
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = hidden.dtype
    acc = acc_dtype(dtype)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0)
    any_grad = grad_hidden or grad_weight or grad_bias
    if grad_bias and bias is None:
        grad_bias = False
    loss_rows = torch.zeros(N, dtype=acc, device=hidden.device) if want_loss else None
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else hidden.new_empty((0,))
    gw_acc = torch.zeros((V, H), dtype=acc, device=hidden.device) if grad_weight else None
    gb_acc = torch.zeros((V,), dtype=acc, device=hidden.device) if grad_bias else None
    if V > 0:
        for s in range(0, N, chunk_size):
            e = min(N, s + chunk_size)
            h = hidden[s:e]
            t = safe_t[s:e, None]
            z = _logits(h, weight, acc)  # [c, V], fresh: the steps below work in place
            if bias is not None:
                z.add_(bias)
            m = z.amax(1, keepdim=True)
            z_t = z.gather(1, t)
            z.sub_(m).exp_()
            total = z.sum(1, keepdim=True)
            if want_loss:
                # loss = logsumexp - z_t = log(sum exp(z - m)) - (z_t - m): the max and the log-sum kept
                # apart, so that logits of 1e4 lose no digits to the log-sum.
                rows = (total.log() - (z_t - m)).squeeze(1)
                loss_rows[s:e] = torch.where(valid[s:e], rows, 0)
            if not any_grad:
                continue
            # d loss / d logits of the chunk: w * (softmax - onehot(target)); w is 0 on ignored rows.
            w = weights_of_rows[s:e, None].to(acc)
            z.mul_(w / total)
            z.scatter_add_(1, t, -w)
            if grad_bias:
                gb_acc.add_(z.sum(0))
            if grad_hidden or grad_weight:
                g = z.to(dtype)
                del z
                if grad_hidden:
                    torch.mm(g, weight, out=gh[s:e])
                if grad_weight:
                    _addmm_into(gw_acc, g.t(), h)
    elif grad_hidden:
        gh.zero_()
    gw = gw_acc.to(weight.dtype) if grad_weight else weight.new_empty((0,))
    del gw_acc
    gb = gb_acc.to(bias.dtype) if grad_bias else (bias.new_empty((0,)) if bias is not None else hidden.new_empty((0,)))
    return loss_rows, gh, gw, gb


def linear_cross_entropy_fwd(hidden, weight, targets, bias, per_sample, ignore_index: int, reduction: str,
                             chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool):
    """The ``ugd_ops::linear_cross_entropy_fwd`` operator.

    Returns ``(loss, grad_hidden, grad_weight, grad_bias)``: the loss reduced as ``reduction`` says
    (``[N]`` for "none", else a scalar; fp32, fp64 for fp64 inputs) and the gradients of the
    reduced loss (of ``loss.sum()`` for "none") in the input dtype, or empty ``[0]`` tensors.
    """
    check_args(hidden, weight, targets, bias, per_sample, reduction, chunk_size)
    acc = acc_dtype(hidden.dtype)
    valid = targets != ignore_index
    _check_values(targets, per_sample, valid, weight.shape[0])
    w = row_weights(targets, per_sample, ignore_index, reduction, acc)
    loss_rows, gh, gw, gb = _chunked(hidden, weight, targets, bias, w, ignore_index, chunk_size, True, grad_hidden,
                                     grad_weight, grad_bias)
    loss = loss_rows if reduction == "none" else (loss_rows * w).sum()
    return loss, gh, gw, gb


def linear_cross_entropy_bwd(grad_rows, hidden, weight, targets, bias, ignore_index: int, chunk_size: int,
                             grad_hidden: bool, grad_weight: bool, grad_bias: bool):
    """The ``ugd_ops::linear_cross_entropy_bwd`` operator: the gradients of ``sum_i grad_rows[i] * loss_i``
    (ignored rows contribute nothing), recomputing the logits chunk by chunk. Used for reduction
    "none", whose row weights are only known in the backward."""
    check_args(hidden, weight, targets, bias, None, None, chunk_size)
    acc = acc_dtype(hidden.dtype)
    if grad_rows.shape != targets.shape:
        _checks._fail("grad_rows must be [N] with N = ", targets.shape[0], ", got shape ", list(grad_rows.shape))
    w = grad_rows.to(acc) * (targets != ignore_index).to(acc)
    _, gh, gw, gb = _chunked(hidden, weight, targets, bias, w, ignore_index, chunk_size, False, grad_hidden,
                             grad_weight, grad_bias)
    return gh, gw, gb


def linear_cross_entropy_eager(hidden, weight, targets, *, bias=None, ignore_index: int = -100,
                               reduction: str = "mean", per_sample=None, dtype: torch.dtype | None = None):
    """The same loss with the full ``[N, V]`` logits and ``F.cross_entropy`` (autograd through it): the
    plain-PyTorch peer of the benchmarks and the oracle of the tests (with ``dtype=torch.float64``).
    Computes in ``dtype`` (default: the input dtype, as eager code would)."""
    dtype = dtype or hidden.dtype
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    if per_sample is None:
        if reduction == "mean":
            # F.cross_entropy gives 0/0 = NaN when every row is ignored; ugd_ops gives 0.
            valid = (targets != ignore_index).sum().clamp_min(1)
            return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / valid
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    rows = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    w = row_weights(targets, per_sample, ignore_index, reduction, rows.dtype)
    return (rows * w).sum()
