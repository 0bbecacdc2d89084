"""Calibration that travels with the model: beside the checkpoint, inside the checkpoint, inside TorchScript.

Thresholds chosen on normal validation data (see :func:`medad.engine.calibrate_thresholds`) are stored

- in the checkpoint (``model.pt["calibration"]``),
- in ``calibration.json`` beside it, a bundle-config-shaped JSON (``{"medad_calibration": {...}}``), so that the
  stock ``python -m monai.bundle ckpt_export ... --config_file "['.../inference.json', '.../calibration.json']"``
  embeds it in the TorchScript file as the extra file ``calibration.json`` (ckpt_export stores every config file
  it is given), and
- in a TorchScript file written by :func:`export_torchscript` or :func:`medad.bundle.export`.

Each copy carries a fingerprint of the network weights it was computed for; loading a calibration for other
weights is an error, so a stale threshold never silently decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medad.io.atomic import atomic_save, write_json

from .checkpoint import CheckpointMismatchError

__all__ = [
    "CALIBRATION_FILE",
    "CALIBRATION_KEY",
    "weights_fingerprint",
    "calibration_path",
    "write_calibration_file",
    "read_calibration",
    "is_torchscript",
    "load_torchscript",
    "export_torchscript",
]

#: Name of the calibration file beside a checkpoint and inside a TorchScript archive.
CALIBRATION_FILE = "calibration.json"
#: Top-level key of that file (a bundle config key no bundle uses for anything else).
CALIBRATION_KEY = "medad_calibration"


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and values of a network's ``state_dict`` (device independent)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not torch.is_tensor(tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # reshape: 0-dim BatchNorm counters
    return digest.hexdigest()


def calibration_path(checkpoint_path: str | os.PathLike) -> Path:
    """``calibration.json`` in the checkpoint's folder."""
    return Path(checkpoint_path).with_name(CALIBRATION_FILE)


def _record(calibration: Mapping[str, Any], bundle: str | None, fingerprint: str) -> dict[str, Any]:
    return {CALIBRATION_KEY: {"bundle": bundle, "weights_sha256": fingerprint, "calibration": dict(calibration)}}


def write_calibration_file(
    checkpoint_path: str | os.PathLike, calibration: Mapping[str, Any], bundle: str | None, fingerprint: str
) -> Path:
    """Write ``calibration.json`` beside ``checkpoint_path`` (atomically)."""
    return write_json(calibration_path(checkpoint_path), _record(calibration, bundle, fingerprint))


def read_calibration(
    record: Mapping[str, Any] | str | os.PathLike, fingerprint: str | None = None, source: str | None = None
) -> dict[str, Any]:
    """The calibration of a ``calibration.json`` record (a path or its parsed content).

    Args:
        record: the file, or its content ``{"medad_calibration": {...}}``.
        fingerprint: the weights' :func:`weights_fingerprint`; a record made for other weights raises
            :class:`~medad.engine.CheckpointMismatchError`.
        source: file name used in error messages.

    Returns:
        ``{"bundle", "weights_sha256", "calibration"}``.
    """
    if not isinstance(record, Mapping):
        source = source or str(record)
        try:
            record = json.loads(Path(record).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{source}: not a readable calibration file ({error}).") from error
    source = source or CALIBRATION_FILE
    content = record.get(CALIBRATION_KEY) if isinstance(record, Mapping) else None
    if not isinstance(content, Mapping) or "calibration" not in content:
        raise ValueError(f"{source}: no '{CALIBRATION_KEY}' entry; it is not a medad calibration file.")
    if fingerprint is not None and content.get("weights_sha256") not in (None, fingerprint):
        raise CheckpointMismatchError(
            f"{source}: the thresholds were calibrated for other network weights; recalibrate this model."
        )
    return dict(content)


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (``torch.jit.save``), False for a ``torch.save`` checkpoint."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def load_torchscript(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a TorchScript network and the medad calibration embedded in it.

    Returns:
        ``(module, info)``; ``info`` has ``"metadata"`` (the bundle's metadata.json, or {}) and, when the file
        carries one, ``"calibration"`` and ``"bundle"``, checked against the module's own weights.
    """
    extra = {CALIBRATION_FILE: "", "metadata.json": ""}
    try:
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as error:
        raise ValueError(f"{path}: not a readable TorchScript model ({type(error).__name__}: {error}).") from error
    info: dict[str, Any] = {"metadata": json.loads(extra["metadata.json"]) if extra["metadata.json"] else {}}
    if extra[CALIBRATION_FILE]:
        record = read_calibration(json.loads(extra[CALIBRATION_FILE]), weights_fingerprint(module.state_dict()),
                                  source=f"{path} ({CALIBRATION_FILE})")
        info["calibration"] = record["calibration"]
        info["bundle"] = record.get("bundle")
    return module, info


def export_torchscript(
    network: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    filepath: str | os.PathLike,
    bundle: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    config_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Script ``network`` with the weights of ``checkpoint_path`` and save it with its calibration, atomically.

    Args:
        network: an instance of the bundle's ``network_def`` (its weights are replaced).
        checkpoint_path: ``model.pt`` written by the trainer and calibrated by the evaluator.
        filepath: the ``.ts`` file.
        bundle: expected bundle name (checked against the checkpoint).
        metadata: the bundle's metadata.json content, stored as ``metadata.json``.
        config_files: JSON configs stored as extra files under their own names (as ``ckpt_export`` does).
    """
    from .checkpoint import load_network_weights

    state = load_network_weights(network, checkpoint_path, bundle)
    extra: dict[str, str] = {}
    for config in config_files:
        extra[Path(config).name] = json.dumps(json.loads(Path(config).read_text()))
    if metadata is not None:
        extra["metadata.json"] = json.dumps(dict(metadata))
    calibration = state.get("calibration")
    if calibration is None and calibration_path(checkpoint_path).is_file():
        calibration = read_calibration(calibration_path(checkpoint_path), weights_fingerprint(network.state_dict()))["calibration"]
    if calibration is not None:
        extra[CALIBRATION_FILE] = json.dumps(
            _record(calibration, state.get("bundle", bundle), weights_fingerprint(network.state_dict()))
        )
    scripted = torch.jit.script(network.cpu().eval())
    return atomic_save(filepath, lambda name: torch.jit.save(scripted, name, _extra_files=extra))

