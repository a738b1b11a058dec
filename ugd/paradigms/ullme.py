"""``ullme``: ULLME (Man et al., 2024, arXiv 2408.03402) -- bidirectional LLM embeddings trained with
contrastive learning over in-batch negatives and Generation-augmented Representation Learning (GRL).

    L = lambda_CL L_CL + lambda_KL L_KL + lambda_DPO L_DPO  (+ readout_weight CE of the score read-out)

    L_CL   InfoNCE of cos(q_i, p_j) / tau over the batch's documents, target the pair's own document,
           for every relevant pair (label >= positive_min_label)
    L_KL   KL(P_rt || sg P_gen) per relevant query over its candidate passages U (its document and
           candidates - 1 in-batch negatives): P_rt = softmax(cos / tau), P_gen = softmax(s_gen),
           s_gen(q, p) = the LLM's token-mean log-likelihood of p after q
    L_DPO  - log sigmoid(beta [log pi(p+ | q) - log pi(p- | q)]) with p- the first negative candidate
           (reference-free by default; dpo_reference="adapters" uses the backbone with its LoRA
           adapters switched off as the reference, as ULLME's code does)

One packed forward holds everything: the lone queries and documents with the ``"bidirectional"`` mask
(the embeddings) and the query->passage generation sequences with the ``"causal"`` mask (the
likelihoods): ``ugd_ops.row_intervals`` intervals are per sample, so the two layouts concatenate and
``ugd_ops.partitioned_attention`` runs them as one batch. The likelihoods go through
``ugd_ops.linear_cross_entropy`` (no ``[N, V]`` logits), the KL through ``ugd_ops.detached_kl``.
What was inferred from the paper is listed in docs/paradigms.md.
"""

from __future__ import annotations

import random

import torch

from ..data.layout import EncodedSample
from .registry import register
from ._contrastive import dpo_loss, generation_kl, in_batch_contrastive, sequence_logprobs
from ._embedding import EmbeddingParadigm

DPO_REFERENCES = ("none", "adapters")


