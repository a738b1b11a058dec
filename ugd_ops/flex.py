"""The FlexAttention path of ``partitioned_attention``: the fast CUDA path while no compiled kernel serves.

``torch.nn.attention.flex_attention`` (compiled: Triton kernels on CUDA) runs attention under a
``BlockMask``: for every block of 128 query rows, the list of 128-key blocks that are *full* (every
row reads every key: no mask evaluated) and *partial* (``mask_mod`` decides per element). Blocks in
neither list are skipped. The block mask is built here on the device from ``cu_seqlens`` /
``kv_start`` / ``kv_end`` alone:

* row i reads the absolute keys ``[lo_i, hi_i)`` = sequence start + ``[kv_start[i], kv_end[i])``;
* a query block touches the key blocks that overlap the hull ``[min lo, max hi)`` of its rows;
* a key block is full when it lies inside ``[max lo, min hi)`` (inside every row's interval).

That is O(T) + O((T/128)^2) work, no host synchronisation and no T x T tensor. The block mask is
built once per batch layout and reused by every layer (a small cache keyed on the identity and
version counters of the three layout tensors, which the transformers integration hands every
layer unchanged). Forward and backward run flex's own kernels and autograd; lse comes back in
natural log, as ``partitioned_attention`` promises (flex returns natural-log lse), and its gradient
is honoured by flex's backward.

Building the mask reads no layout values on the host. ``ugd_ops.partitioned_attention`` checks the
values once per layout before it comes here (``layout_memo.check_layout``: one sync per batch); with
that check switched off, a malformed layout gives wrong numbers, never an out-of-bounds access
(``mask_mod`` only indexes by query row, padded to whole blocks).

Routing (``ugd_ops.ops.partitioned_attention``): a CUDA call goes to the compiled CUDA kernel when
``ugd_ops.cuda_attention.serves`` it, else here when :func:`unserved_reason` is None, else to the
reference. ``UGD_FLEX_ATTENTION=0`` switches this path off.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .layout_memo import LayoutMemo

ENV = "UGD_FLEX_ATTENTION"
BLOCK = 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Head dims flex's Triton templates take without padding questions; others go to the reference.
HEAD_DIMS = (16, 32, 64, 128, 256)

try:  # torch >= 2.5
    from torch.nn.attention import flex_attention as _flex_module
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    _IMPORT_ERROR = None if hasattr(BlockMask, "from_kv_blocks") else "torch's BlockMask has no from_kv_blocks"
except ImportError as e:  # torch without flex_attention: the reference serves
    _flex_module = BlockMask = flex_attention = None
    _IMPORT_ERROR = f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({e})"

try:  # torch >= 2.9 returns auxiliary outputs through AuxRequest; return_lse is its older spelling
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:
    AuxRequest = None

_compiled_fn = None
# (dtype, head dim, grouped) -> why flex failed for it once; such calls go to the reference afterwards.
_failed: dict = {}
_masks = LayoutMemo(size=4)


def available() -> bool:
    """torch has flex_attention with ``BlockMask.from_kv_blocks``."""
    return _IMPORT_ERROR is None


def switched_off() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no")


def case_reason(dtype: torch.dtype, head_dim: int, grouped: bool = False) -> str | None:
    """None when this path serves a CUDA call of this dtype (q, k, v alike) and head dim, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if switched_off():
        return f"switched off ({ENV}=0)"
    if dtype not in DTYPES:
        return f"dtype {dtype} (flex serves fp32, bf16 and fp16)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} (the flex path serves {HEAD_DIMS})"
    if (dtype, head_dim, grouped) in _failed:
        return f"flex failed on this case before: {_failed[(dtype, head_dim, grouped)]}"
    return None


