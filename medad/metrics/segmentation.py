"""Segmentation metrics at a threshold, the best-possible Dice, and threshold selection.

Rule everywhere: a pixel is predicted anomalous when ``map >= threshold`` (the convention of
sklearn's ROC/PR curves, so thresholds read off those curves reproduce their counts exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from medad.metrics.ranking import pooled_pixels
from medad.metrics.utils import ArrayLike, CohortLike, threshold_counts, to_numpy

__all__ = [
    "best_dice",
    "segmentation_scores",
    "confusion_counts",
    "scores_from_pixels",
    "best_f1_from_pixels",
    "best_f1_from_counts",
    "threshold_at_fpr",
    "threshold_f1_max",
]


def best_f1_from_pixels(
    values: np.ndarray, labels: np.ndarray, num_thresholds: int | None = None, name: str = "best_dice"
) -> tuple[float, float]:
    """Maximum F1 (= Dice) over thresholds from pooled ``values (P,)``, ``labels (P,)``: ``(f1, threshold)``."""
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError(f"{name}: there is no anomalous pixel, so the best Dice is undefined.")
    # Candidate thresholds come from the anomaly-map values, never from the labels. DISYRE's official
    # evaluation code takes its threshold range from the ground-truth array instead of the anomaly map
    # (a bug); we deliberately do not copy it.
    if num_thresholds is None:
        grid = None  # exact: every distinct map value (F1 = 2PR / (P + R) of the precision-recall curve)
    elif num_thresholds < 2:
        raise ValueError(f"{name}: num_thresholds must be at least 2, got {num_thresholds}.")
    else:
        grid = np.linspace(values.min(), values.max(), int(num_thresholds))
    thresholds, tp, fp = threshold_counts(values[~labels], values[labels], thresholds=grid)
    return best_f1_from_counts(thresholds, tp, fp, n_pos)


def best_f1_from_counts(thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: int) -> tuple[float, float]:
    """Maximum F1 over the counts of :func:`~medad.metrics.utils.threshold_counts`: ``(f1, threshold)``.

    Ties go to the highest threshold (the most conservative segmentation).
    """
    f1 = 2 * tp / (tp + fp + n_pos)  # = 2PR / (P + R) = 2TP / (2TP + FP + FN) with FN = n_pos - TP
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def best_dice(
    maps: CohortLike,
    masks: CohortLike | None,
    region: CohortLike | None = None,
    num_thresholds: int | None = None,
) -> tuple[float, float]:
    """Best-possible Dice over all thresholds, pooled over all valid pixels: returns ``(dice, threshold)``.

    Exact by default: Dice equals F1 = 2PR / (P + R), evaluated at every distinct map value through the
    precision-recall curve. This is an optimistic upper bound (the threshold is tuned on the test
    labels); report it together with the Dice at a threshold chosen on normal data
    (:func:`threshold_at_fpr` + :func:`segmentation_scores`).

    Args:
        maps: ``(N, *spatial)`` anomaly maps or a list of ``N`` arrays of any shapes.
        masks: ground-truth masks in the same layout (``None`` entries = normal case).
        region: optional masks of valid pixels (e.g. brain masks).
        num_thresholds: ``None`` = exact; an integer = that many evenly spaced thresholds between the
            minimum and maximum map value.
    """
    values, labels = pooled_pixels(maps, masks, region, "best_dice")
    return best_f1_from_pixels(values, labels, num_thresholds, "best_dice")


def confusion_counts(
    maps: CohortLike, masks: CohortLike | None, threshold: float, region: CohortLike | None = None
) -> dict[str, int]:
    """Pooled pixel counts ``tp, fp, fn, tn`` of the prediction ``map >= threshold``."""
    values, labels = pooled_pixels(maps, masks, region, "confusion_counts")
    return _counts(values, labels, threshold)


def _counts(values: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    predicted = values >= threshold
    tp = int(np.count_nonzero(predicted & labels))
    fp = int(np.count_nonzero(predicted & ~labels))
    fn = int(np.count_nonzero(~predicted & labels))
    tn = int(values.size - tp - fp - fn)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def scores_from_pixels(values: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """:func:`segmentation_scores` on already pooled ``values (P,)`` and boolean ``labels (P,)``."""
    counts = _counts(values, labels, threshold)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    union = tp + fp + fn
    scores: dict[str, float] = {
        "dice": 2 * tp / (2 * tp + fp + fn) if union else 1.0,
        "iou": tp / union if union else 1.0,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
    }
    scores.update(counts)
    return scores


def segmentation_scores(
    maps: CohortLike, masks: CohortLike | None, threshold: float, region: CohortLike | None = None
) -> dict[str, float]:
    """Dice, IoU, precision and recall of ``map >= threshold``, pooled over all valid pixels.

    Definitions: precision = TP / (TP + FP), recall = TP / (TP + FN), Dice = 2TP / (2TP + FP + FN),
    IoU = TP / (TP + FP + FN). (AnoDDPM's evaluation code swaps FP and FN; we do not.)

    Empty masks: when both the prediction and the ground truth are empty, Dice = IoU = 1 (perfect
    agreement); when exactly one is empty they are 0. Precision is NaN when nothing is predicted and
    recall is NaN when the ground truth is empty (0 / 0, undefined).

    Args:
        maps: ``(N, *spatial)`` anomaly maps or a list of ``N`` arrays of any shapes.
        masks: ground-truth masks in the same layout (``None`` entries = normal case).
        threshold: pixels with ``map >= threshold`` are predicted anomalous.
        region: optional masks of valid pixels (e.g. brain masks).

    Returns:
        dict with float ``dice, iou, precision, recall`` and integer ``tp, fp, fn, tn``.
    """
    values, labels = pooled_pixels(maps, masks, region, "segmentation_scores")
    return scores_from_pixels(values, labels, threshold)


def _pool_values(values: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    if isinstance(values, (list, tuple)):
        return np.concatenate([to_numpy(v).ravel() for v in values]) if values else np.zeros(0)
    return to_numpy(values).ravel()


def threshold_at_fpr(normal_values: ArrayLike | Sequence[ArrayLike], fpr: float) -> float:
    """Threshold calibrated on normal-only data: the empirical ``(1 - fpr)`` quantile of its values.

    With ``k = floor(fpr * n)`` of the ``n`` normal values, the threshold is the smallest value of the
    data such that at most ``k`` values satisfy ``value >= threshold``; i.e. the false-positive rate on
    the calibration data never exceeds ``fpr``. Without ties this is the ``(n - k)``-th smallest value
    (numpy's ``quantile(..., method="higher")`` up to rounding of the rank). When every value would have
    to be excluded (``k = 0``), it is the next float above the maximum.

    Args:
        normal_values: anomaly-map values of normal data (e.g. brain voxels of healthy validation
            volumes), any shape, or a list of such arrays.
        fpr: target false-positive rate in ``[0, 1]``.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"threshold_at_fpr: fpr must be in [0, 1], got {fpr}.")
    values = np.sort(_pool_values(normal_values))
    n = values.size
    if n == 0:
        raise ValueError("threshold_at_fpr: no normal values were given.")
    if not np.all(np.isfinite(values)):
        raise ValueError("threshold_at_fpr: normal values contain NaN or infinite values.")
    k = int(np.floor(fpr * n + 1e-9))  # tolerance: fpr * n = 4.999999 must still mean 5 values
    if k >= n:
        return float(values[0])
    # the (k+1)-th largest value must be excluded; the next distinct value above it is the threshold
    excluded = values[n - k - 1]
    above = int(np.searchsorted(values, excluded, side="right"))
    return float(values[above]) if above < n else float(np.nextafter(excluded, np.inf))


def threshold_f1_max(values: CohortLike, labels: CohortLike) -> float:
    """The threshold maximising F1 (= Dice) of ``values >= threshold`` against ``labels`` (exact).

    Args:
        values: anomaly-map values, ``(N, *spatial)`` or a list of arrays.
        labels: ground truth in the same layout, non-zero = anomalous.
    """
    pooled_values, pooled_labels = pooled_pixels(values, labels, None, "threshold_f1_max")
    return best_f1_from_pixels(pooled_values, pooled_labels, None, "threshold_f1_max")[1]
