"""The zscore and intensity bundles end to end (industrial demo, small MRI demo, inference on a folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medad import bundle

REPO = Path(__file__).resolve().parents[2]


def test_zscore_bundle_on_the_industrial_demo(tmp_path: Path):
    bundle.run(REPO / "bundles" / "zscore", data="industrial",
               run_dir=str(tmp_path), image_size=32)
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert result["num_cases"] == 30 and result["pixel_auroc"] > 0.9  # measured 0.99 at 64 px
    assert "pixel_threshold" in torch.load(tmp_path / "models" / "model.pt", weights_only=False)["calibration"]
    assert any((tmp_path / "eval" / "maps").glob("*.seg.nrrd"))


@pytest.mark.parametrize("name", ["zscore", "intensity"])
def test_mri_baseline_bundles_on_a_small_demo(name: str, tmp_path_factory):
    demo = tmp_path_factory.getbasetemp() / "baseline_demo_mri"  # shared: generated once for both bundles
    run_dir = tmp_path_factory.mktemp(name)
    bundle.run(REPO / "bundles" / name, run_dir=str(run_dir), demo_dir=str(demo),
               demo_kwargs={"num_train": 4, "num_test": 2})
    result = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert result["num_cases"] == 2 and result["pixel_auroc"] > 0.6 and "dice" in result
    assert len(list((run_dir / "eval" / "maps").glob("*_anomaly_map.nii.gz"))) == 2
    # beside it the other baseline (volumes), not itself
    other = {"zscore": "intensity", "intensity": "zscore"}[name]
    assert set(result["baselines"]) == {other} and f"the {name} bundle" in result["baselines_note"]
    assert result["baselines"][other]["num_cases"] == 2 and result["baselines"][other]["pixel_auroc"] > 0.6
    # inference with the saved model and calibration on a folder of volumes
    bundle.run(REPO / "bundles" / name, workflow="inference", run_dir=str(run_dir), input_dir=str(demo / "test"))
    assert len(list((run_dir / "inference" / "maps").glob("*.seg.nrrd"))) == 2
    report = (run_dir / "inference" / "report.html").read_text(encoding="utf-8")
    assert "No baselines: they need held-out normal data" in report
