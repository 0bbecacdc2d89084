"""The MRI cohort driver (medad.preprocess) on ONE IXI head (deepbet + ANTs affine), run once per module.

Checks the issue's acceptance: < 30 s per head, Dice(registered brain mask, MNI152 brain mask) >= 0.90,
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

ants = pytest.importorskip("ants")
sitk = pytest.importorskip("SimpleITK")

from medad.data import load_mni152  # noqa: E402
from medad.preprocess import LOG_NAME, case_outputs, main, preprocess_cohort  # noqa: E402
from medad.transforms.mri import (  # noqa: E402
    N4BiasCorrectiond,
    ReorientToCanonicald,
    SkullStripd,
    apply_forward_transform,
    apply_inverse_transform,
    load_registration_record,
    load_volume,
)
from tests.helpers import IXI_CASE, ixi_cohort_input  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# One IXI head through the whole cohort driver (run once per module)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(ixi_dir, tmp_path_factory):
    if importlib.util.find_spec("deepbet") is None:
        pytest.skip("deepbet is not installed")
    root = tmp_path_factory.mktemp("mri_cohort")
    source = ixi_cohort_input(ixi_dir, root)
    inputs = root / "input"
    (inputs / "zz_corrupt.nii.gz").write_bytes(os.urandom(4096))
    output = root / "output"
    start = time.perf_counter()
    log = preprocess_cohort(inputs, output, progress=False, registration_backend="ants")  # elastix: transforms/test_elastix.py
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


def test_preprocessing_the_same_head_again_gives_the_same_volume(cohort, tmp_path):
    # multi-threaded ITK (N4, registration) summed in thread order and two runs differed by up to 0.6 in intensity
    # and by 2,110 brain-mask voxels; medad runs ITK on one thread per case (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS)
    again = tmp_path / "again"
    preprocess_cohort(cohort["input"], again, progress=False, registration_backend="ants")
    first, second = case_outputs(cohort["output"], IXI_CASE), case_outputs(again, IXI_CASE)
    for key in ("image", "brain_mask"):
        assert np.array_equal(np.asarray(nib.load(first[key]).dataobj), np.asarray(nib.load(second[key]).dataobj)), key


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


def test_shipped_disyre_finds_dark_spheres_in_a_preprocessed_real_head(cohort, tmp_path):
    """The whole real path with the shipped weights: raw IXI head -> `medad preprocess` -> 3 dark spheres
    (`scripts/make_lesion_testset.py`'s kind) -> `evaluate --run_dir bundles/disyre --test_dir ...`.

    IXI012 is one of the shipped model's training heads, so this guards the pipeline (a bug that destroys detection
    but keeps shapes fails here); the accuracy on held-out heads is docs/results.md's."""
    import json

    import torch

    from medad import bundle
    from medad.corruptions.spheres import insert_spheres

    paths = case_outputs(cohort["output"], IXI_CASE)
    image_nii, brain_nii = nib.load(paths["image"]), nib.load(paths["brain_mask"])
    image = torch.from_numpy(np.asarray(image_nii.dataobj, dtype=np.float32))[None]
    brain = torch.from_numpy((np.asarray(brain_nii.dataobj) > 0).astype(np.float32))[None]
    lesioned, mask = insert_spheres(image, brain, count=3, kind="dark", generator=torch.Generator().manual_seed(0))
    for folder, array, like, name in (("images", lesioned, image_nii, IXI_CASE), ("masks", mask, image_nii, f"{IXI_CASE}_mask"),
                                      ("brain_masks", brain, brain_nii, f"{IXI_CASE}_brain_mask")):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array[0].numpy(), like.affine), str(tmp_path / folder / f"{name}.nii.gz"))
    repo = Path(__file__).resolve().parents[1]
    # the fast profile (3 whole-slice steps): ~80 slices of a 2 mm head at the shipped model's 2 mm grid
    bundle.run(repo / "bundles" / "disyre", "evaluate", run_dir=str(repo / "bundles" / "disyre"),
               test_dir=str(tmp_path / "images"), test_mask_dir=str(tmp_path / "masks"),
               brain_mask_dir=str(tmp_path / "brain_masks"), output_dir=str(tmp_path / "eval"), save_maps="none",
               extra_configs=[str(repo / "bundles" / "disyre" / "configs" / "fast.json")], num_overlays=0,
               **{"evaluator#progress": False})
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 1
    # measured 2026-12-02 with these spheres, fast profile, 3D-smoothed map: pixel AUROC 1.000, AP 0.955, best Dice
    # 0.868 (2026-12-01, unsmoothed: 0.998 / 0.813 / 0.736; the 4 mm session-6 model, paper profile: 0.977 / 0.792 /
    # 0.780); the model shipped before session 5 (foreign patch only) gave AUROC ~0.5 on dark spheres: the bounds
    # separate a detecting model from a broken path
    assert metrics["pixel_auroc"] >= 0.95 and metrics["pixel_ap"] >= 0.5
