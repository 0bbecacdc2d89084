"""Tests for medad.io: geometry of NIfTI/Slicer outputs, atomic writes, overlays, tables and curves."""

from __future__ import annotations

import json
import os

import nibabel as nib
import nrrd
import numpy as np
import pandas as pd
import pytest
import slicerio
import torch

from medad.io import (
    atomic_save,
    atomic_write,
    case_table,
    cohort_summary,
    lps_affine_to_ras,
    save_overlay_png,
    save_roc_pr_curves,
    save_volume_overlay_png,
    select_slices,
    write_color_table,
    write_image_case,
    write_json,
    write_label_nifti,
    write_nifti_like,
    write_seg_nrrd,
    write_seg_nrrd_2d,
    write_tables,
    write_volume_case,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def oblique_affine() -> np.ndarray:
    """Voxel->RAS affine with anisotropic spacing, a 30 degree rotation about z and a 10 degree one about x."""
    a, b = np.deg2rad(30.0), np.deg2rad(10.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rot_z @ rot_x @ np.diag([0.9, 1.2, 2.5])
    affine[:3, 3] = [-12.5, 30.25, -7.0]
    return affine


@pytest.fixture()
def reference_nifti(tmp_path):
    affine = oblique_affine()
    image = nib.Nifti1Image(np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.int16), affine)
    image.set_sform(affine, code=2)
    image.set_qform(affine, code=1)
    path = tmp_path / "input.nii.gz"
    nib.save(image, path)
    return path


def listing(folder) -> set[str]:
    return set(os.listdir(folder))


# --------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_on_success_and_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with atomic_write(target, "w") as handle:
        handle.write("new")
    assert target.read_text(encoding="utf-8") == "new"
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half written")
            raise RuntimeError("writer failed")
    assert target.read_text(encoding="utf-8") == "new"
    assert listing(tmp_path) == {"result.txt"}


def test_atomic_save_passes_same_extension_and_cleans_up(tmp_path):
    target = tmp_path / "case_001.nii.gz"
    target.write_bytes(b"old")
    seen = []

    def failing_writer(name):
        seen.append(name)
        with open(name, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_save(target, failing_writer)
    assert seen[0].endswith(".nii.gz") and os.path.dirname(seen[0]) == str(tmp_path)
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == {"case_001.nii.gz"}

    def writer(name):
        with open(name, "wb") as handle:
            handle.write(b"new")

    atomic_save(target, writer)
    assert target.read_bytes() == b"new"
    assert listing(tmp_path) == {"case_001.nii.gz"}
    with pytest.raises(RuntimeError, match="without creating"):
        atomic_save(tmp_path / "never.png", lambda name: None)


def test_write_json_is_numpy_safe_and_writes_nan_as_null(tmp_path):
    path = write_json(tmp_path / "s.json", {"a": np.float32(0.5), "b": np.int64(3), "c": np.array([1, 2]),
                                            "d": float("nan"), "e": np.bool_(True), "f": torch.tensor([1.5])})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 0.5, "b": 3, "c": [1, 2], "d": None, "e": True, "f": [1.5]}


# --------------------------------------------------------------------------------------------- NIfTI


def test_write_nifti_like_keeps_oblique_grid_and_codes(tmp_path, reference_nifti):
    values = torch.arange(7 * 6 * 5, dtype=torch.float64).reshape(7, 6, 5) / 7.0
    out = write_nifti_like(values, reference_nifti, tmp_path / "map.nii.gz")
    written, reference = nib.load(out), nib.load(reference_nifti)
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    assert written.get_data_dtype() == np.float32
    assert int(written.header["sform_code"]) == 2 and int(written.header["qform_code"]) == 1
    np.testing.assert_allclose(written.get_fdata(), values.numpy().astype(np.float32), rtol=1e-6)
    # inputs never modified
    assert nib.load(reference_nifti).get_data_dtype() == np.int16


def test_write_nifti_like_rejects_other_grid(tmp_path, reference_nifti):
    with pytest.raises(ValueError, match=r"map\.nii\.gz.*\(6, 7, 5\)"):
        write_nifti_like(np.zeros((6, 7, 5)), reference_nifti, tmp_path / "map.nii.gz")
    assert listing(tmp_path) == {"input.nii.gz"}


def test_write_nifti_like_accepts_affine_shape_and_trailing_singleton(tmp_path):
    affine = oblique_affine()
    out = write_nifti_like(np.ones((4, 3, 2)), (affine, (4, 3, 2, 1)), tmp_path / "m.nii")
    assert nib.load(out).shape == (4, 3, 2, 1)
    np.testing.assert_allclose(nib.load(out).affine, affine, atol=1e-5)


def test_write_label_nifti_uint8_and_validation(tmp_path, reference_nifti):
    labels = np.zeros((7, 6, 5), dtype=np.int64)
    labels[1:3, 2, 4] = 2
    out = write_label_nifti(labels, reference_nifti, tmp_path / "case_seg.nii.gz")
    image = nib.load(out)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), labels)
    with pytest.raises(ValueError, match="0..255"):
        write_label_nifti(labels + 300, reference_nifti, tmp_path / "bad_seg.nii.gz")
    with pytest.raises(ValueError, match="whole numbers"):
        write_label_nifti(labels + 0.5, reference_nifti, tmp_path / "bad_seg.nii.gz")


