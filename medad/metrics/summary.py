"""Per-case and cohort-pooled metric tables, the two views every experiment reports.

Pooled metrics treat the cohort as one big image (MVTec AD / BraTS convention for pixel AUROC,
AUPRO, AP and best Dice); per-case metrics give one row per image or volume, so a reader can see
the spread that a pooled number hides.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from medad.metrics.pro import aupro
from medad.metrics.ranking import auroc_from_counts, average_precision_from_counts
from medad.metrics.segmentation import best_f1_from_counts, scores_from_pixels
from medad.metrics.utils import ArrayLike, CohortLike, pool_pixels, prepare_cohort, threshold_counts, to_numpy

__all__ = ["per_case_metrics", "pooled_metrics"]

_NAN = float("nan")
_THRESHOLD_KEYS = ("dice", "iou", "precision", "recall")


def _image_scores(scores: ArrayLike | None, n_cases: int, name: str) -> np.ndarray | None:
    if scores is None:
        return None
    scores_np = to_numpy(scores).ravel()
    if scores_np.size != n_cases:
        raise ValueError(f"{name}: {scores_np.size} image scores were given for {n_cases} cases.")
    return scores_np


def per_case_metrics(
    maps: CohortLike,
    masks: CohortLike | None,
    scores: ArrayLike | None = None,
    region: CohortLike | None = None,
    threshold: float | None = None,
) -> list[dict[str, float]]:
    """One dict of metrics per case (image or volume), in input order.

    Args:
        maps: ``(N, *spatial)`` anomaly maps or a list of ``N`` arrays of any shapes.
        masks: ground-truth masks in the same layout; ``None`` (or a ``None`` entry) = normal case.
        scores: optional ``(N,)`` image-level anomaly scores, copied into the rows.
        region: optional masks of valid pixels (e.g. brain masks).
        threshold: optional fixed threshold (e.g. from :func:`threshold_at_fpr` on normal data).

    Returns:
        for each case: ``case`` (index), ``anomalous_pixels`` (count in the valid region), ``score``
        (when ``scores`` is given), ``ap``, ``best_dice``, ``best_dice_threshold`` (NaN for a case
        without anomalous pixels, where they are undefined) and, when ``threshold`` is given,
        ``dice, iou, precision, recall`` at that threshold (see :func:`segmentation_scores` for the
        empty-mask conventions: a normal case with no false positive has Dice 1).
    """
    map_cases, mask_cases, region_cases = prepare_cohort(maps, masks, region, "per_case_metrics")
    image_scores = _image_scores(scores, len(map_cases), "per_case_metrics")
    rows = []
    for i, (case_map, case_mask, case_region) in enumerate(zip(map_cases, mask_cases, region_cases)):
        values, labels = pool_pixels([case_map], [case_mask], [case_region])
        n_pos = int(labels.sum())
        row: dict[str, float] = {"case": i, "anomalous_pixels": n_pos}
        if image_scores is not None:
            row["score"] = float(image_scores[i])
        if n_pos:
            thresholds, tp, fp = threshold_counts(values[~labels], values[labels])
            row["ap"] = average_precision_from_counts(tp, fp)
            row["best_dice"], row["best_dice_threshold"] = best_f1_from_counts(thresholds, tp, fp, n_pos)
        else:
            row["ap"] = row["best_dice"] = row["best_dice_threshold"] = _NAN
        if threshold is not None:
            at_threshold = scores_from_pixels(values, labels, threshold)
            row.update({key: at_threshold[key] for key in _THRESHOLD_KEYS})
        rows.append(row)
    return rows


def pooled_metrics(
    maps: CohortLike,
    masks: CohortLike | None,
    scores: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    region: CohortLike | None = None,
    threshold: float | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Cohort-level metrics, pixels pooled over all cases.

    Args:
        maps: ``(N, *spatial)`` anomaly maps or a list of ``N`` arrays of any shapes.
        masks: ground-truth masks in the same layout; ``None`` (or a ``None`` entry) = normal case.
        scores: optional ``(N,)`` image-level anomaly scores.
        labels: optional ``(N,)`` image-level labels (non-zero = anomalous); default: a case is
            anomalous when its mask has any anomalous pixel.
        region: optional masks of valid pixels (e.g. brain masks).
        threshold: optional fixed threshold for ``dice, iou, precision, recall``.
        fpr_limit: FPR limit of AUPRO.

    Returns:
        ``image_auroc``, ``pixel_auroc``, ``aupro``, ``pixel_ap``, ``best_dice``,
        ``best_dice_threshold`` and, when ``threshold`` is given, ``dice, iou, precision, recall``.
        A metric is NaN when it is undefined for these data (e.g. ``image_auroc`` without scores or
        with a single image class, pixel metrics when no pixel is anomalous).
    """
    map_cases, mask_cases, region_cases = prepare_cohort(maps, masks, region, "pooled_metrics")
    image_scores = _image_scores(scores, len(map_cases), "pooled_metrics")
    if labels is None:
        image_labels = np.array([m.any() for m in mask_cases])
    else:
        image_labels = to_numpy(labels, bool).ravel()
        if image_labels.size != len(map_cases):
            raise ValueError(f"pooled_metrics: {image_labels.size} image labels were given for {len(map_cases)} cases.")
    both_image_classes = 0 < image_labels.sum() < image_labels.size
    result: dict[str, float] = {
        "image_auroc": float(roc_auc_score(image_labels, image_scores))
        if image_scores is not None and both_image_classes
        else _NAN
    }
    values, pixel_labels = pool_pixels(map_cases, mask_cases, region_cases)
    n_pos = int(pixel_labels.sum())
    if 0 < n_pos < pixel_labels.size:
        # one exact curve serves AUROC, AP and the best Dice
        thresholds, tp, fp = threshold_counts(values[~pixel_labels], values[pixel_labels])
        result["pixel_auroc"] = auroc_from_counts(tp, fp)
        result["aupro"] = aupro(map_cases, mask_cases, fpr_limit=fpr_limit, region=region_cases)
        result["pixel_ap"] = average_precision_from_counts(tp, fp)
        result["best_dice"], result["best_dice_threshold"] = best_f1_from_counts(thresholds, tp, fp, n_pos)
    else:
        for key in ("pixel_auroc", "aupro", "pixel_ap", "best_dice", "best_dice_threshold"):
            result[key] = _NAN
    if threshold is not None:
        at_threshold = scores_from_pixels(values, pixel_labels, threshold)
        result.update({key: at_threshold[key] for key in _THRESHOLD_KEYS})
    return result
