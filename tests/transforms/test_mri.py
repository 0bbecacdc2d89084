"""MRI preprocessing transforms (medad.transforms.mri): geometry conversions RAS <-> LPS, reorientation, intensity
normalisation, N4, skull-stripping backends, anti-aliasing and brain geometry.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ants = pytest.importorskip("ants")
sitk = pytest.importorskip("SimpleITK")

from medad.transforms.mri import (  # noqa: E402
    N4BiasCorrectiond,
    NormalizeIntensityInBraind,
    ReorientToCanonicald,
    SkullStripd,
    anti_aliasing_sigma,
    ants_to_metatensor,
    brain_geometry,
    load_volume,
    metatensor_to_ants,
    metatensor_to_sitk,
)
from tests.helpers import IXI_CASE  # noqa: E402

# IXI files are stored sagittal-first (axis codes P, S, R), like this affine.
PSR_AFFINE = np.array([[0.0, 0.0, 2.0, -88.2], [-2.0, 0.0, 0.0, 118.2], [0.0, 2.0, 0.0, -135.3], [0, 0, 0, 1]])


def _write(path: Path, array: np.ndarray, affine: np.ndarray = PSR_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# Geometry conversions: RAS (nibabel/MONAI) <-> LPS (ITK/ANTs)
# ------------------------------------------------------------------------------------------
def test_ants_conversion_matches_ants_reader(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.random((6, 7, 8)).astype(np.float32)
    path = _write(tmp_path / "psr.nii.gz", array)
    mine = metatensor_to_ants(load_volume(path))
    reference = ants.image_read(str(path))
    np.testing.assert_allclose(mine.numpy(), reference.numpy())
    np.testing.assert_allclose(mine.origin, reference.origin, atol=1e-4)
    np.testing.assert_allclose(mine.spacing, reference.spacing, atol=1e-6)
    np.testing.assert_allclose(mine.direction, reference.direction, atol=1e-6)
    back = ants_to_metatensor(reference)
    np.testing.assert_allclose(back.affine.numpy(), PSR_AFFINE, atol=1e-4)
    np.testing.assert_allclose(back[0].numpy(), array)


def test_sitk_conversion_matches_sitk_reader(tmp_path):
    array = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    path = _write(tmp_path / "psr.nii.gz", array)
    mine = metatensor_to_sitk(load_volume(path))
    reference = sitk.ReadImage(str(path))
    np.testing.assert_allclose(sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(mine.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mine.GetDirection(), reference.GetDirection(), atol=1e-6)
    # voxel (i, j, k) of the nibabel array is at the ITK physical point of index (i, j, k), in LPS.
    ras = PSR_AFFINE @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(mine.TransformIndexToPhysicalPoint((1, 2, 3)), ras[:3] * [-1, -1, 1], atol=1e-4)


def test_reorient_to_canonical_keeps_world_positions(tmp_path):
    array = np.zeros((6, 7, 8), np.float32)
    array[1, 2, 3] = 5.0
    array[4, 0, 6] = 1.0
    volume = load_volume(_write(tmp_path / "psr.nii.gz", array))
    d = ReorientToCanonicald()({"image": volume})
    out = d["image"]
    assert nib.aff2axcodes(out.affine.numpy()) == ("R", "A", "S")
    assert tuple(out.shape) == (1, 8, 6, 7)
    np.testing.assert_allclose(d["native_affine"], PSR_AFFINE)
    assert d["native_spatial_shape"] == (6, 7, 8)
    for value, voxel in ((5.0, (1, 2, 3)), (1.0, (4, 0, 6))):
        where = np.argwhere(out[0].numpy() == value)[0]
        np.testing.assert_allclose(out.affine.numpy() @ [*where, 1], PSR_AFFINE @ [*voxel, 1], atol=1e-6)


def test_load_volume_names_file_and_problem(tmp_path):
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"not a nifti at all" * 100)
    with pytest.raises(ValueError, match=r"broken\.nii\.gz: not a readable NIfTI"):
        load_volume(corrupt)
    four_d = _write(tmp_path / "series.nii.gz", np.ones((4, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"series\.nii\.gz: expected a 3D volume .*\(4, 4, 4, 3\)"):
        load_volume(four_d)
    assert load_volume(_write(tmp_path / "single.nii.gz", np.arange(64.0).reshape(4, 4, 4, 1))).shape == (1, 4, 4, 4)


# Intensity transforms against closed forms
# ------------------------------------------------------------------------------------------
def test_normalize_minmax_closed_form():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4) * 2.0 + 10.0
    mask = torch.zeros_like(image)
    mask[0, 1] = 1  # voxels 12..23 -> intensities 34..56
    out = NormalizeIntensityInBraind(lower=0.0, upper=100.0)({"image": image, "brain_mask": mask})["image"]
    np.testing.assert_allclose(out[0, 1].numpy(), (image[0, 1].numpy() - 34.0) / 22.0, atol=1e-6)
    assert float(out[0, 0].abs().max()) == 0.0
    # Percentiles: values 34..56 step 2; the 10th/90th (linear) are 36.2 and 53.8.
    out = NormalizeIntensityInBraind(lower=10.0, upper=90.0)({"image": image, "brain_mask": mask})["image"]
    expected = (np.clip(image[0, 1].numpy(), 36.2, 53.8) - 36.2) / (53.8 - 36.2)
    np.testing.assert_allclose(out[0, 1].numpy(), expected, atol=1e-5)


def test_normalize_zscore_inside_brain():
    image = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 5 + 20
    mask = (torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    out = NormalizeIntensityInBraind(lower=0.0, upper=100.0, mode="zscore")({"image": image, "brain_mask": mask})
    inside = out["image"][mask > 0].double()
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std()) - 1.0) < 1e-5
    assert float(out["image"][mask == 0].abs().max()) == 0.0


def test_n4_removes_a_smooth_multiplicative_bias():
    size = 48
    grid = np.stack(np.meshgrid(*[np.arange(size) - size / 2] * 3, indexing="ij"))
    ball = (grid**2).sum(0) < (0.4 * size) ** 2
    rng = np.random.default_rng(0)
    clean = np.where(ball, 100.0 + rng.normal(0, 1, ball.shape), 0.0).astype(np.float32)
    bias = np.exp(0.3 * grid[0] / size + 0.2 * grid[2] / size).astype(np.float32)  # +-15% and +-10%
    volume = torch.from_numpy(clean * bias)[None]
    from monai.data import MetaTensor

    volume = MetaTensor(volume, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)))
    corrected = N4BiasCorrectiond(shrink_factor=2)({"image": volume})["image"][0].numpy()

    def cv(x):
        return float(x[ball].std() / x[ball].mean())

    assert cv(clean * bias) > 0.05
    assert cv(corrected) < 0.5 * cv(clean * bias)
    assert float(np.abs(corrected[~ball]).max()) == 0.0  # background stays exactly at the minimum


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backend"):
        SkullStripd(backend="fsl")
    with pytest.raises(ValueError, match="normalisation"):
        NormalizeIntensityInBraind(mode="histogram")


def test_anti_aliasing_sigma_follows_skimage():
    assert anti_aliasing_sigma((1.0, 1.0, 2.0), (2.0, 1.0, 1.0)) == [0.5, 0.0, 0.0]


def test_brain_geometry_of_a_box():
    mask = np.zeros((20, 20, 20))
    mask[5:15, 5:10, 2:18] = 1
    geometry = brain_geometry(mask, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert geometry["volume_ml"] == pytest.approx(10 * 5 * 16 * 8 / 1000)
    assert geometry["extent_mm"] == pytest.approx([20.0, 10.0, 32.0])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEDAD_RUN_SLOW"), reason="brainextractor takes ~30-60 s; set MEDAD_RUN_SLOW=1")
def test_brainextractor_backend(ixi_dir):
    pytest.importorskip("brainextractor")
    d = ReorientToCanonicald()({"image": load_volume(ixi_dir / f"{IXI_CASE}.nii.gz")})
    out = SkullStripd(backend="brainextractor")(d)
    mask = out["brain_mask"][0].numpy() > 0
    volume_ml = mask.sum() * 8 / 1000  # 2 mm voxels
    assert 900 < volume_ml < 2000
    assert float(out["image"][0][~torch.from_numpy(mask)].abs().max()) == 0.0
