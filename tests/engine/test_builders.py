"""Loader builders (medad.engine.builders) on MRI: DISYRE's official training augmentation runs on
training batches only, and a test volume outside the training space is named in a warning (issue #11 items 3 and 7).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medad.engine.builders import volume_loaders
from medad.transforms.augment import AugmentingCollate
from medad.transforms.mri import (
    CheckBrainGeometryd,
    brain_geometry,
    brain_geometry_range,
)


def _save(path: Path, array: np.ndarray, spacing: float = 1.0) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return str(path)


def _ball(shape: int, radius: float) -> np.ndarray:
    grid = np.indices((shape,) * 3) - (shape - 1) / 2
    return ((grid**2).sum(0) <= radius**2).astype(np.float32)


def test_official_augmentation_runs_on_the_training_batches_only(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        _save(train / f"h{i}.nii.gz", _ball(24, 9.0) * 0.7)
    kwargs = {"intensity": None, "slices_per_volume": 4, "batch_size": 2, "val_fraction": 0.34, "cache": False}
    plain = volume_loaders(train, **kwargs)
    augmented = volume_loaders(train, augment=True, **kwargs)
    assert isinstance(augmented["train"].collate_fn, AugmentingCollate)
    assert not isinstance(augmented["val"].collate_fn, AugmentingCollate)  # calibration volumes stay as they are
    torch.manual_seed(0)
    reference = next(iter(plain["train"]))
    augmented["train"].collate_fn.augmentation.set_random_state(seed=1)
    changed = 0
    for _ in range(5):
        torch.manual_seed(0)
        batch = next(iter(augmented["train"]))
        assert batch["image"].shape == reference["image"].shape == (8, 1, 24, 24)
        assert set(torch.unique(batch["brain_mask"]).tolist()) <= {0.0, 1.0}
        assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
        changed += int(not torch.equal(batch["image"], reference["image"]))
    assert changed >= 4  # with 8 slices a batch, almost every batch has a mirrored or intensity-changed slice


def test_test_volume_outside_the_training_space_is_named_in_a_warning(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    for i, radius in enumerate((10.0, 10.3, 10.6)):
        ball = _ball(28, radius)
        _save(train / f"h{i}.nii.gz", ball * (0.5 + 0.1 * i))
    _save(test / "same_space.nii.gz", _ball(28, 10.2) * 0.6)
    _save(test / "other_pipeline.nii.gz", _ball(28, 10.2) * 0.6, spacing=1.15)  # 15 % larger in every direction

    loaders = volume_loaders(train, test_dir=test, intensity=None, slices_per_volume=2, batch_size=2,
                             val_fraction=0.34, cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases = {Path(b["image"].meta["filename_or_obj"][0]).name: b for b in loaders["test"]}
    assert set(cases) == {"same_space.nii.gz", "other_pipeline.nii.gz"}
    messages = [str(w.message) for w in caught if "medad preprocess" in str(w.message)]
    assert len(messages) == 1
    assert "other_pipeline.nii.gz" in messages[0] and "brain volume" in messages[0]

    # a model on a finer grid: the brains are measured as the files hold them, not after linear upsampling (whose
    # `image > 0` grows by a rim: the in-space ball measured ~15 % too large and warned, as the other one does)
    largest = tmp_path / "largest"
    largest.mkdir()
    _save(largest / "as_large_as_the_largest.nii.gz", _ball(28, 10.6) * 0.6)
    fine = volume_loaders(train, test_dir=largest, intensity=None, pixdim=(0.5, 0.5, 0.5), slices_per_volume=2,
                          batch_size=2, val_fraction=0.34, cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(list(fine["test"])) == 1
    assert not [w for w in caught if "medad preprocess" in str(w.message)]

    reference = brain_geometry_range([{"image": str(p)} for p in sorted(train.iterdir())])
    assert reference["num_cases"] == 3
    check = CheckBrainGeometryd("brain_mask", reference, tolerance=0.1)
    assert check.problems(brain_geometry(_ball(28, 10.2), np.eye(4))) == []
    assert [p.split()[0] for p in check.problems(brain_geometry(_ball(28, 10.2), np.diag([1.15] * 3 + [1])))] == ["brain"]
    assert len(check.problems(brain_geometry(_ball(28, 10.2), np.diag([1.3] * 3 + [1])))) == 4  # volume + 3 extents


def test_without_a_training_set_the_test_volumes_asked_for_are_used_not_the_demo(tmp_path):
    # a shipped model's run has no dataset_dir: `--workflow evaluate --run_dir bundles/<m> --test_dir T` must score
    # T (the demo only stands in for the training set); before, the demo's test subjects were scored silently
    test, masks = tmp_path / "mine", tmp_path / "mine_masks"
    test.mkdir()
    masks.mkdir()
    _save(test / "patient.nii.gz", _ball(28, 10.0) * 0.6, spacing=4.0)
    _save(masks / "patient_mask.nii.gz", _ball(28, 3.0), spacing=4.0)
    loaders = volume_loaders(None, test_dir=test, test_mask_dir=masks, demo_dir=tmp_path / "demo", intensity=None,
                             demo_kwargs={"num_train": 2, "num_test": 1, "spacing_mm": 8.0}, slices_per_volume=2,
                             batch_size=2, val_fraction=0.5, cache=False, check_space=False)
    names = [Path(b["image"].meta["filename_or_obj"][0]).name for b in loaders["test"]]
    assert names == ["patient.nii.gz"]
    assert len(loaders["train"].dataset.data) == 1 and "demo" in loaders["train"].dataset.data[0]["image"]
    demo_only = volume_loaders(None, demo_dir=tmp_path / "demo", intensity=None, slices_per_volume=2, batch_size=2,
                               demo_kwargs={"num_train": 2, "num_test": 1, "spacing_mm": 8.0}, val_fraction=0.5,
                               cache=False)
    assert [Path(b["image"].meta["filename_or_obj"][0]).parent.name for b in demo_only["test"]] == ["test"]


def test_the_demo_is_drawn_on_the_grid_the_model_works_on(tmp_path):
    # a model on an 8 mm grid (pixdim) evaluated on the demo: 8 mm subjects drawn from the 1 mm template, not the
    # default 4 mm ones resampled; an explicit spacing_mm still wins
    kwargs = {"intensity": None, "slices_per_volume": 2, "batch_size": 2, "val_fraction": 0.5, "cache": False}
    on_grid = volume_loaders(None, demo_dir=tmp_path / "a", pixdim=(8.0, 8.0, 8.0),
                             demo_kwargs={"num_train": 2, "num_test": 1}, **kwargs)
    assert nib.load(on_grid["test"].dataset.data[0]["image"]).header.get_zooms() == (8.0, 8.0, 8.0)
    given = volume_loaders(None, demo_dir=tmp_path / "b", pixdim=(8.0, 8.0, 8.0),
                           demo_kwargs={"num_train": 2, "num_test": 1, "spacing_mm": 4.0}, **kwargs)
    assert nib.load(given["test"].dataset.data[0]["image"]).header.get_zooms() == (4.0, 4.0, 4.0)


def test_the_training_augmentation_repeats_with_the_seed(tmp_path):
    # MONAI seeds a loader's dataset transforms but not its collate_fn, and set_determinism leaves Randomizable.R
    # alone: unseeded, the batch augmentation would differ from run to run with the same --seed
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        _save(train / f"h{i}.nii.gz", _ball(24, 9.0) * (0.5 + 0.1 * i))
    kwargs = {"intensity": None, "slices_per_volume": 4, "batch_size": 2, "val_fraction": 0.34, "cache": False,
              "augment": True}

    def first_batches(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        loader = volume_loaders(train, seed=seed, **kwargs)["train"]
        return [b["image"] for _, b in zip(range(3), loader)]

    again = first_batches(5)
    assert all(torch.equal(a, b) for a, b in zip(first_batches(5), again))
    assert not all(torch.equal(a, b) for a, b in zip(first_batches(6), again))


def test_scoring_the_embedded_demo_is_said_in_the_log(tmp_path, caplog):
    # `--workflow evaluate --run_dir bundles/fair` without --dataset_dir scores the demo images, not the user's
    # category: the log says so (before, nothing in the log mentioned the demo)
    import logging

    from medad.engine.builders import image_loaders

    with caplog.at_level(logging.INFO, logger="medad.engine.builders"):
        image_loaders(None, image_size=16, demo_dir=tmp_path / "mvtec", cache=False,
                      demo_kwargs={"num_train": 2, "num_test_good": 1, "num_test_defect": 1, "image_size": 16})
        volume_loaders(None, demo_dir=tmp_path / "mri", intensity=None, slices_per_volume=2, batch_size=2,
                       demo_kwargs={"num_train": 2, "num_test": 1, "spacing_mm": 8.0}, val_fraction=0.5, cache=False)
    said = [r.getMessage() for r in caplog.records if "embedded demo" in r.getMessage()]
    assert len(said) == 2 and str(tmp_path / "mvtec") in said[0] and "test volumes" in said[1]
