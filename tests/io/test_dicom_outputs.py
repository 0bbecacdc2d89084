"""DICOM Segmentation + Parametric Map for DICOM series inputs (highdicom): geometry, values and references read
back with pydicom / highdicom, de-identification of every output file and log, dciodvfy, and the inference workflow
of a bundle on a DICOM series made from a NIfTI with SimpleITK."""

from __future__ import annotations

import gzip
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from medad.io import write_volume_case
from medad.data.dicom import read_dicom_series

try:
    import highdicom as hd
    import pydicom
except ImportError:  # the tests of the DICOM objects skip; the NIfTI fallback and the datalist still run
    hd = pydicom = None
needs_highdicom = pytest.mark.skipif(hd is None, reason="pip install medad[dicom] (highdicom)")

REPO = Path(__file__).resolve().parents[2]
UID = "1.2.826.0.1.3680043.2.1125.77"
#: kept with deidentify_dicom=False (standard Type 2 attributes), never in a log line or a table
PATIENT = {"0010|0010": "Doe^Jane", "0010|0020": "PHI-12345", "0010|0030": "19700101"}
#: in the source, never copied into any output
NEVER = {"0008|0080": "St Example Hospital", "0010|1000": "OTHER-98765", "0010|1040": "1 Example Street",
         "0008|1030": "Tumour follow-up of Jane", "0010|4000": "VIP-comment", "0008|1070": "Operator^Olga"}


def _oblique(degrees: tuple[float, float, float]) -> np.ndarray:
    """A rotation matrix (x, then y, then z axis), so that slices are oblique to the patient axes."""
    rx, ry, rz = np.radians(degrees)
    x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x


def dicom_series_from_nifti(nifti: Path, folder: Path, degrees=(8.0, -5.0, 12.0), thickness: bool = True) -> Path:
    """Write ``nifti`` (intensities x 1000 as int16) as an oblique MR series, one file per slice, with a fake patient.

    File names run against the slice order, so the readers must sort by position. ``thickness``: write Slice
    Thickness (Type 2 in MR images: present in most series, but not in every file that reaches a PACS export).
    """
    image = sitk.Cast(sitk.ReadImage(str(nifti)) * 1000.0, sitk.sitkInt16)
    image.SetDirection(_oblique(degrees).ravel().tolist())
    direction = image.GetDirection()
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    depth = image.GetDepth()
    for k in range(depth):
        piece = image[:, :, k]
        tags = {**PATIENT, **NEVER, "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0060": "MR",
                "0020|000d": f"{UID}.1", "0020|000e": f"{UID}.2", "0020|0052": f"{UID}.3",
                "0008|0018": f"{UID}.4.{k + 1}", "0020|0013": str(k + 1), "0020|0011": "7",
                **({"0018|0050": f"{image.GetSpacing()[2]:g}"} if thickness else {}),
                "0020|0037": "\\".join(f"{v:.10f}" for v in (*direction[0:7:3], *direction[1:8:3])),
                "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))}
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{depth - k:04d}.dcm"))
        writer.Execute(piece)
    return folder


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """A 12 x 10 x 6 oblique series (0.9 x 0.8 x 2.5 mm) made from a NIfTI."""
    root = tmp_path_factory.mktemp("series")
    volume = np.random.default_rng(0).random((12, 10, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.9, 0.8, 2.5, 1.0])), root / "source.nii.gz")
    return dicom_series_from_nifti(root / "source.nii.gz", root / "case001")


def _sources(folder: Path) -> dict:
    return {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm")))}


def _sample(volume: np.ndarray, ras_affine: np.ndarray, ipp, iop, pixel_spacing, rows: int, cols: int) -> np.ndarray:
    """``volume`` at the centres of a frame's pixels, found through the NIfTI affine (they must be voxel centres)."""
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)  # along a row, down a column
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = (np.asarray(ipp, float) + c[..., None] * float(pixel_spacing[1]) * row_dir
           + r[..., None] * float(pixel_spacing[0]) * col_dir)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    index = (ras - ras_affine[:3, 3]) @ np.linalg.inv(ras_affine[:3, :3]).T
    assert np.abs(index - np.round(index)).max() < 1e-3  # the frame's pixels are voxels of the NIfTI grid
    i, j, k = np.round(index).astype(int).transpose(2, 0, 1)
    return volume[i, j, k]


