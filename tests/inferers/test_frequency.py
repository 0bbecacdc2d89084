"""FAIR's frequency-restoration inferer: shapes, maps, composition with sliding windows and slices, bad settings."""

from __future__ import annotations

import pytest
import torch

from medad.inferers import (
    FrequencyRestorationInferer,
    SliceAggregationInferer,
    SlidingWindowAnomalyInferer,
)
from tests.helpers import Recorder, fair_unet


@pytest.mark.parametrize("anomaly_map", ["fair", "squared"])
def test_inferer_shapes_and_ranges(anomaly_map: str):
    torch.manual_seed(0)
    inferer = FrequencyRestorationInferer(map=anomaly_map, mean_filter_size=3)
    out = inferer(torch.rand(2, 3, 16, 16), fair_unet().eval())
    assert out["anomaly_map"].shape == (2, 1, 16, 16) and out["restoration"].shape == (2, 3, 16, 16)
    assert out["restoration"].min() >= 0 and out["restoration"].max() <= 1
    assert out["anomaly_map"].min() >= 0 and torch.isfinite(out["anomaly_map"]).all()


def test_identical_restoration_gives_a_zero_map_and_a_defect_is_found_where_it_is():
    images = torch.rand(2, 3, 32, 32)
    inferer = FrequencyRestorationInferer(mean_filter_size=5, margin=0)  # the Recorder returns image-sized outputs
    out = inferer(images, Recorder(images.clone()))
    assert out["anomaly_map"].abs().max() < 1e-6
    assert torch.equal(out["restoration"], images)

    restored = images.clone()
    restored[:, :, 20:26, 4:10] = 0.5  # the "network" restores a flat patch where the image has texture
    anomaly_map = inferer(images, Recorder(restored))["anomaly_map"]
    for b in range(2):
        row, col = divmod(int(anomaly_map[b, 0].argmax()), 32)
        assert 18 <= row <= 27 and 2 <= col <= 11


def test_inferer_composes_with_sliding_window_and_slices():
    torch.manual_seed(0)
    inferer = FrequencyRestorationInferer(mean_filter_size=3)
    windowed = SlidingWindowAnomalyInferer(inferer, roi_size=(16, 16), overlap=0.5, foreground_weighting=False,
                                           zero_background=False)
    out = windowed(torch.rand(1, 3, 32, 32), fair_unet().eval())
    assert out["anomaly_map"].shape == (1, 1, 32, 32) and out["restoration"].shape == (1, 3, 32, 32)

    slices = SliceAggregationInferer(inferer, spatial_dim=2, size_divisor=2)
    volume = torch.zeros(1, 1, 14, 14, 5)
    volume[..., 1:4] = torch.rand(1, 1, 14, 14, 3)
    out = slices(volume, fair_unet(1, 1).eval())
    assert out["anomaly_map"].shape == (1, 1, 14, 14, 5) and out["restoration"].shape == volume.shape
    assert out["anomaly_map"][..., 0].abs().max() == 0  # background slices are skipped


def test_inferer_rejects_bad_settings():
    with pytest.raises(ValueError, match="anomaly map"):
        FrequencyRestorationInferer(map="l1")
    with pytest.raises(ValueError, match="odd"):
        FrequencyRestorationInferer(mean_filter_size=4)
    with pytest.raises(ValueError, match="out_channels"):
        FrequencyRestorationInferer()(torch.rand(1, 3, 16, 16), fair_unet(1, 1).eval())
