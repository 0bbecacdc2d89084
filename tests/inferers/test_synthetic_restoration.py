"""DISYRE's restoration inferer: closed forms of the multi-step, naive and single-step restorations, and volumes in
and out through slices and sliding windows on the input grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medad.inferers import (
    SliceAggregationInferer,
    SlidingWindowAnomalyInferer,
    SyntheticRestorationInferer,
)
from medad.networks import AnomalyUNet
from tests.helpers import SCHEDULE, Constant


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
