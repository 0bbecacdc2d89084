"""Per-Region Overlap (PRO) curve and its normalised area up to a false-positive-rate limit (AUPRO).

Definition (Bergmann et al., MVTec AD, IJCV 2021, Sec. 4.2): every connected component of every
ground-truth mask is one region; at a threshold ``t`` its overlap is the fraction of its pixels
with ``map >= t``; PRO(t) is the mean overlap over all regions of the cohort; FPR(t) is measured on
the normal pixels of all images. AUPRO integrates PRO over FPR in ``[0, fpr_limit]`` with the
trapezoid rule, linearly interpolating the curve at exactly ``fpr_limit`` (as the official MVTec AD
evaluation code and anomalib do), and divides by ``fpr_limit`` so a perfect map scores 1.

Vectorised: instead of looping over thresholds and regions, each anomalous pixel carries the weight
``1 / (n_regions * region_size)``, so PRO(t) is the sum of the weights of the pixels ``>= t``. The
normal and the anomalous values are each sorted once; the counts (FPR) and weight sums (PRO) at all
thresholds then come from binary searches and cumulative sums (``threshold_counts``), so the whole
curve costs a few sorts.
"""

from __future__ import annotations

import numpy as np

from medad.metrics.utils import CohortLike, label_regions, prepare_cohort, threshold_counts

__all__ = ["pro_curve", "aupro", "partial_auc"]


def _region_pixels(
    maps: CohortLike, masks: CohortLike | None, region: CohortLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(normal values, anomalous values, per-anomalous-pixel PRO weights)`` pooled over cases."""
    map_cases, mask_cases, region_cases = prepare_cohort(maps, masks, region, "aupro")
    normal_values, anomalous_values, region_ids = [], [], []
    offset = 0
    for m, gt, reg in zip(map_cases, mask_cases, region_cases):
        valid = np.ones(m.shape, dtype=bool) if reg is None else reg
        # components are taken on the full ground truth, then restricted to the valid region, so a
        # lesion touching the region border stays one region rather than being split in pieces
        components, count = label_regions(gt)
        anomalous = gt & valid
        normal_values.append(m[~gt & valid])
        anomalous_values.append(m[anomalous])
        region_ids.append(components[anomalous] + offset)
        offset += count
    normal = np.concatenate(normal_values)
    anomalous = np.concatenate(anomalous_values)
    ids = np.concatenate(region_ids)
    if normal.size == 0:
        raise ValueError("aupro: there is no normal pixel, so the false-positive rate is undefined.")
    if anomalous.size == 0:
        raise ValueError("aupro: there is no anomalous region in the ground-truth masks, so PRO is undefined.")
    # regions lying completely outside `region` have no pixel left: renumber the remaining ones
    _, dense_ids, sizes = np.unique(ids, return_inverse=True, return_counts=True)
    weights = 1.0 / (len(sizes) * sizes[dense_ids.ravel()])
    return normal, anomalous, weights


def pro_curve(
    maps: CohortLike,
    masks: CohortLike | None,
    region: CohortLike | None = None,
    num_thresholds: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PRO curve: returns ``(fpr, pro, thresholds)``, FPR non-decreasing, rule ``map >= threshold``.

    Args:
        maps: ``(N, *spatial)`` anomaly maps (2D or 3D) or a list of ``N`` arrays of any shapes.
        masks: ground-truth masks in the same layout (``None`` entries = normal case).
        region: optional masks of valid pixels (e.g. brain masks); other pixels are ignored.
        num_thresholds: ``None`` = exact curve at every distinct map value; an integer ``T`` =
            ``T`` thresholds evenly spaced between the minimum and maximum map value (anomalib style,
            cheaper for very large cohorts).

    The first point is ``(0, 0)`` at threshold ``+inf``; the last is ``(1, 1)``.
    """
    normal, anomalous, weights = _region_pixels(maps, masks, region)
    if num_thresholds is None:
        grid = None
    elif num_thresholds < 2:
        raise ValueError(f"aupro: num_thresholds must be at least 2, got {num_thresholds}.")
    else:
        low = min(normal.min(), anomalous.min())
        grid = np.linspace(low, max(normal.max(), anomalous.max()), int(num_thresholds))
    thresholds, pro, false_positives = threshold_counts(normal, anomalous, weights, grid)
    fpr = false_positives / normal.size
    # float round-off in the cumulative sums must not push PRO past 1
    pro = np.minimum(pro, 1.0)
    return np.append(0.0, fpr), np.append(0.0, pro), np.append(np.inf, thresholds)


def partial_auc(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` for ``x in [x[0], x_max]``, interpolating linearly at ``x_max``.

    ``x`` must be non-decreasing (vertical steps allowed) and reach at least ``x_max``.
    Same rule as ``trapezoid(x, y, x_max)`` in the official MVTec AD evaluation code.
    """
    inside = int(np.searchsorted(x, x_max, side="right"))  # x[:inside] <= x_max (x is sorted)
    xs, ys = x[:inside], y[:inside]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < x_max and inside < x.size:
        slope = (y[inside] - ys[-1]) / (x[inside] - xs[-1])
        y_at_limit = ys[-1] + slope * (x_max - xs[-1])
        area += 0.5 * (ys[-1] + y_at_limit) * (x_max - xs[-1])
    return area


def aupro(
    maps: CohortLike,
    masks: CohortLike | None,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
    region: CohortLike | None = None,
) -> float:
    """Area under the PRO curve for FPR in ``[0, fpr_limit]``, divided by ``fpr_limit`` (1 = perfect).

    Args:
        maps: ``(N, *spatial)`` anomaly maps (2D or 3D) or a list of ``N`` arrays of any shapes.
        masks: ground-truth masks in the same layout; connected components (8-/26-connectivity) of
            each case are the regions.
        fpr_limit: upper integration limit on the false-positive rate, in ``(0, 1]``; 0.3 as MVTec AD.
        num_thresholds: ``None`` for the exact curve, or a number of evenly spaced thresholds.
        region: optional masks of valid pixels (e.g. brain masks).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}.")
    fpr, pro, _ = pro_curve(maps, masks, region, num_thresholds)
    return partial_auc(fpr, pro, fpr_limit) / fpr_limit
