"""Calibrated thresholds travel with the model: train-time evaluation, the inference workflow on ``model.pt`` and
the same workflow on the exported TorchScript ``model.ts`` give identical image scores and decisions.

One tiny ddpm_partial training (2 steps, 16x16, a small demo set, a small network) runs in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from medad import bundle
from medad.engine import CheckpointMismatchError, export

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "ddpm_partial"
TINY = {
    "image_size": 16,
    "batch_size": 4,
    "restoration_steps": 2,
    "network_def#channels": "$(8, 16, 16)",
    "network_def#attention_levels": "$(False, False, False)",
    "network_def#num_head_channels": 8,
}
DEMO = {"num_train": 10, "num_test_good": 3, "num_test_defect": 4, "image_size": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("calibration_run")
    bundle.run(BUNDLE, "train", run_dir=str(run_dir), max_steps=2, **TINY, **{"demo_kwargs": DEMO},
               **{"evaluator#progress": False, "trainer#progress": False, "evaluator#num_overlays": 1})
    return run_dir


def _infer(run_dir: Path, out: Path, ckpt: Path) -> pd.DataFrame:
    bundle.run(BUNDLE, "inference", run_dir=str(run_dir), output_dir=str(out), ckpt_path=str(ckpt), **TINY,
               **{"evaluator#progress": False, "evaluator#num_overlays": 0})
    return pd.read_csv(out / "cases.csv").set_index("case_id")


def test_train_eval_inference_and_torchscript_agree(trained: Path, tmp_path: Path):
    models = trained / "models"
    state = torch.load(models / "model.pt", weights_only=False)
    record = json.loads((models / "calibration.json").read_text(encoding="utf-8"))["medad_calibration"]
    assert record["calibration"] == state["calibration"] and record["bundle"] == "ddpm_partial"

    ts_path = Path(bundle.export(BUNDLE, ckpt_file=str(models / "model.pt"), filepath=str(tmp_path / "model.ts"),
                                 **{"network_def#channels": "$(8, 16, 16)",
                                    "network_def#attention_levels": "$(False, False, False)",
                                    "network_def#num_head_channels": 8}))
    module, info = export.load_torchscript(ts_path)
    assert info["calibration"] == state["calibration"] and info["bundle"] == "ddpm_partial"
    assert info["config"]["network_def"]["channels"] == "$(8, 16, 16)"  # the merged config, overrides applied

    train_eval = pd.read_csv(trained / "eval" / "cases.csv").set_index("case_id")
    from_pt = _infer(trained, tmp_path / "pt", models / "model.pt")
    from_ts = _infer(trained, tmp_path / "ts", ts_path)
    assert len(train_eval) == 7 and list(from_pt.index) == list(train_eval.index) == list(from_ts.index)
    for table in (from_pt, from_ts):
        # same weights, same seeded noise, same batches: the same numbers, and the same decisions
        assert torch.allclose(torch.tensor(table["image_score"].values), torch.tensor(train_eval["image_score"].values),
                              rtol=1e-5, atol=0)
        assert (table["threshold"] == train_eval["threshold"]).all()
        assert (table["decision"] == train_eval["decision"]).all()
        assert (table["anomaly_area_px"] == train_eval["anomaly_area_px"]).all()
    assert (from_pt["image_score"] == train_eval["image_score"]).all()  # eager and eager: bit-identical


def test_calibration_of_other_weights_is_refused(trained: Path, tmp_path: Path):
    record = json.loads((trained / "models" / "calibration.json").read_text(encoding="utf-8"))
    with pytest.raises(CheckpointMismatchError, match="other network weights"):
        export.read_calibration(record, fingerprint="0" * 64, source="calibration.json")
    with pytest.raises(ValueError, match="not a medad calibration file"):
        export.read_calibration({"something": 1}, source="x.json")


def test_export_torchscript_embeds_the_calibration_of_its_own_weights(trained: Path, tmp_path: Path):
    from medad.networks import AnomalyUNet

    def network() -> AnomalyUNet:
        return AnomalyUNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16, 16), num_res_blocks=1,
                           attention_levels=(False, False, False), num_head_channels=8, with_timestep=True)

    models = trained / "models"
    path = export.export_torchscript(network(), models / "model.pt", tmp_path / "m.ts", bundle="ddpm_partial")
    module, info = export.load_torchscript(path)
    assert info["calibration"] == torch.load(models / "model.pt", weights_only=False)["calibration"]
    with pytest.raises(CheckpointMismatchError, match="trained by bundle 'ddpm_partial', not 'fair'"):
        export.export_torchscript(network(), models / "model.pt", tmp_path / "x.ts", bundle="fair")

    # a TorchScript file whose embedded calibration belongs to other weights is refused when loaded
    extra = {export.CALIBRATION_FILE: (models / "calibration.json").read_text(encoding="utf-8")}
    with export.quiet_torchscript():  # torch >= 2.10 deprecates torch.jit; medad keeps .ts working
        torch.jit.save(torch.jit.script(network().eval()), str(tmp_path / "other.ts"), _extra_files=extra)
    with pytest.raises(CheckpointMismatchError, match="calibrated for other network weights"):
        export.load_torchscript(tmp_path / "other.ts")
