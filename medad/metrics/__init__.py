"""medad.metrics: the one place where anomaly-detection metrics and thresholds are computed.

Image AUROC, pixel AUROC, AUPRO (FPR <= 0.3, normalised), pixel average precision, best-possible
Dice (with its threshold), Dice/IoU/precision/recall at a threshold, threshold calibration on
normal data, and per-case / pooled summaries. Inputs may be numpy arrays or torch tensors, one
stacked array ``(N, *spatial)`` or a list of per-case arrays of different shapes (2D or 3D).
"""

from medad.metrics.pro import aupro, partial_auc, pro_curve
from medad.metrics.ranking import (
    auroc_from_counts,
    auroc_from_pixels,
    average_precision,
    average_precision_from_counts,
    average_precision_from_pixels,
    image_auroc,
    pixel_auroc,
    pooled_pixels,
    pr_curve_points,
    roc_curve_points,
)
from medad.metrics.segmentation import (
    best_dice,
    best_f1_from_counts,
    best_f1_from_pixels,
    confusion_counts,
    scores_from_pixels,
    segmentation_scores,
    threshold_at_fpr,
    threshold_f1_max,
)
from medad.metrics.summary import per_case_metrics, pooled_metrics
from medad.metrics.utils import as_cases, label_regions, pool_pixels, prepare_cohort, threshold_counts, to_numpy

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "average_precision",
    "roc_curve_points",
    "pr_curve_points",
    "pooled_pixels",
    "auroc_from_pixels",
    "auroc_from_counts",
    "average_precision_from_pixels",
    "average_precision_from_counts",
    "aupro",
    "pro_curve",
    "partial_auc",
    "best_dice",
    "best_f1_from_pixels",
    "best_f1_from_counts",
    "segmentation_scores",
    "scores_from_pixels",
    "confusion_counts",
    "threshold_at_fpr",
    "threshold_f1_max",
    "per_case_metrics",
    "pooled_metrics",
    "to_numpy",
    "as_cases",
    "prepare_cohort",
    "pool_pixels",
    "label_regions",
    "threshold_counts",
]
