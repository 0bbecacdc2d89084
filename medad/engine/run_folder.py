"""Run folders that never mix: each one records what it was trained on and which network it holds.

A run folder (``runs/<bundle>/<dataset-tag>/`` by default, see :func:`medad.bundle.default_run_dir`) holds::

    run.json          bundle, data fingerprint, network-defining settings, network constructor arguments
    models/           model.pt (weights + calibration), checkpoint.pt, calibration.json
    eval/             evaluation outputs;  inference/  inference outputs;  data/  generated demo data

Training into a folder whose ``run.json`` differs (other data, other image size, other network) is refused, so a
run never resumes another run's checkpoint; evaluation and inference refuse a model trained with other settings.
``run.json`` + ``models/`` copied into ``bundles/<name>/`` are a bundle's shipped weights.
:class:`RunFolder` is a bundle config component, so the check holds under stock ``python -m monai.bundle run`` too.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medad.io.atomic import to_jsonable, write_json
from medad.engine.distributed import is_main_process

__all__ = ["RUN_FILE", "RunFolder", "RunFolderMismatchError", "network_settings", "read_run_record", "settings_overrides"]

logger = logging.getLogger(__name__)

#: The record of a run folder, beside its ``models/`` folder.
RUN_FILE = "run.json"
#: Data entries that say which model a run trained (must match to resume or evaluate).
TRAINING_DATA_KEYS = ("dataset_dir", "category", "brain_mask_dir")
#: Data entries that say what a run was tested on (may differ when the evaluation writes elsewhere).
TEST_DATA_KEYS = ("test_dir", "test_mask_dir")
WORKFLOWS = ("train", "evaluate", "inference")


class RunFolderMismatchError(ValueError):
    """A run folder or stored model was made with other data or settings than the ones requested."""


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types (tuples -> lists, paths -> str), so stored and requested values compare."""
    if isinstance(value, (torch.device, os.PathLike)):
        value = str(value)
    return json.loads(json.dumps(to_jsonable(value), default=str))


def _path(value: Any) -> str | None:
    return None if value in (None, "") else str(Path(str(value)).expanduser().resolve())


def network_settings(network: torch.nn.Module | None) -> dict[str, Any]:
    """The constructor arguments of ``network`` (``init_args`` of :class:`~medad.networks.AnomalyUNet`), plain."""
    if network is None:
        return {}
    network = getattr(network, "module", network)  # DistributedDataParallel
    settings = {"_target_": f"{type(network).__module__}.{type(network).__name__}"}
    settings.update(getattr(network, "init_args", {}))
    return _plain(settings)


def read_run_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run.json`` of ``folder``, or None when there is none."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable run record ({error}); delete it or choose a new --run_dir.") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a medad run record; delete it or choose a new --run_dir.")
    return record


