"""Research tables: one row per case, a cohort summary, and ROC / precision-recall curve figures."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medad.io.atomic import atomic_save, atomic_write, write_json

__all__ = [
    "CASE_COLUMNS",
    "anomaly_extent",
    "case_table",
    "write_tables",
    "write_table_csv",
    "cohort_summary",
    "save_roc_pr_curves",
]

PathLike = str | os.PathLike

#: Fixed leading columns of :func:`case_table` (those that apply), in this order; extra fields follow.
CASE_COLUMNS = (
    "case_id",
    "image_score",
    "label",
    "threshold",
    "decision",
    "anomaly_volume_ml",
    "anomaly_area_px",
    "ap",
    "dice",
    "runtime_s",
)

# Per-case arrays a record may carry; they are turned into scalar columns and not stored in the table.
_ARRAY_FIELDS = ("anomaly_mask", "anomaly_map", "ground_truth_mask", "voxel_spacing")


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def anomaly_extent(anomaly_mask: Any, voxel_spacing: Sequence[float] | None = None) -> dict[str, float]:
    """Size of a binary anomaly mask: ``{"anomaly_volume_ml": ...}`` for 3D, ``{"anomaly_area_px": ...}`` for 2D.

    Args:
        anomaly_mask: ``(X, Y, Z)`` or ``(H, W)`` (a leading channel axis of size 1 is ignored).
        voxel_spacing: voxel size in mm along the three axes (required for 3D, e.g. ``nib_image.header.get_zooms()``).

    For 3D: number of voxels * voxel volume in mm^3 / 1000 (1 ml = 1000 mm^3).
    """
    mask = _to_numpy(anomaly_mask).astype(bool)
    if mask.ndim in (3, 4) and mask.shape[0] == 1:
        mask = mask[0]
    count = int(mask.sum())
    if mask.ndim == 2:
        return {"anomaly_area_px": float(count)}
    if mask.ndim != 3:
        raise ValueError(f"An anomaly mask must be (H, W) or (X, Y, Z), got shape {mask.shape}.")
    if voxel_spacing is None or len(voxel_spacing) < 3:
        raise ValueError("The anomaly volume of a 3D mask needs the voxel spacing (mm) along its three axes.")
    voxel_mm3 = float(np.prod([float(s) for s in voxel_spacing[:3]]))
    return {"anomaly_volume_ml": count * voxel_mm3 / 1000.0}


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    from medad.metrics import segmentation_scores

    return float(segmentation_scores(prediction[None].astype(np.float64), truth[None], threshold=0.5)["dice"])


def _average_precision(anomaly_map: np.ndarray, truth: np.ndarray) -> float:
    from medad.metrics import average_precision

    if not truth.any():
        return math.nan  # undefined without a positive pixel
    return float(average_precision(anomaly_map[None], truth[None]))


def _case_row(record: Mapping[str, Any], threshold: float | None) -> dict[str, Any]:
    if "case_id" not in record or "image_score" not in record:
        raise ValueError(f"Every case record needs 'case_id' and 'image_score'; got fields {sorted(record)}.")
    row: dict[str, Any] = {"case_id": str(record["case_id"]), "image_score": float(record["image_score"])}
    if record.get("label") is not None:
        row["label"] = int(record["label"])
    case_threshold = record.get("threshold", threshold)
    row["threshold"] = math.nan if case_threshold is None else float(case_threshold)
    row["decision"] = None if case_threshold is None else bool(row["image_score"] >= float(case_threshold))

    truth = _to_numpy(record["ground_truth_mask"]).astype(bool) if record.get("ground_truth_mask") is not None else None
    if record.get("anomaly_mask") is not None:
        predicted = _to_numpy(record["anomaly_mask"]).astype(bool)
        row.update(anomaly_extent(predicted, record.get("voxel_spacing")))
        if truth is not None and "dice" not in record:
            if predicted.shape != truth.shape:
                raise ValueError(f"Case {row['case_id']}: anomaly mask {predicted.shape} and ground truth "
                                 f"{truth.shape} differ in shape.")
            row["dice"] = _dice(predicted, truth)
    if record.get("anomaly_map") is not None and truth is not None and "ap" not in record:
        row["ap"] = _average_precision(_to_numpy(record["anomaly_map"]).astype(np.float64), truth)

    for key, value in record.items():
        if key in row or key in _ARRAY_FIELDS or key in ("label",):
            continue
        if np.ndim(value) != 0:
            raise ValueError(f"Case {row['case_id']}: field {key!r} is not a single value and cannot be a table cell.")
        row[key] = value.item() if isinstance(value, np.generic) else value
    return row


def case_table(records: Sequence[Mapping[str, Any]], threshold: float | None = None) -> pd.DataFrame:
    """One row per case.

    Args:
        records: one dict per case with ``case_id`` and ``image_score``, and optionally ``label`` (1 anomalous,
            0 normal), ``threshold`` (overrides the argument), ``anomaly_volume_ml`` / ``anomaly_area_px``,
            ``ap``, ``dice``, ``runtime_s`` and any scalar extra fields (kept as columns). Arrays may be given
            instead of the derived numbers: ``anomaly_mask`` (thresholded map, ``(H, W)`` or ``(X, Y, Z)``) with
            ``voxel_spacing`` (mm, 3D) gives the anomaly size, plus ``ground_truth_mask`` gives Dice;
            ``anomaly_map`` with ``ground_truth_mask`` gives the pixel AP.
        threshold: calibrated image-score threshold; ``decision`` is ``image_score >= threshold``.

    Returns:
        DataFrame with the :data:`CASE_COLUMNS` that apply (``label`` only when some case has one), then extras.
        ``decision`` is a nullable boolean (missing without a threshold); absent numbers are NaN.
    """
    rows = [_case_row(record, threshold) for record in records]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["case_id", "image_score", "threshold", "decision", "ap", "dice", "runtime_s"])
    for column in ("ap", "dice", "runtime_s"):
        if column not in frame:
            frame[column] = math.nan
    frame["decision"] = frame["decision"].astype("boolean")
    if "label" in frame:
        frame["label"] = frame["label"].astype("Int64")
    for column in ("threshold", "anomaly_volume_ml", "anomaly_area_px", "ap", "dice", "runtime_s"):
        if column in frame:
            frame[column] = frame[column].astype(np.float64)
    leading = [c for c in CASE_COLUMNS if c in frame]
    return frame[leading + [c for c in frame.columns if c not in leading]]


def write_table_csv(df: pd.DataFrame, path: PathLike) -> Path:
    """Write one table as CSV, atomically (a reader never sees a half-written table)."""
    with atomic_write(path, "w") as handle:
        df.to_csv(handle, index=False)
    return Path(path)


def write_tables(df: pd.DataFrame, out_dir: PathLike, stem: str = "cases", summary: bool = True) -> dict[str, Path]:
    """Write ``<stem>.csv`` and ``<stem>.parquet`` (and ``<stem>_summary.json``) into ``out_dir``, atomically.

    Returns:
        ``{"csv": path, "parquet": path}`` plus ``"summary"`` when written.
    """
    out_dir = Path(out_dir)
    paths = {"csv": write_table_csv(df, out_dir / f"{stem}.csv"), "parquet": out_dir / f"{stem}.parquet"}
    atomic_save(paths["parquet"], lambda name: df.to_parquet(name, index=False))
    if summary:
        paths["summary"] = write_json(out_dir / f"{stem}_summary.json", cohort_summary(df))
    return paths


def _mean(series: pd.Series) -> float | None:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def cohort_summary(df: pd.DataFrame) -> dict[str, Any]:
    """Cohort numbers from a :func:`case_table`.

    Returns:
        dict with ``n_cases``, ``n_anomalous_decisions`` (None without a threshold), ``scores_by_label``
        (``{label: {n, mean, median}}``, label ``"all"`` when no labels are known), ``mean_ap``, ``mean_dice``,
        ``mean_runtime_s`` (None when absent), and ``image_auroc`` / ``image_ap`` when both labels occur.
    """
    summary: dict[str, Any] = {"n_cases": int(len(df))}
    decision = df["decision"] if "decision" in df else pd.Series(dtype="boolean")
    summary["n_anomalous_decisions"] = int(decision.sum()) if decision.notna().any() else None
    groups: dict[str, pd.Series] = {}
    if "label" in df and df["label"].notna().any():
        for label, group in df.dropna(subset=["label"]).groupby("label"):
            groups[str(int(label))] = group["image_score"]
    else:
        groups["all"] = df["image_score"] if "image_score" in df else pd.Series(dtype=float)
    summary["scores_by_label"] = {
        label: {"n": int(len(scores)), "mean": _mean(scores), "median": float(scores.median()) if len(scores) else None}
        for label, scores in groups.items()
    }
    for column in ("ap", "dice", "runtime_s"):
        summary[f"mean_{column}"] = _mean(df[column]) if column in df else None
    if {"0", "1"} <= set(groups):
        from medad.metrics import average_precision, image_auroc

        known = df.dropna(subset=["label"])
        labels, scores = known["label"].astype(int).to_numpy(), known["image_score"].to_numpy(dtype=np.float64)
        summary["image_auroc"] = image_auroc(scores, labels)
        summary["image_ap"] = float(average_precision(scores, labels))
    return summary


def _save_curve(path: Path, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, label: str,
                diagonal: bool, title: str | None, step: bool) -> Path:
    figure = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    if step:
        axis.step(x, y, where="post", label=label)
    else:
        axis.plot(x, y, label=label)
    if diagonal:
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axis.set_xlim(0.0, 1.0)
    axis.set_ylim(0.0, 1.02)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend(loc="lower right" if diagonal else "lower left")
    if title:
        axis.set_title(title)
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    return path


def save_roc_pr_curves(scores: Any, labels: Any, path_prefix: PathLike, title: str | None = None) -> dict[str, Path]:
    """Save the image-level ROC curve and precision-recall curve as ``<prefix>_roc.png`` and ``<prefix>_pr.png``.

    Args:
        scores: ``(N,)`` image scores (higher = more anomalous).
        labels: ``(N,)`` 1 anomalous / 0 normal; both classes must occur.
        path_prefix: e.g. ``out/cases`` -> ``out/cases_roc.png``, ``out/cases_pr.png``.
        title: optional figure title.

    Returns:
        ``{"roc": path, "pr": path}``.
    """
    from medad.metrics import average_precision, image_auroc, pr_curve_points, roc_curve_points

    scores_np = _to_numpy(scores).astype(np.float64).ravel()
    labels_np = _to_numpy(labels).astype(int).ravel()
    if scores_np.shape != labels_np.shape:
        raise ValueError(f"Curves need one label per score, got {scores_np.size} scores and {labels_np.size} labels.")
    if set(np.unique(labels_np).tolist()) != {0, 1}:
        raise ValueError("ROC and PR curves need both normal (0) and anomalous (1) cases among the labels.")
    prefix = os.fspath(path_prefix)
    fpr, tpr, _ = roc_curve_points(scores_np, labels_np)
    precision, recall, _ = pr_curve_points(scores_np, labels_np)
    ap = average_precision(scores_np, labels_np)
    auroc = image_auroc(scores_np, labels_np)
    return {
        "roc": _save_curve(Path(f"{prefix}_roc.png"), fpr, tpr, "false positive rate", "true positive rate",
                           f"AUROC = {auroc:.3f}", diagonal=True, title=title, step=False),
        # AP is the step-wise area under this curve (sklearn's definition), so draw it as steps.
        "pr": _save_curve(Path(f"{prefix}_pr.png"), recall, precision, "recall", "precision",
                          f"AP = {ap:.3f}", diagonal=False, title=title, step=True),
    }
