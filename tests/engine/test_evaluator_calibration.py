"""The evaluator's calibration (issue #12): sampled calibration keeps the thresholds' meaning (the same quantile, with
its bootstrap interval), and thresholds are kept per inference profile and used only with the settings they were
made with.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset

from medad.engine import AnomalyEvaluator
from medad.engine.checkpoint import load_checkpoint, save_checkpoint
from medad.inferers import SliceAggregationInferer
from medad.inferers.base import AnomalyInferer
from medad.metrics import threshold_at_fpr
from medad.scores import topk_mean_score


class InputMapInferer(AnomalyInferer):
    """The input itself as anomaly map (no network): calibration values are known exactly."""

    def __call__(self, inputs, network, *args, **kwargs):
        return {"anomaly_map": inputs[:, :1].clone(), "restoration": inputs.clone()}


def _volumes(count: int = 3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        image = rng.random((1, 12, 10, 16)).astype(np.float32)
        brain = np.zeros((1, 12, 10, 16), np.float32)
        brain[:, 2:10, 2:8, 3:14] = 1
        items.append({"image": torch.from_numpy(image * brain), "brain_mask": torch.from_numpy(brain),
                      "case_id": f"v{i}"})
    return items


def _evaluator(tmp_path: Path, checkpoint: Path | None, profile: str = "paper", slices: int | None = None,
               loader=True, settings: dict | None = None, shard: str | None = None) -> AnomalyEvaluator:
    data = DataLoader(Dataset(_volumes()), batch_size=1)
    return AnomalyEvaluator(
        network=torch.nn.Conv2d(1, 1, 1), inferer=SliceAggregationInferer(InputMapInferer(), size_divisor=1),
        test_loader=[], output_dir=tmp_path / "eval", image_score=functools.partial(topk_mean_score, k=40),
        checkpoint_path=checkpoint, bundle="toy", calibration_loader=data if loader else None,
        region_key="brain_mask", foreground_key="brain_mask", inference_profile=profile,
        calibration_slices=slices, calibration_bootstrap=50, progress=False, inference_settings=settings, shard=shard,
    )


def test_sampled_calibration_keeps_the_threshold_meaning_and_states_its_error(tmp_path: Path):
    full = _evaluator(tmp_path, None).calibrate()
    sampled_evaluator = _evaluator(tmp_path, None, slices=4)
    sampled = sampled_evaluator.calibrate()
    # the sampled pixel values are exactly those of 4 equally spaced brain slices (3, 6, 10, 13) of each volume
    values = np.concatenate([v["image"][0][v["brain_mask"][0] > 0].numpy().reshape(8, 6, 11)[..., [0, 3, 7, 10]].ravel()
                             for v in _volumes()])
    assert sampled["pixel_threshold"] == pytest.approx(threshold_at_fpr(values, 0.01))
    assert sampled["normal_map_mean"] == pytest.approx(values.mean(), rel=1e-5)
    low, high = full["pixel_threshold_ci95"]
    assert abs(sampled["pixel_threshold"] - full["pixel_threshold"]) < 3 * sampled["pixel_threshold_se"]
    assert low <= full["pixel_threshold"] <= high and full["pixel_threshold_se"] > 0
    assert sampled["calibration_slices"] == 4 and "top-" in sampled["image_score_estimate"]
    assert sampled["calibration_region_share"] == pytest.approx(4 / 11)
    assert sampled["calibration_seconds"] > 0 and "slices" in sampled["pixel_threshold_bootstrap"]


def test_each_inference_profile_keeps_its_own_thresholds(tmp_path: Path, caplog):
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, {"bundle": "toy", "network": torch.nn.Conv2d(1, 1, 1).state_dict(),
                                 "calibration": {"image_threshold": 1.0, "pixel_threshold": 2.0}})
    fast = _evaluator(tmp_path, checkpoint, profile="fast")
    fast.load()
    assert fast.calibration is None  # the paper thresholds do not hold for other maps
    made = fast.calibrate()
    state = load_checkpoint(checkpoint)
    assert state["calibration"] == {"image_threshold": 1.0, "pixel_threshold": 2.0}
    assert state["calibrations"]["fast"]["pixel_threshold"] == made["pixel_threshold"]
    assert made["inference_profile"] == "fast"
    again = _evaluator(tmp_path, checkpoint, profile="fast", loader=False)
    again.load()
    assert again.calibrate()["pixel_threshold"] == made["pixel_threshold"]
    paper = _evaluator(tmp_path, checkpoint, loader=False)
    paper.load()
    assert paper.calibrate()["pixel_threshold"] == 2.0
    other = _evaluator(tmp_path, checkpoint, profile="tiny", loader=False)
    other.load()
    with caplog.at_level(logging.WARNING, logger="medad.evaluate"):
        assert other.calibrate() is None
    assert "no thresholds calibrated for inference profile 'tiny'" in caplog.text


def test_thresholds_made_with_other_inference_settings_are_not_used(tmp_path: Path, caplog):
    # e.g. a model calibrated at ADDM noise level 25, evaluated with --noise_level 250: other maps, other thresholds
    checkpoint = tmp_path / "model.pt"
    stored = {"image_threshold": 1.0, "pixel_threshold": 2.0, "inference_settings": {"noise_level": 25, "steps": [3, 1]}}
    save_checkpoint(checkpoint, {"bundle": "toy", "network": torch.nn.Conv2d(1, 1, 1).state_dict(), "calibration": stored})
    same = _evaluator(tmp_path, checkpoint, settings={"noise_level": 25, "steps": (3, 1)})  # a tuple is its JSON list
    same.load()
    assert same.calibration == stored
    other = _evaluator(tmp_path, checkpoint, settings={"noise_level": 250, "steps": (3, 1)})
    with caplog.at_level(logging.WARNING):
        other.load()
    assert other.calibration is None
    assert "calibrated with noise_level=25; this run uses noise_level=250" in caplog.text
    made = other.calibrate()  # calibrated again for these settings, recorded with them ...
    assert made["inference_settings"] == {"noise_level": 250, "steps": [3, 1]} and made["pixel_threshold"] < 1.0
    assert load_checkpoint(checkpoint)["calibration"] == stored  # ... and the checkpoint keeps its own
    without_data = _evaluator(tmp_path, checkpoint, loader=False, settings={"noise_level": 250, "steps": (3, 1)})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        without_data.load()
    assert without_data.calibrate() is None and "no decisions or segmentations" in caplog.text
    legacy = tmp_path / "legacy.pt"  # thresholds recorded before settings were: used as before
    save_checkpoint(legacy, {"bundle": "toy", "network": torch.nn.Conv2d(1, 1, 1).state_dict(),
                             "calibration": {"image_threshold": 1.0, "pixel_threshold": 2.0}})
    old = _evaluator(tmp_path, legacy, settings={"noise_level": 250})
    old.load()
    assert old.calibration == {"image_threshold": 1.0, "pixel_threshold": 2.0}
    fresh = _evaluator(tmp_path, None, settings={"noise_level": 250}).calibrate()
    assert fresh["inference_settings"] == {"noise_level": 250}


def test_shards_calibrate_other_settings_without_writing_and_refuse_a_first_calibration(tmp_path: Path):
    checkpoint = tmp_path / "model.pt"
    stored = {"image_threshold": 1.0, "pixel_threshold": 2.0, "inference_settings": {"map_sigma": 1.5}}
    save_checkpoint(checkpoint, {"bundle": "toy", "network": torch.nn.Conv2d(1, 1, 1).state_dict(), "calibration": stored})
    # stored thresholds made for other settings: every shard calibrates the same thresholds, none writes them
    made = []
    for shard in ("1/2", "2/2"):
        evaluator = _evaluator(tmp_path, checkpoint, settings={"map_sigma": 0.0}, shard=shard)
        evaluator.load()
        made.append(evaluator.calibrate())
    assert made[0]["pixel_threshold"] == made[1]["pixel_threshold"] < 1.0
    assert load_checkpoint(checkpoint)["calibration"] == stored
    # no thresholds at all: a shard would write the checkpoint, so a first calibration under --shard is refused
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, {"bundle": "toy", "network": torch.nn.Conv2d(1, 1, 1).state_dict()})
    evaluator = _evaluator(tmp_path, bare, settings={"map_sigma": 0.0}, shard="1/2")
    evaluator.load()
    with pytest.raises(ValueError, match="run the calibration once without --shard"):
        evaluator.calibrate()
