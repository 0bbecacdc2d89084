"""FAIR (seed 002): training step, frequency-restoration inferer, LR schedule, and the bundle end to end.

Bundle runs use tiny overrides (16x16 images, 2 steps) and write only under pytest's tmp_path.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from medad import bundle
from medad.inferers import FrequencyRestorationInferer, SliceAggregationInferer, SlidingWindowAnomalyInferer
from medad.engine import multi_step_schedule, training_length
from medad.methods import FairTrainingStep
from medad.networks import AnomalyUNet
from medad.transforms.frequency import HighFrequencyInput, highpass, to_grayscale

REPO = Path(__file__).resolve().parents[1]
FAIR = REPO / "bundles" / "fair"


def tiny_unet(in_channels: int = 1, out_channels: int = 3) -> AnomalyUNet:
    """The bundle's network family (additive skips, BatchNorm, sigmoid) at a test-sized width."""
    return AnomalyUNet(2, in_channels, out_channels, channels=(8, 16), num_res_blocks=(1, 0),
                       attention_levels=(False, False), with_timestep=False, skip_mode="add", norm="batch",
                       act="RELU", output_activation="sigmoid")


class Recorder(torch.nn.Module):
    """Returns a fixed restoration and remembers what it was given (a stand-in for the UNet)."""

    def __init__(self, restoration: torch.Tensor) -> None:
        super().__init__()
        self.restoration = restoration
        self.weight = torch.nn.Parameter(torch.zeros(()))  # so the loss has something to differentiate
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.restoration + 0 * self.weight


# -- network input ----------------------------------------------------------------------------------------
def test_high_frequency_input_removes_the_mean_and_matches_highpass_of_gray():
    high_frequency = HighFrequencyInput()
    constant = torch.full((2, 3, 16, 16), 0.7)
    assert high_frequency(constant).abs().max() < 1e-5  # H(0) = 0: a flat image has no high frequencies
    images = torch.rand(2, 3, 16, 16)
    expected = highpass(to_grayscale(images), "butterworth", 30.0, 2, 256)
    assert torch.allclose(high_frequency(images), expected)
    assert high_frequency(images).mean(dim=(2, 3)).abs().max() < 1e-5
    assert HighFrequencyInput("sobel")(images).shape == (2, 2, 16, 16)
    assert HighFrequencyInput("sobel").channels == 2 and HighFrequencyInput("gaussian").channels == 1
    with pytest.raises(ValueError, match="extractor"):
        HighFrequencyInput("wavelet")


