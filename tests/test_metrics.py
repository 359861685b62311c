"""Confusion matrices on labelled pixels and one-vs-rest metrics against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rcmseg.classes import UNLABELLED
from rcmseg.metrics import (
    boundary_length_per_mm2,
    components_per_mm2,
    confusion_matrix,
    fragmentation,
    one_vs_rest,
)

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


# --- fragmentation: components and boundary length per mm² of lesion ----------------------------


def test_fragmentation_of_a_hand_made_map() -> None:
    # 10 x 10 px at 100 µm/px (1 mm per 10 px): background (0) with a 4 x 4 square of ring (4)
    # holding one meshwork (2) pixel, and a 2 x 1 aspecific (5) bar elsewhere.
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[1:5, 1:5] = 4
    labels[2, 2] = 2
    labels[7, 6:8] = 5
    f = fragmentation(labels, pixel_mpp=100.0)
    # lesion pixels: 16 (square, incl. the meshwork pixel) + 2 (bar) = 18 px of 0.01 mm²
    assert f["lesion_mm2"] == pytest.approx(0.18)
    # components: ring 1 (the square with a hole), meshwork 1, aspecific 1
    assert f["components"] == 3
    # boundary edges: square perimeter 16 + the meshwork pixel's 4 + bar perimeter 6 = 26 edges
    assert f["boundary_mm"] == pytest.approx(2.6)
    assert f["components_per_mm2"] == pytest.approx(3 / 0.18)
    assert f["boundary_mm_per_mm2"] == pytest.approx(2.6 / 0.18)
    assert components_per_mm2(labels, 100.0) == pytest.approx(3 / 0.18)
    assert boundary_length_per_mm2(labels, 100.0) == pytest.approx(2.6 / 0.18)


def test_fragmentation_counts_islands_and_connectivity() -> None:
    # a checkerboard of nested (3) pixels on background: 4-connected, every pixel is an island;
    # 8-connected, they form one component
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[::2, ::2] = 3
    labels[1::2, 1::2] = 3
    assert fragmentation(labels, 2.0)["components"] == 8
    assert fragmentation(labels, 2.0, connectivity=2)["components"] == 1
    # 8 lesion px at 2 µm: 32 µm² = 3.2e-5 mm²; 24 inner edges between unequal neighbours
    f = fragmentation(labels, 2.0)
    assert f["lesion_mm2"] == pytest.approx(3.2e-5)
    assert f["boundary_mm"] == pytest.approx(24 * 0.002)


def test_fragmentation_ignores_unlabelled_borders_and_non_lesion_boundaries() -> None:
    labels = np.array([[0, 1, 1], [U, 2, 2], [U, 2, 2]], dtype=np.uint8)
    f = fragmentation(labels, 1000.0)  # 1 mm pixels
    # background-artifact edge is not lesion; edges to UNLABELLED are not boundaries;
    # lesion (meshwork) edges: two to artifact above = 2 mm
    assert f["components"] == 1
    assert f["lesion_mm2"] == pytest.approx(4.0)
    assert f["boundary_mm"] == pytest.approx(2.0)


def test_fragmentation_without_lesion_is_nan_and_bad_input_is_refused() -> None:
    f = fragmentation(np.zeros((3, 3), dtype=np.uint8), 2.0)
    assert f["components"] == 0 and math.isnan(f["components_per_mm2"])
    with pytest.raises(ValueError, match="H, W"):
        fragmentation(np.zeros((1, 3, 3), dtype=np.uint8), 2.0)
    with pytest.raises(ValueError, match="positive"):
        fragmentation(np.zeros((3, 3), dtype=np.uint8), 0.0)
