"""Evaluation shared by every bundle: calibrate on normal data, infer, score, write, measure.

The evaluator owns nothing method-specific: a restoration inferer makes the maps, an image-score function
pools them, :mod:`medad.metrics` measures them and :mod:`medad.io` writes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medad import metrics
from medad import scores as scores_module
from medad.data.validation import check_files, clear_input_errors
from medad.inferers.base import CountingNetwork, nonzero_foreground

from . import comparison, export, grids, shards
from .amp import autocast, check_amp
from .checkpoint import CheckpointMismatchError, load_network_weights
from .distributed import is_main_process, unwrap

__all__ = ["SAVE_MAPS", "AnomalyEvaluator", "calibrate_thresholds"]

logger = logging.getLogger("medad.evaluate")

# Per-case meta data kept for writing results on the input's grid.
_META_KEYS = ("filename_or_obj", "affine", "pixdim", "original_affine", "spatial_shape", "height", "width")
# Per-case datalist entries for native-space output (preprocessed MRI).
_NATIVE_KEYS = ("registration_record", "native_image")
#: ``save_maps`` choices: which cases get map / segmentation files.
SAVE_MAPS = ("none", "anomalous", "all")
# Compact per-case data under the output folder, kept so that a rerun skips finished cases and still measures the
# pooled metrics over every case.
_CASE_DATA = "case_data"
_PARTIAL_TABLE = "cases_partial.csv"


def _case_ids(batch: Mapping[str, Any], count: int, offset: int) -> list[str]:
    ids = batch.get("case_id")
    if ids is None:
        return [f"case_{offset + i:04d}" for i in range(count)]
    return [str(i).replace("/", "_") for i in ids]


def _group(batch: Mapping[str, Any], index: int, label: int | None) -> str:
    """Overlay group of a case: its defect type (MVTec ``defect`` / ``defect_type`` field), else its label."""
    for key in ("defect_type", "defect"):
        values = batch.get(key)
        if isinstance(values, (list, tuple)) and index < len(values) and values[index] is not None:
            return str(values[index])
    return {None: "unlabelled", 0: "normal", 1: "anomalous"}.get(label, str(label))


def _settings(obj: Any) -> dict[str, Any]:
    """Plain-valued attributes of an inferer / score, for the resume signature (what changes the maps)."""
    values = {"type": f"{type(obj).__module__}.{getattr(type(obj), '__qualname__', type(obj).__name__)}"}
    if callable(obj) and hasattr(obj, "__qualname__"):
        values["function"] = f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    for key, value in sorted(getattr(obj, "__dict__", {}).items()):
        if isinstance(value, (bool, int, float, str, type(None))) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value)
        ):
            values[key] = value
        elif isinstance(value, torch.nn.Module) or callable(value):
            values[key] = _settings(value)
    return values


def _region(batch: Mapping[str, Any], key: str | None, images: torch.Tensor) -> torch.Tensor | None:
    if key is None:
        return None
    if key == "foreground":  # nonzero input voxels, e.g. skull-stripped brains
        return nonzero_foreground(images)
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
    needed = math.ceil(1.0 / image_fpr - 1e-9) if image_fpr > 0 else None
    if needed is not None and len(image_scores) < needed:
        # e.g. 3 calibration volumes at 5 %: the threshold is just above the largest of 3 normal scores, and a
        # fresh normal volume exceeds the largest of n exchangeable ones with probability 1 / (n + 1) = 25 %
        logger.warning(
            "the image threshold comes from %d normal case(s): at least %d are needed to estimate a %.0f %% false-"
            "positive rate, so image-level decisions are unreliable (the pixel threshold, from %d values, is not "
            "affected); hold out more normal cases (--val_fraction) for image decisions.",
            len(image_scores), needed, 100 * image_fpr, values.size)
    return {
        "image_threshold": metrics.threshold_at_fpr(image_scores, image_fpr),
        "pixel_threshold": metrics.threshold_at_fpr(values, pixel_fpr),
        "image_fpr": float(image_fpr),
        "pixel_fpr": float(pixel_fpr),
        "normal_map_mean": float(values.mean()),
        "normal_map_std": float(values.std()),
        "num_calibration_cases": int(len(image_scores)),
        "image_threshold_reliable": bool(needed is None or len(image_scores) >= needed),
    }


class AnomalyEvaluator:
    """Run a trained model over a test set: anomaly maps, image scores, metrics, files.

    Cases are written as they are done: each case's map / segmentation / overlay files, its compact data
    (``case_data/<case>.npz``: the map on the loaded grid, ground truth, region and its table row) and the table of
    the cases finished so far (``cases_partial.csv``, rewritten atomically). A rerun on the same output folder with
    the same weights, calibration and inferer settings skips the finished cases (a changed setting discards them)
    and still writes the complete ``cases.csv`` and ``metrics.json`` over all cases. Every batch of cases is
    inferred under its own seed (``seed`` + batch index), so a resumed evaluation gives the same maps as an
    uninterrupted one, also for stochastic inferers.

    Args:
        network: the trained network.
        inferer: a :class:`~medad.inferers.AnomalyInferer` (possibly sliding-window / slice-wise).
        test_loader: batches with ``image`` (B, C, *spatial) and optionally ``mask``, ``label``, ``case_id``,
            ``defect`` / ``defect_type`` and the region key.
        output_dir: where ``metrics.json``, ``cases.csv/.parquet``, maps and overlays go.
        image_score: ``(B, 1, *spatial) map -> (B,) score`` (e.g. :class:`medad.scores.PooledMaxScore`).
        device: inference device.
        checkpoint_path: weights (and calibration) to load first; calibration is written back into it and into
            ``calibration.json`` beside it (:mod:`medad.engine.export`). An exported network (TorchScript
            ``model.ts``, ``torch.export`` ``model.pt2`` or ONNX ``model.onnx``, from ``medad export``) is evaluated
            as it is: it replaces ``network`` (which may be None) and the calibration embedded in it is used.
        bundle: bundle name, checked against the checkpoint.
        calibration_loader: normal-only validation batches for thresholds (skipped when the checkpoint has them).
        image_fpr / pixel_fpr: false-positive rates of the calibrated thresholds.
        region_key: pixels to evaluate: a batch key (``"brain_mask"``), ``"foreground"`` (nonzero input) or None.
        foreground_key: batch key of a mask handed to the inferer as ``foreground=`` (MRI: ``"brain_mask"``, used
            for DISYRE's foreground weighting and zero background instead of "input > 0"); None: not passed.
        save_maps: which cases get map and segmentation files: ``"all"`` (default), ``"anomalous"`` (cases whose
            image score reaches the calibrated threshold, and cases labelled anomalous) or ``"none"``.
        write_maps: False is the same as ``save_maps="none"`` (older configs).
        compact_maps: store maps with float16 precision (10 mantissa bits; float32 range and file type, so every
            viewer reads them) inside gzip-compressed files: about half the size; metrics always use full precision.
        num_overlays: PNG overlays for the first ``num_overlays`` cases of each defect type (the MVTec ``defect``
            field; else each label: normal / anomalous).
        fpr_limit: AUPRO integration limit.
        progress: tqdm bar.
        registration_dir: preprocessing transforms folder (``<dir>/<case_id>/registration.json``, as written by
            ``medad preprocess``); a case with a record (there, or in its datalist item's ``registration_record``)
            also gets its map and segmentation in the patient's native space (``<case>_native_*``, on the grid of
            its item's ``native_image`` when given, else the recorded native grid).
        input_grid: write maps on the INPUT file's grid (3D: shape and affine of the file, undoing the loaders'
            reorientation / resampling; 2D: the picture's size). False writes them on the loaded grid.
        resume: skip the cases an earlier run into the same ``output_dir`` finished (same signature).
        seed: base seed of the per-batch seeds.
        amp: ``"bf16"``: run the inferer under bfloat16 autocast (:mod:`medad.engine.amp`; the calibration is made
            under the same setting); None: full precision.
        tracker: an experiment tracker (:class:`~medad.engine.tracking.MLflowTracker`, shared with the trainer):
            the metrics, calibration and result files are logged and the run is ended.
        val_handlers: MONAI ``MLFlowHandler``s put here by stock ``monai.bundle run --tracking mlflow``; their
            store / experiment / run name become ``tracker`` (:func:`medad.engine.tracking.tracker_from_handlers`).
        deidentify_dicom: a case read from a DICOM series folder also gets a DICOM Segmentation and Parametric Map on
            the series' grid (with ``input_grid``; :mod:`medad.io.dicom_outputs`); True (default) leaves their
            patient and study attributes empty, False keeps the source's patient name, ID, birth date, sex and
            study date, time, accession number, referring physician and study ID (so that a PACS files them).
        inference_profile: name of the inference setting the inferer was built with (``"paper"``, or ``"fast"``
            from a bundle's ``configs/fast.json``). Thresholds hold for the maps of one setting only, so each profile
            has its own calibration: ``"paper"`` in the checkpoint's ``calibration`` (and ``calibration.json``),
            another in its ``calibrations[<profile>]``; a profile without one is calibrated when normal data are
            given, else its cases get no decisions or segmentations (with a warning).
        inference_settings: the settings besides the profile that shape the maps (e.g. ADDM's ``noise_level``,
            DISYRE's ``inference_steps``; a bundle's ``inference_settings`` config section). They are recorded with
            the thresholds; stored thresholds made with other settings are not used (a warning names both): they
            are calibrated again when normal data are given, without being stored (the checkpoint keeps those of its
            own settings), else the cases get no decisions or segmentations. None: not checked.
        calibration_slices: calibrate volumes on this many equally spaced slices through each calibration volume's
            region (brain) instead of all of them (None: all). The pixel threshold keeps its meaning (the
            ``1 - pixel_fpr`` quantile of normal voxels) with sampling error; the image score is estimated by
            :func:`medad.scores.sampled_image_score` (a top-k mean without bias, a maximum biased low). The
            record states the slices, the time and the threshold's bootstrap interval.
        calibration_bootstrap: resamples of the cluster bootstrap (over slices, or images) that gives the pixel
            threshold's standard error and 95 % interval in the record (0: none).
        shard: ``"K/N"``: evaluate only the K-th of N contiguous blocks of the test batches (another machine, or a
            SLURM array task, takes each other block; :mod:`medad.engine.shards`). Maps and overlays go to
            ``output_dir`` as usual, the shard's tables and metrics to ``output_dir/shards/K-of-N/``; the shard that
            finishes last merges every shard's cases into ``output_dir`` (``medad cohort merge-shards`` does it by
            hand). Every batch keeps its seed, so the merged tables equal an unsharded run's. The thresholds must
            exist already (shards do not calibrate), except where the stored ones were made with other inference
            settings: then every shard calibrates on the same held-out data (the same seeds, so the same thresholds)
            and none writes the checkpoint.
        baselines: baselines measured beside the method on the same test cases and pixels, with the same metric code
            (:mod:`medad.engine.comparison`), into ``metrics.json`` (``baselines``) and ``report.html``: ``"auto"``
            (default) the z-score baseline fitted on ``calibration_loader`` and, for volumes, the intensity
            baseline; a list of names (``"zscore"``, ``"intensity"``); None or ``[]``: none. They need
            ``calibration_loader`` (held-out normal data), and the zscore / intensity bundles are not compared with
            themselves. The method's numbers, files and calibration do not change.

    Written maps are on the input's grid, and so are the table's ``anomaly_area_px`` / ``anomaly_volume_ml`` (the
    written segmentation's pixels / voxels, with the input file's voxel size); metrics (AUROC, AP, Dice, ...) are
    computed on the loaded grid, where the model works.
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
        foreground_key: str | None = None,
        save_maps: str = "all",
        write_maps: bool = True,
        compact_maps: bool = True,
        num_overlays: int = 2,
        fpr_limit: float = 0.3,
        progress: bool = True,
        registration_dir: str | os.PathLike | None = None,
        input_grid: bool = True,
        resume: bool = True,
        seed: int = 0,
        amp: str | None = None,
        tracker: Any | None = None,
        val_handlers: Sequence[Any] | None = None,
        deidentify_dicom: bool = True,
        inference_profile: str = "paper",
        inference_settings: Mapping[str, Any] | None = None,
        calibration_slices: int | None = None,
        calibration_bootstrap: int = 200,
        shard: str | None = None,
        baselines: str | Sequence[str] | None = "auto",
    ) -> None:
        if save_maps not in SAVE_MAPS:
            raise ValueError(f"save_maps must be one of {', '.join(SAVE_MAPS)}, got {save_maps!r}.")
        if tracker is None and val_handlers:
            from .tracking import tracker_from_handlers

            tracker = tracker_from_handlers(val_handlers, Path(output_dir).parent)
        self.tracker = tracker if is_main_process() else None
        self.network = network
        self.inferer = inferer
        self.test_loader = test_loader
        self.output_dir = Path(output_dir)
        self.maps_root = self.output_dir  # maps and overlays: one file set per case, shared by every shard
        self.shard = shards.parse_shard(shard)
        if self.shard is not None:
            self.output_dir = shards.evaluation_shard_dir(output_dir, *self.shard)
        self.image_score = image_score
        self.device = torch.device(device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.bundle = bundle
        self.calibration_loader = calibration_loader
        self.image_fpr = image_fpr
        self.pixel_fpr = pixel_fpr
        self.region_key = region_key
        self.foreground_key = foreground_key
        self.save_maps = save_maps if write_maps else "none"
        self.compact_maps = compact_maps
        self.num_overlays = int(num_overlays)
        self.fpr_limit = fpr_limit
        self.progress = progress
        self.registration_dir = registration_dir
        self.input_grid = input_grid
        self.resume = resume
        self.seed = int(seed)
        self.amp = check_amp(amp)
        self.deidentify_dicom = bool(deidentify_dicom)
        self.inference_profile = str(inference_profile or "paper")
        # JSON round trip: tuples become lists, as in the stored record they are compared with
        self.inference_settings = None if inference_settings is None else json.loads(json.dumps(dict(inference_settings)))
        self._stored_for_other_settings = False
        if calibration_slices is not None and int(calibration_slices) < 1:
            raise ValueError(f"calibration_slices must be a positive number of slices or None, got {calibration_slices}.")
        self.calibration_slices = None if calibration_slices is None else int(calibration_slices)
        self.calibration_bootstrap = int(calibration_bootstrap)
        self.calibration: dict[str, float] | None = None
        self.baselines = comparison.parse_baselines(baselines)

    # -- model -------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load weights and any stored calibration from ``checkpoint_path``."""
        if self.checkpoint_path is None:
            if self.network is None:
                raise ValueError("AnomalyEvaluator needs a network or a checkpoint_path to an exported model.")
            return
        if export.model_format(self.checkpoint_path) is not None:  # TorchScript, torch.export (.pt2) or ONNX
            module, info = export.load_exported(self.checkpoint_path, self.device)
            saved = info.get("bundle")
            if self.bundle is not None and saved is not None and saved != self.bundle:
                raise CheckpointMismatchError(
                    f"{self.checkpoint_path}: this model was exported by bundle '{saved}', not '{self.bundle}'."
                )
            self.network, self.calibration = module, self._profile_calibration(info)
            return
        if self.network is None:
            raise ValueError(f"{self.checkpoint_path}: a network is needed to load a checkpoint that is not an export.")
        state = load_network_weights(unwrap(self.network), self.checkpoint_path, self.bundle, self.device)
        self.calibration = self._profile_calibration(state)

    def _profile_calibration(self, state: Mapping[str, Any]) -> dict[str, float] | None:
        """The stored calibration of this evaluator's inference profile (``calibration`` for ``"paper"``)."""
        if self.inference_profile == "paper":
            record = state.get("calibration")
        else:
            record = dict(state.get("calibrations") or {}).get(self.inference_profile)
        stored = record.get("inference_settings") if isinstance(record, Mapping) else None
        if stored is None or self.inference_settings is None or stored == self.inference_settings:
            return record
        changed = sorted(k for k in {*stored, *self.inference_settings} if stored.get(k) != self.inference_settings.get(k))
        logger.warning(
            "%s: the stored '%s' thresholds were calibrated with %s; this run uses %s: they are not used here%s",
            self.checkpoint_path, self.inference_profile, ", ".join(f"{k}={stored.get(k)!r}" for k in changed),
            ", ".join(f"{k}={self.inference_settings.get(k)!r}" for k in changed),
            " (calibrated again on the held-out normal data, not stored)" if self.calibration_loader is not None
            else " (no decisions or segmentations: evaluate with held-out normal data to calibrate these settings)",
        )
        self._stored_for_other_settings = True
        return None

    @contextlib.contextmanager
    def _seeded(self, batch_index: int) -> Iterator[None]:
        # each batch draws its noise from its own seed: the maps do not depend on which batches ran before
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + batch_index)
            yield

    def _batches(
        self, loader: Iterable[Mapping[str, Any]], network: CountingNetwork, desc: str,
        batch_indices: Sequence[int] | None = None, skip: Callable[[list[str]], bool] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Infer ``loader`` batch by batch; yields the cases of each batch as dicts (maps as numpy arrays)."""
        seen = 0
        bar = tqdm(clear_input_errors(loader), desc=desc, disable=not (self.progress and is_main_process()))
        for position, batch in enumerate(bar):
            batch_index = batch_indices[position] if batch_indices is not None else position
            image = batch["image"]
            count = image.shape[0]
            ids = _case_ids(batch, count, seen)
            seen += count
            if skip is not None and skip(ids):
                continue
            # a plain tensor for the network (MetaTensor ops also update meta data, slowly); meta is read below
            images = (image.as_tensor() if hasattr(image, "as_tensor") else image).to(self.device)
            items, calls = network.items, network.calls
            start = time.perf_counter()
            with self._seeded(batch_index):
                extra = {}
                if self.foreground_key is not None:  # e.g. the brain mask, for the inferer's foreground weighting
                    fg = batch[self.foreground_key]
                    extra["foreground"] = (fg.as_tensor() if hasattr(fg, "as_tensor") else fg).to(self.device)
                with autocast(self.device, self.amp):
                    out = self.inferer(images, network, **extra)
                # maps and restorations in float32 whatever ran under autocast (numpy has no bfloat16)
                out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
            scores = self.image_score(out["anomaly_map"]).reshape(-1)
            elapsed = time.perf_counter() - start
            region = _region(batch, self.region_key, images)
            labels = batch.get("label")
            meta = getattr(batch["image"], "meta", None) or {}
            cases = []
            for i in range(count):
                label = int(labels[i]) if labels is not None else None
                native = {"case_id": batch["case_id"][i] if isinstance(batch.get("case_id"), (list, tuple)) else None}
                for key in _NATIVE_KEYS:
                    value = batch.get(key)
                    native[key] = value[i] if isinstance(value, (list, tuple)) and len(value) == count else None
                cases.append({
                    "case_id": ids[i],
                    "map": out["anomaly_map"][i, 0].float().cpu().numpy(),
                    "mask": batch["mask"][i, 0].cpu().numpy() > 0.5 if "mask" in batch else None,
                    "region": region[i, 0].cpu().numpy() if region is not None else None,
                    "label": label,
                    "group": _group(batch, i, label),
                    "score": float(scores[i]),
                    # image and restoration stay on the device side until the case is drawn (or dropped)
                    "image": images[i], "restoration": out["restoration"][i],
                    "meta": {k: (v[i] if isinstance(v, (list, tuple, torch.Tensor)) and len(v) == count else v)
                             for k, v in meta.items() if k in _META_KEYS},
                    "native": native,
                    "seconds": elapsed / count,
                    # the batch's network use is booked on its first case (whole numbers; batches are kept whole)
                    "network_items": network.items - items if i == 0 else 0,
                    "network_calls": network.calls - calls if i == 0 else 0,
                })
            yield cases

    @torch.no_grad()
    def infer(self, loader: Iterable[Mapping[str, Any]], desc: str) -> dict[str, Any]:
        """Maps, scores and bookkeeping for every case of ``loader``, in memory (used for calibration)."""
        network = CountingNetwork(unwrap(self.network).to(self.device).eval())
        keys = ("case_id", "map", "mask", "region", "label", "score", "seconds")
        cases: dict[str, list[Any]] = {k: [] for k in keys}
        for batch in self._batches(loader, network, desc):
            for case in batch:
                for key in keys:
                    cases[key].append(case[key])
        return cases

    def calibrate(self) -> dict[str, float] | None:
        """Thresholds from the normal calibration data, stored into the checkpoint (rank 0)."""
        if self.calibration is not None:
            return self.calibration
        if self.shard is not None and self.calibration_loader is not None and not self._stored_for_other_settings:
            raise ValueError(
                f"{self.checkpoint_path}: --shard needs thresholds calibrated before the shards start (each shard "
                "would calibrate and write the checkpoint); run the calibration once without --shard."
            )
        if self.calibration_loader is None:
            if self.inference_profile != "paper":
                logger.warning(
                    "%s: no thresholds calibrated for inference profile '%s'; maps are written without decisions or "
                    "segmentations (calibrate it once with --workflow evaluate and the same profile)",
                    self.checkpoint_path, self.inference_profile,
                )
            return None
        start = time.perf_counter()
        sampled: list[dict[str, Any]] = []  # per calibration case under slice sampling: sampled share, full width
        loader = self.calibration_loader
        if self.calibration_slices:
            loader = self._sampled_slices(self.calibration_loader, sampled)
        cases = self.infer(loader, "calibrate")
        estimate = None
        if sampled:  # the image score of each volume, estimated from its sampled slices
            scores = []
            for anomaly_map, info in zip(cases["map"], sampled):
                score, estimate = scores_module.sampled_image_score(self.image_score, info["fraction"], info["width"])
                scores.append(float(score(torch.as_tensor(anomaly_map)[None, None]).reshape(-1)[0]))
            cases["score"] = scores
        regions = cases["region"] if self.region_key else None
        self.calibration = calibrate_thresholds(
            np.asarray(cases["score"]), cases["map"], self.image_fpr, self.pixel_fpr, regions,
        )
        self.calibration.update(self._calibration_record(cases["map"], regions, sampled, estimate))
        self.calibration["calibration_seconds"] = round(time.perf_counter() - start, 3)  # inference + bootstrap
        self._store_calibration()
        return self.calibration

    def _slice_axis(self) -> int:
        """Spatial axis (0-2) along which the inferer slices volumes (axial, 2, when it does not say)."""
        return int(getattr(self.inferer, "spatial_dim", 2))

    def _sampled_slices(
        self, loader: Iterable[Mapping[str, Any]], sampled: list[dict[str, Any]]
    ) -> Iterator[Mapping[str, Any]]:
        """The calibration batches cut to ``calibration_slices`` equally spaced slices through their region.

        Volumes only (2D batches pass unchanged). A slice-wise inferer gives the sampled slices the same maps as in
        the whole volume; ``sampled`` receives, per case, the share of its region inside the sample and the
        volume's last spatial size (for the image-score estimate).
        """
        axis = 2 + self._slice_axis()
        for batch in loader:
            image = batch["image"]
            if image.dim() != 5:
                for _ in range(image.shape[0]):
                    sampled.append({"fraction": 1.0, "width": int(image.shape[-1])})
                yield batch
                continue
            plain = image.as_tensor() if hasattr(image, "as_tensor") else image
            region = _region(batch, self.region_key or "foreground", plain)
            region = region.as_tensor() if hasattr(region, "as_tensor") else region
            per_slice = region.movedim(axis, 2).flatten(3).sum(dim=3)  # (B, 1, S): region voxels of every slice
            present = torch.nonzero(per_slice.sum(dim=(0, 1)) > 0).flatten()
            if len(present) == 0:
                present = torch.arange(plain.shape[axis])
            picks = np.unique(np.round(np.linspace(0, len(present) - 1, min(self.calibration_slices, len(present)))))
            index = present[torch.as_tensor(picks, dtype=torch.long)]
            totals = per_slice.sum(dim=(1, 2)).clamp_min(1)
            shares = per_slice[:, :, index].sum(dim=(1, 2)) / totals
            for share in shares.tolist():
                sampled.append({"fraction": max(float(share), 1e-6), "width": int(plain.shape[-1])})
            cut = {}
            for key, value in batch.items():
                if torch.is_tensor(value) and value.dim() == 5 and value.shape[axis] == plain.shape[axis]:
                    value = value.as_tensor() if hasattr(value, "as_tensor") else value
                    value = value.index_select(axis, index.to(value.device))
                cut[key] = value
            yield cut

    def _calibration_record(
        self, maps: Sequence[np.ndarray], regions: Sequence[np.ndarray] | None, sampled: Sequence[Mapping[str, Any]],
        estimate: str | None,
    ) -> dict[str, Any]:
        """What the thresholds were made with: profile, slice sample, the pixel threshold's sampling error."""
        record: dict[str, Any] = {"inference_profile": self.inference_profile, "calibration_slices": self.calibration_slices}
        if self.inference_settings is not None:
            record["inference_settings"] = self.inference_settings
        if sampled and estimate is not None:
            record["calibration_region_share"] = float(np.mean([s["fraction"] for s in sampled]))
            record["image_score_estimate"] = estimate
        if self.calibration_bootstrap > 0:
            from medad.metrics.bootstrap import threshold_interval

            clusters = []  # the pixel values grouped by slice (volumes) or image: the units that were sampled
            for i, anomaly_map in enumerate(maps):
                region = regions[i] if regions is not None else None
                values = anomaly_map if region is None else np.where(region > 0, anomaly_map, np.nan)
                units = np.moveaxis(values, self._slice_axis(), 0) if values.ndim == 3 else values[None]
                clusters += [u[np.isfinite(u)] for u in units.reshape(units.shape[0], -1)]
            se, low, high = threshold_interval(clusters, self.pixel_fpr, self.calibration_bootstrap, seed=self.seed)
            record.update(pixel_threshold_se=se, pixel_threshold_ci95=[low, high],
                          pixel_threshold_bootstrap=f"{self.calibration_bootstrap} resamples of {len(clusters)} "
                                                    f"{'slices' if maps and np.ndim(maps[0]) == 3 else 'images'}")
        return record

    def _store_calibration(self) -> None:
        """Write the thresholds into the checkpoint (rank 0): ``calibration`` (paper, also ``calibration.json``) or
        ``calibrations[profile]``."""
        if (self.checkpoint_path is None or not self.checkpoint_path.is_file() or not is_main_process()
                or export.model_format(self.checkpoint_path) is not None or self._stored_for_other_settings):
            return
        export.store_thresholds(self.checkpoint_path, self.calibration, self.inference_profile, self.bundle,
                                unwrap(self.network))

    # -- evaluation --------------------------------------------------------------------------------
    def _ranking_metrics(self, cases: Mapping[str, Any], pixel_threshold: float | None = None) -> dict[str, Any]:
        """Pooled pixel metrics inside the region and image AUROC of ``cases`` (the method's or a baseline's)."""
        labels = [label for label in cases["label"] if label is not None]
        masks = [m if m is not None else np.zeros_like(cases["map"][i], bool) for i, m in enumerate(cases["mask"])]
        regions = cases["region"] if self.region_key else None
        result: dict[str, Any] = {"num_cases": len(cases["case_id"])}
        if any(m.any() for m in masks):
            result.update(
                metrics.pooled_metrics(cases["map"], masks, None, None, region=regions, threshold=pixel_threshold,
                                       fpr_limit=self.fpr_limit)
            )
        # image labels come from the datalist (an anomalous image may lack a mask), not from the masks
        if len(labels) == len(cases["case_id"]) and len(set(labels)) == 2:
            result["image_auroc"] = metrics.image_auroc(cases["score"], labels)
        return result

    def _metrics(self, cases: Mapping[str, Any]) -> dict[str, Any]:
        labels = [label for label in cases["label"] if label is not None]
        pixel_threshold = self.calibration["pixel_threshold"] if self.calibration else None
        result = self._ranking_metrics(cases, pixel_threshold)
        if self.calibration:
            decisions = np.asarray(cases["score"]) >= self.calibration["image_threshold"]
            result["calibration"] = self.calibration
            if len(labels) == len(cases["case_id"]):
                truth = np.asarray(labels) == 1
                result["image_decision_accuracy"] = float((decisions == truth).mean())
                result["image_decision_fpr"] = float(decisions[~truth].mean()) if (~truth).any() else math.nan
                result["image_decision_tpr"] = float(decisions[truth].mean()) if truth.any() else math.nan
        result.update(_border_frame(cases))
        result.update(cases["timing"])
        return result

    def _signature(self) -> str:
        """What the finished cases depend on: weights, calibration, inferer / score settings, output settings."""
        network = unwrap(self.network)
        content = {
            "weights": export.network_fingerprint(network) if network is not None else None,
            "calibration": self.calibration,
            "inferer": _settings(self.inferer),
            "image_score": _settings(self.image_score),
            "region_key": self.region_key,
            "input_grid": self.input_grid,
            "seed": self.seed,
            **({"amp": self.amp} if self.amp else {}),  # only when set: full-precision signatures stay as they were
        }
        text = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _should_save_maps(self, case: Mapping[str, Any]) -> bool:
        if self.save_maps == "all":
            return True
        if self.save_maps == "none":
            return False
        threshold = self.calibration["image_threshold"] if self.calibration else None
        return case["label"] == 1 or threshold is None or case["score"] >= threshold

    def _finish_case(self, case: Mapping[str, Any], drawn: bool) -> dict[str, Any]:
        """Write one case's files; return its table record (scalars only)."""
        from medad import io

        pixel_threshold = self.calibration["pixel_threshold"] if self.calibration else None
        image_threshold = self.calibration["image_threshold"] if self.calibration else None
        case_id, anomaly_map, mask = case["case_id"], case["map"], case["mask"]
        record: dict[str, Any] = {
            "case_id": case_id,
            "image_score": case["score"],
            "label": case["label"],
            "threshold": image_threshold,
            "runtime_s": case["seconds"],
            "defect_type": case["group"],
        }
        if mask is not None and pixel_threshold is not None:
            # Dice on the loaded grid, where the ground truth and the metrics are
            record["dice"] = float(metrics.segmentation_scores(anomaly_map[None], mask[None], pixel_threshold)["dice"])
        if mask is not None and mask.any():
            # per-case AP and best-possible Dice inside the region (brain voxels), the UPD/DISYRE protocol
            region = case["region"] if self.region_key else None
            row = metrics.per_case_metrics([anomaly_map], [mask], region=None if region is None else [region])[0]
            record.update({k: row[k] for k in ("ap", "best_dice", "best_dice_threshold")})
        written, reference, spacing = self._input_grid_map(anomaly_map, case["meta"])
        if pixel_threshold is not None:
            # the size of the segmentation as written (the input file's grid and voxel size)
            record.update(io.anomaly_extent(written >= pixel_threshold, spacing))
        if spacing is not None:
            record["voxel_spacing"] = [float(s) for s in spacing]
        if self._should_save_maps(case):
            self._write_maps(case_id, anomaly_map, case["meta"], written, reference, case["native"], pixel_threshold)
        if drawn:
            overlay = self.maps_root / "overlays" / f"{case_id}.png"
            image = case["image"].float().cpu().numpy()
            restoration = case["restoration"].float().cpu().numpy()
            if anomaly_map.ndim == 2:
                io.save_overlay_png(overlay, image, restoration, anomaly_map, mask, threshold=pixel_threshold,
                                    title=f"{case_id} ({case['group']})")
            else:
                io.save_volume_overlay_png(overlay, image[0], anomaly_map, mask=mask, restoration=restoration[0],
                                           title=f"{case_id} ({case['group']})")
        return record

    def _input_grid_map(
        self, anomaly_map: np.ndarray, meta: Mapping[str, Any]
    ) -> tuple[np.ndarray, Any, list[float] | None]:
        """The map on the grid it is written on: ``(map, 3D reference or None, 3D voxel size in mm or None)``."""
        if anomaly_map.ndim == 2:
            if self.input_grid and meta.get("height") is not None and meta.get("width") is not None:
                anomaly_map = grids.to_image_size(anomaly_map, (int(meta["height"]), int(meta["width"])))
            return anomaly_map, None, None
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
            affine = input_affine
        spacing = np.linalg.norm(affine[:3, :3], axis=0)  # voxel size of the written grid, mm per axis
        return written, reference, [float(s) for s in spacing]

    def _write_maps(self, case_id: str, anomaly_map: np.ndarray, meta: Mapping[str, Any], written: np.ndarray,
                    reference: Any, native: Mapping[str, Any], pixel_threshold: float | None) -> None:
        """The case's map and segmentation files on the input's grid (and in native space when recorded)."""
        from medad import io

        maps_dir = self.maps_root / "maps"
        if written.ndim == 2:
            io.write_image_case(case_id, written, maps_dir, pixel_threshold, compact=self.compact_maps)
            return
        source = str(meta.get("filename_or_obj") or "")
        dicom_series = source if self.input_grid and source and os.path.isdir(source) else None  # a DICOM series
        io.write_volume_case(case_id, written, reference, maps_dir, pixel_threshold, compact=self.compact_maps,
                             dicom_series=dicom_series, deidentify_dicom=self.deidentify_dicom,
                             algorithm=f"medad {self.bundle}" if self.bundle else "medad")
        record = grids.registration_record_for(native, self.registration_dir)
        if record is not None:
            loaded_affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
            native_map, native_affine = grids.to_native_space(anomaly_map, loaded_affine, record)
            native_image = native.get("native_image")
            native_reference: Any = (native_affine, native_map.shape)
            if native_image and os.path.isfile(str(native_image)):
                native_reference = str(native_image)
            io.write_volume_case(f"{case_id}_native", native_map, native_reference, maps_dir, pixel_threshold,
                                 compact=self.compact_maps)

    def _write_report(self, result: Mapping[str, Any], table: Any) -> None:
        """``report.html`` beside metrics.json; a failure here costs the report only, with a warning."""
        from medad import io
        from medad.io.report import write_report

        records = json.loads(table.to_json(orient="records"))  # plain Python values, NaN/NA -> None
        model_folder = self.checkpoint_path.parent.parent if self.checkpoint_path is not None else None
        record = _run_record_near(self.output_dir.parent, model_folder)
        try:
            path = write_report(self.output_dir, io.to_jsonable(dict(result)), records, record)
        except Exception as error:  # noqa: BLE001 - the metrics and tables are written; keep them
            logger.warning("report.html was not written (%s: %s)", type(error).__name__, error)
            return
        logger.info("report: %s", path)

    def _add_baselines(self, result: dict[str, Any], case_ids: list[str]) -> None:
        """``result["baselines"]`` (and ``baselines_note``): the baselines measured on these test cases."""
        try:
            measured, note = comparison.measure_baselines(self, case_ids, result)
        except Exception as error:  # noqa: BLE001 - the method's results stand; a failed comparison costs only itself
            logger.warning("the baselines were not measured (%s: %s)", type(error).__name__, error)
            measured, note = None, f"No baselines: measuring them failed ({type(error).__name__}: {error})."
        if measured:
            result["baselines"] = measured
        if note:
            result["baselines_note"] = note

    def _finish_shard(self, case_ids: list[str], baselines_note: str | None = None) -> None:
        """Record this shard as finished; merge every shard's cases when it is the last one."""
        shards.write_shard_record(self.output_dir, *self.shard, {
            "case_ids": case_ids, "signature": self._signature(), "region_key": self.region_key,
            "fpr_limit": self.fpr_limit, "calibration": self.calibration, "baselines_note": baselines_note,
        })
        try:
            done = shards.evaluation_shards_done(self.maps_root)
        except ValueError as error:  # e.g. folders of an older split beside this one: this shard's results stand
            logger.warning("%s; not merging", error)
            done = False
        if done:
            shards.merge_evaluation_shards(self.maps_root)
            logger.info("every shard has finished: merged tables and metrics in %s", self.maps_root)
        else:
            logger.info("shard %s finished; the last shard to finish merges the tables into %s",
                        shards.shard_name(*self.shard), self.maps_root)

    def _plan(self, done: set[str]) -> tuple[Iterable[Mapping[str, Any]], list[int] | None, list[str] | None]:
        """The test batches still to run: ``(loader, original batch indices, every case id in order)``.

        With a datalist (``loader.dataset.data`` items with ``case_id``) whole finished batches are left out without
        loading them; the remaining batches keep their composition and index, so their seeds are unchanged.
        """
        loader = self.test_loader
        dataset = getattr(loader, "dataset", None)
        items = getattr(dataset, "data", None)
        batch_size = getattr(loader, "batch_size", None)
        if (not isinstance(loader, torch.utils.data.DataLoader) or not isinstance(items, Sequence) or not batch_size
                or len(items) != len(dataset) or not all(isinstance(i, Mapping) and i.get("case_id") for i in items)):
            if self.shard is not None:
                raise ValueError("--shard needs a test loader over a datalist with case ids (the bundles' loaders).")
            return loader, None, None
        ids = [str(i["case_id"]).replace("/", "_") for i in items]
        batches = [list(range(start, min(start + batch_size, len(ids)))) for start in range(0, len(ids), batch_size)]
        mine = range(len(batches)) if self.shard is None else shards.shard_range(len(batches), *self.shard)
        todo = [b for b in mine if not all(ids[k] in done for k in batches[b])]
        if self.shard is not None:
            ids = [ids[k] for b in mine for k in batches[b]]
        elif len(todo) == len(batches):
            return loader, None, ids
        subset = torch.utils.data.Subset(dataset, [k for b in todo for k in batches[b]])
        remaining = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                                num_workers=loader.num_workers, collate_fn=loader.collate_fn)
        return remaining, todo, ids

    def run(self) -> dict[str, Any]:
        """Load, calibrate, infer on the test set case by case, write ``metrics.json``, case tables, maps, overlays."""
        from medad import io

        self.load()
        self.calibrate()
        items = getattr(getattr(self.test_loader, "dataset", None), "data", None)
        if isinstance(items, Sequence) and all(isinstance(i, Mapping) for i in items):
            check_files(items)  # every bad file named before any output is written
        store = _CaseStore(self.output_dir / _CASE_DATA, self._signature(), self.resume)
        if store.records:
            logger.info("resuming the evaluation in %s: %d finished case(s) are kept", self.output_dir,
                        len(store.records))
        loader, batch_indices, order = self._plan(set(store.records))
        drawn = {}
        for record in store.records.values():
            drawn[record["defect_type"]] = drawn.get(record["defect_type"], 0) + int(record.get("drawn", False))
        network = CountingNetwork(unwrap(self.network).to(self.device).eval())
        with torch.no_grad():
            batches = self._batches(loader, network, "evaluate", batch_indices,
                                    skip=lambda ids: all(i in store.records for i in ids))
            for batch in batches:
                for case in batch:
                    group = case["group"]
                    draw = drawn.get(group, 0) < self.num_overlays
                    record = self._finish_case(case, draw)
                    drawn[group] = drawn.get(group, 0) + int(draw)
                    record["drawn"] = draw
                    store.add(case, record)
                    # the table of the cases finished so far, replaced atomically after each case
                    io.write_table_csv(io.case_table(_table_records(store.records.values())),
                                       self.output_dir / _PARTIAL_TABLE)
        cases = store.load(order)
        result = self._metrics(cases)
        table = io.case_table(_table_records(store.records[i] for i in cases["case_id"]))
        io.write_tables(table, self.output_dir, stem="cases")
        labels = [label for label in cases["label"] if label is not None]
        if len(labels) == len(cases["score"]) and len(set(labels)) == 2:
            io.save_roc_pr_curves(cases["score"], labels, self.output_dir / "image")
        cases["map"] = None  # the method's maps are measured: their memory goes before the baselines' maps come
        self._add_baselines(result, list(cases["case_id"]))
        if self.bundle:  # an --output_dir outside the run folder still names its method (medad cohort summarize)
            result["bundle"] = self.bundle
        io.write_json(self.output_dir / "metrics.json", result)
        self._write_report(result, table)
        if self.tracker is not None:
            self.tracker.log_evaluation(self.output_dir, io.to_jsonable(dict(result)))
            self.tracker.end()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.output_dir / _PARTIAL_TABLE)
        if self.shard is not None:
            self._finish_shard(list(cases["case_id"]), result.get("baselines_note"))
        plain = io.to_jsonable({k: v for k, v in result.items() if not isinstance(v, dict)})
        logger.info("metrics: %s", json.dumps(plain))
        logger.info("evaluation results in %s", self.output_dir)
        return result