# -- training step ----------------------------------------------------------------------------------------
def test_training_step_gives_finite_loss_and_gradients():
    torch.manual_seed(0)
    network = tiny_unet()
    step = FairTrainingStep(seed=0)
    out = step(network, {"image": torch.rand(4, 3, 16, 16)})
    assert set(out) == {"loss", "l2", "ssim"} and out["loss"].ndim == 0
    assert torch.isfinite(out["loss"]) and torch.isclose(out["loss"], out["l2"] + out["ssim"])
    out["loss"].backward()
    grads = [p.grad for p in network.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_training_loss_is_l2_plus_one_minus_ssim_and_input_is_the_highpass():
    images = torch.rand(2, 3, 16, 16)
    step = FairTrainingStep(corrupt=False, margin=0)  # margin 0: the Recorder returns image-sized outputs
    exact = Recorder(images.clone())
    out = step(exact, {"image": images})
    assert float(out["loss"].detach()) < 1e-6  # perfect restoration: L2 = 0 and SSIM = 1
    assert torch.allclose(exact.seen, HighFrequencyInput()(images))

    shifted = Recorder((images + 0.1).clamp(0, 1))
    out = step(shifted, {"image": images})
    assert torch.isclose(out["l2"], ((shifted.restoration - images) ** 2).mean())
    assert 0 < float(out["ssim"]) < 1


def test_corruption_changes_the_input_but_clean_branch_does_not():
    images = torch.rand(4, 3, 32, 32)
    never = FairTrainingStep(p_clean=1.0, rotate_prob=0.0)
    targets, corrupted = never.corrupt_batch(images)
    assert torch.equal(targets, images) and torch.equal(corrupted, images)
    always = FairTrainingStep(p_clean=0.0, rotate_prob=0.0, seed=1, margin=0)
    targets, corrupted = always.corrupt_batch(images)
    assert torch.equal(targets, images)
    changed = (corrupted - images).abs().flatten(1).amax(dim=1) > 0
    assert changed.all()
    # precomputed corruptions in the batch (RandFairCorruptiond in the loader) are used as they are
    recorder = Recorder(images.clone())
    always(recorder, {"image": images, "corrupted": corrupted})
    assert torch.allclose(recorder.seen, HighFrequencyInput()(corrupted))


def test_training_step_rejects_a_network_with_the_wrong_output_channels():
    step = FairTrainingStep(corrupt=False)
    with pytest.raises(ValueError, match="out_channels"):
        step(Recorder(torch.rand(2, 1, 16, 16)), {"image": torch.rand(2, 3, 16, 16)})


# -- learning-rate schedule -------------------------------------------------------------------------------
def test_lr_is_multiplied_by_0_2_at_80_and_90_percent_of_training():
    assert training_length(max_steps=None, max_epochs=10, steps_per_epoch=7) == 70
    assert training_length(max_steps=50, max_epochs=10, steps_per_epoch=7) == 50
    with pytest.raises(ValueError):
        training_length()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = multi_step_schedule(optimizer, (0.8, 0.9), 0.2, max_epochs=10, steps_per_epoch=10)
    lrs = []
    with warnings.catch_warnings():  # no optimizer.step() here: only the schedule is under test
        warnings.simplefilter("ignore")
        for _ in range(100):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
    assert lrs[79] == pytest.approx(1e-4) and lrs[80] == pytest.approx(2e-5)
    assert lrs[89] == pytest.approx(2e-5) and lrs[90] == pytest.approx(4e-6)


# -- inferer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anomaly_map", ["fair", "squared"])
def test_inferer_shapes_and_ranges(anomaly_map: str):
    torch.manual_seed(0)
    inferer = FrequencyRestorationInferer(map=anomaly_map, mean_filter_size=3)
    out = inferer(torch.rand(2, 3, 16, 16), tiny_unet().eval())
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
    out = windowed(torch.rand(1, 3, 32, 32), tiny_unet().eval())
    assert out["anomaly_map"].shape == (1, 1, 32, 32) and out["restoration"].shape == (1, 3, 32, 32)

    slices = SliceAggregationInferer(inferer, spatial_dim=2, size_divisor=2)
    volume = torch.zeros(1, 1, 14, 14, 5)
    volume[..., 1:4] = torch.rand(1, 1, 14, 14, 3)
    out = slices(volume, tiny_unet(1, 1).eval())
    assert out["anomaly_map"].shape == (1, 1, 14, 14, 5) and out["restoration"].shape == volume.shape
    assert out["anomaly_map"][..., 0].abs().max() == 0  # background slices are skipped


def test_inferer_rejects_bad_settings():
    with pytest.raises(ValueError, match="anomaly map"):
        FrequencyRestorationInferer(map="l1")
    with pytest.raises(ValueError, match="odd"):
        FrequencyRestorationInferer(mean_filter_size=4)
    with pytest.raises(ValueError, match="out_channels"):
        FrequencyRestorationInferer()(torch.rand(1, 3, 16, 16), tiny_unet(1, 1).eval())


# -- bundle -----------------------------------------------------------------------------------------------
def test_metadata_verifies():
    bundle.verify_metadata(FAIR)


def test_bundle_trains_and_evaluates_on_the_demo(tmp_path: Path):
    bundle.run(FAIR, run_dir=str(tmp_path), image_size=16, max_steps=2, batch_size=4)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 30 and 0.0 <= metrics["pixel_auroc"] <= 1.0 and 0.0 <= metrics["image_auroc"] <= 1.0
    assert metrics["network_evaluations_per_image"] == 1
    checkpoint = torch.load(tmp_path / "models" / "model.pt", weights_only=False)
    assert checkpoint["bundle"] == "fair" and checkpoint["step"] == 2


def test_bundle_runs_on_mri_slices_by_config_only(tmp_path: Path):
    bundle.run(FAIR, extra_configs=[str(FAIR / "configs" / "mri.json")], run_dir=str(tmp_path), max_steps=2,
               slices_per_volume=2, demo_kwargs={"num_train": 3, "num_test": 2})
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 2 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert any((tmp_path / "eval" / "maps").rglob("*.nii.gz"))  # 3D maps on the volumes' grid
    network = torch.load(tmp_path / "models" / "model.pt", weights_only=False)["network"]
    assert network["conv_out.weight"].shape[0] == 1  # one output channel: gray MRI
