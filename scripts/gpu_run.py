#!/usr/bin/env python
"""Paper-scale run of every bundle on one CUDA GPU within a fixed wall budget; the prepared GPU path (issue #12).

Usage (``scripts/gpu_run.sh`` installs what is missing first and then calls this)::

    python scripts/gpu_run.py --out /results/gpu_run            # default --out: $OUT
    python scripts/gpu_run.py --out /tmp/toy --toy              # CPU, toy size: what the test runs

What it does, in one output folder (``--out``):

1. Data. Industrial bundles (fair, ddpm_partial, ddpm_kl) use ``<data_root>/mvtec_ad/bottle`` when it is there,
   else each bundle's embedded demo images. MRI bundles (disyre, addm) use a preprocessed cohort given as
   ``--mri_dir`` (``medad preprocess`` output: ``images/``, ``brain_masks/``): every head but the last 8 trains,
   the last 8 get synthetic lesions (``scripts/make_lesion_testset.py``, ``--mri_lesions`` kind) and are the test
   set. Without ``--mri_dir`` they use demo volumes generated at 2 mm (16 train, 4 test with lesions).
   Raw IXI heads are NOT preprocessed here by default: ``medad preprocess`` took 11 min for the 40 heads on the
   2-core machine (N4 + registration + skull stripping, CPU-bound, needs ANTsPy), more than the whole training
   budget; preprocess them beforehand on any CPU machine and pass ``--mri_dir``.
2. Training at paper scale (``--quick false``: the papers' networks, image sizes and batch sizes) with bf16
   autocast (``--amp bf16``) for a wall budget of ``--budget_minutes`` (default 9) for all bundles together,
   training and evaluation included: each bundle gets the remaining budget ÷ the bundles still to run, of which
   ``TRAIN_SHARE`` trains (``--max_minutes``; the learning-rate schedules follow the time budget) and the rest
   calibrates and evaluates. ``torch.compile`` (``--compile``) is on only where a bundle's training share is at
   least ``--compile_min_minutes`` (default 5): compiling a 26-120 M-parameter UNet, then again for evaluation mode
   and shapes, costs on the order of a minute, which a 1-2 minute share cannot win back.
3. Evaluation and calibration, as every bundle's train workflow does (metrics, calibrated thresholds).
4. FAIR inference speed on the trained FAIR model: images/s of the whole anomaly map (high-pass, network, MSGMS
   + colour score) at the trained image size, batch 1 and 32, fp32 and bf16, eager and (on CUDA) compiled, for
   comparison with the FAIR paper's 57-132 FPS on an RTX 3090 Ti.

Results: ``summary.json`` and ``summary.md`` (per bundle: data, settings, steps, training minutes, steps/s, wall
time, metrics, images/s; the FAIR speed table; the environment), ``gpu_run.log`` (everything printed), and
``runs/<bundle>/`` (``models/model.pt`` weights with calibration, ``eval/metrics.json``, logs; the resumable
``checkpoint.pt`` is deleted unless ``--keep_checkpoints``). Without CUDA it says so in one line and runs on the
CPU at toy size (``--toy``: tiny networks, 2 steps, small demo data), which tests/bundles/test_gpu_script.py runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("fair", "ddpm_partial", "ddpm_kl", "disyre", "addm")
INDUSTRIAL = ("fair", "ddpm_partial", "ddpm_kl")
#: fraction of a bundle's share of the budget spent training; the rest calibrates and evaluates (the KL scoring
#: of ddpm_kl and ADDM's 250 restoration steps per slice cost more evaluation time than the others)
TRAIN_SHARE = {"fair": 0.75, "ddpm_partial": 0.7, "ddpm_kl": 0.55, "disyre": 0.65, "addm": 0.5}
#: toy settings (CPU, seconds): tiny networks, 2 steps, few restoration steps
TOY: dict[str, dict[str, Any]] = {
    "fair": {"image_size": 32, "widths": "$(8, 16)", "batch_size": 4},
    "ddpm_partial": {"image_size": 16, "batch_size": 4, "restoration_steps": 2, "network_def#channels": "$(8, 16)",
                     "network_def#attention_levels": "$(False, False)", "network_def#num_head_channels": 8},
    "ddpm_kl": {"image_size": 16, "batch_size": 4, "noise_scales": "$[20]", "network_def#channels": "$(8, 16)",
                "network_def#attention_levels": "$(False, False)", "network_def#num_head_channels": 8},
    "disyre": {"widths": "$(8, 16)", "restoration_steps": 1, "slices_per_volume": 2, "batch_size": 2},
    "addm": {"network_def#channels": "$(8, 16)", "network_def#attention_levels": "$(False, False)",
             "network_def#num_head_channels": 8, "discriminator_def#channels": 8,
             "discriminator_def#num_layers_d": 2, "noise_level": 3, "restoration_steps": 2},
}
#: the toy demo set of the industrial bundles (their own generator, small)
TOY_DEMO = "$dict(num_train=8, num_test_good=2, num_test_defect=2, image_size=32)"


def log(message: str) -> None:
    print(f"[gpu_run] {message}", flush=True)


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "host": platform.node()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported()})
    return info


# -- data ---------------------------------------------------------------------------------------------
def mri_data(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """``dataset_dir``/``brain_mask_dir``/``test_dir``/``test_mask_dir`` overrides of the MRI bundles."""
    if args.mri_dir and not args.toy:
        cohort = Path(args.mri_dir)
        images = sorted((cohort / "images").glob("*.nii*"))
        if len(images) < 12:
            raise SystemExit(f"{cohort / 'images'}: need at least 12 preprocessed volumes (8 are held out), found {len(images)}.")
        train = work / "mri_train"
        train.mkdir(parents=True, exist_ok=True)
        for image in images[:-8]:  # links: the cohort is read, never copied or modified
            link = train / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
        lesions = work / "mri_lesions"
        if not (lesions / args.mri_lesions / "images").is_dir():
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_lesion_testset.py"), "--input", str(cohort),
                            "--output", str(lesions), "--cases", f"{len(images) - 8}:{len(images)}"], check=True)
        kind = lesions / args.mri_lesions
        return {"dataset_dir": str(train), "brain_mask_dir": str(cohort / "brain_masks"),
                "test_dir": str(kind / "images"), "test_mask_dir": str(kind / "masks"),
                "label": f"{cohort.name}: {len(images) - 8} train, 8 test with {args.mri_lesions} lesions"}
    from medad.data import make_demo_mri

    if args.toy:
        root, label = make_demo_mri(work / "demo_mri_toy", num_train=2, num_test=1, spacing_mm=4.0), "demo MRI 4 mm"
    else:
        root, label = make_demo_mri(work / "demo_mri_2mm", num_train=16, num_test=4, spacing_mm=2.0), "demo MRI 2 mm"
    return {"dataset_dir": str(root / "train"), "brain_mask_dir": str(root / "brain_masks"),
            "test_dir": str(root / "test"), "test_mask_dir": str(root / "test_masks"), "label": label}


def industrial_data(args: argparse.Namespace) -> dict[str, str]:
    bottle = Path(args.data_root) / "mvtec_ad" / "bottle"
    if not args.toy and bottle.is_dir():
        return {"dataset_dir": str(bottle), "label": "MVTec AD bottle"}
    return {"demo_kwargs": TOY_DEMO, "label": "demo images (toy)"} if args.toy else {"label": "demo images"}


# -- one bundle ---------------------------------------------------------------------------------------
def _args(values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def run_bundle(name: str, data: dict[str, str], args: argparse.Namespace, budget_s: float, runs: Path) -> dict[str, Any]:
    """Train + calibrate + evaluate one bundle in a subprocess; its record for the summary."""
    import torch

    run_dir = runs / name
    data = dict(data)
    label = data.pop("label")
    settings: dict[str, Any] = {"quick": args.toy, **data, "num_overlays": 1, "save_maps": "none"}
    train_minutes = None
    if args.toy:
        settings.update({"max_steps": 2, **TOY[name]})
    else:
        train_minutes = max(0.25, budget_s * TRAIN_SHARE[name] / 60)
        settings["max_minutes"] = round(train_minutes, 2)
        settings["checkpoint_minutes"] = 60  # one checkpoint at the end: no time lost writing big ones meanwhile
    if args.amp != "none":
        settings["amp"] = args.amp
    use_compile = args.compile == "on" or (args.compile == "auto" and not args.toy and train_minutes is not None
                                           and train_minutes >= args.compile_min_minutes)
    settings["compile"] = use_compile
    command = [sys.executable, "-m", "medad", "run", "--config", str(REPO / "bundles" / name),
               "--run_dir", str(run_dir), *_args(settings)]
    log(f"{name}: " + " ".join(shlex.quote(c) for c in command[3:]))
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # a safety net only: the run stops training by itself at max_minutes
    timeout = None if args.toy else budget_s * 2 + 300
    with open(run_dir / "run.log", "w") as output:
        try:
            process = subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, timeout=timeout,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
            returncode = process.returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    wall = time.perf_counter() - start
    record: dict[str, Any] = {"bundle": name, "data": label, "returncode": returncode, "wall_seconds": round(wall, 1),
                              "settings": settings, "run_dir": str(run_dir)}
    lines = (run_dir / "run.log").read_text(encoding="utf-8", errors="replace").splitlines()
    print("\n".join(f"  {name}| {line}" for line in lines[-15:]), flush=True)
    if returncode != 0:
        record["error"] = "\n".join(lines[-10:])
        log(f"{name}: FAILED ({returncode}) after {wall:.0f} s; see {run_dir / 'run.log'}")
        return record
    metrics_file = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    model = torch.load(run_dir / "models" / "model.pt", map_location="cpu", weights_only=False)
    steps, seconds = int(model.get("step") or 0), float(model.get("train_seconds") or 0.0)
    keep = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "best_dice", "dice", "images_per_second",
            "inference_seconds", "network_evaluations_per_image", "num_cases")
    record.update({
        "steps": steps, "train_minutes": round(seconds / 60, 2), "steps_per_second": round(steps / seconds, 3) if seconds else None,
        "parameters_m": round(sum(v.numel() for v in model["network"].values() if v.is_floating_point()) / 1e6, 2),
        "metrics": {k: metrics[k] for k in keep if k in metrics},
        "calibration": metrics.get("calibration"),
        "weights": str(run_dir / "models" / "model.pt"),
    })
    if not args.keep_checkpoints:
        (run_dir / "models" / "checkpoint.pt").unlink(missing_ok=True)
    log(f"{name}: {steps} steps in {seconds / 60:.1f} min, wall {wall:.0f} s, metrics {record['metrics']}")
    return record


# -- FAIR inference speed -----------------------------------------------------------------------------
def fair_speed(run_dir: Path, device: str, use_compile: bool, repeats: int) -> list[dict[str, Any]]:
    """Images/s of FAIR's whole anomaly-map computation with the trained model (eager/compiled, fp32/bf16)."""
    import torch

    from medad import bundle
    from medad.engine.amp import autocast

    ckpt = str(run_dir / "models" / "model.pt")
    parser = bundle.parser(REPO / "bundles" / "fair", "inference", run_dir=str(run_dir), ckpt_path=ckpt)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["network"])
    network = network.to(device).eval()
    inferer = parser.get_parsed_content("inferer")
    size = int(parser.get_parsed_content("image_size"))

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    variants = [("eager", network)]
    if use_compile:
        variants.append(("compiled", torch.compile(network)))
    for label, model in variants:
        for amp in ("none", "bf16"):
            for batch in (1, 32):
                images = torch.rand(batch, 3, size, size, device=device)
                with torch.inference_mode(), autocast(device, None if amp == "none" else amp):
                    for _ in range(3):  # warm-up (and compilation)
                        inferer(images, model)
                    synchronize()
                    start = time.perf_counter()
                    for _ in range(repeats):
                        inferer(images, model)
                    synchronize()
                    seconds = (time.perf_counter() - start) / repeats
                rows.append({"network": label, "precision": "bf16 autocast" if amp == "bf16" else "fp32",
                             "batch": batch, "image_size": size, "images_per_second": round(batch / seconds, 1),
                             "ms_per_batch": round(1000 * seconds, 2)})
                log(f"FAIR speed: {rows[-1]}")
    return rows


