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
from tests.helpers import report_cells


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


# -- baselines beside the method (issue #10) ---------------------------------------------------------------------
def _with_normals(root: Path, count: int = 5) -> DataLoader:
    """``count`` held-out normal pictures like the test's good ones (train/good), as the calibration loader."""
    rng = np.random.default_rng(1)
    for i in range(count):
        _png(root / "train" / "good" / f"{i:03d}.png", (rng.random((16, 16)) * 60).astype(np.uint8))
    return DataLoader(Dataset(mvtec_datalist(root, split="train"), image_transforms(8, channels=1)), batch_size=2)


def test_the_zscore_baseline_equals_a_direct_computation_and_the_report_shows_it(tmp_path: Path):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from medad import metrics
    from medad.io.report import _number
    from medad.methods.baselines import PixelGaussian

    root = _mvtec(tmp_path / "widget")
    calibration = _with_normals(root)
    out = tmp_path / "eval"
    result = _evaluator(root, out, calibration_loader=calibration, num_overlays=0).run()
    stored = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    zscore = stored["baselines"]["zscore"]
    assert zscore["num_normal_images"] == 5 and zscore["num_cases"] == result["num_cases"] == 7
    assert zscore == pytest.approx(result["baselines"]["zscore"])

    # by hand: a per-pixel Gaussian of the 5 normal pictures, |z| of every test picture, the mean of its 64 largest
    gaussian = PixelGaussian(std_floor=0.01)
    for batch in calibration:
        gaussian.update(batch["image"].as_tensor())
    mean, std = gaussian.mean().float(), torch.sqrt(gaussian.variance() + 0.01 ** 2).float()
    maps, masks, scores, labels = [], [], [], []
    for batch in DataLoader(Dataset(mvtec_datalist(root, split="test"), image_transforms(8, channels=1)), batch_size=2):
        z = ((batch["image"].as_tensor() - mean) / std).abs().amax(dim=1)
        maps += list(z.numpy())
        masks += list(batch["mask"][:, 0].numpy() > 0.5)
        scores += z.flatten(1).topk(64, dim=1).values.mean(dim=1).tolist()
        labels += batch["label"].tolist()
    pixels, truth = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    direct = {"image_auroc": roc_auc_score(labels, scores), "pixel_auroc": roc_auc_score(truth, pixels),
              "pixel_ap": average_precision_score(truth, pixels), "aupro": metrics.aupro(maps, masks, fpr_limit=0.3),
              "best_dice": metrics.best_dice(maps, masks)[0]}
    for key, value in direct.items():
        assert np.isfinite(zscore[key]) and zscore[key] == pytest.approx(value, abs=1e-6), key
    assert "intensity" not in zscore and set(stored["baselines"]) == {"zscore"}  # pictures: no intensity baseline

    # the report: a column per baseline with the numbers of metrics.json, and how they were fitted
    cells, text = report_cells((out / "report.html").read_text(encoding="utf-8"))
    for key in ("num_cases", *direct):
        assert cells[f"baselines.zscore.{key}"] == _number(zscore[key]), key
        assert cells[key] == _number(result[key]), key
    assert "z-score baseline" in text and "fitted on the 5 held-out normal images" in text
    assert "same 7 test cases" in text

    # the method's own numbers and tables do not change with the baselines
    plain = _evaluator(root, tmp_path / "plain", calibration_loader=calibration, num_overlays=0, baselines=None).run()
    assert "baselines" not in plain and "baselines_note" not in plain
    assert _without_timing({k: v for k, v in result.items() if k != "baselines"}) == _without_timing(plain)
    pd.testing.assert_frame_equal(pd.read_csv(out / "cases.csv").drop(columns="runtime_s"),
                                  pd.read_csv(tmp_path / "plain" / "cases.csv").drop(columns="runtime_s"))


