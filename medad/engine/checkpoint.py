"""Checkpoints: what a trained model needs to give the same anomaly maps and decisions anywhere.

A checkpoint stores, beside the network weights, the name of the bundle that trained it and the
calibration (score normalisation and thresholds chosen on normal validation data), so training-time
evaluation, ``inference.json`` and an exported TorchScript model agree.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "load_network_weights", "store_calibration", "CheckpointMismatchError"]


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by another bundle or for another network."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        # mkstemp creates the file with mode 0600; give it the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a bare network state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train the bundle first or pass the --run_dir of a trained run.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error}).") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dictionary, found {type(state).__name__}.")
    return state


def load_network_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    bundle: str | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load the network weights of a checkpoint into ``network`` and return the whole checkpoint.

    Raises one clear error when the checkpoint belongs to another bundle or does not fit the network.
    """
    state = load_checkpoint(path, map_location)
    saved_bundle = state.get("bundle")
    if bundle is not None and saved_bundle is not None and saved_bundle != bundle:
        raise CheckpointMismatchError(
            f"{path}: this checkpoint was trained by bundle '{saved_bundle}', not '{bundle}'."
        )
    weights = state.get("network", state)
    try:
        network.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointMismatchError(
            f"{path}: the weights do not fit this network configuration ({first})."
        ) from error
    return state


def store_calibration(path: str | os.PathLike, calibration: dict[str, Any], profile: str = "paper") -> None:
    """Write calibrated thresholds into the checkpoint at ``path``: ``calibration`` for the paper inference
    setting, ``calibrations[profile]`` for another (each setting's maps need their own thresholds)."""
    state = load_checkpoint(path)
    if profile == "paper":
        state["calibration"] = calibration
    else:
        state["calibrations"] = {**dict(state.get("calibrations") or {}), profile: dict(calibration)}
    save_checkpoint(path, state)