def _differences(stored: Mapping[str, Any], requested: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: stored X, requested Y`` for every key both sides have and disagree on."""
    return [
        f"{prefix}{key}: stored {stored[key]!r}, requested {requested[key]!r}"
        for key in requested
        if key in stored and _plain(stored[key]) != _plain(requested[key])
    ]


def _literal(value: Any) -> tuple[bool, Any]:
    """An override as a value: ``"$(8, 16)"`` -> (True, [8, 16]); a non-literal expression -> (False, None)."""
    if isinstance(value, str) and value.startswith("$"):
        try:
            value = ast.literal_eval(value[1:].strip())
        except (ValueError, SyntaxError):
            return False, None
    if isinstance(value, str) and value.startswith("@"):
        return False, None
    return True, _plain(value)


def settings_overrides(
    record: Mapping[str, Any],
    config: Mapping[str, Any],
    override: Mapping[str, Any],
    source: str,
    data_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """The overrides that rebuild a stored run's network and settings, checked against explicit ones.

    Args:
        record: a ``run.json`` content.
        config: the workflow's merged config (only keys it has are set).
        override: the user's explicit overrides.
        source: the run record's file, for messages.
        data_keys: keys of the record's ``data`` to fill in as well (``evaluate``: the training data, so a user
            evaluating a run on new test data never repeats ``--dataset_dir``).

    Returns:
        overrides to add (stored values the user did not give).

    Raises:
        RunFolderMismatchError: an explicit override disagrees with the stored value (names key and both values).
    """
    wanted: dict[str, Any] = {k: v for k, v in record.get("data", {}).items() if k in data_keys and k in config}
    wanted.update({k: v for k, v in record.get("settings", {}).items() if k in config})
    network = dict(record.get("network", {}))
    network_def = config.get("network_def")
    stored_target = network.pop("_target_", None)
    if isinstance(network_def, Mapping) and _same_class(stored_target, network_def.get("_target_")):
        wanted.update({f"network_def#{k}": v for k, v in network.items()})
    added, conflicts = {}, []
    for key, stored in wanted.items():
        if key not in override:
            added[key] = stored
            continue
        known, value = _literal(override[key])
        if known and value != _plain(stored):
            conflicts.append(f"{key}: stored {_plain(stored)!r}, requested {value!r}")
    if conflicts:
        raise RunFolderMismatchError(
            f"{source}: the model was trained with other settings ({'; '.join(conflicts)}); drop these overrides "
            "(they are read from the run) or pass the --run_dir of a run trained with them."
        )
    return added


def _same_class(stored: Any, target: Any) -> bool:
    """``medad.networks.unet.AnomalyUNet`` (stored) is ``medad.networks.AnomalyUNet`` (config ``_target_``)."""
    if stored is None:
        return True
    return isinstance(target, str) and stored.rsplit(".", 1)[-1] == target.rsplit(".", 1)[-1]


class RunFolder:
    """Check and record a run folder before a bundle workflow writes anything (a bundle config component).

    Args:
        run_dir: the run folder (``None`` for inference with the bundle's shipped weights).
        bundle: the bundle name.
        workflow: ``"train"`` (records ``run.json``, refuses a folder of another run), ``"evaluate"`` or
            ``"inference"`` (refuse a model trained with other settings).
        network: the bundle's ``network_def`` instance; its constructor arguments are fingerprinted.
        settings: network-defining config values (image size, channels, filter settings, ``quick``, ...).
        data: ``dataset_dir``/``category``/``brain_mask_dir`` (training data) and ``test_dir``/``test_mask_dir``.
        ckpt_path: the model evaluated or inferred with; its run record is ``<ckpt folder>/../run.json``.
        output_dir: where this workflow writes (announced; an evaluation on other test data must not write
            into the run's own ``eval/``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None,
        bundle: str,
        workflow: str = "train",
        network: torch.nn.Module | None = None,
        settings: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        ckpt_path: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        if workflow not in WORKFLOWS:
            raise ValueError(f"RunFolder workflow must be one of {', '.join(WORKFLOWS)}, got {workflow!r}.")
        self.run_dir = None if run_dir in (None, "") else Path(run_dir).expanduser().resolve()
        self.bundle = bundle
        self.workflow = workflow
        self.network = network_settings(network)
        self.settings = _plain(dict(settings or {}))
        data = dict(data or {})
        self.data = {k: (_path(v) if k.endswith("_dir") else _plain(v)) for k, v in data.items()}
        self.ckpt_path = None if ckpt_path is None else Path(ckpt_path).expanduser().resolve()
        self.output_dir = None if output_dir is None else Path(output_dir).expanduser().resolve()

    def record(self) -> dict[str, Any]:
        """The ``run.json`` content of this run."""
        return {"bundle": self.bundle, "data": self.data, "settings": self.settings, "network": self.network}

    def prepare(self) -> Path | None:
        """Refuse a mixed run, record a new one, and say where the outputs go (logger + stdout).

        Returns:
            the run folder (train) or the folder of the stored model's record.
        """
        if self.workflow == "train":
            folder = self._prepare_training()
        else:
            folder = self._check_model()
        where = self.output_dir or folder
        message = f"medad {self.bundle} {self.workflow}: outputs in {where}"
        if self.workflow == "train" and folder is not None:
            message = f"medad {self.bundle} train: run folder {folder} (models/, eval/)"
        logger.info(message)
        print(message, flush=True)
        return folder

    def _prepare_training(self) -> Path:
        if self.run_dir is None:
            raise ValueError(f"bundle '{self.bundle}': training needs a run_dir; pass --run_dir <folder>.")
        stored = read_run_record(self.run_dir)
        if stored is None:
            existing = [p.name for p in (self.run_dir / "models").glob("*.pt")] if (self.run_dir / "models").is_dir() else []
            if existing:
                raise RunFolderMismatchError(
                    f"{self.run_dir}: holds models/{existing[0]} but no {RUN_FILE}, so it may be another run's; "
                    "choose a new --run_dir (or delete that folder)."
                )
            if is_main_process():  # under torchrun every rank prepares; one writes
                write_json(self.run_dir / RUN_FILE, self.record())
            return self.run_dir
        differences = self._compare(stored, data_keys=TRAINING_DATA_KEYS + TEST_DATA_KEYS)
        if differences:
            raise RunFolderMismatchError(
                f"{self.run_dir / RUN_FILE}: this run folder holds another run ({'; '.join(differences)}); "
                "choose a new --run_dir (or delete that folder) to train this one."
            )
        return self.run_dir

    def _check_model(self) -> Path | None:
        ckpt = self.ckpt_path or (self.run_dir / "models" / "model.pt" if self.run_dir is not None else None)
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(
                f"{ckpt or 'models/model.pt'}: no trained model of bundle '{self.bundle}' there; train first "
                f"(python -m medad run --config bundles/{self.bundle}) or pass --run_dir <a trained run folder>."
            )
        folder = ckpt.parent.parent
        stored = read_run_record(folder)
        if stored is None:
            warnings.warn(f"{folder / RUN_FILE}: missing, so the settings of {ckpt} cannot be checked.", stacklevel=2)
            return folder
        data_keys: tuple[str, ...] = TRAINING_DATA_KEYS if self.workflow == "evaluate" else ()
        differences = self._compare(stored, data_keys)
        if differences:
            raise RunFolderMismatchError(
                f"{folder / RUN_FILE}: the model was trained with other data or settings ({'; '.join(differences)}); "
                "drop those overrides or choose the --run_dir of a run trained with them."
            )
        if self.workflow == "evaluate" and self.output_dir == folder / "eval":
            tested = _differences(stored.get("data", {}), {k: v for k, v in self.data.items() if k in TEST_DATA_KEYS})
            if tested:
                raise RunFolderMismatchError(
                    f"{folder / 'eval'}: holds the evaluation on other test data ({'; '.join(tested)}); "
                    "pass --output_dir <new folder> for this evaluation."
                )
        return folder

    def _compare(self, stored: Mapping[str, Any], data_keys: tuple[str, ...]) -> list[str]:
        differences = []
        if stored.get("bundle") not in (None, self.bundle):
            differences.append(f"bundle: stored {stored['bundle']!r}, requested {self.bundle!r}")
        data = {k: v for k, v in self.data.items() if k in data_keys}
        differences += _differences(stored.get("data", {}), data)
        differences += _differences(stored.get("settings", {}), self.settings)
        differences += _differences(stored.get("network", {}), self.network, prefix="network_def#")
        return differences
