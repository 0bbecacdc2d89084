"""The ``bundles/disyre`` bundle end to end: real folders (brain metrics, volumes on the input grid) and 2D images."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medad import bundle

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "disyre" / "configs"
TINY_NET = {"widths": (8, 16), "max_steps": 2, "restoration_steps": 1, "slices_per_volume": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def demo_mri(tmp_path_factory) -> Path:
    from medad.data import make_demo_mri

    return make_demo_mri(tmp_path_factory.mktemp("demo_mri"), num_train=2, num_test=1)


def _run_bundle(config_files: list[Path], **override) -> None:
    from monai.bundle import run

    run(config_file=[str(f) for f in config_files], logging_file=bundle.logging_file(CONFIGS.parent), **override)


def test_bundle_on_real_folders_writes_brain_metrics_and_volumes(demo_mri: Path, tmp_path: Path):
    _run_bundle(bundle.config_files(CONFIGS.parent), run_dir=str(tmp_path), dataset_dir=str(demo_mri / "train"),
                test_dir=str(demo_mri / "test"), test_mask_dir=str(demo_mri / "test_masks"),
                brain_mask_dir=str(demo_mri / "brain_masks"), quick=True, intensity=None, **TINY_NET)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert 0 <= metrics["pixel_ap"] <= 1 and 0 <= metrics["best_dice"] <= 1 and "dice" in metrics
    assert "pixel_threshold" in metrics["calibration"]
    cases = pd.read_csv(tmp_path / "eval" / "cases.csv")
    assert len(cases) == 1 and {"ap", "best_dice", "dice"} <= set(cases.columns)
    written = nib.load(tmp_path / "eval" / "maps" / f"{cases['case_id'][0]}_anomaly_map.nii.gz")
    source = nib.load(demo_mri / "test" / f"{cases['case_id'][0]}.nii.gz")
    assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-5)


def test_bundle_runs_on_2d_industrial_images_by_configuration_only(tmp_path: Path):
    _run_bundle(bundle.config_files(CONFIGS.parent, data="industrial"), run_dir=str(tmp_path), image_size=16, **TINY_NET)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 30 and 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["image_auroc"] <= 1
    assert metrics["network_evaluations_per_image"] == 1
