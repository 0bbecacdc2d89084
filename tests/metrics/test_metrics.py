"""Tests for medad.metrics: hand-computed cases, sklearn agreement, and a slow AUPRO reference loop."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from medad.metrics import (
    aupro,
    average_precision,
    best_dice,
    image_auroc,
    label_regions,
    per_case_metrics,
    pixel_auroc,
    pooled_metrics,
    pr_curve_points,
    pro_curve,
    roc_curve_points,
    segmentation_scores,
    threshold_at_fpr,
    threshold_f1_max,
)

# ---------------------------------------------------------------------------------------------
# helpers


def blob_cohort(n_images: int, size: int, seed: int, quantise: float | None = None, ndim: int = 2):
    """Smooth noise maps with 2-3 disk (ball) anomalies per image that raise the map values."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    grid = np.indices((size,) * ndim)
    for _ in range(n_images):
        mask = np.zeros((size,) * ndim, dtype=bool)
        for _ in range(rng.integers(2, 4)):
            centre = rng.uniform(8, size - 8, ndim).reshape((ndim,) + (1,) * ndim)
            mask |= ((grid - centre) ** 2).sum(0) <= rng.uniform(3, 7) ** 2
        noise = ndimage.gaussian_filter(rng.normal(size=mask.shape), 1.5)
        anomaly_map = noise / noise.std() + 1.5 * ndimage.gaussian_filter(mask.astype(float), 2.0)
        if quantise is not None:
            anomaly_map = np.round(anomaly_map / quantise) * quantise
        maps.append(anomaly_map)
        masks.append(mask)
    return np.stack(maps), np.stack(masks)


def reference_aupro(maps, masks, fpr_limit, thresholds) -> float:
    """Slow, explicit AUPRO: loop over thresholds, and over every connected region at each threshold."""
    regions = []
    for i, gt in enumerate(masks):
        labelled, count = ndimage.label(gt, structure=np.ones((3,) * gt.ndim))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    n_normal = sum(int((~gt).sum()) for gt in masks)
    points = [(0.0, 0.0)]
    for t in sorted(set(thresholds), reverse=True):
        false_positives = sum(int(((m >= t) & ~gt).sum()) for m, gt in zip(maps, masks))
        overlaps = [float((maps[i][region] >= t).mean()) for i, region in regions]
        points.append((false_positives / n_normal, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
            continue
        if x0 < fpr_limit:  # the segment crossing the limit: interpolate at exactly fpr_limit
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (fpr_limit - x0)
        break
    return area / fpr_limit


def brute_force_best_dice(values, labels):
    best, best_t = -1.0, None
    for t in np.unique(values):
        predicted = values >= t
        dice = 2 * np.sum(predicted & labels) / (predicted.sum() + labels.sum())
        if dice > best:
            best, best_t = dice, t
    return best, best_t


# ---------------------------------------------------------------------------------------------
# image AUROC, pixel AUROC, AP, curves


def test_image_auroc_hand_computed():
    # pairs (anomalous, normal): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie counts one half
    assert image_auroc([0.5, 0.5, 0.9], [0, 1, 1]) == pytest.approx(0.75)
    assert image_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)


def test_image_auroc_single_class_raises():
    with pytest.raises(ValueError, match="no anomalous image"):
        image_auroc([0.1, 0.2], [0, 0])


def test_pixel_auroc_and_ap_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    masks = rng.random((4, 16, 16)) < 0.2
    maps = np.round(rng.random((4, 16, 16)) + 0.4 * masks, 1)  # rounding creates many ties
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert average_precision(maps, masks) == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12
    )
    # torch tensors and float 0/1 masks give the same numbers
    assert pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.float32))) == pytest.approx(
        pixel_auroc(maps, masks), abs=1e-12
    )


def test_list_of_different_shapes_is_pooled():
    rng = np.random.default_rng(2)
    maps = [rng.random((8, 9, 10)), rng.random((5, 6, 7))]
    masks = [rng.random((8, 9, 10)) < 0.1, None]  # second case normal
    pooled_values = np.concatenate([m.ravel() for m in maps])
    pooled_labels = np.concatenate([masks[0].ravel(), np.zeros(5 * 6 * 7, bool)])
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(pooled_labels, pooled_values), abs=1e-12)
    assert average_precision(maps, masks) == pytest.approx(
        average_precision_score(pooled_labels, pooled_values), abs=1e-12
    )


