"""Running medad bundles with stock MONAI and with the ``medad`` front.

Stock MONAI cannot take ``--config <folder>`` (fire passes it on as a config override and
``config_file`` must be a .json/.yaml file). So every bundle config resolves its own ``bundle_root``
with :func:`locate` (plain ``python -m monai.bundle run --config_file bundles/<name>/configs/train.json``
works from the repository root), and :func:`run` is the folder-taking front used by ``python -m medad run``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medad.overrides import OverrideError

__all__ = [
    "locate",
    "config_files",
    "run",
    "verify_metadata",
    "export",
    "schema_path",
    "default_run_dir",
    "inference_dir",
    "WORKFLOWS",
]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: workflow name -> the bundle config files merged for it (later files override earlier ones).
WORKFLOWS: dict[str, tuple[str, ...]] = {
    "train": ("train.json",),
    "inference": ("inference.json",),
    "evaluate": ("inference.json", "evaluate.json"),
    "multi_gpu_train": ("train.json", "multi_gpu_train.json"),
}


def locate(name: str) -> str:
    """The folder of bundle ``name``: ``$MEDAD_BUNDLES/<name>``, ``./bundles/<name>``, or the checkout's copy."""
    candidates = []
    if os.environ.get("MEDAD_BUNDLES"):
        candidates.append(Path(os.environ["MEDAD_BUNDLES"]) / name)
    candidates += [Path.cwd() / "bundles" / name, REPO_ROOT / "bundles" / name]
    for candidate in candidates:
        if (candidate / "configs").is_dir():
            return str(candidate.resolve())
    raise FileNotFoundError(f"bundle '{name}' not found in {', '.join(str(c) for c in candidates)}.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "data"


def default_run_dir(bundle_name: str, dataset_dir: str | os.PathLike | None = None, *parts: Any) -> str:
    """The default run folder ``./runs/<bundle>/<dataset-tag>[/<part>...]`` (outside the source tree).

    Args:
        bundle_name: the bundle.
        dataset_dir: the training data folder; ``None`` (the embedded demo data) gives the tag ``demo``, a folder
            gives ``<its name>-<8 hex digits of its absolute path>`` (readable, and two folders never collide).
        parts: more sub-folders (e.g. the MVTec category); ``None`` entries are skipped.
    """
    if dataset_dir in (None, ""):
        tag = "demo"
    else:
        absolute = str(Path(str(dataset_dir)).expanduser().resolve())
        tag = f"{_slug(Path(absolute).name)}-{hashlib.sha1(absolute.encode()).hexdigest()[:8]}"
    extra = [_slug(str(p)) for p in parts if p not in (None, "")]
    return str(Path.cwd().joinpath("runs", bundle_name, tag, *extra))


def inference_dir(bundle_name: str, run_dir: str | os.PathLike | None = None) -> str:
    """Where inference writes: ``<run_dir>/inference``, or ``./runs/<bundle>/inference`` for shipped weights."""
    return str(Path(run_dir) / "inference") if run_dir else str(Path.cwd().joinpath("runs", bundle_name, "inference"))


def schema_path() -> str:
    """The bundle-metadata JSON schema shipped with medad (so verification works offline)."""
    return str(Path(__file__).resolve().parent / "schemas" / "meta_schema.json")


def _bundle_dir(config: str | os.PathLike) -> Path:
    path = Path(config)
    if not path.exists() and not path.is_absolute():
        try:
            path = Path(locate(str(config)))
        except FileNotFoundError:
            pass
    if path.is_file():  # a config file inside <bundle>/configs
        path = path.parent.parent
    if not (path / "configs").is_dir():
        raise FileNotFoundError(f"{config}: not a bundle folder (expected a 'configs' folder inside it).")
    return path.resolve()


def config_files(config: str | os.PathLike, workflow: str = "train") -> list[str]:
    """The config files of ``workflow`` for the bundle at ``config`` (a folder, or a bundle name)."""
    if workflow not in WORKFLOWS:
        raise ValueError(f"unknown workflow '{workflow}'; choose one of {', '.join(WORKFLOWS)}.")
    configs = _bundle_dir(config) / "configs"
    files = [configs / name for name in WORKFLOWS[workflow]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: config file missing for workflow '{workflow}'.")
    return [str(f) for f in files]


def run(
    config: str | os.PathLike,
    workflow: str = "train",
    run_id: str = "run",
    extra_configs: Sequence[str] | None = None,
    shard: str | None = None,
    **override: Any,
) -> None:
    """Run a bundle folder the way ``python -m monai.bundle run`` runs its config files.

    Args:
        config: the bundle folder (``bundles/disyre``) or a bundle name (``disyre``).
        workflow: ``train`` (train + evaluate), ``inference``, ``evaluate`` or ``multi_gpu_train``.
        run_id: the config entry to run (MONAI's ``run_id``).
        extra_configs: more config files merged after the workflow's own.
        override: ``--key value`` overrides, as for ``monai.bundle run`` (e.g. ``dataset_dir``, ``quick``).
            ``tracking="mlflow"`` (with optional ``tracking_uri``, ``experiment_name``, ``run_name``) turns on
            experiment tracking (:mod:`medad.engine.tracking`) instead of MONAI's ignite handlers.
        shard: ``"K/N"`` (inference and evaluate): score only shard K of N of the sorted cases
            (:mod:`medad.engine.shards`; the evaluator's ``shard``).
    """
    from monai.bundle import run as monai_run

    bundle = _bundle_dir(config)
    files = config_files(bundle, workflow) + list(extra_configs or [])
    override.setdefault("bundle_root", str(bundle))
    _tracking_overrides(override)
    if shard not in (None, ""):
        if workflow not in ("inference", "evaluate"):
            raise OverrideError(f"--shard splits the cases of the inference and evaluate workflows, not of {workflow}.")
        from medad.engine.shards import parse_shard

        try:
            override["evaluator#shard"] = "{}/{}".format(*parse_shard(shard))
        except ValueError as error:
            raise OverrideError(str(error)) from error
    if workflow in ("inference", "evaluate"):  # rebuild the stored network; the user never repeats --quick etc.
        override.update(_stored_settings(files, override, workflow))
    logging_file = bundle / "configs" / "logging.conf"
    monai_run(
        run_id=run_id,
        config_file=files,
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(logging_file) if logging_file.is_file() else None,
        **override,
    )


def _tracking_overrides(override: dict[str, Any]) -> None:
    """Replace MONAI's ``tracking`` options by the ``tracker`` component the medad trainer and evaluator use.

    MONAI's ``--tracking mlflow`` attaches ignite handlers to ``train#trainer`` / ``evaluator``, which medad's
    engines are not; ``mlflow`` (the only backend) becomes :func:`medad.engine.tracking.tracker_config`.
    """
    tracking = override.pop("tracking", None)
    settings = {k: override.pop(k, None) for k in ("tracking_uri", "experiment_name", "run_name")}
    override.pop("save_execute_config", None)
    if tracking in (None, "", False):
        if any(v is not None for v in settings.values()):
            raise OverrideError("--tracking_uri / --experiment_name / --run_name need --tracking mlflow.")
        return
    if tracking != "mlflow":
        raise OverrideError(f"--tracking takes mlflow (the only experiment tracker medad supports), not {tracking!r}.")
    from medad.engine.tracking import tracker_config

    override["tracker"] = tracker_config(**settings)


def _stored_settings(files: Sequence[str], override: dict[str, Any], workflow: str = "inference") -> dict[str, Any]:
    """Overrides that rebuild the network and settings stored with the model the workflow will load.

    The model is the config's ``ckpt_path`` (default ``<run_dir>/models/model.pt``, or the bundle's shipped
    ``models/model.pt``); its record is ``run.json`` one folder up. An explicit override that disagrees with the
    record raises :class:`~medad.engine.run_folder.RunFolderMismatchError`.
    """
    from monai.bundle import ConfigParser

    from medad.engine.run_folder import read_run_record, settings_overrides

    parser = ConfigParser()
    parser.read_config(list(files))
    try:
        parser.update(dict(override))
        ckpt_path = parser.get_parsed_content("ckpt_path")
    except Exception:  # an unusual config: the workflow itself will report what is wrong
        return {}
    folder = Path(str(ckpt_path)).expanduser().resolve().parent.parent
    record = read_run_record(folder)
    if record is None:
        return {}
    from medad.engine.run_folder import TRAINING_DATA_KEYS

    data_keys = TRAINING_DATA_KEYS if workflow == "evaluate" else ()
    return settings_overrides(record, parser.get(), override, source=str(folder / "run.json"), data_keys=data_keys)


def verify_metadata(config: str | os.PathLike) -> None:
    """Validate ``configs/metadata.json`` against the shipped schema, offline."""
    from monai.bundle import verify_metadata as monai_verify

    bundle = _bundle_dir(config)
    monai_verify(meta_file=str(bundle / "configs" / "metadata.json"), filepath=schema_path())


def export(
    config: str | os.PathLike,
    ckpt_file: str | None = None,
    filepath: str | None = None,
    format: str = "torchscript",
    **override: Any,
) -> str:
    """Export the trained network of a bundle with its calibrated thresholds embedded.

    The calibrated thresholds (``calibration.json`` beside the checkpoint, written by the evaluator) and the
    fingerprint of the weights they belong to are embedded in the exported file, so evaluating it decides exactly
    like ``model.pt``. ``run_dir=<folder>`` exports that run's ``models/model.pt`` (default: the bundle's shipped
    weights), with the network rebuilt from the run's ``run.json``.

    Args:
        config: the bundle folder or name.
        ckpt_file: the checkpoint (default ``<run_dir or bundle>/models/model.pt``).
        filepath: the exported file (default: ``model.ts`` / ``model.pt2`` / ``model.onnx`` beside the checkpoint).
        format: ``"torchscript"`` (``monai.bundle ckpt_export``; deprecated by PyTorch but kept working),
            ``"pt2"`` (``torch.export``) or ``"onnx"`` (dynamo-based ``torch.onnx.export``, run by onnxruntime).
            ``.pt2`` and ``.onnx`` keep batch and image sizes free; any of the three runs in the inference
            workflow as ``--ckpt_path <file>``.
        override: ``--key value`` overrides of the bundle's inference.json.
    """
    from medad.engine import export as formats

    if format not in formats.EXPORT_FORMATS:
        raise OverrideError(f"--format must be one of {', '.join(formats.EXPORT_FORMATS)}, not {format!r}.")
    bundle = _bundle_dir(config)
    model_dir = Path(override["run_dir"]) / "models" if override.get("run_dir") else bundle / "models"
    filepath = filepath or str(model_dir / f"model{formats.EXPORT_FORMATS[format]}")
    ckpt_file = ckpt_file or str(model_dir / "model.pt")
    configs = [str(bundle / "configs" / "inference.json")]
    override.update(_stored_settings(configs, {**override, "bundle_root": str(bundle), "ckpt_path": ckpt_file}))
    meta_file = bundle / "configs" / "metadata.json"
    if format == "torchscript":
        from monai.bundle import ckpt_export

        if formats.calibration_path(ckpt_file).is_file():
            configs.append(str(formats.calibration_path(ckpt_file)))  # ckpt_export stores every config as an extra file
        with formats.quiet_torchscript():
            ckpt_export(net_id="network_def", filepath=filepath, ckpt_file=ckpt_file, meta_file=str(meta_file),
                        config_file=configs, key_in_ckpt="network", bundle_root=str(bundle), **override)
    else:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(configs)
        parser.update({**override, "bundle_root": str(bundle), "ckpt_path": ckpt_file})
        writer = formats.export_program if format == "pt2" else formats.export_onnx
        metadata = ConfigParser.load_config_file(str(meta_file)) if meta_file.is_file() else None
        writer(parser.get_parsed_content("network_def"), ckpt_file, filepath, bundle=parser.get("bundle_name"),
               metadata=metadata, config_files=configs)
    print(f"medad export: {ckpt_file} -> {filepath}", flush=True)
    return filepath
