"""Running a packed batch (``ugd.data.packing.pack``) through a backbone, and the output every paradigm returns.

This module sits below the model, the paradigms, inference and generation (all of them import it, it
imports none of them), so that none of those has to import ``ugd.model`` for these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import ugd_ops


@dataclass
class UGDOutput:
    """What ``UGDModel.forward`` returns, for every paradigm.

    ``logits_t`` are the paradigm's two-tower (bi-encoder) logits and ``logits_s`` its single-tower
    (cross-encoder) logits, each ``[B, C]`` for the B pairs of the batch; the trainer computes ACC/AUC
    per head from them (``eval_acc_t`` / ``eval_acc_s``). ``v_q`` / ``v_d`` / ``v_s`` hold the vectors
    they came from where the paradigm has them.
    """

    loss: torch.Tensor | None = None
    terms: dict = field(default_factory=dict)  # each weighted term's unweighted value
    # training diagnostics (0-d tensors, no gradient) the trainer logs as train_<name>: e.g. acc_t / acc_s,
    # each head's accuracy on the batch, and kl_gate, the share of samples that distilled
    stats: dict = field(default_factory=dict)
    logits_t: torch.Tensor | None = None  # [B, C] two-tower
    logits_s: torch.Tensor | None = None  # [B, C] single-tower
    v_q: torch.Tensor | None = None
    v_d: torch.Tensor | None = None
    v_s: torch.Tensor | None = None


def move_batch(batch, device):
    """A collated batch (nested dicts of tensors and ints) on ``device``."""
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def gather_rows(hidden: torch.Tensor, index: torch.Tensor, what: str) -> torch.Tensor:
    """``hidden[index]``, or a ValueError when a sample lacks the span (index -1)."""
    if bool((index < 0).any()):
        raise ValueError(f"the batch has samples without a {what} [CLS] (span length 0); this paradigm needs it")
    return hidden[index]


def packed_inputs(backbone: nn.Module, pack: dict) -> dict:
    """The keywords that run a packed batch (``ugd.data.packing.pack``) through ``backbone``.

    With ``attn_implementation="ugd"``: ids, positions and the packing metadata (partitioned attention,
    no T x T mask). Any other implementation (eager, sdpa) gets the same layout as a dense additive
    4D mask: the reference path, O(T^2) memory, for checks and comparisons only.
    """
    kwargs = dict(input_ids=pack["input_ids"], position_ids=pack["position_ids"])
    if backbone.config._attn_implementation == "ugd":
        kwargs.update(cu_seqlens=pack["cu_seqlens"], kv_start=pack["kv_start"], kv_end=pack["kv_end"],
                      max_seqlen=pack["max_seqlen"])
    else:
        allowed = ugd_ops.dense_mask(pack["cu_seqlens"], pack["kv_start"], pack["kv_end"])
        dtype = backbone.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        kwargs["attention_mask"] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
    return kwargs


def encode_packed(backbone: nn.Module, pack: dict) -> torch.Tensor:
    """Last hidden states ``[T, H]`` (after the backbone's final norm) of a packed batch."""
    return backbone.get_decoder()(**packed_inputs(backbone, pack), use_cache=False).last_hidden_state[0]


def span_bounds(pack: dict, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first token, length) ``[B]`` int64 of span ``span`` (0 Q, 1 D, 2 P, 3 G) of each packed sample."""
    spans = pack["spans"].to(torch.int64)
    start = pack["cu_seqlens"][:-1].to(torch.int64) + spans[:, :span].sum(1)
    return start, spans[:, span]


def padded_span(hidden: torch.Tensor, pack: dict, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token states of span ``span`` of each sample, right-padded: (``[B, Lmax, H]``, bool mask
    ``[B, Lmax]``). For poolers that attend over a side's tokens (D2LLM's PMA)."""
    start, length = span_bounds(pack, span)
    start, length = start.to(hidden.device), length.to(hidden.device)
    width = max(1, int(length.max())) if length.numel() else 1
    col = torch.arange(width, device=hidden.device)[None, :]
    mask = col < length[:, None]
    index = torch.where(mask, start[:, None] + col, torch.zeros_like(col))
    return hidden[index], mask


__all__ = ["UGDOutput", "encode_packed", "gather_rows", "move_batch", "packed_inputs", "padded_span", "span_bounds"]
