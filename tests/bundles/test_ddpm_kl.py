"""The ``bundles/ddpm_kl`` bundle end to end (images and MRI slices)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medad import bundle

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "ddpm_kl"


def test_bundle_metadata_is_valid():
    bundle.verify_metadata(BUNDLE)


TINY = {"image_size": 16, "max_steps": 2, "batch_size": 4, "noise_scales": [20]}


def test_bundle_trains_and_evaluates_on_the_demo(tmp_path: Path):
    bundle.run(BUNDLE, "train", run_dir=str(tmp_path), **TINY)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 30 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert metrics["network_evaluations_per_image"] == 1
    assert torch.load(tmp_path / "models" / "model.pt", weights_only=False)["bundle"] == "ddpm_kl"
    # the inference workflow on a folder of new images, with the same trained weights
    out, folder = tmp_path / "inference", tmp_path / "data" / "demo_mvtec" / "demo_texture" / "test" / "scratch"
    bundle.run(BUNDLE, "inference", run_dir=str(tmp_path), output_dir=str(out), input_dir=str(folder), image_size=16,
               noise_scales=[20])
    rows = (out / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + len(list(folder.glob("*.png")))


def test_bundle_runs_on_mri_slices_by_configuration_only(tmp_path: Path):
    run_dir = tmp_path / "run"  # configs/data/mri.json: the same MRI data path as every bundle's
    bundle.run(BUNDLE, "train", data="mri", run_dir=str(run_dir), max_steps=2, noise_scales=[20], slices_per_volume=2,
               batch_size=2, demo_kwargs={"num_train": 3, "num_test": 1, "spacing_mm": 8.0})
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 1 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    maps = list((run_dir / "eval" / "maps").rglob("*.nii.gz"))
    assert maps, "the 3D anomaly maps are written as NIfTI volumes"
    assert np.isfinite(metrics["pixel_ap"])
