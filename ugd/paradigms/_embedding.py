"""The common ground of the embedding paradigms (``ullme``, ``flipped-kd``): a query and a document are
each encoded alone into one vector, a pair is scored by the cosine of its two vectors, and a small
read-out (``ScoreReadout``) turns that score into class logits so that these paradigms are evaluated
(ACC/AUC) and served (``predict``, ``rank``, stored document vectors) like the UGD ones.

Subclasses set ``pooling`` (default option) and implement ``loss_terms`` and, where they need more
than the lone texts, ``extra`` (more samples and fields of the collated batch).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.layout import EncodedSample, encode_sample, record_label, record_texts
from ..modules.packed import UGDOutput
from ._contrastive import POOLINGS, ScoreReadout, cosine_matrix, pack_groups, pool
from .base import Paradigm

#: what an embedding paradigm serves: vectors per text, pair scores from stored vectors, ranking
EMBEDDING_CAPABILITIES = frozenset({"encode_queries", "encode_documents", "score_pairs", "rank"})


class EmbeddingHeads(nn.Module):
    """The only parameters an embedding paradigm adds: the score read-out (2 C numbers)."""

    def __init__(self, num_labels: int, scale: float = 10.0):
        super().__init__()
        self.readout = ScoreReadout(num_labels, scale)


def pair_fields(record, i: int) -> tuple[str, str, int]:
    """(query, document, label or -100) of one record; a ValueError naming the record otherwise."""
    query, document = record_texts(record, i, "{'query', 'document', 'label'}")
    label = record_label(record, i)
    return query, document, -100 if label is None else label


class EmbeddingParadigm(Paradigm):
    """Base of the bi-encoder paradigms; see the module docstring."""

    parts = "q|d"  # a query and a document, each laid out alone
    mask = None  # ... and packed together with the "bidirectional" mask (see collate)
    capabilities = EMBEDDING_CAPABILITIES
    #: options every embedding paradigm has
    common_options = {
        "pooling": "mean",
        "readout_weight": 1.0,
        "readout_scale": 10.0,  # logits = scale (w s + b): see ScoreReadout
        # labels >= this are relevant pairs (None: the top class, num_labels - 1)
        "positive_min_label": None,
    }

    # ------------------------------------------------------------------ configuration

    def check_config(self, config) -> None:
        super().check_config(config)
        if self.option(config, "pooling") not in POOLINGS:
            raise ValueError(f"paradigm {self.name!r}: option pooling must be one of {POOLINGS}, "
                             f"got {self.option(config, 'pooling')!r}")
        scale = self.option(config, "readout_scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"paradigm {self.name!r}: option readout_scale must be a number > 0, got {scale!r}")
        pos = self.option(config, "positive_min_label")
        if pos is not None and (isinstance(pos, bool) or not isinstance(pos, int) or not 0 < pos < config.num_labels):
            raise ValueError(f"paradigm {self.name!r}: option positive_min_label must be an int in "
                             f"[1, {config.num_labels}) (labels >= it are relevant), got {pos!r}")

    def positive_min_label(self, config) -> int:
        pos = self.option(config, "positive_min_label")
        return config.num_labels - 1 if pos is None else int(pos)

    def positives(self, config, labels: torch.Tensor) -> torch.Tensor:
        """Bool ``[B]``: labelled pairs whose label counts as relevant."""
        return (labels != -100) & (labels >= self.positive_min_label(config))

    # ------------------------------------------------------------------ model

    def build_heads(self, config, hidden_size: int) -> nn.Module:
        return EmbeddingHeads(config.num_labels, float(self.option(config, "readout_scale")))

    def vectors(self, model, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_Q, V_D) ``[B, H]``: the pooled lone queries and documents (samples 0..B-1 and B..2B-1)."""
        B = int(batch["num_pairs"])
        how = self.option(model.config, "pooling")
        starts, lengths = batch["starts"], batch["lengths"]
        return pool(hidden, starts[:B], lengths[:B], how), pool(hidden, starts[B:2 * B], lengths[B:2 * B], how)

    def forward(self, model, batch: dict, compute) -> UGDOutput:
        active = self.training_terms(model, compute)
        hidden = model.encode(batch)
        v_q, v_d = self.vectors(model, hidden, batch)
        sim = cosine_matrix(v_q, v_d)  # [B, B]: in-batch negatives for free
        score = sim.diagonal()
        out = UGDOutput(v_q=v_q, v_d=v_d)
        # the read-out sees the score detached: it never trains the encoder
        out.logits_t = model.heads.readout(score.detach())
        labels = batch["labels"]
        terms = self.loss_terms(model, batch, hidden, sim, active)
        if "readout" in active and bool((labels != -100).any()):
            terms["readout"] = F.cross_entropy(out.logits_t.float(), labels, ignore_index=-100)
        out.terms = terms
        out.loss = self.total(model.config, terms)
        return out

    def loss_terms(self, model, batch: dict, hidden: torch.Tensor, sim: torch.Tensor, active: set) -> dict:
        raise NotImplementedError

    def trains_lm_head(self, config) -> bool:
        """Whether a loss term sends gradient to the LM head (default: no -- embeddings only)."""
        return False

    def unused_parameters(self, model) -> list[str]:
        unused = set()
        if "readout" not in self.active_terms(model.config):
            unused |= {id(p) for p in model.heads.readout.parameters()}
        names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in unused]
        if not self.trains_lm_head(model.config):
            names += self.lm_head_only_parameters(model.backbone, "backbone")
        return names

    # ------------------------------------------------------------------ collation

    def collate(self, collator, records) -> dict:
        if len(records) == 0:
            raise ValueError(f"the {self.name} collator got an empty list of records")
        tok, ids, layout = collator.tokenizer, collator.ids, collator.layout
        fields = [pair_fields(r, i) for i, r in enumerate(records)]
        queries = [encode_sample(tok, ids, q, d, None, y, config=layout, parts="q") for q, d, y in fields]
        documents = [encode_sample(tok, ids, q, d, None, y, config=layout, parts="d") for q, d, y in fields]
        for sample in queries + documents:  # texts cut to the layout's limits: warned once, as for every paradigm
            collator._truncation(sample.truncated)
        config = self.collate_config(collator)
        extra, fields_out = self.extra(collator, records, fields, queries, documents, config)
        groups = [(queries + documents, "bidirectional")]
        if extra:
            groups.append((extra, "causal"))
        batch = pack_groups(groups)
        batch["num_pairs"] = len(records)
        batch["labels"] = torch.tensor([y for _, _, y in fields], dtype=torch.int64)
        batch.update(fields_out)
        return batch

    def extra(self, collator, records, fields, queries, documents, config) -> tuple[list[EncodedSample], dict]:
        """(samples packed after the lone texts with the ``"causal"`` mask, more fields of the batch);
        ``fields``: (query, document, label) of each record. Default: none, none."""
        return [], {}

    def collate_config(self, collator):
        """The model's ``UGDConfig`` as the collator holds it (``collator.model_config``): the batch
        depends on the paradigm's options and on ``num_labels`` (which labels are relevant)."""
        config = getattr(collator, "model_config", None)
        if config is None:
            raise ValueError(f"the {self.name} collator needs the model's config (options, num_labels): "
                             "UGDCollator(tokenizer, paradigm=..., model_config=model.config) (ugd.train does)")
        if config.paradigm != self.name:
            raise ValueError(f"collator.model_config is for paradigm {config.paradigm!r}, not {self.name!r}")
        return config

    # ------------------------------------------------------------------ inference hooks

    def side_vectors(self, model, hidden: torch.Tensor, pack: dict, side: str) -> torch.Tensor:
        cu = pack["cu_seqlens"].to(torch.int64)
        return pool(hidden, cu[:-1], cu[1:] - cu[:-1], self.option(model.config, "pooling"))

    def query_part(self, model, v_q: torch.Tensor) -> torch.Tensor:
        return F.normalize(v_q.float(), dim=-1)

    def document_part(self, model, v_d: torch.Tensor) -> torch.Tensor:
        return F.normalize(v_d.float(), dim=-1)

    def logits_from_parts(self, model, query_part: torch.Tensor, document_part: torch.Tensor) -> torch.Tensor:
        return model.heads.readout((query_part * document_part).sum(-1))

    def why_not(self, config, missing: Sequence[str]) -> str:
        return (f"{self.name} is a bi-encoder: it encodes each text alone and scores the cosine of the two "
                "vectors; it has no cross-encoder (single-tower) head and generates no reason")


__all__ = ["EMBEDDING_CAPABILITIES", "EmbeddingHeads", "EmbeddingParadigm", "pair_fields"]
