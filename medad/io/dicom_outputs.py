"""DICOM Segmentation and Parametric Map of a case whose input is a DICOM series (highdicom).

For a case read from a folder holding one DICOM series (:class:`medad.data.dicom.DicomSeriesReader`), two DICOM
objects are written beside its NIfTI / NRRD files, on the source series' grid, one frame per source slice::

    <case>_seg.dcm           Segmentation, BINARY, one segment "anomaly": the voxels of <case>_seg.nii.gz
    <case>_anomaly_map.dcm   Parametric Map, 32-bit float: the values of <case>_anomaly_map.nii.gz

Each frame carries its source slice's ImagePositionPatient / ImageOrientationPatient and references it
(DerivationImageSequence / SourceImageSequence); both objects share the source's Frame of Reference UID and Study
Instance UID, list the source series in ReferencedSeriesSequence, and get new Series and SOP Instance UIDs.

Patient data. The pipeline carries no tag: the source files are read here, with pydicom, from the case's input
folder, and highdicom is handed a copy of each source dataset that holds only an allow-list (UIDs, geometry, pixel
description, :data:`PATIENT_STUDY_ATTRIBUTES`). highdicom copies the Patient and Study modules of its source, so
this allow-list is what decides what the outputs carry:

* ``deidentify=False``: :data:`PATIENT_STUDY_ATTRIBUTES` (Patient module: name, ID, birth date, sex; General
  Study module: date, time, accession number, referring physician, study ID) keep the source's values. They are
  Type 2 attributes of both IODs, and an archive files a derived object into the patient's study, and checks it
  against the study it already holds, by them.
* ``deidentify=True``: the same attributes are present (Type 2) but empty, ``PatientIdentityRemoved`` is ``YES``
  and ``DeidentificationMethod`` says what was done.

In both modes the source's UIDs (Study, Series, SOP Instance, Frame of Reference) are kept, because referencing
the source is the point of these objects; everything else of the source (other patient IDs, age, size, weight,
address, comments, the study description, physicians, institution, operators, clinical-trial attributes, private
tags) is never copied. No tag value is logged: errors and warnings name the folder, and text from pydicom or
highdicom is logged only with the source's patient / study values cut out.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from medad.io.atomic import atomic_save
from medad.io.slicer import RAS_TO_LPS

__all__ = [
    "DICOM_EXTRA_MISSING",
    "PATIENT_STUDY_ATTRIBUTES",
    "highdicom_available",
    "read_source_series",
    "write_dicom_case",
]

PathLike = str | os.PathLike
logger = logging.getLogger("medad.io.dicom_outputs")

#: The one line logged (once per process) when highdicom is missing.
DICOM_EXTRA_MISSING = "install medad[dicom] for DICOM SEG/Parametric Map outputs"

#: Patient / General Study attributes of every output (Type 2: present, possibly empty): the source's values, or
#: empty with ``deidentify=True``.
PATIENT_STUDY_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
)

# What highdicom reads from a source image besides the attributes above: UIDs, geometry, pixel description.
_SOURCE_ATTRIBUTES = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "Modality", "Laterality", "InstanceNumber",
    "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)
_DEIDENTIFICATION_METHOD = "medad: patient/study attributes emptied, source UIDs kept"  # LO: <= 64 characters
_SERIES_NUMBERS = {"seg": 9001, "map": 9002}  # fixed, high: after the scanner's series in a viewer's list
# Geometry tolerances: positions are decimal strings of at most 16 characters in DICOM.
_VOXEL_TOLERANCE = 1e-2
_DIRECTION_TOLERANCE = 1e-3

_warned_missing = False


def highdicom_available(log: bool = True) -> bool:
    """Whether highdicom (``pip install medad[dicom]``) is importable; logs :data:`DICOM_EXTRA_MISSING` once if not."""
    global _warned_missing
    try:
        import highdicom  # noqa: F401
    except ImportError:
        if log and not _warned_missing:
            logger.warning(DICOM_EXTRA_MISSING)
            _warned_missing = True
        return False
    return True


def _values(datasets: Sequence[Any]) -> list[str]:
    """The source's patient / study texts (and their DICOM name parts), to cut out of any logged text."""
    found: set[str] = set()
    for dataset in datasets:
        for keyword in PATIENT_STUDY_ATTRIBUTES:
            text = str(dataset.get(keyword, "") or "").strip()
            if len(text) >= 2:
                found.add(text)
                found.update(part for part in re.split(r"[\^=]", text) if len(part.strip()) >= 2)
    return sorted(found, key=len, reverse=True)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "<removed>")
    return text


