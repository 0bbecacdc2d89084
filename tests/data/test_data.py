"""Tests of medad.data: MVTec/NIfTI datalists, loading transforms, demo data generators."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medad.data import (
    MARKER_NAME,
    ScalePercentilesInMaskd,
    demo_root,
    image_transforms,
    make_demo_mri,
    make_demo_mvtec,
    mvtec_datalist,
    nifti_datalist,
    split_train_val,
    volume_transforms,
)

H, W = 20, 30  # non-square on purpose: catches (W, H) transposition


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _top_row_rgb() -> np.ndarray:
    image = np.full((H, W, 3), 40, np.uint8)
    image[0] = 255  # bright top row
    return image


@pytest.fixture()
def fake_mvtec(tmp_path: Path) -> Path:
    """A tiny MVTec AD tree: RGB, gray and 16-bit training images, two defects, one VisA-style mask."""
    category = tmp_path / "widget"
    _png(category / "train/good/000.png", _top_row_rgb())
    _png(category / "train/good/001.png", np.full((H, W), 128, np.uint8))
    _png(category / "train/good/002.png", np.full((H, W), 32768, np.uint16))
    _png(category / "test/good/000.png", _top_row_rgb())
    mask = np.zeros((H, W), np.uint8)
    mask[:3, :4] = 255  # top-left corner
    _png(category / "test/crack/000.png", _top_row_rgb())
    _png(category / "ground_truth/crack/000_mask.png", mask)
    _png(category / "test/stain/007.png", _top_row_rgb())
    _png(category / "ground_truth/stain/007.png", mask)  # VisA-converted naming
    return category


# ------------------------------------------------------------------ MVTec datalist


def test_mvtec_datalist_fake_tree(fake_mvtec: Path):
    train = mvtec_datalist(fake_mvtec.parent, "widget", "train")
    assert [i["case_id"] for i in train] == ["good/000", "good/001", "good/002"]
    assert all(i["label"] == 0 and i["mask"] is None and i["defect"] == "good" for i in train)
    test = mvtec_datalist(fake_mvtec, None, "test")  # category=None: root is the category folder
    assert [(i["case_id"], i["label"]) for i in test] == [("crack/000", 1), ("good/000", 0), ("stain/007", 1)]
    assert test[0]["mask"].endswith("ground_truth/crack/000_mask.png")
    assert test[2]["mask"].endswith("ground_truth/stain/007.png")
    assert test[1]["mask"] is None


def test_mvtec_datalist_errors(fake_mvtec: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mvtec_datalist(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "train/good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found in .*expected MVTec AD layout train/good"):
        mvtec_datalist(empty)
    (fake_mvtec / "ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 defect image\(s\) have no mask: \S*test/crack/000\.png"):
        mvtec_datalist(fake_mvtec, split="test")
    with pytest.raises(ValueError, match="split"):
        mvtec_datalist(fake_mvtec, split="val")


def test_mvtec_datalist_real_bottle(mvtec_bottle: Path):
    train = mvtec_datalist(mvtec_bottle, split="train")
    test = mvtec_datalist(mvtec_bottle.parent, "bottle", split="test")
    assert len(train) == 209
    assert len(test) == 83
    assert sum(i["mask"] is not None for i in test) == 63 == sum(i["label"] for i in test)
    assert {i["defect"] for i in test} == {"good", "broken_large", "broken_small", "contamination"}


def test_split_train_val():
    items = [{"case_id": str(i)} for i in range(20)]
    train, val = split_train_val(items, 0.25, seed=3)
    assert len(train) == 15 and len(val) == 5
    assert {i["case_id"] for i in train}.isdisjoint(i["case_id"] for i in val)
    assert split_train_val(items, 0.25, seed=3) == (train, val)
    assert split_train_val(items, 0.25, seed=4)[1] != val
    assert val == sorted(val, key=lambda i: int(i["case_id"]))  # original order kept
    assert split_train_val(items, 0.0) == (items, [])
    with pytest.raises(ValueError):
        split_train_val(items, 1.0)


# ------------------------------------------------------------------ 2D transforms


def test_image_transforms_shape_range_orientation(fake_mvtec: Path):
    test = mvtec_datalist(fake_mvtec, split="test")
    out = image_transforms((10, 15), channels=3)(test[0])
    image, mask = out["image"], out["mask"]
    assert image.shape == (3, 10, 15) and mask.shape == (1, 10, 15)
    assert image.dtype == torch.float32 and mask.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # H is the rows: the bright top row stays on top (averaged with the next by the 2x box shrink);
    # flat regions keep their value exactly, borders included.
    assert torch.allclose(image[:, 0], torch.full((3, 15), (255 + 40) / 2 / 255))
    assert torch.allclose(image[:, -1], torch.full((3, 15), 40 / 255))
    same_size = image_transforms((H, W), channels=3)(test[0])["image"]
    assert same_size.shape == (3, H, W)
    assert torch.allclose(same_size[:, 0], torch.ones(3, W))
    assert torch.allclose(same_size[:, 1:], torch.full((3, H - 1, W), 40 / 255))
    # The mask's top-left 3x4 corner of 20x30 becomes the top-left 2x2 (nearest) of 10x15.
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, :2, :2].all() and float(mask.sum()) == 4.0
    good = image_transforms(16, channels=3)(test[1])
    assert good["mask"].shape == (1, 16, 16) and float(good["mask"].sum()) == 0.0


def test_image_transforms_dtype_scaling_and_channels(fake_mvtec: Path):
    train = mvtec_datalist(fake_mvtec, split="train")
    rgb_to_gray = image_transforms((H, W), channels=1)
    gray_to_rgb = image_transforms((H, W), channels=3)
    # 8-bit gray 128 -> 128/255, repeated to 3 channels; 16-bit 32768 -> 32768/65535 (dtype range,
    # not the per-image min/max, which would give 0 for a constant image).
    eight = gray_to_rgb(train[1])["image"]
    assert eight.shape == (3, H, W) and torch.allclose(eight, torch.full_like(eight, 128 / 255))
    sixteen = gray_to_rgb(train[2])["image"]
    assert torch.allclose(sixteen, torch.full_like(sixteen, 32768 / 65535))
    # RGB (40, 40, 40) with a white top row -> luma of a gray is the gray itself.
    gray = rgb_to_gray(train[0])["image"]
    assert gray.shape == (1, H, W) and torch.allclose(gray[0, 1:], torch.full((H - 1, W), 40 / 255), atol=1e-6)


def test_rgb_to_gray_luma(tmp_path: Path):
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255
    out = image_transforms((4, 6), channels=1)({"image": str(_png(tmp_path / "red.png", red)), "mask": None})
    assert torch.allclose(out["image"], torch.full((1, 4, 6), 0.299), atol=1e-6)


def test_mask_size_mismatch_names_file(tmp_path: Path):
    image = _png(tmp_path / "a.png", np.zeros((H, W), np.uint8))
    mask = _png(tmp_path / "a_mask.png", np.zeros((W, H), np.uint8))
    with pytest.raises(RuntimeError) as error:  # MONAI's Compose wraps the transform's error
        image_transforms(8, channels=1)({"image": str(image), "mask": str(mask)})
    assert isinstance(error.value.__cause__, ValueError)
    assert f"mask {mask} has size (30, 20) but its image has size (20, 30)" in str(error.value.__cause__)


def test_augmentation_moves_image_and_mask_together(tmp_path: Path):
    pattern = np.zeros((16, 16), np.uint8)
    pattern[2:7, 3:12] = 255  # asymmetric, so every flip/rotation changes it
    path = str(_png(tmp_path / "p.png", pattern))
    mask = str(_png(tmp_path / "p_mask.png", pattern))
    exact = image_transforms(16, channels=1, augment=True, rotate90=True, flips=True)
    exact.set_random_state(seed=1)
    changed = 0
    for _ in range(6):
        out = exact({"image": path, "mask": mask})
        assert torch.equal((out["image"] > 0.5).float(), out["mask"])  # 90-degree turns and flips are exact
        changed += not torch.equal(out["mask"][0], torch.from_numpy(pattern > 0).float())
    assert changed > 0
    rotating = image_transforms(16, channels=1, augment=True, flips=False, rotate_degrees=30)
    rotating.set_random_state(seed=2)
    for _ in range(4):
        out = rotating({"image": path, "mask": mask})
        agreement = ((out["image"] > 0.5).float() == out["mask"]).float().mean()
        assert agreement > 0.95  # only interpolated edge pixels may differ
    with pytest.raises(ValueError, match="square"):
        image_transforms((16, 24), augment=True, rotate90=True)


# ------------------------------------------------------------------ NIfTI datalist and transforms


def _nii(path: Path, data: np.ndarray, spacing: float = 2.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), path)
    return path


def test_nifti_datalist_matching_rules(tmp_path: Path):
    volume = np.zeros((4, 4, 4), np.float32)
    images, masks, brains = tmp_path / "images", tmp_path / "masks", tmp_path / "brains"
    for name in ("sub-1_T1w", "sub-10_T1w", "case3", "sub-4_T1w"):
        _nii(images / f"{name}.nii.gz", volume)
    _nii(images / "case3_seg.nii.gz", volume)  # a mask next to the images is not an image
    _nii(masks / "sub-1_lesion.nii.gz", volume)  # rule 2: base is a prefix of the image name
    _nii(masks / "sub-10_T1w_desc-lesion_mask.nii.gz", volume)  # rule 3: image name is a prefix
    _nii(masks / "case3_mask.nii.gz", volume)  # rule 1: exact
    _nii(masks / "sub-4_T1w_brain_mask.nii.gz", volume)  # a brain mask is never a lesion mask
    _nii(brains / "sub-1_T1w_brain_mask.nii.gz", volume)
    items = {i["case_id"]: i for i in nifti_datalist(images, masks, brain_mask_dir=brains)}
    assert sorted(items) == ["case3", "sub-10_T1w", "sub-1_T1w", "sub-4_T1w"]
    assert items["sub-1_T1w"]["mask"].endswith("sub-1_lesion.nii.gz")
    assert items["sub-10_T1w"]["mask"].endswith("sub-10_T1w_desc-lesion_mask.nii.gz")
    assert items["case3"]["mask"].endswith("masks/case3_mask.nii.gz")
    assert items["sub-4_T1w"]["mask"] is None and items["sub-4_T1w"]["label"] == 0
    assert items["sub-1_T1w"]["brain_mask"].endswith("sub-1_T1w_brain_mask.nii.gz")
    assert items["sub-10_T1w"]["brain_mask"] is None
    assert [items[k]["label"] for k in ("case3", "sub-10_T1w", "sub-1_T1w")] == [1, 1, 1]
    with pytest.raises(FileNotFoundError, match="sub-4_T1w.nii.gz has no mask"):
        nifti_datalist(images, masks, require_masks=True)
    _nii(masks / "sub-1_T1w_seg.nii.gz", volume)  # exact match wins over the prefix match
    assert nifti_datalist(images, masks)[2]["mask"].endswith("sub-1_T1w_seg.nii.gz")
    _nii(masks / "sub-10_label.nii.gz", volume)  # shorter base: the more specific mask still wins
    assert nifti_datalist(images, masks)[1]["mask"].endswith("sub-10_T1w_desc-lesion_mask.nii.gz")
    _nii(masks / "sub-10_T1w_desc-lesiox_mask.nii.gz", volume)  # as specific: ambiguous
    with pytest.raises(ValueError, match="several mask files"):
        nifti_datalist(images, masks)
    with pytest.raises(FileNotFoundError, match="no images found"):
        nifti_datalist(masks, image_glob="*.nii.gz")


def test_scale_percentiles_in_mask_closed_form():
    image = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)
    brain = torch.zeros_like(image)
    brain[0, 1] = 1  # voxels 4..7
    out = ScalePercentilesInMaskd("image", lower=0, upper=100)({"image": image, "brain_mask": brain})["image"]
    expected = torch.tensor([0, 0, 0, 0, 0, 1 / 3, 2 / 3, 1], dtype=torch.float32).reshape(1, 2, 2, 2)
    assert torch.allclose(out, expected)


# ------------------------------------------------------------------ demo data


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }


MVTEC_QUICK = dict(num_train=4, num_test_good=2, num_test_defect=8, image_size=32)


def test_demo_mvtec_layout_masks_and_determinism(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    first = make_demo_mvtec(tmp_path / "a", seed=0, **MVTEC_QUICK)
    assert first == tmp_path / "a" / "demo_texture"
    again = make_demo_mvtec(tmp_path / "b", seed=0, **MVTEC_QUICK)
    other = make_demo_mvtec(tmp_path / "c", seed=1, **MVTEC_QUICK)
    assert _digest(first) == _digest(again)
    assert _digest(first).keys() == _digest(other).keys() and _digest(first) != _digest(other)

    train, test = mvtec_datalist(first, split="train"), mvtec_datalist(first, split="test")
    assert len(train) == 4 and len(test) == 10
    assert {i["defect"] for i in test} == {"good", "scratch", "hole", "stain", "missing_part"}
    for item in test:
        if item["label"]:
            mask = np.asarray(Image.open(item["mask"]))
            assert set(np.unique(mask)) == {0, 255} and (mask > 0).sum() >= 4
            image = np.asarray(Image.open(item["image"]), dtype=np.float64)
            assert image.shape == (32, 32, 3)
        else:
            assert item["mask"] is None
    # Complete folder: not rewritten; other parameters: rebuilt.
    stamp = (first / "train/good/000.png").stat().st_mtime_ns
    assert make_demo_mvtec(tmp_path / "a", seed=0, **MVTEC_QUICK) == first
    assert (first / "train/good/000.png").stat().st_mtime_ns == stamp
    with caplog.at_level(logging.WARNING, logger="medad.data.demo"):
        make_demo_mvtec(tmp_path / "a", seed=0, **{**MVTEC_QUICK, "num_train": 3})
    assert len(mvtec_datalist(first)) == 3
    # never silently: the folder held other data than the run will now use
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'a' / 'demo_texture'}: replacing the demo data made with other settings (num_train: 4 -> 3) "
        "by new demo data."]


def test_demo_mvtec_object_and_refuses_foreign_folder(tmp_path: Path):
    folder = make_demo_mvtec(tmp_path, category="disc", pattern="object", **MVTEC_QUICK)
    assert len(mvtec_datalist(folder, split="test")) == 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a medad demo folder"):
        make_demo_mvtec(tmp_path, category="mine", **MVTEC_QUICK)


def test_demo_root_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDAD_DATA_DIR", str(tmp_path))
    root = demo_root("mvtec", seed=0)
    assert root.parent == tmp_path / "demo" and root.name.startswith("mvtec_")
    assert demo_root("mvtec", seed=0) == root != demo_root("mvtec", seed=1)


@pytest.fixture(scope="module")
def demo_mri(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_mri(tmp_path_factory.mktemp("mri") / "demo", num_train=1, num_test=2, seed=0, spacing_mm=6.0)


def test_demo_mri_layout_affine_lesions(demo_mri: Path):
    items = nifti_datalist(demo_mri / "test", demo_mri / "test_masks", brain_mask_dir=demo_mri / "brain_masks")
    assert [i["case_id"] for i in items] == ["test_000", "test_001"]
    assert all(i["mask"] and i["brain_mask"] and i["label"] == 1 for i in items)
    for item in items:
        image = nib.load(item["image"])
        assert np.allclose(image.header.get_zooms(), 6.0)
        assert np.allclose(np.abs(np.diag(image.affine)[:3]), 6.0)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        data = np.asarray(image.dataobj)
        brain = np.asarray(nib.load(item["brain_mask"]).dataobj) > 0
        lesion = np.asarray(nib.load(item["mask"]).dataobj) > 0
        assert data.min() >= 0 and data.max() <= 1 and not data[~brain].any()
        assert lesion.sum() > 0 and not (lesion & ~brain).any()
    train = nifti_datalist(demo_mri / "train", brain_mask_dir=demo_mri / "brain_masks")
    assert len(train) == 1 and train[0]["mask"] is None and train[0]["label"] == 0
    out = volume_transforms()(items[0])
    assert out["image"].shape == out["mask"].shape == out["brain_mask"].shape
    assert out["image"].shape[0] == 1 and np.allclose(np.diag(out["image"].affine)[:3], 6.0)
    assert float(out["mask"].sum()) == float((np.asarray(nib.load(items[0]["mask"]).dataobj) > 0).sum())


def test_lesions_inside_brain_and_altered():
    from medad.data.demo import _add_lesions

    grid = np.indices((24, 24, 24)) - 11.5
    brain = (grid**2).sum(0) <= 10.5**2
    flat = np.where(brain, 0.5, 0.0)
    for seed in range(4):
        image, lesion = _add_lesions(np.random.default_rng(seed), flat, brain, spacing=2.0)
        assert lesion.any() and not (lesion & ~brain).any()
        # Where the soft weight is > 0.5, the value moved more than half-way from 0.5 to a target in
        # [0.95, 1] (bright) or [0.1, 0.25] (dark): more than 0.125 away from 0.5.
        assert np.all(np.abs(image[lesion] - 0.5) > 0.125)
        assert np.array_equal(image[~brain], flat[~brain])


def test_demo_mri_deterministic(demo_mri: Path, tmp_path: Path):
    again = make_demo_mri(tmp_path / "again", num_train=1, num_test=2, seed=0, spacing_mm=6.0)
    assert _digest(again) == _digest(demo_mri)
    other = make_demo_mri(tmp_path / "other", num_train=1, num_test=0, seed=1, spacing_mm=6.0)
    a = np.asarray(nib.load(other / "train/train_000.nii.gz").dataobj)
    b = np.asarray(nib.load(demo_mri / "train/train_000.nii.gz").dataobj)
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_volume_transforms_reorients_real_volume(ixi_dir: Path):
    item = nifti_datalist(ixi_dir)[0]
    assert item["mask"] is None and item["label"] == 0
    stored = nib.load(item["image"])  # stored sagittal-first (P, S, R)
    out = volume_transforms(intensity=None)(item)
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("R", "A", "S")
    assert sorted(out["image"].shape[1:]) == sorted(stored.shape)
    assert float(out["image"].sum()) == pytest.approx(float(np.asarray(stored.dataobj, np.float64).sum()), rel=1e-6)
    assert float(out["mask"].sum()) == 0.0


def _save(path: Path, array: np.ndarray, spacing: float = 1.0) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return str(path)



def test_downsampling_is_anti_aliased(tmp_path):
    # a 1 mm checkerboard (mean 0.5) sampled every 2 mm without a low-pass filter aliases to a constant 0 (or 1);
    # skimage's sigma = (zoom - 1) / 2 pre-filter keeps the 2 mm volume much closer to the true local mean
    checker = (np.indices((32, 32, 32)).sum(0) % 2).astype(np.float32)
    item = {"image": _save(tmp_path / "checker.nii.gz", checker)}
    filtered = volume_transforms(pixdim=2.0, intensity=None)(item)["image"]
    aliased = volume_transforms(pixdim=2.0, intensity=None, anti_aliasing=False)(item)["image"]
    assert tuple(filtered.shape[1:]) == tuple(aliased.shape[1:]) == (16, 16, 16)
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert abs(float(aliased[inner].mean()) - 0.5) > 0.4
    assert abs(float(filtered[inner].mean()) - 0.5) < 0.25 * abs(float(aliased[inner].mean()) - 0.5)
    assert float(filtered[inner].std()) < 0.05
    # a grid that gets finer is not filtered
    assert torch.equal(volume_transforms(pixdim=0.5, intensity=None)(item)["image"],
                       volume_transforms(pixdim=0.5, intensity=None, anti_aliasing=False)(item)["image"])


def test_missing_brain_mask_is_derived_before_resampling(tmp_path):
    # A skull-stripped 4 mm volume without a brain-mask file, scored on a 2 mm grid: its brain mask must be the
    # file's non-zero voxels resampled (nearest), not ``image != 0`` after trilinear upsampling, which grows a rim
    # of half-zero voxels around the brain (and scores them as brain).
    image = np.zeros((16, 16, 16), np.float32)
    image[4:12, 4:12, 4:12] = np.random.default_rng(0).uniform(0.5, 1.0, (8, 8, 8))
    item = {"image": _save(tmp_path / "head.nii.gz", image, spacing=4.0), "mask": None, "brain_mask": None}
    out = volume_transforms(pixdim=2.0, intensity=None)(item)
    brain = out["brain_mask"][0] > 0
    given_mask = {**item, "brain_mask": _save(tmp_path / "head_brain.nii.gz", (image != 0).astype(np.float32), 4.0)}
    assert torch.equal(brain, volume_transforms(pixdim=2.0, intensity=None)(given_mask)["brain_mask"][0] > 0)
    # 8 voxels of 4 mm = 32 mm = 16 voxels of 2 mm per axis (± one at the nearest-neighbour ties)
    extent = [int(brain.any(dim=tuple(j for j in range(3) if j != axis)).sum()) for axis in range(3)]
    assert all(15 <= e <= 17 for e in extent), extent
    rim = (out["image"][0] != 0) & ~brain
    assert rim.sum() > 0 and float(out["image"][0][rim].max()) < 1.0  # the upsampled rim exists but is not brain
