"""Volume readers behind one ``reader`` setting: ``"auto"`` (default), ``"itk"`` or ``"sitk"``.

- ``"itk"``: MONAI's :class:`monai.data.ITKReader` (NIfTI, NRRD, MetaImage, a folder holding one DICOM series, and
  every other format ITK reads), from the ``itk`` extra (``pip install "medad[itk]"``: ``itk-io`` + ``itk-core``).
- ``"sitk"``: the core dependencies only: NIfTI through nibabel (as MONAI's ``NibabelReader``), a DICOM series folder
  through :func:`medad.data.dicom.read_dicom_series`, other files (NRRD, MetaImage) through SimpleITK.
- ``"auto"``: ``"itk"`` when the ``itk`` module is importable, else ``"sitk"``.

Both give the same voxel array ``(X, Y, Z)`` (nibabel's index order), the same RAS ``affine`` (to 1e-5; ITK stores
direction cosines in float64 while NIfTI stores a float32 matrix) and spacing (``tests/data/test_readers.py``). Only
geometry leaves a reader: the meta data hold ``affine``, ``original_affine``, ``spatial_shape``, ``spacing``, ``space``,
``original_channel_dim`` and ``filename_or_obj``; no header field or DICOM tag (patient name, IDs, dates) is copied,
so none can reach an output file or a log.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, ITKReader

from medad.data.dicom import _series_files, read_dicom_series, sitk_ras_affine

__all__ = [
    "VOLUME_READERS",
    "GEOMETRY_KEYS",
    "resolve_reader",
    "volume_reader",
    "read_volume",
    "GeometryITKReader",
    "SimpleITKVolumeReader",
]

PathLike = str | os.PathLike

# the choices live in a module without heavy imports, so `medad preprocess --help` answers at once
from medad.preprocess_args import VOLUME_READERS  # noqa: E402

#: the only meta-data keys a reader returns (geometry; never a header field or a DICOM tag)
GEOMETRY_KEYS: tuple[str, ...] = ("affine", "original_affine", "spatial_shape", "spacing", "space",
                                  "original_channel_dim", "filename_or_obj")
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")


def resolve_reader(reader: str = "auto") -> str:
    """``"itk"`` or ``"sitk"`` for a ``reader`` setting; ``"itk"`` without the ``itk`` module is an error."""
    if reader not in VOLUME_READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {VOLUME_READERS}.")
    has_itk = importlib.util.find_spec("itk") is not None
    if reader == "auto":
        return "itk" if has_itk else "sitk"
    if reader == "itk" and not has_itk:
        raise ImportError("reader 'itk' needs the itk module: `pip install \"medad[itk]\"`, or use reader 'sitk'.")
    return reader


def _geometry_only(meta: dict[str, Any], name: str) -> dict[str, Any]:
    kept = {k: meta[k] for k in GEOMETRY_KEYS if k in meta}
    kept["filename_or_obj"] = name
    return kept


def _single(data: Sequence[PathLike] | PathLike) -> str:
    names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if len(names) != 1:
        raise ValueError(f"{names[0] if names else 'no file'}: one volume per reader call, got {len(names)} files.")
    return os.fspath(names[0])


class GeometryITKReader(ITKReader):
    """MONAI's ``ITKReader`` that keeps geometry only (:data:`GEOMETRY_KEYS`) and reads one volume per call.

    A folder is read as one DICOM series, from the file list the ``sitk`` reader uses (a folder holding several
    series is an error instead of ITKReader's warning and first-series choice), with ITK's ``imread`` as ITKReader
    reads a series. The image's ITK meta-data dictionary (DICOM tags of the
    first slice, NIfTI header fields) is emptied right after reading, so no tag value stays in memory with the
    image. Arrays are ``(X, Y, Z)`` in the file's dtype with a RAS affine (``ITKReader``'s defaults).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("series_meta", False)
        if kwargs["series_meta"]:
            raise ValueError("GeometryITKReader never reads DICOM tags; series_meta must be False.")
        super().__init__(**kwargs)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> tuple[str, Any]:
        import itk

        name = _single(data)
        if Path(name).is_dir():
            # The series' files as the sitk reader groups and sorts them (one series per folder, errors name the
            # folder); ITKReader's own grouping splits a series by more details and would read only its first part.
            files = _series_files(Path(name), self.series_name or None)
            image = itk.imread(files if len(files) > 1 else files[0], **{**self.kwargs, **kwargs})
        else:
            image = super().read(name, **kwargs)
        image.SetMetaDataDictionary(itk.MetaDataDictionary())  # drop every header field / DICOM tag
        return name, image

    def get_data(self, img: tuple[str, Any]) -> tuple[np.ndarray, dict]:
        name, image = img
        array, meta = super().get_data(image)
        return np.ascontiguousarray(array), _geometry_only(meta, name)


