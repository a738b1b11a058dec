"""The loss terms of docs/spec.md section 5 (paper eq. 1-7), each returned on its own.

    L_t = alpha CE(Logits_t, y) + beta CE(Logits_s, y) + gamma L_gen + lambda KL(P || sg(Q)) + mu KL(T || sg(S))
    L_s = beta CE(Logits_s, y) + gamma L_gen
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ugd_ops

# Loss term -> the weight that scales it.
TERM_WEIGHTS = {"cls_t": "alpha", "cls_s": "beta", "gen": "gamma", "kl": "lam", "kl_emb": "mu"}


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over samples with a label (label -100 is ignored); 0 when none has one."""
    if not bool((labels != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def generation_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, lm_labels: torch.Tensor,
                    cu_seqlens: torch.Tensor) -> torch.Tensor:
    """L_gen (eq. 3): token cross-entropy over the G targets, averaged over each sample's tokens, then
    over the samples that have a reason. The LM head runs on the G positions only.

    hidden: [T, H]; lm_labels: [T] (target of each position, -100 outside G); cu_seqlens: [B + 1].
    """
    positions = (lm_labels != -100).nonzero(as_tuple=True)[0]
    if positions.numel() == 0:
        return hidden.sum() * 0.0
    sample = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)
    # Chunked over rows: the [N, V] logits never exist whole (V is ~152k for Qwen2.5).
    return ugd_ops.linear_cross_entropy(hidden[positions], lm_head.weight, lm_labels[positions],
                                        bias=getattr(lm_head, "bias", None), per_sample=sample, reduction="mean")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float, detach: bool,
                      gate: torch.Tensor | None = None):
    """KL(softmax(student) || sg(softmax(teacher))), batch mean (ugd_ops.detached_kl).

    ``gate`` ([B], 0/1): only the gated samples distil, still divided by B, so that a gate only ever
    removes samples' terms and never re-weights the others.
    """
    if gate is None:
        return ugd_ops.detached_kl(student.float(), teacher.float(), temperature=temperature,
                                   reduction="batchmean", detach=detach)
    rows = ugd_ops.detached_kl(student.float(), teacher.float(), temperature=temperature, reduction="none",
                               detach=detach)
    return (rows * gate.to(rows.dtype)).sum() / max(rows.shape[0], 1)
