"""Shared pieces of the embedding paradigms (``ullme``, ``flipped-kd``): pooling, similarity losses,
sequence log-likelihoods, a similarity-to-class read-out, and packing of groups with different masks.

Every function is plain tensor code on top of ``ugd_ops`` (the KL through ``ugd_ops.detached_kl``, the
LM likelihoods through ``ugd_ops.linear_cross_entropy``), so the losses are tested on hand-computed
cases in ``tests/paradigms/test_ullme.py`` and ``tests/paradigms/test_flipped_kd.py``. The equations
and what was inferred from the papers are in ``docs/paradigms.md``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import ugd_ops

from ..data.packing import pack

POOLINGS = ("mean", "last")


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """One vector per token range: ``[N, H]`` from ``hidden [T, H]`` and ranges ``[starts, starts + lengths)``.

    ``"mean"``: the average of the range's hidden states (ULLME's pooled embedding); ``"last"``: the
    state of its last token (the span's ``[CLS]``, where a causal model has read the whole text).
    """
    if how not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")
    starts = starts.to(device=hidden.device, dtype=torch.int64)
    lengths = lengths.to(device=hidden.device, dtype=torch.int64)
    if bool((lengths < 1).any()):
        raise ValueError("pool(): every range needs at least one token (an empty text still has its [CLS])")
    if how == "last":
        return hidden[starts + lengths - 1]
    seg = torch.repeat_interleave(torch.arange(starts.numel(), device=hidden.device), lengths)
    rows = torch.repeat_interleave(starts, lengths) + (
        torch.arange(int(lengths.sum()), device=hidden.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths))
    total = hidden.new_zeros((starts.numel(), hidden.shape[-1]), dtype=torch.float32)
    total = total.index_add(0, seg, hidden[rows].float())
    return (total / lengths[:, None].float()).to(hidden.dtype)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` cosine similarities (fp32) of the rows of ``a [N, H]`` and ``b [M, H]``."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def cosine_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N]`` cosine similarity (fp32) of aligned rows."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def in_batch_contrastive(sim: torch.Tensor, rows: torch.Tensor, *, temperature: float,
                         exclude: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with in-batch negatives (ULLME's L_CL).

    ``sim [B, B]``: cosine of query i against document j; ``rows``: the indices i whose pair (i, i) is
    positive -- each such row is a softmax over all documents of the batch with target column i.
    ``exclude [B, B]`` bool: columns a row must not see as negatives (the same document text, or
    another document also relevant to the same query); the target column is never excluded.

        L_CL = - mean_{i in rows} log( exp(s_ii / tau) / sum_{j not excluded} exp(s_ij / tau) )

    Returns 0 (connected to ``sim``) when no row is positive.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = rows.to(device=sim.device, dtype=torch.int64)
    if rows.numel() == 0:
        return sim.sum() * 0.0
    logits = sim[rows].float() / temperature
    if exclude is not None:
        mask = exclude.to(sim.device)[rows].clone()
        mask[torch.arange(rows.numel(), device=sim.device), rows] = False
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, rows)


def sequence_logprobs(hidden: torch.Tensor, lm_head: nn.Module, lm_labels: torch.Tensor, seq_id: torch.Tensor,
                      num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, token mean) of log p(target) over each sequence's target tokens: two ``[num_seqs]`` fp32.

    ``hidden [T, H]``; ``lm_labels [T]`` (the target *of* each position, -100 where none: already
    aligned, no shift); ``seq_id [T]`` the sequence of each position. The LM head runs on the target
    rows only, in chunks (``ugd_ops.linear_cross_entropy``: the ``[N, V]`` logits never exist whole).
    A sequence without targets gets 0 and 0.
    """
    positions = (lm_labels != -100).nonzero(as_tuple=True)[0]
    out_sum = hidden.new_zeros((num_seqs,), dtype=torch.float32)
    count = hidden.new_zeros((num_seqs,), dtype=torch.float32)
    if positions.numel() == 0:
        return out_sum + hidden.sum() * 0.0, out_sum + hidden.sum() * 0.0
    nll = ugd_ops.linear_cross_entropy(hidden[positions], lm_head.weight, lm_labels[positions],
                                       bias=getattr(lm_head, "bias", None), reduction="none")
    seq = seq_id[positions].to(torch.int64)
    out_sum = out_sum.index_add(0, seq, -nll.float())
    count = count.index_add(0, seq, torch.ones_like(nll, dtype=torch.float32))
    return out_sum, out_sum / count.clamp_min(1.0)


def generation_kl(emb_scores: torch.Tensor, gen_scores: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """GRL's L_KL = mean over queries of KL(P_rt || sg(P_gen)), P_rt = softmax(cos / tau) over the
    query's candidate passages, P_gen = softmax(s_gen), s_gen the LLM's token-mean log-likelihood of
    each passage. The generation side is the target: ``ugd_ops.detached_kl`` gives it no gradient.

    ``emb_scores``, ``gen_scores``: ``[R, K]`` (cosines, log-likelihoods). Returns 0 for R = 0.
    """
    if emb_scores.shape != gen_scores.shape:
        raise ValueError(f"emb_scores and gen_scores must have the same shape, got {list(emb_scores.shape)} "
                         f"and {list(gen_scores.shape)}")
    if emb_scores.numel() == 0:
        return emb_scores.sum() * 0.0
    return ugd_ops.detached_kl((emb_scores.float() / temperature).contiguous(), gen_scores.float().contiguous(),
                               temperature=1.0, reduction="batchmean", detach=True)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, ref_chosen: torch.Tensor | None = None,
             ref_rejected: torch.Tensor | None = None) -> torch.Tensor:
    """DPO (sigmoid form): ``- mean log sigmoid(beta [(c - r) - (c_ref - r_ref)])`` over the pairs, from
    sequence log-likelihoods of the chosen (relevant) and rejected (irrelevant) passage. Without a
    reference (``ref_* = None``) the reference log-ratio is 0 (reference-free). Returns 0 for no pair."""
    if chosen.numel() == 0:
        return chosen.sum() * 0.0
    logits = chosen.float() - rejected.float()
    if ref_chosen is not None and ref_rejected is not None:
        logits = logits - (ref_chosen.float() - ref_rejected.float()).detach()
    return -F.logsigmoid(beta * logits).mean()


def margin_contrastive(student: torch.Tensor, teacher: torch.Tensor, positive: torch.Tensor, *,
                       pos_margin: float, neg_margin: float) -> torch.Tensor:
    """Margin-aware Contrastive Learning (flipped KD's MCL), as inferred in docs/paradigms.md.

    ``student [N]``: the LLM's cosine similarity of each pair; ``teacher [N]``: the SLM's score of the
    same pair (a target only, never trained); ``positive [N]`` bool. A positive pair is penalised when
    the student's similarity falls more than ``pos_margin`` below the teacher's, a negative pair when
    it rises more than ``neg_margin`` above it; each side is averaged over its own pairs:

        L_MCL = mean_{pos} relu(t_i - m_pos - s_i)^2 + mean_{neg} relu(s_i - t_i - m_neg)^2

    so the target of every pair is the teacher's own score (positives and negatives are not pushed to
    fixed 1 / 0: the differences within each group stay as the teacher sees them).
    """
    if student.shape != teacher.shape or student.shape != positive.shape:
        raise ValueError(f"student, teacher and positive must have the same shape, got {list(student.shape)}, "
                         f"{list(teacher.shape)}, {list(positive.shape)}")
    s = student.float()
    t = teacher.detach().to(device=s.device, dtype=torch.float32)
    pos = positive.to(device=s.device, dtype=torch.bool)
    loss = s.sum() * 0.0
    if bool(pos.any()):
        loss = loss + F.relu(t[pos] - pos_margin - s[pos]).pow(2).mean()
    if bool((~pos).any()):
        loss = loss + F.relu(s[~pos] - t[~pos] - neg_margin).pow(2).mean()
    return loss


class ScoreReadout(nn.Module):
    """Class logits from one similarity score: ``logits_c = scale (w_c s + b_c)`` (an ordinal read-out,
    2C parameters). The embedding paradigms score a pair by a cosine; this maps it to the data's
    classes so that ACC/AUC, ``predict`` and ``rank`` work as for the other paradigms. It is trained on
    the *detached* score (CE on the labels), so it never changes the embedding the paper's losses
    train. ``scale`` is fixed: a cosine spans [-1, 1] while class logits need a range of tens, and with
    it the read-out moves fast enough at the backbone's learning rate (Adam steps are ~lr per weight)."""

    def __init__(self, num_labels: int, scale: float = 10.0):
        super().__init__()
        self.scale = float(scale)
        # start monotone: a higher similarity reads as a higher class
        self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, num_labels))
        self.bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        return self.scale * (score.to(self.weight.dtype)[..., None] * self.weight + self.bias)


