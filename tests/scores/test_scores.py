"""Tests for medad.scores: error maps, MSGMS, CIELAB, filters, image scores, FAIR's map."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from medad.scores import (
    absolute_error_map,
    border_area_share,
    border_mask,
    border_top_share,
    cielab_color_map,
    default_pool_kernel,
    fair_anomaly_map,
    gaussian_filter_map,
    masked_gaussian_filter,
    max_score,
    mean_filter,
    msgms_map,
    pooled_max_score,
    prewitt_kernels,
    rgb_to_lab,
    sampled_image_score,
    squared_error_map,
    standardize_map,
    topk_mean_score,
)


def test_error_maps_sum_over_channels():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0, :, 1, 2] = torch.tensor([1.0, -2.0, 0.5])
    se = squared_error_map(x, y)
    ae = absolute_error_map(x, y)
    assert se.shape == ae.shape == (2, 1, 4, 4)
    assert se[0, 0, 1, 2] == pytest.approx(1 + 4 + 0.25)
    assert ae[0, 0, 1, 2] == pytest.approx(3.5)
    assert se.sum() == pytest.approx(5.25) and ae[1].sum() == 0
    assert absolute_error_map(x, y, reduction="mean")[0, 0, 1, 2] == pytest.approx(3.5 / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        squared_error_map(x, y[:, :1])


def test_prewitt_kernels_match_fair():
    k = prewitt_kernels(2)
    fair_x = torch.tensor([[1.0, 0, -1], [1, 0, -1], [1, 0, -1]]) / 3
    torch.testing.assert_close(k[1, 0], fair_x)  # derivative along W
    torch.testing.assert_close(k[0, 0], fair_x.T)
    assert prewitt_kernels(3).shape == (3, 1, 3, 3, 3)


def test_msgms_zero_for_identical_images():
    x = torch.rand(2, 3, 32, 32)
    m = msgms_map(x, x.clone())
    assert m.shape == (2, 1, 32, 32)
    assert m.abs().max() < 1e-6
    v = torch.rand(1, 1, 16, 16, 16)
    assert msgms_map(v, v.clone()).abs().max() < 1e-6


def test_msgms_closed_form_against_flat_image():
    # ramp of slope a along W: interior Prewitt magnitude g = 2a; a flat image has magnitude
    # e = sqrt(1e-12) (the official stabiliser), so the single-scale map is 1 - (2ge + c) / (g^2 + e^2 + c).
    a, c, e = 0.01, 0.0026, 1e-6
    ramp = (a * torch.arange(24.0)).expand(24, 24)[None, None]
    m = msgms_map(ramp, torch.zeros_like(ramp), scales=1, c=c)
    g = 2 * a
    expected = 1 - (2 * g * e + c) / (g * g + e * e + c)
    torch.testing.assert_close(m[0, 0, 2:-2, 2:-2], torch.full((20, 20), expected), atol=1e-5, rtol=0)


def test_msgms_larger_inside_changed_patch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 64, 64, generator=g) * 0.2 + 0.4
    y = x.clone()
    y[..., 24:40, 24:40] = torch.rand(1, 1, 16, 16, generator=g)
    m = msgms_map(x, y)
    inside = m[..., 26:38, 26:38].mean()
    outside = m[..., :16, :16].mean()
    assert inside > 0.1
    assert outside < 1e-6
    assert inside > 10 * outside


def test_lab_matches_skimage():
    colours = np.array(
        [[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.5, 0.7], [0.02, 0.03, 0.01]],
        dtype=np.float64,
    )
    expected = rgb2lab(colours[None])[0]  # (N, 3)
    ours = rgb_to_lab(torch.tensor(colours, dtype=torch.float32).T[None, :, :, None])[0, :, :, 0].T.numpy()
    np.testing.assert_allclose(ours, expected, atol=2e-3)
    assert ours[0, 0] == pytest.approx(100.0, abs=1e-3) and ours[1, 0] == pytest.approx(0.0, abs=1e-4)


def test_color_map_on_random_images_matches_skimage():
    rng = np.random.default_rng(0)
    a = rng.random((8, 8, 3))
    b = rng.random((8, 8, 3))
    la, lb = rgb2lab(a), rgb2lab(b)
    expected = ((la[..., 1:] - lb[..., 1:]) ** 2).sum(-1)
    to_t = lambda arr: torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1)[None]  # noqa: E731
    ours = cielab_color_map(to_t(a), to_t(b))[0, 0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-2)
    bgr = cielab_color_map(to_t(a), to_t(b), channel_order="bgr")[0, 0].numpy()
    expected_bgr = ((rgb2lab(a[..., ::-1])[..., 1:] - rgb2lab(b[..., ::-1])[..., 1:]) ** 2).sum(-1)
    np.testing.assert_allclose(bgr, expected_bgr, rtol=1e-3, atol=1e-2)


def test_color_map_ignores_lightness_and_gray():
    dark, light = torch.full((1, 3, 4, 4), 0.2), torch.full((1, 3, 4, 4), 0.8)
    assert cielab_color_map(dark, light).max() < 1e-3  # grays differ only in L*
    assert torch.equal(cielab_color_map(dark[:, :1], light[:, :1]), torch.zeros(1, 1, 4, 4))
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    assert cielab_color_map(red, dark).min() > 1000


def test_mean_filter_zero_padding_matches_fair_and_other_modes_keep_constants():
    ones = torch.ones(1, 1, 40, 40)
    zero_padded = mean_filter(ones, 21)
    assert zero_padded[0, 0, 20, 20] == pytest.approx(1.0)
    assert zero_padded[0, 0, 0, 0] == pytest.approx(11 * 11 / 441)
    fair = torch.nn.functional.conv2d(ones, torch.ones(1, 1, 21, 21) / 441, padding=10)
    torch.testing.assert_close(zero_padded, fair)
    for mode in ("reflect", "replicate"):
        torch.testing.assert_close(mean_filter(ones, 21, mode), ones)
    assert mean_filter(torch.ones(1, 1, 8, 8, 8), 3, "replicate").shape == (1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="odd"):
        mean_filter(ones, 4)


def test_gaussian_filter_preserves_constants_and_mass():
    ones = torch.ones(1, 1, 20, 20, 20)
    torch.testing.assert_close(gaussian_filter_map(ones, 2.0), ones)
    delta = torch.zeros(1, 1, 41, 41)
    delta[0, 0, 20, 20] = 1
    smoothed = gaussian_filter_map(delta, 2.0, padding_mode="zeros")
    assert smoothed.sum() == pytest.approx(1.0, abs=1e-5)
    assert smoothed[0, 0, 20, 20] == smoothed.max()


def test_masked_gaussian_filter_keeps_constants_inside_and_ignores_outside():
    region = torch.zeros(1, 1, 24, 24, 24)
    region[..., 6:18, 5:19, 8:16] = 1
    outside = torch.rand(1, 1, 24, 24, 24) * 100  # whatever lies outside must not leak in
    constant = torch.where(region > 0, torch.full_like(region, 0.3), outside)
    smoothed = masked_gaussian_filter(constant, region, 2.0)
    torch.testing.assert_close(smoothed[region > 0], torch.full_like(smoothed[region > 0], 0.3))
    assert (smoothed[region == 0] == 0).all()
    # inside a region that holds the kernel, it is the plain Gaussian filter (normalised convolution = convolution)
    delta = torch.zeros(1, 1, 41, 41)
    delta[0, 0, 20, 20] = 1
    torch.testing.assert_close(masked_gaussian_filter(delta, torch.ones_like(delta), 2.0),
                               gaussian_filter_map(delta, 2.0, padding_mode="zeros"))
    # sigma 0 only zeroes the outside; a region of another grid is refused
    torch.testing.assert_close(masked_gaussian_filter(constant, region, 0.0), constant * region)
    with pytest.raises(ValueError, match="region has shape"):
        masked_gaussian_filter(constant, region[..., :10], 1.0)


def test_pooled_max_of_single_hot_pixel_is_inverse_kernel_area():
    m = torch.zeros(2, 1, 100, 100)
    m[0, 0, 50, 50] = 1
    assert default_pool_kernel(100) == 4 and default_pool_kernel(192) == 8
    scores = pooled_max_score(m)
    assert scores[0] == pytest.approx(1 / 16) and scores[1] == 0
    assert pooled_max_score(m, kernel_size=5)[0] == pytest.approx(1 / 25)
    v = torch.zeros(1, 1, 20, 20, 20)
    v[0, 0, 5, 5, 5] = 1
    assert pooled_max_score(v, kernel_size=2)[0] == pytest.approx(1 / 8)
    # channels are averaged before pooling
    two = torch.zeros(1, 2, 10, 10)
    two[0, 0, 3, 3] = 1
    assert pooled_max_score(two, kernel_size=1)[0] == pytest.approx(0.5)


def test_topk_max_and_standardize():
    m = torch.arange(100.0).reshape(1, 1, 10, 10).repeat(2, 1, 1, 1)
    m[1] = -m[1]
    scores = topk_mean_score(m, k=4)
    assert scores[0] == pytest.approx((99 + 98 + 97 + 96) / 4)
    assert scores[1] == pytest.approx((0 - 1 - 2 - 3) / 4)
    assert topk_mean_score(m, k=1000)[0] == pytest.approx(49.5)
    torch.testing.assert_close(max_score(m), torch.tensor([99.0, 0.0]))
    z = standardize_map(m, mean=10.0, std=2.0)
    assert z[0, 0, 0, 0] == pytest.approx(-5.0)


def test_fair_map_is_smoothed_msgms_plus_weighted_color():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 48, 48, generator=g)
    assert fair_anomaly_map(x, x.clone()).abs().max() < 1e-6
    y = x.clone()
    y[:, 0, 10:30, 10:30] = 1.0
    expected = mean_filter(msgms_map(x, y) + 0.0003 * cielab_color_map(x, y), 21)
    out = fair_anomaly_map(x, y)
    torch.testing.assert_close(out, expected)
    assert out.shape == (1, 1, 48, 48)
    assert max_score(out)[0] > max_score(fair_anomaly_map(x, y, color_weight=0.0))[0]


def test_border_statistic_on_synthetic_maps():
    assert border_area_share((256, 256), 8) == pytest.approx(1 - (240 / 256) ** 2)
    assert border_mask((4, 4, 4), 1).sum() == 64 - 8
    frame = torch.rand(3, 1, 64, 64) * 0.1
    frame[..., :3, :] += 1.0  # a bright band along the top border
    assert torch.equal(border_top_share(frame, 8, 0.01), torch.ones(3))
    blob = torch.rand(3, 1, 64, 64) * 0.1
    blob[..., 28:36, 28:36] += 1.0
    assert torch.equal(border_top_share(blob, 8, 0.01), torch.zeros(3))
    noise = torch.rand(50, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert border_top_share(noise, 8, 0.01).mean() == pytest.approx(border_area_share((64, 64), 8), abs=0.03)
    assert border_top_share(torch.rand(2, 1, 8, 16, 16), 2, 0.05).shape == (2,)


def test_msgms_replicate_padding_compares_gradients_not_intensities_at_the_border():
    # A restoration uniformly a little darker has the same gradients: no anomaly anywhere. FAIR's zero-padded
    # Prewitt filters see the step to 0 at the border and turn the offset into a frame.
    x = 0.5 + 0.05 * torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    y = x - 0.1
    assert msgms_map(x, y).abs().max() < 1e-6
    official = msgms_map(x, y, padding_mode="zeros")
    assert official[..., 0, :].mean() > 0.01 and official[..., 8:-8, 8:-8].abs().max() < 1e-6
    assert border_top_share(fair_anomaly_map(x, y, mean_filter_size=5, padding_mode="zeros",
                                             gradient_padding_mode="zeros")) == 1.0
    assert fair_anomaly_map(x, y, mean_filter_size=5).abs().max() < 1e-6
    with pytest.raises(ValueError, match="padding mode"):
        msgms_map(x, y, padding_mode="circle")



def test_sampled_image_score_estimates_a_top_k_mean_and_says_what_a_maximum_does():
    score, text = sampled_image_score(functools.partial(topk_mean_score, k=100), 0.25)
    assert score.keywords["k"] == 25 and "top-25" in text
    pooled, text = sampled_image_score(pooled_max_score, 0.5, width=100)
    assert pooled.keywords["kernel_size"] == 4 and "biased low" in text
    same, text = sampled_image_score(torch.amax, 0.5)
    assert same is torch.amax and "biased low" in text
    with pytest.raises(ValueError, match="fraction"):
        sampled_image_score(pooled_max_score, 0.0)
