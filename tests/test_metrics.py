"""Confusion matrices on labelled pixels and one-vs-rest metrics against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rcmseg.classes import UNLABELLED
from rcmseg.metrics import confusion_matrix, one_vs_rest

U = UNLABELLED
# Truth and prediction of 8 pixels, 2 unlabelled. Labelled (truth, prediction) pairs:
# (0,0) (0,0) (0,1) (1,1) (1,2) (2,2).
LABELS = np.array([[0, 0, 0, 1], [1, 2, U, U]], dtype=np.uint8)
PRED = np.array([[0, 0, 1, 1], [2, 2, 0, 1]], dtype=np.uint8)
HAND_CM = np.array([[2, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_confusion_matrix_by_hand() -> None:
    cm = confusion_matrix(PRED, LABELS, num_classes=3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, HAND_CM)


def test_torch_inputs_give_the_same_matrix() -> None:
    cm = confusion_matrix(torch.from_numpy(PRED).long(), torch.from_numpy(LABELS), num_classes=3)
    np.testing.assert_array_equal(cm, HAND_CM)


def test_matrices_sum_over_mosaics_to_the_pooled_matrix() -> None:
    rng = np.random.default_rng(0)
    labels = [rng.choice([0, 1, 2, 3, 4, 5, U], size=(20, 30)).astype(np.uint8) for _ in range(3)]
    preds = [rng.integers(0, 6, size=(20, 30)) for _ in range(3)]
    pooled = confusion_matrix(np.concatenate(preds), np.concatenate(labels))
    summed = sum(confusion_matrix(p, t) for p, t in zip(preds, labels, strict=True))
    np.testing.assert_array_equal(summed, pooled)
    assert pooled.sum() == sum(int((t != U).sum()) for t in labels)


def test_one_vs_rest_by_hand() -> None:
    """Class 0: TP 2, FN 1, FP 0, TN 3. Class 1: TP 1, FN 1, FP 1, TN 3.
    Class 2: TP 1, FN 0, FP 1, TN 4."""
    metrics = one_vs_rest(HAND_CM)
    np.testing.assert_allclose(metrics["sensitivity"], [2 / 3, 1 / 2, 1])
    np.testing.assert_allclose(metrics["specificity"], [3 / 3, 3 / 4, 4 / 5])
    np.testing.assert_allclose(metrics["dice"], [4 / 5, 2 / 4, 2 / 3])
    assert metrics["mean_sensitivity"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert metrics["mean_specificity"] == pytest.approx((1 + 3 / 4 + 4 / 5) / 3)
    assert metrics["mean_dice"] == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    np.testing.assert_array_equal(metrics["support"], [3, 2, 1])


def test_zero_denominators_give_nan_and_means_skip_them() -> None:
    # Class 2 never occurs and is never predicted: its sensitivity and Dice are 0/0.
    cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    metrics = one_vs_rest(cm)
    assert math.isnan(metrics["sensitivity"][2]) and math.isnan(metrics["dice"][2])
    assert metrics["specificity"][2] == 1.0
    assert metrics["mean_sensitivity"] == pytest.approx((3 / 4 + 1) / 2)
    assert metrics["mean_dice"] == pytest.approx((6 / 7 + 4 / 5) / 2)
    empty = one_vs_rest(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(empty["mean_dice"])


def test_perfect_prediction_scores_one() -> None:
    labels = np.array([0, 1, 2, 3, 4, 5, U])
    metrics = one_vs_rest(confusion_matrix(np.array([0, 1, 2, 3, 4, 5, 0]), labels))
    assert metrics["mean_dice"] == 1.0
    assert metrics["mean_sensitivity"] == 1.0
    assert metrics["mean_specificity"] == 1.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED[:, :3], LABELS, num_classes=3)
    with pytest.raises(ValueError, match="labels must be"):
        confusion_matrix(PRED, np.full_like(LABELS, 7), num_classes=3)
    with pytest.raises(ValueError, match="predictions must be"):
        confusion_matrix(np.full_like(PRED, 3), LABELS, num_classes=3)
    with pytest.raises(ValueError, match="square"):
        one_vs_rest(np.zeros((2, 3)))
