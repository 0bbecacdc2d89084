"""`medad cohort summarize` on run and evaluation folders (medad.engine.cohort)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medad.cli import main
from medad.engine.cohort import summarize


def _evaluation(folder: Path, bundle: str, labels: list[int], ap: list[float]) -> Path:
    eval_dir = folder / "eval"
    eval_dir.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"bundle": bundle}))
    (eval_dir / "metrics.json").write_text(json.dumps({"num_cases": len(labels), "pixel_auroc": 0.9, "aupro": 0.8,
                                                       "pixel_ap": 0.5, "best_dice": None}))
    scores = [float(i) for i in range(len(labels))]
    pd.DataFrame({"case_id": [f"c{i}" for i in range(len(labels))], "image_score": scores, "label": labels,
                  "ap": ap, "best_dice": ap, "dice": ap}).to_csv(eval_dir / "cases.csv", index=False)
    return folder


def test_summarize_reads_run_and_evaluation_folders(tmp_path: Path, capsys):
    first = _evaluation(tmp_path / "fair_run", "fair", [0, 0, 1, 1], [np.nan, np.nan, 0.6, 0.6])
    second = _evaluation(tmp_path / "zscore_run", "zscore", [1, 1, 1], [0.2, 0.4, 0.6])
    table = summarize([first, ("z", second / "eval")], n_resamples=200)
    assert table["label"].tolist() == ["fair_run/eval", "z"] and table["method"].tolist() == ["fair", "zscore"]
    assert table.loc[0, "image_auroc"] == 1.0 and np.isnan(table.loc[1, "image_auroc"])  # one class only
    assert table.loc[0, "case_ap"] == 0.6 and table.loc[0, "case_ap_low"] == 0.6  # NaN cases dropped
    assert table.loc[1, "case_ap"] == pytest.approx(0.4) and np.isnan(table.loc[0, "best_dice"])
    assert main(["cohort", "summarize", str(first), f"z={second}", "--output", str(tmp_path / "t")]) == 0
    markdown = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert "| z | zscore | 3 | – | 0.900 | 0.800 | 0.500 | – | 0.400 [" in markdown
    assert pd.read_csv(tmp_path / "t.csv").shape[0] == 2
    assert main(["cohort", "summarize", str(tmp_path / "none")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_summarize_adds_the_baselines_an_evaluation_measured(tmp_path: Path):
    run = _evaluation(tmp_path / "fair_run", "fair", [0, 0, 1, 1], [np.nan, np.nan, 0.6, 0.6])
    path = run / "eval" / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    metrics["baselines"] = {"zscore": {"num_cases": 4, "image_auroc": 0.75, "pixel_auroc": 0.95, "aupro": 0.9,
                                       "pixel_ap": 0.6, "best_dice": 0.5, "num_normal_images": 6}}
    path.write_text(json.dumps(metrics), encoding="utf-8")
    table = summarize([run], n_resamples=100)
    assert table["label"].tolist() == ["fair_run/eval", "fair_run/eval [zscore baseline]"]
    baseline = table.iloc[1]
    assert baseline["method"] == "zscore baseline" and baseline["num_cases"] == 4
    assert baseline["image_auroc"] == 0.75 and baseline["pixel_ap"] == 0.6 and np.isnan(baseline["case_ap"])
    assert len(summarize([run], n_resamples=100, baselines=False)) == 1
    assert main(["cohort", "summarize", str(run), "--no-baselines", "--output", str(tmp_path / "t")]) == 0
    assert pd.read_csv(tmp_path / "t.csv").shape[0] == 1
    # options before the folders work too
    assert main(["cohort", "summarize", "--no-baselines", "--output", str(tmp_path / "u"), f"r={run}", str(run)]) == 0
    assert pd.read_csv(tmp_path / "u.csv").shape[0] == 2
