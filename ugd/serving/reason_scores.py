"""Scores of generated reasons against gold ones: ROUGE-L (Google's ``rouge-score``) and corpus BLEU
(``sacrebleu``), both multi-reference. Neither is re-implemented here: the numbers are the packages'.

    refs = gold_references(record)            # record["references"] or [record["reason"]]; [] without gold
    scores = score_reasons(generated, refs)   # {"rouge_l", "bleu", "per_sample_rouge_l", ...}

* ROUGE-L: ``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``, the F-measure; with several
  references, the best one (``score_multi``: the max over references). The per-sample values are kept
  so that a study can bootstrap them; ``rouge_l`` is their mean. rouge-score's tokenizer keeps only
  ASCII letters and digits: text in other scripts (Chinese) scores 0 -- use BLEU there.
* BLEU: ``sacrebleu.metrics.BLEU().corpus_score`` (13a tokenization, 0-100 scale); a sample with fewer
  references than the others gets ``None`` in the missing reference streams, which sacrebleu skips.

Both packages are the ``eval`` extra (``ugd._extras.install_hint('eval')``); without them ``require()`` raises
``ReasonScoresUnavailable`` saying so.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .._extras import install_hint

INSTALL_HINT = install_hint("eval")


class ReasonScoresUnavailable(RuntimeError):
    """rouge-score or sacrebleu is not installed."""


def available() -> bool:
    """Whether both scoring packages import."""
    try:
        require()
    except ReasonScoresUnavailable:
        return False
    return True


def require() -> None:
    """Raises ``ReasonScoresUnavailable`` (one line, how to install) unless both packages import."""
    missing = []
    try:
        from rouge_score import rouge_scorer  # noqa: F401
    except ImportError:
        missing.append("rouge-score")
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        missing.append("sacrebleu")
    if missing:
        raise ReasonScoresUnavailable(f"reason scores need {' and '.join(missing)}: {INSTALL_HINT} "
                                      "(or pass --reason_samples 0 / leave out the reason mode)")


def gold_references(record: Mapping) -> list[str]:
    """The gold reasons of a record: its ``references`` list when it has one, else ``[reason]``; empty
    strings and None are dropped, so a record without a gold reason gives ``[]``."""
    refs = record.get("references") or [record.get("reason")]
    return [r for r in refs if isinstance(r, str) and r.strip()]


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str], scorer=None) -> float:
    """ROUGE-L F-measure of one prediction against its best reference."""
    scorer = scorer or _rouge_scorer()
    return float(scorer.score_multi(list(references), prediction)["rougeL"].fmeasure)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """sacrebleu's corpus BLEU (a ``BLEUScore``: ``.score`` 0-100) of the predictions, each against its
    own list of references (lists may differ in length)."""
    from sacrebleu.metrics import BLEU

    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    metric = BLEU()
    return metric.corpus_score(list(predictions), streams), metric


def score_reasons(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """ROUGE-L (mean of per-sample F-measures) and corpus BLEU of ``predictions`` against ``references``
    (one non-empty list of gold reasons per prediction)."""
    require()
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference (leave records without gold reasons out)")
    if not predictions:
        return {"rouge_l": None, "bleu": None, "per_sample_rouge_l": [], "bleu_signature": None}
    scorer = _rouge_scorer()
    per_sample = [rouge_l(p, refs, scorer) for p, refs in zip(predictions, references)]
    bleu, metric = corpus_bleu(predictions, references)
    return {"rouge_l": sum(per_sample) / len(per_sample), "bleu": float(bleu.score),
            "per_sample_rouge_l": per_sample, "bleu_signature": str(metric.get_signature())}


__all__ = ["INSTALL_HINT", "ReasonScoresUnavailable", "available", "corpus_bleu", "gold_references", "require",
           "rouge_l", "score_reasons"]