def test_region_mask_restricts_pixels():
    # outside the region the normal pixels are hotter than the lesion: they must not count
    anomaly_map = np.array([[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.8]])
    mask = np.array([[0, 0, 0, 0], [0, 0, 0, 1]], bool)
    region = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], bool)
    assert pixel_auroc(anomaly_map[None], mask[None]) == pytest.approx(3 / 7)
    assert pixel_auroc(anomaly_map[None], mask[None], region[None]) == pytest.approx(1.0)
    assert average_precision(anomaly_map[None], mask[None], region[None]) == pytest.approx(1.0)
    assert best_dice(anomaly_map[None], mask[None], region[None]) == pytest.approx((1.0, 0.8))
    assert aupro(anomaly_map[None], mask[None], region=region[None]) == pytest.approx(1.0)
    scores = segmentation_scores(anomaly_map[None], mask[None], 0.5, region[None])
    assert (scores["tp"], scores["fp"], scores["fn"], scores["tn"]) == (1, 0, 0, 3)


def test_curve_points_match_sklearn():
    rng = np.random.default_rng(3)
    masks = rng.random((3, 10, 10)) < 0.3
    maps = rng.random((3, 10, 10)) + masks
    fpr, tpr, thr = roc_curve_points(maps, masks)
    ref_fpr, ref_tpr, ref_thr = roc_curve(masks.ravel(), maps.ravel())
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    precision, recall, thr = pr_curve_points(maps, masks)
    ref_p, ref_r, ref_t = precision_recall_curve(masks.ravel(), maps.ravel())
    np.testing.assert_allclose(precision, ref_p)
    np.testing.assert_allclose(recall, ref_r)
    np.testing.assert_allclose(thr, ref_t)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(4, 5\) but maps\[1\] has shape \(4, 4\)"):
        pixel_auroc([np.zeros((4, 4)), np.zeros((4, 4))], [np.zeros((4, 4)), np.zeros((4, 5))])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.full((1, 2, 2), np.nan), np.ones((1, 2, 2)))


# ---------------------------------------------------------------------------------------------
# segmentation at a threshold, best Dice, thresholds


def test_segmentation_scores_hand_computed_4x4():
    anomaly_map = np.array(
        [
            [0.9, 0.8, 0.1, 0.0],
            [0.7, 0.2, 0.1, 0.0],
            [0.0, 0.6, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.5],
        ]
    )
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # lesion: 0.9, 0.8, 0.7, 0.2
    # threshold 0.5 predicts {0.9, 0.8, 0.7, 0.6, 0.5}: TP 3, FP 2, FN 1 (the 0.2 voxel), TN 10
    scores = segmentation_scores(anomaly_map[None], mask[None], threshold=0.5)
    assert (scores["tp"], scores["fp"], scores["fn"], scores["tn"]) == (3, 2, 1, 10)
    assert scores["dice"] == pytest.approx(6 / 9)
    assert scores["iou"] == pytest.approx(3 / 6)
    assert scores["precision"] == pytest.approx(3 / 5)  # TP / (TP + FP)
    assert scores["recall"] == pytest.approx(3 / 4)  # TP / (TP + FN)


def test_segmentation_scores_empty_conventions():
    zeros = np.zeros((1, 3, 3))
    empty = segmentation_scores(zeros, None, threshold=0.5)
    assert empty["dice"] == 1.0 and empty["iou"] == 1.0
    assert np.isnan(empty["precision"]) and np.isnan(empty["recall"])
    false_alarm = segmentation_scores(zeros + 1.0, None, threshold=0.5)
    assert false_alarm["dice"] == 0.0 and false_alarm["precision"] == 0.0 and np.isnan(false_alarm["recall"])
    missed = segmentation_scores(zeros, np.ones((1, 3, 3)), threshold=0.5)
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and np.isnan(missed["precision"])


def test_best_dice_hand_computed():
    # thresholds 0.4: F1 2/3; 0.3: 1/2; 0.2: TP 2 FP 1 -> 4/5; 0.1: 2/3
    values = np.array([[0.1, 0.2, 0.3, 0.4]])
    labels = np.array([[0, 1, 0, 1]])
    assert best_dice(values, labels) == pytest.approx((0.8, 0.2))
    assert threshold_f1_max(values, labels) == pytest.approx(0.2)