def unserved_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when this path serves a CUDA call with these inputs, else why not (for ugd_ops.info)."""
    if not q.is_cuda:
        return "not a CUDA tensor (flex's CPU kernels have no backward, and no lse when compiled)"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "not [T, H, D] tensors"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (q, k and v must be alike)"
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return "q, k and v head dims differ"
    if q.shape[0] == 0:
        return "no tokens"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return "heads not grouped evenly"
    return case_reason(q.dtype, q.shape[-1], q.shape[1] != k.shape[1])


def serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return unserved_reason(q, k, v) is None


# ---------------------------------------------------------------------------------------------
# block mask
# ---------------------------------------------------------------------------------------------


def row_bounds(cu_seqlens: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor):
    """Absolute key bounds ``(lo, hi)`` (int32 ``[T]``) of every row: row i reads keys ``[lo_i, hi_i)``."""
    T = kv_start.shape[0]
    rows = torch.arange(T, device=kv_start.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens, rows, right=True) - 1
    seq = seq.clamp_(0, max(cu_seqlens.shape[0] - 2, 0))  # only a malformed layout needs the clamp
    base = cu_seqlens[seq].to(torch.int32)
    return base + kv_start.to(torch.int32), base + kv_end.to(torch.int32)


def block_tables(lo: torch.Tensor, hi: torch.Tensor, block: int = BLOCK):
    """``(partial, full)``: bool ``[n, n]`` (n = ceil(T / block)) tables of the key blocks each query block
    must compute with ``mask_mod`` (partial) or without (full); the rest is skipped.

    Per query block: the hull ``[min lo, max hi)`` of its non-empty rows bounds what it reads; a key
    block inside ``[max lo, min hi)`` is read whole by every row (an empty row rules full blocks out).
    """
    T = lo.shape[0]
    n = (T + block - 1) // block
    pad = n * block - T
    big = torch.iinfo(torch.int32).max // 2
    nonempty = hi > lo
    hull_lo = F.pad(torch.where(nonempty, lo, big), (0, pad), value=big).view(n, block).amin(1)
    hull_hi = F.pad(torch.where(nonempty, hi, -big), (0, pad), value=-big).view(n, block).amax(1)
    # padding rows beyond T do not exist: neutral for max (lo) and min (hi)
    in_lo = F.pad(torch.where(nonempty, lo, big), (0, pad), value=-big).view(n, block).amax(1)
    in_hi = F.pad(torch.where(nonempty, hi, -big), (0, pad), value=big).view(n, block).amin(1)
    start = torch.arange(n, device=lo.device, dtype=torch.int32) * block
    end = start + block
    touched = (start[None, :] < hull_hi[:, None]) & (end[None, :] > hull_lo[:, None])
    full = (start[None, :] >= in_lo[:, None]) & (end[None, :] <= in_hi[:, None])
    return touched & ~full, full


def _indices(table: torch.Tensor):
    """Counts ``[1, 1, n]`` and ascending block indices first ``[1, 1, n, n]`` of a bool table, as BlockMask wants."""
    counts = table.sum(-1, dtype=torch.int32)
    order = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], order[None, None].contiguous()


def build_block_mask(cu_seqlens: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, block: int = BLOCK):
    """The flex ``BlockMask`` of a packed layout, built on the layout's device without a host sync."""
    if BlockMask is None:
        raise RuntimeError(f"ugd_ops.flex: {_IMPORT_ERROR}")
    T = kv_start.shape[0]
    lo, hi = row_bounds(cu_seqlens, kv_start, kv_end)
    partial, full = block_tables(lo, hi, block)
    n = partial.shape[0]
    # mask_mod is evaluated for query rows up to n * block: pad with empty rows so every index is valid.
    lo_p = F.pad(lo, (0, n * block - T))
    hi_p = F.pad(hi, (0, n * block - T))

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo_p[q_idx]) & (kv_idx < hi_p[q_idx])

    kv_num, kv_idx = _indices(partial)
    full_num, full_idx = _indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def block_mask(cu_seqlens: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor) -> "BlockMask":
    """:func:`build_block_mask`, built once per batch layout (``layout_memo``): every layer of a forward
    (and the backward) passes the same three tensors."""
    return _masks.get((cu_seqlens, kv_start, kv_end), lambda: build_block_mask(cu_seqlens, kv_start, kv_end))


def clear_cache() -> None:
    _masks.clear()


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


def _compiled():
    """flex_attention under torch.compile (eager flex materialises the whole score matrix)."""
    global _compiled_fn
    if _compiled_fn is None:
        _compiled_fn = torch.compile(flex_attention, dynamic=None)
    return _compiled_fn


def _run(fn, q4, k4, v4, mask, scale, gqa):
    if AuxRequest is not None:
        out, aux = fn(q4, k4, v4, block_mask=mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return fn(q4, k4, v4, block_mask=mask, scale=scale, enable_gqa=gqa, return_lse=True)


def partitioned_attention(q, k, v, cu_seqlens, kv_start, kv_end, softmax_scale: float, *, compiled: bool = True):
    """``(out [T, Hq, D], lse [Hq, T] fp32)`` of partitioned attention through flex_attention.

    Differentiable in q, k, v (and through lse). ``compiled=False`` runs flex eagerly (its dense math
    implementation, for tests on the CPU: it ignores the block lists and applies ``mask_mod`` everywhere).
    """
    mask = block_mask(cu_seqlens, kv_start, kv_end)
    fn = flex_attention if (not compiled or torch.compiler.is_compiling()) else _compiled()
    # [T, H, D] -> [1, H, T, D] views; flex takes strided inputs whose last dimension is contiguous
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out, lse = _run(fn, q4, k4, v4, mask, float(softmax_scale), q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).contiguous(), lse[0]


def try_partitioned_attention(q, k, v, cu_seqlens, kv_start, kv_end, softmax_scale: float):
    """:func:`partitioned_attention`, or None (with one warning) when flex fails on this case, e.g. a
    Triton compile error for an unusual shape; later calls of the same case skip flex."""
    try:
        return partitioned_attention(q, k, v, cu_seqlens, kv_start, kv_end, softmax_scale)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (any compile/lowering failure: fall back, say so once)
        key = (q.dtype, q.shape[-1], q.shape[1] != k.shape[1])
        _failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        warnings.warn(
            f"ugd_ops: the FlexAttention path failed for dtype {q.dtype}, head dim {q.shape[-1]} "
            f"({_failed[key]}); running the slow pure-PyTorch reference for such calls instead. "
            f"Set {ENV}=0 to skip flex altogether.", RuntimeWarning, stacklevel=3)
        return None
