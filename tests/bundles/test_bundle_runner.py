"""The four ways a user drives a bundle: stock MONAI run, the medad front, offline metadata check, ckpt_export.

One tiny ddpm_partial training (2 steps at 16x16) is shared by the tests of this module; every output goes to a
temporary run_dir so the checkout stays clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medad import bundle

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
TINY = ["--image_size", "16", "--max_steps", "2", "--batch_size", "4", "--restoration_steps", "2"]


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Train + evaluate with plain MONAI, from the repository root, without passing bundle_root."""
    run_dir = tmp_path_factory.mktemp("ddpm_partial_run")
    files = [str(Path(f).relative_to(REPO)) for f in bundle.config_files(REPO / "bundles" / "ddpm_partial")]
    assert files[0] == "configs/base.json" and files[-1] == "bundles/ddpm_partial/configs/train.json"
    _run(["-m", "monai.bundle", "run", "--config_file", str(files), "--run_dir", str(run_dir), *TINY])
    return run_dir


def test_monai_bundle_run_trains_and_evaluates(trained: Path):
    assert (trained / "models" / "model.pt").is_file()
    metrics = json.loads((trained / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_cases"] == 30 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert metrics["network_evaluations_per_image"] == 2
    assert metrics["bundle"] == "ddpm_partial"  # an evaluation copied out of its run folder still names its method
    assert (trained / "eval" / "cases.csv").is_file() and any((trained / "eval" / "overlays").glob("*.png"))
    checkpoint = torch.load(trained / "models" / "model.pt", weights_only=False)
    assert checkpoint["bundle"] == "ddpm_partial" and "pixel_threshold" in checkpoint["calibration"]


def test_medad_front_runs_inference_on_a_folder(trained: Path, tmp_path: Path):
    out = tmp_path / "inference"
    _run(["-m", "medad", "run", "--config", "bundles/ddpm_partial", "--workflow", "inference",
          "--run_dir", str(trained), "--output_dir", str(out), "--image_size", "16", "--restoration_steps", "2",
          "--input_dir", str(trained / "data" / "demo_mvtec" / "demo_texture" / "test" / "scratch")])
    cases = (out / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert len(cases) == 1 + len(list((trained / "data" / "demo_mvtec" / "demo_texture" / "test" / "scratch").glob("*.png")))


def test_front_rejects_a_folder_that_is_not_a_bundle(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a bundle folder"):
        bundle.config_files(tmp_path)
    with pytest.raises(ValueError, match="unknown workflow"):
        bundle.config_files(REPO / "bundles" / "ddpm_partial", "nonsense")


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_metadata_offline(name: str):
    bundle.verify_metadata(REPO / "bundles" / name)  # raises on an invalid metadata.json


@pytest.mark.parametrize("name", BUNDLES)
def test_every_bundle_has_the_standard_files(name: str):
    configs = REPO / "bundles" / name / "configs"
    for f in ("train.json", "metadata.json"):
        assert (configs / f).is_file(), f"{name} lacks {f}"
    assert (REPO / "bundles" / name / "docs" / "README.md").is_file()
    for workflow in bundle.WORKFLOWS:  # the shared files complete every workflow
        assert all(Path(f).is_file() for f in bundle.config_files(REPO / "bundles" / name, workflow))
    assert Path(bundle.logging_file(REPO / "bundles" / name)).is_file()


def test_ckpt_export_gives_the_same_network(trained: Path, tmp_path: Path):
    target = tmp_path / "model.ts"
    _run(["-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(target),
          "--ckpt_file", str(trained / "models" / "model.pt"), "--key_in_ckpt", "network",
          "--config_file", str(bundle.config_files(REPO / "bundles" / "ddpm_partial", "inference")),
          "--meta_file", "bundles/ddpm_partial/configs/metadata.json", "--bundle_root", "bundles/ddpm_partial"])
    from medad.engine.export import quiet_torchscript

    with quiet_torchscript():  # torch >= 2.10 deprecates torch.jit; medad keeps .ts working
        exported = torch.jit.load(str(target))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle.config_files(REPO / "bundles" / "ddpm_partial", "inference"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=False)["network"])
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([0, 5])
    with torch.no_grad():
        assert torch.allclose(exported(x, t), network.eval()(x, t), atol=1e-5)


def test_a_run_trained_below_a_noise_level_refuses_to_detect_from_it(trained: Path, tmp_path: Path):
    # run.json stores max_training_timestep; restoring from t = 3 with a network trained on t < 2 only is refused
    run_dir = tmp_path / "run"
    (run_dir / "models").mkdir(parents=True)
    shutil.copy(trained / "models" / "model.pt", run_dir / "models" / "model.pt")
    record = json.loads((trained / "run.json").read_text(encoding="utf-8"))
    assert record["settings"]["max_training_timestep"] is None  # recorded for every diffusion run
    record["settings"]["max_training_timestep"] = 2
    (run_dir / "run.json").write_text(json.dumps(record), encoding="utf-8")
    args = [sys.executable, "-m", "medad", "run", "--config", "bundles/ddpm_partial", "--workflow", "evaluate",
            "--run_dir", str(run_dir), "--output_dir", str(tmp_path / "eval"), "--image_size", "16"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    refused = subprocess.run([*args, "--restoration_steps", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 1
    assert "detection starts from t = 2, but the network was trained on t < 2 only" in refused.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()
