"""Maps written by the evaluator land on the INPUT file's grid, and in the patient's native space when the case
carries its preprocessing record.

The evaluator runs with an identity "inferer" (anomaly map = input image), so what is written can be compared
voxel by voxel with what was read.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset

from medad.data import volume_transforms
from medad.engine import AnomalyEvaluator, to_input_grid


def _identity_inferer(images: torch.Tensor, network) -> dict[str, torch.Tensor]:
    return {"anomaly_map": images[:, :1].clone(), "restoration": images.clone()}


def _max_score(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).amax(1)


def _evaluate(items: list[dict], out: Path, pixdim=None, **kwargs) -> Path:
    loader = DataLoader(Dataset(items, volume_transforms(pixdim=pixdim, intensity=None)), batch_size=1)
    AnomalyEvaluator(torch.nn.Identity(), _identity_inferer, loader, out, _max_score, num_overlays=0, progress=False,
                     compact_maps=False, **kwargs).run()
    return out / "maps"


# voxel axis 0 runs superior, axis 1 posterior, axis 2 left: far from RAS, so the loader reorients it
SAGITTAL_LPS = np.array([[0.0, 0.0, -1.5, 30.0], [0.0, -2.0, 0.0, 40.0], [2.5, 0.0, 0.0, -25.0], [0, 0, 0, 1]])


def _volume(shape=(14, 11, 9), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32) + 0.1


def test_map_is_written_on_the_input_grid_of_a_non_ras_file(tmp_path: Path):
    data = _volume()
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(data, SAGITTAL_LPS), path)
    maps = _evaluate([{"image": str(path), "mask": None, "brain_mask": None, "case_id": "case", "label": 0}],
                     tmp_path / "out")
    written = nib.load(maps / "case_anomaly_map.nii.gz")
    assert written.shape == data.shape
    np.testing.assert_allclose(written.affine, SAGITTAL_LPS, atol=1e-5)
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), data)  # a pure reindexing, no interpolation


def test_resampled_map_is_resampled_back_onto_the_input_grid(tmp_path: Path):
    # a smooth volume, resampled by the loader to 3 mm and the map brought back to the file's 2 mm grid
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in (20, 18, 16)], indexing="ij"))
    data = (grid[0] + 2 * grid[1] + 3 * grid[2]).astype(np.float32)
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    path = tmp_path / "smooth.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    maps = _evaluate([{"image": str(path), "mask": None, "brain_mask": None, "case_id": "smooth", "label": 0}],
                     tmp_path / "out", pixdim=(3.0, 3.0, 3.0))
    written = nib.load(maps / "smooth_anomaly_map.nii.gz")
    assert written.shape == data.shape and np.allclose(written.affine, affine)
    inner = (slice(3, -3),) * 3  # away from the border the loaded grid does not cover
    assert np.abs(written.get_fdata()[inner] - data[inner]).max() < 0.05


def test_to_input_grid_inverts_a_flip_and_a_permutation_exactly():
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    input_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    # loaded = input with axes (2, 0, 1) and axis 0 flipped: loaded[a, b, c] = input[b, c, 3 - a]
    loaded = np.flip(np.transpose(volume, (2, 0, 1)), 0)
    loaded_affine = np.zeros((4, 4))
    loaded_affine[2, 0], loaded_affine[2, 3] = -1.0, 3.0
    loaded_affine[0, 1] = loaded_affine[1, 2] = loaded_affine[3, 3] = 1.0
    np.testing.assert_array_equal(to_input_grid(loaded, loaded_affine, input_affine, volume.shape), volume)


def _ball(shape, centre, radius) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (np.linalg.norm(index - np.asarray(centre), axis=-1) <= radius).astype(np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("backend", ["ants", "elastix"])
def test_template_space_map_returns_to_the_native_image(tmp_path: Path, backend: str):
    # The same registration as each backend stores it: ANTsPy writes its transform; the elastix backend converts
    # elastix's EulerTransform parameters to the same ITK affine file, applied with SimpleITK (no itk needed here).
    from medad.transforms.mri import apply_forward_transform

    # native patient image (non-RAS) holding one lesion
    native_shape = (30, 26, 22)
    native_affine = np.array([[-2.0, 0, 0, 28], [0, 0, 2.0, -20], [0, -2.0, 0, 24], [0, 0, 0, 1]])
    lesion = _ball(native_shape, (17, 11, 9), 4.0)
    native_path = tmp_path / "native" / "sub-01.nii.gz"
    native_path.parent.mkdir()
    nib.save(nib.Nifti1Image(lesion, native_affine), native_path)

    # the "registration" saved at preprocessing: a rotation + shift, and a template grid of its own
    case_dir = tmp_path / "transforms" / "sub-01"
    case_dir.mkdir(parents=True)
    angle = np.deg2rad(12)
    if backend == "ants":
        ants = pytest.importorskip("ants")
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        transform = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                               matrix=rotation, translation=(3.0, -2.0, 1.5))
        ants.write_transform(transform, str(case_dir / "0GenericAffine.mat"))
    else:
        pytest.importorskip("SimpleITK")
        from medad.transforms.elastix import _to_sitk_affine, write_affine

        euler = {"Transform": ["EulerTransform"], "TransformParameters": ["0", "0", str(angle), "3.0", "-2.0", "1.5"],
                 "CenterOfRotationPoint": ["0", "0", "0"]}
        write_affine(_to_sitk_affine(euler), case_dir / "0GenericAffine.mat")
    template_affine = np.diag([2.2, 2.2, 2.2, 1.0])
    template_affine[:3, 3] = (-34, -34, -30)
    record = {
        "template_affine": template_affine.tolist(), "template_spatial_shape": [32, 32, 28],
        "native_affine": native_affine.tolist(), "native_spatial_shape": list(native_shape),
        "template_transforms": ["0GenericAffine.mat"], "inverse_transforms": ["0GenericAffine.mat"],
        "inverse_whichtoinvert": [True], "backend": backend,
    }
    (case_dir / "registration.json").write_text(json.dumps(record))

    # the preprocessed (template-space) image the model sees
    template_image = apply_forward_transform(native_path, case_dir / "registration.json")
    assert float(template_image.sum()) > 0.5 * lesion.sum()  # the lesion is inside the template grid
    template_path = tmp_path / "template" / "sub-01.nii.gz"
    template_path.parent.mkdir()
    nib.save(nib.Nifti1Image(template_image[0].numpy(), template_image.affine.numpy()), template_path)

    item = {"image": str(template_path), "mask": None, "brain_mask": None, "case_id": "sub-01", "label": 0,
            "native_image": str(native_path)}
    maps = _evaluate([item], tmp_path / "out", registration_dir=tmp_path / "transforms")
    native_map = nib.load(maps / "sub-01_native_anomaly_map.nii.gz")
    assert native_map.shape == native_shape and np.allclose(native_map.affine, native_affine)
    assert _dice(native_map.get_fdata() >= 0.5, lesion > 0) >= 0.8
    template_map = nib.load(maps / "sub-01_anomaly_map.nii.gz")  # the template-space map stays on its own grid
    assert template_map.shape == template_image.shape[1:]
