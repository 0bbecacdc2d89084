"""Oracle tests of the two evaluation pipelines: a perfect restoration must give a perfect segmentation.

Healthy images take values in a known range [0, HEALTHY_MAX]; lesions are brighter (LESION). A clamp at
HEALTHY_MAX therefore restores every test image to a healthy one exactly where it was healthy, and the residual
is the lesion. Run through the real loaders, slice aggregation, sliding window, the shared evaluator, its
resampling back to each input file's grid and the brain mask, the written maps must segment the lesions with
Dice >= 0.95 on the input grid, and metrics.json must say the same. The injected-bug tests prove that these tests
fail when a map is flipped on the way (a bug that keeps every shape).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import medad.engine.grids
import medad.inferers.slices
from medad import metrics
from medad.engine import AnomalyEvaluator, image_loaders, volume_loaders
from medad.inferers import AnomalyInferer, SliceAggregationInferer, SlidingWindowAnomalyInferer
from medad.scores import absolute_error_map, topk_mean_score

HEALTHY_MAX = 0.6
LESION = 0.95


class ClampOracle(torch.nn.Module):
    """The healthy image of any test case: intensities clamped to the healthy range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(max=HEALTHY_MAX)


class OracleInferer(AnomalyInferer):
    """Restoration = network(x); map = |x - restoration| summed over channels."""

    def __call__(self, inputs, network, *args, **kwargs):
        restoration = network(inputs)
        return {"anomaly_map": absolute_error_map(inputs, restoration), "restoration": restoration}


def _best_dice(maps, masks, regions=None) -> float:
    return metrics.pooled_metrics(maps, masks, region=regions)["best_dice"]


# -- 3D: brain MRI volumes on a grid unlike the working grid ------------------------------------------------------
# Input files: 2 x 2 x 3 mm voxels, axes stored as (-y, -x, +z) (non-canonical), loaded as RAS at 2 mm isotropic.
SHAPE = (34, 40, 18)
AFFINE = np.array([[0.0, -2.0, 0.0, 40.0], [-2.0, 0.0, 0.0, 30.0], [0.0, 0.0, 3.0, -20.0], [0.0, 0.0, 0.0, 1.0]])


