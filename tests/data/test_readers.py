"""The ``reader`` setting (issue #13): MONAI's ITKReader (``reader="itk"``) and the SimpleITK/nibabel path
(``reader="sitk"``) give the same array, affine (1e-5) and spacing on NIfTI, NRRD and a DICOM series written here
with SimpleITK, and no DICOM tag reaches the meta data (skips without ``itk``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medad.data.readers import GEOMETRY_KEYS, read_volume, resolve_reader, volume_reader

sitk = pytest.importorskip("SimpleITK")
# ITK's SWIG wrappers warn about their own types on import (nothing medad can change)
pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")
HAS_ITK = importlib.util.find_spec("itk") is not None
needs_itk = pytest.mark.skipif(not HAS_ITK, reason="itk is not installed (pip install \"medad[itk]\")")
PATIENT_TAGS = {"0010|0010": "Doe^Jane", "0010|0020": "PID-4711", "0010|0030": "19700101"}
# voxel axes: 0 -> posterior, 1 -> inferior, 2 -> right (LPS world), a sagittal acquisition (a proper rotation, so
# that DICOM readers, which sort slices along row x column, keep the slice order)
SAGITTAL_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


# The reader setting
# ------------------------------------------------------------------------------------------
def test_auto_reader_is_itk_exactly_when_itk_is_importable(monkeypatch):
    assert resolve_reader("auto") == ("itk" if HAS_ITK else "sitk")
    assert resolve_reader("sitk") == "sitk"
    import medad.data.readers as readers

    monkeypatch.setattr(readers.importlib.util, "find_spec", lambda name, *a: None)
    assert resolve_reader("auto") == "sitk"
    with pytest.raises(ImportError, match=r"medad\[itk\]"):
        resolve_reader("itk")
    with pytest.raises(ValueError, match="unknown reader"):
        resolve_reader("pydicom")


def _write_dicom_series(folder: Path, volume: np.ndarray, spacing, origin, direction) -> None:
    """One DICOM file per slice along voxel axis 2, with patient tags that must never be read back."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    common = {**PATIENT_TAGS, "0008|0060": "MR", "0008|0021": "20260101", "0020|000d": "1.2.826.0.1.3680043.2.1143.1",
              "0020|000e": "1.2.826.0.1.3680043.2.1143.1.2",
              "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3]))}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in common.items():
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        piece.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    """A NIfTI file (sagittal-first affine), an NRRD file and a DICOM series folder of the same kind of data."""
    root = tmp_path_factory.mktemp("readers")
    rng = np.random.default_rng(0)
    nifti_affine = np.array([[0.0, 0.0, 1.2, -88.2], [-0.9, 0.0, 0.0, 118.2], [0.0, 1.1, 0.0, -135.3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.random((9, 8, 7)).astype(np.float32), nifti_affine), root / "head.nii.gz")
    nrrd = sitk.GetImageFromArray(rng.random((6, 8, 9)).astype(np.float32))  # [z, y, x]
    nrrd.SetSpacing((0.8, 1.25, 3.0))
    nrrd.SetOrigin((12.5, -40.0, 7.25))
    nrrd.SetDirection(SAGITTAL_DIRECTION)
    sitk.WriteImage(nrrd, str(root / "head.nrrd"))
    series = rng.integers(0, 1200, (10, 12, 6)).astype(np.int16)
    _write_dicom_series(root / "dicom_series", series, (0.9, 0.8, 2.5), (-30.0, 25.5, 60.0), SAGITTAL_DIRECTION)
    np.save(root / "series.npy", series)
    return {"nifti": root / "head.nii.gz", "nrrd": root / "head.nrrd", "dicom": root / "dicom_series",
            "series": root / "series.npy"}


@needs_itk
@pytest.mark.parametrize("kind", ["nifti", "nrrd", "dicom"])
def test_itk_and_sitk_readers_agree(volumes, kind):
    array_itk, affine_itk, meta_itk = read_volume(volumes[kind], "itk")
    array_sitk, affine_sitk, meta_sitk = read_volume(volumes[kind], "sitk")
    assert array_itk.shape == array_sitk.shape and array_itk.ndim == 3
    np.testing.assert_array_equal(array_itk.astype(np.float32), array_sitk.astype(np.float32))
    np.testing.assert_allclose(affine_itk, affine_sitk, atol=1e-5)
    np.testing.assert_allclose(np.asarray(meta_itk["spacing"], float), np.asarray(meta_sitk["spacing"], float),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(affine_itk[:3, :3], axis=0), meta_itk["spacing"], atol=1e-5)
    if kind == "nifti":  # both agree with the file as nibabel reads it
        np.testing.assert_allclose(affine_itk, nib.load(volumes[kind]).affine, atol=1e-5)
    if kind == "dicom":  # the series and its geometry as written above (RAS)
        np.testing.assert_array_equal(array_itk, np.load(volumes["series"]))
        np.testing.assert_allclose(meta_itk["spacing"], (0.9, 0.8, 2.5), atol=1e-5)
        np.testing.assert_allclose(affine_itk[:3, 3], (30.0, -25.5, 60.0), atol=1e-4)


@pytest.mark.parametrize("reader", ["itk", "sitk"])
def test_no_patient_tag_leaves_a_reader(volumes, reader):
    if reader == "itk" and not HAS_ITK:
        pytest.skip("itk is not installed")
    from medad.data import volume_transforms

    _, _, meta = read_volume(volumes["dicom"], reader)
    assert set(meta) <= set(GEOMETRY_KEYS)
    # through the bundles' loader, as a DICOM folder case is read for training / inference
    loaded = volume_transforms(intensity=None, reader=reader)({"image": str(volumes["dicom"]), "mask": None,
                                                               "brain_mask": None})
    text = repr(dict(loaded["image"].meta)) + repr(meta)
    for value in PATIENT_TAGS.values():
        assert value not in text
    assert not any(str(key).startswith("0010|") for key in loaded["image"].meta)
    assert tuple(loaded["image"].shape) == (1, 6, 10, 12)  # reoriented to RAS: R-L, P-A, I-S


def test_volume_reader_is_a_monai_image_reader(volumes):
    from monai.transforms import LoadImage

    image = LoadImage(reader=volume_reader("sitk"), image_only=True)(str(volumes["nrrd"]))
    assert tuple(image.shape) == (9, 8, 6) and image.meta["filename_or_obj"] == str(volumes["nrrd"])
