"""Calibration that travels with the model: beside the checkpoint, inside the checkpoint, inside every export.

Thresholds chosen on normal validation data (see :func:`medad.engine.calibrate_thresholds`) are stored

- in the checkpoint (``model.pt["calibration"]``),
- in ``calibration.json`` beside it, a bundle-config-shaped JSON (``{"medad_calibration": {...}}``), so that the
  stock ``python -m monai.bundle ckpt_export ... --config_file "['.../inference.json', '.../calibration.json']"``
  embeds it in the TorchScript file as the extra file ``calibration.json`` (ckpt_export stores every config file
  it is given), and
- in an exported network (:func:`medad.bundle.export`, ``medad export --format torchscript|pt2|onnx``):
  TorchScript ``.ts`` (:func:`export_torchscript`; its extra files), ``torch.export`` ``.pt2``
  (:func:`export_program`; the ``extra_files`` of :func:`torch.export.save`) and ONNX ``.onnx``
  (:func:`export_onnx`; the model's ``metadata_props``), each under the key ``calibration.json``.

Each copy carries a fingerprint of the network weights it was computed for; loading a calibration for other
weights is an error, so a stale threshold never silently decides. TorchScript is deprecated by PyTorch (2.10+):
medad still writes and reads it, but ``.pt2`` and ``.onnx`` are the formats that last. :func:`load_exported`
loads any of the three as a ``torch.nn.Module`` the inferers call exactly like the eager network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medad.io.atomic import atomic_save, write_json

from .checkpoint import CheckpointMismatchError, store_calibration

__all__ = [
    "CALIBRATION_FILE",
    "CALIBRATION_KEY",
    "CONFIG_FILE",
    "EXPORT_FORMATS",
    "ExportedNetwork",
    "OnnxNetwork",
    "calibration_path",
    "export_inputs",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "is_torchscript",
    "load_exported",
    "load_onnx",
    "load_program",
    "load_torchscript",
    "model_format",
    "network_fingerprint",
    "quiet_torchscript",
    "read_calibration",
    "store_thresholds",
    "weights_fingerprint",
    "write_calibration_file",
]

logger = logging.getLogger("medad.export")

#: Name of the calibration file beside a checkpoint and inside a TorchScript archive.
CALIBRATION_FILE = "calibration.json"
#: Top-level key of that file (a bundle config key no bundle uses for anything else).
CALIBRATION_KEY = "medad_calibration"
#: Name of the merged inference config inside an exported file (what ``ckpt_export`` calls its config file).
CONFIG_FILE = "inference.json"
#: ``medad export --format`` -> file suffix.
EXPORT_FORMATS: dict[str, str] = {"torchscript": ".ts", "pt2": ".pt2", "onnx": ".onnx"}


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


def network_fingerprint(network: torch.nn.Module) -> str:
    """:func:`weights_fingerprint` of a network, eager or loaded by :func:`load_exported` (which records the
    fingerprint of the weights it was exported from, as an ONNX session has no ``state_dict``)."""
    recorded = getattr(network, "weights_sha256", None)
    return recorded if isinstance(recorded, str) else weights_fingerprint(network.state_dict())


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


def store_thresholds(
    checkpoint_path: str | os.PathLike,
    calibration: Mapping[str, Any],
    profile: str,
    bundle: str | None,
    network: torch.nn.Module,
) -> None:
    """Write calibrated thresholds where inference and export read them: into the checkpoint (``calibration`` for
    the ``paper`` inference profile, ``calibrations[profile]`` for another) and, for ``paper``, into
    ``calibration.json`` beside it, fingerprinted with ``network``'s weights, for ckpt_export to embed."""
    store_calibration(checkpoint_path, dict(calibration), profile)
    if profile == "paper":
        write_calibration_file(checkpoint_path, calibration, bundle, weights_fingerprint(network.state_dict()))


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


