"""Test oracles written straight from docs/spec.md section 3, independent of ugd_ops' own code paths."""

from __future__ import annotations

import torch


def intervals_from_table(spans, paradigm):
    """Per-row loop over the table of docs/spec.md section 3. Returns python lists (cu, kv_start, kv_end)."""
    cu, ks, ke = [0], [], []
    for Lq, Ld, Lp, Lg in spans.tolist():
        A, L = Lq + Ld + Lp, Lq + Ld + Lp + Lg
        for i in range(L):
            if paradigm == "causal":
                iv = (0, i + 1)
            elif paradigm == "bidirectional":
                iv = (0, L)
            elif i >= A:  # G rows
                iv = (0, i + 1)
            elif paradigm == "stm":
                iv = (0, A)
            elif i < Lq:
                iv = (0, Lq)
            elif i < Lq + Ld:
                iv = (Lq, Lq + Ld)
            else:
                iv = (0, A)
            ks.append(iv[0])
            ke.append(iv[1])
        cu.append(cu[-1] + L)
    return cu, ks, ke


def mask_from_intervals(cu, ks, ke):
    T = len(ks)
    m = torch.zeros((T, T), dtype=torch.bool)
    for b in range(len(cu) - 1):
        for i in range(cu[b], cu[b + 1]):
            m[i, cu[b] + ks[i]: cu[b] + ke[i]] = True
    return m


def attention_dense(q, k, v, mask, scale):
    """Float64 dense attention over the whole packed batch with a [T, T] mask: out [T, Hq, D], lse [Hq, T]."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.double().transpose(0, 1) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
    s = scale * qd @ kd.transpose(1, 2)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
    return (p @ vd).transpose(0, 1), lse



def torch_attention_grads_in_dtype(q, k, v, mask, scale, g_out, g_lse=None):
    """PyTorch's own gradients of sum(out * g_out) + sum(lse * g_lse) in q's dtype, on q's device: dense
    masked attention through autograd, the baseline of the 2x rule (tests/numerics.py) for bf16 / fp16 on
    the CPU and the GPU. ``g_lse`` None: no lse term; its NaN (empty rows' upstream gradient) count as 0.
    The masked_fill of the scores zeroes the NaN that softmax / logsumexp give rows without keys."""
    group = q.shape[1] // k.shape[1]
    qt, kt, vt = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    kk, vv = (x.transpose(0, 1).repeat_interleave(group, 0) for x in (kt, vt))
    s = scale * qt.transpose(0, 1) @ kk.transpose(1, 2)
    s = s.masked_fill(~mask.to(q.device), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    loss = ((p @ vv).transpose(0, 1) * g_out.to(device=q.device, dtype=q.dtype)).sum()
    if g_lse is not None:
        lse = torch.logsumexp(s, -1)
        dl = torch.nan_to_num(g_lse.to(device=q.device, dtype=torch.float32), 0, 0, 0).to(lse.dtype)
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * dl).sum()
    return torch.autograd.grad(loss, (qt, kt, vt))


def kl_oracle(p, q, temperature, reduction):
    """KL(softmax(p/T) || softmax(q/T)) in float64 with F.kl_div (P goes in the target slot)."""
    import torch.nn.functional as F

    log_p = F.log_softmax(p.double() / temperature, -1)
    log_q = F.log_softmax(q.double() / temperature, -1)
    per_elem = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    if reduction == "none":
        return per_elem.sum(-1)
    if reduction == "mean":  # F.kl_div's "mean" (over all elements), without its deprecation warning
        return per_elem.sum() / per_elem.numel()
    return F.kl_div(log_q, log_p, reduction=reduction, log_target=True)
