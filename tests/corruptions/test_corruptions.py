"""Tests for medad.corruptions: Perlin textures, CutPaste, foreign patches, simplex noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from medad.corruptions import (
    OFFICIAL_BIAS_CODEBOOK,
    ForeignPatchCorruption,
    LargeCutPaste,
    PerlinTextureCorruption,
    cut_paste,
    foreign_patch_blend,
    intensity_bias,
    perlin_mask,
    perlin_noise,
    perlin_noise_2d,
    quantized_range_mask,
    random_shape_mask,
    simplex_noise,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_perlin_noise_vanishes_on_lattice_and_stays_in_range():
    noise = perlin_noise_2d((64, 64), (4, 8), gen())
    assert noise.shape == (64, 64)
    assert noise.abs().max() <= 1.0
    assert noise[::16, ::8].abs().max() < 1e-6  # gradient noise is 0 at lattice nodes
    assert noise.std() > 0.1
    torch.testing.assert_close(noise, perlin_noise_2d((64, 64), (4, 8), gen()))
    volume = perlin_noise((16, 24, 20), (2, 3, 5), gen())  # 3D, non-divisible sizes allowed
    assert volume.shape == (16, 24, 20) and volume.abs().max() <= 1.0
    with pytest.raises(ValueError, match="between 1 and the shape"):
        perlin_noise((8, 8), (16, 2))


def test_perlin_mask_is_binary_and_thresholded():
    mask = perlin_mask((64, 64), threshold=0.0, rotate=False, generator=gen(1))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean() < 1
    assert perlin_mask((32, 32), threshold=-2.0, rotate=False, generator=gen()).min() == 1
    rotated = perlin_mask((32, 32), threshold=-2.0, rotate=True, generator=gen(3))
    assert rotated.min() in (0.0, 1.0)  # corners uncovered by a rotation are filled with 0


def test_perlin_texture_corruption_own_texture():
    x = torch.rand(4, 3, 64, 64, generator=gen())
    corrupted, mask = PerlinTextureCorruption(p_clean=0.0)(x, gen(2))
    assert mask.shape == (4, 1, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.flatten(1).sum(1) > 0).all()
    assert corrupted.min() >= 0 and corrupted.max() <= 1
    assert torch.equal(corrupted * (1 - mask), x * (1 - mask))
    assert not torch.equal(corrupted, x)
    clean, empty = PerlinTextureCorruption(p_clean=1.0)(x, gen(2))
    assert torch.equal(clean, x) and empty.sum() == 0
    # 3D volumes use the volume's own texture
    v = torch.rand(1, 1, 16, 32, 32, generator=gen())
    cv, mv = PerlinTextureCorruption(p_clean=0.0)(v, gen(4))
    assert mv.sum() > 0 and torch.equal(cv * (1 - mv), v * (1 - mv))


def test_perlin_texture_blend_formula_with_beta_zero(monkeypatch):
    x = torch.rand(1, 1, 32, 32, generator=gen())
    corruption = PerlinTextureCorruption(beta_range=(0.0, 0.0), p_clean=0.0, augment_texture=False)
    texture = torch.full((1, 32, 32), 0.25)
    monkeypatch.setattr(corruption, "texture", lambda image, generator=None: texture)
    corrupted, mask = corruption(x, gen(5))
    torch.testing.assert_close(corrupted, (1 - mask) * x + mask * texture)


def test_perlin_texture_from_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(tmp_path / f"t{i}.png")
    corruption = PerlinTextureCorruption(texture_source=tmp_path, p_clean=0.0)
    x = torch.rand(2, 3, 32, 32, generator=gen())
    corrupted, mask = corruption(x, gen(6))
    assert corrupted.shape == x.shape and mask.sum() > 0
    assert corrupted.min() >= 0 and corrupted.max() <= 1
    gray = corruption(torch.rand(1, 1, 32, 32), gen(7))[0]
    assert gray.shape == (1, 1, 32, 32)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        PerlinTextureCorruption(texture_source=tmp_path / "t0.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        PerlinTextureCorruption(texture_source=tmp_path / "empty")


def test_cut_paste_copies_and_rotates_exactly():
    x = torch.arange(2 * 12 * 12, dtype=torch.float32).reshape(2, 12, 12)
    pasted, mask = cut_paste(x, source=(1, 2), destination=(5, 4), patch_size=(6, 4), angle=0.0)
    torch.testing.assert_close(pasted[:, 5:11, 4:8], x[:, 1:7, 2:6])
    assert mask.sum() == 24 and mask[0, 5:11, 4:8].min() == 1
    assert torch.equal(pasted * (1 - mask), x * (1 - mask))
    rotated, rmask = cut_paste(x, source=(0, 0), destination=(4, 4), patch_size=(6, 6), angle=math.pi / 2)
    torch.testing.assert_close(rotated[:, 4:10, 4:10], torch.rot90(x[:, :6, :6], 1, dims=(1, 2)), atol=1e-4, rtol=0)
    assert rmask.sum() == 36


def test_large_cutpaste_masks():
    x = torch.rand(4, 3, 64, 64, generator=gen())
    corrupted, mask = LargeCutPaste(p_clean=0.0)(x, gen(1))
    area = mask.flatten(1).mean(1)
    assert ((area > 0.3) & (area <= (0.9 * 64 + 1) ** 2 / 64**2)).all()  # sides in [0.8, 0.9) of the image, rotated
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(corrupted * (1 - mask), x * (1 - mask))
    assert corrupted.min() >= 0 and corrupted.max() <= 1
    unrotated, umask = LargeCutPaste(rotate=False, p_clean=0.0)(x, gen(1))
    side = umask[0, 0].sum(0).max()
    assert 0.8 * 64 - 1 <= side < 0.9 * 64 + 1
    clean, empty = LargeCutPaste(p_clean=1.0)(x, gen(1))
    assert torch.equal(clean, x) and empty.sum() == 0
    with pytest.raises(ValueError, match="B, C, H, W"):
        LargeCutPaste()(torch.zeros(1, 1, 8, 8, 8))


def test_foreign_patch_blend_formula():
    x = torch.rand(3, 2, 16, 16, generator=gen())
    xf = torch.rand(3, 2, 16, 16, generator=gen(1))
    m = torch.rand(3, 1, 16, 16, generator=gen(2))
    m[:, :, :4] = 1.0
    torch.testing.assert_close(foreign_patch_blend(x, xf, m, 0.0), x)
    full = foreign_patch_blend(x, xf, m, 1.0)
    torch.testing.assert_close(full[:, :, :4], xf[:, :, :4])
    alpha = torch.tensor([0.1, 0.5, 0.9])
    expected = (1 - alpha.view(3, 1, 1, 1) * m) * x + alpha.view(3, 1, 1, 1) * m * xf
    torch.testing.assert_close(foreign_patch_blend(x, xf, m, alpha), expected)


def test_intensity_bias_formula_and_clipping():
    x = torch.full((2, 1, 4, 4), 0.5)
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, 1, 1] = 1.0
    m[:, :, 2, 2] = 0.5
    out = intensity_bias(x, m, torch.tensor([0.2, 0.8]), torch.tensor([1.0, -1.0]))
    assert out[0, 0, 1, 1] == pytest.approx(0.7) and out[0, 0, 2, 2] == pytest.approx(0.6)
    assert out[1, 0, 1, 1] == 0.0  # 0.5 - 0.8 clipped
    assert out[1, 0, 2, 2] == pytest.approx(0.1) and out[0, 0, 0, 0] == 0.5


def test_random_shape_mask_is_soft_with_max_one():
    for seed in range(6):
        m = random_shape_mask((64, 64), gen(seed), smooth_sigma=2.0)
        assert m.shape == (64, 64)
        assert m.min() >= 0 and m.max() == pytest.approx(1.0)
        assert ((m > 0.01) & (m < 0.99)).any()  # softened edges
        assert (m < 0.01).any()  # the shape does not fill the patch
    hard = random_shape_mask((32, 32), gen(0), smooth_sigma=0.0)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    volume = random_shape_mask((24, 24, 24), gen(1), smooth_sigma=(1.0, 2.0))
    assert volume.shape == (24, 24, 24) and volume.max() == pytest.approx(1.0)
    torch.testing.assert_close(random_shape_mask((32, 32), gen(9)), random_shape_mask((32, 32), gen(9)))


def test_foreign_patch_corruption_respects_foreground_and_alpha():
    x = torch.rand(2, 1, 96, 96, generator=gen()) * 0.5 + 0.25
    x[:, :, :, :40] = 0  # background on the left
    xf = torch.roll(x, 1, 0)
    corruption = ForeignPatchCorruption(patch_size=32, foreign_location="same")
    x0, m0 = corruption(x, xf, 0.0, generator=gen(1))
    torch.testing.assert_close(x0, x)
    assert (m0.flatten(1).amax(1) > 0.5).all()
    assert m0[:, :, :, :40].max() == 0  # no anomaly in the background
    x1, m1 = corruption(x, xf, torch.tensor([1.0, 1.0]), generator=gen(1))
    torch.testing.assert_close(m1, m0)
    torch.testing.assert_close(x1, (1 - m1) * x + m1 * xf)
    fg = torch.zeros(2, 1, 96, 96)
    fg[:, :, 50:90, 50:90] = 1
    _, mf = ForeignPatchCorruption(patch_size=16)(x, xf, 0.5, foreground=fg, generator=gen(2))
    assert mf.sum() > 0 and (mf * (1 - fg)).max() == 0
    volume = torch.rand(1, 1, 32, 32, 32, generator=gen())
    xv, mv = ForeignPatchCorruption(patch_size=16)(volume, volume.flip(2), 0.7, generator=gen(3))
    assert mv.sum() > 0 and xv.shape == volume.shape


def test_foreign_patch_corruption_intensity_bias_branch():
    x = torch.full((1, 1, 64, 64), 0.5)
    corruption = ForeignPatchCorruption(patch_size=32, intensity_bias_prob=1.0)
    out, m = corruption(x, torch.zeros_like(x), 0.3, generator=gen(4))
    shift = (out - x) / m.clamp_min(1e-6)
    inside = m > 0.5
    assert torch.allclose(shift[inside].abs(), torch.tensor(0.3), atol=1e-5)
    assert torch.equal(out[m == 0], x[m == 0])


def test_official_dag_adds_a_bias_after_the_patch_and_reports_the_larger_strength():
    x = torch.rand(3, 1, 64, 64, generator=gen(5)) * 0.5 + 0.25
    xf = torch.roll(x, 1, 0)
    plain = ForeignPatchCorruption(patch_size=24)
    dag = ForeignPatchCorruption(patch_size=24, bias_after_prob=1.0)
    alpha = torch.tensor([0.0, 0.3, 1.0])
    x_plain, m_plain = plain(x, xf, alpha, generator=gen(6))
    x_dag, m_dag, effective = dag(x, xf, alpha, generator=gen(6), return_alpha=True)
    torch.testing.assert_close(m_dag, m_plain)  # same shapes: the bias draws come after the patch's
    change = x_dag - x_plain
    assert torch.equal(change[m_dag == 0], torch.zeros_like(change[m_dag == 0]))  # the bias stays in the shape
    strength = (x_dag - x_plain).abs().flatten(1).amax(1)
    assert (strength > 0).all()
    torch.testing.assert_close(effective, torch.maximum(alpha, strength))
    # without the second stage the strengths are the given ones and the draws are those of before
    x_again, _, given = plain(x, xf, alpha, generator=gen(6), return_alpha=True)
    torch.testing.assert_close(x_again, x_plain)
    torch.testing.assert_close(given, alpha)


def test_quantized_range_mask_keeps_whole_intensity_classes():
    image = torch.zeros(1, 40, 40)
    image[:, :, 20:] = 0.94  # two classes of the official codebook: 0.0057 (left) and 0.9385 (right)
    shape = torch.ones(40, 40)
    kept = {tuple(quantized_range_mask(image, shape, OFFICIAL_BIAS_CODEBOOK, gen(s))[20, [2, 37]].round().tolist())
            for s in range(40)}
    assert kept <= {(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)} and len(kept) >= 2  # a class is kept whole, or all are


def test_simplex_noise_normalised_correlated_deterministic():
    noise = simplex_noise((2, 1, 128, 128), generator=gen(0))
    assert noise.shape == (2, 1, 128, 128) and noise.dtype == torch.float32
    torch.testing.assert_close(noise.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(noise.std(dim=(1, 2, 3)), torch.ones(2), atol=1e-4, rtol=0)
    horizontal = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1]
    assert horizontal > 0.5  # spatially correlated, unlike torch.randn (~0)
    across = torch.corrcoef(torch.stack([noise[0].flatten(), noise[1].flatten()]))[0, 1]
    assert abs(across) < 0.3  # independent fields per sample
    torch.testing.assert_close(noise, simplex_noise((2, 1, 128, 128), generator=gen(0)))
    assert not torch.equal(noise, simplex_noise((2, 1, 128, 128), generator=gen(1)))
    volume = simplex_noise((1, 2, 16, 16, 16), octaves=3, frequency=8, generator=gen(2))
    assert volume.shape == (1, 2, 16, 16, 16) and volume.std() == pytest.approx(1.0, abs=1e-3)


def test_raw_simplex_2d_and_3d_are_bounded_and_continuous():
    from medad.corruptions import random_permutation, simplex_noise_2d, simplex_noise_3d

    perm = random_permutation(gen(0))

    def max_jump(noise_fn, n: int, ndim: int) -> tuple[float, float, float]:
        t = torch.linspace(0, 20, n, dtype=torch.float64)
        points = torch.stack([t, torch.full_like(t, 3.3), 0.5 * t][:ndim], dim=-1)
        values = noise_fn(points, perm)
        return (values[1:] - values[:-1]).abs().max().item(), values.abs().max().item(), values.std().item()

    for fn, ndim in ((simplex_noise_2d, 2), (simplex_noise_3d, 3)):
        coarse, peak, std = max_jump(fn, 2001, ndim)
        fine, _, _ = max_jump(fn, 20001, ndim)
        assert peak <= 1.01 and std > 0.1
        assert fine < 0.2 * coarse  # jumps shrink with the step: no discontinuities


def _gustavson(point: list[float], perm: list[int]) -> float:
    """Simplex noise at one point, written point by point after Gustavson's "Simplex noise demystified" (2D, 3D;
    falloff radius² 0.5 and the output scales of medad.corruptions.simplex)."""
    import math

    n = len(point)
    skew, unskew = (math.sqrt(n + 1) - 1) / n, (1 - 1 / math.sqrt(n + 1)) / n
    s = sum(point) * skew
    cell = [math.floor(c + s) for c in point]
    t = sum(cell) * unskew
    x0 = [c - (k - t) for c, k in zip(point, cell)]
    order = sorted(range(n), key=lambda a: -x0[a])  # axes by decreasing offset: the simplex's edge walk
    corners, step = [[0] * n], [0] * n
    for a in order:
        step = list(step)
        step[a] = 1
        corners.append(step)
    total = 0.0
    for c, step in enumerate(corners):
        offset = [x0[a] - step[a] + c * unskew for a in range(n)]
        index = 0
        for a in reversed(range(n)):
            index = perm[(cell[a] & 255) + step[a] + index]
        gradient = GRAD3[index % (12 if n == 3 else 8)][:n]
        falloff = max(0.0, 0.5 - sum(o * o for o in offset))
        total += falloff**4 * sum(g * o for g, o in zip(gradient, offset))
    return total * {2: 70.0, 3: 76.883}[n]


GRAD3 = [[1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0], [1, 0, 1], [-1, 0, 1],
         [1, 0, -1], [-1, 0, -1], [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1]]  # fmt: skip


@pytest.mark.parametrize("ndim", [2, 3])
def test_vectorised_simplex_equals_gustavsons_point_by_point_algorithm(ndim: int):
    from medad.corruptions import random_permutation, simplex_noise_2d, simplex_noise_3d

    perm = random_permutation(gen(3))
    points = torch.rand((300, ndim), generator=gen(4), dtype=torch.float64) * 100.0 - 20.0
    noise = (simplex_noise_2d if ndim == 2 else simplex_noise_3d)(points, perm)
    expected = torch.tensor([_gustavson(p.tolist(), perm.tolist()) for p in points.float().double()], dtype=torch.float64)
    torch.testing.assert_close(noise.double(), expected, atol=1e-4, rtol=0)  # float32 coordinates up to 80
    assert expected.abs().max() > 0.3  # not a trivially zero comparison


def test_gaussian_blur_each_equals_one_blur_per_sample():
    from medad.corruptions._common import gaussian_blur, gaussian_blur_each

    x = torch.rand(4, 2, 20, 23, generator=gen(11))
    sigmas = [1.0, 2.5, 0.0, 1.7]  # 0: left as it is
    expected = torch.stack([gaussian_blur(x[i:i + 1], s)[0] if s > 0 else x[i] for i, s in enumerate(sigmas)])
    torch.testing.assert_close(gaussian_blur_each(x, sigmas), expected, atol=1e-6, rtol=0)
    volume = torch.rand(2, 1, 9, 10, 11, generator=gen(12))
    expected = torch.stack([gaussian_blur(volume[i:i + 1], s)[0] for i, s in enumerate([1.2, 0.6])])
    torch.testing.assert_close(gaussian_blur_each(volume, [1.2, 0.6]), expected, atol=1e-6, rtol=0)