class ULLMEParadigm(EmbeddingParadigm):
    name = "ullme"
    family = "ullme"
    description = ("ULLME: bidirectional LLM embeddings, in-batch contrastive learning and GRL (KL to the "
                   "generation-based relevance, DPO)")
    terms = ("cl", "kl_gen", "dpo", "readout")
    term_weights = {"cl": "lambda_cl", "kl_gen": "lambda_kl", "dpo": "lambda_dpo", "readout": "readout_weight"}
    options = {
        **EmbeddingParadigm.common_options,
        # the paper's weights: lambda_CL = lambda_KL = 1, lambda_DPO = 0.5
        "lambda_cl": 1.0,
        "lambda_kl": 1.0,
        "lambda_dpo": 0.5,
        "temperature": 0.05,  # tau of P_rt and of L_CL (ULLME's default)
        "dpo_beta": 0.1,
        "dpo_reference": "none",
        # passages per relevant query in GRL: its own + (candidates - 1) in-batch negatives
        "candidates": 4,
        "seed": 0,  # of the choice of in-batch negative candidates
    }

    def check_config(self, config) -> None:
        super().check_config(config)
        opt = lambda n: self.option(config, n)  # noqa: E731
        if not isinstance(opt("temperature"), (int, float)) or opt("temperature") <= 0:
            raise ValueError(f"ullme: option temperature must be > 0, got {opt('temperature')!r}")
        if not isinstance(opt("dpo_beta"), (int, float)) or opt("dpo_beta") <= 0:
            raise ValueError(f"ullme: option dpo_beta must be > 0, got {opt('dpo_beta')!r}")
        if opt("dpo_reference") not in DPO_REFERENCES:
            raise ValueError(f"ullme: option dpo_reference must be one of {DPO_REFERENCES}, got {opt('dpo_reference')!r}")
        k = opt("candidates")
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"ullme: option candidates must be an int >= 2 (the relevant passage and at least one "
                             f"negative), got {k!r}")

    # ------------------------------------------------------------------ collation

    def _plan(self, fields, config):
        """Which rows are relevant, which columns each must not count as negatives, and the GRL
        candidates of each relevant row: its own document first, then the hardest negatives --
        documents of the same query with a lower label (highest first), then other in-batch documents
        in a random order (``seed``)."""
        labels = torch.tensor([y for _, _, y in fields], dtype=torch.int64)
        positive = self.positives(config, labels).tolist()
        B = len(fields)
        qs, ds = [q for q, _, _ in fields], [d for _, d, _ in fields]
        exclude = torch.zeros((B, B), dtype=torch.bool)
        for i in range(B):
            for j in range(B):
                if j != i and (ds[j] == ds[i] or (qs[j] == qs[i] and positive[j])):
                    exclude[i, j] = True
        rows = [i for i in range(B) if positive[i]]
        generate = self.weight(config, "kl_gen") != 0 or self.weight(config, "dpo") != 0
        if not generate:
            return positive, exclude, [], []
        k = int(self.option(config, "candidates"))
        rng = random.Random(f"{self.option(config, 'seed')}:{len(ds)}:{ds[0]}")
        cands = []
        for i in rows:
            free = [j for j in range(B) if j != i and not exclude[i, j]]
            hard = sorted((j for j in free if qs[j] == qs[i]), key=lambda j: -int(labels[j]))
            others = [j for j in free if qs[j] != qs[i]]
            rng.shuffle(others)
            cands.append([i] + (hard + others)[: k - 1])
        k_eff = min((len(c) for c in cands), default=0)
        if k_eff < 2:  # a batch too small for GRL (no negative for some relevant query): no generation rows
            return positive, exclude, [], []
        return positive, exclude, rows, [c[:k_eff] for c in cands]

    def extra(self, collator, records, fields, queries, documents, config) -> tuple[list[EncodedSample], dict]:
        positive, exclude, rows, cands = self._plan(fields, config)
        ids = collator.ids
        out = []
        for i, cand in zip(rows, cands):
            q = queries[i].input_ids  # the query's tokens and its [CLS]: the prompt of the generation
            for j in cand:
                d = documents[j].input_ids[:-1]  # the passage's tokens, without its [CLS]
                inputs = q + [ids["start"]] + d
                targets = [-100] * len(q) + d + [ids["eos"]]  # position t holds the target of t
                out.append(EncodedSample(inputs, list(range(len(inputs))), targets, (len(q), 0, 0, len(d) + 1)))
        return out, {
            "cl_rows": torch.tensor([i for i, p in enumerate(positive) if p], dtype=torch.int64),
            "cl_exclude": exclude,
            "gen_rows": torch.tensor(rows, dtype=torch.int64),
            "gen_candidates": (torch.tensor(cands, dtype=torch.int64) if cands
                               else torch.zeros((0, 2), dtype=torch.int64)),
        }

    # ------------------------------------------------------------------ model

    def trains_lm_head(self, config) -> bool:
        return self.weight(config, "dpo") != 0  # the KL's generation side is a detached target

    def loss_terms(self, model, batch, hidden, sim, active) -> dict:
        cfg = model.config
        tau = float(self.option(cfg, "temperature"))
        terms = {}
        if "cl" in active:
            terms["cl"] = in_batch_contrastive(sim, batch["cl_rows"], temperature=tau, exclude=batch["cl_exclude"])
        want_kl, want_dpo = "kl_gen" in active, "dpo" in active
        rows = batch.get("gen_rows")
        if (want_kl or want_dpo) and rows is not None and rows.numel():
            total, mean = self.generation_scores(model, batch, hidden)
            cand = batch["gen_candidates"]
            if want_kl:
                emb = sim[rows[:, None], cand]
                terms["kl_gen"] = generation_kl(emb, mean, temperature=tau)
            if want_dpo:
                ref_c = ref_r = None
                # the reference: the backbone without its adapters; once they are merged (a saved
                # checkpoint) it no longer exists, and an evaluation falls back to reference-free
                if self.option(cfg, "dpo_reference") == "adapters" and (
                        model.training or hasattr(model.backbone, "disable_adapter")):
                    ref_total, _ = self.reference_scores(model, batch)
                    ref_c, ref_r = ref_total[:, 0], ref_total[:, 1]
                terms["dpo"] = dpo_loss(total[:, 0], total[:, 1], beta=float(self.option(cfg, "dpo_beta")),
                                        ref_chosen=ref_c, ref_rejected=ref_r)
        elif want_kl or want_dpo:
            zero = sim.sum() * 0.0  # no relevant pair in this batch: the terms are 0, still logged
            if want_kl:
                terms["kl_gen"] = zero
            if want_dpo:
                terms["dpo"] = zero
        return terms

    def generation_scores(self, model, batch, hidden) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, token mean) log-likelihood ``[R, K]`` of each candidate passage after its query."""
        lengths = batch["lengths"]
        n = lengths.numel()
        seq_id = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths.to(hidden.device))
        total, mean = sequence_logprobs(hidden, model.backbone.get_output_embeddings(), batch["lm_labels"][0],
                                        seq_id, n)
        first = 2 * int(batch["num_pairs"])
        shape = batch["gen_candidates"].shape
        return total[first:].reshape(shape), mean[first:].reshape(shape)

    @torch.no_grad()
    def reference_scores(self, model, batch):
        bb = model.backbone
        if not hasattr(bb, "disable_adapter"):
            raise ValueError("ullme: dpo_reference='adapters' needs a LoRA backbone (train with --lora_r > 0); "
                             "use dpo_reference='none' (reference-free DPO) for full fine-tuning")
        with bb.disable_adapter():
            hidden = model.encode(batch)
        return self.generation_scores(model, batch, hidden)


ULLME = register(ULLMEParadigm())
