"""Pure-PyTorch reference of every ugd_ops operator: the test oracle, and the backend that runs when
no kernel was compiled for a device.

It favours obviously-correct over fast: attention builds a dense mask per sequence (L x L, never
T x T across the batch) and computes in fp32 (fp64 for fp64 inputs).

Shapes: q ``[T, Hq, D]``, k and v ``[T, Hkv, D]``, cu_seqlens ``[B + 1]`` int32, kv_start and
kv_end ``[T]`` int32 (row i of sequence b reads keys ``[kv_start[i], kv_end[i])`` of b), lse
``[Hq, T]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from ._schemas import CPU_MAX_HEAD_DIM


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sequence_masks(cu_seqlens, kv_start, kv_end):
    """Yields (start, end, mask [L, L] bool) for every non-empty sequence."""
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        j = torch.arange(e - s, device=kv_start.device)
        yield s, e, (j >= kv_start[s:e, None]) & (j < kv_end[s:e, None])


def _scores(q, k, s, e, mask, scale, dtype):
    """Masked scores [Hq, L, L] with empty rows set to 0 (so their log-sum-exp stays finite)."""
    group = q.shape[1] // k.shape[1]
    qs = q[s:e].to(dtype).transpose(0, 1)
    ks = k[s:e].to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)
    scores = scale * (qs @ ks.transpose(1, 2))
    empty = ~mask.any(dim=1)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty[:, None], 0.0)
    return scores, empty


def partitioned_attention(q, k, v, cu_seqlens, kv_start, kv_end, *, softmax_scale=None, return_lse=False):
    """Differentiable dense-mask attention over a packed batch: the oracle for the kernels.

    Returns out ``[T, Hq, D]`` in q's dtype, and with ``return_lse`` also lse ``[Hq, T]`` (fp32, fp64
    for fp64 inputs; -inf for rows with an empty interval, whose output is 0).
    """
    _checks.check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, CPU_MAX_HEAD_DIM)
    _checks.check_layout_values(cu_seqlens, kv_start, kv_end, q.shape[0])
    return _attention(q, k, v, cu_seqlens, kv_start, kv_end, softmax_scale, return_lse)


def _attention(q, k, v, cu_seqlens, kv_start, kv_end, softmax_scale, return_lse):
    """partitioned_attention on checked arguments."""
    T, Hq, D = q.shape
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    dtype = _compute_dtype(q.dtype)
    group = Hq // k.shape[1]
    outs, lses = [], []  # sequences are contiguous and in order, so concatenation restores [T, ...]
    for s, e, mask in _sequence_masks(cu_seqlens, kv_start, kv_end):
        scores, empty = _scores(q, k, s, e, mask, scale, dtype)
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.where(mask, torch.exp(scores - lse[..., None]), 0.0)
        vs = v[s:e].to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        outs.append((p @ vs).transpose(0, 1))
        lses.append(lse.masked_fill(empty, float("-inf")))
    if not outs:
        out = q.new_zeros((T, Hq, D), dtype=dtype)
        lse = torch.full((Hq, T), float("-inf"), dtype=dtype, device=q.device)
    else:
        out, lse = torch.cat(outs, dim=0), torch.cat(lses, dim=1)
    out = out.to(q.dtype)
    lse = lse.to(_compute_dtype(q.dtype))
    return (out, lse) if return_lse else out


def partitioned_attention_fwd(q, k, v, cu_seqlens, kv_start, kv_end, max_seqlen, softmax_scale):
    """The ``ugd_ops::partitioned_attention_fwd`` operator on the reference backend."""
    _checks.check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, CPU_MAX_HEAD_DIM)
    _checks.check_max_seqlen(max_seqlen, _checks.check_layout_values(cu_seqlens, kv_start, kv_end, q.shape[0]))
    with torch.no_grad():
        out, lse = _attention(q, k, v, cu_seqlens, kv_start, kv_end, softmax_scale, True)
    return out.contiguous(), lse.contiguous()


def partitioned_attention_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, kv_start, kv_end, max_seqlen,
                              softmax_scale):
    """The ``ugd_ops::partitioned_attention_bwd`` operator: explicit gradients from the saved lse.

    P = exp(scale q.k - lse) on allowed pairs; dv = P^T dout; dS = P (dout.v - delta) with
    delta = rowsum(dout * out) - dlse; dq = scale dS k; dk = scale dS^T q.
    """
    _checks.check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, CPU_MAX_HEAD_DIM)
    _checks.check_max_seqlen(max_seqlen, _checks.check_layout_values(cu_seqlens, kv_start, kv_end, q.shape[0]))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    dtype = _compute_dtype(q.dtype)
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1).transpose(0, 1)  # [Hq, T]
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(dlse), dlse, 0).to(dtype)
    dq = torch.zeros((T, Hq, D), dtype=dtype, device=q.device)
    dk = torch.zeros((T, Hkv, D), dtype=dtype, device=q.device)
    dv = torch.zeros((T, Hkv, D), dtype=dtype, device=q.device)
    for s, e, mask in _sequence_masks(cu_seqlens, kv_start, kv_end):
        L = e - s
        scores, empty = _scores(q, k, s, e, mask, softmax_scale, dtype)
        lse_b = lse[:, s:e].to(dtype).masked_fill(empty, 0.0)
        p = torch.where(mask, torch.exp(scores - lse_b[..., None]), 0.0)  # [Hq, L, L]
        do = dout[s:e].to(dtype).transpose(0, 1)  # [Hq, L, D]
        qs = q[s:e].to(dtype).transpose(0, 1)
        ks = k[s:e].to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[s:e].to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        ds = p * (do @ vs.transpose(1, 2) - delta[:, s:e, None])
        dq[s:e] = (softmax_scale * ds @ ks).transpose(0, 1)
        dk[s:e] = (softmax_scale * ds.transpose(1, 2) @ qs).view(Hkv, group, L, D).sum(1).transpose(0, 1)
        dv[s:e] = (p.transpose(1, 2) @ do).view(Hkv, group, L, D).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def detached_kl(p_logits, q_logits, *, temperature=1.0, reduction="batchmean", detach=True):
    """KL(softmax(p / T) || softmax(q / T)) through ``F.kl_div``; q is detached unless ``detach=False``.

    ``F.kl_div(input, target)`` computes KL(target || exp(input)), so P is the *target*. Rows are
    the leading dimensions; reductions as in ``F.kl_div`` except ``"none"``, which gives one value
    per row. Computes in fp32 (fp64 for fp64 inputs). The loss is not multiplied by T^2.
    """
    _checks.check_kl_args(p_logits, q_logits, temperature)
    dtype = _compute_dtype(p_logits.dtype)
    log_p = F.log_softmax(p_logits.to(dtype) / temperature, dim=-1)
    q = q_logits.detach() if detach else q_logits
    log_q = F.log_softmax(q.to(dtype) / temperature, dim=-1)
    elementwise = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    rows = elementwise.sum(-1)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / p_logits.numel()
    if reduction == "batchmean":
        return rows.sum() / p_logits.shape[0]
    raise ValueError(f"ugd_ops: reduction must be 'none', 'sum', 'mean' or 'batchmean', got {reduction!r}")


def detached_kl_fwd(p_logits, q_logits, temperature, grad_p, grad_q):
    """The ``ugd_ops::detached_kl_fwd`` operator: per-row loss and the requested row gradients."""
    _checks.check_kl_args(p_logits, q_logits, temperature)
    dtype = _compute_dtype(p_logits.dtype)
    log_p = F.log_softmax(p_logits.to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(q_logits.to(dtype) / temperature, dim=-1)
    prob = log_p.exp()
    terms = torch.where(prob > 0, prob * (log_p - log_q), 0.0)
    loss = terms.sum(-1)
    empty = p_logits.new_empty((0,))
    gp = ((torch.where(prob > 0, prob * (log_p - log_q - loss[..., None]), 0.0) / temperature).to(p_logits.dtype)
          if grad_p else empty)
    gq = ((log_q.exp() - prob) / temperature).to(q_logits.dtype) if grad_q else q_logits.new_empty((0,))
    return loss, gp, gq


def row_intervals(spans: torch.Tensor, mask: str):
    """Span lengths ``[B, 4]`` (Lq, Ld, Lp, Lg) -> (cu_seqlens ``[B+1]``, kv_start ``[T]``, kv_end ``[T]``),
    the table of docs/spec.md section 3, with torch ops (any device)."""
    _checks.check_spans(spans, mask)
    s = spans.to(torch.int64)
    if (s < 0).any():
        b = int((s < 0).any(1).nonzero()[0, 0])
        raise ValueError(f"ugd_ops: span lengths must be >= 0, sample {b} has (Lq, Ld, Lp, Lg) = {tuple(s[b].tolist())}")
    if mask in ("ttm", "stm") and ((s[:, 0] < 1) | (s[:, 1] < 1)).any():
        b = int(((s[:, 0] < 1) | (s[:, 1] < 1)).nonzero()[0, 0])
        raise ValueError(f"ugd_ops: mask '{mask}' needs Lq >= 1 and Ld >= 1 (each span ends with its [CLS]); "
                         f"sample {b} has Lq = {int(s[b, 0])}, Ld = {int(s[b, 1])}")
    lengths = s.sum(1)
    cu = torch.zeros(s.shape[0] + 1, dtype=torch.int64, device=s.device)
    cu[1:] = torch.cumsum(lengths, 0)
    if int(cu[-1]) > 2**31 - 1:
        raise ValueError("ugd_ops: the packed batch exceeds 2^31 - 1 tokens")
    seq = torch.repeat_interleave(torch.arange(s.shape[0], device=s.device), lengths)
    i = torch.arange(int(cu[-1]), device=s.device) - cu[:-1][seq]  # row within its sequence
    Lq, Ld, A, L = s[seq, 0], s[seq, 1], s[seq, :3].sum(1), lengths[seq]
    lo = torch.zeros_like(i)
    hi = i + 1
    if mask == "bidirectional":
        hi = L
    elif mask in ("ttm", "stm"):
        hi = torch.where(i < A, A, hi)
        if mask == "ttm":
            in_q, in_d = i < Lq, (i >= Lq) & (i < Lq + Ld)
            hi = torch.where(in_q, Lq, torch.where(in_d, Lq + Ld, hi))
            lo = torch.where(in_d, Lq, lo)
    return cu.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32)


def dense_mask(cu_seqlens, kv_start, kv_end):
    """The intervals as a bool ``[T, T]`` mask (absolute key index)."""
    T = kv_start.shape[0]
    _checks._index(cu_seqlens, "cu_seqlens", cu_seqlens)
    _checks._index(kv_start, "kv_start", cu_seqlens)
    _checks._index(kv_end, "kv_end", cu_seqlens)
    if kv_end.shape[0] != T:
        raise ValueError(f"ugd_ops: kv_start and kv_end must have the same length, got {T} and {kv_end.shape[0]}")
    _checks.check_layout_values(cu_seqlens, kv_start, kv_end, T)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    start = torch.repeat_interleave(cu_seqlens[:-1].to(torch.int64), lengths)
    j = torch.arange(T, device=kv_start.device)
    return (j >= (start + kv_start)[:, None]) & (j < (start + kv_end)[:, None])
