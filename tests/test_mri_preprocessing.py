"""MRI preprocessing transforms (medad.transforms.mri) and the cohort driver (medad.preprocess).

The real-data tests preprocess ONE IXI head once per module (deepbet + ANTs affine) and check the
issue's acceptance: < 30 s per head, Dice(registered brain mask, MNI152 brain mask) >= 0.90,
intensities in [0, 1] and zero outside the brain, a log row, resumability, one error row per bad
file, and an inverse-transform round trip (native -> template -> native) with Dice >= 0.8.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

ants = pytest.importorskip("ants")
sitk = pytest.importorskip("SimpleITK")

from medad.data import load_mni152  # noqa: E402
from medad.preprocess import LOG_NAME, case_outputs, main, preprocess_cohort  # noqa: E402
from medad.transforms.mri import (  # noqa: E402
    N4BiasCorrectiond,
    NormalizeIntensityInBraind,
    ReorientToCanonicald,
    SkullStripd,
    ants_to_metatensor,
    apply_forward_transform,
    apply_inverse_transform,
    load_registration_record,
    load_volume,
    metatensor_to_ants,
    metatensor_to_sitk,
)

IXI_CASE = "IXI012-HH-1211_T1"
# IXI files are stored sagittal-first (axis codes P, S, R), like this affine.
PSR_AFFINE = np.array([[0.0, 0.0, 2.0, -88.2], [-2.0, 0.0, 0.0, 118.2], [0.0, 2.0, 0.0, -135.3], [0, 0, 0, 1]])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _write(path: Path, array: np.ndarray, affine: np.ndarray = PSR_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# ------------------------------------------------------------------------------------------
# Geometry conversions: RAS (nibabel/MONAI) <-> LPS (ITK/ANTs)
# ------------------------------------------------------------------------------------------
def test_ants_conversion_matches_ants_reader(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.random((6, 7, 8)).astype(np.float32)
    path = _write(tmp_path / "psr.nii.gz", array)
    mine = metatensor_to_ants(load_volume(path))
    reference = ants.image_read(str(path))
    np.testing.assert_allclose(mine.numpy(), reference.numpy())
    np.testing.assert_allclose(mine.origin, reference.origin, atol=1e-4)
    np.testing.assert_allclose(mine.spacing, reference.spacing, atol=1e-6)
    np.testing.assert_allclose(mine.direction, reference.direction, atol=1e-6)
    back = ants_to_metatensor(reference)
    np.testing.assert_allclose(back.affine.numpy(), PSR_AFFINE, atol=1e-4)
    np.testing.assert_allclose(back[0].numpy(), array)


def test_sitk_conversion_matches_sitk_reader(tmp_path):
    array = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    path = _write(tmp_path / "psr.nii.gz", array)
    mine = metatensor_to_sitk(load_volume(path))
    reference = sitk.ReadImage(str(path))
    np.testing.assert_allclose(sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(mine.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mine.GetDirection(), reference.GetDirection(), atol=1e-6)
    # voxel (i, j, k) of the nibabel array is at the ITK physical point of index (i, j, k), in LPS.
    ras = PSR_AFFINE @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(mine.TransformIndexToPhysicalPoint((1, 2, 3)), ras[:3] * [-1, -1, 1], atol=1e-4)


def test_reorient_to_canonical_keeps_world_positions(tmp_path):
    array = np.zeros((6, 7, 8), np.float32)
    array[1, 2, 3] = 5.0
    array[4, 0, 6] = 1.0
    volume = load_volume(_write(tmp_path / "psr.nii.gz", array))
    d = ReorientToCanonicald()({"image": volume})
    out = d["image"]
    assert nib.aff2axcodes(out.affine.numpy()) == ("R", "A", "S")
    assert tuple(out.shape) == (1, 8, 6, 7)
    np.testing.assert_allclose(d["native_affine"], PSR_AFFINE)
    assert d["native_spatial_shape"] == (6, 7, 8)
    for value, voxel in ((5.0, (1, 2, 3)), (1.0, (4, 0, 6))):
        where = np.argwhere(out[0].numpy() == value)[0]
        np.testing.assert_allclose(out.affine.numpy() @ [*where, 1], PSR_AFFINE @ [*voxel, 1], atol=1e-6)


def test_load_volume_names_file_and_problem(tmp_path):
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"not a nifti at all" * 100)
    with pytest.raises(ValueError, match=r"broken\.nii\.gz: not a readable NIfTI"):
        load_volume(corrupt)
    four_d = _write(tmp_path / "series.nii.gz", np.ones((4, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"series\.nii\.gz: expected a 3D volume .*\(4, 4, 4, 3\)"):
        load_volume(four_d)
    assert load_volume(_write(tmp_path / "single.nii.gz", np.arange(64.0).reshape(4, 4, 4, 1))).shape == (1, 4, 4, 4)


# ------------------------------------------------------------------------------------------
# Intensity transforms against closed forms
# ------------------------------------------------------------------------------------------
def test_normalize_minmax_closed_form():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4) * 2.0 + 10.0
    mask = torch.zeros_like(image)
    mask[0, 1] = 1  # voxels 12..23 -> intensities 34..56
    out = NormalizeIntensityInBraind(lower=0.0, upper=100.0)({"image": image, "brain_mask": mask})["image"]
    np.testing.assert_allclose(out[0, 1].numpy(), (image[0, 1].numpy() - 34.0) / 22.0, atol=1e-6)
    assert float(out[0, 0].abs().max()) == 0.0
    # Percentiles: values 34..56 step 2; the 10th/90th (linear) are 36.2 and 53.8.
    out = NormalizeIntensityInBraind(lower=10.0, upper=90.0)({"image": image, "brain_mask": mask})["image"]
    expected = (np.clip(image[0, 1].numpy(), 36.2, 53.8) - 36.2) / (53.8 - 36.2)
    np.testing.assert_allclose(out[0, 1].numpy(), expected, atol=1e-5)


def test_normalize_zscore_inside_brain():
    image = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 5 + 20
    mask = (torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    out = NormalizeIntensityInBraind(lower=0.0, upper=100.0, mode="zscore")({"image": image, "brain_mask": mask})
    inside = out["image"][mask > 0].double()
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std()) - 1.0) < 1e-5
    assert float(out["image"][mask == 0].abs().max()) == 0.0


def test_n4_removes_a_smooth_multiplicative_bias():
    size = 48
    grid = np.stack(np.meshgrid(*[np.arange(size) - size / 2] * 3, indexing="ij"))
    ball = (grid**2).sum(0) < (0.4 * size) ** 2
    rng = np.random.default_rng(0)
    clean = np.where(ball, 100.0 + rng.normal(0, 1, ball.shape), 0.0).astype(np.float32)
    bias = np.exp(0.3 * grid[0] / size + 0.2 * grid[2] / size).astype(np.float32)  # +-15% and +-10%
    volume = torch.from_numpy(clean * bias)[None]
    from monai.data import MetaTensor

    volume = MetaTensor(volume, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)))
    corrected = N4BiasCorrectiond(shrink_factor=2)({"image": volume})["image"][0].numpy()

    def cv(x):
        return float(x[ball].std() / x[ball].mean())

    assert cv(clean * bias) > 0.05
    assert cv(corrected) < 0.5 * cv(clean * bias)
    assert float(np.abs(corrected[~ball]).max()) == 0.0  # background stays exactly at the minimum


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backend"):
        SkullStripd(backend="fsl")
    with pytest.raises(ValueError, match="normalisation"):
        NormalizeIntensityInBraind(mode="histogram")


def test_mni152_loads_offline():
    from medad.transforms.mri import _load_template

    template, mask, affine = load_mni152(2)
    assert template.shape == mask.shape == (99, 117, 95) and affine[0, 0] == 2.0
    assert 0.15 < float(mask.mean()) < 0.3 and 0.95 < template.max() <= 1.0  # resampled from a maximum of 1
    np.testing.assert_array_equal(mask, template > 0.2)
    brain, brain_mask = _load_template("mni152", None, 2)  # registration sees the template inside the brain only
    assert tuple(brain.shape) == (1, 99, 117, 95)
    assert float(brain[brain_mask == 0].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------
# One IXI head through the whole cohort driver (run once per module)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(ixi_dir, tmp_path_factory):
    if importlib.util.find_spec("deepbet") is None:
        pytest.skip("deepbet is not installed")
    source = ixi_dir / f"{IXI_CASE}.nii.gz"
    if not source.exists():
        pytest.skip(f"{source} not available")
    root = tmp_path_factory.mktemp("mri_cohort")
    inputs = root / "input"
    inputs.mkdir()
    (inputs / source.name).symlink_to(source)
    (inputs / "zz_corrupt.nii.gz").write_bytes(os.urandom(4096))
    output = root / "output"
    start = time.perf_counter()
    log = preprocess_cohort(inputs, output, progress=False, registration_backend="ants")  # elastix: test_itk.py
    return {"log": log, "output": output, "input": inputs, "source": source, "seconds": time.perf_counter() - start}


def _ok_row(cohort) -> pd.Series:
    log = cohort["log"]
    return log[log["case"] == IXI_CASE].iloc[0]


def test_cohort_one_head_under_30_seconds(cohort):
    row = _ok_row(cohort)
    assert row["status"] == "ok", row["error"]
    step_seconds = {c: row[c] for c in cohort["log"].columns if c.startswith("seconds_")}
    print(f"\nper-step seconds {IXI_CASE}: {step_seconds}, total {row['total_seconds']:.1f}, "
          f"cpu {row['cpu_seconds']:.1f}, load average {os.getloadavg()[0]:.1f}")
    # Wall clock < 30 s is the acceptance. When other jobs oversubscribe the CPU, the case's CPU time
    # (all threads) bounds what it takes on an idle machine, so either being < 30 s passes.
    assert min(row["total_seconds"], row["cpu_seconds"]) < 30.0


def test_registered_brain_mask_matches_mni(cohort):
    paths = case_outputs(cohort["output"], IXI_CASE)
    registered = np.asarray(nib.load(paths["brain_mask"]).dataobj)
    _, mni_mask, _ = load_mni152(2)
    assert registered.shape == mni_mask.shape
    assert dice(registered, mni_mask) >= 0.90


def test_output_intensities_in_unit_range_zero_outside_brain(cohort):
    paths = case_outputs(cohort["output"], IXI_CASE)
    image = np.asarray(nib.load(paths["image"]).dataobj)
    brain = np.asarray(nib.load(paths["brain_mask"]).dataobj) > 0
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert np.all(image[~brain] == 0.0)
    assert image[brain].max() == pytest.approx(1.0) and np.median(image[brain]) > 0.2
    np.testing.assert_allclose(nib.load(paths["image"]).affine, load_mni152(2)[2], atol=1e-5)


def test_log_rows_and_error_row_for_corrupt_file(cohort):
    log = pd.read_csv(cohort["output"] / LOG_NAME)
    assert set(log["case"]) == {IXI_CASE, "zz_corrupt"}
    ok = log[log["case"] == IXI_CASE].iloc[0]
    assert ok["status"] == "ok"
    for step in ("load", "reorient", "n4", "skull_strip", "register", "normalize", "save"):
        assert ok[f"seconds_{step}"] >= 0.0
    bad = log[log["case"] == "zz_corrupt"].iloc[0]
    assert bad["status"] == "error"
    assert bad["error"].startswith(str(cohort["input"] / "zz_corrupt.nii.gz") + ": not a readable NIfTI")
    assert not (cohort["output"] / "images" / "zz_corrupt.nii.gz").exists()


def test_transform_paths_on_disk(cohort):
    record = load_registration_record(case_outputs(cohort["output"], IXI_CASE)["transforms"])
    assert record["backend"] == "ants" and _ok_row(cohort)["registration_backend"] == "ants"
    assert record["native_spatial_shape"] == [120, 120, 90]
    np.testing.assert_allclose(record["native_affine"], nib.load(cohort["source"]).affine, atol=1e-5)
    assert all(Path(p).is_file() for p in record["template_transforms"] + record["inverse_transforms"])
    assert not list((cohort["output"] / "transforms").glob(".*partial"))


def test_forward_transform_of_original_file_matches_output(cohort):
    # The stored transforms map the ORIGINAL (sagittal-first) file onto the template output.
    paths = case_outputs(cohort["output"], IXI_CASE)
    warped = apply_forward_transform(cohort["source"], paths["transforms"])[0].numpy()
    image = np.asarray(nib.load(paths["image"]).dataobj)
    brain = np.asarray(nib.load(paths["brain_mask"]).dataobj) > 0
    assert np.corrcoef(warped[brain], image[brain])[0, 1] > 0.85


def test_inverse_transform_round_trip_blob(cohort):
    paths = case_outputs(cohort["output"], IXI_CASE)
    shape = nib.load(cohort["source"]).shape
    # Put the blob at the native centre of the brain (the template mask mapped back to native space).
    native_brain = apply_inverse_transform(paths["brain_mask"], paths["transforms"], "nearestNeighbor")[0].numpy()
    assert native_brain.shape == shape
    centre = np.argwhere(native_brain > 0).mean(0)
    blob = ((np.indices(shape) - centre[:, None, None, None]) ** 2).sum(0) <= 5.0**2
    in_template = apply_forward_transform(blob.astype(np.float32), paths["transforms"])
    brain = np.asarray(nib.load(paths["brain_mask"]).dataobj) > 0
    assert (in_template[0].numpy() > 0.5)[brain].mean() > 0 and ((in_template[0].numpy() > 0.5) & ~brain).sum() == 0
    back = apply_inverse_transform(in_template, paths["transforms"], interpolator="linear")[0].numpy() > 0.5
    assert dice(back, blob) >= 0.8


def test_cohort_is_resumable(cohort):
    paths = case_outputs(cohort["output"], IXI_CASE)
    mtime = paths["image"].stat().st_mtime_ns
    start = time.perf_counter()
    log = preprocess_cohort(cohort["input"], cohort["output"], progress=False, glob="IXI*")
    assert time.perf_counter() - start < 5.0
    assert list(log["status"]) == ["skipped"]
    assert paths["image"].stat().st_mtime_ns == mtime


def test_cli_reports_errors_and_limit(cohort, tmp_path):
    # --limit 1 in sorted order picks the IXI case, already done -> skipped, exit code 0, montage written.
    code = main(["--input", str(cohort["input"]), "--output", str(cohort["output"]), "--limit", "1",
                 "--montage", str(tmp_path / "montage.png")])
    assert code == 0 and (tmp_path / "montage.png").stat().st_size > 1000
    assert main(["--input", str(cohort["input"]), "--output", str(cohort["output"]), "--glob", "zz_*"]) == 1


def test_atlas_skull_strip_agrees_with_deepbet(cohort):
    # Native deepbet mask (canonical grid) recovered from the cohort outputs, vs the atlas backend.
    paths = case_outputs(cohort["output"], IXI_CASE)
    d = N4BiasCorrectiond()(ReorientToCanonicald()({"image": load_volume(cohort["source"])}))
    native = apply_inverse_transform(paths["brain_mask"], paths["transforms"], "nearestNeighbor")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(native[0].numpy(), native.affine.numpy())).get_fdata()
    out = SkullStripd(backend="atlas")(d)
    atlas = out["brain_mask"][0].numpy()
    assert atlas.shape == canonical.shape
    assert dice(atlas, canonical) >= 0.85
    assert float(out["image"][0][atlas == 0].abs().max()) == 0.0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEDAD_RUN_SLOW"), reason="brainextractor takes ~30-60 s; set MEDAD_RUN_SLOW=1")
def test_brainextractor_backend(ixi_dir):
    pytest.importorskip("brainextractor")
    d = ReorientToCanonicald()({"image": load_volume(ixi_dir / f"{IXI_CASE}.nii.gz")})
    out = SkullStripd(backend="brainextractor")(d)
    mask = out["brain_mask"][0].numpy() > 0
    volume_ml = mask.sum() * 8 / 1000  # 2 mm voxels
    assert 900 < volume_ml < 2000
    assert float(out["image"][0][~torch.from_numpy(mask)].abs().max()) == 0.0
