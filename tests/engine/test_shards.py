"""Issue #12: ``--shard K/N`` for inference / evaluation and ``medad preprocess``; merged tables equal one run's.

Two shards on one machine stand for two machines (or SLURM array tasks) writing into one output folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader, Dataset
from PIL import Image

from medad import bundle
from medad.cli import main as cli
from medad.data import image_transforms, mvtec_datalist
from medad.engine import AnomalyEvaluator
from medad.engine.shards import merge_shards, parse_shard, shard_range
from medad.overrides import OverrideError

REPO = Path(__file__).resolve().parents[2]


def test_shards_split_the_sorted_cases_into_contiguous_nearly_equal_blocks():
    for count in (0, 1, 7, 10):
        for n in (1, 2, 3, 4):
            blocks = [list(shard_range(count, k, n)) for k in range(1, n + 1)]
            assert sum(blocks, []) == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(OverrideError, match="--shard"):
            parse_shard(bad)


def _mvtec(root: Path) -> Path:
    """7 test pictures (3 good, 2 hole, 2 scratch) with masks."""
    rng = np.random.default_rng(0)
    for group, count in (("good", 3), ("hole", 2), ("scratch", 2)):
        for i in range(count):
            image = (rng.random((16, 16)) * 60).astype(np.uint8)
            path = root / "test" / group / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if group != "good":
                mask = np.zeros((16, 16), np.uint8)
                mask[3 + 2 * i:8 + 2 * i, 4:9] = 255
                image[mask > 0] = 250
                (root / "ground_truth" / group).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth" / group / f"{i:03d}_mask.png")
            Image.fromarray(image).save(path)
    return root


def _noisy_inferer(images: torch.Tensor, network) -> dict[str, torch.Tensor]:
    # drawn from the per-batch seed: a shard must give its batches the seeds of the unsharded run
    noise = 0.05 * torch.rand(images.shape[0], 1, *images.shape[2:])
    return {"anomaly_map": images.mean(1, keepdim=True) + noise, "restoration": images.clone()}


def _evaluator(root: Path, out: Path, shard: str | None = None) -> AnomalyEvaluator:
    loader = DataLoader(Dataset(mvtec_datalist(root, split="test"), image_transforms(8, channels=1)), batch_size=2)
    evaluator = AnomalyEvaluator(torch.nn.Identity(), _noisy_inferer, loader, out, lambda m: m.flatten(1).amax(1),
                                 progress=False, num_overlays=1, shard=shard)
    evaluator.calibration = {"image_threshold": 0.5, "pixel_threshold": 0.6}
    return evaluator


def _table(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "cases.csv").drop(columns="runtime_s")


def _metrics(folder: Path) -> dict:
    timing = ("inference_seconds", "images_per_second", "network_calls", "num_shards")
    return {k: v for k, v in json.loads((folder / "metrics.json").read_text(encoding="utf-8")).items() if k not in timing}


def test_two_shards_merge_into_the_unsharded_tables(tmp_path: Path):
    root = _mvtec(tmp_path / "widget")
    _evaluator(root, tmp_path / "full").run()
    out = tmp_path / "sharded"
    _evaluator(root, out, shard="2/2").run()  # the order the shards finish in does not matter
    assert not (out / "cases.csv").exists()
    assert cli(["cohort", "merge-shards", str(out)]) == 2  # shard 1 has not finished: a one-sentence error
    _evaluator(root, out, shard="1/2").run()  # the last one merges
    pd.testing.assert_frame_equal(_table(out), _table(tmp_path / "full"))
    assert _metrics(out) == _metrics(tmp_path / "full")
    assert sorted(p.name for p in (out / "maps").glob("*_anomaly_map.nrrd")) == sorted(
        p.name for p in (tmp_path / "full" / "maps").glob("*_anomaly_map.nrrd"))
    assert len(pd.read_csv(out / "shards" / "1-of-2" / "cases.csv")) == 4  # batches {0, 1} of {0, 1, 2, 3}
    assert (out / "report.html").is_file()

    # by hand, again (e.g. a SLURM job after the array): the same tables; a rerun shard resumes, skipping its cases
    (out / "cases.csv").unlink()
    assert cli(["cohort", "merge-shards", str(out)]) == 0
    pd.testing.assert_frame_equal(_table(out), _table(tmp_path / "full"))
    _evaluator(root, out, shard="1/2").run()
    pd.testing.assert_frame_equal(_table(out), _table(tmp_path / "full"))


def test_shards_of_another_split_or_a_training_run_are_refused(tmp_path: Path):
    root = _mvtec(tmp_path / "widget")
    out = tmp_path / "sharded"
    _evaluator(root, out, shard="1/2").run()
    _evaluator(root, out, shard="1/3").run()
    with pytest.raises(ValueError, match="different splits"):
        merge_shards(out)
    with pytest.raises(OverrideError, match="not of train"):
        bundle.run(REPO / "bundles" / "fair", "train", shard="1/2")


def test_inference_workflow_shards_with_shipped_weights(tmp_path: Path, monkeypatch):
    """``medad run --workflow inference --shard K/N`` end to end (shipped FAIR model, 5 demo pictures)."""
    from medad.data import make_demo_mvtec

    test = make_demo_mvtec(tmp_path / "demo", num_train=1, num_test_good=2, num_test_defect=3) / "test"
    monkeypatch.chdir(tmp_path)
    common = ["run", "--config", str(REPO / "bundles" / "fair"), "--workflow", "inference", "--input_dir", str(test),
              "--batch_size", "2", "--num_overlays", "0", "--save_maps", "none"]
    assert cli([*common, "--output_dir", str(tmp_path / "full")]) == 0
    for shard in ("1/2", "2/2"):
        assert cli([*common, "--output_dir", str(tmp_path / "sharded"), "--shard", shard]) == 0
    pd.testing.assert_frame_equal(_table(tmp_path / "sharded"), _table(tmp_path / "full"))
    assert cli([*common, "--output_dir", str(tmp_path / "bad"), "--shard", "3/2"]) == 2


def _volume(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(seed).random((4, 4, 4), np.float32), np.eye(4)), str(path))
    return path


class _FakePipeline:
    """Stands in for the preprocessing pipeline (N4, skull strip, registration take minutes per case)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, path: Path, case_id: str, work_dir: Path, timings: dict) -> dict:
        from medad.transforms.mri import load_volume

        image = load_volume(path)
        (work_dir / case_id).mkdir(parents=True, exist_ok=True)
        (work_dir / case_id / "registration.json").write_text("{}")
        timings["register"] = 0.0
        return {"image": image, "brain_mask": (image > 0).to(torch.uint8)}


