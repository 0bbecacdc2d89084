"""Input handling shared by every metric: numpy/torch inputs, stacked arrays or per-case lists.

A *cohort* of anomaly maps is either one stacked array of shape ``(N, *spatial)`` (``(N, 1, *spatial)``
works too: a singleton channel changes nothing) or a sequence of ``N`` arrays that may differ in
shape (volumes of different sizes). Ground-truth masks and region masks (e.g. brain masks) follow
the same layout; a mask of ``None`` (for the whole cohort or one case) means "all zero" for ground
truth (a normal image) and "all valid" for a region. Masks are binary: any non-zero value is
anomalous / valid, so 0/255 PNG masks work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from scipy import ndimage

__all__ = [
    "ArrayLike",
    "CohortLike",
    "to_numpy",
    "as_cases",
    "prepare_cohort",
    "pool_pixels",
    "label_regions",
    "threshold_counts",
]

ArrayLike = Any  # numpy array, torch tensor, or anything np.asarray accepts
CohortLike = Union[ArrayLike, Sequence[ArrayLike]]


def to_numpy(x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    """Convert a numpy array / torch tensor / nested sequence to a numpy array of ``dtype``.

    ``dtype=bool`` binarises with ``x != 0`` so 0/1, 0/255 and float masks are all accepted.
    """
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if dtype is bool:
        return x if x.dtype == bool else x != 0
    return x.astype(dtype, copy=False)


def as_cases(x: CohortLike | None, name: str, dtype: Any = np.float64) -> list[np.ndarray | None] | None:
    """Split a cohort into a list of per-case numpy arrays.

    Args:
        x: stacked array ``(N, *spatial)`` (numpy or torch) or a sequence of ``N`` arrays; entries may
            be ``None`` (kept as ``None``). ``None`` for the whole argument returns ``None``.
        name: argument name used in error messages.
        dtype: ``np.float64`` for maps, ``bool`` for masks.
    """
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [None if c is None else to_numpy(c, dtype) for c in x]
    arr = to_numpy(x, dtype)
    if arr.ndim == 0:
        raise ValueError(f"metrics: `{name}` is a single number; pass one value or map per case with shape (N, ...).")
    return list(arr)


def prepare_cohort(
    maps: CohortLike,
    masks: CohortLike | None = None,
    region: CohortLike | None = None,
    name: str = "metric",
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]:
    """Return per-case ``(maps, masks, regions)`` with shapes checked and missing masks filled in.

    Missing ground-truth masks become all-zero (normal case); missing regions stay ``None`` (all
    pixels valid). Raises ``ValueError`` on length/shape mismatches or non-finite map values.
    """
    map_cases = as_cases(maps, "maps")
    n = len(map_cases)
    if n == 0:
        raise ValueError(f"{name}: `maps` is empty; at least one case is needed.")
    mask_cases = as_cases(masks, "masks", bool) or [None] * n
    region_cases = as_cases(region, "region", bool) or [None] * n
    for arg, cases in (("masks", mask_cases), ("region", region_cases)):
        if len(cases) != n:
            raise ValueError(f"{name}: `{arg}` has {len(cases)} cases but `maps` has {n}.")
    out_masks: list[np.ndarray] = []
    for i, (m, gt, reg) in enumerate(zip(map_cases, mask_cases, region_cases)):
        if m is None:
            raise ValueError(f"{name}: maps[{i}] is None; every case needs an anomaly map.")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"{name}: maps[{i}] contains NaN or infinite values.")
        for arg, other in (("masks", gt), ("region", reg)):
            if other is not None and other.shape != m.shape:
                raise ValueError(f"{name}: {arg}[{i}] has shape {other.shape} but maps[{i}] has shape {m.shape}.")
        out_masks.append(np.zeros(m.shape, dtype=bool) if gt is None else gt)
    return map_cases, out_masks, region_cases


def pool_pixels(
    maps: list[np.ndarray], masks: list[np.ndarray], regions: list[np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the valid pixels of all cases: returns ``(values float64 (P,), labels bool (P,))``."""
    values, labels = [], []
    for m, gt, reg in zip(maps, masks, regions):
        if reg is None:
            values.append(m.ravel())
            labels.append(gt.ravel())
        else:
            values.append(m[reg])
            labels.append(gt[reg])
    return np.concatenate(values), np.concatenate(labels)


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask with full connectivity (8 in 2D, 26 in 3D), as MVTec AD.

    Returns ``(labels int array of mask.shape, number of components)``; background is 0.
    """
    if mask.ndim == 0:
        return mask.astype(np.int64), int(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, count = ndimage.label(mask, structure=structure)
    return labels, int(count)


def threshold_counts(
    negatives: np.ndarray,
    positives: np.ndarray,
    positive_weights: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of values ``>= t`` for every threshold ``t``, the core of every curve in this package.

    Args:
        negatives: ``(P0,)`` values of normal pixels.
        positives: ``(P1,)`` values of anomalous pixels.
        positive_weights: optional ``(P1,)`` weights; the positive "count" is then a weight sum (PRO).
        thresholds: ``None`` = every distinct value of ``negatives`` and ``positives`` (exact curve,
            like sklearn's ``_binary_clf_curve``); otherwise these thresholds.

    Returns:
        ``(thresholds, positive_counts, negative_counts)``, thresholds DEcreasing, so both counts
        increase along the arrays.

    Why not sklearn's curves: they argsort all pixels with a stable sort and gather labels through the
    permutation, which takes tens of seconds for a cohort of volumes on a small CPU. Sorting normal and
    anomalous values separately and binary-searching the (sorted) thresholds gives identical counts
    several times faster (tests compare with sklearn).
    """
    if thresholds is None:
        thresholds = np.unique(np.concatenate([negatives, positives]))
    else:
        thresholds = np.sort(np.asarray(thresholds, dtype=np.float64))
    # ascending thresholds: numpy's searchsorted reuses the previous position for sorted keys
    negative_counts = negatives.size - np.searchsorted(np.sort(negatives), thresholds, side="left")
    if positive_weights is None:
        positive_counts = positives.size - np.searchsorted(np.sort(positives), thresholds, side="left")
    else:
        order = np.argsort(positives)
        suffix_weight = np.append(np.cumsum(positive_weights[order][::-1])[::-1], 0.0)
        positive_counts = suffix_weight[np.searchsorted(positives[order], thresholds, side="left")]
    return thresholds[::-1], positive_counts[::-1], negative_counts[::-1]
