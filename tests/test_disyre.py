"""DISYRE (seed 003): corruption schedule, training step, restoration inferer, foreground weighting, 3D slices, bundle."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from medad.corruptions import ForeignPatchCorruption
from medad.diffusion import SyntheticAnomalySchedule, make_diffusion
from medad.inferers import AnomalyInferer, SliceAggregationInferer, SlidingWindowAnomalyInferer, SyntheticRestorationInferer
from medad.methods import SyntheticAnomalyStep
from medad.networks import AnomalyUNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "disyre" / "configs"
SCHEDULE = SyntheticAnomalySchedule()
TINY_NET = {"widths": (8, 16), "max_steps": 2, "restoration_steps": 1, "slices_per_volume": 2, "batch_size": 2}


def _brains(batch: int = 4, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that are 0 outside a disk (the 'brain'), and the disk masks, (B, 1, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    fg = (((yy - size // 2) ** 2 + (xx - size // 2 + 4) ** 2) < (size // 3) ** 2).float()
    x = (0.2 + 0.6 * torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))) * fg
    return x, fg.expand(batch, 1, size, size).clone()


class Constant(torch.nn.Module):
    """x̂_0 = c everywhere; records the inputs and timesteps it is called with."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        return torch.full_like(x, self.value)


# --------------------------------------------------------------------------------------------- schedule
def test_schedule_is_the_flipped_sqrt_alpha_bar_and_grows_with_t():
    diffusion = make_diffusion("linear", 100, "start_x", beta_start=1e-3, beta_end=0.2)
    np.testing.assert_allclose(SCHEDULE.alphas, diffusion.sqrt_alphas_cumprod[::-1])
    assert np.all(np.diff(SCHEDULE.alphas) > 0)  # corruption strength grows with t
    assert SCHEDULE.alphas[-1] == pytest.approx(np.sqrt(1 - 1e-3))  # α_{T-1} = √ᾱ_0 = √(1 − β_1)
    assert 0 < SCHEDULE.alphas[0] < 0.01
    assert float(SCHEDULE.alpha(-1)) == 0.0  # "after the last step": the clean image


def test_alpha_to_timestep_is_monotone_and_inverts_the_schedule():
    t = torch.arange(100)
    assert torch.equal(SCHEDULE.timestep_for_alpha(SCHEDULE.alpha(t).double()), t)
    steps = SCHEDULE.timestep_for_alpha(torch.linspace(0, 1, 201))
    assert (steps[1:] >= steps[:-1]).all() and steps[0] == 0 and steps[-1] == 99
    midpoint = (SCHEDULE.alphas[40] + SCHEDULE.alphas[41]) / 2  # argmin |α_t − α|: the nearer neighbour wins
    assert int(SCHEDULE.timestep_for_alpha(midpoint - 1e-6)) == 40
    assert int(SCHEDULE.timestep_for_alpha(midpoint + 1e-6)) == 41


def test_restoration_timesteps_use_the_official_trailing_spacing():
    assert SCHEDULE.restoration_timesteps(5) == [99, 79, 59, 39, 19]
    assert SCHEDULE.restoration_timesteps(1) == [99]
    assert SCHEDULE.restoration_timesteps(100) == list(range(99, -1, -1))
    with pytest.raises(ValueError):
        SCHEDULE.restoration_timesteps(0)


# --------------------------------------------------------------------------------------------- corruption
def test_corruption_is_identity_at_alpha_zero_and_stays_in_the_foreground():
    x, fg = _brains()
    step = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=0)
    clean = step.corrupt(x, fg, alpha=torch.zeros(4))
    assert torch.equal(clean["x_t"], x) and torch.equal(clean["t"], torch.zeros(4, dtype=torch.long))
    out = step.corrupt(x, fg)
    mask = out["mask"]
    assert mask.min() >= 0 and mask.max() <= 1 and (mask.amax(dim=(1, 2, 3)) > 0).all()
    assert (mask[fg == 0] == 0).all() and torch.equal(out["x_t"][fg == 0], x[fg == 0])
    assert torch.equal(out["t"], SCHEDULE.timestep_for_alpha(out["alpha"]))


def test_corruption_is_linear_in_alpha():
    # eq. 1: x̃ − x = α·m·(x_f − x); the same draws with α = 1 and α = 0.4 differ by the factor 0.4
    x, fg = _brains()
    strong = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=3).corrupt(x, fg, alpha=torch.ones(4))
    weak = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=3).corrupt(x, fg, alpha=torch.full((4,), 0.4))
    torch.testing.assert_close(weak["x_t"] - x, 0.4 * (strong["x_t"] - x), atol=1e-6, rtol=0)
    assert (strong["t"] == 99).all() and (weak["t"] == SCHEDULE.timestep_for_alpha(torch.tensor(0.4))).all()


