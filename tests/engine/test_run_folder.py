"""Run folders never mix (issue #8): default folders outside the source tree, run.json fingerprints refused on
resume/evaluate, inference and export rebuilding the stored network, shipped weights as a copied run folder.

One tiny ddpm_partial training (2 steps, 16x16, an 8/16/16-wide UNet) is shared by the tests of this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medad import bundle
from medad.engine.run_folder import RUN_FILE, RunFolderMismatchError

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "ddpm_partial"
NETWORK = {
    "network_def#channels": "$(8, 16, 16)",
    "network_def#attention_levels": "$(False, False, False)",
    "network_def#num_head_channels": 8,
}
QUIET = {"evaluator#progress": False, "evaluator#num_overlays": 0}
DEMO = {"num_train": 10, "num_test_good": 3, "num_test_defect": 4, "image_size": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run_folder") / "run"
    bundle.run(BUNDLE, "train", run_dir=str(run_dir), image_size=16, batch_size=4, restoration_steps=2, max_steps=2,
               **NETWORK, **QUIET, **{"demo_kwargs": DEMO, "trainer#progress": False})
    return run_dir


@contextlib.contextmanager
def refused(error: type[Exception], match: str):
    """Like ``pytest.raises``, also when MONAI wraps the error ("Failed to evaluate ...") raised in a config."""
    with pytest.raises(Exception) as info:
        yield
    chain, cause = [], info.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    assert any(isinstance(e, error) and re.search(match, str(e)) for e in chain), chain


def _scratch(run_dir: Path) -> Path:
    return run_dir / "data" / "demo_mvtec" / "demo_texture" / "test" / "scratch"


def test_default_run_dir_is_outside_the_source_tree(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bundle.default_run_dir("fair") == str(tmp_path / "runs" / "fair" / "demo")
    one, two = tmp_path / "a" / "bottle", tmp_path / "b" / "bottle"
    tag_one = Path(bundle.default_run_dir("fair", one, None)).name
    assert tag_one.startswith("bottle-") and tag_one != Path(bundle.default_run_dir("fair", two)).name
    assert bundle.default_run_dir("fair", tmp_path / "mvtec ad", "bottle").endswith(os.sep + "bottle")
    assert bundle.inference_dir("fair") == str(tmp_path / "runs" / "fair" / "inference")


def test_run_json_records_data_settings_and_network(trained: Path):
    record = json.loads((trained / RUN_FILE).read_text(encoding="utf-8"))
    assert record["bundle"] == "ddpm_partial" and record["data"] == {"dataset_dir": None, "category": None}
    assert record["settings"]["image_size"] == 16 and record["settings"]["quick"] is True
    assert record["network"]["channels"] == [8, 16, 16] and record["network"]["_target_"].endswith("AnomalyUNet")


def test_resuming_with_another_fingerprint_is_refused(trained: Path, tmp_path: Path):
    before = (trained / "models" / "model.pt").stat().st_mtime_ns
    with refused(RunFolderMismatchError, match=r"image_size: stored 16, requested 32.*--run_dir"):
        bundle.run(BUNDLE, "train", run_dir=str(trained), image_size=32, max_steps=2, **NETWORK, **QUIET)
    with refused(RunFolderMismatchError, match=r"dataset_dir: stored None, requested '.*other_data'"):
        bundle.run(BUNDLE, "train", run_dir=str(trained), dataset_dir=str(tmp_path / "other_data"), quick=True,
                   image_size=16, max_steps=2, **NETWORK, **QUIET)
    assert (trained / "models" / "model.pt").stat().st_mtime_ns == before  # nothing was resumed or overwritten


def test_stock_monai_run_refuses_another_fingerprint(trained: Path):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle.config_files(REPO / "bundles" / "ddpm_partial")),
         "--run_dir", str(trained), "--image_size", "32", "--max_steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode != 0 and "image_size: stored 16, requested 32" in result.stdout + result.stderr


def test_evaluating_with_other_data_is_refused(trained: Path, tmp_path: Path):
    with refused(RunFolderMismatchError, match=r"dataset_dir: stored None, requested"):
        bundle.run(BUNDLE, "evaluate", run_dir=str(trained), dataset_dir=str(tmp_path), quick=True, **QUIET)


def test_inference_rebuilds_the_stored_network_without_repeating_settings(trained: Path, tmp_path: Path):
    out = tmp_path / "inference"
    bundle.run(BUNDLE, "inference", run_dir=str(trained), output_dir=str(out), input_dir=str(_scratch(trained)),
               **QUIET)  # no --image_size, --quick or network overrides: all read from run.json
    cases = (out / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert len(cases) == 1 + len(list(_scratch(trained).glob("*.png")))


def test_conflicting_override_names_key_and_both_values(trained: Path, tmp_path: Path):
    with refused(RunFolderMismatchError, match=r"image_size: stored 16, requested 32"):
        bundle.run(BUNDLE, "inference", run_dir=str(trained), output_dir=str(tmp_path), image_size=32, **QUIET)
    with refused(RunFolderMismatchError, match=r"network_def#channels: stored \[8, 16, 16\], requested \[8, 16\]"):
        bundle.run(BUNDLE, "inference", run_dir=str(trained), output_dir=str(tmp_path),
                   **{"network_def#channels": "$(8, 16)"})


def test_export_exports_the_run_dirs_model(trained: Path, tmp_path: Path):
    from medad.cli import main

    target = tmp_path / "model.ts"
    main(["export", "--config", str(BUNDLE), "--run_dir", str(trained), "--filepath", str(target)])
    exported = torch.jit.load(str(target)).state_dict()
    weights = torch.load(trained / "models" / "model.pt", weights_only=False)["network"]
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)


def test_inference_without_a_trained_model_says_what_to_do(tmp_path: Path):
    with refused(FileNotFoundError, match="train first.*--run_dir"):
        bundle.run(BUNDLE, "inference", run_dir=str(tmp_path / "empty"), output_dir=str(tmp_path / "out"), **QUIET)


def test_a_copied_run_folder_is_a_bundles_shipped_weights(trained: Path, tmp_path: Path, monkeypatch):
    shipped = tmp_path / "bundles" / "ddpm_partial"
    shutil.copytree(BUNDLE / "configs", shipped / "configs")
    shutil.copytree(trained / "models", shipped / "models")
    shutil.copy(trained / RUN_FILE, shipped / RUN_FILE)
    monkeypatch.chdir(tmp_path)
    bundle.run(shipped, "inference", input_dir=str(_scratch(trained)), **QUIET)  # no --run_dir: shipped weights
    assert (tmp_path / "runs" / "ddpm_partial" / "inference" / "cases.csv").is_file()
    assert not (shipped / "inference").exists()
