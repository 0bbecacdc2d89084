#!/usr/bin/env python
"""Inference profiles of the MRI bundles side by side: time, accuracy, memory and calibration cost (docs/results.md).

Two measurements, each comparing the settings inside ONE run so that the shared machine's load hits them alike:

``compare``: for every volume of the lesion test sets (``scripts/make_lesion_testset.py`` layout:
``<root>/<set>/{images,masks,brain_masks}``) and every bundle, the ``paper`` and ``fast`` profiles
(``bundles/<b>/configs/fast.json``) run one after the other on the same loaded volume, through the evaluator's own
inference code (its per-case seed, timing and network count). It prints seconds per volume (load and inference),
network evaluations, pooled pixel AP / AUROC / best Dice and the Dice at each profile's calibrated threshold, and
the peak memory (maximum resident set size, GNU ``time``) of ``python -m medad run --workflow inference`` on one
volume per profile, each in a fresh process, with that process's wall time (start-up and file writing included).

``calibrate``: calibration of each bundle and profile on held-out normal volumes, on every slice and on
``--slices`` sampled slices, one after the other: seconds, thresholds and the pixel threshold's bootstrap interval.
``--store`` writes each profile's full-slice calibration into the bundle's shipped ``models/model.pt``
(``calibration`` for ``paper``, also written to ``models/calibration.json`` as the evaluator does, and
``calibrations["fast"]``; the weights are left as they are): after a change to inference, the shipped thresholds are
re-measured with it.

Examples (the numbers of docs/results.md, "Speed")::

    OMP_NUM_THREADS=1 python scripts/mri_speed.py calibrate --volumes /data/ixi_calib/images \\
        --brain_mask_dir /data/ixi_calib/brain_masks --slices 16 --store
    OMP_NUM_THREADS=1 python scripts/mri_speed.py compare --lesion_root /data/ixi_lesions --sets dark bright foreign

``uptime``'s load average is printed beside every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("paper", "fast")


def load_average() -> str:
    """The 1-minute load average, as ``uptime`` prints it."""
    return f"{os.getloadavg()[0]:.2f}"


def profile_parser(bundle: str, profile: str, overrides: dict[str, Any] | None = None):
    """The bundle's inference config with the profile's overlay and the shipped model's stored settings."""
    from medad import bundle as bundles

    extra = [] if profile == "paper" else [str(REPO / "bundles" / bundle / "configs" / f"{profile}.json")]
    return bundles.parser(REPO / "bundles" / bundle, "inference", extra_configs=extra, **(overrides or {}))


def evaluator_for(bundle: str, profile: str, checkpoint: Path, output_dir: Path, calibration_loader=None,
                  calibration_slices: int | None = None):
    """An :class:`~medad.engine.AnomalyEvaluator` built from the profile's config (network, inferer, score)."""
    import torch

    from medad.engine import AnomalyEvaluator

    parser = profile_parser(bundle, profile)
    num_threads = parser.get_parsed_content("num_threads") if "num_threads" in parser.get() else None
    if num_threads:
        torch.set_num_threads(int(num_threads))
    evaluator = AnomalyEvaluator(
        network=parser.get_parsed_content("network"), inferer=parser.get_parsed_content("inferer"), test_loader=[],
        output_dir=output_dir, image_score=parser.get_parsed_content("image_score"), checkpoint_path=checkpoint,
        bundle=bundle, calibration_loader=calibration_loader, region_key="brain_mask", foreground_key="brain_mask",
        inference_profile=profile, inference_settings=parser.get_parsed_content("inference_settings"),
        calibration_slices=calibration_slices, progress=False,
    )
    return evaluator, parser


def volume_loader(parser, images: Path, brain_masks: Path, masks: Path | None = None):
    """Volumes loaded as the bundle's loaders do (its stored voxel size and intensity scaling), one per batch."""
    from monai.data import DataLoader, Dataset

    from medad import data

    items = data.nifti_datalist(images, mask_dir=masks, brain_mask_dir=brain_masks)
    transform = data.volume_transforms(pixdim=parser.get_parsed_content("pixdim"),
                                       intensity=parser.get_parsed_content("intensity"))
    return DataLoader(Dataset(items, transform), batch_size=1, shuffle=False)


