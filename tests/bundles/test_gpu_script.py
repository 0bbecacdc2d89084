"""The prepared GPU path, ``scripts/gpu_run.sh`` -> ``scripts/gpu_run.py``, end to end on the CPU at toy size.

Without CUDA the script says so in one line and trains, calibrates and evaluates at toy size; here two bundles
(FAIR on demo images, DISYRE on demo volumes) keep the test short. Everything lands in one output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_runs_end_to_end_on_cpu_at_toy_size(tmp_path: Path):
    out = tmp_path / "gpu run"  # a space in the path, as a user's folder may have
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_run.sh"), str(out), "--toy", "--bundles", "fair", "disyre"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    if not torch.cuda.is_available():
        notes = [line for line in result.stdout.splitlines() if "CUDA is not available" in line]
        assert notes == ["gpu_run: CUDA is not available; running on the CPU at toy size (--toy)."]

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["toy"] is True and [r["bundle"] for r in summary["bundles"]] == ["fair", "disyre"]
    for record in summary["bundles"]:
        assert record["returncode"] == 0 and record["steps"] == 2 and record["settings"]["amp"] == "bf16"
        assert 0.0 <= record["metrics"]["pixel_auroc"] <= 1.0 and record["metrics"]["images_per_second"] > 0
        assert "pixel_threshold" in record["calibration"]
        models = out / "runs" / record["bundle"] / "models"
        assert (models / "model.pt").is_file() and not (models / "checkpoint.pt").exists()
        checkpoint = torch.load(models / "model.pt", weights_only=False)
        assert checkpoint["calibration"] == record["calibration"]
    assert summary["bundles"][1]["data"] == "demo MRI 4 mm"
    speed = summary["fair_speed"]
    assert {(r["precision"], r["batch"]) for r in speed} == {("fp32", 1), ("fp32", 32), ("bf16 autocast", 1),
                                                               ("bf16 autocast", 32)}
    assert all(r["images_per_second"] > 0 for r in speed)
    assert "| fair | demo images (toy) |" in (out / "summary.md").read_text(encoding="utf-8")
    assert "medad and its dependencies already import" in (out / "gpu_run.log").read_text(encoding="utf-8")
