"""The ``bundles/addm`` bundle end to end at a tiny size (MRI default and the 2D overlay)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medad import bundle

REPO = Path(__file__).resolve().parents[2]
ADDM = REPO / "bundles" / "addm"
TINY_NETWORKS = {
    "network_def#channels": [8, 16],
    "network_def#attention_levels": [False, False],
    "network_def#num_head_channels": 8,
    "discriminator_def#channels": 8,
    "discriminator_def#num_layers_d": 2,
    "max_steps": 2,
    "noise_level": 3,
    "restoration_steps": 2,
}


def test_verify_metadata():
    bundle.verify_metadata(ADDM)


def test_bundle_trains_and_evaluates_on_the_demo_mri(tmp_path: Path):
    bundle.run(ADDM, run_dir=str(tmp_path), **TINY_NETWORKS,
               **{"demo_kwargs": {"num_train": 3, "num_test": 1, "spacing_mm": 8.0}, "evaluator#num_overlays": 1})
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    for key in ("dice", "iou", "precision", "recall", "pixel_auroc", "best_dice"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["num_cases"] == 1 and metrics["calibration"]["num_calibration_cases"] == 1
    checkpoint = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=False)
    extra = checkpoint["training_step"]["_extra_state"]
    assert extra["discriminator_optimizer"]["state"] and extra["discriminator_lr_scheduler"]["last_epoch"] == 2
    assert any(key.startswith("discriminator.") for key in checkpoint["training_step"])
    assert any((tmp_path / "eval" / "maps").rglob("*.nii.gz"))


def test_bundle_runs_on_2d_images_by_configuration(tmp_path: Path):
    bundle.run(ADDM, run_dir=str(tmp_path), data="industrial",
               **TINY_NETWORKS, image_size=16, batch_size=4,
               **{"demo_kwargs": {"num_train": 6, "num_test_good": 2, "num_test_defect": 2, "image_size": 16},
                  "evaluator#num_overlays": 1, "evaluator#write_maps": False})
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 4 and 0.0 <= metrics["image_auroc"] <= 1.0
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["network_evaluations_per_image"] == 2
