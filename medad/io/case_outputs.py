"""All per-case result files in one call, with the file names the rest of medad uses.

3D (NIfTI input)                          2D (industrial image)
  <case>_anomaly_map.nii.gz  float32        <case>_anomaly_map.nrrd  float32 gzip, single slice, Slicer/ITK geometry
  <case>_seg.nii.gz          uint8 labels   <case>.seg.nrrd          single-slice Slicer segmentation
  <case>.seg.nrrd            Slicer segmentation
The segmentation files are written only when a pixel threshold is given. With ``compact=True`` a map keeps float16
precision (:func:`compact_float`) in its float32 file: every viewer still reads it, and gzip halves its size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medad.io.atomic import atomic_save
from medad.io.nifti import Reference, reference_grid, write_label_nifti, write_nifti_like
from medad.io.slicer import write_seg_nrrd, write_seg_nrrd_2d

__all__ = ["ANOMALY_SEGMENT", "compact_float", "write_volume_case", "write_image_case"]

PathLike = str | os.PathLike

#: The single segment of a thresholded anomaly map.
ANOMALY_SEGMENT: Mapping[str, Any] = {"label_value": 1, "name": "anomaly", "color": (1.0, 0.2, 0.2)}


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def compact_float(array: np.ndarray, mantissa_bits: int = 10) -> np.ndarray:
    """float32 rounded to ``mantissa_bits`` mantissa bits (10: float16 precision, relative error <= 2**-11).

    The exponent keeps the float32 range (a float16 cast would flush small KL values to 0 and overflow above 65504);
    the zeroed low bits compress well. NaN / infinity stay as they are.
    """
    values = np.ascontiguousarray(array, dtype=np.float32)
    drop = 23 - int(mantissa_bits)
    if drop <= 0:
        return values
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(1 << (drop - 1))) & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)).view(np.float32)
    return np.where(np.isfinite(values), rounded, values).astype(np.float32)


def _binary(anomaly_map: np.ndarray, threshold: float, label_value: int) -> np.ndarray:
    return np.where(np.isfinite(anomaly_map) & (anomaly_map >= threshold), label_value, 0).astype(np.uint8)


def write_volume_case(
    case_id: str,
    anomaly_map: Any,
    reference: Reference,
    out_dir: PathLike,
    threshold: float | None = None,
    segment: Mapping[str, Any] = ANOMALY_SEGMENT,
    compact: bool = False,
) -> dict[str, Path]:
    """Write a 3D case's anomaly map, and its thresholded segmentation, on the input image's grid.

    Args:
        case_id: used in the file names.
        anomaly_map: ``(X, Y, Z)`` in the input file's voxel order (see :mod:`medad.io.nifti`).
        reference: the input image (file name, nibabel image, or ``(affine, shape)``).
        out_dir: output folder.
        threshold: pixel threshold; voxels with ``map >= threshold`` form the segment.
        segment: ``label_value`` / ``name`` / ``color`` of the segment.
        compact: store the map with float16 precision (:func:`compact_float`); the segmentation uses the exact map.

    Returns:
        ``{"anomaly_map": path}`` plus ``"seg_nifti"`` and ``"seg_nrrd"`` when a threshold is given.
    """
    out_dir = Path(out_dir)
    map_np = _to_numpy(anomaly_map).astype(np.float32)
    stored = compact_float(map_np) if compact else map_np
    paths = {"anomaly_map": write_nifti_like(stored, reference, out_dir / f"{case_id}_anomaly_map.nii.gz")}
    if threshold is not None:
        labels = _binary(map_np, float(threshold), int(segment["label_value"]))
        affine, shape, _ = reference_grid(reference)
        paths["seg_nifti"] = write_label_nifti(labels, (affine, shape), out_dir / f"{case_id}_seg.nii.gz")
        paths["seg_nrrd"] = write_seg_nrrd(labels.reshape(shape[:3]), affine, out_dir / f"{case_id}.seg.nrrd",
                                           [segment])
    return paths


def write_image_case(
    case_id: str,
    anomaly_map: Any,
    out_dir: PathLike,
    threshold: float | None = None,
    segment: Mapping[str, Any] = ANOMALY_SEGMENT,
    compact: bool = False,
) -> dict[str, Path]:
    """Write a 2D case's anomaly map ``(H, W)`` and its thresholded segmentation as Slicer-loadable NRRD files.

    Both use the geometry ITK/Slicer give the source PNG (see :func:`medad.io.slicer.write_seg_nrrd_2d`), so they
    overlay the image loaded from its file. ``compact``: float16 precision in the float32 file (:func:`compact_float`).

    Returns:
        ``{"anomaly_map": path}`` plus ``"seg_nrrd"`` when a threshold is given.
    """
    import nrrd

    out_dir = Path(out_dir)
    map_np = _to_numpy(anomaly_map).astype(np.float32)
    if map_np.ndim != 2:
        raise ValueError(f"Case {case_id}: a 2D anomaly map must be (H, W), got shape {map_np.shape}.")
    header = {
        "space": "left-posterior-superior",
        "space directions": np.eye(3),
        "space origin": np.zeros(3),
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
    }
    stored = compact_float(map_np) if compact else map_np
    voxels = np.ascontiguousarray(stored.T)[:, :, np.newaxis]  # (H, W) -> (W, H, 1): ITK index 0 = column
    paths = {"anomaly_map": atomic_save(out_dir / f"{case_id}_anomaly_map.nrrd",
                                        lambda name: nrrd.write(name, voxels, header, index_order="F"))}
    if threshold is not None:
        labels = _binary(map_np, float(threshold), int(segment["label_value"]))
        paths["seg_nrrd"] = write_seg_nrrd_2d(labels, out_dir / f"{case_id}.seg.nrrd", [segment])
    return paths
