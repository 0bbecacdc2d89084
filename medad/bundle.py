"""Running medad bundles with stock MONAI and with the ``medad`` front.

Stock MONAI cannot take ``--config <folder>`` (fire passes it on as a config override and
``config_file`` must be a .json/.yaml file). So every bundle config resolves its own ``bundle_root``
with :func:`locate` (plain ``python -m monai.bundle run --config_file bundles/<name>/configs/train.json``
works from the repository root), and :func:`run` is the folder-taking front used by ``python -m medad run``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medad.overrides import OverrideError

__all__ = [
    "WORKFLOWS",
    "config_files",
    "default_run_dir",
    "export",
    "inference_dir",
    "locate",
    "logging_file",
    "pack",
    "parser",
    "run",
    "schema_path",
    "shared_configs_dir",
    "verify_metadata",
]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: workflow name -> (shared file of the top-level ``configs/``, the bundle's own file) merged after the training stack,
#: in this order; a missing bundle file is skipped (it holds only what differs for that bundle). The shared names
#: differ from the bundle's because MONAI (``ckpt_export``) refuses two config files with the same name in one list.
WORKFLOWS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (),
    "inference": (("base_inference.json", "inference.json"),),
    "evaluate": (("base_inference.json", "inference.json"), ("base_evaluate.json", "evaluate.json")),
    "multi_gpu_train": (("base_multi_gpu_train.json", "multi_gpu_train.json"),),
}
#: the data domains a bundle can be run on (``configs/data/<name>.json``; ``--data <name>``).
DATA_DOMAINS = ("industrial", "mri")


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


def shared_configs_dir(config: str | os.PathLike | None = None) -> Path:
    """The top-level ``configs/`` folder every bundle merges: ``$MEDAD_CONFIGS``, beside the bundle's ``bundles/``
    folder (a checkout), or the checkout medad runs from."""
    candidates = [Path(os.environ["MEDAD_CONFIGS"])] if os.environ.get("MEDAD_CONFIGS") else []
    if config is not None:
        candidates.append(_bundle_dir(config).parent.parent / "configs")
    candidates.append(REPO_ROOT / "configs")
    for candidate in candidates:
        if (candidate / "base.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"the shared configs folder (with base.json) is not in {', '.join(map(str, candidates))}.")


def _declared(train_file: Path) -> tuple[list[str], str | None]:
    """The shared files a bundle's ``train.json`` merges before itself (``parent_configs``, paths inside the
    top-level ``configs/``) and the data domain among them (``data/<domain>.json``; ``None`` if it names none)."""
    parents = json.loads(train_file.read_text(encoding="utf-8")).get("parent_configs", [])  # json: --help stays light
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ValueError(f"{train_file}: 'parent_configs' must be a list of file names inside the top-level configs/.")
    domains = [Path(p).stem for p in parents if Path(p).parent.name == "data"]
    return parents, domains[0] if domains else None


def config_files(config: str | os.PathLike, workflow: str = "train", data: str | None = None) -> list[str]:
    """The config files of ``workflow`` for the bundle at ``config`` (a folder, or a bundle name), in merge order.

    The training stack is ``configs/<parent>`` for each of the bundle's ``parent_configs`` (e.g. ``base.json``,
    ``data/mri.json``, ``networks/unet.json``; ``data`` replaces the ``data/*.json`` entry), the bundle's
    ``train.json`` and, on data other than its own, its overlay for that data (``<bundle>/configs/<data>.json``,
    if it has one); the other workflows add their shared file and the bundle's own (e.g. ``configs/base_inference.json``,
    then ``<bundle>/configs/inference.json`` if present). Stock MONAI runs the same list:
    ``python -m monai.bundle run --config_file "['...', ...]"`` (``medad run --config B --print_command``).

    Args:
        config: the bundle folder or name.
        workflow: one of :data:`WORKFLOWS`.
        data: the data domain (:data:`DATA_DOMAINS`); default: the one in the bundle's ``parent_configs``.
    """
    if workflow not in WORKFLOWS:
        raise ValueError(f"unknown workflow '{workflow}'; choose one of {', '.join(WORKFLOWS)}.")
    bundle = _bundle_dir(config)
    own = bundle / "configs"
    train = own / "train.json"
    if not train.is_file():
        raise FileNotFoundError(f"{train}: config file missing for workflow '{workflow}'.")
    parents, default_data = _declared(train)
    if data is not None and data not in DATA_DOMAINS:
        raise OverrideError(f"--data must be one of {', '.join(DATA_DOMAINS)}, not {data!r}.")
    if data is not None and default_data is None:
        raise OverrideError(f"{train}: this bundle names no data/*.json in its parent_configs, so --data cannot apply.")
    shared = shared_configs_dir(bundle)
    files = [shared / (f"data/{data}.json" if data and Path(p).parent.name == "data" else p) for p in parents]
    files.append(train)
    if data and data != default_data and (own / f"{data}.json").is_file():
        files.append(own / f"{data}.json")
    for shared_name, own_name in WORKFLOWS[workflow]:
        files += [shared / shared_name] + ([own / own_name] if (own / own_name).is_file() else [])
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: config file missing for workflow '{workflow}'.")
    return [str(f) for f in files]


def logging_file(config: str | os.PathLike) -> str:
    """The logging configuration: the bundle's own ``configs/logging.conf``, else the shared one."""
    own = _bundle_dir(config) / "configs" / "logging.conf"
    return str(own if own.is_file() else shared_configs_dir(config) / "logging.conf")


def parser(config: str | os.PathLike, workflow: str = "train", data: str | None = None, extra_configs: Sequence[str] = (),
           **override: Any) -> Any:
    """A :class:`monai.bundle.ConfigParser` of the workflow's merged files with ``override`` applied (not run);
    for inference/evaluate also the stored run's settings, network and data domain, as :func:`run` applies them."""
    from monai.bundle import ConfigParser

    bundle = _bundle_dir(config)
    override = {"bundle_root": str(bundle), **override}
    files, stored = _workflow_files(bundle, workflow, data, extra_configs, override)
    result = ConfigParser()
    result.read_config(files)
    result.update({**override, **stored})  # "#"-paths (network_def#channels) are set nested
    return result


def run(
    config: str | os.PathLike,
    workflow: str = "train",
    run_id: str = "run",
    extra_configs: Sequence[str] | None = None,
    shard: str | None = None,
    data: str | None = None,
    **override: Any,
) -> None:
    """Run a bundle folder the way ``python -m monai.bundle run`` runs its config files.

    Args:
        config: the bundle folder (``bundles/disyre``) or a bundle name (``disyre``).
        workflow: ``train`` (train + evaluate), ``inference``, ``evaluate`` or ``multi_gpu_train``.
        run_id: the config entry to run (MONAI's ``run_id``).
        extra_configs: more config files merged after the workflow's own (e.g. a bundle's ``fast.json``).
        data: the data domain, ``industrial`` or ``mri`` (``configs/data/<data>.json`` plus the bundle's overlay
            for it); default: the bundle's own (in its ``parent_configs``), or for inference/evaluate the data the
            run was trained on.
        override: ``--key value`` overrides, as for ``monai.bundle run`` (e.g. ``dataset_dir``, ``quick``).
            ``tracking="mlflow"`` (with optional ``tracking_uri``, ``experiment_name``, ``run_name``) turns on
            experiment tracking (:mod:`medad.engine.tracking`) instead of MONAI's ignite handlers.
        shard: ``"K/N"`` (inference and evaluate): score only shard K of N of the sorted cases
            (:mod:`medad.engine.shards`; the evaluator's ``shard``).
    """
    from monai.bundle import run as monai_run

    bundle = _bundle_dir(config)
    if "parent_configs" in override:  # it chooses the files, which are read before any override applies
        raise OverrideError("--parent_configs cannot be overridden (it lists the files merged before the bundle's "
                            "train.json); use --data, --extra_configs, or edit the bundle's train.json.")
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
    files, stored = _workflow_files(bundle, workflow, data, extra_configs or [], override)
    override.update(stored)
    # MONAI's run drops overrides whose value is None (update_kwargs(ignore_none=True)); "$None" keeps them, so a
    # stored `patch_size: null` or a user's `--pixdim null` is applied, not silently replaced by the config default.
    override = {key: "$None" if value is None else value for key, value in override.items()}
    monai_run(
        run_id=run_id,
        config_file=files,
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=logging_file(bundle),
        **override,
    )


def _workflow_files(bundle: Path, workflow: str, data: str | None, extra_configs: Sequence[str],
                    override: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The workflow's files and, for inference/evaluate, the overrides that rebuild the stored run (its network,
    settings and the data domain it was trained on, unless ``data`` is given)."""
    files = config_files(bundle, workflow, data) + list(extra_configs)
    if workflow not in ("inference", "evaluate"):
        return files, {}
    stored = _stored_settings(files, override, workflow)
    trained_on = stored.get("data")
    if data is not None and trained_on not in (None, data):
        raise OverrideError(f"--data {data}: the model was trained on {trained_on} data; drop --data (it is read "
                            "from the run) or pass the --run_dir of a run trained on that data.")
    if data is None and trained_on not in (None, _declared(bundle / "configs" / "train.json")[1]):
        files = config_files(bundle, workflow, trained_on) + list(extra_configs)
        stored = _stored_settings(files, override, workflow)
    return files, stored


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

    # brain_geometry: the training volumes' brain size and extent, stored with shipped weights (whose training
    # volumes are elsewhere), so evaluation and inference warn about volumes not in the training space
    data_keys = (*TRAINING_DATA_KEYS, "brain_geometry") if workflow == "evaluate" else ("brain_geometry",)
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
        format: ``"torchscript"`` (deprecated by PyTorch but kept working; the same file stock
            ``monai.bundle ckpt_export`` writes),
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
    from monai.bundle import ConfigParser

    merged = parser(bundle, "inference", override.pop("data", None), ckpt_path=ckpt_file, **override)
    writer = {"torchscript": formats.export_torchscript, "pt2": formats.export_program, "onnx": formats.export_onnx}
    meta_file = bundle / "configs" / "metadata.json"
    metadata = ConfigParser.load_config_file(str(meta_file)) if meta_file.is_file() else None
    writer[format](merged.get_parsed_content("network_def"), ckpt_file, filepath, bundle=merged.get("bundle_name"),
                   metadata=metadata, config=merged.get())
    print(f"medad export: {ckpt_file} -> {filepath}", flush=True)
    return filepath


def pack(config: str | os.PathLike, out_dir: str | os.PathLike, data: str | None = None) -> Path:
    """Write a self-contained MONAI bundle: one merged config per workflow, metadata, logging, weights, docs.

    Each workflow's files (:func:`config_files`) are merged into ``OUT/configs/<workflow>.json``, so stock
    ``python -m monai.bundle run --config_file OUT/configs/inference.json`` runs it from any folder (``bundle_root``
    is written as OUT's absolute path; pass ``--bundle_root`` after moving the folder). The inference and evaluate
    configs carry the shipped model's stored settings (its ``run.json``), which ``medad run`` would otherwise
    apply, so the network is rebuilt exactly as trained. ``metadata.json`` gains ``files_sha256`` (SHA-256 of every
    packed file) and still validates against the bundle schema.

    Args:
        config: the bundle folder or name.
        out_dir: the new bundle folder; must not exist or be empty.
        data: the data domain to pack (default: the bundle's own).

    Returns:
        the packed bundle folder.
    """
    import shutil

    from medad.io import write_json

    bundle = _bundle_dir(config)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: the pack folder exists and is not empty; choose a new folder.")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for folder in ("models", "docs"):
        if (bundle / folder).is_dir():
            shutil.copytree(bundle / folder, out / folder, ignore=shutil.ignore_patterns("checkpoint.pt"))
    if (bundle / "run.json").is_file():
        shutil.copy2(bundle / "run.json", out / "run.json")
    for workflow in WORKFLOWS:
        merged = parser(bundle, workflow, data, bundle_root=str(out)).get()
        merged.pop("parent_configs", None)
        write_json(out / "configs" / f"{workflow}.json", merged, indent=4)
    shutil.copy2(logging_file(bundle), out / "configs" / "logging.conf")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    metadata["files_sha256"] = {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.rglob("*")) if path.is_file()
    }
    write_json(out / "configs" / "metadata.json", metadata, indent=4)
    return out
