"""All per-case result files in one call, with the file names the rest of medad uses.

3D (NIfTI input)                          2D (industrial image)
  <case>_anomaly_map.nii.gz  float32        <case>_anomaly_map.nrrd  float32 gzip, single slice, Slicer/ITK geometry
  <case>_seg.nii.gz          uint8 labels   <case>.seg.nrrd          single-slice Slicer segmentation
  <case>.seg.nrrd            Slicer segmentation
The segmentation files are written only when a pixel threshold is given. With ``compact=True`` a map keeps float16
precision (:func:`compact_float`) in its float32 file: every viewer still reads it, and gzip halves its size.

A 3D case read from a DICOM series folder (``dicom_series``) also gets ``<case>_anomaly_map.dcm`` (Parametric Map,
the same values) and ``<case>_seg.dcm`` (Segmentation, the same voxels) on the series' grid, referencing it
(:mod:`medad.io.dicom_outputs`; needs ``pip install medad[dicom]``, otherwise one log line says so).
"""

from __future__ import annotations

import logging
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
logger = logging.getLogger("medad.io.case_outputs")

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
    dicom_series: PathLike | None = None,
    deidentify_dicom: bool = True,
    algorithm: str = "medad",
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
        dicom_series: the case's input folder when it is a DICOM series whose grid ``reference`` is: DICOM Parametric
            Map and Segmentation files are written too (:func:`medad.io.dicom_outputs.write_dicom_case`). A series
            they cannot be made for costs its DICOM files only, with a warning naming the folder.
        deidentify_dicom: empty patient / study attributes in those files (False: the source's values).
        algorithm: the algorithm's name in those files (e.g. ``"medad disyre"``).

    Returns:
        ``{"anomaly_map": path}`` plus ``"seg_nifti"`` and ``"seg_nrrd"`` when a threshold is given, and
        ``"dicom_map"`` / ``"dicom_seg"`` for a DICOM series.
    """
    out_dir = Path(out_dir)
    map_np = _to_numpy(anomaly_map).astype(np.float32)
    stored = compact_float(map_np) if compact else map_np
    paths = {"anomaly_map": write_nifti_like(stored, reference, out_dir / f"{case_id}_anomaly_map.nii.gz")}
    affine, shape, _ = reference_grid(reference)
    labels = None
    if threshold is not None:
        labels = _binary(map_np, float(threshold), int(segment["label_value"]))
        paths["seg_nifti"] = write_label_nifti(labels, (affine, shape), out_dir / f"{case_id}_seg.nii.gz")
        paths["seg_nrrd"] = write_seg_nrrd(labels.reshape(shape[:3]), affine, out_dir / f"{case_id}.seg.nrrd",
                                           [segment])
    if dicom_series is not None:
        paths.update(_write_dicom(case_id, stored.reshape(shape[:3]), labels, dicom_series, affine, out_dir,
                                  threshold, deidentify_dicom, algorithm, segment))
    return paths


def _write_dicom(case_id: str, stored: np.ndarray, labels: np.ndarray | None, series: PathLike, affine: np.ndarray,
                 out_dir: Path, threshold: float | None, deidentify: bool, algorithm: str,
                 segment: Mapping[str, Any]) -> dict[str, Path]:
    """The DICOM files of a case read from a DICOM series; none (and one log line) without highdicom."""
    from medad.io.dicom_outputs import highdicom_available, write_dicom_case

    if not highdicom_available():
        return {}
    try:
        return write_dicom_case(case_id, stored, series, affine, out_dir,
                                labels=None if labels is None else labels.reshape(stored.shape), threshold=threshold,
                                deidentify=deidentify, algorithm=algorithm, segment=segment)
    except ValueError as error:  # the NIfTI / NRRD files are written; a cohort run goes on
        logger.warning("case %s: no DICOM outputs: %s", case_id, error)
        return {}


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