def test_preprocess_shards_merge_their_logs(tmp_path: Path, monkeypatch):
    import medad.preprocess as preprocess

    monkeypatch.setattr(preprocess, "_CasePipeline", _FakePipeline)
    for i in range(5):
        _volume(tmp_path / "raw" / f"case{i}.nii.gz", i)
    _volume(tmp_path / "raw" / "case9.nii.gz", 9).write_bytes(b"not a volume")  # a failing case is logged too
    options = dict(skull_strip="atlas", progress=False)
    preprocess.preprocess_cohort(tmp_path / "raw", tmp_path / "full", **options)
    first = preprocess.preprocess_cohort(tmp_path / "raw", tmp_path / "sharded", shard="1/2", **options)
    assert list(first["case"]) == ["case0", "case1", "case2"]
    assert not (tmp_path / "sharded" / "preprocess_log.csv").exists()
    preprocess.preprocess_cohort(tmp_path / "raw", tmp_path / "sharded", shard="2/2", **options)
    columns = ["case", "file", "status", "image", "brain_mask", "transforms"]
    full = pd.read_csv(tmp_path / "full" / "preprocess_log.csv")[columns]
    merged = pd.read_csv(tmp_path / "sharded" / "preprocess_log.csv")[columns]
    assert list(merged["status"]) == ["ok"] * 5 + ["error"]
    full = full.replace(str(tmp_path / "full"), str(tmp_path / "sharded"), regex=True)
    pd.testing.assert_frame_equal(merged.reset_index(drop=True), full.reset_index(drop=True))
    # resumable: a rerun shard skips its finished cases and the merge keeps every row
    again = preprocess.preprocess_cohort(tmp_path / "raw", tmp_path / "sharded", shard="1/2", **options)
    assert set(again["status"]) == {"skipped"}
    assert len(pd.read_csv(tmp_path / "sharded" / "preprocess_log.csv")) == 6
    shutil.rmtree(tmp_path / "sharded" / "shards")
    with pytest.raises(ValueError, match="no finished shards"):
        merge_shards(tmp_path / "sharded")
