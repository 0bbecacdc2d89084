"""Threshold-free ranking metrics: image AUROC, pixel AUROC, pixel average precision, and curve points.

Pixel metrics pool every valid pixel (voxel) of every case into one ranking problem, as in the
MVTec AD and brain-MRI anomaly benchmarks; ``region`` (e.g. a brain mask) removes pixels that must
not count, such as the background outside the skull.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from medad.metrics.utils import ArrayLike, CohortLike, pool_pixels, prepare_cohort, threshold_counts, to_numpy

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "average_precision",
    "roc_curve_points",
    "pr_curve_points",
    "pooled_pixels",
    "auroc_from_counts",
    "average_precision_from_counts",
    "auroc_from_pixels",
    "average_precision_from_pixels",
]


def _require_both_classes(labels: np.ndarray, name: str, what: str) -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        kind = "anomalous" if n_pos == 0 else "normal"
        raise ValueError(f"{name}: there is no {kind} {what}, so the metric is undefined.")


def pooled_pixels(
    maps: CohortLike, masks: CohortLike | None, region: CohortLike | None = None, name: str = "metric"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a cohort and return its valid pixels as ``(values float64 (P,), labels bool (P,))``."""
    map_cases, mask_cases, region_cases = prepare_cohort(maps, masks, region, name)
    return pool_pixels(map_cases, mask_cases, region_cases)


def auroc_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """AUROC from the counts of :func:`~medad.metrics.utils.threshold_counts` (thresholds decreasing).

    Trapezoid area of the exact ROC curve (ties give diagonal segments, i.e. count one half), which
    is what sklearn's ``roc_auc_score`` computes.
    """
    tpr = np.append(0.0, tp / tp[-1])
    fpr = np.append(0.0, fp / fp[-1])
    return float(np.sum(0.5 * (tpr[1:] + tpr[:-1]) * np.diff(fpr)))


def average_precision_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` (step-wise, no interpolation), as sklearn."""
    precision = tp / (tp + fp)
    recall = np.append(0.0, tp / tp[-1])
    return float(np.sum(np.diff(recall) * precision))


def auroc_from_pixels(values: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of pooled ``values (P,)`` against boolean ``labels (P,)``; equals sklearn's ``roc_auc_score``."""
    _, tp, fp = threshold_counts(values[~labels], values[labels])
    return auroc_from_counts(tp, fp)


def average_precision_from_pixels(values: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of pooled ``values (P,)`` against boolean ``labels (P,)``; equals sklearn's."""
    _, tp, fp = threshold_counts(values[~labels], values[labels])
    return average_precision_from_counts(tp, fp)


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of image-level (or volume-level) anomaly scores.

    Args:
        scores: ``(N,)`` anomaly scores, higher = more anomalous.
        labels: ``(N,)`` ground truth, non-zero = anomalous.
    """
    scores_np = to_numpy(scores).ravel()
    labels_np = to_numpy(labels, bool).ravel()
    if scores_np.shape != labels_np.shape:
        raise ValueError(f"image_auroc: {scores_np.size} scores but {labels_np.size} labels.")
    if not np.all(np.isfinite(scores_np)):
        raise ValueError("image_auroc: scores contain NaN or infinite values.")
    _require_both_classes(labels_np, "image_auroc", "image")
    return float(roc_auc_score(labels_np, scores_np))


def pixel_auroc(maps: CohortLike, masks: CohortLike | None, region: CohortLike | None = None) -> float:
    """Pixel-level AUROC pooled over all valid pixels of all cases.

    Args:
        maps: ``(N, *spatial)`` anomaly maps or a list of ``N`` arrays of any shapes.
        masks: ground-truth masks in the same layout (``None`` entries = normal case).
        region: optional masks of valid pixels in the same layout (e.g. brain masks).
    """
    values, labels = pooled_pixels(maps, masks, region, "pixel_auroc")
    _require_both_classes(labels, "pixel_auroc", "pixel")
    return auroc_from_pixels(values, labels)


def average_precision(maps: CohortLike, masks: CohortLike | None, region: CohortLike | None = None) -> float:
    """Pixel-level average precision (area under the step-wise PR curve, sklearn's definition).

    Shapes as in :func:`pixel_auroc`. Undefined (``ValueError``) when no pixel is anomalous.
    """
    values, labels = pooled_pixels(maps, masks, region, "average_precision")
    if not labels.any():
        raise ValueError("average_precision: there is no anomalous pixel, so the metric is undefined.")
    return average_precision_from_pixels(values, labels)


def roc_curve_points(
    maps: CohortLike, masks: CohortLike | None, region: CohortLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve for plotting: returns ``(fpr, tpr, thresholds)``, rule ``map >= threshold``.

    Works for pixel maps (shapes as in :func:`pixel_auroc`) and for image scores ``(N,)`` with labels ``(N,)``.
    """
    values, labels = pooled_pixels(maps, masks, region, "roc_curve_points")
    _require_both_classes(labels, "roc_curve_points", "pixel or image")
    fpr, tpr, thresholds = roc_curve(labels, values)
    return fpr, tpr, thresholds


def pr_curve_points(
    maps: CohortLike, masks: CohortLike | None, region: CohortLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve for plotting: returns ``(precision, recall, thresholds)`` (sklearn order).

    ``precision`` and ``recall`` have one more entry than ``thresholds`` (the final point P=1, R=0).
    Works for pixel maps and for image scores ``(N,)`` with labels ``(N,)``.
    """
    values, labels = pooled_pixels(maps, masks, region, "pr_curve_points")
    if not labels.any():
        raise ValueError("pr_curve_points: there is no anomalous pixel or image, so the curve is undefined.")
    precision, recall, thresholds = precision_recall_curve(labels, values)
    return precision, recall, thresholds
