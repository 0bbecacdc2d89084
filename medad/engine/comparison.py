"""Baselines measured beside every evaluation: the same test cases, the same pixels, the same metric code.

:class:`~medad.engine.AnomalyEvaluator` (option ``baselines``, default ``"auto"``) scores its test cases a second
time with the two baselines (their models: :mod:`medad.networks.baselines`) after the method's cases are done, and
stores their metrics in ``metrics.json`` under ``baselines`` (``{name: {metric: value, ..., "num_normal_images": n}}``);
``report.html`` puts them beside the method's.

- ``zscore``: a :class:`~medad.networks.baselines.PixelGaussian` fitted in one pass over the evaluator's
  ``calibration_loader`` (held-out normal images, loaded like the test images), map ``|z|`` (max over channels),
  as the ``zscore`` bundle. It is fitted on the calibration set, not on the training set: with few calibration
  images it is a weaker z-score model than the ``zscore`` bundle's.
- ``intensity`` (volumes only under ``"auto"``): :class:`~medad.networks.baselines.BrainIntensity`, the image
  z-scored within its nonzero voxels, bright deviations (Meissen et al. 2021), as the ``intensity`` bundle. Nothing
  is fitted.

Image score of both: the mean of the ``k`` largest map values, ``k`` as in the bundles' full settings
(:data:`TOPK`). Metrics: :meth:`AnomalyEvaluator._ranking_metrics`, the code that measures the method, over the
same region (e.g. the brain mask); no calibrated threshold exists for a baseline, so the threshold-based metrics
(Dice at the calibrated threshold, decisions) are the method's only.

Nothing here touches the method: no file but ``metrics.json`` / ``report.html`` gets the numbers, the calibration
and the case data are not read or written, and the global random state is restored afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from medad.data.validation import clear_input_errors
from medad.io.report import BASELINE_LABELS

if TYPE_CHECKING:
    from .evaluator import AnomalyEvaluator

__all__ = ["BASELINES", "BASELINE_LABELS", "TOPK", "NO_NORMAL_DATA", "parse_baselines", "own_baseline",
           "measure_baselines"]

logger = logging.getLogger("medad.evaluate")

#: the baselines, in the order the report shows them
BASELINES = ("zscore", "intensity")
#: top-k mean image score by spatial dimensions: the zscore bundle's 2-D setting (industrial.json, 64) and the
#: MRI bundles' full setting (zscore / intensity inference.json without ``quick``, 1000)
TOPK = {2: 64, 3: 1000}
#: std floor of the z-score baseline (the zscore bundle's ``std_floor``)
STD_FLOOR = 0.01
#: the zscore bundle's map smoothing per number of spatial dimensions (its `map_sigma`: MRI volumes 1.5 voxels inside
#: the region, chosen on validation heads; photographs none), so the baseline beside a method is the bundle's
MAP_SIGMA = {2: 0.0, 3: 1.5}
#: the note when the evaluation has no calibration (held-out normal) data
NO_NORMAL_DATA = ("No baselines: they need held-out normal data (the calibration set of an evaluation), and this "
                  "evaluation had none (e.g. the inference workflow on a folder).")
_SHARDED = ("No baselines: they are not measured in a sharded evaluation (each shard holds part of the cases); "
            "evaluate unsharded to compare with them.")
_NO_TRUTH = "No baselines: the test cases have neither image labels of both kinds nor anomaly masks to measure them."


def parse_baselines(option: str | Sequence[str] | None) -> str | tuple[str, ...]:
    """``"auto"``, or the tuple of baseline names asked for (empty: off).

    Raises:
        ValueError: an unknown name.
    """
    if option is None:
        return ()
    if isinstance(option, str):
        if option == "auto":
            return "auto"
        option = [option]
    names = tuple(str(name) for name in option)
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"baselines: unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}, 'auto' or "
                         "None (off).")
    return tuple(dict.fromkeys(names))


def own_baseline(network: torch.nn.Module | None, bundle: str | None) -> str | None:
    """The baseline this evaluation *is* (the zscore / intensity bundle), else None."""
    from medad.networks.baselines import BrainIntensity, PixelGaussian

    from .distributed import unwrap

    model = unwrap(network) if network is not None else None
    if bundle == "zscore" or isinstance(model, PixelGaussian):
        return "zscore"
    if bundle == "intensity" or isinstance(model, BrainIntensity):
        return "intensity"
    return None


def _plain(value: torch.Tensor) -> torch.Tensor:
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def _fit_zscore(loader: Iterable[Mapping[str, Any]], device: torch.device) -> tuple[Any | None, str | None]:
    """A PixelGaussian of the calibration images, or ``(None, why not)``."""
    from medad.networks.baselines import PixelGaussian

    model = PixelGaussian(STD_FLOOR).to(device)
    for batch in clear_input_errors(loader):
        try:
            model.update(_plain(batch["image"]).to(device))
        except ValueError:
            return None, ("z-score baseline: not measured, the calibration images are not all on one grid (it compares "
                          "voxel by voxel; preprocess the volumes to one template).")
    if not model.fitted:
        return None, "z-score baseline: not measured, the calibration loader gave no images."
    return model.eval(), None


def measure_baselines(
    evaluator: AnomalyEvaluator, case_ids: Sequence[str], method: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """The baselines' metrics on the evaluator's test cases: ``({name: metrics} or None, note or None)``.

    Args:
        evaluator: the evaluator whose method was measured (its option ``baselines``, loaders, region, device).
        case_ids: the method's cases; the baselines must score exactly these.
        method: the method's metrics (nothing is measured when they hold no ranking metric: no labels, no masks).

    Returns:
        None for the metrics when none were measured; the note says why (or which baseline was left out).
    """
    asked = evaluator.baselines
    if asked == ():
        return None, None
    if evaluator.calibration_loader is None:
        return None, NO_NORMAL_DATA
    if evaluator.shard is not None:
        return None, _SHARDED
    if not any(isinstance(method.get(key), float) and math.isfinite(method[key]) for key in ("image_auroc", "pixel_auroc")):
        return None, _NO_TRUTH
    notes = []
    own = own_baseline(evaluator.network, evaluator.bundle)
    candidates = [name for name in (BASELINES if asked == "auto" else asked) if name != own]
    if own is not None and (asked == "auto" or own in asked):
        notes.append(f"This run is the {own} bundle, so the {BASELINE_LABELS[own]} is not repeated beside it.")
    if not candidates:
        return None, " ".join(notes) or None
    # a private random state: the data loaders draw seeds from the global one, which must stay as it was
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        results, more = _score(evaluator, candidates, asked == "auto")
    notes += more
    if results and set(next(iter(results.values()))["case_id"]) != set(case_ids):
        return None, " ".join([*notes, "No baselines: the test loader gave other cases than the method's."])
    measured = {}
    for name, cases in results.items():
        values = evaluator._ranking_metrics(cases)
        values.update(num_normal_images=cases["num_normal_images"], image_score_topk=cases["topk"],
                      seconds=round(cases["seconds"], 3))
        measured[name] = values
        logger.info("%s: %s", BASELINE_LABELS[name], {k: values[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap")
                                                      if k in values})
    return (measured or None), (" ".join(notes) or None)


def _score(
    evaluator: AnomalyEvaluator, candidates: list[str], auto: bool
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """One pass over the calibration images (zscore), one over the test images (every baseline)."""
    from medad.inferers.baselines import GaussianScoreInferer, IntensityScoreInferer
    from medad.networks.baselines import BrainIntensity
    from medad.scores import topk_mean_score

    from .evaluator import _case_ids, _region

    device, notes = evaluator.device, []
    models: dict[str, tuple[torch.nn.Module, Any]] = {}
    fit_seconds, num_normal = 0.0, {"zscore": 0, "intensity": 0}
    if "zscore" in candidates:
        start = time.perf_counter()
        gaussian, why = _fit_zscore(evaluator.calibration_loader, device)
        fit_seconds = time.perf_counter() - start
        if gaussian is None:
            notes.append(why)
        else:
            models["zscore"] = (gaussian, None)  # its inferer once the data's dimensions are known
            num_normal["zscore"] = int(gaussian.count)
    if "intensity" in candidates:
        models["intensity"] = (BrainIntensity("zscore").to(device), IntensityScoreInferer(signed=True))
    keys = ("case_id", "map", "mask", "region", "label", "score")
    cases = {name: {key: [] for key in keys} for name in models}
    seconds = {name: fit_seconds if name == "zscore" else 0.0 for name in models}
    seen, first = 0, True
    for batch in clear_input_errors(evaluator.test_loader):
        images = _plain(batch["image"]).to(device)
        if first:
            first = False
            if auto and images.dim() != 5:  # the intensity baseline is a brain-MRI baseline
                models.pop("intensity", None)
                cases.pop("intensity", None)
            if "zscore" in models:  # the bundle's smoothing for this kind of data (volumes), inside the region
                models["zscore"] = (models["zscore"][0], GaussianScoreInferer(
                    signed=False, channel_reduction="max", map_sigma=MAP_SIGMA.get(images.dim() - 2, 0.0)))
            if not models:
                break
        count = images.shape[0]
        ids = _case_ids(batch, count, seen)
        seen += count
        region = _region(batch, evaluator.region_key, images)
        labels = batch.get("label")
        for name in list(models):
            network, inferer = models[name]
            start = time.perf_counter()
            try:
                anomaly_map = inferer(images, network, foreground=region)["anomaly_map"].float()
            except ValueError:  # a test grid other than the calibration images'
                notes.append(f"{BASELINE_LABELS[name]}: not measured, the test images are not on the grid of the "
                             "calibration images (it compares voxel by voxel).")
                models.pop(name)
                cases.pop(name)
                continue
            k = TOPK[3 if images.dim() == 5 else 2]
            scores = topk_mean_score(anomaly_map, k=k).reshape(-1)
            seconds[name] += time.perf_counter() - start
            into = cases[name]
            into["topk"] = k
            for i in range(count):
                into["case_id"].append(ids[i])
                into["map"].append(anomaly_map[i, 0].cpu().numpy())
                into["mask"].append(batch["mask"][i, 0].cpu().numpy() > 0.5 if "mask" in batch else None)
                into["region"].append(region[i, 0].cpu().numpy() if region is not None else None)
                into["label"].append(int(labels[i]) if labels is not None else None)
                into["score"].append(float(scores[i]))
        if not models:
            break
    for name in cases:
        cases[name].update(num_normal_images=num_normal[name], seconds=seconds[name])
        cases[name].setdefault("topk", None)
    return {name: cases[name] for name in BASELINES if name in cases and cases[name]["case_id"]}, notes