def test_training_step_is_mse_of_the_x0_prediction_at_t_of_alpha():
    x, fg = _brains()
    batch = {"image": x, "brain_mask": fg}
    expected = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=1).corrupt(x, fg)
    seen = {}

    def identity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["t"] = t
        return x_t

    out = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=1)(identity, batch)
    torch.testing.assert_close(out["loss"], F.mse_loss(expected["x_t"], x))
    assert torch.equal(seen["t"], expected["t"])
    network = AnomalyUNet(2, 1, 1, channels=(8, 16), num_res_blocks=1, attention_levels=(False, False))
    SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=1)(network, batch)["loss"].backward()
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------- restoration
def test_multi_step_cold_diffusion_restoration_matches_the_closed_form():
    # x̂_0 = c: each step scales the residual by α_{t'}/α_t, so x_k − c = (α_{t_k}/α_{t_0})(x − c)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    network = Constant(0.3)
    out = SyntheticRestorationInferer(SCHEDULE, num_steps=5)(x, network)
    steps = [99, 79, 59, 39, 19]
    factor = np.mean([SCHEDULE.alphas[t] / SCHEDULE.alphas[99] for t in steps])
    torch.testing.assert_close(out["anomaly_map"], (x - 0.3).abs() * float(factor), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["restoration"], torch.full_like(x, 0.3))
    assert [int(t[0]) for _, t in network.calls] == steps
    torch.testing.assert_close(network.calls[0][0], x)  # starts from the test image, no noise


def test_naive_and_single_step_restoration_closed_forms():
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    naive = SyntheticRestorationInferer(SCHEDULE, num_steps=3, sampling="naive")(x, Constant(0.5))
    steps = SCHEDULE.restoration_timesteps(3)  # x_{k+1} − c = α_{t_{k+1}}·(x_k − c)
    factors = [1.0, SCHEDULE.alphas[steps[1]], SCHEDULE.alphas[steps[1]] * SCHEDULE.alphas[steps[2]]]
    torch.testing.assert_close(naive["anomaly_map"], (x - 0.5).abs() * float(np.mean(factors)), atol=1e-6, rtol=1e-5)
    network = Constant(0.5)
    single = SyntheticRestorationInferer(SCHEDULE, num_steps=3, mode="single_step")(x, network)
    torch.testing.assert_close(single["anomaly_map"], (x - 0.5).abs())
    assert all(torch.equal(seen, x) for seen, _ in network.calls)
    identity = SyntheticRestorationInferer(SCHEDULE, timesteps=[49])(x, lambda x_t, t: x_t)
    assert identity["anomaly_map"].abs().max() == 0 and torch.equal(identity["restoration"], x)
    with pytest.raises(ValueError):
        SyntheticRestorationInferer(SCHEDULE, timesteps=[10, 20])


# --------------------------------------------------------------------------------------------- foreground weighting
class OnesMap(AnomalyInferer):
    def __call__(self, inputs, network, *args, **kwargs):
        return {"anomaly_map": torch.ones_like(inputs[:, :1]), "restoration": inputs.clone()}


