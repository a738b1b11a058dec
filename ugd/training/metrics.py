"""Classification metrics of the matching heads: accuracy, ROC AUC, macro-F1 and the confusion
matrix, without scikit-learn.

    accuracy(logits, labels)            fraction of samples whose argmax is the label
    confusion_matrix(logits, labels, C) [C, C] counts: row = true label, column = argmax prediction
    macro_f1(logits, labels)            unweighted mean of the per-class F1 (as scikit-learn's
                                        f1_score(average="macro"): over the classes that occur as a
                                        label or a prediction; a class never predicted correctly has F1 0)
    binary_auc(scores, positives)       ROC AUC of one score against a 0/1 truth (ties count 1/2)
    roc_auc(logits, labels)             two classes: binary AUC of class 1's probability;
                                        more: macro one-vs-rest AUC over the classes
    head_metrics(logits, labels)        {"acc": ..., "auc": ...}

Samples whose label is -100 (no label) are left out everywhere. AUC is the Mann-Whitney statistic:
the probability that a random positive scores higher than a random negative, ties counted as 1/2,
computed from average ranks in O(n log n). One-vs-rest AUC is averaged, unweighted, over the classes
that have both positive and negative samples (a class absent from the labels has no AUC; scikit-
learn raises there, we skip it and return NaN only when no class qualifies).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

IGNORE_INDEX = -100


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _labelled(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = _as_numpy(logits).astype(np.float64)
    labels = _as_numpy(labels).astype(np.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [N, C] and labels [N]; got {logits.shape} and {labels.shape}")
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep]
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) (or be {IGNORE_INDEX}); "
                         f"got values from {labels.min()} to {labels.max()}")
    return logits, labels


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def accuracy(logits, labels) -> float:
    """Fraction of labelled samples whose arg-max logit is the label (NaN when none is labelled)."""
    logits, labels = _labelled(logits, labels)
    if labels.size == 0:
        return math.nan
    return float((logits.argmax(axis=-1) == labels).mean())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def binary_auc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """ROC AUC of ``scores`` for the 0/1 truth ``positives``: P(score of a positive > score of a
    negative) + 1/2 P(equal). NaN when there are no positives or no negatives."""
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    y = _as_numpy(positives).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and positives must have the same length; got {s.shape} and {y.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0  # Mann-Whitney U of the positives
    return float(u / (n_pos * n_neg))


def roc_auc(logits, labels) -> float:
    """AUC of a classifier's logits [N, C]: with C = 2 the binary AUC of P(class 1); with C > 2 the
    macro (unweighted) mean of the one-vs-rest AUCs of the classes that have positives and negatives."""
    logits, labels = _labelled(logits, labels)
    if labels.size == 0:
        return math.nan
    probs = softmax(logits)
    if probs.shape[1] == 2:
        return binary_auc(probs[:, 1], labels == 1)
    aucs = [binary_auc(probs[:, c], labels == c) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def confusion_matrix(logits, labels, num_classes: int | None = None) -> np.ndarray:
    """``[C, C]`` int64 counts of the labelled samples: ``m[true, predicted]`` (predicted = arg-max
    logit). ``num_classes`` defaults to the logits' width and may not be smaller."""
    logits, labels = _labelled(logits, labels)
    c = logits.shape[1] if num_classes is None else num_classes
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < logits.shape[1]:
        raise ValueError(f"num_classes must be an int >= the logits' width {logits.shape[1]}, got {num_classes!r}")
    preds = logits.argmax(axis=-1)
    return np.bincount(labels * c + preds, minlength=c * c).reshape(c, c).astype(np.int64)


def macro_f1(logits, labels) -> float:
    """Unweighted mean F1 over the classes present among the labels or the predictions (NaN when no
    sample is labelled). Per class F1 = 2 TP / (2 TP + FP + FN), 0 for a class predicted but absent."""
    m = confusion_matrix(logits, labels)
    if m.sum() == 0:
        return math.nan
    tp = np.diag(m).astype(np.float64)
    support, predicted = m.sum(axis=1), m.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])  # 2TP + FP + FN = support + predicted
    return float(f1.mean())


def head_metrics(logits, labels) -> dict:
    """``{"acc": accuracy, "auc": roc_auc}`` of one head."""
    return {"acc": accuracy(logits, labels), "auc": roc_auc(logits, labels)}


__all__ = ["accuracy", "binary_auc", "confusion_matrix", "head_metrics", "macro_f1", "roc_auc", "softmax"]