# ---------------------------------------------------------------------------------------------
# packing groups with different masks into one forward
# ---------------------------------------------------------------------------------------------


def pack_groups(groups: Sequence[tuple[Sequence, str]]) -> dict:
    """One padding-free batch from several groups of ``EncodedSample``, each with its own
    ``ugd_ops.row_intervals`` mask (e.g. lone texts ``"bidirectional"`` and query+passage generation
    sequences ``"causal"``): the intervals are relative to each sample, so the groups' layouts simply
    concatenate. Returns ``ugd.data.packing.pack``'s dict plus ``group_offsets`` (first sample of each
    group, and the total) and ``starts`` / ``lengths`` ``[B]`` of every sample."""
    parts = [pack(list(samples), mask) for samples, mask in groups if len(samples)]
    if not parts:
        raise ValueError("pack_groups() needs at least one sample")
    out = {k: torch.cat([p[k] for p in parts], dim=1) for k in ("input_ids", "position_ids", "lm_labels")}
    for k in ("spans", "kv_start", "kv_end", "labels"):
        out[k] = torch.cat([p[k] for p in parts], dim=0)
    cu = [torch.zeros(1, dtype=torch.int32)]
    cls = []
    offset = 0
    for p in parts:
        cu.append(p["cu_seqlens"][1:] + offset)
        cls.append(torch.where(p["cls_index"] >= 0, p["cls_index"] + offset, p["cls_index"]))
        offset += int(p["cu_seqlens"][-1])
    out["cu_seqlens"] = torch.cat(cu)
    out["cls_index"] = torch.cat(cls)
    out["max_seqlen"] = max(p["max_seqlen"] for p in parts)
    sizes, k = [0], 0
    for samples, _ in groups:
        k += len(samples)
        sizes.append(k)
    out["group_offsets"] = torch.tensor(sizes, dtype=torch.int64)
    cu64 = out["cu_seqlens"].to(torch.int64)
    out["starts"], out["lengths"] = cu64[:-1], cu64[1:] - cu64[:-1]
    return out


__all__ = [
    "POOLINGS",
    "ScoreReadout",
    "cosine_matrix",
    "cosine_pairs",
    "dpo_loss",
    "generation_kl",
    "in_batch_contrastive",
    "margin_contrastive",
    "pack_groups",
    "pool",
    "sequence_logprobs",
]
