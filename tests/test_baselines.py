"""The zscore and intensity baselines: exact statistics, map definitions, clear errors, and both bundles end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medad import bundle
from medad.inferers import GaussianScoreInferer, IntensityScoreInferer
from medad.methods.baselines import BrainIntensity, GaussianFitter, PixelGaussian

REPO = Path(__file__).resolve().parents[1]


def _fitted(images: torch.Tensor, std_floor: float = 0.01, chunk: int = 3) -> PixelGaussian:
    model = PixelGaussian(std_floor)
    for start in range(0, len(images), chunk):
        model.update(images[start : start + chunk])
    return model


def test_pixel_gaussian_matches_numpy_in_float64():
    images = torch.rand(10, 2, 5, 6, dtype=torch.float64) * 0.3 + 0.5
    model = _fitted(images)
    assert model.shape == (2, 5, 6) and int(model.count) == 10
    np.testing.assert_allclose(model.mean().numpy(), images.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(model.variance().numpy(), images.numpy().var(0, ddof=1), atol=1e-12)
    params = model(images[:4].float())
    assert params.shape == (4, 4, 5, 6) and params.dtype == torch.float32
    expected_std = np.sqrt(images.numpy().var(0, ddof=1) + 0.01**2)
    np.testing.assert_allclose(params[0, 2:].numpy(), expected_std, rtol=1e-5)


def test_pixel_gaussian_checkpoint_takes_the_fitted_shape():
    model = _fitted(torch.rand(4, 1, 3, 4, 5))
    fresh = PixelGaussian(0.01)
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 3, 4, 5)
    assert torch.equal(fresh(x), model(x))


def test_pixel_gaussian_rejects_another_grid():
    model = _fitted(torch.rand(4, 1, 8, 8))
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


def test_gaussian_score_signed_variants_and_channel_reduction():
    normal = torch.stack([torch.full((2, 4, 4), v) for v in (0.4, 0.5, 0.6)])  # mean 0.5, std 0.1 per pixel
    model = _fitted(normal, std_floor=1e-6)
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


def test_zscore_bundle_on_the_industrial_demo(tmp_path: Path):
    bundle.run(REPO / "bundles" / "zscore", data="industrial",
               run_dir=str(tmp_path), image_size=32)
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert result["num_cases"] == 30 and result["pixel_auroc"] > 0.9  # measured 0.99 at 64 px
    assert "pixel_threshold" in torch.load(tmp_path / "models" / "model.pt", weights_only=False)["calibration"]
    assert any((tmp_path / "eval" / "maps").glob("*.seg.nrrd"))


@pytest.mark.parametrize("name", ["zscore", "intensity"])
def test_mri_baseline_bundles_on_a_small_demo(name: str, tmp_path_factory):
    demo = tmp_path_factory.getbasetemp() / "baseline_demo_mri"  # shared: generated once for both bundles
    run_dir = tmp_path_factory.mktemp(name)
    bundle.run(REPO / "bundles" / name, run_dir=str(run_dir), demo_dir=str(demo),
               demo_kwargs={"num_train": 4, "num_test": 2})
    result = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert result["num_cases"] == 2 and result["pixel_auroc"] > 0.6 and "dice" in result
    assert len(list((run_dir / "eval" / "maps").glob("*_anomaly_map.nii.gz"))) == 2
    # beside it the other baseline (volumes), not itself
    other = {"zscore": "intensity", "intensity": "zscore"}[name]
    assert set(result["baselines"]) == {other} and f"the {name} bundle" in result["baselines_note"]
    assert result["baselines"][other]["num_cases"] == 2 and result["baselines"][other]["pixel_auroc"] > 0.6
    # inference with the saved model and calibration on a folder of volumes
    bundle.run(REPO / "bundles" / name, workflow="inference", run_dir=str(run_dir), input_dir=str(demo / "test"))
    assert len(list((run_dir / "inference" / "maps").glob("*.seg.nrrd"))) == 2
    report = (run_dir / "inference" / "report.html").read_text(encoding="utf-8")
    assert "No baselines: they need held-out normal data" in report