# --------------------------------------------------------------------------------------------- Slicer


SEGMENTS = [
    {"label_value": 1, "name": "anomaly", "color": (1.0, 0.2, 0.2)},
    {"label_value": 2, "name": "second region", "color": (0.0, 0.5, 1.0)},
]


def labelmap_3d() -> np.ndarray:
    labels = np.zeros((7, 6, 5), dtype=np.uint8)
    labels[1:4, 2:4, 1:3] = 1
    labels[5, 0, 4] = 2
    return labels


def test_seg_nrrd_read_back_with_slicerio(tmp_path):
    affine, labels = oblique_affine(), labelmap_3d()
    path = write_seg_nrrd(labels, affine, tmp_path / "case.seg.nrrd", SEGMENTS)
    segmentation = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in segmentation["segments"]}
    assert set(by_name) == {"anomaly", "second region"}
    assert by_name["anomaly"]["labelValue"] == 1 and by_name["second region"]["labelValue"] == 2
    np.testing.assert_allclose(by_name["second region"]["color"], [0.0, 0.5, 1.0])
    assert by_name["anomaly"]["extent"] == [0, 6, 0, 5, 0, 4]
    assert segmentation["masterRepresentation"] == "Binary labelmap"
    assert segmentation["containedRepresentationNames"] == ["Binary labelmap"]
    np.testing.assert_allclose(lps_affine_to_ras(segmentation["ijkToLPS"]), affine, atol=1e-9)
    np.testing.assert_array_equal(segmentation["voxels"], labels)
    np.testing.assert_array_equal(slicerio.segment_mask(segmentation, "anomaly"), labels == 1)
    assert listing(tmp_path) == {"case.seg.nrrd"}


def test_seg_nrrd_header_geometry_with_pynrrd(tmp_path):
    affine, labels = oblique_affine(), labelmap_3d()
    path = write_seg_nrrd(labels, affine, tmp_path / "case.seg.nrrd", SEGMENTS)
    voxels, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["kinds"] == ["domain"] * 3
    np.testing.assert_array_equal(header["sizes"], [7, 6, 5])
    # NRRD space directions are the LPS images of the unit index steps (one row per axis); the origin is the
    # LPS position of voxel (0, 0, 0): RAS (-12.5, 30.25, -7) -> LPS (12.5, -30.25, -7).
    np.testing.assert_allclose(header["space origin"], [12.5, -30.25, -7.0])
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(header["space directions"]).T
    ijk_to_lps[:3, 3] = header["space origin"]
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ ijk_to_lps, affine, atol=1e-9)
    np.testing.assert_array_equal(voxels, labels)
    assert header["Segment1_Name"] == "second region" and header["Segment1_LabelValue"] == "2"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    for key in ("ID", "Color", "Layer", "Extent", "Tags", "NameAutoGenerated", "ColorAutoGenerated"):
        assert f"Segment0_{key}" in header


def test_seg_nrrd_geometry_equals_input_nifti(tmp_path, reference_nifti):
    """Acceptance: the thresholded map written for an input NIfTI has exactly that input's geometry."""
    anomaly_map = np.zeros((7, 6, 5), dtype=np.float32)
    anomaly_map[2:4, 1:3, 2] = 0.9
    paths = write_volume_case("case_7", anomaly_map, reference_nifti, tmp_path / "out", threshold=0.5)
    reference = nib.load(reference_nifti)
    segmentation = slicerio.read_segmentation(str(paths["seg_nrrd"]))
    np.testing.assert_allclose(lps_affine_to_ras(segmentation["ijkToLPS"]), reference.affine, atol=1e-5)
    assert segmentation["voxels"].shape == reference.shape
    _, header = nrrd.read(str(paths["seg_nrrd"]))
    np.testing.assert_array_equal(header["sizes"], reference.shape)
    np.testing.assert_array_equal(segmentation["voxels"], anomaly_map >= 0.5)
    label_image = nib.load(paths["seg_nifti"])
    np.testing.assert_allclose(label_image.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(label_image.dataobj), anomaly_map >= 0.5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "case_7.seg.nrrd", "case_7_anomaly_map.nii.gz", "case_7_seg.nii.gz"]