def _volume(rng: np.random.Generator, lesions: list[tuple[tuple[int, int, int], float]]) -> tuple[np.ndarray, ...]:
    """A healthy 'brain' (ellipsoid, smooth values in (0, HEALTHY_MAX]), a bright structure outside it (only the
    brain mask keeps it out of the metrics), and spherical lesions (centre voxel, radius in mm)."""
    index = np.indices(SHAPE).astype(float)
    mm = np.einsum("ij,j...->i...", AFFINE[:3, :3], index)  # voxel -> mm offsets, in the file's own axes
    centre = np.einsum("ij,j->i", AFFINE[:3, :3], (np.array(SHAPE) - 1) / 2)
    radii = np.array([30.0, 26.0, 20.0])
    brain = (((mm - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
    phase = rng.uniform(0, 2 * np.pi, 3)
    tissue = 0.4 + 0.15 * np.sin(index[0] / 3 + phase[0]) * np.cos(index[1] / 4 + phase[1]) + 0.05 * np.sin(index[2] + phase[2])
    image = np.where(brain, tissue, 0.0)
    image[:4, :4, :] = 1.0  # "eye": brighter than the lesions, not brain, in every volume
    lesion = np.zeros(SHAPE, bool)
    for voxel, radius in lesions:
        at = np.einsum("ij,j->i", AFFINE[:3, :3], np.array(voxel, float))
        lesion |= (((mm - at[:, None, None, None]) ** 2).sum(0) <= radius**2) & brain
    image[lesion] = LESION
    return image.astype(np.float32), brain.astype(np.uint8), lesion.astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), path)


@pytest.fixture(scope="module")
def mri_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oracle_mri")
    rng = np.random.default_rng(0)
    cases = {
        "train/healthy_0": [], "train/healthy_1": [],
        "test/case_0": [((12, 14, 8), 9.0), ((22, 28, 10), 8.0)],
        "test/case_1": [((20, 12, 6), 10.0)],
    }
    for name, lesions in cases.items():
        split, case = name.split("/")
        image, brain, lesion = _volume(rng, lesions)
        _save(image, root / split / f"{case}.nii.gz")
        _save(brain, root / "brain_masks" / f"{case}_brain_mask.nii.gz")
        if split == "test":
            _save(lesion, root / "test_masks" / f"{case}_mask.nii.gz")
    return root


def _run_mri(root: Path, out: Path) -> dict:
    loaders = volume_loaders(root / "train", test_dir=root / "test", test_mask_dir=root / "test_masks",
                             brain_mask_dir=root / "brain_masks", pixdim=2.0, intensity=None, val_fraction=0.5,
                             cache=False)
    window = SlidingWindowAnomalyInferer(OracleInferer(), roi_size=(24, 24), overlap=0.5, sw_batch_size=8)
    evaluator = AnomalyEvaluator(ClampOracle(), SliceAggregationInferer(window, spatial_dim=2, size_divisor=8),
                                 loaders["test"], out, topk_mean_score, calibration_loader=loaders["val"],
                                 region_key="brain_mask", progress=False, num_overlays=1)
    return evaluator.run()


def _written_dice_3d(root: Path, out: Path) -> float:
    maps, masks, brains = [], [], []
    for case in ("case_0", "case_1"):
        written = nib.load(out / "maps" / f"{case}_anomaly_map.nii.gz")
        assert written.shape == SHAPE and np.allclose(written.affine, AFFINE), "map not on the input grid"
        maps.append(np.asarray(written.dataobj))
        masks.append(np.asarray(nib.load(root / "test_masks" / f"{case}_mask.nii.gz").dataobj) > 0)
        brains.append(np.asarray(nib.load(root / "brain_masks" / f"{case}_brain_mask.nii.gz").dataobj) > 0)
    return _best_dice(maps, masks, brains)


def test_mri_oracle_segments_lesions_on_the_input_grid(mri_cohort: Path, tmp_path: Path):
    result = _run_mri(mri_cohort, tmp_path)
    stored = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert stored["best_dice"] >= 0.95 and result["best_dice"] >= 0.95
    assert stored["pixel_ap"] >= 0.95
    assert _written_dice_3d(mri_cohort, tmp_path) >= 0.95


def _flip_first_axis(function):
    def flipped(*args, **kwargs):
        out = function(*args, **kwargs)
        if isinstance(out, dict):
            return {**out, "anomaly_map": out["anomaly_map"].flip(2)}
        return np.ascontiguousarray(out[::-1])
    return flipped


def test_mri_oracle_fails_when_the_written_map_is_flipped(mri_cohort: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(medad.engine.grids, "to_input_grid", _flip_first_axis(medad.engine.grids.to_input_grid))
    _run_mri(mri_cohort, tmp_path)
    assert _written_dice_3d(mri_cohort, tmp_path) < 0.5


def test_mri_oracle_fails_when_slice_aggregation_flips_the_map(mri_cohort: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(medad.inferers.slices.SliceAggregationInferer, "__call__",
                        _flip_first_axis(medad.inferers.slices.SliceAggregationInferer.__call__))
    result = _run_mri(mri_cohort, tmp_path)
    assert result["best_dice"] < 0.5
    assert _written_dice_3d(mri_cohort, tmp_path) < 0.5


# -- 2D: industrial pictures of another size than the working size -----------------------------------------------
HEIGHT, WIDTH = 72, 96


def _picture(rng: np.random.Generator, squares: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A healthy RGB texture in [0.2, HEALTHY_MAX] with bright squares (top, left, side); image and mask."""
    rows, cols = np.indices((HEIGHT, WIDTH)).astype(float)
    phase = rng.uniform(0, 2 * np.pi, 3)
    image = np.stack([0.4 + 0.15 * np.sin(rows / 5 + p) * np.cos(cols / 7 + p) for p in phase], axis=-1)
    mask = np.zeros((HEIGHT, WIDTH), bool)
    for top, left, side in squares:
        mask[top : top + side, left : left + side] = True
    image[mask] = LESION
    return image, mask


@pytest.fixture(scope="module")
def mvtec_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oracle_mvtec")
    rng = np.random.default_rng(1)
    layout = {"train/good": [[]] * 4, "test/good": [[]] * 2,
              "test/blob": [[(8, 10, 24), (40, 60, 20)], [(30, 30, 28)], [(4, 70, 22)]]}
    for folder, cases in layout.items():
        (root / folder).mkdir(parents=True)
        for i, squares in enumerate(cases):
            image, mask = _picture(rng, squares)
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(root / folder / f"{i:03d}.png")
            if squares:
                (root / "ground_truth" / "blob").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / "blob" / f"{i:03d}_mask.png")
    return root


def _run_2d(root: Path, out: Path) -> dict:
    loaders = image_loaders(root, image_size=(48, 64), channels=3, eval_batch_size=4, val_fraction=0.25, cache=False)
    window = SlidingWindowAnomalyInferer(OracleInferer(), roi_size=(32, 32), overlap=0.5, sw_batch_size=8,
                                         foreground_weighting=False, zero_background=False)
    evaluator = AnomalyEvaluator(ClampOracle(), window, loaders["test"], out, topk_mean_score,
                                 calibration_loader=loaders["val"], progress=False, num_overlays=1)
    return evaluator.run()


def _written_dice_2d(root: Path, out: Path) -> float:
    import nrrd

    maps, masks = [], []
    for i in range(3):
        voxels, _ = nrrd.read(str(out / "maps" / f"blob_{i:03d}_anomaly_map.nrrd"), index_order="F")
        written = voxels[:, :, 0].T  # stored (W, H, 1)
        assert written.shape == (HEIGHT, WIDTH), "map not at the input picture's size"
        maps.append(written)
        masks.append(np.asarray(Image.open(root / "ground_truth" / "blob" / f"{i:03d}_mask.png")) > 0)
    return _best_dice(maps, masks)


def test_image_oracle_segments_defects_at_the_input_size(mvtec_folder: Path, tmp_path: Path):
    result = _run_2d(mvtec_folder, tmp_path)
    stored = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert stored["best_dice"] >= 0.95 and result["image_auroc"] == 1.0
    assert _written_dice_2d(mvtec_folder, tmp_path) >= 0.95


def test_image_oracle_fails_when_the_written_map_is_flipped(mvtec_folder: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(medad.engine.grids, "to_image_size", _flip_first_axis(medad.engine.grids.to_image_size))
    _run_2d(mvtec_folder, tmp_path)
    assert _written_dice_2d(mvtec_folder, tmp_path) < 0.5
