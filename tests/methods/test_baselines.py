"""The zscore / intensity baselines' models: exact pixel statistics, the fitter's checks on the training grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medad.methods.baselines import GaussianFitter, PixelGaussian
from tests.helpers import fitted_gaussian


def test_pixel_gaussian_matches_numpy_in_float64():
    images = torch.rand(10, 2, 5, 6, dtype=torch.float64) * 0.3 + 0.5
    model = fitted_gaussian(images)
    assert model.shape == (2, 5, 6) and int(model.count) == 10
    np.testing.assert_allclose(model.mean().numpy(), images.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(model.variance().numpy(), images.numpy().var(0, ddof=1), atol=1e-12)
    params = model(images[:4].float())
    assert params.shape == (4, 4, 5, 6) and params.dtype == torch.float32
    expected_std = np.sqrt(images.numpy().var(0, ddof=1) + 0.01**2)
    np.testing.assert_allclose(params[0, 2:].numpy(), expected_std, rtol=1e-5)


def test_pixel_gaussian_checkpoint_takes_the_fitted_shape():
    model = fitted_gaussian(torch.rand(4, 1, 3, 4, 5))
    fresh = PixelGaussian(0.01)
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 3, 4, 5)
    assert torch.equal(fresh(x), model(x))


def test_pixel_gaussian_rejects_another_grid():
    model = fitted_gaussian(torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match=r"input grid \(1, 9, 8\) differs from the training grid \(1, 8, 8\)"):
        model(torch.rand(1, 1, 9, 8))
    with pytest.raises(RuntimeError, match="not fitted"):
        PixelGaussian()(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="std_floor must be > 0"):
        PixelGaussian(0.0)


def test_fitter_names_the_training_file_on_another_grid(tmp_path: Path):
    good = MetaTensor(torch.rand(1, 1, 4, 4, 4), meta={"filename_or_obj": "/data/a.nii.gz"})
    bad = MetaTensor(torch.rand(1, 1, 4, 4, 5), meta={"filename_or_obj": "/data/b.nii.gz"})
    fitter = GaussianFitter(PixelGaussian(), [{"image": good}, {"image": bad}], tmp_path / "model.pt", "zscore")
    with pytest.raises(ValueError, match=r"^/data/b.nii.gz: image grid \(1, 4, 4, 5\) differs"):
        fitter.run()
    fitter = GaussianFitter(PixelGaussian(), [{"image": good}, {"image": good}], tmp_path / "model.pt", "zscore")
    assert fitter.run()["images"] == 2
    state = torch.load(tmp_path / "model.pt", weights_only=False)
    assert state["bundle"] == "zscore" and state["network"]["sum"].shape == (1, 4, 4, 4)