def _border_frame(cases: Mapping[str, Any], width_at_256: int = 8, top_fraction: float = 0.01) -> dict[str, float]:
    """Border-frame diagnostic of the 2D maps of the normal cases (:mod:`medad.scores.border`, issue #11).

    ``border_top_share_normal``: mean share of each normal map's top 1 % values lying within 8 px (of a 256² image,
    scaled to the map's size) of the border; ``border_area_share``: that band's share of the area. A map without a
    frame gives about the area share or less; empty when there are no normal 2D cases.
    """
    from medad.scores.border import border_area_share, border_top_share

    normal = [m for m, label in zip(cases["map"], cases["label"]) if label == 0 and np.ndim(m) == 2]
    if not normal:
        return {}
    shape = normal[0].shape
    width = max(1, round(width_at_256 * min(shape) / 256))
    same = [m for m in normal if m.shape == shape]
    shares = border_top_share(torch.as_tensor(np.stack(same))[:, None], width=width, top_fraction=top_fraction)
    return {"border_top_share_normal": float(shares.mean()), "border_area_share": border_area_share(shape, width),
            "border_width_px": width}


def _run_record_near(*folders: Path | None) -> dict[str, Any] | None:
    """The first ``run.json`` found in ``folders`` (the run folder of an evaluation or of its checkpoint)."""
    from .run_folder import read_run_record

    for folder in folders:
        if folder is None:
            continue
        try:
            record = read_run_record(folder)
        except ValueError:  # an unreadable record costs the report its settings table only
            return None
        if record is not None:
            return record
    return None


