"""Public operators: Python signatures, fake (meta) kernels and autograd of ``torch.ops.ugd_ops``.

The heavy lifting is in the kernels that ``_backend`` registered (compiled C++/CUDA, or the
pure-PyTorch reference); this layer is what ``torch.compile``, ``torch.library.opcheck`` and
autograd see, and it is the same for every backend.
"""

from __future__ import annotations

import json
from typing import Sequence

import torch

from . import _checks, chunked_ce, cuda_attention, flex, layout_memo
from ._schemas import CPU_MAX_HEAD_DIM

_ops = torch.ops.ugd_ops
_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# autocast: the public functions cast their inputs as PyTorch's own ops do under torch.autocast
# (the dispatcher's Autocast key would see the operators only after the Python wrappers below, and
# register_autocast casts to one fixed dtype; casting here follows the autocast dtype in force).
# ---------------------------------------------------------------------------------------------

_AUTOCASTABLE = (torch.float32, torch.bfloat16, torch.float16)  # autocast leaves fp64 alone, as torch does


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast asks for on ``t``'s device, or None when autocast is off there."""
    device = t.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return None
        return torch.get_autocast_dtype(device)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None


def _cast(dtype: torch.dtype | None, *tensors):
    """Each floating tensor autocast would cast, in ``dtype`` (differentiable, as autocast's own cast)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCASTABLE and t.dtype != dtype else t
                 for t in tensors)


# ---------------------------------------------------------------------------------------------
# partitioned attention
# ---------------------------------------------------------------------------------------------


def partitioned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    *,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Attention over a packed batch where every query row reads one key interval (docs/spec.md section 3).

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA). Same float dtype and
            device; only the last dimension must be contiguous.
        cu_seqlens: int32 ``[B + 1]``, sequence b holds tokens ``[cu_seqlens[b], cu_seqlens[b+1])``.
        kv_start, kv_end: int32 ``[T]``; row i of sequence b attends to keys
            ``[kv_start[i], kv_end[i])`` of b (relative to the sequence start). An empty interval
            gives an output of 0 and an lse of -inf.
        max_seqlen: the longest sequence, if known (spares the GPU kernels a reduction).
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``[Hq, T]`` (fp32; fp64 for fp64 inputs),
            which is differentiable too.

    Returns:
        out ``[T, Hq, D]`` in q's dtype, or ``(out, lse)``.
    """
    # Under autocast q, k and v run in the autocast dtype, as scaled_dot_product_attention's do (it is
    # on autocast's lower-precision list): RoPE leaves q and k in fp32 while v comes from a bf16 matmul.
    q, k, v = _cast(autocast_dtype(q), q, k, v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0  # D = 0 is rejected by the kernel
    if q.is_cuda and _flex_serves(q, k, v):
        _checks.check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, CPU_MAX_HEAD_DIM)
        layout_memo.check_layout(cu_seqlens, kv_start, kv_end, q.shape[0], max_seqlen)
        res = flex.try_partitioned_attention(q, k, v, cu_seqlens, kv_start, kv_end, float(softmax_scale))
        if res is not None:
            return res if return_lse else res[0]
    out, lse = _ops.partitioned_attention_fwd(q, k, v, cu_seqlens, kv_start, kv_end, max_seqlen, float(softmax_scale))
    return (out, lse) if return_lse else out


def _flex_serves(q, k, v) -> bool:
    """Route a CUDA call to FlexAttention: no compiled CUDA attention kernel serves it, flex does.

    Otherwise the operator runs: its CUDA kernel (registered in ``_backend``) is the compiled kernel
    when ``cuda_attention.serves`` the call, the pure-PyTorch reference when nothing else does.
    """
    return not cuda_attention.serves(q, k, v) and flex.serves(q, k, v)