def test_seg_nrrd_rejects_undescribed_labels_and_bad_shapes(tmp_path):
    labels = labelmap_3d()
    with pytest.raises(ValueError, match=r"label values \[2\]"):
        write_seg_nrrd(labels, np.eye(4), tmp_path / "a.seg.nrrd", SEGMENTS[:1])
    with pytest.raises(ValueError, match="distinct"):
        write_seg_nrrd(labels, np.eye(4), tmp_path / "a.seg.nrrd", [SEGMENTS[0], SEGMENTS[0], SEGMENTS[1]])
    with pytest.raises(ValueError, match=r"\(X, Y, Z\)"):
        write_seg_nrrd(labels[0], np.eye(4), tmp_path / "a.seg.nrrd", SEGMENTS)
    assert listing(tmp_path) == set()


def test_seg_nrrd_2d_uses_itk_image_geometry(tmp_path):
    labels = np.zeros((4, 9), dtype=np.uint8)  # H = 4 rows, W = 9 columns
    labels[2, 5] = 1
    path = write_seg_nrrd_2d(labels, tmp_path / "bottle_000.seg.nrrd", SEGMENTS[:1], spacing=(0.5, 0.25))
    segmentation = slicerio.read_segmentation(str(path))
    assert segmentation["voxels"].shape == (9, 4, 1)
    assert segmentation["voxels"][5, 2, 0] == 1 and segmentation["voxels"].sum() == 1
    np.testing.assert_allclose(segmentation["ijkToLPS"], np.diag([0.5, 0.25, 1.0, 1.0]))


def test_write_image_case_map_and_segmentation(tmp_path):
    anomaly_map = np.zeros((4, 9), dtype=np.float32)
    anomaly_map[1, 3] = 2.0
    paths = write_image_case("bottle_001", anomaly_map, tmp_path, threshold=1.0)
    voxels, header = nrrd.read(str(paths["anomaly_map"]))
    assert voxels.shape == (9, 4, 1) and voxels[3, 1, 0] == 2.0 and header["space"] == "left-posterior-superior"
    assert slicerio.read_segmentation(str(paths["seg_nrrd"]))["voxels"][3, 1, 0] == 1


def test_color_table_lines(tmp_path):
    path = write_color_table(tmp_path / "anomaly.ctbl", SEGMENTS)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    assert lines == ["0 Background 0 0 0 0", "1 anomaly 255 51 51 255", "2 second_region 0 128 255 255"]


# --------------------------------------------------------------------------------------------- overlays


def test_save_overlay_png_rgb_and_grey(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(3, 32, 40))
    mask = np.zeros((32, 40))
    mask[10:20, 5:15] = 1
    anomaly_map = rng.uniform(size=(32, 40)) + 2 * mask
    path = save_overlay_png(tmp_path / "rgb.png", image, image * 0.9, anomaly_map, mask, threshold=1.5,
                            title="case 1 score 0.7")
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000
    grey = save_overlay_png(tmp_path / "grey.png", torch.rand(1, 32, 40), None, torch.rand(32, 40),
                            map_range=(0.0, 1.0))
    assert grey.read_bytes()[:8] == PNG_SIGNATURE and grey.stat().st_size > 5_000
    with pytest.raises(ValueError, match="anomaly map"):
        save_overlay_png(tmp_path / "bad.png", image, None, anomaly_map[:10])
    assert listing(tmp_path) == {"rgb.png", "grey.png"}


def test_select_slices_follows_mass():
    weights = np.zeros((2, 2, 10))
    weights[:, :, 3] = 1.0
    weights[:, :, 8] = 3.0
    # cumulative mass per slice: 0.25 at z = 3, 1.0 at z = 8 -> the 0.25 and 0.75 quantiles are slices 3 and 8
    assert select_slices(weights, 2) == [3, 8]
    assert select_slices(weights, 1) == [8]  # the peak
    assert len(select_slices(np.zeros((2, 2, 10)), 3)) == 3