def _check_object(path: Path, sources: dict, nifti: Path, exact: bool):
    """Every frame: position / orientation of its source slice, and pixels equal to the NIfTI file there."""
    ds = pydicom.dcmread(path)
    image = nib.load(nifti)
    volume = np.asarray(image.dataobj)
    first = next(iter(sources.values()))
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    seen = set()
    for frame, group in zip(pixels, ds.PerFrameFunctionalGroupsSequence):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        source = sources[uid]
        seen.add(uid)
        ipp = group.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in ipp] == [float(v) for v in source.ImagePositionPatient]
        assert [float(v) for v in iop] == [float(v) for v in source.ImageOrientationPatient]
        assert [float(v) for v in spacing] == [float(v) for v in source.PixelSpacing]
        expected = _sample(volume, image.affine, ipp, iop, spacing, ds.Rows, ds.Columns)
        if exact:
            np.testing.assert_array_equal(frame, expected)
        else:
            np.testing.assert_allclose(frame, expected, rtol=1e-6, atol=1e-7)
    assert seen == set(sources) and len(pixels) == len(sources)  # one frame per source slice
    # references: the source study / series / frame of reference and every source instance; new UIDs of its own
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(item.ReferencedSOPInstanceUID) for item in referenced.ReferencedInstanceSequence} == set(sources)
    own = {str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    assert not own & ({str(first.SeriesInstanceUID), str(first.StudyInstanceUID)} | set(sources))
    return ds


def _texts(*folders: Path) -> dict[Path, bytes]:
    """Every file's bytes (gzip files decompressed) under ``folders``."""
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found[path] = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return found


def _write(series: Path, out: Path, deidentify: bool) -> tuple[dict[str, Path], np.ndarray]:
    volume, affine = read_dicom_series(series)
    anomaly_map = np.random.default_rng(1).random(volume.shape).astype(np.float32)
    paths = write_volume_case("case001", anomaly_map, (affine, volume.shape), out, threshold=0.7, compact=True,
                              dicom_series=series, deidentify_dicom=deidentify, algorithm="medad test")
    return paths, anomaly_map


@needs_highdicom
@pytest.mark.parametrize("deidentify", [True, False])
def test_seg_and_parametric_map_match_the_nifti_outputs_on_the_source_grid(series: Path, tmp_path: Path, caplog,
                                                                           capfd, deidentify: bool):
    caplog.set_level(logging.DEBUG)  # highdicom's and pydicom's debug lines too
    out = tmp_path / "maps"
    paths, _ = _write(series, out, deidentify)
    assert {"dicom_map", "dicom_seg"} <= set(paths)
    sources = _sources(series)
    seg = _check_object(paths["dicom_seg"], sources, paths["seg_nifti"], exact=True)
    pm = _check_object(paths["dicom_map"], sources, paths["anomaly_map"], exact=False)
    assert seg.SegmentationType == "BINARY" and seg.SegmentSequence[0].SegmentLabel == "anomaly"
    assert pm.FloatPixelData and pm.SeriesInstanceUID != seg.SeriesInstanceUID
    # highdicom reads them back, with the source references
    assert {uid for _, _, uid in hd.seg.segread(paths["dicom_seg"]).get_source_image_uids()} == set(sources)

    first = next(iter(sources.values()))
    for ds in (seg, pm):
        keywords = {element.keyword for element in ds}
        assert not keywords & {"InstitutionName", "OtherPatientIDs", "PatientAddress", "StudyDescription",
                               "PatientComments", "OperatorsName"}
        if deidentify:
            assert ds.PatientIdentityRemoved == "YES"
            assert all(str(ds.get(k, "")) == "" for k in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate"))
        else:  # the standard's Type 2 patient / study attributes, so that an archive files them in the study
            assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == tuple(PATIENT.values())
            assert ds.StudyDate == first.StudyDate and "PatientIdentityRemoved" not in ds
    allowed = () if deidentify else (".dcm",)
    for path, data in _texts(out).items():
        for value in (*NEVER.values(), *(() if path.suffix in allowed else PATIENT.values())):
            assert value.encode() not in data, (path.name, value)
    logs = caplog.text + "".join(capfd.readouterr())
    assert not [v for v in (*PATIENT.values(), *NEVER.values(), "Doe", "Jane") if v in logs]


@needs_highdicom
def test_dciodvfy_finds_no_error_in_either_object(series: Path, tmp_path: Path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    thin = dicom_series_from_nifti(series.parent / "source.nii.gz", tmp_path / "no_thickness", thickness=False)
    for source, deidentify in ((series, True), (series, False), (thin, True)):
        paths, _ = _write(source, tmp_path / f"{source.name}_{deidentify}", deidentify)
        for key in ("dicom_seg", "dicom_map"):
            report = subprocess.run(["dciodvfy", "-new", str(paths[key])], capture_output=True, text=True,
                                    encoding="utf-8", errors="replace", timeout=60)
            lines = (report.stdout + report.stderr).splitlines()
            assert {"dicom_seg": "Segmentation", "dicom_map": "ParametricMap"}[key] in lines  # the IOD it checked
            assert not [line for line in lines if line.startswith("Error")], (key, deidentify, lines)


@needs_highdicom
def test_a_series_that_is_not_the_maps_grid_costs_its_dicom_files_only(series: Path, tmp_path: Path, caplog):
    volume, affine = read_dicom_series(series)
    shifted = affine.copy()
    shifted[:3, 3] += 0.5 * affine[:3, 2]  # half a slice off
    paths = write_volume_case("case001", np.zeros(volume.shape, np.float32), (shifted, volume.shape), tmp_path, 0.5,
                              dicom_series=series)
    assert set(paths) == {"anomaly_map", "seg_nifti", "seg_nrrd"}
    assert f"{series}: a file's position is not a slice of the series' grid" in caplog.text

    mixed = shutil.copytree(series, tmp_path / "mixed")
    one = sorted(mixed.glob("*.dcm"))[0]
    dataset = pydicom.dcmread(one)
    del dataset.FrameOfReferenceUID
    dataset.save_as(one)
    paths = write_volume_case("case001", np.zeros(volume.shape, np.float32), (affine, volume.shape), tmp_path, 0.5,
                              dicom_series=mixed)
    assert "dicom_map" not in paths and f"{mixed}: the series' files do not share one Frame of Reference" in caplog.text


def test_without_highdicom_the_nifti_outputs_are_written_and_one_line_says_why(series: Path, tmp_path: Path,
                                                                                monkeypatch, caplog):
    from medad.io import dicom_outputs

    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    monkeypatch.setattr(dicom_outputs, "_warned_missing", False)
    volume, affine = read_dicom_series(series)
    for case in ("a", "b"):
        paths = write_volume_case(case, np.zeros(volume.shape, np.float32), (affine, volume.shape), tmp_path, 0.5,
                                  dicom_series=series)
        assert set(paths) == {"anomaly_map", "seg_nifti", "seg_nrrd"}
    assert not list(tmp_path.glob("*.dcm"))
    lines = [r for r in caplog.records if "medad[dicom]" in r.getMessage()]
    assert len(lines) == 1 and lines[0].getMessage() == dicom_outputs.DICOM_EXTRA_MISSING
    assert lines[0].levelno == logging.WARNING


def test_a_folder_of_dicom_series_is_a_datalist(series: Path, tmp_path: Path):
    from medad.data import nifti_datalist

    shutil.copytree(series, tmp_path / "in" / "site" / "case001")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "in" / "case000.nii.gz")
    items = nifti_datalist(tmp_path / "in", check=False)
    assert [(i["case_id"], Path(i["image"]).name) for i in items] == [("case000", "case000.nii.gz"),
                                                                        ("site/case001", "case001")]
    assert [i["case_id"] for i in nifti_datalist(tmp_path / "in" / "site" / "case001", check=False)] == ["case001"]


@needs_highdicom
def test_inference_workflow_on_a_dicom_series_writes_seg_and_parametric_map(tmp_path: Path, caplog, capfd):
    from medad import bundle

    caplog.set_level(logging.DEBUG)
    demo, run_dir = tmp_path / "demo", tmp_path / "run"
    bundle.run(REPO / "bundles" / "intensity", run_dir=str(run_dir), demo_dir=str(demo),
               demo_kwargs={"num_train": 4, "num_test": 1})
    inputs = tmp_path / "dicom_inputs"
    dicom_series_from_nifti(demo / "test" / "test_000.nii.gz", inputs / "case_dcm", thickness=False)
    outputs = {}
    for deidentify in (True, False):
        outputs[deidentify] = tmp_path / f"inference_{deidentify}"
        bundle.run(REPO / "bundles" / "intensity", workflow="inference", run_dir=str(run_dir), input_dir=str(inputs),
                   output_dir=str(outputs[deidentify]), deidentify_dicom=deidentify)
    sources = _sources(inputs / "case_dcm")
    maps = outputs[True] / "maps"
    _check_object(maps / "case_dcm_seg.dcm", sources, maps / "case_dcm_seg.nii.gz", exact=True)
    _check_object(maps / "case_dcm_anomaly_map.dcm", sources, maps / "case_dcm_anomaly_map.nii.gz", exact=False)
    identified = pydicom.dcmread(outputs[False] / "maps" / "case_dcm_seg.dcm")
    assert identified.PatientID == PATIENT["0010|0020"]  # the option is wired through the bundle config

    # nothing identifying in any output file (but the identified run's DICOM objects), table, or log line
    for path, data in _texts(run_dir, *outputs.values()).items():
        kept = path.suffix == ".dcm" and outputs[False] in path.parents
        for value in (*NEVER.values(), *(() if kept else PATIENT.values())):
            assert value.encode() not in data, (path, value)
    for deidentify in (True, False):
        table = pd.read_parquet(outputs[deidentify] / "cases.parquet").to_csv()
        assert list(pd.read_csv(outputs[deidentify] / "cases.csv")["case_id"]) == ["case_dcm"]
        assert not [v for v in PATIENT.values() if v in table]
    logs = caplog.text + "".join(capfd.readouterr())
    assert not [v for v in (*PATIENT.values(), *NEVER.values(), "Doe", "Jane") if v in logs]
