"""NIfTI writers that put a result (anomaly map, label map) on the grid of the INPUT image.

Array convention: every array handed to these writers is in the reference file's own voxel order, i.e. the order
``nibabel.load(reference).get_fdata()`` returns (and MONAI's ``LoadImage(reader="NibabelReader")`` before any
``Orientation``/``Spacing`` transform, minus its channel axis). Index ``[i, j, k]`` is mapped to scanner RAS+
millimetres by the reference's affine. A map computed after resampling or reorienting must be brought back to the
input grid (e.g. with MONAI's ``Invertd``) before it is written here; the writer checks the shape, not the content.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medad.io.atomic import atomic_save

__all__ = ["write_nifti_like", "write_label_nifti", "reference_grid"]

PathLike = str | os.PathLike
Reference = PathLike | nib.spatialimages.SpatialImage | tuple[np.ndarray, tuple[int, ...]]


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor / MONAI MetaTensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def reference_grid(reference: Reference) -> tuple[np.ndarray, tuple[int, ...], nib.Nifti1Header | None]:
    """Return ``(affine (4, 4), spatial shape, NIfTI header or None)`` of a reference image.

    Args:
        reference: a file name, a loaded nibabel image, or a tuple ``(affine (4, 4), shape)``.
    """
    if isinstance(reference, tuple):
        affine, shape = reference
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"The reference affine must be a 4x4 matrix, got shape {affine.shape}.")
        return affine, tuple(int(s) for s in shape), None
    if isinstance(reference, (str, os.PathLike)):
        if not os.path.isfile(reference):
            raise FileNotFoundError(f"The reference image {reference} does not exist.")
        reference = nib.load(reference)
    if not isinstance(reference, nib.spatialimages.SpatialImage):
        raise TypeError(
            f"The reference must be a file name, a nibabel image or (affine, shape), got {type(reference).__name__}."
        )
    header = reference.header if isinstance(reference.header, nib.Nifti1Header) else None
    return np.asarray(reference.affine, dtype=np.float64), tuple(int(s) for s in reference.shape), header


def _strip_trailing_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    # A NIfTI of shape (X, Y, Z, 1) and an array (X, Y, Z) describe the same grid.
    shape = tuple(shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def write_nifti_like(
    array: Any,
    reference: Reference,
    path: PathLike,
    dtype: type | np.dtype = np.float32,
) -> Path:
    """Write ``array`` as a NIfTI on the grid (affine and shape) of ``reference``, atomically.

    Args:
        array: spatial array ``(X, Y, Z)`` (numpy or torch), in the reference file's voxel order.
        reference: the input image: a file name, a nibabel image, or ``(affine (4, 4), shape)``.
        path: output file (``.nii`` or ``.nii.gz``).
        dtype: stored data type (``float32`` for anomaly maps).

    Returns:
        ``path``.

    The reference's sform/qform codes and spatial units are kept, so a viewer overlays the result exactly on the
    input file. Raises ``ValueError`` if the array's shape differs from the reference's.
    """
    data = _to_numpy(array)
    affine, shape, ref_header = reference_grid(reference)
    if _strip_trailing_ones(data.shape) != _strip_trailing_ones(shape):
        raise ValueError(
            f"Cannot write {path}: the array has shape {tuple(data.shape)} but the reference image grid is {shape}; "
            "bring the result back to the input grid first."
        )
    data = data.reshape(shape).astype(dtype, copy=False)
    header = nib.Nifti1Header()
    if ref_header is not None:
        header.set_xyzt_units(*ref_header.get_xyzt_units())
    image = nib.Nifti1Image(data, affine, header=header)
    # Keep the reference's declared coordinate system (scanner, aligned, MNI, ...) rather than nibabel's defaults.
    sform_code = int(ref_header["sform_code"]) if ref_header is not None else 1
    qform_code = int(ref_header["qform_code"]) if ref_header is not None else 1
    image.set_sform(affine, code=sform_code or (0 if qform_code else 1))
    image.set_qform(affine, code=qform_code or (0 if sform_code else 1))
    image.set_data_dtype(np.dtype(dtype))
    return atomic_save(path, lambda name: nib.save(image, name))


def write_label_nifti(labelmap: Any, reference: Reference, path: PathLike) -> Path:
    """Write an integer label map (0 = background) as a uint8 NIfTI on the reference grid, atomically.

    Args:
        labelmap: ``(X, Y, Z)`` integer or boolean array (numpy or torch) with values in 0..255, in the reference
            file's voxel order.
        reference: the input image: a file name, a nibabel image, or ``(affine (4, 4), shape)``.
        path: output file, conventionally ``<case>_seg.nii.gz``.
    """
    data = _to_numpy(labelmap)
    if data.dtype != bool:
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError(f"Cannot write {path}: a label map must hold whole numbers, got dtype {data.dtype}.")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"Cannot write {path}: label values must lie in 0..255, got {data.min()}..{data.max()}.")
    return write_nifti_like(data.astype(np.uint8), reference, path, dtype=np.uint8)
