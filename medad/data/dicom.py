"""DICOM series input (SimpleITK), de-identified: only voxels and geometry are read, never patient data.

A folder holding one DICOM series becomes a NIfTI-like volume ``(X, Y, Z)`` with a RAS affine, the convention of
every other medad volume. No DICOM tag is copied anywhere: the series is read with SimpleITK's
``ImageSeriesReader`` without its per-slice metadata dictionaries and without private tags, the NIfTI header that
:func:`medad.io.dicom.dicom_to_nifti` writes has empty description fields, and errors name the folder, never a tag
value. (The folder's own name is the user's choice and is kept as the case name; do not name folders after patients.)
The DICOM Segmentation / Parametric Map written for such a case read the folder again, for their references, in
:mod:`medad.io.dicom_outputs`; nothing read here travels through the pipeline.

Use it as a loader input (``LoadInputd`` reads a folder with :class:`DicomSeriesReader`) or convert once
(:func:`medad.io.dicom.dicom_to_nifti`)::

    python -m medad.io.dicom /data/dicom/case001 /data/nifti/case001.nii.gz

:func:`sitk_ras_affine` (SimpleITK geometry to a RAS affine) lives here, in a module that imports nothing else of
medad, so the other SimpleITK readers (:mod:`medad.data.readers`) and the elastix backend
(:mod:`medad.transforms.elastix`) import it without an import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader

__all__ = ["read_dicom_series", "DicomSeriesReader", "find_dicom_series", "is_dicom_file", "sitk_ras_affine"]

PathLike = str | os.PathLike
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Files that are certainly not DICOM (skipped without being opened when looking for series folders).
_NOT_DICOM = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".json", ".csv",
              ".txt", ".md", ".npz", ".pt")


def is_dicom_file(path: PathLike) -> bool:
    """Whether ``path`` is a DICOM Part-10 file: ``DICM`` after the 128-byte preamble (no tag is read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def find_dicom_series(folder: PathLike, probe: int = 5) -> list[Path]:
    """Folders under ``folder`` (itself included, at any depth) that directly hold DICOM files, sorted.

    Each is one case (one series per folder, see :func:`read_dicom_series`). A folder counts when one of its
    first ``probe`` files (by name, skipping NIfTI / image / table files) is a DICOM Part-10 file, so a folder of
    thousands of NIfTI volumes costs a listing only.
    """
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        candidates = [name for name in sorted(files) if not name.lower().endswith(_NOT_DICOM)][:probe]
        if any(is_dicom_file(os.path.join(root, name)) for name in candidates):
            found.append(Path(root))
    return sorted(found)


def _series_files(folder: Path, series_id: str | None) -> list[str]:
    import SimpleITK as sitk

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: DICOM folder not found.")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ValueError(f"{folder}: no DICOM series found in this folder.")
    if series_id is None:
        if len(ids) > 1:
            raise ValueError(f"{folder}: holds {len(ids)} DICOM series; put each series in its own folder.")
        series_id = ids[0]
    elif series_id not in ids:
        raise ValueError(f"{folder}: the requested series is not in this folder.")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id))


def read_dicom_series(folder: PathLike, series_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series as ``(volume (X, Y, Z) float32, 4x4 RAS affine)``; no tag value is kept.

    Args:
        folder: folder of the series' files (one series; pass ``series_id`` when it holds several).
        series_id: SeriesInstanceUID to read.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    files = _series_files(folder, series_id)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOff()  # no per-slice tag dictionaries (patient data) in memory
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(f"{folder}: not a readable DICOM series ({reason}).") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{folder}: colour DICOM series are not supported; expected one grey value per voxel.")
    if image.GetDimension() != 3:
        raise ValueError(f"{folder}: expected a 3D series, got {image.GetDimension()}D.")
    # SimpleITK arrays are [z, y, x]; medad volumes are [x, y, z] with an affine to RAS (ITK works in LPS).
    volume = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0), dtype=np.float32)
    return volume, sitk_ras_affine(image)


def sitk_ras_affine(image: Any) -> np.ndarray:
    """The 4x4 RAS affine of a 2D or 3D SimpleITK image (whose direction, spacing and origin are LPS), for its
    array transposed to ``(X, Y[, Z])``."""
    dim = image.GetDimension()
    lps = np.eye(4)
    lps[:dim, :dim] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim) @ np.diag(image.GetSpacing())
    lps[:dim, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ lps


class DicomSeriesReader(ImageReader):
    """MONAI ``ImageReader`` for a folder holding one DICOM series (see :func:`read_dicom_series`).

    The meta data carry the geometry only: ``affine`` / ``original_affine`` (RAS), ``spatial_shape`` and
    ``filename_or_obj`` (the folder).
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and Path(names[0]).is_dir()

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> tuple[str, np.ndarray, np.ndarray]:
        name = data if isinstance(data, (str, os.PathLike)) else data[0]
        volume, affine = read_dicom_series(name)
        return str(name), volume, affine

    def get_data(self, img: tuple[str, np.ndarray, np.ndarray]) -> tuple[np.ndarray, dict]:
        name, volume, affine = img
        meta = {
            "affine": affine.copy(),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(volume.shape),
            "original_channel_dim": "no_channel",  # EnsureChannelFirst adds the channel axis
            "filename_or_obj": name,
        }
        return volume, meta

