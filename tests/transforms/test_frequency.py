"""Tests for medad.transforms.frequency: high-pass transfer functions, FFT filtering, Sobel gradients, and FAIR's
network input (HighFrequencyInput) with its restoration canvas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medad.inferers import FrequencyRestorationInferer
from medad.transforms.frequency import (
    HighFrequencyInput,
    butterworth_highpass_filter,
    frequency_distance,
    gaussian_highpass_filter,
    highpass,
    ideal_highpass_filter,
    sobel_gradients,
    to_grayscale,
)


def test_distance_is_zero_at_fftshift_centre_and_euclidean():
    d = frequency_distance((64, 48), cutoff_reference_size=None)
    assert d[32, 24] == 0
    assert d[32 + 3, 24 + 4] == pytest.approx(5.0)
    assert d[0, 0] == pytest.approx(math.hypot(32, 24))


def test_butterworth_values_at_chosen_distances():
    h = butterworth_highpass_filter((64, 64), cutoff=10, order=2, cutoff_reference_size=None)
    assert h[32, 32] == 0  # defined as 0 at D = 0
    assert h[32, 42] == pytest.approx(0.5)  # D = D0
    assert h[32 + 6, 32 + 8] == pytest.approx(0.5)  # D = 10 off-axis
    d = math.hypot(32, 32)
    assert h[0, 0] == pytest.approx(1 / (1 + (10 / d) ** 4), rel=1e-5)
    assert h[0, 0] > 0.99
    h4 = butterworth_highpass_filter((64, 64), cutoff=10, order=4, cutoff_reference_size=None)
    assert h4[32, 37] == pytest.approx(1 / (1 + 2.0**8), rel=1e-5)  # D = 5, order 4


def test_butterworth_matches_fair_official_formula_on_256():
    rows = cols = 256
    y, x = np.ogrid[:rows, :cols]
    dist = np.sqrt((x - cols // 2) ** 2 + (y - rows // 2) ** 2)
    official = 1 / (1 + (30 / (dist + 1e-6)) ** 4)
    ours = butterworth_highpass_filter((256, 256), cutoff=30, order=2).numpy()
    np.testing.assert_allclose(ours, official, atol=1e-6)


def test_cutoff_scales_with_reference_size():
    h = butterworth_highpass_filter((128, 128), cutoff=30, order=2, cutoff_reference_size=256)
    assert h[64, 64 + 15] == pytest.approx(0.5)  # 30 on a 256 grid is 15 on a 128 grid


def test_gaussian_and_ideal():
    g = gaussian_highpass_filter((64, 64), cutoff=8, cutoff_reference_size=None)
    assert g[32, 40] == pytest.approx(1 - math.exp(-0.5), rel=1e-6)
    assert g[32, 32] == 0
    ideal = ideal_highpass_filter((64, 64), cutoff=8, cutoff_reference_size=None)
    d = frequency_distance((64, 64), None)
    assert torch.equal(ideal, (d > 8).float())
    assert ideal[32, 40] == 0 and ideal[32, 41] == 1


@pytest.mark.parametrize("kind", ["butterworth", "gaussian", "ideal"])
def test_highpass_of_constant_is_zero(kind):
    image = torch.full((2, 3, 32, 40), 0.7)
    assert highpass(image, kind, cutoff=5).abs().max() < 1e-5
    volume = torch.full((1, 1, 8, 16, 16), 2.0)
    assert highpass(volume, kind, cutoff=5).abs().max() < 1e-5


def test_highpass_scales_a_cosine_by_the_transfer_function():
    n, k = 64, 10
    x = torch.arange(n, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * k * x / n).expand(n, n)[None, None].float()
    out = highpass(wave, "butterworth", cutoff=10, order=2, cutoff_reference_size=None, extension="periodic")
    torch.testing.assert_close(out, 0.5 * wave, atol=1e-5, rtol=0)
    out = highpass(wave, "ideal", cutoff=12, cutoff_reference_size=None, extension="periodic")
    assert out.abs().max() < 1e-5


@pytest.mark.parametrize("reference", [None, 64])
def test_symmetric_extension_keeps_the_cutoff_in_cycles_per_image(reference):
    # cos(pi k (x + 1/2) / n) is k/2 cycles per image side and its mirror extension is seamless: the default
    # symmetric filter must scale it exactly by H(k/2), the same cutoff as the periodic filter uses.
    n, k = 64, 20
    x = torch.arange(n, dtype=torch.float64)
    wave = torch.cos(math.pi * k * (x + 0.5) / n).expand(n, n)[None, None].float()
    out = highpass(wave, "butterworth", cutoff=10, order=2, cutoff_reference_size=reference)
    torch.testing.assert_close(out, 0.5 * wave, atol=1e-5, rtol=0)
    assert highpass(wave, "ideal", cutoff=10.5, cutoff_reference_size=reference).abs().max() < 1e-5


def test_symmetric_extension_removes_the_wrap_around_frame():
    # A ramp whose left and right edges differ: the periodic FFT sees a step at the seam and puts a bright
    # band along the borders (FAIR's border frame); the mirrored extension has no seam.
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    image = (0.2 + 0.6 * cols / 63 + 0.1 * torch.sin(rows / 5))[None, None]
    periodic = highpass(image, cutoff=30, extension="periodic").abs()
    symmetric = highpass(image, cutoff=30).abs()
    interior = (..., slice(8, -8), slice(8, -8))
    assert periodic[..., :, :2].amax() > 10 * periodic[interior].amax()
    assert symmetric.amax() < 0.03  # only the ramp's slope kink is left at the mirror seam (the step is 0.6)
    assert symmetric[..., :, :2].amax() < 0.1 * periodic[..., :, :2].amax()
    with pytest.raises(ValueError, match="extension"):
        highpass(image, extension="zeros")


def test_sobel_of_ramps():
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(20.0), indexing="ij")
    ramp_x = (3 * cols)[None, None]
    grads = sobel_gradients(ramp_x)
    assert grads.shape == (1, 2, 16, 20)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(grads[:, :1][inner], torch.tensor(24.0))  # 8 * slope, as cv2.Sobel
    assert grads[:, 1:].abs().max() == 0
    grads_y = sobel_gradients((2 * rows)[None, None])
    assert torch.allclose(grads_y[:, 1:][inner], torch.tensor(16.0))
    assert grads_y[:, :1].abs().max() == 0


def test_grayscale_weights():
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert to_grayscale(rgb).item() == pytest.approx(0.299)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_grayscale(torch.zeros(1, 2, 4, 4))


def test_high_frequency_input_settings_channels_and_volumes():
    volume = torch.rand(1, 1, 12, 16, 10)  # the Fourier filters work in 3D too
    high_frequency = HighFrequencyInput("gaussian", cutoff=4, cutoff_reference_size=None, extension="periodic")
    torch.testing.assert_close(high_frequency(volume), highpass(volume, "gaussian", 4, 2, None, "periodic"))
    assert high_frequency.channels == 1 and "gaussian" in repr(high_frequency)
    sobel = HighFrequencyInput("sobel")
    assert sobel.channels == 2 and sobel(torch.rand(2, 3, 32, 32)).shape == (2, sobel.channels, 32, 32)
    with pytest.raises(ValueError, match="unknown high-frequency extractor 'box'"):
        HighFrequencyInput("box")
    with pytest.raises(ValueError, match="extension"):
        HighFrequencyInput(extension="zeros")


def test_restoration_on_a_mirror_padded_canvas_is_cropped_back():
    seen = []

    def network(x):  # records the canvas it is given; "restores" a zero-padding-like rim artefact
        seen.append(tuple(x.shape))
        out = torch.full((x.shape[0], 3, *x.shape[2:]), 0.5)
        out[..., :2, :] = 0.0
        return out

    images = torch.rand(2, 3, 32, 48)
    high_frequency = HighFrequencyInput()
    plain = high_frequency.restore(network, images)
    padded = high_frequency.restore(network, images, margin=8)
    assert seen == [(2, 1, 32, 48), (2, 1, 48, 64)]
    assert plain.shape == padded.shape == (2, 3, 32, 48)
    assert (plain[..., 0, :] == 0).all() and (padded == 0.5).all()  # the rim falls in the cropped margin
    out = FrequencyRestorationInferer(margin=8, mean_filter_size=5)(images, network)
    assert out["restoration"].shape == images.shape and out["anomaly_map"].shape == (2, 1, 32, 48)
    with pytest.raises(ValueError, match="margin"):
        high_frequency.restore(network, images, margin=32)



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
