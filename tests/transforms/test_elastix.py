"""The elastix registration backend (issue #13) on one IXI head, run as ``medad preprocess --registration-backend
elastix`` while ANTsPy cannot be imported (a site without ANTsPy): registration quality, the stored transform
against elastix's own transformix, the forward-then-inverse round trip, native-space maps (skips without
itk-elastix, deepbet or ``../shared/data``).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.helpers import IXI_CASE, ixi_cohort_input

sitk = pytest.importorskip("SimpleITK")
# ITK's SWIG wrappers warn about their own types on import (nothing medad can change)
pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")
HAS_ITK = importlib.util.find_spec("itk") is not None


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_preprocess_without_ants_needs_elastix_backend(tmp_path, monkeypatch, capsys):
    # backend 'ants' without ANTsPy: one sentence that names the other backend
    from medad.cli import main

    monkeypatch.setitem(sys.modules, "ants", None)
    (tmp_path / "in").mkdir()
    code = main(["preprocess", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--registration-backend", "ants"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert "--registration-backend elastix" in message and "ANTsPy" in message
    sentence = message.split(" (rerun with --debug")[0]  # the CLI's hint follows the error's own sentence
    assert sentence.endswith(".") and sentence.count(". ") == 0


# The elastix backend, end to end on one IXI head without ANTsPy
# ------------------------------------------------------------------------------------------
def _has_elastix() -> bool:
    return HAS_ITK and importlib.util.find_spec("itk.ElastixPython") is not None


@pytest.fixture(scope="module")
def elastix_cohort(ixi_dir, tmp_path_factory):
    if not _has_elastix():
        pytest.skip("itk-elastix is not installed (pip install \"medad[elastix]\")")
    if importlib.util.find_spec("deepbet") is None:
        pytest.skip("deepbet is not installed")
    root = tmp_path_factory.mktemp("elastix_cohort")
    source = ixi_cohort_input(ixi_dir, root)
    output = root / "output"
    from medad.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "ants", None)  # a site without ANTsPy: `import ants` fails, find_spec gives None
        code = main(["preprocess", "--input", str(root / "input"), "--output", str(output),
                     "--registration-backend", "elastix"])
    return {"output": output, "source": source, "code": code, "case": output / "transforms" / IXI_CASE}


def test_elastix_preprocess_runs_without_ants(elastix_cohort):
    assert elastix_cohort["code"] == 0
    log = pd.read_csv(elastix_cohort["output"] / "preprocess_log.csv")
    row = log.iloc[0]
    assert row["status"] == "ok" and row["registration_backend"] == "elastix"
    record = json.loads((elastix_cohort["case"] / "registration.json").read_text(encoding="utf-8"))
    assert record["backend"] == "elastix"
    assert record["template_transforms"] == record["inverse_transforms"] == ["0GenericAffine.mat"]
    assert record["inverse_whichtoinvert"] == [True]
    assert (elastix_cohort["case"] / "TransformParameters.0.txt").is_file()


def test_elastix_brain_mask_matches_template(elastix_cohort):
    from medad.data import load_mni152

    out = elastix_cohort["output"]
    registered = np.asarray(nib.load(out / "brain_masks" / f"{IXI_CASE}_brain_mask.nii.gz").dataobj)
    assert _dice(registered, load_mni152(2)[1]) >= 0.93  # measured 0.958 (ANTs 0.959)


def test_stored_transform_equals_transformix(elastix_cohort):
    # the affine written for SimpleITK/ANTs resamples exactly as elastix's own transformix does
    import itk

    from medad.data import load_mni152
    from medad.transforms.mri import apply_forward_transform

    parameters = itk.ParameterObject.New()
    parameters.ReadParameterFile(str(elastix_cohort["case"] / "TransformParameters.0.txt"))
    parameters.SetParameter(0, "ResampleInterpolator", "FinalLinearInterpolator")
    moving = itk.imread(str(elastix_cohort["source"]), itk.F)
    reference = itk.array_from_image(itk.transformix_filter(moving, parameters)).transpose(2, 1, 0)
    mine = apply_forward_transform(elastix_cohort["source"], elastix_cohort["case"])[0].numpy()
    brain = load_mni152(2)[1]
    assert mine.shape == reference.shape
    assert np.abs(mine - reference)[brain].max() <= 1e-3 * np.abs(reference[brain]).max()


def test_elastix_transforms_round_trip(elastix_cohort):
    # template -> native -> template (the brain mask) and native -> template -> native (a blob)
    from medad.transforms.mri import apply_forward_transform, apply_inverse_transform

    case, out = elastix_cohort["case"], elastix_cohort["output"]
    mask_path = out / "brain_masks" / f"{IXI_CASE}_brain_mask.nii.gz"
    template_mask = np.asarray(nib.load(mask_path).dataobj) > 0
    native = apply_inverse_transform(mask_path, case, "nearestNeighbor")
    assert tuple(native.shape[1:]) == nib.load(elastix_cohort["source"]).shape
    np.testing.assert_allclose(native.affine.numpy(), nib.load(elastix_cohort["source"]).affine, atol=1e-4)
    again = apply_forward_transform(native, case)[0].numpy() > 0.5
    assert _dice(again, template_mask) >= 0.95
    shape = native.shape[1:]
    centre = np.argwhere(native[0].numpy() > 0).mean(0)
    blob = ((np.indices(shape) - centre[:, None, None, None]) ** 2).sum(0) <= 6.0**2
    back = apply_inverse_transform(apply_forward_transform(blob.astype(np.float32), case), case)[0].numpy() > 0.5
    assert _dice(back, blob) >= 0.95


def test_elastix_native_space_map(elastix_cohort):
    # what the evaluator does for a case with a record: the template-space map onto the patient's file grid
    from medad.engine import to_native_space

    out = elastix_cohort["output"]
    image = nib.load(out / "images" / f"{IXI_CASE}.nii.gz")
    native_map, native_affine = to_native_space(np.asarray(image.dataobj), image.affine,
                                                elastix_cohort["case"] / "registration.json")
    source = nib.load(elastix_cohort["source"])
    assert native_map.shape == source.shape
    np.testing.assert_allclose(native_affine, source.affine, atol=1e-4)
    inside = native_map > 0.05
    assert 900 < inside.sum() * 8 / 1000 < 2200  # brain volume (ml) on the 2 mm native grid
    assert np.corrcoef(native_map[inside], np.asarray(source.dataobj, np.float32)[inside])[0, 1] > 0.7


def test_atlas_skull_strip_with_elastix_agrees_with_deepbet(elastix_cohort):
    from medad.transforms.mri import (
        N4BiasCorrectiond,
        ReorientToCanonicald,
        SkullStripd,
        apply_inverse_transform,
        load_volume,
    )

    out = elastix_cohort["output"]
    d = N4BiasCorrectiond()(ReorientToCanonicald()({"image": load_volume(elastix_cohort["source"])}))
    native = apply_inverse_transform(out / "brain_masks" / f"{IXI_CASE}_brain_mask.nii.gz", elastix_cohort["case"],
                                     "nearestNeighbor")
    deepbet = nib.as_closest_canonical(nib.Nifti1Image(native[0].numpy(), native.affine.numpy())).get_fdata()
    atlas = SkullStripd(backend="atlas", registration_backend="elastix")(d)["brain_mask"][0].numpy()
    assert _dice(atlas, deepbet) >= 0.9  # measured 0.947-0.954 against deepbet's own mask on 4 heads


def test_elastix_rejects_syn():
    if not _has_elastix():
        pytest.skip("itk-elastix is not installed")
    from medad.transforms.mri import RegisterToTemplated

    with pytest.raises(ValueError, match="needs --registration-backend ants"):
        RegisterToTemplated(transform="syn", backend="elastix")


def test_simpleitk_applies_an_ants_affine_record_as_ants_does(tmp_path, monkeypatch):
    # the SimpleITK path (elastix records, and ANTs affine records where ANTsPy is missing) equals antsApplyTransforms
    ants = pytest.importorskip("ants")
    from scipy import ndimage

    import medad.transforms.mri as mri

    rotation = sitk.Euler3DTransform((0, 0, 0), 0.1, -0.05, 0.2).GetMatrix()
    transform = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                           matrix=np.reshape(rotation, (3, 3)) * 1.05, translation=(3.0, -2.0, 1.5),
                                           center=(4.0, 1.0, -2.0))
    ants.write_transform(transform, str(tmp_path / "0GenericAffine.mat"))
    native_affine = np.array([[0.0, 0.0, 2.0, -20.0], [-2.0, 0.0, 0.0, 24.0], [0.0, 2.0, 0.0, -18.0], [0, 0, 0, 1]])
    record = {"template_affine": np.diag([2.2, 2.2, 2.2, 1.0]).tolist(), "template_spatial_shape": [20, 22, 18],
              "native_affine": native_affine.tolist(), "native_spatial_shape": [22, 20, 18],
              "template_transforms": ["0GenericAffine.mat"], "inverse_transforms": ["0GenericAffine.mat"],
              "inverse_whichtoinvert": [True], "backend": "ants"}
    (tmp_path / "registration.json").write_text(json.dumps(record))
    volume = ndimage.gaussian_filter(np.random.default_rng(0).random((22, 20, 18)), 2).astype(np.float32)
    by_ants = mri.apply_forward_transform(volume, tmp_path)
    back_ants = mri.apply_inverse_transform(by_ants, tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(mri.importlib.util, "find_spec",
                        lambda name, *args: None if name == "ants" else real_find_spec(name, *args))
    by_sitk = mri.apply_forward_transform(volume, tmp_path)
    back_sitk = mri.apply_inverse_transform(by_sitk, tmp_path)
    inner = (slice(0, None), slice(3, -3), slice(3, -3), slice(3, -3))  # the grid borders may differ by half a voxel
    assert float(by_ants[inner].abs().max()) > 0.1
    np.testing.assert_allclose(by_sitk[inner].numpy(), by_ants[inner].numpy(), atol=1e-4)
    np.testing.assert_allclose(back_sitk[inner].numpy(), back_ants[inner].numpy(), atol=1e-4)
    np.testing.assert_allclose(by_sitk.affine.numpy(), by_ants.affine.numpy(), atol=1e-5)


def test_elastix_conversion_of_an_euler_map_matches_simpleitk():
    # elastix's EulerTransform parameters -> the stored affine, without running elastix
    from medad.transforms.elastix import _to_sitk_affine, affine_matrix

    parameters = {"Transform": ["EulerTransform"], "TransformParameters": ["0.1", "-0.2", "0.3", "4", "5", "-6"],
                  "CenterOfRotationPoint": ["1.5", "-2", "3"]}
    affine = _to_sitk_affine(parameters)
    euler = sitk.Euler3DTransform((1.5, -2.0, 3.0), 0.1, -0.2, 0.3, (4.0, 5.0, -6.0))
    for point in [(0.0, 0.0, 0.0), (10.0, -20.0, 30.0)]:
        np.testing.assert_allclose(affine.TransformPoint(point), euler.TransformPoint(point), atol=1e-9)
    homogeneous = affine_matrix(affine) @ np.array([10.0, -20.0, 30.0, 1.0])
    np.testing.assert_allclose(homogeneous[:3], euler.TransformPoint((10.0, -20.0, 30.0)), atol=1e-9)
