"""Evaluation shared by every bundle: calibrate on normal data, infer, score, write, measure.

The evaluator owns nothing method-specific: a restoration inferer makes the maps, an image-score function
pools them, :mod:`medad.metrics` measures them and :mod:`medad.io` writes them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medad import metrics
from medad.data.validation import clear_input_errors
from medad.inferers.base import CountingNetwork

from . import export, grids
from .checkpoint import CheckpointMismatchError, load_checkpoint, load_network_weights, save_checkpoint
from .distributed import is_main_process, unwrap

__all__ = ["AnomalyEvaluator", "calibrate_thresholds"]

logger = logging.getLogger("medad.evaluate")

# Per-case meta data kept for writing results on the input's grid.
_META_KEYS = ("filename_or_obj", "affine", "pixdim", "original_affine", "spatial_shape", "height", "width")
# Per-case datalist entries for native-space output (preprocessed MRI).
_NATIVE_KEYS = ("registration_record", "native_image")


def _case_ids(batch: Mapping[str, Any], count: int, offset: int) -> list[str]:
    ids = batch.get("case_id")
    if ids is None:
        return [f"case_{offset + i:04d}" for i in range(count)]
    return [str(i).replace("/", "_") for i in ids]


def _region(batch: Mapping[str, Any], key: str | None, images: torch.Tensor) -> torch.Tensor | None:
    if key is None:
        return None
    if key == "foreground":  # nonzero input voxels, e.g. skull-stripped brains
        return images.abs().amax(dim=1, keepdim=True) > 0
    return batch[key] > 0


def calibrate_thresholds(
    image_scores: np.ndarray,
    normal_maps: list[np.ndarray],
    image_fpr: float,
    pixel_fpr: float,
    regions: list[np.ndarray] | None = None,
) -> dict[str, float]:
    """Thresholds chosen on normal-only validation data (no anomaly is ever looked at).

    Returns:
        ``image_threshold`` (false-positive rate ``image_fpr`` over normal images), ``pixel_threshold``
        (``pixel_fpr`` over normal pixels inside the region), and the normal map statistics.
    """
    values = np.concatenate(
        [m[r > 0] if r is not None else m.ravel() for m, r in zip(normal_maps, regions or [None] * len(normal_maps))]
    )
    return {
        "image_threshold": metrics.threshold_at_fpr(image_scores, image_fpr),
        "pixel_threshold": metrics.threshold_at_fpr(values, pixel_fpr),
        "image_fpr": float(image_fpr),
        "pixel_fpr": float(pixel_fpr),
        "normal_map_mean": float(values.mean()),
        "normal_map_std": float(values.std()),
        "num_calibration_cases": int(len(image_scores)),
    }


class AnomalyEvaluator:
    """Run a trained model over a test set: anomaly maps, image scores, metrics, files.

    Args:
        network: the trained network.
        inferer: a :class:`~medad.inferers.AnomalyInferer` (possibly sliding-window / slice-wise).
        test_loader: batches with ``image`` (B, C, *spatial) and optionally ``mask``, ``label``, ``case_id``,
            the region key.
        output_dir: where ``metrics.json``, ``cases.csv/.parquet``, maps and overlays go.
        image_score: ``(B, 1, *spatial) map -> (B,) score`` (e.g. :class:`medad.scores.PooledMaxScore`).
        device: inference device.
        checkpoint_path: weights (and calibration) to load first; calibration is written back into it and into
            ``calibration.json`` beside it (:mod:`medad.engine.export`). A TorchScript file (``model.ts`` from
            ``ckpt_export``) is evaluated as it is: the scripted network replaces ``network`` (which may be None)
            and the calibration embedded in it is used.
        bundle: bundle name, checked against the checkpoint.
        calibration_loader: normal-only validation batches for thresholds (skipped when the checkpoint has them).
        image_fpr / pixel_fpr: false-positive rates of the calibrated thresholds.
        region_key: pixels to evaluate: a batch key (``"brain_mask"``), ``"foreground"`` (nonzero input) or None.
        write_maps: write per-case map / segmentation files (NRRD for 2D, NIfTI + seg.nrrd for 3D).
        num_overlays: PNG overlays for the first cases of each label.
        fpr_limit: AUPRO integration limit.
        progress: tqdm bar.
        registration_dir: preprocessing transforms folder (``<dir>/<case_id>/registration.json``, as written by
            ``medad preprocess``); a case with a record (there, or in its datalist item's ``registration_record``)
            also gets its map and segmentation in the patient's native space (``<case>_native_*``, on the grid of
            its item's ``native_image`` when given, else the recorded native grid).
        input_grid: write maps on the INPUT file's grid (3D: shape and affine of the file, undoing the loaders'
            reorientation / resampling; 2D: the picture's size). False writes them on the loaded grid.

    Written maps are on the input's grid; metrics are computed on the loaded grid (where the model works).
    """

    def __init__(
        self,
        network: torch.nn.Module | None,
        inferer: Callable[..., dict[str, torch.Tensor]],
        test_loader: Iterable[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        image_score: Callable[[torch.Tensor], torch.Tensor],
        device: str | torch.device = "cpu",
        checkpoint_path: str | os.PathLike | None = None,
        bundle: str | None = None,
        calibration_loader: Iterable[Mapping[str, Any]] | None = None,
        image_fpr: float = 0.05,
        pixel_fpr: float = 0.01,
        region_key: str | None = None,
        write_maps: bool = True,
        num_overlays: int = 4,
        fpr_limit: float = 0.3,
        progress: bool = True,
        registration_dir: str | os.PathLike | None = None,
        input_grid: bool = True,
    ) -> None:
        self.network = network
        self.inferer = inferer
        self.test_loader = test_loader
        self.output_dir = Path(output_dir)
        self.image_score = image_score
        self.device = torch.device(device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.bundle = bundle
        self.calibration_loader = calibration_loader
        self.image_fpr = image_fpr
        self.pixel_fpr = pixel_fpr
        self.region_key = region_key
        self.write_maps = write_maps
        self.num_overlays = num_overlays
        self.fpr_limit = fpr_limit
        self.progress = progress
        self.registration_dir = registration_dir
        self.input_grid = input_grid
        self.calibration: dict[str, float] | None = None

    # -- model -------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load weights and any stored calibration from ``checkpoint_path``."""
        if self.checkpoint_path is None:
            if self.network is None:
                raise ValueError("AnomalyEvaluator needs a network or a checkpoint_path to a TorchScript model.")
            return
        if self.checkpoint_path.is_file() and export.is_torchscript(self.checkpoint_path):
            module, info = export.load_torchscript(self.checkpoint_path, self.device)
            saved = info.get("bundle")
            if self.bundle is not None and saved is not None and saved != self.bundle:
                raise CheckpointMismatchError(
                    f"{self.checkpoint_path}: this model was exported by bundle '{saved}', not '{self.bundle}'."
                )
            self.network, self.calibration = module, info.get("calibration")
            return
        if self.network is None:
            raise ValueError(f"{self.checkpoint_path}: a network is needed to load a checkpoint that is not TorchScript.")
        state = load_network_weights(unwrap(self.network), self.checkpoint_path, self.bundle, self.device)
        self.calibration = state.get("calibration")

    @torch.no_grad()
    def infer(self, loader: Iterable[Mapping[str, Any]], desc: str) -> dict[str, Any]:
        """Maps, scores and bookkeeping for every case of ``loader``."""
        network = CountingNetwork(unwrap(self.network).to(self.device).eval())
        cases: dict[str, list[Any]] = {k: [] for k in ("case_id", "map", "mask", "region", "label", "score", "image", "restoration", "meta", "native", "seconds")}
        seconds = 0.0
        for batch in tqdm(clear_input_errors(loader), desc=desc, disable=not (self.progress and is_main_process())):
            # a plain tensor for the network (MetaTensor ops also update meta data, slowly); meta is read below
            image = batch["image"]
            images = (image.as_tensor() if hasattr(image, "as_tensor") else image).to(self.device)
            start = time.perf_counter()
            out = self.inferer(images, network)
            scores = self.image_score(out["anomaly_map"]).reshape(-1)
            elapsed = time.perf_counter() - start
            seconds += elapsed
            region = _region(batch, self.region_key, images)
            count = images.shape[0]
            ids = _case_ids(batch, count, len(cases["case_id"]))
            labels = batch.get("label")
            for i in range(count):
                cases["case_id"].append(ids[i])
                cases["map"].append(out["anomaly_map"][i, 0].float().cpu().numpy())
                cases["mask"].append(batch["mask"][i, 0].cpu().numpy() > 0.5 if "mask" in batch else None)
                cases["region"].append(region[i, 0].cpu().numpy() if region is not None else None)
                label = int(labels[i]) if labels is not None else None
                cases["label"].append(label)
                cases["score"].append(float(scores[i]))
                # only the cases that get an overlay keep their image and restoration (a cohort of volumes
                # would not fit in memory otherwise); the first `num_overlays` cases of each label are drawn
                drawn = cases["label"].count(label) <= self.num_overlays
                cases["image"].append(images[i].float().cpu().numpy() if drawn else None)
                cases["restoration"].append(out["restoration"][i].float().cpu().numpy() if drawn else None)
                meta = getattr(batch["image"], "meta", None) or {}
                cases["meta"].append({k: (v[i] if isinstance(v, (list, tuple, torch.Tensor)) and len(v) == count else v) for k, v in meta.items() if k in _META_KEYS})
                raw_id = batch["case_id"][i] if isinstance(batch.get("case_id"), (list, tuple)) else None
                native = {"case_id": raw_id}
                for key in _NATIVE_KEYS:
                    value = batch.get(key)
                    native[key] = value[i] if isinstance(value, (list, tuple)) and len(value) == count else None
                cases["native"].append(native)
                cases["seconds"].append(elapsed / count)
        num_cases = max(1, len(cases["case_id"]))
        cases["timing"] = {
            "inference_seconds": seconds,
            "images_per_second": len(cases["case_id"]) / seconds if seconds > 0 else math.nan,
            "network_evaluations_per_image": network.items / num_cases,
            "network_calls": network.calls,
        }
        return cases

    def calibrate(self) -> dict[str, float] | None:
        """Thresholds from the normal calibration data, stored into the checkpoint (rank 0)."""
        if self.calibration is not None or self.calibration_loader is None:
            return self.calibration
        cases = self.infer(self.calibration_loader, "calibrate")
        self.calibration = calibrate_thresholds(
            np.asarray(cases["score"]), cases["map"], self.image_fpr, self.pixel_fpr,
            cases["region"] if self.region_key else None,
        )
        if (self.checkpoint_path is not None and self.checkpoint_path.is_file() and is_main_process()
                and not export.is_torchscript(self.checkpoint_path)):
            state = load_checkpoint(self.checkpoint_path)
            state["calibration"] = self.calibration
            save_checkpoint(self.checkpoint_path, state)
            # The same thresholds beside the checkpoint, for ckpt_export to embed in TorchScript.
            fingerprint = export.weights_fingerprint(unwrap(self.network).state_dict())
            export.write_calibration_file(self.checkpoint_path, self.calibration, self.bundle, fingerprint)
        return self.calibration

    # -- evaluation --------------------------------------------------------------------------------
    def _metrics(self, cases: Mapping[str, Any]) -> dict[str, Any]:
        labels = [label for label in cases["label"] if label is not None]
        masks = [m if m is not None else np.zeros_like(cases["map"][i], bool) for i, m in enumerate(cases["mask"])]
        regions = cases["region"] if self.region_key else None
        pixel_threshold = self.calibration["pixel_threshold"] if self.calibration else None
        result: dict[str, Any] = {"num_cases": len(cases["case_id"])}
        if any(m.any() for m in masks):
            result.update(
                metrics.pooled_metrics(cases["map"], masks, None, None, region=regions, threshold=pixel_threshold,
                                       fpr_limit=self.fpr_limit)
            )
        # image labels come from the datalist (an anomalous image may lack a mask), not from the masks
        if len(labels) == len(cases["case_id"]) and len(set(labels)) == 2:
            result["image_auroc"] = metrics.image_auroc(cases["score"], labels)
        if self.calibration:
            decisions = np.asarray(cases["score"]) >= self.calibration["image_threshold"]
            result["calibration"] = self.calibration
            if len(labels) == len(cases["case_id"]):
                truth = np.asarray(labels) == 1
                result["image_decision_accuracy"] = float((decisions == truth).mean())
                result["image_decision_fpr"] = float(decisions[~truth].mean()) if (~truth).any() else math.nan
                result["image_decision_tpr"] = float(decisions[truth].mean()) if truth.any() else math.nan
        result.update(cases["timing"])
        return result

    def _write_cases(self, cases: Mapping[str, Any]) -> list[dict[str, Any]]:
        from medad import io

        pixel_threshold = self.calibration["pixel_threshold"] if self.calibration else None
        image_threshold = self.calibration["image_threshold"] if self.calibration else None
        maps_dir, overlay_dir = self.output_dir / "maps", self.output_dir / "overlays"
        if self.write_maps and pixel_threshold is not None:
            # colours of the label maps (<case>_seg.nii.gz) in Slicer; the .seg.nrrd files carry their own
            io.write_color_table(maps_dir / "anomaly.ctbl", [io.ANOMALY_SEGMENT])
        records = []
        for i, case_id in enumerate(cases["case_id"]):
            anomaly_map, mask = cases["map"][i], cases["mask"][i]
            record: dict[str, Any] = {
                "case_id": case_id,
                "image_score": cases["score"][i],
                "label": cases["label"][i],
                "threshold": image_threshold,
                "runtime_s": cases["seconds"][i],
                "anomaly_map": anomaly_map,
                "ground_truth_mask": mask,
            }
            if pixel_threshold is not None:
                record["anomaly_mask"] = anomaly_map >= pixel_threshold
            if mask is not None and mask.any():
                # per-case AP and best-possible Dice inside the region (brain voxels), the UPD/DISYRE protocol
                region = cases["region"][i] if self.region_key else None
                row = metrics.per_case_metrics([anomaly_map], [mask], region=None if region is None else [region])[0]
                record.update({k: row[k] for k in ("ap", "best_dice", "best_dice_threshold")})
            meta = cases["meta"][i]
            if anomaly_map.ndim == 3:
                spacing = meta.get("pixdim")
                record["voxel_spacing"] = [float(s) for s in np.asarray(spacing)[1:4]] if spacing is not None else [1.0, 1.0, 1.0]
            if self.write_maps:
                self._write_maps(case_id, anomaly_map, meta, cases["native"][i], maps_dir, pixel_threshold)
            if cases["image"][i] is not None:
                if anomaly_map.ndim == 2:
                    io.save_overlay_png(overlay_dir / f"{case_id}.png", cases["image"][i], cases["restoration"][i],
                                        anomaly_map, mask, threshold=pixel_threshold, title=case_id)
                else:
                    io.save_volume_overlay_png(overlay_dir / f"{case_id}.png", cases["image"][i][0], anomaly_map,
                                               mask=mask, restoration=cases["restoration"][i][0])
            records.append(record)
        return records

    def _write_maps(self, case_id: str, anomaly_map: np.ndarray, meta: Mapping[str, Any], native: Mapping[str, Any],
                    maps_dir: Path, pixel_threshold: float | None) -> None:
        """The case's map and segmentation files on the input's grid (and in native space when recorded)."""
        from medad import io

        if anomaly_map.ndim == 2:
            if self.input_grid and meta.get("height") is not None and meta.get("width") is not None:
                anomaly_map = grids.to_image_size(anomaly_map, (int(meta["height"]), int(meta["width"])))
            io.write_image_case(case_id, anomaly_map, maps_dir, pixel_threshold)
            return
        affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
        reference: Any = (affine, anomaly_map.shape)
        written = anomaly_map
        if self.input_grid and meta.get("original_affine") is not None and meta.get("spatial_shape") is not None:
            input_affine = np.asarray(meta["original_affine"], dtype=np.float64)
            input_shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).ravel()[:3])
            written = grids.to_input_grid(anomaly_map, affine, input_affine, input_shape)
            source = str(meta.get("filename_or_obj") or "")
            is_nifti = source.endswith((".nii", ".nii.gz")) and os.path.isfile(source)
            reference = source if is_nifti else (input_affine, input_shape)
        io.write_volume_case(case_id, written, reference, maps_dir, pixel_threshold)
        record = grids.registration_record_for(native, self.registration_dir)
        if record is not None:
            native_map, native_affine = grids.to_native_space(anomaly_map, affine, record)
            native_image = native.get("native_image")
            native_reference: Any = (native_affine, native_map.shape)
            if native_image and os.path.isfile(str(native_image)):
                native_reference = str(native_image)
            io.write_volume_case(f"{case_id}_native", native_map, native_reference, maps_dir, pixel_threshold)

    def run(self) -> dict[str, Any]:
        """Load, calibrate, infer on the test set, write ``metrics.json``, case tables, maps and overlays."""
        from medad import io

        self.load()
        self.calibrate()
        cases = self.infer(self.test_loader, "evaluate")
        result = self._metrics(cases)
        if is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            records = self._write_cases(cases)
            table = io.case_table(records)
            io.write_tables(table, self.output_dir, stem="cases")
            labels = [label for label in cases["label"] if label is not None]
            if len(labels) == len(cases["score"]) and len(set(labels)) == 2:
                io.save_roc_pr_curves(cases["score"], labels, self.output_dir / "image")
            io.write_json(self.output_dir / "metrics.json", result)
        logger.info("metrics: %s", {k: v for k, v in result.items() if not isinstance(v, dict)})
        return result
