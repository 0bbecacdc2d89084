"""The baselines' map definitions: GaussianScoreInferer (z-score) and IntensityScoreInferer (brain z-score)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medad.inferers import GaussianScoreInferer, IntensityScoreInferer
from medad.methods.baselines import BrainIntensity
from tests.helpers import fitted_gaussian


def test_gaussian_score_signed_variants_and_channel_reduction():
    normal = torch.stack([torch.full((2, 4, 4), v) for v in (0.4, 0.5, 0.6)])  # mean 0.5, std 0.1 per pixel
    model = fitted_gaussian(normal, std_floor=1e-6)
    test = torch.full((1, 2, 4, 4), 0.5)
    test[0, 0, 0, 0], test[0, 1, 1, 1] = 0.8, 0.3  # z = +3 (channel 0), z = -2 (channel 1)
    maps = {s: GaussianScoreInferer(signed=s)(test, model)["anomaly_map"][0, 0] for s in (False, True, "negative")}
    assert maps[False][0, 0] == pytest.approx(3, rel=1e-4) and maps[False][1, 1] == pytest.approx(2, rel=1e-4)
    assert maps[True][0, 0] == pytest.approx(3, rel=1e-4) and maps[True][1, 1] == 0
    assert maps["negative"][0, 0] == 0 and maps["negative"][1, 1] == pytest.approx(2, rel=1e-4)
    summed = GaussianScoreInferer(channel_reduction="sum")(test, model)
    assert summed["anomaly_map"].shape == (1, 1, 4, 4) and summed["anomaly_map"].sum() == pytest.approx(5, rel=1e-4)
    assert torch.allclose(summed["restoration"], torch.full((1, 2, 4, 4), 0.5))
    with pytest.raises(ValueError, match="signed must be"):
        GaussianScoreInferer(signed="both")
    with pytest.raises(ValueError, match="channel_reduction must be"):
        GaussianScoreInferer(channel_reduction="mean")


def test_gaussian_score_map_sigma_smooths_inside_the_given_foreground():
    normal = torch.stack([torch.full((1, 13, 13, 13), v) for v in (0.4, 0.5, 0.6)])  # mean 0.5, std 0.1
    model = fitted_gaussian(normal, std_floor=1e-6)
    test = torch.full((1, 1, 13, 13, 13), 0.5)
    test[0, 0, 6, 6, 6] = 0.8  # one voxel with |z| = 3
    brain = torch.zeros(1, 1, 13, 13, 13)
    brain[..., 1:12, 1:12, 1:12] = 1  # holds the whole kernel (radius 4 sigma) around the hot voxel
    raw = GaussianScoreInferer()(test, model)["anomaly_map"]
    smoothed = GaussianScoreInferer(map_sigma=1.0)(test, model, foreground=brain)["anomaly_map"]
    # closed form at the hot voxel: 3 x the sampled, normalised Gaussian's central weight, cubed
    centre_weight = 1.0 / float(np.exp(-np.arange(-4, 5) ** 2 / 2.0).sum())
    assert raw[0, 0, 6, 6, 6] == pytest.approx(3, rel=1e-4)
    assert smoothed[0, 0, 6, 6, 6] == pytest.approx(3 * centre_weight**3, rel=1e-3)
    assert smoothed[0, 0, 6, 6, 6] == smoothed.max() and (smoothed[brain == 0] == 0).all()
    with pytest.raises(ValueError, match="map_sigma"):
        GaussianScoreInferer(map_sigma=-0.5)


def test_intensity_map_is_the_brain_zscore_of_bright_voxels():
    volume = torch.zeros(1, 1, 10, 10, 10)
    volume[..., 2:8, 2:8, 2:8] = 0.5 + 0.01 * torch.randn(6, 6, 6)
    volume[..., 4, 4, 4] = 0.9  # a bright lesion voxel
    normalised = BrainIntensity()(volume)
    brain = volume > 0
    assert normalised[brain].mean().abs() < 1e-5 and normalised[brain].std(unbiased=False) == pytest.approx(1, rel=1e-4)
    out = IntensityScoreInferer()(volume, BrainIntensity())
    assert out["anomaly_map"].flatten().argmax() == np.ravel_multi_index((4, 4, 4), (10, 10, 10))
    assert (out["anomaly_map"][~brain] == 0).all() and (out["anomaly_map"] >= 0).all()
    assert torch.allclose(out["restoration"][brain], volume[brain].mean().expand(int(brain.sum())))
    dark = IntensityScoreInferer(signed="negative")(volume, BrainIntensity())["anomaly_map"]
    assert dark[..., 4, 4, 4] == 0
