"""Experiment tracking with MLflow (``medad run --tracking mlflow``), for the medad trainer and evaluator.

MONAI bundles take ``--tracking mlflow`` and attach ignite ``MLFlowHandler``s to ``train#trainer`` /
``evaluator``; medad's trainer and evaluator are not ignite engines, so the same option is served by
:class:`MLflowTracker`, one config component (``tracker``) that both reference. One MLflow run per bundle run:

- at the start: the run record (``run.json``: bundle, data, network-defining settings, network) as parameters and
  its SHA-256 as the tag ``medad.run_fingerprint``;
- during training: the step losses (every ``log_every`` steps, ``train/<name>``) and every learning-monitor record
  (``monitor/<name>``: restoration error vs doing nothing, synthetic-anomaly AUROC);
- at the end: the metrics of ``metrics.json`` (scalars), the calibration (``calibration/<name>``), the baselines'
  metrics on the same cases (``baselines/<baseline>/<name>``) and the artifacts
  (metrics.json, cases.csv, report.html, curves, learning curve, train log).

The store defaults to a local SQLite file ``<run_dir>/mlruns.db`` with artifacts in ``<run_dir>/mlruns/`` (no
server needed; MLflow's file store is deprecated); ``--tracking_uri`` points at any MLflow server or database.
MLflow is an optional extra: ``pip install "medad[tracking]"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MLflowTracker", "default_tracking_uri", "tracker_config", "tracker_from_handlers"]

_MAX_PARAM_LENGTH = 6000  # MLflow's limit for a parameter value


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """``sqlite:///<run_dir>/mlruns.db`` (absolute), MONAI's default store layout."""
    return f"sqlite:///{Path(run_dir).expanduser().resolve() / 'mlruns.db'}"


def tracker_config(tracking_uri: str | None = None, experiment_name: str | None = None,
                   run_name: str | None = None) -> dict[str, Any]:
    """The ``tracker`` config entry that ``--tracking mlflow`` sets (a MONAI ConfigParser component)."""
    return {
        "_target_": "medad.engine.tracking.MLflowTracker",
        "run_dir": "@run_dir",
        "tracking_uri": tracking_uri,
        "experiment_name": experiment_name or "@bundle_name",
        "run_name": run_name,
    }


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = json.dumps(value) if not isinstance(value, str) else value


class MLflowTracker:
    """One MLflow run per bundle run, shared by the trainer and the evaluator (see the module docstring).

    Args:
        run_dir: the run folder (its ``run.json`` gives the parameters; default store and artifacts live in it).
        tracking_uri: MLflow tracking URI; None: :func:`default_tracking_uri`.
        experiment_name: MLflow experiment (created when missing, with its artifacts in ``<run_dir>/mlruns``).
        run_name: MLflow run name; None: the run folder's name.
        log_every: log the training losses every this many steps.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        experiment_name: str = "medad",
        run_name: str | None = None,
        log_every: int = 10,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri or default_tracking_uri(run_dir)
        self.experiment_name = experiment_name
        self.run_name = run_name or self.run_dir.name
        self.log_every = max(1, int(log_every))
        self.run_id: str | None = None
        self._client: Any = None

    # -- lifetime ------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from mlflow.tracking import MlflowClient
            except ImportError as error:
                raise ImportError('--tracking mlflow needs MLflow: pip install "medad[tracking]".') from error
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        artifacts = (self.run_dir / "mlruns").expanduser().resolve().as_uri()
        return self.client.create_experiment(self.experiment_name, artifact_location=artifacts)

    def start(self) -> str:
        """Start the run (once; later calls return the same run id) and log the run record as parameters."""
        if self.run_id is not None:
            return self.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run = self.client.create_run(self._experiment_id(), run_name=self.run_name,
                                     tags={"medad.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        record_path = self.run_dir / "run.json"
        if record_path.is_file():
            text = record_path.read_text()
            params: dict[str, str] = {}
            _flatten("", json.loads(text), params)
            self.log_params(params)
            self.client.set_tag(self.run_id, "medad.run_fingerprint", hashlib.sha256(text.encode()).hexdigest())
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``); a later :meth:`start` opens a new one."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None

    # -- logging -------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k)[:250], str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.start(), params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
        """Log the finite numbers of ``metrics`` (others are skipped) as ``<prefix><name>``."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [
            Metric(f"{prefix}{k}", float(v), stamp, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.start(), metrics=items[start:start + 1000])

    def log_training_step(self, step: int, scalars: Mapping[str, float]) -> None:
        """The trainer's per-step losses, at the first step and every ``log_every`` steps."""
        if step == 1 or step % self.log_every == 0:
            self.log_metrics(scalars, step=step, prefix="train/")

    def log_artifacts(self, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
        """Upload the files of ``paths`` that exist (missing ones are skipped)."""
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(self.start(), str(path), artifact_path)

    def log_evaluation(self, output_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
        """The evaluator's results: scalar metrics, the calibration, the result files."""
        output_dir = Path(output_dir)
        self.log_metrics(metrics)
        calibration = metrics.get("calibration")
        if isinstance(calibration, Mapping):
            self.log_metrics(calibration, prefix="calibration/")
        for name, values in (metrics.get("baselines") or {}).items():  # measured on the same cases
            if isinstance(values, Mapping):
                self.log_metrics(values, prefix=f"baselines/{name}/")
        names = ("metrics.json", "cases.csv", "cases_summary.json", "report.html", "image_roc.png", "image_pr.png",
                 "learning_curve.png", "learning_curve.csv", "train_log.csv")
        self.log_artifacts((output_dir / name for name in names), artifact_path=output_dir.name)


def tracker_from_handlers(handlers: Iterable[Any] | None, run_dir: str | os.PathLike) -> MLflowTracker | None:
    """An :class:`MLflowTracker` with the store, experiment and run name of MONAI ``MLFlowHandler``s.

    Stock ``python -m monai.bundle run --tracking mlflow`` hands ignite ``MLFlowHandler``s to the ``evaluator``
    (as ``val_handlers``); medad's evaluator is not an ignite engine, so it takes their settings instead. Other
    handlers are refused: they would be ignored otherwise.
    """
    tracker = None
    for handler in handlers or ():
        if type(handler).__name__ != "MLFlowHandler":
            raise TypeError(f"medad engines take MONAI's MLFlowHandler only (from --tracking mlflow), not "
                            f"{type(handler).__name__}; use medad run --tracking mlflow for experiment tracking.")
        client = getattr(handler, "client", None)
        uri = getattr(getattr(client, "_tracking_client", None), "tracking_uri", None)
        tracker = MLflowTracker(run_dir, tracking_uri=uri, experiment_name=handler.experiment_name or "medad",
                                run_name=handler.run_name)
    return tracker