def test_save_volume_overlay_png(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.normal(size=(24, 20, 12))
    mask = np.zeros_like(volume)
    mask[8:14, 6:12, 4:7] = 1
    path = save_volume_overlay_png(tmp_path / "vol.png", volume, volume * 0 + mask, mask=mask,
                                   restoration=volume * 0.5, n_slices=3, threshold=0.5)
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="outside"):
        save_volume_overlay_png(tmp_path / "v2.png", volume, mask, slices=[12])


# --------------------------------------------------------------------------------------------- tables


def records() -> list[dict]:
    truth = np.zeros((4, 4, 4), dtype=bool)
    truth[0, 0, :4] = True  # 4 voxels
    predicted = np.zeros_like(truth)
    predicted[0, 0, :2] = True  # 2 voxels, both correct: Dice = 2*2 / (2 + 4) = 2/3
    predicted[3, 3, 3] = True  # + 1 false positive: Dice = 2*2 / (3 + 4) = 4/7
    anomaly_map = truth.astype(float)  # ranks every true voxel first: AP = 1
    return [
        {"case_id": "sub-01", "image_score": 0.9, "label": 1, "anomaly_mask": predicted, "voxel_spacing": (2, 2, 2),
         "ground_truth_mask": truth, "anomaly_map": anomaly_map, "runtime_s": 1.5, "site": "A"},
        {"case_id": "sub-02", "image_score": 0.2, "label": 0, "runtime_s": 2.5, "site": "B"},
        {"case_id": "sub-03", "image_score": 0.6, "label": 0, "runtime_s": 0.5, "site": "A", "threshold": 0.7},
    ]


def test_case_table_columns_and_hand_values():
    df = case_table(records(), threshold=0.5)
    assert list(df.columns[:9]) == ["case_id", "image_score", "label", "threshold", "decision",
                                    "anomaly_volume_ml", "ap", "dice", "runtime_s"]
    assert list(df["decision"]) == [True, False, False]  # sub-03 uses its own threshold 0.7
    assert df.loc[0, "anomaly_volume_ml"] == pytest.approx(3 * 8 / 1000)  # 3 voxels * 8 mm^3
    assert df.loc[0, "dice"] == pytest.approx(4 / 7)
    assert df.loc[0, "ap"] == pytest.approx(1.0)
    assert np.isnan(df.loc[1, "dice"]) and df.loc[2, "site"] == "A"
    area = case_table([{"case_id": "x", "image_score": 1.0, "anomaly_mask": np.eye(5)}])
    assert area.loc[0, "anomaly_area_px"] == 5.0 and area["decision"].isna().all()
    with pytest.raises(ValueError, match="case_id"):
        case_table([{"image_score": 1.0}])
    with pytest.raises(ValueError, match="voxel spacing"):
        case_table([{"case_id": "y", "image_score": 1.0, "anomaly_mask": np.ones((2, 2, 2))}])


def test_tables_round_trip_and_summary(tmp_path):
    df = case_table(records(), threshold=0.5)
    paths = write_tables(df, tmp_path, stem="cases")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv", "cases.parquet", "cases_summary.json"]
    pd.testing.assert_frame_equal(pd.read_parquet(paths["parquet"]), df)
    from_csv = pd.read_csv(paths["csv"])
    assert list(from_csv.columns) == list(df.columns)
    np.testing.assert_allclose(from_csv["image_score"], df["image_score"])
    assert list(from_csv["decision"]) == [True, False, False]
    summary = json.loads(paths["summary"].read_text(encoding="utf-8"))
    assert summary["n_cases"] == 3 and summary["n_anomalous_decisions"] == 1
    assert summary["scores_by_label"]["0"] == {"n": 2, "mean": pytest.approx(0.4), "median": pytest.approx(0.4)}
    assert summary["mean_dice"] == pytest.approx(4 / 7) and summary["mean_runtime_s"] == pytest.approx(1.5)
    assert summary["image_auroc"] == pytest.approx(1.0)
    assert cohort_summary(df.drop(columns="label"))["scores_by_label"]["all"]["n"] == 3


def test_roc_pr_curves(tmp_path):
    paths = save_roc_pr_curves([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], tmp_path / "cases")
    assert paths["roc"].name == "cases_roc.png" and paths["pr"].name == "cases_pr.png"
    for path in paths.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="both normal"):
        save_roc_pr_curves([0.1, 0.2], [1, 1], tmp_path / "bad")