def test_foreground_weighting_damps_patches_that_are_mostly_background():
    image = torch.zeros(1, 1, 64, 64)
    image[..., :32] = 0.5  # foreground: the left half
    kwargs = {"roi_size": (32, 32), "overlap": 0.75, "mode": "gaussian", "sigma_scale": 0.125}
    official = SlidingWindowAnomalyInferer(OnesMap(), normalize_foreground_weight=False, **kwargs)(image, None)
    averaged = SlidingWindowAnomalyInferer(OnesMap(), **kwargs)(image, None)
    plain = SlidingWindowAnomalyInferer(OnesMap(), foreground_weighting=False, **kwargs)(image, None)
    assert (official["anomaly_map"][..., 32:] == 0).all()  # background stays zero
    torch.testing.assert_close(averaged["anomaly_map"][..., :32], torch.ones(1, 1, 64, 32))
    torch.testing.assert_close(plain["anomaly_map"][..., :32], torch.ones(1, 1, 64, 32))
    torch.testing.assert_close(official["restoration"], image)  # only the map is weighted
    # DISYRE: Σ w·f / Σ w over the windows (corners 0, 8, ..., 32), foreground fractions 1, 3/4, ..., 0 by column
    from monai.data.utils import compute_importance_map

    weights = compute_importance_map((32, 32), mode="gaussian", sigma_scale=0.125).double()
    starts = range(0, 33, 8)  # window corners along each axis (64 = 32 + 4 · 8)
    fractions = {s: max(0, 32 - s) / 32 for s in starts}
    expected = []
    for col in range(32):
        windows = [(r, c) for r in starts for c in starts if r <= 20 < r + 32 and c <= col < c + 32]
        numerator = sum(weights[20 - r, col - c] * fractions[c] for r, c in windows)
        expected.append(numerator / sum(weights[20 - r, col - c] for r, c in windows))
    row = official["anomaly_map"][0, 0, 20, :32].double()
    torch.testing.assert_close(row, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert row[0] == pytest.approx(1.0) and row[31] < 0.8


# --------------------------------------------------------------------------------------------- volumes
@pytest.fixture(scope="module")
def demo_mri(tmp_path_factory) -> Path:
    from medad.data import make_demo_mri

    return make_demo_mri(tmp_path_factory.mktemp("demo_mri"), num_train=2, num_test=1)


def test_volume_in_volume_out_with_the_same_grid_and_zero_background(demo_mri: Path, tmp_path: Path):
    from medad import io
    from medad.data import nifti_datalist, volume_transforms

    item = nifti_datalist(demo_mri / "test", demo_mri / "test_masks", brain_mask_dir=demo_mri / "brain_masks")[0]
    loaded = volume_transforms(intensity=None)(item)
    volume = loaded["image"][None]  # (1, 1, X, Y, Z)
    network = AnomalyUNet(2, 1, 1, channels=(8, 16), num_res_blocks=1, attention_levels=(False, False)).eval()
    window = SlidingWindowAnomalyInferer(SyntheticRestorationInferer(SCHEDULE, num_steps=1), (32, 32), overlap=0.5,
                                         sw_batch_size=64, normalize_foreground_weight=False)
    out = SliceAggregationInferer(window, spatial_dim=2, slice_batch_size=64, size_divisor=2)(volume, network)
    assert out["anomaly_map"].shape == volume.shape and out["restoration"].shape == volume.shape
    anomaly = out["anomaly_map"][0, 0].numpy()
    assert (anomaly[volume[0, 0].numpy() == 0] == 0).all() and anomaly.max() > 0 and anomaly.min() >= 0
    paths = io.write_volume_case("case", anomaly, (np.asarray(loaded["image"].affine), anomaly.shape), tmp_path)
    written, source = nib.load(paths["anomaly_map"]), nib.load(item["image"])
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj)[np.asarray(source.dataobj) == 0], 0)


# --------------------------------------------------------------------------------------------- bundle
def _run_bundle(config_files: list[Path], **override) -> None:
    from monai.bundle import run

    run(config_file=[str(f) for f in config_files], logging_file=str(CONFIGS / "logging.conf"), **override)


def test_bundle_on_real_folders_writes_brain_metrics_and_volumes(demo_mri: Path, tmp_path: Path):
    _run_bundle([CONFIGS / "train.json"], run_dir=str(tmp_path), dataset_dir=str(demo_mri / "train"),
                test_dir=str(demo_mri / "test"), test_mask_dir=str(demo_mri / "test_masks"),
                brain_mask_dir=str(demo_mri / "brain_masks"), quick=True, intensity=None, **TINY_NET)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert 0 <= metrics["pixel_ap"] <= 1 and 0 <= metrics["best_dice"] <= 1 and "dice" in metrics
    assert "pixel_threshold" in metrics["calibration"]
    cases = pd.read_csv(tmp_path / "eval" / "cases.csv")
    assert len(cases) == 1 and {"ap", "best_dice", "dice"} <= set(cases.columns)
    written = nib.load(tmp_path / "eval" / "maps" / f"{cases['case_id'][0]}_anomaly_map.nii.gz")
    source = nib.load(demo_mri / "test" / f"{cases['case_id'][0]}.nii.gz")
    assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-5)


def test_bundle_runs_on_2d_industrial_images_by_configuration_only(tmp_path: Path):
    _run_bundle([CONFIGS / "train.json", CONFIGS / "industrial.json"], run_dir=str(tmp_path), image_size=16, **TINY_NET)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 30 and 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["image_auroc"] <= 1
    assert metrics["network_evaluations_per_image"] == 1
