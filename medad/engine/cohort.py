"""Merge evaluations into one table with bootstrap confidence intervals (``medad cohort summarize``).

Every evaluation folder (``<run_dir>/eval``, an ``--output_dir`` of the evaluate workflow, or a run folder, whose
``eval/`` is taken) holds ``metrics.json`` (pooled metrics) and ``cases.parquet`` / ``cases.csv`` (one row per case).
:func:`summarize` gives one row per evaluation: the method (from the run's ``run.json``), the number of cases, the
pooled metrics as the evaluator computed them, and for the case-level metrics their mean with a 95 % bootstrap
interval over cases (:mod:`medad.metrics.bootstrap`); image AUROC gets a stratified interval when both classes occur.
Pooled pixel metrics (pixel AUROC, AUPRO, AP, best Dice over all pixels) are reported as computed: resampling them
would need every case's map. The baselines an evaluation measured on its own test cases (``metrics.json``
``baselines``, :mod:`medad.engine.comparison`) follow its row as rows of their own (``<label> [zscore baseline]``),
with their pooled metrics and image AUROC as computed (no interval: their per-case scores are not stored).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medad.engine.run_folder import read_run_record
from medad.metrics.bootstrap import image_auroc_interval, mean_interval

__all__ = ["load_evaluation", "summarize", "to_markdown", "POOLED", "PER_CASE"]

#: pooled metrics copied from ``metrics.json``
POOLED = ("pixel_auroc", "aupro", "pixel_ap", "best_dice")
#: per-case columns of ``cases`` summarised as mean [95 % interval]: table column -> output name
PER_CASE = {"ap": "case_ap", "best_dice": "case_best_dice", "dice": "case_dice_calibrated"}


def _evaluation_folder(folder: Path) -> Path:
    if (folder / "metrics.json").is_file():
        return folder
    if (folder / "eval" / "metrics.json").is_file():
        return folder / "eval"
    raise FileNotFoundError(f"{folder}: no metrics.json here or in its eval/ folder; run an evaluation first.")


def _run_record(folder: Path) -> dict[str, Any]:
    for candidate in (folder, folder.parent):
        record = read_run_record(candidate)
        if record is not None:
            return record
    return {}


def load_evaluation(folder: str | os.PathLike) -> dict[str, Any]:
    """``{"folder", "metrics", "cases" (pandas.DataFrame), "run"}`` of one evaluation (see the module docstring)."""
    import pandas as pd

    evaluation = _evaluation_folder(Path(folder))
    metrics = json.loads((evaluation / "metrics.json").read_text())
    if (evaluation / "cases.parquet").is_file():
        cases = pd.read_parquet(evaluation / "cases.parquet")
    elif (evaluation / "cases.csv").is_file():
        cases = pd.read_csv(evaluation / "cases.csv")
    else:
        raise FileNotFoundError(f"{evaluation}: no cases.parquet or cases.csv beside metrics.json.")
    return {"folder": evaluation, "metrics": metrics, "cases": cases, "run": _run_record(evaluation.parent)}


def _label(evaluation: Mapping[str, Any]) -> str:
    folder: Path = evaluation["folder"]
    return f"{folder.parent.name}/{folder.name}"


def summarize(
    folders: Sequence[str | os.PathLike | tuple[str | None, str | os.PathLike]] | Mapping[str, str | os.PathLike],
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    baselines: bool = True,
):
    """One row per evaluation: method, cases, pooled metrics, case-level means with bootstrap intervals.

    Args:
        folders: evaluation or run folders, or ``(label, folder)`` pairs / a mapping that give rows their label
            (default ``<run>/<evaluation>``).
        n_resamples / level / seed: of the bootstrap (the same inputs give the same table).
        baselines: add a row for each baseline in an evaluation's ``metrics.json`` after its row (method
            ``<name> baseline``).

    Returns:
        ``pandas.DataFrame`` with columns ``label, method, num_cases, image_auroc(+_low/_high), <pooled>,
        <per-case>(+_low/_high)``; NaN where a metric does not apply (e.g. image AUROC when every case is anomalous).
    """
    import pandas as pd

    items = list(folders.items()) if isinstance(folders, Mapping) else [
        f if isinstance(f, tuple) else (None, f) for f in folders]
    rows = []
    for label, folder in items:
        evaluation = load_evaluation(folder)
        metrics, cases = evaluation["metrics"], evaluation["cases"]
        row: dict[str, Any] = {
            "label": label or _label(evaluation),
            "method": evaluation["run"].get("bundle", metrics.get("bundle", "")),
            "num_cases": int(metrics.get("num_cases", len(cases))),
        }
        labels = cases["label"].dropna().astype(int) if "label" in cases else None
        if labels is not None and len(labels) == len(cases) and labels.nunique() == 2:
            point, low, high = image_auroc_interval(cases["image_score"], labels, n_resamples, level, seed)
        else:
            point = low = high = np.nan
        row.update({"image_auroc": point, "image_auroc_low": low, "image_auroc_high": high})
        for key in POOLED:
            value = metrics.get(key)
            row[key] = np.nan if value is None else float(value)
        for column, name in PER_CASE.items():
            values = cases[column].to_numpy(dtype=np.float64) if column in cases else np.array([])
            mean, low, high = mean_interval(values, n_resamples, level, seed)
            row.update({name: mean, f"{name}_low": low, f"{name}_high": high})
        rows.append(row)
        if baselines:
            rows += _baseline_rows(row, metrics.get("baselines"))
    return pd.DataFrame(rows)


def _baseline_rows(method_row: Mapping[str, Any], measured: Any) -> list[dict[str, Any]]:
    """Rows of the baselines measured beside an evaluation, as computed (NaN where a metric was not measured)."""
    if not isinstance(measured, Mapping):
        return []
    rows = []
    for name, values in measured.items():
        if not isinstance(values, Mapping):
            continue
        row: dict[str, Any] = {"label": f"{method_row['label']} [{name} baseline]", "method": f"{name} baseline",
                               "num_cases": int(values.get("num_cases", method_row["num_cases"]))}
        for key in ("image_auroc", *POOLED):
            value = values.get(key)
            row[key] = np.nan if value is None else float(value)
        row.update(image_auroc_low=np.nan, image_auroc_high=np.nan)
        for name_out in PER_CASE.values():
            row.update({name_out: np.nan, f"{name_out}_low": np.nan, f"{name_out}_high": np.nan})
        rows.append(row)
    return rows


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row[key]
    if value is None or not np.isfinite(value):
        return "–"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    if low is None or not np.isfinite(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def to_markdown(table, level: float = 0.95) -> str:
    """The table as Markdown, the format of docs/results.md: ``mean [low, high]`` for the bootstrapped columns."""
    columns = ["image_auroc", *POOLED, *PER_CASE.values()]
    header = ["evaluation", "method", "cases", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [row["label"], row["method"], str(row["num_cases"]), *(_cell(row, c) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Brackets: {level:.0%} percentile-bootstrap interval over cases (image AUROC stratified by label); "
                 "pooled pixel metrics as computed over all cases.")
    return "\n".join(lines)