def test_best_dice_brute_force_and_map_range():
    rng = np.random.default_rng(4)
    masks = rng.random((3, 6, 6)) < 0.3
    # values far outside [0, 1]: a threshold range taken from the labels (DISYRE bug) would fail here
    maps = 10.0 + 10.0 * np.round(rng.random((3, 6, 6)) * 0.7 + 0.3 * masks, 2)
    dice, threshold = best_dice(maps, masks)
    ref_dice, ref_threshold = brute_force_best_dice(maps.ravel(), masks.ravel())
    assert dice == pytest.approx(ref_dice, abs=1e-12)
    assert threshold == pytest.approx(ref_threshold)
    assert segmentation_scores(maps, masks, threshold)["dice"] == pytest.approx(dice, abs=1e-12)
    # on a grid of thresholds the result is the brute force over that grid, never above the exact one
    grid = np.linspace(maps.min(), maps.max(), 17)
    grid_best = max(segmentation_scores(maps, masks, t)["dice"] for t in grid)
    assert best_dice(maps, masks, num_thresholds=17)[0] == pytest.approx(grid_best, abs=1e-12)
    assert grid_best <= dice + 1e-12


def test_threshold_at_fpr():
    values = np.arange(100.0)
    assert threshold_at_fpr(values, 0.05) == 95.0  # 95..99: exactly 5 % flagged
    assert threshold_at_fpr(np.array([1.0, 2.0, 2.0, 2.0, 3.0]), 0.4) == 3.0  # ties: 2 would flag 80 %
    assert threshold_at_fpr(values, 0.0) > 99.0
    assert threshold_at_fpr(values, 1.0) == 0.0
    rng = np.random.default_rng(5)
    normal = [rng.normal(size=(30, 30)), rng.normal(size=(20,))]  # list of arrays is pooled
    pooled = np.sort(np.concatenate([v.ravel() for v in normal]))
    for fpr in (0.01, 0.05, 0.1, 0.3):
        t = threshold_at_fpr(normal, fpr)
        assert np.mean(pooled >= t) <= fpr
        lower = pooled[pooled < t].max()  # the next lower data value would exceed the target
        assert np.mean(pooled >= lower) > fpr


# ---------------------------------------------------------------------------------------------
# AUPRO


def test_aupro_hand_computed():
    # 1D case, two single-pixel regions (0.9 and 0.2) and normals 0.1 and 0.5; curve points
    # (0, 0) -> (0, .5) at t=.9 -> (.5, .5) at t=.5 -> (.5, 1) at t=.2 -> (1, 1)
    anomaly_map = np.array([[0.9, 0.1, 0.2, 0.5]])
    mask = np.array([[1, 0, 1, 0]])
    assert aupro(anomaly_map, mask, fpr_limit=0.3) == pytest.approx(0.5)
    assert aupro(anomaly_map, mask, fpr_limit=1.0) == pytest.approx(0.75)
    # a constant map gives the diagonal: area fpr_limit^2 / 2, normalised -> fpr_limit / 2
    constant = np.zeros((2, 8, 8))
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    assert aupro(constant, masks, fpr_limit=0.3) == pytest.approx(0.15)


def test_aupro_averages_regions_not_pixels():
    # region A (1 px, value 0.9) found at FPR 0, region B (3 px, value 0.2) only at FPR 1/3 > 0.3:
    # PRO = 1/2 on [0, 1) (pixel-weighted overlap would give 1/4)
    anomaly_map = np.array([[0.9, 0.0, 0.2, 0.2, 0.2, 0.0, 0.5]])
    mask = np.array([[1, 0, 1, 1, 1, 0, 0]])
    assert aupro(anomaly_map, mask, fpr_limit=0.3) == pytest.approx(0.5)


def test_aupro_perfect_map_is_one():
    _, masks = blob_cohort(3, 32, seed=6)
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert aupro(torch.from_numpy(masks.astype(np.float32)), masks, num_thresholds=50) == pytest.approx(1.0)


def test_aupro_matches_slow_reference_loop():
    maps, masks = blob_cohort(5, 64, seed=7, quantise=0.05)  # quantised: few distinct thresholds
    for fpr_limit in (0.3, 0.05, 1.0):
        expected = reference_aupro(maps, masks, fpr_limit, np.unique(maps))
        assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)
    # the evenly spaced threshold grid gives exactly the reference on that grid
    maps, masks = blob_cohort(5, 64, seed=8)
    grid = np.linspace(maps.min(), maps.max(), 100)
    assert aupro(maps, masks, num_thresholds=100) == pytest.approx(
        reference_aupro(maps, masks, 0.3, grid), abs=1e-9
    )
    # ... and a fine grid agrees with the exact curve
    assert aupro(maps, masks, num_thresholds=2000) == pytest.approx(aupro(maps, masks), abs=1e-3)


