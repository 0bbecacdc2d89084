"""Preprocess a cohort of T1 brain MRI volumes (command line: ``scripts/preprocess_mri.py``).

For every ``input_dir/<case>.nii[.gz]`` the pipeline of :mod:`medad.transforms.mri` runs

    load -> reorient to RAS -> N4 (optional) -> skull strip -> register to MNI152 -> normalise

and writes, each file atomically (temporary name + ``os.replace``)::

    output_dir/images/<case>.nii.gz                     template-space image, float32
    output_dir/brain_masks/<case>_brain_mask.nii.gz     template-space brain mask, uint8
    output_dir/transforms/<case>/                       0GenericAffine.mat (+ SyN warps) + registration.json
    output_dir/preprocess_log.csv                       one row per case (rewritten after each case)

Registration runs with ANTsPy or elastix (``registration_backend``); both write the same transform files and record,
and the backend's name is in ``registration.json`` and in the log's ``registration_backend`` column.

A case whose three outputs exist is skipped (resumable) unless ``overwrite``. A case that fails
(unreadable file, 4D volume, ...) gets one ``error`` row ``"<file>: <problem>"`` and the cohort
goes on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medad.data.readers import VOLUME_READERS, resolve_reader
from medad.transforms.mri import (
    DEFAULT_REGISTRATION_BACKEND,
    NORMALIZATION_MODES,
    REGISTRATION_RECORD_NAME,
    REGISTRATION_TRANSFORMS,
    SKULL_STRIP_BACKENDS,
    N4BiasCorrectiond,
    NormalizeIntensityInBraind,
    RegisterToTemplated,
    ReorientToCanonicald,
    SkullStripd,
    check_registration_backend,
    load_volume,
    save_volume,
)

__all__ = [
    "STEPS",
    "LOG_NAME",
    "LOG_COLUMNS",
    "case_id_of",
    "case_outputs",
    "preprocess_cohort",
    "write_montage",
    "main",
]

STEPS: tuple[str, ...] = ("load", "reorient", "n4", "skull_strip", "register", "normalize", "save")
LOG_NAME = "preprocess_log.csv"


def case_id_of(path: str | os.PathLike) -> str:
    """Case identifier: the file name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def case_outputs(output_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """Paths of a case's outputs: ``image``, ``brain_mask``, ``transforms`` (folder), ``record``."""
    out = Path(output_dir)
    transforms = out / "transforms" / case_id
    return {
        "image": out / "images" / f"{case_id}.nii.gz",
        "brain_mask": out / "brain_masks" / f"{case_id}_brain_mask.nii.gz",
        "transforms": transforms,
        "record": transforms / REGISTRATION_RECORD_NAME,
    }


def _is_done(paths: dict[str, Path]) -> bool:
    return all(paths[k].is_file() for k in ("image", "brain_mask", "record"))


LOG_COLUMNS: tuple[str, ...] = ("case", "file", "status", "error", "registration_backend",
                                 *[f"seconds_{s}" for s in STEPS], "total_seconds", "cpu_seconds",
                                 *[f"cpu_seconds_{s}" for s in STEPS], "image", "brain_mask", "transforms")


def _read_log(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=list(LOG_COLUMNS))
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return pd.DataFrame(columns=list(LOG_COLUMNS))  # an unreadable old log is rebuilt from this run


def _write_log(rows: list[dict[str, Any]], previous: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Write ``previous`` rows of cases not in this run plus this run's rows (atomically); return this run's."""
    from medad.io import atomic_write

    frame = pd.DataFrame(rows, columns=list(LOG_COLUMNS))
    kept = previous[~previous["case"].astype(str).isin(frame["case"].astype(str))] if len(previous) else previous
    merged = pd.concat([kept.reindex(columns=list(LOG_COLUMNS)), frame], ignore_index=True) if len(kept) else frame
    merged = merged.sort_values("case", kind="stable")
    with atomic_write(path, "w") as handle:
        merged.to_csv(handle, index=False)
    return frame


class _CasePipeline:
    """The cohort's transforms, built once (deepbet loads its model once) and run step by step."""

    def __init__(self, transforms_dir: Path, skull_strip: str, registration: str, normalization: str, n4: bool,
                 device: str, registration_backend: str = DEFAULT_REGISTRATION_BACKEND, reader: str = "auto") -> None:
        self.transforms_dir = transforms_dir
        self.reader = reader
        self.steps: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
            ("reorient", ReorientToCanonicald(keys="image")),
        ]
        if n4:
            self.steps.append(("n4", N4BiasCorrectiond(keys="image")))
        self.steps.append(("skull_strip", SkullStripd(keys="image", backend=skull_strip, device=device,
                                                      registration_backend=registration_backend)))
        self.register = RegisterToTemplated(keys="image", output_dir=transforms_dir, transform=registration,
                                            backend=registration_backend)
        self.steps.append(("register", self.register))
        self.steps.append(("normalize", NormalizeIntensityInBraind(keys="image", mode=normalization)))

    def __call__(self, path: Path, case_id: str, work_dir: Path, timings: dict[str, float]) -> dict[str, Any]:
        # CPU time of all threads per step (wall time depends on the machine's load): read after the call
        self.cpu_timings: dict[str, float] = {}
        cpu_timings = self.cpu_timings
        start, cpu_start = time.perf_counter(), time.process_time()
        data: dict[str, Any] = {"image": load_volume(path, self.reader), "case_id": case_id}
        timings["load"], cpu_timings["load"] = time.perf_counter() - start, time.process_time() - cpu_start
        # Registration writes into a hidden work folder that is renamed once the case succeeds.
        self.register.output_dir = work_dir
        for name, transform in self.steps:
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                data = transform(data)
            except Exception as exc:
                raise RuntimeError(f"{name.replace('_', ' ')} failed: {exc}") from exc
            timings[name], cpu_timings[name] = time.perf_counter() - start, time.process_time() - cpu_start
        return data


def _error_message(path: Path, exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    message = " ".join(message.split())
    return message if message.startswith(str(path)) else f"{path}: {message}"


def preprocess_cohort(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    skull_strip: str = "deepbet",
    registration: str = "affine",
    normalization: str = "minmax",
    n4: bool = True,
    overwrite: bool = False,
    glob: str = "*.nii*",
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    registration_backend: str = DEFAULT_REGISTRATION_BACKEND,
    reader: str = "auto",
    shard: str | None = None,
) -> pd.DataFrame:
    """Preprocess every NIfTI file in ``input_dir`` (see the module docstring for the outputs).

    Args:
        input_dir: folder of 3D T1 volumes (any orientation).
        output_dir: output folder (created).
        skull_strip: ``"deepbet"``, ``"brainextractor"`` or ``"atlas"``.
        registration: ``"rigid"``, ``"affine"`` or ``"syn"`` (ANTs only) to MNI152 2 mm.
        normalization: ``"minmax"`` (percentile clip, [0, 1]) or ``"zscore"``, inside the brain.
        n4: run N4 bias-field correction.
        overwrite: redo cases whose outputs exist (otherwise they are skipped).
        glob: file pattern inside ``input_dir``.
        limit: process at most this many files (in sorted order).
        device: torch device for deepbet.
        progress: show a tqdm progress bar.
        registration_backend: ``"ants"`` (ANTsPy), ``"elastix"`` (itk-elastix, ``pip install "medad[elastix]"``)
            or ``"auto"`` (elastix when installed, else ants); also used by ``skull_strip="atlas"``.
        reader: volume reader, ``"auto"``, ``"itk"`` or ``"sitk"`` (:mod:`medad.data.readers`).
        shard: ``"K/N"``: only the K-th of N contiguous blocks of the sorted files (after ``limit``), logged to
            ``preprocess_log.shard-K-of-N.csv``; the shard that finishes last merges every shard's log into
            ``preprocess_log.csv`` (:mod:`medad.engine.shards`).
    Returns:
        this run's log, one row per file: columns ``case``, ``file``, ``status`` (ok / skipped /
        error), ``error``, ``registration_backend`` (of the run that made the outputs), ``seconds_<step>``,
        ``cpu_seconds_<step>`` and ``total_seconds`` (wall clock), ``cpu_seconds``
        (CPU time of all threads), ``image``, ``brain_mask``, ``transforms``.
        ``output_dir/preprocess_log.csv`` holds these rows merged with the rows of earlier runs for
        cases not in this run; a skipped case keeps the timings of the run that produced its outputs.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist.")
    if skull_strip not in SKULL_STRIP_BACKENDS:
        raise ValueError(f"unknown skull-stripping backend {skull_strip!r}; choose one of {SKULL_STRIP_BACKENDS}.")
    if registration not in REGISTRATION_TRANSFORMS:
        raise ValueError(f"unknown registration {registration!r}; choose one of {tuple(REGISTRATION_TRANSFORMS)}.")
    if normalization not in NORMALIZATION_MODES:
        raise ValueError(f"unknown normalisation {normalization!r}; choose one of {NORMALIZATION_MODES}.")
    if reader not in VOLUME_READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {VOLUME_READERS}.")
    resolve_reader(reader)
    registration_backend = check_registration_backend(registration_backend, registration)  # "auto" resolved
    backend_module = {"deepbet": "deepbet", "brainextractor": "brainextractor"}.get(skull_strip)
    if backend_module is not None and importlib.util.find_spec(backend_module) is None:
        raise ImportError(f"skull-stripping backend {skull_strip!r} needs `pip install \"medad[skullstrip]\"` "
                          f"(or `pip install {backend_module}`); --skull-strip atlas needs no extra.")
    from medad.engine import shards

    parts = shards.parse_shard(shard)
    files = sorted(p for p in input_dir.glob(glob) if p.is_file() and not p.name.startswith("."))
    if limit is not None:
        files = files[: int(limit)]
    if parts is not None:
        files = [files[i] for i in shards.shard_range(len(files), *parts)]
    for sub in ("images", "brain_masks", "transforms"):
        (output_dir / sub).mkdir(parents=True, exist_ok=True)
    log_path = output_dir / LOG_NAME if parts is None else shards.preprocess_shard_log(output_dir, *parts)
    previous = _read_log(log_path)
    previous_rows = {str(r["case"]): r for r in previous.to_dict("records")} if len(previous) else {}
    pipeline: _CasePipeline | None = None  # built lazily: a fully finished cohort loads no model
    rows: list[dict[str, Any]] = []
    bar = tqdm(files, desc="preprocess", unit="case", disable=not progress)
    for path in bar:
        case_id = case_id_of(path)
        bar.set_postfix_str(case_id)
        paths = case_outputs(output_dir, case_id)
        row: dict[str, Any] = {"case": case_id, "file": str(path), "status": "ok", "error": ""}
        if not overwrite and _is_done(paths):
            # Keep the timings of the run that produced the outputs; only the status changes.
            earlier = previous_rows.get(case_id, {})
            row.update({k: v for k, v in earlier.items()
                        if k.startswith(("seconds_", "total_", "cpu_")) or k == "registration_backend"})
            row.update(status="skipped", image=str(paths["image"]), brain_mask=str(paths["brain_mask"]),
                       transforms=str(paths["transforms"]))
            rows.append(row)
            _write_log(rows, previous, log_path)
            continue
        row["registration_backend"] = registration_backend
        work_dir = output_dir / "transforms" / f".{case_id}.partial"
        timings: dict[str, float] = {}
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            if pipeline is None:
                pipeline = _CasePipeline(work_dir.parent, skull_strip, registration, normalization, n4, device,
                                         registration_backend, reader)
            shutil.rmtree(work_dir, ignore_errors=True)
            data = pipeline(path, case_id, work_dir, timings)
            t0, c0 = time.perf_counter(), time.process_time()
            save_volume(data["image"], paths["image"], dtype=np.float32)
            save_volume(data["brain_mask"], paths["brain_mask"], dtype=np.uint8)
            shutil.rmtree(paths["transforms"], ignore_errors=True)
            os.replace(work_dir / case_id, paths["transforms"])
            timings["save"] = time.perf_counter() - t0
            if hasattr(pipeline, "cpu_timings"):
                pipeline.cpu_timings["save"] = time.process_time() - c0
            row.update(image=str(paths["image"]), brain_mask=str(paths["brain_mask"]),
                       transforms=str(paths["transforms"]))
        except Exception as exc:  # one bad case must not stop the cohort
            row.update(status="error", error=_error_message(path, exc))
            tqdm.write(f"error: {row['error']}", file=sys.stderr)
            if os.environ.get("MEDAD_DEBUG"):
                traceback.print_exc()
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        row.update({f"seconds_{k}": round(v, 3) for k, v in timings.items()})
        row.update({f"cpu_seconds_{k}": round(v, 3) for k, v in getattr(pipeline, "cpu_timings", {}).items()})
        row["total_seconds"] = round(time.perf_counter() - start, 3)
        # CPU time of all threads of this process: a load-independent cost (wall time on an
        # otherwise idle machine is at most this plus I/O).
        row["cpu_seconds"] = round(time.process_time() - cpu_start, 3)
        rows.append(row)
        _write_log(rows, previous, log_path)
    log = _write_log(rows, previous, log_path)
    if parts is not None:
        _finish_shard(output_dir, parts, [r["case"] for r in rows])
    return log


def shard_log(output_dir: str | os.PathLike, shard: str) -> Path:
    """The log file of preprocessing shard ``shard`` (``"K/N"``)."""
    from medad.engine import shards

    return shards.preprocess_shard_log(output_dir, *shards.parse_shard(shard))


def _finish_shard(output_dir: Path, parts: tuple[int, int], cases: list[str]) -> None:
    """Mark this preprocessing shard finished; the last one merges the shards' logs into ``preprocess_log.csv``."""
    from medad.engine import shards
    from medad.io import write_json

    marker = output_dir / shards.SHARDS_DIR / f"preprocess-{shards.shard_name(*parts)}.json"
    write_json(marker, {"shard": parts[0], "num_shards": parts[1], "cases": cases})
    shards.merge_preprocess_logs(output_dir, require_all=False)


def write_montage(log: pd.DataFrame, png_path: str | os.PathLike, columns: int = 8) -> Path:
    """PNG grid of mid-axial slices with brain-mask contours for every case with outputs in ``log``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    done = log[log["status"].isin(["ok", "skipped"])]
    if done.empty:
        raise ValueError("no processed case to show in the montage.")
    n = len(done)
    cols = min(columns, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), done.iterrows()):
        image = np.asarray(nib.load(row["image"]).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(row["brain_mask"]).dataobj) > 0
        z = image.shape[2] // 2
        # RAS grid: transpose + origin="lower" gives anterior up, patient's right on the right (neurological).
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
        ax.contour(mask[:, :, z].T.astype(float), levels=[0.5], colors="r", linewidths=0.6)
        ax.set_title(str(row["case"])[:18], fontsize=7)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python scripts/preprocess_mri.py --input DIR --output DIR [options]``."""
    from medad.preprocess_args import build_parser

    args = build_parser().parse_args(argv)
    log = preprocess_cohort(args.input, args.output, skull_strip=args.skull_strip, registration=args.registration,
                            normalization=args.normalization, n4=not args.no_n4, overwrite=args.overwrite,
                            glob=args.glob, limit=args.limit, device=args.device,
                            registration_backend=args.registration_backend, reader=args.reader, shard=args.shard)
    counts = log["status"].value_counts().to_dict()
    print(f"{len(log)} case(s): " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; log: {Path(args.output) / LOG_NAME if not args.shard else shard_log(args.output, args.shard)}")
    if args.montage:
        cohort_log = _read_log(Path(args.output) / LOG_NAME)  # every processed case, not only this run's
        if cohort_log["status"].isin(["ok", "skipped"]).any():
            print(f"montage: {write_montage(cohort_log, args.montage)}")
    return 1 if (log["status"] == "error").any() else 0


if __name__ == "__main__":
    raise SystemExit(main())
