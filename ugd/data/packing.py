"""Padding-free packing of laid-out samples (docs/spec.md sections 3 and 8).

``pack`` puts ``EncodedSample``s (``ugd.data.layout``) back to back in one sequence and adds the key
interval of every row (``ugd_ops.row_intervals`` of one mask); ``budget_batches`` groups samples under a
token budget. The batch dict is described in ``ugd.data.collator``. The paradigms use this module
directly, the collator on top of them.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

import ugd_ops

from .layout import EncodedSample

MASKS = ("ttm", "stm", "causal", "bidirectional")


def pack(samples: Sequence[EncodedSample], mask: str) -> dict:
    """Packs samples into one padding-free sequence with the attention intervals of ``mask``.

    Args:
        samples: at least one ``EncodedSample``.
        mask: the ``ugd_ops.row_intervals`` mask -- ``"ttm"``, ``"stm"`` (need Lq, Ld >= 1),
            ``"causal"`` or ``"bidirectional"`` (use it for lone query or document spans).

    Returns:
        the batch dict described in this module's docstring.
    """
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; expected one of {MASKS}")
    if len(samples) == 0:
        raise ValueError("pack() needs at least one sample")
    input_ids: list[int] = []
    positions: list[int] = []
    lm_labels: list[int] = []
    for i, s in enumerate(samples):
        n = sum(s.spans)
        if not (len(s.input_ids) == len(s.position_ids) == len(s.lm_labels) == n):
            raise ValueError(
                f"sample {i}: input_ids, position_ids and lm_labels must all have sum(spans) = {n} entries, got "
                f"{len(s.input_ids)}, {len(s.position_ids)}, {len(s.lm_labels)}"
            )
        input_ids += s.input_ids
        positions += s.position_ids
        lm_labels += s.lm_labels
    spans = torch.tensor([list(s.spans) for s in samples], dtype=torch.int32)
    cu, kv_start, kv_end = ugd_ops.row_intervals(spans, mask)

    s64 = spans.to(torch.int64)
    start = cu[:-1].to(torch.int64)
    ends = start[:, None] + torch.cumsum(s64[:, :3], dim=1) - 1  # last token of Q, D, P
    cls_index = torch.where(s64[:, :3] > 0, ends, torch.full_like(ends, -1))

    lengths = s64.sum(1)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.int64).unsqueeze(0),
        "position_ids": torch.tensor(positions, dtype=torch.int64).unsqueeze(0),
        "lm_labels": torch.tensor(lm_labels, dtype=torch.int64).unsqueeze(0),
        "spans": spans,
        "cu_seqlens": cu,
        "kv_start": kv_start,
        "kv_end": kv_end,
        "max_seqlen": int(lengths.max()),
        "labels": torch.tensor([s.label for s in samples], dtype=torch.int64),
        "cls_index": cls_index,
    }


def budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Groups sample indices, in the given order, into batches whose packed length fits ``max_tokens``.

    Greedy: a batch is closed when the next sample would push its total length past the budget. A
    sample longer than the budget on its own gets a batch of its own (with a warning) rather than
    being dropped. Order is kept, so a sampler shuffles (or sorts by length) the indices first and
    maps the returned positions back; every index appears exactly once.

    Args:
        lengths: packed length of each sample (``UGDCollator.lengths`` computes them).
        max_tokens: token budget per batch, >= 1.

    Returns:
        a list of batches, each a list of indices into ``lengths``.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    too_long = []
    for i, n in enumerate(lengths):
        n = int(n)
        if n < 0:
            raise ValueError(f"lengths[{i}] = {n} is negative")
        if n > max_tokens:
            too_long.append(i)
            if current:
                batches.append(current)
                current, total = [], 0
            batches.append([i])
            continue
        if current and total + n > max_tokens:
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        batches.append(current)
    if too_long:
        warnings.warn(
            f"{len(too_long)} sample(s) exceed max_tokens={max_tokens} on their own (first: index {too_long[0]}, "
            f"{int(lengths[too_long[0]])} tokens); each gets a batch of its own",
            stacklevel=2,
        )
    return batches


__all__ = ["MASKS", "budget_batches", "pack"]