def test_aupro_3d_uses_26_connectivity():
    volume_mask = np.zeros((5, 5, 5), bool)
    volume_mask[1, 1, 1] = volume_mask[2, 2, 2] = True  # touch only at a corner: one region in 3D
    assert label_regions(volume_mask)[1] == 1
    maps, masks = blob_cohort(2, 24, seed=9, quantise=0.1, ndim=3)
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks, 0.3, np.unique(maps)), abs=1e-9)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_pro_curve_ends():
    maps, masks = blob_cohort(2, 32, seed=10)
    fpr, pro, thresholds = pro_curve(maps, masks)
    assert (fpr[0], pro[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)


def test_aupro_is_fast_on_100_images():
    rng = np.random.default_rng(11)
    maps = rng.random((100, 256, 256))
    masks = np.zeros(maps.shape, bool)
    masks[:, 40:80, 40:90] = True
    masks[::2, 150:170, 100:140] = True
    maps[masks] += 0.5
    start = time.perf_counter()
    value = aupro(maps, masks)
    elapsed = time.perf_counter() - start
    assert 0.0 < value < 1.0
    assert elapsed < 10.0, f"AUPRO on 100 images of 256x256 took {elapsed:.1f} s"


def test_aupro_without_regions_raises():
    with pytest.raises(ValueError, match="no anomalous region"):
        aupro(np.zeros((2, 4, 4)), None)


# ---------------------------------------------------------------------------------------------
# per-case and pooled summaries


def test_per_case_metrics():
    anomaly_map = np.array([[0.1, 0.2, 0.3, 0.4]])
    maps = [anomaly_map, np.array([[0.1, 0.9]]), np.array([[0.0, 0.0]])]
    masks = [np.array([[0, 1, 0, 1]]), None, None]
    rows = per_case_metrics(maps, masks, scores=[1.0, 2.0, 3.0], threshold=0.25)
    assert [row["case"] for row in rows] == [0, 1, 2]
    assert rows[0]["anomalous_pixels"] == 2 and rows[0]["score"] == 1.0
    assert rows[0]["best_dice"] == pytest.approx(0.8) and rows[0]["best_dice_threshold"] == pytest.approx(0.2)
    assert rows[0]["ap"] == pytest.approx(average_precision_score([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]))
    assert rows[0]["dice"] == pytest.approx(2 / 4)  # predicted {0.3, 0.4}: TP 1, FP 1, FN 1
    assert np.isnan(rows[1]["ap"]) and np.isnan(rows[1]["best_dice"])
    assert rows[1]["dice"] == 0.0  # normal case with a false positive
    assert rows[2]["dice"] == 1.0  # normal case, nothing predicted


def test_pooled_metrics():
    maps, masks = blob_cohort(4, 32, seed=12)
    maps = np.concatenate([maps, np.random.default_rng(0).normal(size=(2, 32, 32))])
    masks = list(masks) + [None, None]
    scores = maps.reshape(6, -1).max(1)
    result = pooled_metrics(maps, masks, scores, None, threshold=1.0)
    pooled_labels = np.concatenate([np.zeros((32, 32), bool) if m is None else m for m in masks]).ravel()
    assert result["image_auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 1, 0, 0], scores))
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(pooled_labels, maps.ravel()), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(pooled_labels, maps.ravel()), abs=1e-12)
    assert result["aupro"] == pytest.approx(aupro(maps, masks))
    assert (result["best_dice"], result["best_dice_threshold"]) == pytest.approx(best_dice(maps, masks))
    at_threshold = segmentation_scores(maps, masks, 1.0)
    for key in ("dice", "iou", "precision", "recall"):
        assert result[key] == pytest.approx(at_threshold[key])
    # a single image class: image AUROC undefined -> NaN, pixel metrics still computed
    single = pooled_metrics(maps[:4], masks[:4], scores[:4], None)
    assert np.isnan(single["image_auroc"]) and single["pixel_auroc"] == pytest.approx(
        pixel_auroc(maps[:4], masks[:4])
    )
    assert "dice" not in single
