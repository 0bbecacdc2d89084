"""SliceAggregationInferer: the brain mask handed to the window inferer, and the fast path (channels-last,
inference mode, large slice batches) keeping the maps.
"""

from __future__ import annotations

import pytest
import torch

from medad.inferers import SliceAggregationInferer, SlidingWindowAnomalyInferer
from medad.inferers.base import AnomalyInferer
from tests.helpers import ResidualInferer, random_unet


class _ConstantMap(AnomalyInferer):
    """Map of ones, restoration = input: shows where the wrappers keep or zero the map."""

    def __call__(self, inputs, network, *args, **kwargs):
        return {"anomaly_map": torch.ones_like(inputs[:, :1]), "restoration": inputs}


def test_slice_inferer_hands_the_brain_mask_to_the_window_inferer():
    volume = torch.rand(1, 1, 16, 20, 6) + 0.5  # a head that is not skull-stripped: "input > 0" everywhere
    brain = torch.zeros(1, 1, 16, 20, 6)
    brain[:, :, 4:12, 5:15, 1:5] = 1
    window = SlidingWindowAnomalyInferer(_ConstantMap(), roi_size=(8, 8), overlap=0.5, foreground_weighting=True)
    inferer = SliceAggregationInferer(window, spatial_dim=2, size_divisor=4)
    guessed = inferer(volume, network=None)["anomaly_map"]
    assert (guessed > 0).all()  # without the mask every voxel is foreground
    out = inferer(volume, network=None, foreground=brain)["anomaly_map"]
    assert out.shape == volume.shape
    assert (out[brain == 0] == 0).all()
    assert (out[brain > 0] > 0).all()
    with pytest.raises(ValueError, match="brain mask"):
        inferer(volume, network=None, foreground=brain[..., :3])


class _SliceIndexMap(AnomalyInferer):
    """Map = 1 on one slice of the batch only: a lesion seen by one 2D slice, none by its neighbours."""

    def __call__(self, inputs, network, *args, **kwargs):
        anomaly = torch.zeros_like(inputs[:, :1])
        anomaly[inputs[:, 0, 0, 0] == 7.0] = 1.0  # the slice whose corner voxel carries the mark
        return {"anomaly_map": anomaly, "restoration": inputs}


def test_map_sigma_smooths_the_stacked_volume_across_slices_inside_the_brain():
    volume = torch.ones(1, 1, 12, 12, 15)
    volume[0, 0, 0, 0, 7] = 7.0  # slice 7 of the axial axis is the only one with a map
    brain = torch.zeros(1, 1, 12, 12, 15)
    brain[..., 1:11, 1:11, :] = 1  # every slice: the kernel (radius 4) never reaches past the region along z
    plain = SliceAggregationInferer(_SliceIndexMap(), spatial_dim=2, size_divisor=4)
    smoothed = SliceAggregationInferer(_SliceIndexMap(), spatial_dim=2, size_divisor=4, map_sigma=1.0)
    raw = plain(volume, network=None, foreground=brain)["anomaly_map"]
    out = smoothed(volume, network=None, foreground=brain)["anomaly_map"]
    assert raw[..., 6].abs().sum() == 0 and raw[..., 7][brain[..., 7] > 0].min() == 1.0  # without: one slice only
    centre = out[0, 0, 5, 5]
    # along z a 1-voxel-thick sheet becomes the Gaussian's profile: exp(-1/2) of the peak one slice away
    assert centre[6] / centre[7] == pytest.approx(float(torch.exp(torch.tensor(-0.5))), rel=1e-4)
    assert (out[brain == 0] == 0).all() and (out[brain > 0] >= 0).all()
    with pytest.raises(ValueError, match="map_sigma"):
        SliceAggregationInferer(_SliceIndexMap(), map_sigma=-1.0)


