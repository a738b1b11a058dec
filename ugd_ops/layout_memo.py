"""Work done once per packed layout on the CUDA paths, reused by every layer and by the backward.

A transformers model hands every decoder layer the same three layout tensors (``cu_seqlens``,
``kv_start``, ``kv_end``), and the backward sees them again. Whatever is derived from a layout alone
(flex's block mask, the layout's value check) is therefore computed for the first call and looked up
for the others. Entries hold weak references and the tensors' version counters, so a freed or
modified-in-place layout never matches, whatever address a new tensor gets.

:func:`check_layout` keeps the promise of docs/spec.md section 3 on CUDA: a layout that breaks the contract raises an
error naming the argument instead of giving wrong numbers. Reading values on a GPU costs one host
sync, so it happens once per new layout (one sync per batch, not per layer), with the flags computed
on the device and the detailed message built only on failure. It is skipped while a CUDA graph is being
captured or torch.compile traces (no sync is allowed there), and ``UGD_CHECK_LAYOUT=0`` switches it off.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable

import torch

from . import _checks

CHECK_ENV = "UGD_CHECK_LAYOUT"


class LayoutMemo:
    """A small most-recently-used map from a layout's three tensors to a value derived from them."""

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: list = []  # [(weakrefs, versions, value)], most recent first

    def get(self, tensors: tuple, build: Callable):
        if torch.compiler.is_compiling():  # inside a user's torch.compile region: no Python-side state
            return build()
        versions = tuple(t._version for t in tensors)
        for i, (refs, vers, value) in enumerate(self._entries):
            if vers == versions and all(r() is t for r, t in zip(refs, tensors)):
                if i:
                    self._entries.insert(0, self._entries.pop(i))
                return value
        value = build()
        self._entries.insert(0, (tuple(weakref.ref(t) for t in tensors), versions, value))
        del self._entries[self.size:]
        return value

    def clear(self) -> None:
        self._entries.clear()


def layout_broken(cu_seqlens: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, T: int) -> torch.Tensor:
    """A 0-dim bool tensor on the layout's device: True when the layout breaks docs/spec.md section 3
    (cu_seqlens not from 0 to T non-decreasing, or an interval reversed or outside its sequence).
    O(T + B) device work, no sync."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    bad = (cu[0] != 0) | (cu[-1] != T)
    if lens.numel():
        bad = bad | (lens < 0).any()
    if kv_start.numel():
        rows = torch.arange(kv_start.numel(), device=cu.device)
        # sequence of each row: the number of sequence ends at or before it
        seq = torch.searchsorted(cu[1:], rows, right=True).clamp_(max=max(lens.numel() - 1, 0))
        seq_len = lens.clamp(min=0)[seq] if lens.numel() else torch.zeros_like(rows)
        ks, ke = kv_start.long(), kv_end.long()
        bad = bad | ((ks > ke) | (ks < 0) | (ke > seq_len)).any()
    return bad


_checked = LayoutMemo(size=8)


def check_layout(cu_seqlens: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, T: int,
                 max_seqlen: int | None = None) -> None:
    """Raise ``ValueError`` (naming the argument) for a broken layout, or for a ``max_seqlen`` below its
    longest sequence (as the reference does); the values are read once per layout (see module doc)."""
    if os.environ.get(CHECK_ENV, "1").strip() in ("0", "off", "false", "no"):
        return
    if torch.compiler.is_compiling() or (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return

    def check() -> int:
        cu = cu_seqlens.long()
        longest = (cu[1:] - cu[:-1]).max() if cu.numel() > 1 else cu.new_zeros(())
        broken, longest = torch.stack([layout_broken(cu_seqlens, kv_start, kv_end, T).long(), longest]).tolist()
        if broken:  # ^ the one host sync
            _checks.check_layout_values(cu_seqlens, kv_start, kv_end, T)  # raises with the details
        return longest

    longest = _checked.get((cu_seqlens, kv_start, kv_end), check)
    _checks.check_max_seqlen(max_seqlen, longest)
