"""The ``bundles/fair`` bundle end to end (demo images, and MRI slices by configuration).

Bundle runs use tiny overrides (16x16 images, 2 steps) and write only under pytest's tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medad import bundle

REPO = Path(__file__).resolve().parents[2]
FAIR = REPO / "bundles" / "fair"


def test_metadata_verifies():
    bundle.verify_metadata(FAIR)


def test_bundle_trains_and_evaluates_on_the_demo(tmp_path: Path):
    bundle.run(FAIR, run_dir=str(tmp_path), image_size=16, max_steps=2, batch_size=4)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 30 and 0.0 <= metrics["pixel_auroc"] <= 1.0 and 0.0 <= metrics["image_auroc"] <= 1.0
    assert metrics["network_evaluations_per_image"] == 1
    checkpoint = torch.load(tmp_path / "models" / "model.pt", weights_only=False)
    assert checkpoint["bundle"] == "fair" and checkpoint["step"] == 2


def test_bundle_runs_on_mri_slices_by_config_only(tmp_path: Path):
    bundle.run(FAIR, data="mri", run_dir=str(tmp_path), max_steps=2,
               slices_per_volume=2, demo_kwargs={"num_train": 3, "num_test": 2})
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 2 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert any((tmp_path / "eval" / "maps").rglob("*.nii.gz"))  # 3D maps on the volumes' grid
    network = torch.load(tmp_path / "models" / "model.pt", weights_only=False)["network"]
    assert network["conv_out.weight"].shape[0] == 1  # one output channel: gray MRI