def test_without_normal_data_the_report_says_baselines_need_it(tmp_path: Path):
    from medad.engine.comparison import NO_NORMAL_DATA

    root = _mvtec(tmp_path / "widget")
    result = _evaluator(root, tmp_path / "eval", num_overlays=0).run()  # no calibration loader: inference on a folder
    assert "baselines" not in result and result["baselines_note"] == NO_NORMAL_DATA
    cells, text = report_cells((tmp_path / "eval" / "report.html").read_text(encoding="utf-8"))
    assert "need held-out normal data" in text and not any(k.startswith("baselines.") for k in cells)
    with pytest.raises(ValueError, match="unknown baseline"):
        _evaluator(root, tmp_path / "x", baselines=["zscroe"])
    # a comparison that fails costs only itself: the method's metrics and report are written
    broken = _evaluator(root, tmp_path / "broken", num_overlays=0, calibration_loader=[{"picture": None}]).run()
    assert "measuring them failed (KeyError" in broken["baselines_note"]
    assert _without_timing({k: v for k, v in broken.items() if k != "baselines_note"}) == _without_timing(
        {k: v for k, v in result.items() if k != "baselines_note"})
    assert (tmp_path / "broken" / "report.html").is_file()


def test_a_baseline_bundle_is_not_compared_with_itself(tmp_path: Path):
    root = _mvtec(tmp_path / "widget")
    calibration = _with_normals(root)
    result = _evaluator(root, tmp_path / "eval", calibration_loader=calibration, bundle="zscore", num_overlays=0).run()
    assert "baselines" not in result and "zscore bundle" in result["baselines_note"]
    both = _evaluator(root, tmp_path / "both", calibration_loader=calibration, bundle="intensity", num_overlays=0,
                      baselines=["zscore", "intensity"]).run()
    assert set(both["baselines"]) == {"zscore"} and "intensity bundle" in both["baselines_note"]


def _noise_inferer(images: torch.Tensor, network) -> dict[str, torch.Tensor]:
    """A method that sees nothing: uniform noise maps."""
    return {"anomaly_map": torch.rand(images.shape[0], 1, *images.shape[2:]), "restoration": images.clone()}


def test_oracle_a_bright_square_on_a_constant_background_gives_the_zscore_baseline_pixel_auroc_one(tmp_path: Path):
    from medad.io.report import _number

    background = 0.2
    calibration = [{"image": torch.full((3, 1, 16, 16), background)} for _ in range(2)]  # 6 normal pictures
    images, masks = torch.full((6, 1, 16, 16), background), torch.zeros(6, 1, 16, 16)
    for i in range(3, 6):  # three anomalous pictures: a bright square each, at another place
        masks[i, :, 2 * i - 4:2 * i + 1, 3:8] = 1
    images[masks > 0] = 0.9
    test = [{"image": images[s], "mask": masks[s], "label": torch.tensor([0, 0, 0, 1, 1, 1])[s],
             "case_id": [f"case_{k}" for k in range(6)][s]} for s in (slice(0, 3), slice(3, 6))]
    out = tmp_path / "eval"
    evaluator = AnomalyEvaluator(torch.nn.Identity(), _noise_inferer, test, out, _max_score, progress=False,
                                 num_overlays=0, save_maps="none", calibration_loader=calibration)
    evaluator.calibration = dict(CALIBRATION)
    result = evaluator.run()
    zscore = result["baselines"]["zscore"]
    assert zscore["num_normal_images"] == 6 and zscore["num_cases"] == 6
    assert zscore["pixel_auroc"] == pytest.approx(1.0) and zscore["image_auroc"] == 1.0
    assert zscore["pixel_ap"] == pytest.approx(1.0) and zscore["best_dice"] == pytest.approx(1.0)
    assert result["pixel_auroc"] < 0.8  # the noise "method" loses, and the report says so in a sentence
    _, text = report_cells((out / "report.html").read_text(encoding="utf-8"))
    assert (f"The z-score baseline is higher on pixel AUROC: {_number(zscore['pixel_auroc'])} vs "
            f"{_number(result['pixel_auroc'])} for this run.") in text


