"""The paper's evaluation: confusion matrices on labelled pixels and one-vs-rest class metrics.

Confusion matrices are counts, so summing them over mosaics gives pooled metrics over a test set.
A metric whose denominator is 0 (a class that never occurs in the truth and is never predicted)
is NaN, and the means over classes are NaN-means (NaN only if every class is NaN).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from rcmseg.classes import NUM_CLASSES, UNLABELLED

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