@contextmanager
def _quiet(secrets: Callable[[], Sequence[str]]) -> Iterator[None]:
    """Keep pydicom / highdicom warnings (which may quote a value) out of the output; log them scrubbed at DEBUG."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for item in caught:
                logger.debug("DICOM outputs: %s", _scrub(str(item.message), secrets()))


def read_source_series(folder: PathLike, affine: np.ndarray, shape: Sequence[int]) -> list[Any]:
    """The source datasets (no pixel data) of the series in ``folder``, ordered by slice index ``k`` of the grid.

    Args:
        folder: the case's input folder (one DICOM series; see :mod:`medad.data.dicom`).
        affine: 4x4 RAS affine of the grid the maps are written on (the series' own, from
            :func:`medad.data.dicom.read_dicom_series`).
        shape: ``(X, Y, Z)`` of that grid: X = columns, Y = rows, Z = slices.

    Raises:
        ValueError: naming the folder, when a file's geometry is not slice ``k`` of that grid (a multi-frame file, a
            tilted or unevenly spaced series, ...) or the files do not share one Frame of Reference UID.
    """
    import pydicom

    from medad.data.dicom import _series_files

    folder = Path(folder)
    datasets = [pydicom.dcmread(name, stop_before_pixels=True) for name in _series_files(folder, None)]
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    inverse = np.linalg.inv(lps)
    unit = lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0)
    columns, rows, depth = (int(s) for s in shape[:3])
    ordered: list[Any] = [None] * depth
    for dataset in datasets:
        if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"{folder}: multi-frame DICOM files are not supported for DICOM outputs.")
        if "ImagePositionPatient" not in dataset or "ImageOrientationPatient" not in dataset:
            raise ValueError(f"{folder}: a file of the series has no image position or orientation.")
        if (int(dataset.Rows), int(dataset.Columns)) != (rows, columns):
            raise ValueError(f"{folder}: a file's size differs from the series' grid.")
        orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
        if (np.abs(orientation[:3] - unit[:, 0]).max() > _DIRECTION_TOLERANCE
                or np.abs(orientation[3:] - unit[:, 1]).max() > _DIRECTION_TOLERANCE):
            raise ValueError(f"{folder}: a file's orientation differs from the series' grid.")
        index = inverse @ np.append(np.asarray(dataset.ImagePositionPatient, dtype=np.float64), 1.0)
        k = int(round(index[2]))
        if np.abs(index[:2]).max() > _VOXEL_TOLERANCE or abs(index[2] - k) > _VOXEL_TOLERANCE or not 0 <= k < depth:
            raise ValueError(f"{folder}: a file's position is not a slice of the series' grid (tilted or unevenly "
                             "spaced slices).")
        if ordered[k] is not None:
            raise ValueError(f"{folder}: two files of the series lie at the same position.")
        ordered[k] = dataset
    if any(dataset is None for dataset in ordered):
        raise ValueError(f"{folder}: the series has fewer files than slices.")
    frames_of_reference = {str(dataset.get("FrameOfReferenceUID") or "") for dataset in ordered}
    if len(frames_of_reference) != 1 or "" in frames_of_reference:
        raise ValueError(f"{folder}: the series' files do not share one Frame of Reference UID, which the DICOM "
                         "outputs need to reference it.")
    return ordered


def _source_copy(dataset: Any, deidentify: bool, slice_spacing: float) -> Any:
    """The allow-listed attributes of one source dataset (module docstring), the only ones highdicom sees.

    highdicom takes the pixel measures from it (the spacing between slices it derives from the positions); a source
    without a slice thickness gets the slice spacing, which the outputs' pixel measures need (Type 1 there).
    """
    from pydicom import Dataset

    kept = Dataset()
    for keyword in _SOURCE_ATTRIBUTES:
        if keyword in dataset:
            kept.add(copy.deepcopy(dataset[keyword]))
    for keyword in PATIENT_STUDY_ATTRIBUTES:
        value = "" if deidentify else dataset.get(keyword, "")
        setattr(kept, keyword, "" if value is None else value)
    if kept.get("SliceThickness") in (None, ""):
        kept.SliceThickness = round(float(slice_spacing), 6)  # a decimal string holds at most 16 characters
    return kept


def _finish(dataset: Any, deidentify: bool, description: str) -> None:
    """Attributes highdicom leaves to the caller: series description, de-identification flags."""
    dataset.SeriesDescription = description
    if deidentify:
        dataset.PatientIdentityRemoved = "YES"
        dataset.DeidentificationMethod = _DEIDENTIFICATION_METHOD


def _equipment(algorithm: str) -> dict[str, Any]:
    from medad import __version__

    return {"manufacturer": "medad", "manufacturer_model_name": algorithm, "software_versions": __version__,
            "device_serial_number": "0"}


def _segmentation(sources: Sequence[Any], labels: np.ndarray, algorithm: str,
                  segment: Mapping[str, Any], deidentify: bool) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medad import __version__

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=str(segment.get("name", "anomaly")),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, version=__version__, family=codes.cid7162.ArtificialIntelligence),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBERS["seg"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        omit_empty_frames=False,  # one frame per source slice, also where nothing is segmented
        content_label="ANOMALY",
        content_description="anomaly map at the calibrated pixel threshold",
        **_equipment(algorithm),
    )
    _finish(seg, deidentify, f"{algorithm} anomaly segmentation")
    return seg


def _parametric_map(sources: Sequence[Any], values: np.ndarray, algorithm: str,
                    threshold: float | None, deidentify: bool) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    explanation = f"{algorithm} anomaly map" + (f"; threshold {threshold:.6g}" if threshold is not None else "")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly", lut_explanation=explanation[:64], unit=codes.UCUM.NoUnits,
        value_range=(low, high), slope=1.0, intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=values,
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBERS["map"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        # the map of an unstripped head can show the face in a 3D rendering: do not promise otherwise
        contains_recognizable_visual_features=True,
        real_world_value_mappings=[mapping],
        # LINEAR_EXACT: a window narrower than 1 (a map in [0, 1]) is not allowed with the default LINEAR function
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(low + high) / 2,
                                                         window_width=max(high - low, 1e-6),
                                                         voi_lut_function="LINEAR_EXACT")],
        content_label="ANOMALY_MAP",
        content_description="anomaly map",
        **_equipment(algorithm),
    )
    # General Series Laterality is Type 2C; the Parametric Map has no frame laterality, so it is required for paired
    # body parts: the source's value, or empty (unknown)
    pm.Laterality = sources[0].get("Laterality", "") or ""
    _finish(pm, deidentify, f"{algorithm} anomaly map")
    return pm


def write_dicom_case(
    case_id: str,
    anomaly_map: np.ndarray,
    source_dir: PathLike,
    affine: np.ndarray,
    out_dir: PathLike,
    labels: np.ndarray | None = None,
    threshold: float | None = None,
    deidentify: bool = True,
    algorithm: str = "medad",
    segment: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<case>_anomaly_map.dcm`` (Parametric Map) and, with ``labels``, ``<case>_seg.dcm`` (Segmentation).

    Args:
        case_id: used in the file names.
        anomaly_map: ``(X, Y, Z)`` float map on the source series' grid (X = columns, Y = rows, Z = slices), the
            values of the NIfTI map; non-finite values are written as 0.
        source_dir: the case's input folder (one DICOM series), read again here for the references.
        affine: 4x4 RAS affine of that grid.
        out_dir: output folder.
        labels: ``(X, Y, Z)`` segmentation (nonzero = anomaly), or None for no Segmentation.
        threshold: the pixel threshold that made ``labels`` (recorded in the map's value-mapping explanation).
        deidentify: empty patient / study attributes (module docstring); False keeps the source's values.
        algorithm: name of the algorithm (e.g. ``"medad disyre"``), the outputs' model name and series description.
        segment: ``name`` of the segment (default ``"anomaly"``).

    Returns:
        ``{"dicom_map": path}`` plus ``"dicom_seg"`` when ``labels`` are given.

    Raises:
        ValueError: naming ``source_dir`` when its files do not form the map's grid (see :func:`read_source_series`).
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 3:
        raise ValueError(f"{source_dir}: DICOM outputs need a 3D map (X, Y, Z), got shape {values.shape}.")
    out_dir = Path(out_dir)
    secrets: list[str] = []
    with _quiet(lambda: secrets):
        sources = read_source_series(source_dir, affine, values.shape)
        secrets = _values(sources)
        try:
            slice_spacing = float(np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, 2]))
            kept = [_source_copy(dataset, deidentify, slice_spacing) for dataset in sources]
            frames = np.ascontiguousarray(np.where(np.isfinite(values), values, np.float32(0)).transpose(2, 1, 0))
            objects = {"dicom_map": (_parametric_map(kept, frames, algorithm, threshold, deidentify),
                                     out_dir / f"{case_id}_anomaly_map.dcm")}
            if labels is not None:
                mask = np.ascontiguousarray(np.asarray(labels).transpose(2, 1, 0) > 0)  # (Z, rows, cols)
                objects["dicom_seg"] = (_segmentation(kept, mask, algorithm, segment or {}, deidentify),
                                        out_dir / f"{case_id}_seg.dcm")
        except Exception as error:  # noqa: BLE001 - re-raised without the original text, which may quote a value
            reason = _scrub(f"{type(error).__name__}: {error}", secrets)
            raise ValueError(f"{source_dir}: the DICOM outputs cannot be made ({reason}).") from None
        paths = {}
        for key, (dataset, path) in objects.items():
            paths[key] = atomic_save(path, lambda name, ds=dataset: ds.save_as(name, enforce_file_format=True))
    return paths