def test_volumes_get_the_intensity_baseline_too(tmp_path: Path):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    brain = torch.zeros(1, 1, 10, 10, 10, dtype=torch.bool)
    brain[..., 2:8, 2:8, 2:8] = True

    def volume(lesion: bool) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.as_tensor(0.4 + 0.05 * rng.standard_normal((1, 1, 10, 10, 10)), dtype=torch.float32) * brain
        mask = torch.zeros_like(image)
        if lesion:
            mask[..., 3:5, 3:5, 3:6] = 1
            image[mask > 0] = 0.9
        return image, mask

    calibration = [{"image": volume(False)[0]} for _ in range(3)]
    test = []
    for k, lesion in enumerate((False, True, True)):
        image, mask = volume(lesion)
        test.append({"image": image, "mask": mask, "label": torch.tensor([int(lesion)]), "case_id": [f"v{k}"]})
    evaluator = AnomalyEvaluator(torch.nn.Identity(), _noise_inferer, test, tmp_path / "eval", _max_score,
                                 progress=False, num_overlays=0, save_maps="none", region_key="foreground",
                                 calibration_loader=calibration)
    evaluator.calibration = dict(CALIBRATION)
    result = evaluator.run()
    assert set(result["baselines"]) == {"zscore", "intensity"}
    intensity = result["baselines"]["intensity"]
    assert intensity["num_normal_images"] == 0 and intensity["image_score_topk"] == 1000
    # by hand: each volume z-scored within its brain (nonzero voxels), bright deviations, pooled over brain voxels
    values, truth = [], []
    for case in test:
        image, inside = case["image"][0, 0], case["image"][0, 0] != 0
        z = (image - image[inside].mean()) / image[inside].std(unbiased=False)
        values.append(z.clamp_min(0)[inside].numpy())
        truth.append(case["mask"][0, 0][inside].numpy() > 0.5)
    assert intensity["pixel_auroc"] == pytest.approx(roc_auc_score(np.concatenate(truth), np.concatenate(values)))
    # the z-score map is smoothed (below): a 2 x 2 x 3-voxel lesion blurs into its surroundings, still found
    assert intensity["pixel_auroc"] > 0.99 and result["baselines"]["zscore"]["pixel_auroc"] > 0.95
    # the z-score baseline of volumes is the zscore bundle's MRI map: |z| smoothed by a Gaussian of 1.5 voxels inside
    # the region (here the nonzero voxels), zero outside
    from medad.methods.baselines import PixelGaussian
    from medad.scores import masked_gaussian_filter

    gaussian = PixelGaussian(std_floor=0.01)
    for case in calibration:
        gaussian.update(case["image"])
    mean, std = gaussian.mean().float(), torch.sqrt(gaussian.variance() + 0.01 ** 2).float()
    values, truth = [], []
    for case in test:
        inside = case["image"] != 0
        z = masked_gaussian_filter(((case["image"] - mean) / std).abs(), inside, 1.5)
        values.append(z[inside].numpy())
        truth.append(case["mask"][inside].numpy() > 0.5)
    assert result["baselines"]["zscore"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(np.concatenate(truth), np.concatenate(values)))


def test_an_image_threshold_from_fewer_normal_cases_than_its_rate_needs_is_flagged():
    # 3 calibration volumes at a 5 % image false-positive rate: the threshold is just above the largest of 3 normal
    # scores (a training-side IXI head of the shipped DISYRE model scored above it); the record and the log say so
    from medad.engine import calibrate_thresholds

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("medad.evaluate")
    disabled, log.disabled = log.disabled, False  # a bundle run's logging.conf may have disabled it
    log.addHandler(handler)
    rng = np.random.default_rng(0)
    try:
        few = calibrate_thresholds(np.array([0.1, 0.2, 0.3]), [rng.random((8, 8)) for _ in range(3)], 0.05, 0.01)
        enough = calibrate_thresholds(np.linspace(0, 1, 20), [rng.random((8, 8)) for _ in range(20)], 0.05, 0.01)
    finally:
        log.removeHandler(handler)
        log.disabled = disabled
    assert few["image_threshold_reliable"] is False and enough["image_threshold_reliable"] is True
    assert [r.levelname for r in records] == ["WARNING"] and "from 3 normal case(s)" in records[0].getMessage()
    assert "at least 20 are needed" in records[0].getMessage()