# -- calibrate ------------------------------------------------------------------------------------------------
def calibrate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from medad.engine import export
    from medad.engine.distributed import unwrap

    rows = []
    work = Path(tempfile.mkdtemp(prefix="mri_speed_"))
    try:
        for bundle in args.bundles:
            shipped = REPO / "bundles" / bundle / "models" / "model.pt"
            for profile in PROFILES:
                for slices in (None, args.slices):
                    copy = work / f"{bundle}_{profile}_{slices}.pt"
                    _without_calibration(shipped, copy)
                    parser = profile_parser(bundle, profile)
                    loader = volume_loader(parser, Path(args.volumes), Path(args.brain_mask_dir))
                    evaluator, _ = evaluator_for(bundle, profile, copy, work / "out", loader, slices)
                    load = load_average()
                    evaluator.load()
                    calibration = evaluator.calibrate()
                    row = {"bundle": bundle, "profile": profile, "slices": slices or "all", "load": load,
                           **{k: calibration[k] for k in ("calibration_seconds", "image_threshold", "pixel_threshold",
                                                          "pixel_threshold_se", "pixel_threshold_ci95",
                                                          "num_calibration_cases")},
                           "image_score_estimate": calibration.get("image_score_estimate", "whole volume")}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.store and slices is None:  # where the evaluator stores its own thresholds
                        export.store_thresholds(shipped, calibration, profile, bundle, unwrap(evaluator.network))
                        print(f"stored the {profile!r} calibration in {shipped}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _without_calibration(source: Path, target: Path) -> None:
    import torch

    state = torch.load(source, map_location="cpu", weights_only=False)
    state.pop("calibration", None)
    state.pop("calibrations", None)
    torch.save(state, target)


# -- compare --------------------------------------------------------------------------------------------------
def compare(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from medad import metrics
    from medad.inferers.base import CountingNetwork

    root = Path(args.lesion_root)
    results: dict[str, Any] = {"inference": [], "memory": []}
    work = Path(tempfile.mkdtemp(prefix="mri_speed_"))
    try:
        for bundle in args.bundles:
            shipped = REPO / "bundles" / bundle / "models" / "model.pt"
            evaluators = {}
            for profile in PROFILES:
                evaluator, parser = evaluator_for(bundle, profile, shipped, work / profile)
                evaluator.load()
                if evaluator.calibration is None:
                    print(f"warning: {bundle} has no '{profile}' calibration; run `calibrate --store` first", flush=True)
                network = CountingNetwork(evaluator.network.to(evaluator.device).eval())
                evaluators[profile] = (evaluator, parser, network)
            for kind in args.sets:
                folder = root / kind
                loader = volume_loader(evaluators["paper"][1], folder / "images", folder / "brain_masks", folder / "masks")
                cases: dict[str, dict[str, list]] = {p: {"map": [], "mask": [], "region": [], "seconds": [],
                                                         "items": [], "load": []} for p in PROFILES}
                start_load = time.perf_counter()
                for index, batch in enumerate(loader):
                    load_seconds = time.perf_counter() - start_load
                    for profile in PROFILES:
                        evaluator, _, network = evaluators[profile]
                        with torch.no_grad():
                            case = next(iter(evaluator._batches([batch], network, profile, batch_indices=[index])))[0]
                        store = cases[profile]
                        store["map"].append(case["map"])
                        store["mask"].append(case["mask"])
                        store["region"].append(case["region"])
                        store["seconds"].append(case["seconds"])
                        store["items"].append(case["network_items"])
                        store["load"].append(load_average())
                    start_load = time.perf_counter()
                    print(f"{bundle} {kind} {index}: " + ", ".join(
                        f"{p} {cases[p]['seconds'][-1]:.2f} s" for p in PROFILES) + f" (load {load_average()}, "
                        f"volume loaded in {load_seconds:.2f} s)", flush=True)
                for profile in PROFILES:
                    store = cases[profile]
                    calibration = evaluators[profile][0].calibration or {}
                    pooled = metrics.pooled_metrics(store["map"], store["mask"], region=store["region"],
                                                    threshold=calibration.get("pixel_threshold"))
                    per_case = metrics.per_case_metrics(store["map"], store["mask"], region=store["region"])
                    row = {
                        "bundle": bundle, "set": kind, "profile": profile, "volumes": len(store["map"]),
                        "seconds_per_volume": float(np.mean(store["seconds"])),
                        "seconds_min_max": [float(np.min(store["seconds"])), float(np.max(store["seconds"]))],
                        "network_evaluations_per_volume": float(np.mean(store["items"])),
                        "load_min_max": [min(store["load"]), max(store["load"])],
                        "pixel_ap": pooled["pixel_ap"], "pixel_auroc": pooled["pixel_auroc"],
                        "best_dice": pooled["best_dice"], "dice_calibrated": pooled.get("dice", float("nan")),
                        "case_ap_mean": float(np.nanmean([r["ap"] for r in per_case])),
                    }
                    results["inference"].append(row)
                    print(json.dumps(row), flush=True)
            for volume, brain_mask in zip(args.memory_volume or [], args.memory_brain_mask or []):
                results["memory"] += memory(bundle, Path(volume), Path(brain_mask), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def memory(bundle: str, volume: Path, brain_mask: Path, work: Path) -> list[dict[str, Any]]:
    """Peak resident memory and wall time of the inference workflow on one volume, per profile, fresh processes."""
    rows = []
    case = volume.name.split(".nii")[0]
    folder = work / f"mem_{bundle}_{case}_{len(list(work.glob('mem_*')))}"
    inputs, masks = folder / "images", folder / "brain_masks"
    inputs.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    os.symlink(volume.resolve(), inputs / volume.name)
    os.symlink(brain_mask.resolve(), masks / f"{case}_brain_mask.nii.gz")
    for profile in PROFILES:
        command = [sys.executable, "-m", "medad", "run", "--config", f"bundles/{bundle}", "--workflow", "inference",
                   "--input_dir", str(inputs), "--brain_mask_dir", str(masks),
                   "--output_dir", str(folder / profile)]
        if profile != "paper":
            command += ["--extra_configs", f"{profile}.json"]
        load = load_average()
        # GNU time launches the run: a process forked from this (large) one would report this one's memory as its
        # peak (Linux keeps the high-water mark across fork + exec)
        usage = folder / f"{profile}.time"
        process = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", str(usage), *command], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.strip()[-500:]}")
        peak_kib, wall = usage.read_text().split()[-2:]
        row = {"bundle": bundle, "profile": profile, "volume": str(volume), "peak_rss_mib": int(peak_kib) / 1024,
               "wall_seconds": float(wall), "load": load,
               "command": "python -m medad run " + " ".join(command[4:])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    cal = sub.add_parser("calibrate", help="calibration time and thresholds: every slice vs sampled slices")
    cal.add_argument("--volumes", required=True, help="held-out normal volumes (preprocessed images/)")
    cal.add_argument("--brain_mask_dir", required=True)
    cal.add_argument("--slices", type=int, default=16, help="sampled slices per volume")
    cal.add_argument("--store", action="store_true", help="write each profile's calibration into the shipped model")
    cmp = sub.add_parser("compare", help="paper vs fast inference on the lesion test sets")
    cmp.add_argument("--lesion_root", required=True)
    cmp.add_argument("--sets", nargs="+", default=["dark", "bright", "foreign"])
    cmp.add_argument("--memory_volume", nargs="*", default=[], help="volumes for the peak-memory runs (any voxel size)")
    cmp.add_argument("--memory_brain_mask", nargs="*", default=[], help="their brain masks, in the same order")
    for sub_parser in (cal, cmp):
        sub_parser.add_argument("--bundles", nargs="+", default=["disyre", "addm"])
        sub_parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = calibrate(args) if args.action == "calibrate" else compare(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
