"""Argument checks of the pure-PyTorch backend and of the fake (meta) kernels.

The messages equal those of csrc/common/checks.h so that a user sees the same error from every
backend; tests/ops/test_errors.py runs the same cases against both.
"""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fail(*parts) -> None:
    raise ValueError("ugd_ops: " + "".join(str(p) for p in parts))


def _index(t: torch.Tensor, name: str, ref: torch.Tensor) -> None:
    if t.dtype != torch.int32:
        _fail(name, " must be int32, got ", t.dtype)
    if t.dim() != 1:
        _fail(name, " must be 1-D, got shape ", list(t.shape))
    if t.device != ref.device:
        _fail(name, " must be on the same device as q (", ref.device, "), got ", t.device)


def _qkv(t: torch.Tensor, name: str, q: torch.Tensor) -> None:
    if t.dim() != 3:
        _fail(name, " must be 3-D [T, H, D], got shape ", list(t.shape))
    if t.dtype != q.dtype:
        _fail(name, " must have the dtype of q (", q.dtype, "), got ", t.dtype)
    if t.device != q.device:
        _fail(name, " must be on the same device as q (", q.device, "), got ", t.device)
    if t.shape[2] > 1 and t.stride(2) != 1:
        _fail(name, " must be contiguous in its last (head) dimension, got strides ", list(t.stride()),
              "; call .contiguous() or pass a view whose last stride is 1")


def check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, max_head_dim: int) -> None:
    """Shape, dtype, device and stride checks (no data is read: safe on fake tensors)."""
    if q.dtype not in _FLOATS:
        _fail("q must be float32, float64, bfloat16 or float16, got ", q.dtype)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _qkv(t, name, q)
    T, Hq, D = q.shape
    if k.shape[0] != T or v.shape[0] != T:
        _fail("k and v must have T = ", T, " tokens like q, got ", k.shape[0], " and ", v.shape[0])
    if k.shape[1] != v.shape[1]:
        _fail("k and v must have the same number of heads, got ", k.shape[1], " and ", v.shape[1])
    Hkv = k.shape[1]
    if not (Hkv >= 1 and Hq >= 1 and Hq % Hkv == 0):
        _fail("the number of query heads (", Hq, ") must be a positive multiple of the number of key/value heads (",
              Hkv, ")")
    if k.shape[2] != D or v.shape[2] != D:
        _fail("q, k and v must share the head dim, got ", D, ", ", k.shape[2], ", ", v.shape[2])
    if not 1 <= D <= max_head_dim:
        _fail("unsupported head dim ", D, " (this kernel takes 1 to ", max_head_dim, ")")
    _index(cu_seqlens, "cu_seqlens", q)
    _index(kv_start, "kv_start", q)
    _index(kv_end, "kv_end", q)
    if cu_seqlens.shape[0] < 1:
        _fail("cu_seqlens must have B + 1 >= 1 entries")
    if kv_start.shape[0] != T or kv_end.shape[0] != T:
        _fail("kv_start and kv_end must have T = ", T, " entries, got ", kv_start.shape[0], " and ", kv_end.shape[0])


def check_layout_values(cu_seqlens, kv_start, kv_end, T: int) -> int:
    """Value checks of a layout (reads the data; syncs on CUDA). Returns the longest sequence."""
    cu = cu_seqlens.tolist()
    ks = kv_start.tolist()
    ke = kv_end.tolist()
    B = len(cu) - 1
    if cu[0] != 0:
        _fail("cu_seqlens must start at 0, got ", cu[0])
    if cu[B] != T:
        _fail("cu_seqlens must end at T = ", T, " (the number of tokens), got ", cu[B])
    max_len = 0
    for b in range(B):
        if cu[b + 1] < cu[b]:
            _fail("cu_seqlens must be non-decreasing, but cu_seqlens[", b + 1, "] = ", cu[b + 1], " < cu_seqlens[", b,
                  "] = ", cu[b])
        L = cu[b + 1] - cu[b]
        max_len = max(max_len, L)
        for i in range(cu[b], cu[b + 1]):
            if ks[i] > ke[i]:
                _fail("kv_start[", i, "] = ", ks[i], " > kv_end[", i, "] = ", ke[i], " (start > end)")
            if ks[i] < 0 or ke[i] > L:
                _fail("the interval [kv_start, kv_end) = [", ks[i], ", ", ke[i], ") of row ", i,
                      " lies outside its sequence ", b, " of length ", L, " (intervals are relative to the sequence start)")
    return max_len


def check_max_seqlen(max_seqlen, actual: int) -> None:
    if max_seqlen is not None and max_seqlen < actual:
        _fail("max_seqlen = ", max_seqlen, " is smaller than the longest sequence in cu_seqlens (", actual, ")")


def check_kl_args(p, q, temperature: float) -> None:
    if p.dtype not in _FLOATS:
        _fail("p_logits must be float32, float64, bfloat16 or float16, got ", p.dtype)
    if q.dtype != p.dtype:
        _fail("q_logits must have the dtype of p_logits (", p.dtype, "), got ", q.dtype)
    if q.device != p.device:
        _fail("q_logits must be on the device of p_logits (", p.device, "), got ", q.device)
    if p.dim() < 2:
        _fail("p_logits must be [N, C] (or [..., C]), got shape ", list(p.shape))
    if q.shape != p.shape:
        _fail("q_logits must have the shape of p_logits ", list(p.shape), ", got ", list(q.shape))
    if not (temperature > 0 and temperature != float("inf")):
        _fail("temperature must be a positive number, got ", temperature)


def check_spans(spans, mask: str) -> None:
    from ._schemas import MASKS

    if mask not in MASKS:
        _fail("unknown mask '", mask, "'; expected one of 'ttm', 'stm', 'causal', 'bidirectional'")
    if spans.dtype != torch.int32:
        _fail("spans must be int32, got ", spans.dtype)
    if spans.dim() != 2 or spans.shape[1] != 4:
        _fail("spans must be [B, 4] span lengths (Lq, Ld, Lp, Lg), got shape ", list(spans.shape))