class _Recorder(AnomalyInferer):
    """Records the padded slices it is given; restoration = input rolled by one pixel (a position-dependent answer
    that shows where the wrapper crops it back)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def __call__(self, inputs, network, *args, **kwargs):
        self.seen.append(inputs.clone())
        rolled = inputs.roll(1, dims=-1)
        return {"anomaly_map": (rolled - inputs).abs(), "restoration": rolled}


def test_slices_are_padded_as_the_training_slices_were():
    # A whole-slice model learns where the brain sits in its padded input: inference must pad a slice exactly as
    # RandBrainSlicesd padded it for training (symmetrically), not only after the last row/column (a shift).
    from medad.transforms.slices import RandBrainSlicesd

    volume = torch.rand(1, 1, 13, 18, 3)
    recorder = _Recorder()
    out = SliceAggregationInferer(recorder, spatial_dim=2, size_divisor=8)(volume, network=None)
    trained = RandBrainSlicesd(["image", "brain_mask"], label_key="brain_mask", num_samples=1, size_divisor=8)
    trained.set_random_state(0)
    sample = trained({"image": volume[0], "brain_mask": torch.ones_like(volume[0])})[0]
    z = [k for k in range(3) if torch.equal(volume[0, ..., k], sample["image"][:, 1:14, 3:21])][0]  # 13 -> 16, 18 -> 24
    seen = recorder.seen[0][z]
    assert seen.shape == sample["image"].shape == (1, 16, 24)
    assert torch.equal(seen, sample["image"])
    # the answer is cropped back from the same place
    expected = torch.nn.functional.pad(volume[0, ..., z], (3, 3, 1, 2)).roll(1, dims=-1)[:, 1:14, 3:21]
    torch.testing.assert_close(out["restoration"][0, ..., z], expected)


def test_channels_last_and_inference_mode_keep_the_maps():
    net = random_unet()
    volume = torch.rand(1, 1, 20, 18, 6)
    volume[..., 0] = 0  # an empty slice is skipped either way
    plain = SliceAggregationInferer(SlidingWindowAnomalyInferer(ResidualInferer(), roi_size=(24, 24)), size_divisor=2)
    fast = SliceAggregationInferer(SlidingWindowAnomalyInferer(ResidualInferer(), roi_size=(24, 24), whole_image=True),
                        size_divisor=2, channels_last=True, inference_mode=True, slice_batch_size=64)
    expected = plain(volume, net)
    got = fast(volume, net)
    torch.testing.assert_close(got["anomaly_map"], expected["anomaly_map"], atol=1e-5, rtol=1e-4)
    assert net.conv_out.weight.is_contiguous(memory_format=torch.channels_last)


class _RowWeightedMap(AnomalyInferer):
    """map = input × (row index + 1) of the slice, restoration = input × 2: answers that depend on where a pixel sits
    and show whether each mirrored pass is mirrored back."""

    def __call__(self, inputs, network, *args, **kwargs):
        rows = torch.arange(1, inputs.shape[-2] + 1, dtype=inputs.dtype)[:, None]
        return {"anomaly_map": inputs[:, :1] * rows, "restoration": inputs * 2}


def test_mirror_axes_average_the_mirrored_passes_mirrored_back():
    volume = torch.rand(1, 1, 8, 6, 5) + 0.1  # no background slice: every slice is scored
    inferer = SliceAggregationInferer(_RowWeightedMap(), spatial_dim=2, size_divisor=1, mirror_axes=(0,))
    out = inferer(volume, network=None)
    rows = torch.arange(1, 9, dtype=volume.dtype)[:, None, None]  # axis 0 of the volume = the slices' rows
    # the mirrored pass weights the mirrored rows: back in place, row i carries weight 8 - i; the mean is 4.5 everywhere
    torch.testing.assert_close(out["anomaly_map"], volume * (rows + rows.flip(0)) / 2)
    torch.testing.assert_close(out["restoration"], volume * 2)
    inferer = SliceAggregationInferer(_RowWeightedMap(), spatial_dim=2, size_divisor=1, mirror_axes=(0, 1))
    # 4 passes (none, rows, columns, both): each row weight meets its mirror twice
    torch.testing.assert_close(inferer(volume, network=None)["anomaly_map"], volume * 4.5)
    for bad in [(2,), (0, 0), (3,)]:  # the sliced axis, a repeat, no such axis
        with pytest.raises(ValueError, match="mirror_axes"):
            SliceAggregationInferer(_RowWeightedMap(), spatial_dim=2, mirror_axes=bad)