def attention_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Which implementation ``partitioned_attention`` runs for these inputs: ``"cpu"`` (the compiled C++
    kernel), ``"cuda-kernel"``, ``"flex"`` or ``"reference"`` (after autocast's cast, if any)."""
    q, k, v = _cast(autocast_dtype(q), q, k, v)
    if not q.is_cuda:
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("ugd_ops::partitioned_attention_fwd", "CPU")
        from . import _backend

        return "cpu" if _backend.compiled and has_cpu else "reference"
    if cuda_attention.serves(q, k, v):
        return "cuda-kernel"
    if flex.serves(q, k, v):
        return "flex"
    return "reference"


@torch.library.register_fake("ugd_ops::partitioned_attention_fwd")
def _attention_fwd_fake(q, k, v, cu_seqlens, kv_start, kv_end, max_seqlen, softmax_scale):
    _checks.check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, CPU_MAX_HEAD_DIM)
    T, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((Hq, T), dtype=_acc_dtype(q.dtype))


@torch.library.register_fake("ugd_ops::partitioned_attention_bwd")
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens, kv_start, kv_end, max_seqlen, softmax_scale):
    _checks.check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, CPU_MAX_HEAD_DIM)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, kv_start, kv_end, max_seqlen, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, kv_start, kv_end)
    ctx.max_seqlen = max_seqlen
    ctx.softmax_scale = softmax_scale
    # An unused output (usually lse) then arrives as None instead of a tensor of zeros.
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, kv_start, kv_end = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.shape[-1] > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = _ops.partitioned_attention_bwd(
        dout, q, k, v, out, lse, dlse, cu_seqlens, kv_start, kv_end, ctx.max_seqlen, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(
    "ugd_ops::partitioned_attention_fwd", _attention_backward, setup_context=_attention_setup_context
)


# ---------------------------------------------------------------------------------------------
# detached KL
# ---------------------------------------------------------------------------------------------


def detached_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    detach: bool = True,
) -> torch.Tensor:
    """KL(softmax(p_logits / T) || softmax(q_logits / T)) over the last dimension (docs/spec.md section 5).

    P, the trained (two-tower) side, is the first argument; Q, the teacher, gets no gradient unless
    ``detach=False``. The loss is *not* multiplied by T^2 (scale it yourself for Hinton-style
    distillation).

    Args:
        p_logits, q_logits: ``[N, C]`` (or ``[..., C]``), same dtype and device.
        reduction: ``"none"`` (one value per row, shape ``[...]``), ``"sum"``, ``"mean"`` (over all
            N*C elements, as ``F.kl_div``), ``"batchmean"`` (sum / N, as ``F.kl_div``).

    Returns:
        fp32 loss (fp64 for fp64 inputs).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"ugd_ops: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    temperature = float(temperature)
    grad_on = torch.is_grad_enabled()
    want_p = grad_on and p_logits.requires_grad
    want_q = grad_on and not detach and q_logits.requires_grad
    if autocast_dtype(p_logits) is not None and p_logits.dtype != q_logits.dtype:
        # Under autocast mixed logits (a bf16 head beside an fp32 one) meet in the wider dtype, as
        # torch's promoting ops do; the kernel accumulates in fp32 whatever the inputs, so a blanket
        # cast to fp32 (F.kl_div's autocast policy) would only cost memory.
        wide = torch.promote_types(p_logits.dtype, q_logits.dtype)
        p_logits, q_logits = p_logits.to(wide), q_logits.to(wide)
    q_in = q_logits.detach() if detach else q_logits
    rows, _, _ = _ops.detached_kl_fwd(p_logits, q_in, temperature, want_p, want_q)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (p_logits.numel() if reduction == "mean" else p_logits.shape[0])


@torch.library.register_fake("ugd_ops::detached_kl_fwd")
def _kl_fake(p_logits, q_logits, temperature, grad_p, grad_q):
    _checks.check_kl_args(p_logits, q_logits, temperature)
    loss = p_logits.new_empty(p_logits.shape[:-1], dtype=_acc_dtype(p_logits.dtype))
    gp = p_logits.new_empty(p_logits.shape if grad_p else (0,))
    gq = q_logits.new_empty(q_logits.shape if grad_q else (0,))
    return loss, gp, gq


def _kl_setup_context(ctx, inputs, output):
    _, gp, gq = output
    ctx.save_for_backward(gp, gq)
    ctx.mark_non_differentiable(gp, gq)


def _kl_backward(ctx, g_loss, _gp, _gq):
    gp, gq = ctx.saved_tensors
    scale = g_loss.unsqueeze(-1)
    dp = (gp.to(scale.dtype) * scale).to(gp.dtype) if ctx.needs_input_grad[0] and gp.numel() else None
    dq = (gq.to(scale.dtype) * scale).to(gq.dtype) if ctx.needs_input_grad[1] and gq.numel() else None
    return dp, dq, None, None, None


torch.library.register_autograd("ugd_ops::detached_kl_fwd", _kl_backward, setup_context=_kl_setup_context)


# ---------------------------------------------------------------------------------------------
# linear cross-entropy (chunked; kernels in chunked_ce.py)
# ---------------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    per_sample: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` without the whole logits.

    The rows are processed ``chunk_size`` at a time, so only a ``[chunk_size, V]`` block of logits
    exists at once (V = 151,936 for Qwen2.5). When gradients are needed, those of hidden, weight and
    bias are computed in the same sweep and the backward only scales them by the incoming gradient
    (for ``reduction="none"`` the backward recomputes the logits instead). See docs/losses.md.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``), float32 / float64 / bfloat16 / float16.
        weight: ``[V, H]``, the LM head, same dtype and device.
        targets: int64 ``[N]`` (or ``[...]``), in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        ignore_index: rows with this target add nothing (loss 0 under ``"none"``).
        reduction: ``"none"`` (per row), ``"sum"``, ``"mean"`` (over the non-ignored rows, as
            ``F.cross_entropy``; 0, not NaN, when every row is ignored).
        per_sample: optional int64 ``[N]`` (or ``[...]``) sample id of each row, in ``[0, N)`` for the
            non-ignored rows: the loss is then the mean over each sample's non-ignored rows, averaged
            (``"mean"``) or summed (``"sum"``) over the samples that have one (docs/spec.md section 5, paper eq. 3).
        chunk_size: rows per chunk; default ``chunked_ce.default_chunk_size(V)`` (512 for V = 151,936).

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or ``[N]`` (``[...]``) for ``"none"``.
    """
    if reduction not in chunked_ce.REDUCTIONS:
        raise ValueError(f"ugd_ops: reduction must be one of {chunked_ce.REDUCTIONS}, got {reduction!r}")
    # Under autocast the matmul runs in the autocast dtype, as F.linear's would; the loss is fp32 anyway.
    hidden, weight, bias = _cast(autocast_dtype(hidden), hidden, weight, bias)
    lead = None
    if hidden.dim() > 2:
        lead = hidden.shape[:-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = targets.reshape(-1)
        if per_sample is not None:
            per_sample = per_sample.reshape(-1)
    chunk = chunked_ce.default_chunk_size(weight.shape[0]) if chunk_size is None else int(chunk_size)
    # The gradients are computed in the forward except for "none", whose backward recomputes them.
    precompute = torch.is_grad_enabled() and reduction != "none"
    loss, _, _, _ = _ops.linear_cross_entropy_fwd(
        hidden, weight, targets, bias, per_sample, int(ignore_index), reduction, chunk,
        precompute and hidden.requires_grad, precompute and weight.requires_grad,
        precompute and bias is not None and bias.requires_grad,
    )
    if lead is not None and reduction == "none":
        loss = loss.reshape(lead)
    return loss


@torch.library.register_fake("ugd_ops::linear_cross_entropy_fwd")
def _lce_fwd_fake(hidden, weight, targets, bias, per_sample, ignore_index, reduction, chunk_size, grad_hidden,
                  grad_weight, grad_bias):
    chunked_ce.check_args(hidden, weight, targets, bias, per_sample, reduction, chunk_size)
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=_acc_dtype(hidden.dtype))
    gh = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    gw = weight.new_empty(weight.shape if grad_weight else (0,))
    gb = (bias.new_empty(bias.shape if grad_bias else (0,)) if bias is not None else hidden.new_empty((0,)))
    return loss, gh, gw, gb