# -- report -------------------------------------------------------------------------------------------
def markdown(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    lines = [(f"# gpu_run ({summary['started']}, {env.get('gpu', 'CPU')}, torch {env['torch']}, "
              f"{'toy' if summary['toy'] else 'paper scale'}, budget {summary['budget_minutes']} min)"), "",
             ("| bundle | data | params M | steps | train min | steps/s | wall s | image AUROC | pixel AUROC | AUPRO | "
              "pixel AP | images/s (eval) |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(metrics: dict[str, Any], key: str, digits: int = 3) -> str:
        value = metrics.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"

    for r in summary["bundles"]:
        m = r.get("metrics", {})

        status = "" if r["returncode"] == 0 else f" (FAILED: {r['returncode']})"
        lines.append(f"| {r['bundle']}{status} | {r['data']} | {r.get('parameters_m', '–')} | {r.get('steps', '–')} | "
                     f"{r.get('train_minutes', '–')} | {r.get('steps_per_second', '–')} | {r['wall_seconds']} | "
                     f"{f(m, 'image_auroc')} | {f(m, 'pixel_auroc')} | {f(m, 'aupro')} | {f(m, 'pixel_ap')} | "
                     f"{f(m, 'images_per_second', 1)} |")
    if summary.get("fair_speed"):
        lines += ["", "FAIR anomaly maps per second (high-pass + network + MSGMS/colour map), trained model:", "",
                  "| network | precision | batch | image size | images/s | ms per batch |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['network']} | {r['precision']} | {r['batch']} | {r['image_size']} | {r['images_per_second']} | "
                  f"{r['ms_per_batch']} |" for r in summary["fair_speed"]]
    lines += ["", f"Total wall time {summary['total_seconds']:.0f} s; command: `{summary['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--budget_minutes", type=float, default=9.0,
                        help="wall budget for training + evaluating all bundles (default 9)")
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=BUNDLES)
    parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding mvtec_ad/bottle (default ../shared/data)")
    parser.add_argument("--mri_dir", default=None, help="preprocessed MRI cohort (images/, brain_masks/) for disyre/addm")
    parser.add_argument("--mri_lesions", default="dark", choices=("dark", "bright", "foreign"),
                        help="synthetic lesions of the held-out heads with --mri_dir")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "none"))
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--compile_min_minutes", type=float, default=5.0,
                        help="with --compile auto: compile a bundle's training only for a share at least this long")
    parser.add_argument("--speed_repeats", type=int, default=20, help="timed passes per FAIR speed measurement")
    parser.add_argument("--toy", action="store_true", help="tiny networks and data, 2 steps (automatic without CUDA)")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep models/checkpoint.pt (optimiser state)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("give --out DIR (or set $OUT).")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("gpu_run: CUDA is not available; running on the CPU at toy size (--toy).", flush=True)
        args.toy = True
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "toy": args.toy, "budget_minutes": args.budget_minutes,
        "command": "python scripts/gpu_run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "environment": environment(device), "bundles": [],
    }
    log(f"environment: {summary['environment']}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts (and the fp32 speed rows) use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True

    work = out / "data"
    start = time.perf_counter()
    data = {name: industrial_data(args) for name in args.bundles if name in INDUSTRIAL}
    if any(name not in INDUSTRIAL for name in args.bundles):
        mri = mri_data(args, work)
        data.update({name: mri for name in args.bundles if name not in INDUSTRIAL})
    summary["data_seconds"] = round(time.perf_counter() - start, 1)
    log(f"data ready in {summary['data_seconds']} s")

    budget_s = args.budget_minutes * 60
    loop_start = time.perf_counter()
    for i, name in enumerate(args.bundles):
        remaining = budget_s - (time.perf_counter() - loop_start)
        share = max(remaining, 0.0) / (len(args.bundles) - i)
        summary["bundles"].append(run_bundle(name, data[name], args, share, out / "runs"))
        write(out, summary, started)
    summary["bundle_seconds"] = round(time.perf_counter() - loop_start, 1)

    fair = next((r for r in summary["bundles"] if r["bundle"] == "fair" and r["returncode"] == 0), None)
    if fair is not None:
        summary["fair_speed"] = fair_speed(Path(fair["run_dir"]), device, device == "cuda" and args.compile != "off",
                                           2 if args.toy else args.speed_repeats)
    write(out, summary, started)
    log(f"done in {time.perf_counter() - started:.0f} s: {out / 'summary.md'}")
    return 0 if all(r["returncode"] == 0 for r in summary["bundles"]) else 1


def write(out: Path, summary: dict[str, Any], started: float) -> None:
    from medad.io.atomic import atomic_write, write_json

    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "summary.json", summary)
    with atomic_write(out / "summary.md", "w") as handle:
        handle.write(markdown(summary))


if __name__ == "__main__":
    sys.exit(main())