def _table_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # bookkeeping of the case store is not a table column
    return [{k: v for k, v in r.items() if k not in ("drawn", "score", "network_items", "network_calls")}
            for r in records]


def _timing(seconds: Sequence[float], items: Sequence[float], calls: Sequence[float]) -> dict[str, float]:
    """Inference speed from per-case numbers (so a resumed evaluation reports over all its cases)."""
    total = float(np.sum(seconds)) if len(seconds) else 0.0
    num_cases = len(seconds)
    return {
        "inference_seconds": total,
        "images_per_second": num_cases / total if total > 0 else math.nan,
        "network_evaluations_per_image": float(np.sum(items)) / max(1, num_cases),
        "network_calls": int(np.sum(calls)),
    }


class _CaseStore:
    """Finished cases on disk: ``<folder>/<case>.npz`` (map, mask, region) + ``records.jsonl`` (table rows).

    ``signature.txt`` says which weights / settings made them; a different one discards them (logged).
    """

    def __init__(self, folder: Path, signature: str, resume: bool) -> None:
        from medad import io

        self.folder = folder
        self.records: dict[str, dict[str, Any]] = {}
        stamp = folder / "signature.txt"
        if folder.is_dir():
            stored = stamp.read_text().strip() if stamp.is_file() else None
            if not resume or stored != signature:
                if stored is not None and resume:
                    logger.warning("%s: the finished cases there were made with other weights or settings; "
                                   "evaluating every case again", folder)
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            with io.atomic_write(stamp, "w") as handle:
                handle.write(signature + "\n")
        journal = folder / "records.jsonl"
        if journal.is_file():
            for line in journal.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill is simply redone
                    record = json.loads(line)
                    if (folder / f"{record['case_id']}.npz").is_file():
                        self.records[record["case_id"]] = record

    def add(self, case: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        from medad import io

        arrays = {"map": np.asarray(case["map"], np.float32)}
        for key in ("mask", "region"):
            if case[key] is not None:
                arrays[key] = np.asarray(case[key], bool)
        # the data first, then the journal line: a journal entry always has its data
        io.atomic_save(self.folder / f"{case['case_id']}.npz", lambda name: np.savez_compressed(name, **arrays))
        entry = dict(io.to_jsonable(record))
        entry.update(score=float(case["score"]), network_items=int(case["network_items"]),
                     network_calls=int(case["network_calls"]))
        with open(self.folder / "records.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[entry["case_id"]] = entry

    def load(self, order: Sequence[str] | None) -> dict[str, Any]:
        """Every finished case (in ``order`` when given) as the lists :meth:`AnomalyEvaluator._metrics` reads."""
        ids = [i for i in order if i in self.records] if order is not None else list(self.records)
        if order is not None and len(ids) != len(order):
            missing = [i for i in order if i not in self.records]
            raise RuntimeError(f"{self.folder}: case(s) {missing[:5]} were not evaluated; run the evaluation again.")
        cases: dict[str, Any] = {k: [] for k in ("case_id", "map", "mask", "region", "label", "score", "seconds")}
        for case_id in ids:
            record = self.records[case_id]
            with np.load(self.folder / f"{case_id}.npz") as data:
                cases["map"].append(data["map"])
                cases["mask"].append(data["mask"] if "mask" in data else None)
                cases["region"].append(data["region"] if "region" in data else None)
            cases["case_id"].append(case_id)
            cases["label"].append(record.get("label"))
            cases["score"].append(float(record["score"]))
            cases["seconds"].append(float(record.get("runtime_s") or 0.0))
        cases["timing"] = _timing(cases["seconds"], [self.records[i]["network_items"] for i in ids],
                                  [self.records[i]["network_calls"] for i in ids])
        return cases