class SimpleITKVolumeReader(ImageReader):
    """Volumes with the core dependencies: NIfTI via nibabel, a DICOM series folder via SimpleITK
    (:func:`medad.data.dicom.read_dicom_series`, no tag read into memory), NRRD / MetaImage / others via SimpleITK.

    Output: ``(X, Y, Z)`` array in the file's dtype (DICOM: float32) with a RAS affine; meta :data:`GEOMETRY_KEYS`.
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> tuple[str, np.ndarray, np.ndarray]:
        name = _single(data)
        if Path(name).is_dir():
            volume, affine = read_dicom_series(name)
            return name, volume, affine
        if name.lower().endswith(_NIFTI_SUFFIXES):
            import nibabel as nib

            try:
                image = nib.load(name)
                array = np.asanyarray(image.dataobj)  # the stored dtype (scaled when the header says so)
            except Exception as error:  # nibabel raises many types for corrupt or foreign files
                raise ValueError(f"{name}: not a readable NIfTI volume ({type(error).__name__}: {error}).") from error
            return name, np.asarray(array), np.asarray(image.affine, dtype=np.float64)
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(name)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise ValueError(f"{name}: not a readable image file ({reason}).") from error
        # SimpleITK arrays are [z, y, x]; medad volumes are [x, y, z] with an affine to RAS (ITK works in LPS).
        array = sitk.GetArrayFromImage(image)
        array = np.ascontiguousarray(array.transpose(*reversed(range(image.GetDimension())),
                                                     *range(image.GetDimension(), array.ndim)))
        return name, array, sitk_ras_affine(image)

    def get_data(self, img: tuple[str, np.ndarray, np.ndarray]) -> tuple[np.ndarray, dict]:
        name, array, affine = img
        spatial = array.shape[:3]
        meta = {
            "affine": affine.copy(),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(spatial),
            "spacing": np.linalg.norm(affine[:3, :3], axis=0),
            "space": "RAS",
            "original_channel_dim": float("nan") if array.ndim == 3 else -1,  # EnsureChannelFirst adds the channel
            "filename_or_obj": name,
        }
        return array, meta


def volume_reader(reader: str = "auto") -> ImageReader:
    """The MONAI ``ImageReader`` of a ``reader`` setting (module docstring), for ``LoadImage(reader=...)``."""
    return GeometryITKReader() if resolve_reader(reader) == "itk" else SimpleITKVolumeReader()


def read_volume(path: PathLike, reader: str = "auto") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read one volume: ``(array (X, Y, Z[, C]) in the stored dtype, 4x4 RAS affine, geometry meta)``.

    Args:
        path: a NIfTI / NRRD / MetaImage file, or a folder holding one DICOM series.
        reader: ``"auto"``, ``"itk"`` or ``"sitk"`` (module docstring).
    """
    image_reader = volume_reader(reader)
    array, meta = image_reader.get_data(image_reader.read(os.fspath(path)))
    return np.asarray(array), np.asarray(meta["affine"], dtype=np.float64), meta
