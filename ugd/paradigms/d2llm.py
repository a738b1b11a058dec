"""``d2llm``: D2LLM (Liao et al., ACL 2024, arXiv 2406.17262) -- a cross-encoder LLM teacher decomposed
into a bi-encoder student with Pooling by Multihead Attention (PMA) and an Interaction Emulation Module
(IEM), distilled by Contrastive, Rank and Feature Imitation. Equations, sources and what was inferred:
``docs/paradigms.md`` (section "D2LLM").

One packed forward, spans Q D P with the ``ttm`` mask (``ugd_ops.partitioned_attention``):

* the Q and D rows see only their own span, so their token states are exactly those of the query
  or the document encoded alone (precomputable);
* the P rows see Q, D and P: the hidden state at P's final ``[CLS]`` is the cross-encoder teacher's
  embedding, ``teacher_classifier`` turns it into the teacher's logits ``z^T`` (trained with CE on the
  labels). Or the teacher is a separately loaded UGD checkpoint (option ``teacher``: a path), frozen.

Student: ``y = PMA(token states of one side)`` per query and document (the served vectors), then
``IEM(y_q, y_d)`` -> class logits ``z^S`` and the IEM's hidden representation (for Feature
Imitation). The IEM's first layer splits into a query part and a document part, so ranking against
stored documents projects each document once.

Loss terms (weights are options): ``teacher`` CE(z^T, y) (own teacher only), ``ci`` Contrastive
Imitation, ``ri`` Rank Imitation, ``fi`` Feature Imitation, ``kl`` KL(softmax z^S || sg softmax z^T)
(``ugd_ops.detached_kl``). Every teacher quantity is detached: the student terms never train the
teacher through its outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import ugd_ops

from ..modules.losses import classification_loss
from ..modules.packed import UGDOutput, gather_rows, padded_span
from ._contrastive import cosine_matrix
from ._frozen_teacher import frozen_teacher, teacher_outputs
from .base import SIDE_SPAN, Paradigm
from .registry import register

SEARCH_VARIANTS = ("asymmetric", "symmetric")


# ---------------------------------------------------------------------------------------------
# heads: PMA, IEM, the teacher's classifier
# ---------------------------------------------------------------------------------------------


class PMA(nn.Module):
    """Pooling by Multihead Attention (Set Transformer, Lee et al. 2019): one learned seed vector
    attends over a side's token states; ``MAB(S, X) = LN(H + relu(W H))``, ``H = LN(S + MHA(S, X, X))``.
    The multi-head attention is ``torch.nn.MultiheadAttention``."""

    def __init__(self, hidden: int, heads: int, layer_norm: bool = True):
        super().__init__()
        if heads < 1 or hidden % heads:
            raise ValueError(f"d2llm option pma_heads={heads} must divide the backbone's hidden size {hidden}")
        self.seed = nn.Parameter(torch.empty(1, 1, hidden))
        nn.init.xavier_uniform_(self.seed)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ff = nn.Linear(hidden, hidden)
        self.norm0 = nn.LayerNorm(hidden) if layer_norm else nn.Identity()
        self.norm1 = nn.LayerNorm(hidden) if layer_norm else nn.Identity()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L, H]``, ``mask [B, L]`` (True on real tokens) -> ``[B, H]``."""
        seed = self.seed.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        attended, _ = self.attention(seed, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        h = self.norm0(seed + attended)
        return self.norm1(h + F.relu(self.ff(h)))[:, 0]


class IEM(nn.Module):
    """Interaction Emulation Module: an MLP over ``[y_q; y_d]`` -> class logits, with the branch of one
    search variant (the paper's model has a symmetric and an asymmetric branch over a shared first and
    last layer; a d2llm model is built for one of them, option ``search``).

    ``asymmetric``: ``x = relu(P relu(W1 [y_q; y_d] + b1))``, logits ``W2 x + b2``.
    ``symmetric``: the same MLP averaged over both orders, so score(a, b) = score(b, a).
    ``W1 [a; b] = W_a a + W_b b``: ``part(v, side)`` computes a side's half once per text.
    """

    def __init__(self, hidden: int, inner: int, num_labels: int, variant: str):
        super().__init__()
        if variant not in SEARCH_VARIANTS:
            raise ValueError(f"d2llm option search must be one of {SEARCH_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.hidden = hidden
        self.first = nn.Linear(2 * hidden, inner)
        self.branch = nn.Linear(inner, inner)
        self.out = nn.Linear(inner, num_labels)

    def part(self, v: torch.Tensor, side: str) -> torch.Tensor:
        """A side's share of the first layer: ``W_a v`` (query) or ``W_b v`` (document) ``[..., K]``; both
        halves ``[..., 2K]`` (own position first) for the symmetric variant."""
        w_a, w_b = self.first.weight[:, : self.hidden], self.first.weight[:, self.hidden:]
        own, other = (w_a, w_b) if side == "query" else (w_b, w_a)
        if self.variant == "asymmetric":
            return F.linear(v, own)
        return torch.cat([F.linear(v, own), F.linear(v, other)], dim=-1)

    def _tail(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = F.relu(self.branch(F.relu(pre + self.first.bias)))
        return self.out(rep), rep

    def from_parts(self, query_part: torch.Tensor, document_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[..., C]``, representation ``[..., K]``) from broadcastable parts."""
        if self.variant == "asymmetric":
            return self._tail(query_part + document_part)
        k = query_part.shape[-1] // 2
        # order (q, d): W_a q + W_b d; order (d, q): W_a d + W_b q
        l1, r1 = self._tail(query_part[..., :k] + document_part[..., :k])
        l2, r2 = self._tail(document_part[..., k:] + query_part[..., k:])
        return (l1 + l2) / 2, (r1 + r2) / 2

    def forward(self, v_q: torch.Tensor, v_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_parts(self.part(v_q, "query"), self.part(v_d, "document"))


class D2LLMHeads(nn.Module):
    def __init__(self, hidden: int, num_labels: int, *, pma_heads: int, pma_layer_norm: bool, iem_hidden: int,
                 search: str, own_teacher: bool):
        super().__init__()
        self.pma = PMA(hidden, pma_heads, pma_layer_norm)
        self.iem = IEM(hidden, iem_hidden, num_labels, search)
        # the cross-encoder teacher's "linear layer -> logits" (absent with a separate teacher checkpoint)
        self.teacher_classifier = nn.Linear(hidden, num_labels) if own_teacher else None


# ---------------------------------------------------------------------------------------------
# the loss terms (each on its own, for tests)
# ---------------------------------------------------------------------------------------------


def relevance(logits: torch.Tensor) -> torch.Tensor:
    """The scalar relevance of class logits ``[..., C]``: the expected grade scaled to [0, 1],
    ``sum_c softmax(z)_c c / (C - 1)``; for two classes exactly p(class 1), D2LLM's p("yes")."""
    c = logits.shape[-1]
    grades = torch.arange(c, device=logits.device, dtype=torch.float32) / (c - 1)
    return logits.float().softmax(-1) @ grades


def contrastive_imitation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive Imitation over a batch: ``student [B, B]`` relevance of query i against document j
    (the diagonal: each query's own, teacher-scored document; the rest: in-batch negatives), ``teacher
    [B]`` the teacher's relevance of the diagonal pairs (detached here).

        L_CI = -1/B sum_i log( exp(t_i s_ii / tau) / (exp(t_i s_ii / tau) + sum_{j != i} exp(s_ij / tau)) )

    The own document's score is weighted by the teacher's relevance t_i, an in-batch negative's by
    1 - t = 1 (the teacher never saw it: taken as irrelevant), as D2LLM weights the positive by p_T and
    a hard negative by 1 - p_T.
    """
    b = student.shape[0]
    t = teacher.detach().to(student.dtype)
    eye = torch.eye(b, dtype=torch.bool, device=student.device)
    weighted = torch.where(eye, student * t[:, None], student) / temperature
    return F.cross_entropy(weighted.float(), torch.arange(b, device=student.device))


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Pearson's r of two vectors, ``sum(x'y') / sqrt((sum x'^2 + eps)(sum y'^2 + eps))`` (x', y' centred).

    ``eps`` bounds the gradient when a side is nearly constant (an untrained teacher scores every pair
    alike: without it 1 - r would push the student's scores with a gradient ~ 1/std, i.e. noise)."""
    x = x.float() - x.float().mean()
    y = y.float() - y.float().mean()
    return (x * y).sum() / torch.sqrt((x.pow(2).sum() + eps) * (y.pow(2).sum() + eps))


def rank_imitation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                   bpr_weight: float = 0.01) -> torch.Tensor:
    """Rank Imitation over a batch (``student [B, B]``, ``teacher [B]`` as in ``contrastive_imitation``):

        L_RI = (1 - pearson(s_diag, t)) + w / (B(B-1)) sum_i sum_{j != i} t_i * -log sigmoid((s_ii - s_ij) / tau)

    The first part makes the student's scores of the teacher-scored pairs correlate with the
    teacher's (D2LLM: Pearson over a query's positive and hard negatives); the second ranks each
    teacher-scored pair above the in-batch negatives, weighted by the teacher's margin t_i - 0 (D2LLM:
    a BPR loss between hard and in-batch negatives weighted by their teacher score difference,
    clamped at 0; D2LLM's code weights it 0.01 against the Pearson part: ``w = bpr_weight``). With one
    pair the batch has no ranking: 0.
    """
    b = student.shape[0]
    if b < 2:
        return student.sum() * 0.0
    t = teacher.detach().float()
    diag = student.diagonal()
    corr = 1 - pearson(diag, t)
    eye = torch.eye(b, dtype=torch.bool, device=student.device)
    bpr = -F.logsigmoid((diag[:, None] - student).float() / temperature)
    bpr = (bpr * t[:, None]).masked_fill(eye, 0.0).sum() / (b * (b - 1))
    return corr + bpr_weight * bpr


def feature_imitation(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Feature Imitation: the student's pair representations (IEM) should relate to each other as the
    teacher's pair embeddings do: ``mean_{i,j} (cos(f^T_i, f^T_j) - cos(f^S_i, f^S_j))^2`` over the
    batch's pairs (teacher detached). The sizes of the two features may differ."""
    t, s = teacher_features.detach(), student_features
    return (cosine_matrix(t, t) - cosine_matrix(s, s)).pow(2).mean()


def imitation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax z^S || sg(softmax z^T)) per pair, batch mean (``ugd_ops.detached_kl``): the student's
    class distribution imitates the teacher's (the multi-class counterpart of imitating p_T)."""
    return ugd_ops.detached_kl(student_logits.float(), teacher_logits.float(), reduction="batchmean", detach=True)


# ---------------------------------------------------------------------------------------------
# the paradigm
# ---------------------------------------------------------------------------------------------

class D2LLMParadigm(Paradigm):
    name = "d2llm"
    family = "d2llm"
    description = "D2LLM: cross-encoder teacher distilled into a bi-encoder with PMA pooling and an IEM"
    parts = "qdp"
    mask = "ttm"
    single_tower_mask = "ttm"
    terms = ("teacher", "ci", "ri", "fi", "kl")
    term_weights = {"teacher": "teacher_weight", "ci": "ci_weight", "ri": "ri_weight", "fi": "fi_weight",
                    "kl": "kl_weight"}
    options = {
        "teacher": None,  # None: the single tower of the same backbone; else a UGD checkpoint path (frozen)
        "search": "asymmetric",  # or "symmetric" (the IEM branch)
        "pma_heads": 4,
        "pma_layer_norm": True,
        "iem_hidden": None,  # None: the backbone's hidden size
        "temperature": 1.0,  # of the CI and RI terms, on relevances in [0, 1] (D2LLM code: 1)
        "bpr_weight": 0.01,  # the in-batch ranking part of RI, relative to its Pearson part
        "teacher_weight": 1.0,
        # D2LLM's code weighs CI and RI 1 against a trained, frozen teacher; a teacher trained alongside from
        # scratch (the own single tower) is drowned by them at 1 (docs/paradigms.md: measured on the demo)
        "ci_weight": 0.1,
        "ri_weight": 0.1,
        "fi_weight": 1.0,
        "kl_weight": 1.0,
    }
    capabilities = frozenset({"encode_queries", "encode_documents", "score_pairs", "rank", "single_tower"})

    # ------------------------------------------------------------------ configuration

    def check_config(self, config) -> None:
        super().check_config(config)
        o = lambda n: self.option(config, n)  # noqa: E731
        if o("search") not in SEARCH_VARIANTS:
            raise ValueError(f"d2llm option search must be one of {SEARCH_VARIANTS}, got {o('search')!r}")
        teacher = o("teacher")
        if teacher is not None and (not isinstance(teacher, str) or not teacher):
            raise ValueError(f"d2llm option teacher must be null (the model's own single tower) or the path of a "
                             f"UGD checkpoint, got {teacher!r}")
        for name in ("pma_heads", "iem_hidden"):
            v = o(name)
            if v is None and name == "iem_hidden":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"d2llm option {name} must be an int >= 1, got {v!r}")
        if not isinstance(o("pma_layer_norm"), bool):
            raise ValueError(f"d2llm option pma_layer_norm must be true or false, got {o('pma_layer_norm')!r}")
        t = o("temperature")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"d2llm option temperature must be > 0, got {t!r}")
        w = o("bpr_weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"d2llm option bpr_weight must be >= 0, got {w!r}")

    def own_teacher(self, config) -> bool:
        return self.option(config, "teacher") is None

    def active_terms(self, config) -> tuple[str, ...]:
        terms = super().active_terms(config)
        return terms if self.own_teacher(config) else tuple(t for t in terms if t != "teacher")

    def serves(self, config) -> frozenset:
        caps = frozenset(self.capabilities)
        return caps if self.own_teacher(config) else caps - {"single_tower"}

    def why_not(self, config, missing) -> str:
        if "single_tower" in missing and not self.own_teacher(config):
            return (f"its teacher is the separate checkpoint {self.option(config, 'teacher')!r}: serve single-tower "
                    "scores with that checkpoint")
        if "generate" in missing:
            return "D2LLM scores pairs, it does not write reasons"
        return ""

    # ------------------------------------------------------------------ model

    def build_heads(self, config, hidden_size: int) -> D2LLMHeads:
        o = lambda n: self.option(config, n)  # noqa: E731
        return D2LLMHeads(hidden_size, config.num_labels, pma_heads=o("pma_heads"), pma_layer_norm=o("pma_layer_norm"),
                          iem_hidden=o("iem_hidden") or hidden_size, search=o("search"),
                          own_teacher=self.own_teacher(config))

    def teacher_model(self, model):
        """The separately loaded teacher (option ``teacher``), loaded once, frozen, on the heads' device."""
        return frozen_teacher(model, self.option(model.config, "teacher"), "d2llm")

    def teacher_outputs(self, model, batch: dict, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher logits ``[B, C]``, teacher pair embedding ``[B, H_T]``), both detached for the student
        terms by their users; the own teacher's logits keep their graph for its CE term."""
        if self.own_teacher(model.config):
            v_s = gather_rows(hidden, batch["cls_index"][:, 2], "prompt (teacher)")
            return model.heads.teacher_classifier(v_s), v_s
        return teacher_outputs(self.teacher_model(model), batch, self.mask)

    def pooled(self, model, hidden: torch.Tensor, batch: dict, side: str) -> torch.Tensor:
        tokens, mask = padded_span(hidden, batch, SIDE_SPAN[side])
        return model.heads.pma(tokens, mask)

    def forward(self, model, batch: dict, compute) -> UGDOutput:
        cfg = model.config
        active = self.training_terms(model, compute)
        want = set(compute or ())
        student_needed = bool(active & {"ci", "ri", "fi", "kl"}) or "two_tower" in want
        teacher_needed = bool(active & {"teacher", "ci", "ri", "fi", "kl"}) or "single_tower" in want
        if "single_tower" in want and not self.own_teacher(cfg):
            raise ValueError(self.why_not(cfg, ["single_tower"]))
        out = UGDOutput()
        hidden = model.encode(batch)
        labels = batch["labels"]
        if teacher_needed:
            z_t, f_t = self.teacher_outputs(model, batch, hidden)
            out.logits_s, out.v_s = z_t, f_t
        if student_needed:
            out.v_q = self.pooled(model, hidden, batch, "query")
            out.v_d = self.pooled(model, hidden, batch, "document")
            iem = model.heads.iem
            # all B x B (query, document) pairs of the batch from B + B parts: the diagonal is the batch's pairs
            qp, dp = iem.part(out.v_q, "query"), iem.part(out.v_d, "document")
            z_all, rep_all = iem.from_parts(qp[:, None, :], dp[None, :, :])
            idx = torch.arange(qp.shape[0], device=qp.device)
            out.logits_t = z_all[idx, idx]
            rep = rep_all[idx, idx]

        terms = {}
        tau = float(self.option(cfg, "temperature"))
        if "teacher" in active and labels is not None and bool((labels != -100).any()):
            terms["teacher"] = classification_loss(out.logits_s, labels)
        if active & {"ci", "ri"}:
            s = relevance(z_all)
            t = relevance(out.logits_s.detach())
            if "ci" in active:
                terms["ci"] = contrastive_imitation(s, t, tau)
            if "ri" in active:
                terms["ri"] = rank_imitation(s, t, tau, float(self.option(cfg, "bpr_weight")))
        if "fi" in active:
            terms["fi"] = feature_imitation(rep, out.v_s)
        if "kl" in active:
            terms["kl"] = imitation_kl(out.logits_t, out.logits_s)
        out.terms = terms
        out.loss = self.total(cfg, terms)
        return out

    def unused_parameters(self, model) -> list[str]:
        active = set(self.active_terms(model.config))
        unused = []
        heads = model.heads
        if not active & {"ci", "ri", "fi", "kl"}:
            unused += [f"heads.pma.{n}" for n, p in heads.pma.named_parameters() if p.requires_grad]
            unused += [f"heads.iem.{n}" for n, p in heads.iem.named_parameters() if p.requires_grad]
        if heads.teacher_classifier is not None and not active & {"teacher", "ci", "ri", "kl"}:
            unused += [f"heads.teacher_classifier.{n}" for n, p in heads.teacher_classifier.named_parameters()
                       if p.requires_grad]
        return unused + self.lm_head_only_parameters(model.backbone, "backbone")  # no LM term: it never runs

    # ------------------------------------------------------------------ inference hooks

    def side_vectors(self, model, hidden: torch.Tensor, pack: dict, side: str) -> torch.Tensor:
        return self.pooled(model, hidden, pack, side)

    def query_part(self, model, v_q: torch.Tensor) -> torch.Tensor:
        return model.heads.iem.part(v_q, "query")

    def document_part(self, model, v_d: torch.Tensor) -> torch.Tensor:
        return model.heads.iem.part(v_d, "document")

    def logits_from_parts(self, model, query_part: torch.Tensor, document_part: torch.Tensor) -> torch.Tensor:
        return model.heads.iem.from_parts(query_part, document_part)[0]

    def single_tower_logits(self, model, hidden: torch.Tensor, pack: dict) -> torch.Tensor:
        if model.heads.teacher_classifier is None:
            raise ValueError(self.why_not(model.config, ["single_tower"]))
        return model.heads.teacher_classifier(gather_rows(hidden, pack["cls_index"][:, 2], "single-tower"))


D2LLM = register(D2LLMParadigm())