@torch.library.register_fake("ugd_ops::linear_cross_entropy_bwd")
def _lce_bwd_fake(grad_rows, hidden, weight, targets, bias, ignore_index, chunk_size, grad_hidden, grad_weight,
                  grad_bias):
    chunked_ce.check_args(hidden, weight, targets, bias, None, None, chunk_size)
    gh = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    gw = weight.new_empty(weight.shape if grad_weight else (0,))
    gb = (bias.new_empty(bias.shape if grad_bias else (0,)) if bias is not None else hidden.new_empty((0,)))
    return gh, gw, gb


def _lce_setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, per_sample, ignore_index, reduction, chunk_size, f_h, f_w, f_b = inputs
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    # hidden / weight / bias are kept for the recomputing backward ("none", or a gradient the forward
    # was not asked for); they are alive anyway in a training step, so this costs no memory of note.
    ctx.save_for_backward(hidden, weight, targets, bias, per_sample, gh, gw, gb)
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction
    ctx.chunk_size = chunk_size
    ctx.precomputed = (f_h, f_w, f_b and bias is not None)


def _scale(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grad * g`` for a stored gradient and a 0-dim incoming gradient, in the stored dtype."""
    if grad.dtype == g.dtype or grad.numel() > (1 << 20):
        return grad * g.to(grad.dtype)  # large (grad_weight): no fp32 copy, g rounded to grad's dtype
    return (grad.to(g.dtype) * g).to(grad.dtype)


def _lce_backward(ctx, g_loss, _gh, _gw, _gb):
    hidden, weight, targets, bias, per_sample, gh, gw, gb = ctx.saved_tensors
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    needs = (need_h, need_w, need_b)
    if ctx.reduction != "none" and all(have or not need for have, need in zip(ctx.precomputed, needs)):
        dh = _scale(gh, g_loss) if need_h else None
        dw = _scale(gw, g_loss) if need_w else None
        db = _scale(gb, g_loss) if need_b else None
    else:
        acc = _acc_dtype(hidden.dtype)
        if ctx.reduction == "none":
            rows = g_loss.to(acc)
        else:
            rows = chunked_ce.row_weights(targets, per_sample, ctx.ignore_index, ctx.reduction, acc) * g_loss.to(acc)
        dh, dw, db = _ops.linear_cross_entropy_bwd(rows, hidden, weight, targets, bias, ctx.ignore_index,
                                                   ctx.chunk_size, need_h, need_w, need_b and bias is not None)
        dh, dw, db = (dh if need_h else None), (dw if need_w else None), (db if need_b else None)
    return dh, dw, None, db, None, None, None, None, None, None, None


torch.library.register_autograd("ugd_ops::linear_cross_entropy_fwd", _lce_backward, setup_context=_lce_setup_context)


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------


def row_intervals(spans: torch.Tensor | Sequence[Sequence[int]], mask: str):
    """Span lengths -> the packed layout of docs/spec.md section 3.

    Args:
        spans: int32 ``[B, 4]``: (Lq, Ld, Lp, Lg) per sample (a nested list is converted).
        mask: ``"ttm"``, ``"stm"``, ``"causal"`` or ``"bidirectional"``.

    Returns:
        ``(cu_seqlens [B + 1], kv_start [T], kv_end [T])``, int32, on spans' device.
    """
    if not isinstance(spans, torch.Tensor):
        spans = torch.tensor(spans, dtype=torch.int32).reshape(-1, 4)
    return _ops.row_intervals(spans, mask)


@torch.library.register_fake("ugd_ops::row_intervals")
def _row_intervals_fake(spans, mask):
    _checks.check_spans(spans, mask)
    T = torch.library.get_ctx().new_dynamic_size()
    B = spans.shape[0]
    return spans.new_empty((B + 1,)), spans.new_empty((T,)), spans.new_empty((T,))


def dense_mask(cu_seqlens: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor) -> torch.Tensor:
    """The layout as a bool ``[T, T]`` mask (``mask[i, j]``: row i may read absolute key j).

    For references and for peers that take dense masks; the kernels never build it.
    """
    return _ops.dense_mask(cu_seqlens, kv_start, kv_end)


@torch.library.register_fake("ugd_ops::dense_mask")
def _dense_mask_fake(cu_seqlens, kv_start, kv_end):
    T = kv_start.shape[0]
    return kv_start.new_empty((T, T), dtype=torch.bool)


def build_info() -> dict:
    """What the loaded library was built with (see ``python -m ugd_ops.info``)."""
    return json.loads(_ops.build_info())
