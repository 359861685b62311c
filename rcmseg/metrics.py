"""The paper's evaluation: confusion matrices on labelled pixels and one-vs-rest class metrics,
and fragmentation of class maps (connected components and boundary length per mm² of lesion).

Confusion matrices are counts, so summing them over mosaics gives pooled metrics over a test set.
A metric whose denominator is 0 (a class that never occurs in the truth and is never predicted)
is NaN, and the means over classes are NaN-means (NaN only if every class is NaN).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from rcmseg.classes import NON_LESION_CLASSES, NUM_CLASSES, UNLABELLED, WORKING_MPP

METRIC_NAMES: tuple[str, ...] = ("sensitivity", "specificity", "dice")


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int = NUM_CLASSES,
) -> np.ndarray:
    """Counts of (true class, predicted class) over the labelled pixels.

    Args:
        pred: predicted class indices 0..K-1, any shape (e.g. (H, W) or (B, 1, H, W)).
        labels: true labels of the same shape, 0..K-1 or UNLABELLED (ignored).
        num_classes: K.

    Returns:
        (K, K) int64, rows truth, columns prediction.
    """
    pred = _as_numpy(pred)
    labels = _as_numpy(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from labels shape {labels.shape}")
    labelled = labels != UNLABELLED
    truth = labels[labelled].astype(np.int64)
    predicted = pred[labelled].astype(np.int64)
    if truth.size and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"labels must be 0..{num_classes - 1} or {UNLABELLED}")
    if predicted.size and (predicted.min() < 0 or predicted.max() >= num_classes):
        raise ValueError(f"predictions must be 0..{num_classes - 1}")
    counts = np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def one_vs_rest(cm: np.ndarray) -> dict[str, np.ndarray | float]:
    """Per-class one-vs-rest metrics of a confusion matrix (rows truth, columns prediction).

    Returns:
        ``sensitivity`` TP/(TP+FN), ``specificity`` TN/(TN+FP), ``dice`` 2TP/(2TP+FP+FN): (K,)
        float64 arrays, NaN where the denominator is 0; ``mean_sensitivity``,
        ``mean_specificity``, ``mean_dice``: NaN-means over classes (floats); ``support``: (K,)
        int64 labelled pixels per true class.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {cm.shape}")
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    per_class = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    result: dict[str, np.ndarray | float] = dict(per_class)
    for name, values in per_class.items():
        result[f"mean_{name}"] = _nanmean(values)
    result["support"] = cm.sum(axis=1)
    return result


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0."""
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN (without numpy's warning) if all are NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


# --- Fragmentation (the paper's second claim: MED-Net's maps are less fragmented) -------------

FRAGMENTATION_NAMES: tuple[str, ...] = ("components_per_mm2", "boundary_mm_per_mm2")


def lesion_mask(labels: np.ndarray, lesion_classes: Sequence[int] | None = None) -> np.ndarray:
    """bool (H, W): pixels of a lesion class (every class but ``NON_LESION_CLASSES``, i.e. not
    background or artifact); UNLABELLED is never lesion."""
    labels = np.asarray(labels)
    classes = lesion_classes_default() if lesion_classes is None else tuple(lesion_classes)
    return np.isin(labels, classes)


def lesion_classes_default(num_classes: int = NUM_CLASSES) -> tuple[int, ...]:
    """Class indices counted as lesion: all but :data:`rcmseg.classes.NON_LESION_CLASSES`."""
    return tuple(k for k in range(num_classes) if k not in NON_LESION_CLASSES)


def fragmentation(
    labels: np.ndarray,
    pixel_mpp: float = WORKING_MPP,
    lesion_classes: Sequence[int] | None = None,
    connectivity: int = 1,
) -> dict[str, float]:
    """How fragmented a class map is, per mm² of lesion.

    Args:
        labels: uint8 (H, W) class map (a prediction, or a label map: UNLABELLED pixels belong to
            no component and no boundary).
        pixel_mpp: pixel side in µm (2.0 at the working resolution).
        lesion_classes: class indices that form the lesion (default: all but background and
            artifact).
        connectivity: 1 (4-neighbours, default) or 2 (8-neighbours) for connected components.

    Returns:
        ``components``: connected components of each lesion class, summed over classes (an island
        of class k inside class j counts once for k); ``boundary_mm``: length of the pixel edges
        between two labelled pixels of different classes where at least one is lesion (image
        borders and edges to UNLABELLED are not boundaries), in mm; ``lesion_mm2``: lesion area;
        ``components_per_mm2`` and ``boundary_mm_per_mm2``: the first two divided by the lesion
        area (NaN without lesion).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label map is (H, W), got shape {labels.shape}")
    if pixel_mpp <= 0:
        raise ValueError(f"pixel size must be positive, got {pixel_mpp}")
    classes = lesion_classes_default() if lesion_classes is None else tuple(lesion_classes)
    structure = ndimage.generate_binary_structure(2, connectivity)
    components = 0
    for k in classes:
        _, count = ndimage.label(labels == k, structure=structure)
        components += int(count)
    lesion = np.isin(labels, classes)
    labelled = labels != UNLABELLED
    edges = 0
    for axis in (0, 1):  # vertical, then horizontal neighbour pairs
        first = [slice(None), slice(None)]
        second = [slice(None), slice(None)]
        first[axis], second[axis] = slice(1, None), slice(None, -1)
        a, b = tuple(first), tuple(second)
        boundary = (labels[a] != labels[b]) & labelled[a] & labelled[b] & (lesion[a] | lesion[b])
        edges += int(np.count_nonzero(boundary))
    mm = pixel_mpp / 1000.0
    lesion_mm2 = float(lesion.sum()) * mm * mm
    boundary_mm = edges * mm
    per_area = (lambda value: value / lesion_mm2) if lesion_mm2 > 0 else (lambda _v: math.nan)
    return {
        "components": float(components),
        "boundary_mm": boundary_mm,
        "lesion_mm2": lesion_mm2,
        "components_per_mm2": per_area(float(components)),
        "boundary_mm_per_mm2": per_area(boundary_mm),
    }


def components_per_mm2(
    labels: np.ndarray, pixel_mpp: float = WORKING_MPP, connectivity: int = 1
) -> float:
    """Connected components of the lesion classes per mm² of lesion (see :func:`fragmentation`)."""
    return fragmentation(labels, pixel_mpp, connectivity=connectivity)["components_per_mm2"]


def boundary_length_per_mm2(labels: np.ndarray, pixel_mpp: float = WORKING_MPP) -> float:
    """Class boundary length touching lesion, in mm per mm² of lesion (see
    :func:`fragmentation`)."""
    return fragmentation(labels, pixel_mpp)["boundary_mm_per_mm2"]
