"""Bootstrap intervals (medad.metrics.bootstrap) against closed forms and sklearn."""

from __future__ import annotations

import numpy as np
import pytest

from medad.metrics import threshold_at_fpr
from medad.metrics.bootstrap import (
    image_auroc_interval,
    mean_interval,
    threshold_interval,
)


def test_a_constant_metric_has_a_zero_width_interval():
    assert mean_interval([0.4] * 10) == (0.4, 0.4, 0.4)
    assert mean_interval([0.7]) == (0.7, 0.7, 0.7)
    assert all(np.isnan(v) for v in mean_interval([np.nan, np.nan]))


def test_mean_interval_contains_the_mean_and_narrows_with_more_cases():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.1, 10), rng.normal(0.5, 0.1, 1000)
    mean, low, high = mean_interval(small)
    assert low < mean < high and mean == pytest.approx(small.mean())
    _, low_large, high_large = mean_interval(large)
    assert high_large - low_large < (high - low) / 3  # ~ 1/sqrt(N): 10x narrower for 100x the cases
    # the normal-theory interval of the mean of 1000 cases: mean +- 1.96 s / sqrt(N)
    half = 1.96 * large.std(ddof=1) / np.sqrt(large.size)
    assert (high_large - low_large) / 2 == pytest.approx(half, rel=0.1)


def test_image_auroc_interval_of_a_perfect_separation_is_one():
    assert image_auroc_interval([0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 0, 1, 1]) == (1.0, 1.0, 1.0)
    point, low, high = image_auroc_interval([0.1, 0.6, 0.3, 0.5, 0.9, 0.2], [0, 0, 0, 1, 1, 1])
    assert low <= point <= high and point == pytest.approx(6 / 9)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc_interval([0.1, 0.2], [1, 1])


def test_vectorised_auroc_resamples_equal_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    scores, labels = np.round(rng.random(40), 1), np.r_[np.zeros(15, int), np.ones(25, int)]  # with ties
    point, low, high = image_auroc_interval(scores, labels, n_resamples=500)
    assert point == pytest.approx(roc_auc_score(labels, scores))
    # the same resamples drawn the slow way give the same interval
    draw = np.random.default_rng(0)
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    index_n, index_a = draw.integers(0, 15, (500, 15)), draw.integers(0, 25, (500, 25))
    slow = [roc_auc_score(np.r_[np.zeros(15), np.ones(25)], np.r_[normal[i], anomalous[j]])
            for i, j in zip(index_n, index_a)]
    assert (low, high) == pytest.approx(tuple(np.quantile(slow, [0.025, 0.975])))


def test_threshold_interval_is_reproducible_and_narrows_with_more_clusters():
    rng = np.random.default_rng(0)
    few = [rng.normal(size=200) for _ in range(5)]
    many = [rng.normal(size=200) for _ in range(80)]
    se_few, low_few, high_few = threshold_interval(few, 0.05, n_resamples=100)
    assert (se_few, low_few, high_few) == threshold_interval(few, 0.05, n_resamples=100)
    se_many, low_many, high_many = threshold_interval(many, 0.05, n_resamples=100)
    assert low_many <= threshold_at_fpr(np.concatenate(many), 0.05) <= high_many
    assert 0 < se_many < se_few and high_many - low_many < high_few - low_few