# -- which format -------------------------------------------------------------------------------------
def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (``torch.jit.save``), False for a ``torch.save`` checkpoint."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def model_format(path: str | os.PathLike) -> str | None:
    """``"torchscript"``, ``"pt2"`` or ``"onnx"`` for an exported network, None for a ``torch.save`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if not zipfile.is_zipfile(path):
        return None
    from torch.export.pt2_archive import is_pt2_package

    if is_pt2_package(str(path)):
        return "pt2"
    return "torchscript" if is_torchscript(path) else None


# -- TorchScript ----------------------------------------------------------------------------------------
_TORCHSCRIPT_NOTE = (
    "TorchScript is deprecated in PyTorch; medad still writes and reads .ts, but .pt2 and .onnx "
    "(medad export --format pt2|onnx) are the formats that last."
)
_noted = False


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Run ``torch.jit.script/save/load`` without their deprecation warnings (torch ≥ 2.10 warns on every call);
    one line per process says instead which formats last."""
    global _noted
    if not _noted:
        _noted = True
        logger.warning(_TORCHSCRIPT_NOTE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        yield


def load_torchscript(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a TorchScript network and the medad calibration embedded in it.

    Returns:
        ``(module, info)``; ``info`` has ``"metadata"`` (the bundle's metadata.json, or {}), ``"config"`` (the
        merged inference config it was exported with, or {}) and, when the file carries one, ``"calibration"`` and
        ``"bundle"``, checked against the module's own weights.
    """
    extra = {CALIBRATION_FILE: "", "metadata.json": "", CONFIG_FILE: ""}
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as error:
        raise ValueError(f"{path}: not a readable TorchScript model ({type(error).__name__}: {error}).") from error
    return module, _info(extra, path, weights_fingerprint(module.state_dict()))


def _info(files: Mapping[str, str | bytes], path: str | os.PathLike, fingerprint: str | None) -> dict[str, Any]:
    """``{"metadata", "config", "calibration", "bundle", "weights_sha256"}`` from an export's embedded files; the
    calibration is checked against ``fingerprint`` (the loaded weights'), or taken as recorded when it is None."""
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in files.items()}
    info: dict[str, Any] = {name: json.loads(text[file]) if text.get(file) else {}
                            for name, file in (("metadata", "metadata.json"), ("config", CONFIG_FILE))}
    if text.get(CALIBRATION_FILE):
        record = read_calibration(json.loads(text[CALIBRATION_FILE]), fingerprint, source=f"{path} ({CALIBRATION_FILE})")
        info["calibration"] = record["calibration"]
        info["bundle"] = record.get("bundle")
        info["weights_sha256"] = record.get("weights_sha256")
    return info


# -- torch.export (.pt2) --------------------------------------------------------------------------------
class ExportedNetwork(torch.nn.Module):
    """The module of a ``torch.export`` program, called like the eager network (``network(x[, timesteps])``).

    An exported graph is frozen in inference mode and ``GraphModule.eval()`` raises for it, so this wrapper owns
    ``train()``/``eval()`` (no-ops apart from the flag) while the inferers and the evaluator stay unchanged.

    Args:
        program: the loaded :class:`torch.export.ExportedProgram`.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()
        #: the fingerprint of the eager weights (the exported module keeps their names and values)
        self.weights_sha256 = weights_fingerprint(self.program.state_dict())
        self.training = False

    def train(self, mode: bool = True) -> ExportedNetwork:
        if mode:
            raise RuntimeError("an exported .pt2 network runs inference only; train the eager network (model.pt).")
        self.training = False
        return self

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) images [and (B,) integer timesteps] -> the eager network's output."""
        return self.program(*args)


def load_program(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[ExportedNetwork, dict[str, Any]]:
    """Load a ``torch.export`` archive (``.pt2``) and its embedded calibration (checked against its weights).

    Returns:
        ``(network, info)`` as :func:`load_torchscript`.
    """
    extra = {CALIBRATION_FILE: "", "metadata.json": "", CONFIG_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as error:
        raise ValueError(f"{path}: not a readable torch.export (.pt2) model ({type(error).__name__}: {error}).") from error
    device = torch.device(map_location)
    if device.type != "cpu":  # device constants are baked into the graph: move them with the weights
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    network = ExportedNetwork(program)
    return network, _info(extra, path, network.weights_sha256)


# -- ONNX ---------------------------------------------------------------------------------------------
class OnnxNetwork(torch.nn.Module):
    """An ONNX model run by onnxruntime, called like the eager network: ``network(x[, timesteps])`` on tensors.

    Inputs go to the session as numpy arrays (float32 images, int64 timesteps) and the output comes back as a
    tensor on the input's device and dtype, so the inferers need no change. The session uses as many threads as
    torch (``torch.get_num_threads()`` when it is built), and CUDA when ``device`` is a GPU and onnxruntime has it.

    Args:
        path: the ``.onnx`` file.
        device: where outputs go; selects the execution provider.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(f"{path}: running an ONNX model needs onnxruntime (pip install \"medad[export]\").") from error
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not for users
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:
            raise ValueError(f"{path}: not a readable ONNX model ({type(error).__name__}: {error}).") from error
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        #: the fingerprint recorded at export (a session exposes no state_dict to fingerprint)
        self.weights_sha256 = None
        self.training = False

    def train(self, mode: bool = True) -> OnnxNetwork:
        if mode:
            raise RuntimeError("an ONNX network runs inference only; train the eager network (model.pt).")
        self.training = False
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, *spatial) images [and (B,) or scalar integer timesteps] -> the eager network's output."""
        feeds = {self.input_names[0]: x.detach().to("cpu", torch.float32).numpy()}
        if len(self.input_names) > 1:
            t = torch.zeros(x.shape[0], dtype=torch.long) if timesteps is None else timesteps.detach().to("cpu", torch.long)
            feeds[self.input_names[1]] = t.expand(x.shape[0]).contiguous().numpy() if t.dim() == 0 else t.numpy()
        output = self.session.run(None, feeds)[0]
        return torch.from_numpy(output).to(device=x.device, dtype=x.dtype)


def load_onnx(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[OnnxNetwork, dict[str, Any]]:
    """Load an ONNX export (``.onnx``) for onnxruntime, with the calibration in its ``metadata_props``.

    The calibration is taken with the weights fingerprint recorded next to it at export (where it was checked
    against the exported weights); an ONNX graph keeps no ``state_dict`` to fingerprint again.

    Returns:
        ``(network, info)`` as :func:`load_torchscript`.
    """
    network = OnnxNetwork(path, map_location)
    info = _info(network.metadata, path, None)
    network.weights_sha256 = info.get("weights_sha256")
    return network, info


def load_exported(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load an exported network of any format (:func:`model_format`) with its embedded calibration.

    Raises:
        ValueError: ``path`` is not an exported network (a ``torch.save`` checkpoint, or another file).
    """
    loaders = {"torchscript": load_torchscript, "pt2": load_program, "onnx": load_onnx}
    kind = model_format(path)
    if kind is None:
        raise ValueError(f"{path}: not an exported network (TorchScript .ts, torch.export .pt2 or ONNX .onnx).")
    return loaders[kind](path, map_location)


# -- export -------------------------------------------------------------------------------------------
def export_inputs(network: torch.nn.Module, batch: int = 2) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    """Example inputs of the call the inferers make, and their dynamic shapes in the same order (for
    ``torch.export`` and ONNX; positional, so the names of the forward's arguments do not matter).

    For an :class:`~medad.networks.AnomalyUNet`: ``x`` ``(batch, in_channels, *spatial)`` with every spatial size a
    free multiple of ``size_divisor`` (so one export serves any image size, window or slice), and for
    time-conditioned networks ``timesteps`` ``(batch,)`` int64; the batch size is free. Other networks (the
    ``intensity`` baseline) take ``x`` ``(batch, 1, 16, ..., 16)`` with free batch and spatial sizes.
    """
    from torch.export import Dim

    spatial_dims = int(getattr(network, "spatial_dims", 2))
    divisor = int(getattr(network, "size_divisor", 1))
    channels = int(getattr(network, "in_channels", 1))
    size = max(2 * divisor, 16)
    count = Dim("batch", min=1, max=1 << 16)
    axes = "hwd"[:spatial_dims] if spatial_dims <= 3 else [f"s{i}" for i in range(spatial_dims)]
    spatial = {2 + i: divisor * Dim(f"{a}_blocks", min=1, max=(1 << 14) // divisor) if divisor > 1
               else Dim(a, min=2, max=1 << 14) for i, a in enumerate(axes)}
    inputs: tuple[torch.Tensor, ...] = (torch.rand(batch, channels, *(size,) * spatial_dims),)
    shapes: tuple[Any, ...] = ({0: count, **spatial},)
    if getattr(network, "with_timestep", False):
        inputs += (torch.arange(batch, dtype=torch.long),)
        shapes += ({0: count},)
    return inputs, shapes


def _embedded_files(
    network: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    bundle: str | None,
    metadata: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> dict[str, str]:
    """Load the checkpoint's weights into ``network``; the files every export embeds (configs, metadata.json and
    the calibration record with the fingerprint of exactly these weights)."""
    from .checkpoint import load_network_weights

    state = load_network_weights(network, checkpoint_path, bundle)
    fingerprint = weights_fingerprint(network.state_dict())
    files: dict[str, str] = {}
    if config is not None:
        files[CONFIG_FILE] = json.dumps(dict(config))
    if metadata is not None:
        files["metadata.json"] = json.dumps(dict(metadata))
    calibration = state.get("calibration")
    if calibration is None and calibration_path(checkpoint_path).is_file():
        calibration = read_calibration(calibration_path(checkpoint_path), fingerprint)["calibration"]
    if calibration is not None:
        files[CALIBRATION_FILE] = json.dumps(_record(calibration, state.get("bundle", bundle), fingerprint))
    return files


def export_torchscript(
    network: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    filepath: str | os.PathLike,
    bundle: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Script ``network`` with the weights of ``checkpoint_path`` and save it with its calibration, atomically.

    Args:
        network: an instance of the bundle's ``network_def`` (its weights are replaced).
        checkpoint_path: ``model.pt`` written by the trainer and calibrated by the evaluator.
        filepath: the ``.ts`` file.
        bundle: expected bundle name (checked against the checkpoint).
        metadata: the bundle's metadata.json content, stored as ``metadata.json``.
        config: the workflow's merged config (overrides applied), stored as ``inference.json``.
    """
    extra = _embedded_files(network, checkpoint_path, bundle, metadata, config)
    with quiet_torchscript():
        scripted = torch.jit.script(network.cpu().eval())
        return atomic_save(filepath, lambda name: torch.jit.save(scripted, name, _extra_files=extra))


def _export_program(network: torch.nn.Module) -> torch.export.ExportedProgram:
    inputs, shapes = export_inputs(network)
    try:
        with torch.no_grad():
            return torch.export.export(network.cpu().eval(), inputs, dynamic_shapes=shapes)
    except Exception as error:  # e.g. the zscore baseline's per-pixel statistics branch on their own values
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{type(network).__name__} cannot be traced by torch.export ({first}); "
                         "run it from its model.pt.") from error


def export_program(
    network: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    filepath: str | os.PathLike,
    bundle: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """``torch.export`` ``network`` with the weights of ``checkpoint_path`` to a ``.pt2`` archive, atomically.

    Batch and spatial sizes stay free (:func:`export_inputs`); the calibration, metadata and configs are the
    archive's ``extra_files`` (read back by :func:`load_program`). Arguments as :func:`export_torchscript`.
    """
    extra = _embedded_files(network, checkpoint_path, bundle, metadata, config)
    program = _export_program(network)
    return atomic_save(filepath, lambda name: torch.export.save(program, name, extra_files=extra))


def export_onnx(
    network: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    filepath: str | os.PathLike,
    bundle: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    opset_version: int | None = None,
) -> Path:
    """Export ``network`` with the weights of ``checkpoint_path`` to ONNX, atomically.

    The graph comes from ``torch.export`` (the dynamo-based ``torch.onnx.export``; batch and spatial sizes stay
    free) and the calibration, metadata and configs are the model's ``metadata_props`` (read back by
    :func:`load_onnx`). Needs ``onnx`` and ``onnxscript`` (``pip install "medad[export]"``). Arguments as
    :func:`export_torchscript`; ``opset_version``: the ONNX opset (default: torch's).
    """
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as error:
            raise ImportError(f"{filepath}: exporting to ONNX needs {package} (pip install \"medad[export]\").") from error
    extra = _embedded_files(network, checkpoint_path, bundle, metadata, config)
    program = _export_program(network)
    inputs, _ = export_inputs(network)
    # the torchvision-op registry and the exporter's progress lines are noise here (medad has no torchvision)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, inputs, dynamo=True, verbose=False, output_names=["output"],
                                             opset_version=opset_version)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    onnx_program.model.metadata_props.update(extra)
    return atomic_save(filepath, lambda name: onnx_program.save(name, external_data=False))
