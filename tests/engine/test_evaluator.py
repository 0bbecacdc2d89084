"""The shared evaluator: streaming and resumable, tables on the written grid, overlays per defect type, map files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader, Dataset
from PIL import Image

from medad.data import image_transforms, mvtec_datalist, nifti_datalist, volume_transforms
from medad.engine import AnomalyEvaluator


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _mvtec(root: Path, size: int = 16) -> Path:
    """A tiny MVTec-layout category: 3 normal and 2 x 2 defect test images (16 x 16 px, bright-square defects)."""
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(root / "test" / "good" / f"{i:03d}.png", (rng.random((size, size)) * 60).astype(np.uint8))
    for defect in ("hole", "scratch"):
        for i in range(2):
            image = (rng.random((size, size)) * 60).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            mask[2 + 3 * i:7 + 3 * i, 4:9] = 255
            image[mask > 0] = 250
            _png(root / "test" / defect / f"{i:03d}.png", image)
            _png(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


def _identity_inferer(images: torch.Tensor, network) -> dict[str, torch.Tensor]:
    # a stochastic term: a resumed run must give the same maps as an uninterrupted one (per-batch seeds)
    noise = 0.01 * torch.rand(images.shape[0], 1, *images.shape[2:])
    return {"anomaly_map": images.mean(1, keepdim=True) + noise, "restoration": images.clone()}


class _Stop(Exception):
    pass


class _StopAfter:
    """The identity inferer that raises once it has seen ``limit`` batches (an interrupted evaluation)."""

    def __init__(self, limit: int) -> None:
        self.counts = {"limit": limit, "seen": 0}  # bookkeeping, not a setting of the maps

    def __call__(self, images: torch.Tensor, network) -> dict[str, torch.Tensor]:
        if self.counts["seen"] == self.counts["limit"]:
            raise _Stop
        self.counts["seen"] += 1
        return _identity_inferer(images, network)


def _max_score(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).amax(1)


CALIBRATION = {"image_threshold": 0.5, "pixel_threshold": 0.6}


def _evaluator(root: Path, out: Path, inferer=_identity_inferer, image_size: int = 8, **kwargs) -> AnomalyEvaluator:
    loader = DataLoader(Dataset(mvtec_datalist(root, split="test"), image_transforms(image_size, channels=1)),
                        batch_size=2)
    evaluator = AnomalyEvaluator(torch.nn.Identity(), inferer, loader, out, _max_score, progress=False, **kwargs)
    evaluator.calibration = dict(CALIBRATION)
    return evaluator


def _without_timing(result: dict) -> dict:
    timing = ("inference_seconds", "images_per_second", "network_calls")
    return {k: v for k, v in result.items() if k not in timing}


def test_an_interrupted_evaluation_resumes_and_gives_the_uninterrupted_metrics(tmp_path: Path):
    root = _mvtec(tmp_path / "widget")
    full = _evaluator(root, tmp_path / "full", inferer=_StopAfter(-1)).run()

    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        _evaluator(root, out, inferer=_StopAfter(2)).run()
    partial = pd.read_csv(out / "cases_partial.csv")
    assert len(partial) == 4 and not (out / "metrics.json").exists()  # 2 batches of 2 written as they finished
    assert len(list((out / "maps").glob("*_anomaly_map.nrrd"))) == 4

    counting = _StopAfter(limit=-1)  # never stops; counts the batches it is given
    resumed = _evaluator(root, out, inferer=counting).run()
    assert counting.counts["seen"] == 2  # the 2 finished batches were skipped, 3 of 7 cases (2 batches) remained
    assert _without_timing(resumed) == _without_timing(full)
    pd.testing.assert_frame_equal(pd.read_csv(out / "cases.csv").drop(columns="runtime_s"),
                                  pd.read_csv(tmp_path / "full" / "cases.csv").drop(columns="runtime_s"))
    assert not (out / "cases_partial.csv").exists()

    # other weights / settings: finished cases are not reused
    changed = _evaluator(root, out, inferer=counting)
    changed.calibration = {"image_threshold": 0.4, "pixel_threshold": 0.6}
    counting.counts["seen"] = 0
    changed.run()
    assert counting.counts["seen"] == 4


def test_tables_overlays_and_map_files(tmp_path: Path, caplog):
    root = _mvtec(tmp_path / "widget")
    caplog.set_level(logging.INFO, logger="medad.evaluate")
    _evaluator(root, tmp_path / "out", num_overlays=1, save_maps="anomalous").run()
    table = pd.read_csv(tmp_path / "out" / "cases.csv")
    # areas on the written (16 x 16 input) grid, not the 8 x 8 network grid
    hole = table.set_index("case_id").loc["hole_000"]
    assert hole["defect_type"] == "hole" and hole["anomaly_area_px"] == pytest.approx(25, abs=6)
    assert table["anomaly_area_px"].max() > 8 * 8 / 4
    # one overlay per defect type plus the normals
    overlays = sorted(p.stem for p in (tmp_path / "out" / "overlays").glob("*.png"))
    assert overlays == ["good_000", "hole_000", "scratch_000"]
    # save_maps="anomalous": labelled anomalous or decided anomalous (score >= 0.5); normal images are dark
    written = sorted(p.name[: -len("_anomaly_map.nrrd")] for p in (tmp_path / "out" / "maps").glob("*_anomaly_map.nrrd"))
    assert written == ["hole_000", "hole_001", "scratch_000", "scratch_001"]
    metrics_line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("metrics:")][0]
    assert "np.float" not in metrics_line and "float64" not in metrics_line
    json.loads(metrics_line.split("metrics: ", 1)[1])

    _evaluator(root, tmp_path / "none", save_maps="none", num_overlays=0).run()
    assert not (tmp_path / "none" / "maps").exists() and not (tmp_path / "none" / "overlays").exists()
    with pytest.raises(ValueError, match="save_maps must be one of none, anomalous, all"):
        _evaluator(root, tmp_path / "x", save_maps="some")


def test_compact_map_files_are_smaller_and_close(tmp_path: Path):
    import nrrd

    root = _mvtec(tmp_path / "widget", size=64)
    sizes = {}
    for compact in (False, True):
        out = tmp_path / f"compact_{compact}"
        _evaluator(root, out, image_size=64, compact_maps=compact, num_overlays=0).run()
        sizes[compact] = sum(p.stat().st_size for p in (out / "maps").glob("*_anomaly_map.nrrd"))
    exact, _ = nrrd.read(str(tmp_path / "compact_False" / "maps" / "hole_000_anomaly_map.nrrd"))
    small, _ = nrrd.read(str(tmp_path / "compact_True" / "maps" / "hole_000_anomaly_map.nrrd"))
    assert small.dtype == np.float32 and np.allclose(small, exact, rtol=2 ** -10, atol=0)
    assert sizes[True] < 0.75 * sizes[False]


def test_volume_table_volume_is_measured_on_the_input_grid(tmp_path: Path):
    data = np.zeros((10, 8, 6), np.float32)
    data[2:6, 2:6, 1:4] = 1.0  # 48 voxels of 2 x 1 x 3 mm = 0.288 ml on the file's grid
    path = tmp_path / "in" / "case.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 1.0, 3.0, 1.0])), path)
    items = nifti_datalist(path.parent)
    loader = DataLoader(Dataset(items, volume_transforms(pixdim=(1.0, 1.0, 1.0), intensity=None)), batch_size=1)
    evaluator = AnomalyEvaluator(torch.nn.Identity(), _identity_inferer, loader, tmp_path / "out", _max_score,
                                 progress=False, num_overlays=0)
    evaluator.calibration = dict(CALIBRATION)
    evaluator.run()
    row = pd.read_csv(tmp_path / "out" / "cases.csv").iloc[0]
    assert row["anomaly_volume_ml"] == pytest.approx(0.288, rel=0.05)
    assert nib.load(tmp_path / "out" / "maps" / "case_seg.nii.gz").shape == data.shape


def _framed_inferer(images: torch.Tensor, network) -> dict[str, torch.Tensor]:
    """Maps of small noise with a bright 1-px frame along the border (FAIR's artefact, issue #11)."""
    generator = torch.Generator().manual_seed(images.shape[0])
    anomaly_map = 0.01 * torch.rand(images.shape[0], 1, *images.shape[2:], generator=generator)
    anomaly_map[..., 0, :] += 1.0
    return {"anomaly_map": anomaly_map, "restoration": images.clone()}


def test_metrics_report_the_border_frame_of_normal_maps(tmp_path: Path):
    root = _mvtec(tmp_path / "widget", size=64)
    framed = _evaluator(root, tmp_path / "framed", inferer=_framed_inferer, image_size=64, save_maps="none").run()
    assert framed["border_top_share_normal"] == 1.0 and framed["border_width_px"] == 2
    assert framed["border_area_share"] == pytest.approx(1 - (60 / 64) ** 2)
    plain = _evaluator(root, tmp_path / "plain", image_size=64, save_maps="none").run()  # noise, no frame
    assert plain["border_top_share_normal"] < 0.5


def test_report_html_is_self_contained_and_shows_the_numbers_of_metrics_json(tmp_path: Path):
    from html.parser import HTMLParser

    from medad.io.report import METRIC_LABELS, _number

    out = tmp_path / "eval"
    result = _evaluator(_mvtec(tmp_path / "widget"), out, num_overlays=1).run()

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.images, self.rows, self.values, self._key, self.external = [], 0, {}, None, []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append(attrs["src"])
            if tag in ("link", "script") and (attrs.get("href") or attrs.get("src")):
                self.external.append(attrs)
            if tag == "tr":
                self.rows += 1
            self._key = attrs.get("data-key") if tag == "td" else None

        def handle_data(self, data):
            if self._key:
                self.values[self._key] = data
                self._key = None

    page = Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert not page.external and all(src.startswith("data:image/png;base64,") for src in page.images)
    overlays = list((out / "overlays").glob("*.png"))
    assert len(page.images) == len(overlays) + 2  # ROC + PR curves, every drawn overlay
    shown = {k: v for k, v in page.values.items() if k in METRIC_LABELS}
    assert shown and all(shown[k] == _number(result[k]) for k in shown)
    assert shown["pixel_auroc"] == f"{result['pixel_auroc']:.3f}"
    cases = pd.read_csv(out / "cases.csv")
    assert page.rows >= len(cases) + 1 + len(shown)  # the case table below the metrics
