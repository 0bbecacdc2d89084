#!/usr/bin/env python
"""Train and evaluate medad bundles on a real dataset and record the results in docs/results.md.

Example (the CPU benchmark on MVTec AD bottle recorded in docs/results.md)::

    python scripts/benchmark.py --methods fair ddpm_partial ddpm_kl zscore \
        --dataset_dir ../shared/data/mvtec_ad/bottle --run_root /tmp/medad_bench --max_minutes 30

For every method it runs ``python -m medad run --config bundles/<method>`` with the method's stated setting
(below, printed into the results table), then reads ``eval/metrics.json`` and measures the inference overhead:
wall time of inference ÷ (network calls × the time of one forward pass of the same batch). Never tunes on the test
split: every setting is fixed before the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The fixed CPU settings of each method (overrides of its bundle); documented in docs/results.md.
CPU_SETTINGS: dict[str, dict[str, object]] = {
    # the small `quick` networks, trained until the time budget on a stated image size; the real-data defaults
    # (`--quick false`) are the paper settings, far beyond a 2-core CPU budget.
    "ddpm_partial": {"quick": True, "image_size": 64, "batch_size": 8, "max_steps": 1000000, "learning_rate": 5e-4},
    "ddpm_kl": {"quick": True, "image_size": 64, "batch_size": 8, "max_steps": 1000000, "learning_rate": 5e-4},
    "fair": {"quick": True, "image_size": 128, "batch_size": 8, "max_steps": 1000000},
    "disyre": {"quick": True},
    "addm": {"quick": True},
}

#: The baselines, run beside the methods (bundles/zscore, bundles/intensity): nothing is trained for a time budget,
#: so they take no ``max_minutes``; ``data`` selects the data domain of the benchmark (configs/data/<data>.json).
BASELINES: dict[str, dict[str, object]] = {
    # per-pixel Gaussian of the normal training images at the real-data working size (256 px), |z|, max over RGB
    "zscore": {"data": "industrial"},
}

PAPER = {
    ("ddpm_partial", "bottle"): "I-AUROC 0.99 (seed 000)",
    ("fair", "bottle"): "I-AUROC 1.00, P-AUROC 0.983, AUPRO 0.941 (FAIR paper)",
    ("ddpm_kl", "bottle"): "not reported per category in seed 001",
}


#: ``--step_cost``: the batch shapes of one training step (B, C, H, W): what each shipped MRI model trained on, and
#: the paper's (METHODS.md). DISYRE shipped: 2 volumes x 4 whole axial slices of the 2 mm template grid (99 x 117,
#: padded to 104 x 120); paper: 8 volumes x 12 slices of 128² patches. ADDM shipped: 2 x 4 whole slices of the
#: 4 mm grid (padded to 56 x 64); paper: 4 slices of 256².
STEP_COST_BATCHES: dict[str, dict[str, tuple[int, ...]]] = {
    "disyre": {"shipped": (8, 1, 104, 120), "paper": (96, 1, 128, 128)},
    "addm": {"shipped": (8, 1, 56, 64), "paper": (4, 1, 256, 256)},
}


def _overrides(values: dict[str, object]) -> list[str]:
    args = []
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def forward_seconds(method: str, overrides: dict[str, object], batch_size: int) -> float:
    """Median time of one forward pass of the bundle's network on a batch like the evaluation's."""
    import torch
    from monai.bundle import ConfigParser

    from medad import bundle

    parser = ConfigParser()
    parser.read_config(bundle.config_files(REPO / "bundles" / method, data=overrides.get("data")))
    for key, value in overrides.items():
        parser[key] = value
    parser["dataset_dir"] = "placeholder"  # only to resolve `quick` like the run did; nothing is read
    network = parser.get_parsed_content("network_def").eval()
    size = int(parser.get_parsed_content("image_size"))
    x = torch.rand(batch_size, network.in_channels, size, size)
    t = torch.full((batch_size,), 10, dtype=torch.long)
    times = []
    with torch.no_grad():
        network(x, t)
        for _ in range(3):
            start = time.perf_counter()
            network(x, t)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_method(method: str, dataset_dir: str, run_root: Path, max_minutes: float, extra: list[str]) -> dict:
    baseline = method in BASELINES
    settings = dict(BASELINES[method] if baseline else CPU_SETTINGS.get(method, {}))
    if not baseline:
        settings["max_minutes"] = max_minutes
    run_dir = run_root / method
    command = [sys.executable, "-m", "medad", "run", "--config", f"bundles/{method}", "--dataset_dir", dataset_dir,
               "--run_dir", str(run_dir), *_overrides(settings), *extra]
    printable = "python -m medad run " + " ".join(shlex.quote(c) for c in command[4:])
    print(f"[benchmark] {printable}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    import torch

    # a baseline's model.pt holds its fitting time (zscore) or nothing (intensity); a method's checkpoint.pt its steps
    checkpoint_file = run_dir / "models" / ("model.pt" if baseline else "checkpoint.pt")
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    calls = metrics.get("network_calls") or 0
    batch = int(settings.get("batch_size", 8))
    overhead = float("nan")
    if calls and not baseline:  # a baseline's "network" is a statistic, not a forward pass worth comparing
        one_forward = forward_seconds(method, {k: v for k, v in settings.items() if k != "max_minutes"}, batch)
        overhead = metrics["inference_seconds"] / (calls * one_forward)
    return {
        "method": method,
        "command": printable,
        "settings": settings,
        "train_minutes": checkpoint.get("train_seconds", float("nan")) / 60,
        "train_steps": checkpoint.get("step"),
        "wall_minutes": wall / 60,
        "metrics": metrics,
        "overhead": overhead,
    }


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and value == value:
        return f"{value:.{digits}f}"
    return "n/a"


def write_results(results: list[dict], dataset_dir: str, out: Path) -> None:
    dataset = Path(dataset_dir).name
    lines = [
        f"## {dataset}: CPU benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)",
        "",
        "| method | image AUROC | pixel AUROC | AUPRO | train min (steps) | images/s | net evals / image | overhead | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['method']}{' (baseline)' if r['method'] in BASELINES else ''} | {_fmt(m.get('image_auroc'))} | {_fmt(m.get('pixel_auroc'))} | {_fmt(m.get('aupro'))} | "
            f"{_fmt(r['train_minutes'], 1)} ({r['train_steps']}) | {_fmt(m.get('images_per_second'), 2)} | "
            f"{_fmt(m.get('network_evaluations_per_image'), 1)} | {_fmt(r['overhead'], 2)} | "
            f"{PAPER.get((r['method'], dataset), '')} |"
        )
    lines += ["", "Commands (from the repository root):", ""]
    lines += [f"- `{r['command']}`" for r in results]
    lines.append("")
    section = "\n".join(lines)
    text = out.read_text() if out.is_file() else "# Measured results\n\n"
    out.write_text(text.rstrip() + "\n\n" + section)
    print(section)


# -- eager vs exported inference speed (--export-speed) ------------------------------------------------------
#: per bundle: the demo inputs its shipped model works on, and how a case is counted
EXPORT_SPEED_DATA = {"fair": "images", "ddpm_partial": "images", "disyre": "volumes", "addm": "volumes"}


def _export_inputs(method: str, root: Path) -> Path:
    """Fixed demo inputs for ``method`` (generated, seed 0): 16 industrial test images or 2 MRI test volumes."""
    from medad.data import make_demo_mri, make_demo_mvtec

    if EXPORT_SPEED_DATA[method] == "images":
        return make_demo_mvtec(root / "demo_mvtec", num_train=1, num_test_good=6, num_test_defect=10) / "test"
    return make_demo_mri(root / "demo_mri", num_train=1, num_test=2) / "test"


def _timed_inference(method: str, ckpt: Path, data: Path, out: Path, repeats: int) -> tuple[float, dict]:
    """Median seconds of the bundle's inference (inferer + image score, no file writing) over ``data``, and the
    maps of the last pass; the first pass warms up (ONNX session, exported graph) and is not counted."""
    from medad import bundle

    # the network settings of the shipped model.pt, then the file to time (model.pt or one of its exports)
    parser = bundle.parser(REPO / "bundles" / method, "inference",
                           ckpt_path=str(REPO / "bundles" / method / "models" / "model.pt"))
    parser.update({"device": "$torch.device('cpu')", "ckpt_path": str(ckpt), "input_dir": str(data),
                   "output_dir": str(out), "evaluator#progress": False})
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.load()
    times, cases = [], {}
    for _ in range(repeats + 1):
        start = time.perf_counter()
        cases = evaluator.infer(evaluator.test_loader, method)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), dict(zip(cases["case_id"], cases["map"]))


def export_speed(methods: list[str], run_root: Path, threads: int, repeats: int) -> list[dict]:
    """Eager vs TorchScript vs torch.export (.pt2) vs ONNX (onnxruntime) inference of each bundle's shipped model on
    the same demo inputs, in one process: export time, file size, seconds per case, cases/s, and the largest
    difference of the maps from the eager ones."""
    import numpy as np
    import torch

    from medad import bundle

    torch.set_num_threads(threads)
    rows = []
    for method in methods:
        root = run_root / method
        data = _export_inputs(method, root)
        shipped = REPO / "bundles" / method / "models" / "model.pt"
        files = {"eager": shipped}
        export_seconds = {"eager": 0.0}
        for fmt, suffix in (("torchscript", ".ts"), ("pt2", ".pt2"), ("onnx", ".onnx")):
            start = time.perf_counter()
            files[fmt] = Path(bundle.export(REPO / "bundles" / method, filepath=str(root / f"model{suffix}"), format=fmt))
            export_seconds[fmt] = time.perf_counter() - start
        count = len([p for p in data.rglob("*") if p.is_file()])
        eager_maps = None
        for fmt, path in files.items():
            seconds, maps = _timed_inference(method, path, data, root / f"out_{fmt}", repeats)
            eager_maps = maps if eager_maps is None else eager_maps
            difference = max(float(np.abs(maps[c] - eager_maps[c]).max()) for c in eager_maps)
            rows.append({"method": method, "format": fmt, "unit": EXPORT_SPEED_DATA[method], "cases": count,
                         "seconds_per_case": seconds / count, "cases_per_second": count / seconds,
                         "export_seconds": export_seconds[fmt], "file_mb": path.stat().st_size / 2**20,
                         "max_map_difference": difference, "threads": threads})
            print(f"[export-speed] {method} {fmt}: {seconds / count:.3f} s per {EXPORT_SPEED_DATA[method][:-1]}, "
                  f"max |map - eager| {difference:.2e}", flush=True)
    return rows


def export_speed_table(rows: list[dict]) -> str:
    lines = ["| bundle (shipped model) | format | s per case | cases/s | vs eager | export s | file MB | max \\|map − eager\\| |",
             "|---|---|---|---|---|---|---|---|"]
    eager = {r["method"]: r["seconds_per_case"] for r in rows if r["format"] == "eager"}
    for r in rows:
        lines.append(
            f"| {r['method']} ({r['cases']} demo {r['unit']}) | {r['format']} | {r['seconds_per_case']:.3f} | "
            f"{r['cases_per_second']:.2f} | {eager[r['method']] / r['seconds_per_case']:.2f}× | "
            f"{r['export_seconds']:.1f} | {r['file_mb']:.1f} | {r['max_map_difference']:.1e} |"
        )
    return "\n".join(lines)


#: the bundles --profile measures by default (the baselines train no network)
PROFILE_METHODS = ("fair", "ddpm_partial", "ddpm_kl", "disyre", "addm")


def profile(args: argparse.Namespace, explicit_methods: bool) -> list[dict]:
    """``--profile``: training throughput and inference overhead of each bundle, printed as a Markdown table."""
    import tempfile

    from medad.engine.profiling import profile_bundle, profile_table

    methods = args.methods if explicit_methods else list(PROFILE_METHODS)
    overrides = {"dataset_dir": args.dataset_dir} if args.dataset_dir else {}
    if args.inference_only:
        return profile_inference(args, methods, overrides)
    rows = []
    for method in methods:
        with tempfile.TemporaryDirectory(prefix=f"profile_{method}_") as run_dir:
            row = profile_bundle(REPO / "bundles" / method, run_dir, steps=args.profile_steps,
                                 rounds=args.profile_rounds, overrides=overrides)
        rows.append(row)
        shares = ", ".join(f"{k} {100 * v:.0f} %" for k, v in row["shares"].items())
        print(f"[profile] {method}: trainer {row['trainer_steps_per_second']:.2f} steps/s, bare loop "
              f"{row['bare_steps_per_second']:.2f} steps/s, ratio {row['ratio']:.2f} ({shares}); inference overhead "
              f"{row['inference_overhead']:.2f} (load {row['load']:.1f})", flush=True)
    Path(args.run_root).mkdir(parents=True, exist_ok=True)
    (Path(args.run_root) / "profile.json").write_text(json.dumps(rows, indent=2, default=str))
    print(profile_table(rows))
    return rows


def profile_inference(args: argparse.Namespace, methods: list[str], overrides: dict) -> list[dict]:
    """``--profile --inference_only``: the inference overhead alone, with ``--extra`` overrides (e.g. ``--quick false``
    for the paper's network sizes, too large to train here); one line per bundle, all rows in
    ``<run_root>/inference_overhead.json``."""
    import tempfile

    from medad.bundle import config_files
    from medad.engine.profiling import inference_overhead
    from medad.overrides import check_overrides, split_args

    rows = []
    for method in methods:
        bundle = REPO / "bundles" / method
        settings = {**overrides, **check_overrides(config_files(bundle), split_args(shlex.split(args.extra))[1])}
        with tempfile.TemporaryDirectory(prefix=f"overhead_{method}_") as run_dir:
            row = inference_overhead(bundle, run_dir, repeats=args.profile_rounds, overrides=settings)
        row["overrides"] = args.extra
        rows.append(row)
        print(f"[profile] {method} {args.extra}: {row['parameters'] / 1e6:.2f} M parameters, batch "
              f"{'x'.join(map(str, row['inference_batch']))}, inference {row['inference_seconds']:.3f} s, network alone "
              f"{row['network_seconds']:.3f} s, overhead {row['inference_overhead']:.2f} (load {row['load']:.1f})",
              flush=True)
    Path(args.run_root).mkdir(parents=True, exist_ok=True)
    (Path(args.run_root) / "inference_overhead.json").write_text(json.dumps(rows, indent=2, default=str))
    return rows


def step_cost(methods: list[str], repeats: int, scales: tuple[str, ...] = ("shipped", "paper")) -> list[dict]:
    """``--step_cost``: seconds per training step of each shipped MRI network (its bundle's inference config with
    the shipped weights loaded) and of the same bundle's paper-scale network (``--quick false``), at the batch
    shapes of :data:`STEP_COST_BATCHES`, and what 100,000 such steps take on this machine."""
    import torch

    from medad.bundle import parser as bundle_parser
    from medad.engine.checkpoint import load_network_weights
    from medad.engine.profiling import network_step_seconds

    rows = []
    for method in methods:
        bundle = REPO / "bundles" / method
        shipped = bundle_parser(bundle, workflow="inference")
        timesteps = int(shipped.get_parsed_content("num_timesteps"))
        for scale in scales:
            if scale == "shipped":
                network = shipped.get_parsed_content("network_def")
                load_network_weights(network, bundle / "models" / "model.pt", bundle=method)
            else:  # built only when asked for: the paper's networks hold 26-91 M parameters
                network = bundle_parser(bundle, workflow="train", quick=False).get_parsed_content("network_def")
            shape = STEP_COST_BATCHES[method][scale]
            seconds = network_step_seconds(network, shape, num_timesteps=timesteps, repeats=repeats)
            row = {"bundle": method, "scale": scale, "parameters": sum(p.numel() for p in network.parameters()),
                   "batch": list(shape), "seconds_per_step": seconds, "days_per_100k_steps": seconds * 1e5 / 86400,
                   "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
            rows.append(row)
            print(f"[step_cost] {method} {scale}: {row['parameters'] / 1e6:.2f} M parameters, batch "
                  f"{'x'.join(map(str, shape))}: {seconds:.2f} s per step, 100,000 steps = "
                  f"{row['days_per_100k_steps']:.1f} days (threads {row['threads']}, load {row['load']:.1f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["fair", "ddpm_partial", "ddpm_kl", "zscore"],
                        help=f"bundles to run; the baselines ({', '.join(BASELINES)}) run beside the methods")
    parser.add_argument("--dataset_dir", help="an MVTec-AD-layout category folder (required to train and evaluate)")
    parser.add_argument("--run_root", default="/tmp/medad_benchmark", help="where checkpoints and maps go")
    parser.add_argument("--max_minutes", type=float, default=30.0, help="training budget per method (minutes)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--extra", default="", help="more overrides for every method, e.g. '--num_workers 0'")
    parser.add_argument("--report_from", nargs="*", default=None,
                        help="only write the table from earlier runs' benchmark.json files (runs made in parallel)")
    parser.add_argument("--export-speed", action="store_true",
                        help="instead: eager vs TorchScript vs .pt2 vs ONNX inference speed of the shipped models of "
                             "--methods (default fair disyre) on fixed demo inputs, in one run")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads for --export-speed")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per format for --export-speed, timed steps per network for --step_cost (median)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: per bundle of --methods (default: the five methods, on their demo data), steps/s "
                             "of the medad trainer vs a bare PyTorch loop on pre-built batches, the share of each part "
                             "of a training step, and the inference overhead (medad.engine.profiling)")
    parser.add_argument("--profile_steps", type=int, default=10, help="timed steps per round for --profile")
    parser.add_argument("--profile_rounds", type=int, default=3, help="rounds (trainer, then bare loop) for --profile")
    parser.add_argument("--inference_only", action="store_true",
                        help="with --profile: only the inference overhead, of an untrained network configured by --extra "
                             "(e.g. --extra '--quick false' for the paper's sizes); --profile_rounds repeats (median)")
    parser.add_argument("--step_cost", action="store_true",
                        help="instead: seconds per training step of the shipped MRI networks of --methods (default disyre "
                             "addm) and of their paper-scale networks (--quick false), the network alone, --repeats "
                             "timed steps (median); rows in <run_root>/step_cost.json")
    args = parser.parse_args(argv)
    methods_given = "--methods" in (sys.argv[1:] if argv is None else argv)  # else each mode has its own default
    if args.step_cost:
        methods = [m for m in args.methods if m in STEP_COST_BATCHES] if methods_given else list(STEP_COST_BATCHES)
        if not methods:
            parser.error(f"--step_cost measures {', '.join(STEP_COST_BATCHES)}; none of them is in --methods.")
        rows = step_cost(methods, args.repeats)
        Path(args.run_root).mkdir(parents=True, exist_ok=True)
        (Path(args.run_root) / "step_cost.json").write_text(json.dumps(rows, indent=2))
        return
    if args.profile:
        profile(args, explicit_methods=methods_given)
        return
    if args.export_speed:
        methods = [m for m in args.methods if m in EXPORT_SPEED_DATA] if methods_given else ["fair", "disyre"]
        rows = export_speed(methods, Path(args.run_root) / "export_speed", args.threads, args.repeats)
        (Path(args.run_root) / "export_speed.json").write_text(json.dumps(rows, indent=2))
        print(export_speed_table(rows))
        return
    if args.report_from:
        results = [r for f in args.report_from for r in json.loads(Path(f).read_text())]
        write_results(results, args.dataset_dir, Path(args.out))
        return
    if not args.dataset_dir or not Path(args.dataset_dir).is_dir():
        parser.error(f"{args.dataset_dir}: dataset folder not found.")
    results = []
    for method in args.methods:
        results.append(run_method(method, args.dataset_dir, Path(args.run_root), args.max_minutes, shlex.split(args.extra)))
        (Path(args.run_root) / "benchmark.json").write_text(json.dumps(results, indent=2, default=str))
    write_results(results, args.dataset_dir, Path(args.out))


if __name__ == "__main__":
    main()
