"""ugd.training.metrics: accuracy, AUC, macro-F1 and the confusion matrix checked against hand computations
(and against scikit-learn where it is installed)."""

import itertools
import math

import numpy as np
import pytest
import torch

from ugd.training.metrics import accuracy, binary_auc, confusion_matrix, head_metrics, macro_f1, roc_auc, softmax


def pairwise_auc(scores, positives):
    """AUC by definition: over all (positive, negative) pairs, 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, positives) if y]
    neg = [s for s, y in zip(scores, positives) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_binary_auc_textbook_example():
    # positives 0.35 and 0.8, negatives 0.1 and 0.4: pairs (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_binary_auc_ties_count_half():
    assert binary_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    # positives {0.3, 0.7}, negatives {0.3, 0.1}: (0.3=0.3 -> 1/2) (0.3>0.1) (0.7>0.3) (0.7>0.1) -> 3.5/4
    assert binary_auc([0.3, 0.7, 0.3, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)


def test_binary_auc_extremes_and_degenerate():
    assert binary_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert binary_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(binary_auc([0.1, 0.2], [1, 1]))
    assert math.isnan(binary_auc([0.1, 0.2], [0, 0]))
    with pytest.raises(ValueError, match="NaN"):
        binary_auc([float("nan"), 0.2], [0, 1])


def test_binary_auc_matches_pairwise_definition_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        assert binary_auc(scores, y) == pytest.approx(pairwise_auc(scores, y), abs=1e-12)


def test_roc_auc_binary_uses_probability_of_class_one():
    logits = torch.tensor([[0.0, -2.0], [0.0, 1.0], [0.0, 0.5], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # P(class 1) is monotone in the second logit: scores -2, 1, 0.5, 3 -> pairs as in the textbook case: 3/4
    assert roc_auc(logits, labels) == pytest.approx(0.75)


def test_roc_auc_macro_one_vs_rest_by_hand():
    # three classes, four samples (no tied probabilities within a class: ties are tested on binary_auc,
    # where the scores are given exactly); the one-vs-rest AUC of each class is computed by hand below
    logits = np.log(np.array([
        [0.7, 0.2, 0.1],   # label 0
        [0.3, 0.4, 0.3],   # label 1
        [0.2, 0.15, 0.65], # label 2
        [0.5, 0.1, 0.4],   # label 2
    ]))
    labels = [0, 1, 2, 2]
    # class 0: positive 0.7 vs negatives 0.3, 0.2, 0.5 -> 3/3 = 1
    # class 1: positive 0.4 vs negatives 0.2, 0.15, 0.1 -> 1
    # class 2: positives 0.65, 0.4 vs negatives 0.1, 0.3 -> (1 + 1 + 1 + 1) / 4 = 1
    assert roc_auc(logits, labels) == pytest.approx(1.0)
    labels = [1, 0, 2, 0]
    # class 0: positives 0.3, 0.5 vs negatives 0.7, 0.2 -> (0 + 1 + 0 + 1) / 4 = 0.5
    # class 1: positive 0.2 vs negatives 0.4, 0.15, 0.1 -> (0 + 1 + 1) / 3
    # class 2: positive 0.65 vs negatives 0.1, 0.3, 0.4 -> 1
    assert roc_auc(logits, labels) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_roc_auc_skips_absent_class_and_unlabelled_samples():
    logits = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))
    labels = [0, 1, 0, -100]  # class 2 never occurs among labelled samples
    # class 0: positives 0.6, 0.5 vs negative 0.2 -> 1 ; class 1: positive 0.7 vs 0.3, 0.4 -> 1
    assert roc_auc(logits, labels) == pytest.approx(1.0)
    assert accuracy(logits, labels) == pytest.approx(1.0)


def test_accuracy_and_head_metrics():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 2, 3, -100])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    m = head_metrics(logits, labels)
    assert set(m) == {"acc", "auc"} and m["acc"] == pytest.approx(2 / 3)
    assert math.isnan(accuracy(logits, torch.full((4,), -100)))
    with pytest.raises(ValueError, match="labels must lie"):
        accuracy(logits, torch.tensor([0, 1, 2, 4]))


def test_softmax_rows_sum_to_one_and_are_stable():
    p = softmax(np.array([[1000.0, 1000.0], [-5.0, 5.0]]))
    assert np.allclose(p.sum(1), 1.0) and np.allclose(p[0], 0.5)


def _one_hot_logits(preds, num_classes):
    return np.eye(num_classes)[np.asarray(preds)]


def test_confusion_matrix_by_hand():
    # true 0 0 1 2 2 (and one unlabelled), predicted 0 1 1 2 0
    logits = _one_hot_logits([0, 1, 1, 2, 0, 2], 3)
    labels = [0, 0, 1, 2, 2, -100]
    m = confusion_matrix(logits, labels, 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert m.dtype == np.int64 and m.sum() == 5  # the unlabelled sample is left out
    assert confusion_matrix(logits, labels, 4).shape == (4, 4)  # wider than the logits is fine
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(logits, labels, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        confusion_matrix(logits, [0, 0, 1, 2, 3, 0], 3)


def test_macro_f1_by_hand():
    logits = _one_hot_logits([0, 1, 1, 2, 0], 3)
    labels = [0, 0, 1, 2, 2]
    # class 0: TP 1, FP 1, FN 1 -> 1/2; class 1: TP 1, FP 1, FN 0 -> 2/3; class 2: TP 1, FP 0, FN 1 -> 2/3
    assert macro_f1(logits, labels) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert macro_f1(_one_hot_logits([0, 1], 4), [0, 1]) == 1.0  # classes 2, 3 occur nowhere: not averaged
    assert macro_f1(_one_hot_logits([1, 1], 2), [0, 0]) == 0.0  # a predicted-only class counts with F1 0
    assert math.isnan(macro_f1(_one_hot_logits([1], 2), [-100]))


def test_macro_f1_and_confusion_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for c in (2, 3, 5):
        for _ in range(10):
            n = int(rng.integers(1, 30))
            logits = rng.normal(size=(n, c))
            labels = rng.integers(0, c, n)
            preds = logits.argmax(1)
            assert macro_f1(logits, labels) == pytest.approx(
                metrics.f1_score(labels, preds, average="macro", zero_division=0), abs=1e-12)
            assert (confusion_matrix(logits, labels, c) == metrics.confusion_matrix(labels, preds, labels=range(c))).all()
