"""Exports that last: ``torch.export`` (.pt2) and ONNX (onnxruntime) beside TorchScript, calibration embedded.

For FAIR (2D images) and DISYRE (3D volumes restored as 2D slices by ``SliceAggregationInferer``) at tiny settings: a model
with seeded random weights is calibrated by the evaluator, exported with ``medad export --format pt2|onnx``, and
the exported file must give the eager network's outputs (any batch and image size) and the eager anomaly maps
through the inference workflow within 1e-4, with the calibration and the weights fingerprint read back unchanged.
ONNX parts are skipped when onnx / onnxscript / onnxruntime are not installed (``pip install "medad[export]"``).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from medad import bundle, cli
from medad.engine import calibrate_thresholds, export
from medad.engine.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
HAS_ONNX = all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxscript", "onnxruntime"))
FORMATS = ["pt2", pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="pip install 'medad[export]'"))]
TOL = 1e-4
#: tiny settings of each bundle's inference.json; DISYRE's network has attention on its deepest level
TINY: dict[str, dict[str, Any]] = {
    "fair": {"quick": True, "image_size": 32, "widths": "$(8, 16)", "batch_size": 4},
    "disyre": {"quick": True, "widths": "$(8, 16)", "restoration_steps": 2, "roi_size": "$(32, 32)",
               "window_inferer#overlap": 0.25, "network_def#attention_levels": "$(False, True)",
               "network_def#num_head_channels": 8},
}


def _parser(name: str, **override: Any):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle.config_files(REPO / "bundles" / name, "inference"))
    parser.update({"bundle_root": str(REPO / "bundles" / name), "device": "$torch.device('cpu')",
                   "evaluator#progress": False, **TINY[name], **override})
    return parser


def _evaluator(name: str, ckpt: Path, data: Path, out: Path):
    return _parser(name, ckpt_path=str(ckpt), input_dir=str(data), output_dir=str(out)).get_parsed_content("evaluator")


def _maps(evaluator) -> dict[str, Any]:
    evaluator.load()
    return evaluator.infer(evaluator.test_loader, "test")


@pytest.fixture(scope="module", params=["fair", "disyre"])
def exported(request, tmp_path_factory) -> dict[str, Any]:
    """A calibrated tiny model of the bundle, its eager maps on demo data, and its .pt2 / .onnx exports."""
    from medad.data import make_demo_mri, make_demo_mvtec

    name = request.param
    root = tmp_path_factory.mktemp(f"export_{name}")
    if name == "fair":
        data = make_demo_mvtec(root / "data", num_train=1, num_test_good=2, num_test_defect=2, image_size=32) / "test"
    else:
        data = make_demo_mri(root / "data", num_train=1, num_test=1) / "test"
    torch.manual_seed(0)
    network = _parser(name).get_parsed_content("network_def").eval()
    with torch.no_grad():  # random, not identity-like weights (DISYRE's last layer starts at zero)
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ckpt = root / "models" / "model.pt"
    save_checkpoint(ckpt, {"bundle": name, "network": network.state_dict()})

    # eager maps, and thresholds from them as the evaluator's calibration computes and stores them (any images will
    # do: the thresholds only have to travel)
    cases = _maps(_evaluator(name, ckpt, data, root / "eager"))
    calibration = calibrate_thresholds(np.asarray(cases["score"]), cases["map"], 0.05, 0.01)
    save_checkpoint(ckpt, {"bundle": name, "network": network.state_dict(), "calibration": calibration})

    files = {}
    for fmt in ("pt2", "onnx") if HAS_ONNX else ("pt2",):
        files[fmt] = root / "models" / f"model.{fmt}"
        if fmt == "pt2":  # through the command line once
            args = [f"--{k}={v}" for k, v in TINY[name].items()]
            assert cli.main(["export", "--config", f"bundles/{name}", "--format", "pt2", "--ckpt_file", str(ckpt),
                             "--filepath", str(files[fmt]), *args]) == 0
        else:
            bundle.export(REPO / "bundles" / name, ckpt_file=str(ckpt), filepath=str(files[fmt]), format=fmt,
                          **TINY[name])
    return {"name": name, "root": root, "data": data, "network": network, "calibration": calibration,
            "maps": dict(zip(cases["case_id"], cases["map"])), "files": files, "ckpt": ckpt}


def _inputs(network: torch.nn.Module, batch: int, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    x = torch.rand(batch, network.in_channels, *size, generator=torch.Generator().manual_seed(batch))
    return (x, torch.randint(0, 100, (batch,))) if network.with_timestep else (x,)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_network_equals_eager_at_any_batch_and_size(exported: dict[str, Any], fmt: str):
    path = exported["files"][fmt]
    assert export.model_format(path) == fmt and export.model_format(exported["ckpt"]) is None
    module, info = export.load_exported(path)
    fingerprint = export.weights_fingerprint(exported["network"].state_dict())
    assert info["calibration"] == exported["calibration"] and info["bundle"] == exported["name"]
    assert info["weights_sha256"] == fingerprint == export.network_fingerprint(module)
    assert info["metadata"]["network_data_format"]  # the bundle's metadata.json travels too
    assert info["config"]["bundle_name"] == exported["name"] and info["config"]["network_def"]  # one merged config
    with torch.no_grad():
        for batch, size in [(1, (16, 24)), (3, (32, 32)), (5, (48, 40))]:
            inputs = _inputs(exported["network"], batch, size)
            expected = exported["network"](*inputs)
            got = module.eval()(*inputs)
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_inference_workflow_on_the_export_gives_the_eager_maps(exported: dict[str, Any], fmt: str, tmp_path: Path):
    evaluator = _evaluator(exported["name"], exported["files"][fmt], exported["data"], tmp_path)
    cases = _maps(evaluator)
    maps = dict(zip(cases["case_id"], cases["map"]))
    assert evaluator.calibration == exported["calibration"]  # the thresholds come from inside the file
    assert list(maps) == list(exported["maps"])
    for case, expected in exported["maps"].items():
        np.testing.assert_allclose(maps[case], expected, atol=TOL, rtol=0)


@pytest.mark.skipif(not HAS_ONNX, reason="pip install 'medad[export]'")
def test_medad_run_inference_with_an_onnx_model(exported: dict[str, Any], tmp_path: Path):
    if exported["name"] != "fair":
        pytest.skip("one full workflow run is enough (FAIR is the cheaper)")
    out = tmp_path / "inference"
    bundle.run(REPO / "bundles" / "fair", "inference", ckpt_path=str(exported["files"]["onnx"]),
               input_dir=str(exported["data"]), output_dir=str(out), **TINY["fair"],
               **{"evaluator#progress": False, "evaluator#num_overlays": 0})
    cases = pd.read_csv(out / "cases.csv").set_index("case_id")
    assert (cases["threshold"] == exported["calibration"]["image_threshold"]).all()
    assert set(cases.index) == set(exported["maps"])


def test_export_rejects_an_unknown_format_and_torchscript_warns_once(exported: dict[str, Any], tmp_path: Path):
    from medad.overrides import OverrideError

    with pytest.raises(OverrideError, match="--format must be one of torchscript, pt2, onnx"):
        bundle.export(REPO / "bundles" / exported["name"], ckpt_file=str(exported["ckpt"]), format="tflite")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export.export_torchscript(exported["network"], exported["ckpt"], tmp_path / "m.ts", exported["name"])
        export.load_exported(path)
    assert not [w for w in caught if "torch.jit" in str(w.message)]  # torch's deprecation warnings are silenced
