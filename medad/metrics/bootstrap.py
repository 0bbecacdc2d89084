"""Bootstrap confidence intervals over cases, for the cohort tables (``medad cohort summarize``).

A cohort of 8 volumes or 83 images gives a metric with a wide uncertainty; a table that compares methods must say
how wide. Cases (images, volumes) are the resampling unit, as in the BraTS and MVTec AD comparisons: pixels of one
case are not independent.

- per-case metrics (AP, best Dice, Dice of each case): percentile bootstrap of the mean with
  :func:`scipy.stats.bootstrap` (the well-kept implementation; ``method="percentile"`` so that a constant metric
  gives a zero-width interval instead of BCa's undefined one);
- image AUROC: a *stratified* percentile bootstrap (normal and anomalous cases resampled separately, so every
  resample has both classes and the AUROC is always defined), with :func:`sklearn.metrics.roc_auc_score`;
- a calibrated pixel threshold (the ``1 - fpr`` quantile of normal map values): a *cluster* bootstrap over the
  slices or images its values came from (:func:`threshold_interval`), the sampling error the calibration record
  states; neighbouring pixels are correlated, so resampling pixels one by one would understate it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mean_interval", "image_auroc_interval", "threshold_interval"]


def mean_interval(
    values: Sequence[float] | np.ndarray, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of per-case values and its percentile-bootstrap confidence interval.

    Args:
        values: ``(N,)`` one value per case; NaN entries (cases without that metric) are dropped.
        n_resamples: bootstrap resamples.
        level: confidence level (0.95: the 2.5th and 97.5th percentiles).
        seed: seed of the resampling (the same table twice gives the same intervals).

    Returns:
        ``(mean, low, high)``; all NaN when no value is left, ``(v, v, v)`` for a single case.
    """
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=np.float64).ravel()
    data = data[np.isfinite(data)]
    if data.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(data.mean())
    if data.size == 1 or np.all(data == data[0]):
        return (mean, mean, mean)
    result = bootstrap((data,), np.mean, n_resamples=n_resamples, confidence_level=level, method="percentile",
                       random_state=np.random.default_rng(seed))
    return (mean, float(result.confidence_interval.low), float(result.confidence_interval.high))


def image_auroc_interval(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Image AUROC and its stratified percentile-bootstrap confidence interval.

    Args:
        scores: ``(N,)`` image anomaly scores.
        labels: ``(N,)`` 0 normal / 1 anomalous; both classes must occur.

    Returns:
        ``(auroc, low, high)``.
    """
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(int)
    if scores.shape != labels.shape:
        raise ValueError(f"image_auroc_interval: {scores.size} scores for {labels.size} labels.")
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    if normal.size == 0 or anomalous.size == 0:
        raise ValueError("image_auroc_interval: both normal and anomalous cases are needed.")
    from scipy.stats import rankdata

    point = float(roc_auc_score(labels, scores))
    rng = np.random.default_rng(seed)
    drawn_normal = normal[rng.integers(0, normal.size, (n_resamples, normal.size))]
    drawn_anomalous = anomalous[rng.integers(0, anomalous.size, (n_resamples, anomalous.size))]
    # AUROC of every resample at once, as the Mann-Whitney U statistic (ties count one half): the rank sum of the
    # anomalous scores among all scores of the resample
    ranks = rankdata(np.concatenate([drawn_normal, drawn_anomalous], axis=1), axis=1)
    u = ranks[:, normal.size:].sum(axis=1) - anomalous.size * (anomalous.size + 1) / 2.0
    resampled = u / (normal.size * anomalous.size)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(resampled, [alpha, 1.0 - alpha])
    return (point, float(low), float(high))


def threshold_interval(
    clusters: Sequence[np.ndarray], fpr: float, n_resamples: int = 200, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Sampling error of :func:`~medad.metrics.threshold_at_fpr` by a cluster bootstrap.

    Args:
        clusters: the normal values grouped by the unit they were sampled in (one array per slice of a calibration
            volume, or per calibration image); empty clusters are allowed.
        fpr: the threshold's false-positive rate.
        n_resamples / level / seed: of the bootstrap (clusters drawn with replacement, as many as given).

    Returns:
        ``(standard error, low, high)`` of the threshold over the resamples; NaN when there are no values.
    """
    from medad.metrics.segmentation import threshold_at_fpr

    arrays = [np.asarray(c, dtype=np.float64).ravel() for c in clusters]
    if not arrays or sum(a.size for a in arrays) == 0:
        return (np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    resampled = []
    for _ in range(int(n_resamples)):
        drawn = np.concatenate([arrays[i] for i in rng.integers(0, len(arrays), len(arrays))])
        if drawn.size:
            resampled.append(threshold_at_fpr(drawn, fpr))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(resampled, [alpha, 1.0 - alpha])
    return (float(np.std(resampled, ddof=1)), float(low), float(high))
