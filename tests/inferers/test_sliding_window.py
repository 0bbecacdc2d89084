"""SlidingWindowAnomalyInferer: foreground weighting (DISYRE's blend) and whole-image inference equal to one window."""

from __future__ import annotations

import pytest
import torch

from medad.inferers import AnomalyInferer, SlidingWindowAnomalyInferer
from tests.helpers import ResidualInferer, random_unet


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


@pytest.mark.parametrize("normalize", [False, True])
def test_whole_image_equals_the_one_window_blend(normalize: bool):
    net = random_unet()
    x = torch.rand(3, 1, 24, 28)
    fg = (torch.rand(3, 1, 24, 28) > 0.3).float()
    kwargs = dict(roi_size=(32, 32), normalize_foreground_weight=normalize, foreground_weighting=True)
    windows = SlidingWindowAnomalyInferer(ResidualInferer(), **kwargs)
    whole = SlidingWindowAnomalyInferer(ResidualInferer(), whole_image=True, **kwargs)
    with torch.no_grad():
        expected, got = windows(x, net, foreground=fg), whole(x, net, foreground=fg)
    torch.testing.assert_close(got["anomaly_map"], expected["anomaly_map"], atol=1e-6, rtol=1e-5)
    if normalize:
        torch.testing.assert_close(got["restoration"], expected["restoration"], atol=1e-6, rtol=1e-5)


class ShapeRecorder(AnomalyInferer):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, inputs, network, *args, **kwargs):
        self.shapes.append(tuple(inputs.shape))
        return {"anomaly_map": inputs[:, :1].clone(), "restoration": inputs.clone()}


def test_whole_image_without_roi_padding_sees_the_image_as_given():
    # a network trained on whole (divisor-padded) slices must see them as given: padding them to a larger roi moves
    # the image by a number of pixels that need not be a multiple of the UNet's stride
    x = torch.rand(2, 1, 24, 32)
    recorder = ShapeRecorder()
    out = SlidingWindowAnomalyInferer(recorder, roi_size=(64, 64), whole_image=True, pad_to_roi=False,
                                      foreground_weighting=False)(x, None)
    assert recorder.shapes == [(2, 1, 24, 32)]
    torch.testing.assert_close(out["restoration"], x)
    padded = ShapeRecorder()
    SlidingWindowAnomalyInferer(padded, roi_size=(64, 64), whole_image=True, foreground_weighting=False)(x, None)
    assert padded.shapes == [(2, 1, 64, 64)]
    with pytest.raises(ValueError, match="whole_image"):
        SlidingWindowAnomalyInferer(recorder, roi_size=(64, 64), pad_to_roi=False)


def test_disyre_applies_a_whole_slice_model_to_whole_unpadded_slices():
    from pathlib import Path

    from medad import bundle

    repo = Path(__file__).resolve().parents[2]
    for patch_size, whole, pad in ((None, True, False), ((128, 128), False, True)):
        parser = bundle.parser(repo / "bundles" / "disyre", "inference", run_dir="/tmp/unused", quick=False,
                               patch_size=patch_size)
        window = parser.get_parsed_content("window_inferer")
        assert (window.whole_image, window.pad_to_roi) == (whole, pad), patch_size
    # asking for sliding windows on a whole-slice model gives them (padded to the window), not an error
    parser = bundle.parser(repo / "bundles" / "disyre", "inference", run_dir="/tmp/unused", quick=False,
                           patch_size=None, whole_slice=False)
    window = parser.get_parsed_content("window_inferer")
    assert (window.whole_image, window.pad_to_roi) == (False, True)
