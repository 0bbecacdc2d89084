"""`--tracking mlflow`: one MLflow run per bundle run, readable with the MLflow client, metrics equal metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medad import bundle
from medad.cli import main
from medad.overrides import OverrideError

REPO = Path(__file__).resolve().parents[2]
TINY = {"image_size": 16, "max_steps": 4, "batch_size": 4, "monitor_every": 2,
        "demo_kwargs": {"num_train": 10, "num_test_good": 3, "num_test_defect": 4, "image_size": 16}}


def test_tracking_options_are_checked_without_mlflow():
    with pytest.raises(OverrideError, match="takes mlflow"):
        bundle.run(REPO / "bundles" / "fair", tracking="wandb")
    with pytest.raises(OverrideError, match="need --tracking mlflow"):
        bundle.run(REPO / "bundles" / "fair", experiment_name="x")


def test_a_tracked_run_logs_parameters_losses_monitor_metrics_and_files(tmp_path: Path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    assert main(["run", "--config", "bundles/fair", "--run_dir", str(run_dir), "--tracking", "mlflow",
                 "--experiment_name", "medad-test", "--image_size", "16", "--max_steps", "4", "--batch_size", "4",
                 "--monitor_every", "2", "--num_overlays", "1"]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("medad-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    assert run.data.params["bundle"] == "fair" and run.data.params["settings.image_size"] == "16"
    assert run.data.tags["medad.run_fingerprint"]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    for key in ("pixel_auroc", "aupro", "pixel_ap", "image_auroc"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    assert run.data.metrics["calibration/pixel_threshold"] == pytest.approx(metrics["calibration"]["pixel_threshold"])
    assert run.data.metrics["baselines/zscore/pixel_auroc"] == pytest.approx(metrics["baselines"]["zscore"]["pixel_auroc"])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1] and losses[0].value > 0  # the first step, then every 10th
    monitor = client.get_metric_history(run.info.run_id, "monitor/mse_corrupted")
    assert sorted(m.step for m in monitor) == [2, 4]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/metrics.json", "eval/report.html", "eval/cases.csv"} <= files
    assert record["bundle"] == "fair"


def test_stock_monai_tracking_option_logs_the_evaluation(tmp_path: Path, monkeypatch):
    """`python -m monai.bundle run --tracking mlflow` hands MLFlowHandlers to the evaluator: it logs with them."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from monai.bundle import run as monai_run

    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "stock"
    monai_run(config_file=bundle.config_files(REPO / "bundles" / "fair"), run_dir=str(run_dir), tracking="mlflow",
              **{k: v for k, v in TINY.items() if k != "monitor_every"}, monitor_every=0)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert run.data.metrics["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"])
    assert run.info.status == "FINISHED"
