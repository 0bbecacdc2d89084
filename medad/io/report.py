"""One self-contained HTML report per evaluation (``<output_dir>/report.html``).

A cohort evaluation leaves hundreds of files; the report is the one place to look: the run's bundle, data and
settings (``run.json``), the pooled metrics with the baselines' beside them (measured in the same run on the same
test cases, ``metrics.json`` ``baselines``; a sentence for every metric on which a baseline is higher), what the
calibrated thresholds mean, the ROC / PR and learning curves, the per-case table (click a column header to sort), and the overlays the evaluator drew (worst and best
cases of every defect type first). Images are embedded as base64 PNG, the sorting script is inline: the file opens
offline in any browser and can be mailed as it is. Numbers are printed from ``metrics.json`` and the case table, so
the report never disagrees with them.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medad.io.atomic import atomic_write

__all__ = ["write_report", "REPORT_FILE", "METRIC_LABELS", "COMPARED", "BASELINE_LABELS"]

REPORT_FILE = "report.html"

#: metrics.json key -> what the report calls it (and the order it shows them in)
METRIC_LABELS: dict[str, str] = {
    "num_cases": "cases",
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO (FPR ≤ 0.3)",
    "pixel_ap": "pixel average precision",
    "best_dice": "best-possible Dice (oracle threshold)",
    "best_dice_threshold": "its threshold",
    "dice": "Dice at the calibrated threshold",
    "iou": "IoU at the calibrated threshold",
    "precision": "precision at the calibrated threshold",
    "recall": "recall at the calibrated threshold",
    "image_decision_accuracy": "image decisions: accuracy",
    "image_decision_fpr": "image decisions: false-positive rate",
    "image_decision_tpr": "image decisions: true-positive rate",
    "border_top_share_normal": "normal maps: share of top 1 % at the border",
    "border_area_share": "border band's share of the area",
    "images_per_second": "images (volumes) per second",
    "network_evaluations_per_image": "network evaluations per image",
}

#: metrics on which the method and the baselines are compared (higher is better for each)
COMPARED = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "best_dice")
#: what the report calls the baselines of ``metrics.json`` (:mod:`medad.engine.comparison`)
BASELINE_LABELS = {"zscore": "z-score baseline", "intensity": "intensity baseline"}
#: how each baseline makes its map, for the note below the table
_BASELINE_HOW = {
    "zscore": "a per-pixel (per-voxel) Gaussian fitted on {fit}; its map is |z| (largest over channels)",
    "intensity": ("the image itself, z-scored within its nonzero (brain) voxels, bright deviations only "
                  "(Meissen et al. 2021); nothing is fitted"),
}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:0.9em} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4;cursor:pointer} td.text,th.text{text-align:left}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top} figcaption{font-size:0.85em;color:#555}
img{max-width:100%} .note{color:#555;font-size:0.9em} td.higher{font-weight:bold}
"""

_SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
 var table=th.closest('table'),body=table.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
 var asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
 var rows=Array.prototype.slice.call(body.rows);rows.sort(function(a,b){
  var x=a.cells[i].dataset.v||a.cells[i].textContent,y=b.cells[i].dataset.v||b.cells[i].textContent;
  var nx=parseFloat(x),ny=parseFloat(y);var c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;
  return asc?c:-c;});rows.forEach(function(r){body.appendChild(r);});});});
"""


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1000 or abs(value) < 0.001 else f"{value:.3f}"
    return html.escape(str(value))


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _baselines(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    measured = metrics.get("baselines")
    if not isinstance(measured, Mapping):
        return {}
    return {str(name): values for name, values in measured.items() if isinstance(values, Mapping)}


def _baseline_label(name: str) -> str:
    return BASELINE_LABELS.get(name, f"{name} baseline")


def _higher(baseline: Any, method: Any) -> bool:
    """The baseline's value is higher than the method's, as the report prints them (a tie in print is no loss)."""
    finite = [isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (baseline, method)]
    return all(finite) and baseline > method and _number(baseline) != _number(method)


def _metrics_table(metrics: Mapping[str, Any], method: str = "this run") -> str:
    """The method's metrics (cells ``data-key="<metric>"``) and a column per baseline
    (``data-key="baselines.<name>.<metric>"``, bold where it is higher than the method)."""
    baselines = _baselines(metrics)
    head = (f'<tr><th class="text">metric</th><th>{html.escape(method)}</th>'
            + "".join(f"<th>{html.escape(_baseline_label(name))}</th>" for name in baselines) + "</tr>")
    rows = []
    for key, label in METRIC_LABELS.items():
        if key not in metrics and not any(key in values for values in baselines.values()):
            continue
        cells = [f'<td class="text">{html.escape(label)}</td>',
                 f'<td data-key="{key}">{_number(metrics[key])}</td>' if key in metrics else "<td>–</td>"]
        for name, values in baselines.items():
            if key not in values:
                cells.append("<td>–</td>")
                continue
            higher = key in COMPARED and _higher(values[key], metrics.get(key))
            css = ' class="higher"' if higher else ""
            cells.append(f'<td{css} data-key="baselines.{html.escape(name)}.{key}">{_number(values[key])}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _verdicts(metrics: Mapping[str, Any]) -> str:
    """One sentence per metric on which a baseline is higher than the method; the comparison's fitting note."""
    baselines = _baselines(metrics)
    note = metrics.get("baselines_note")
    if not baselines:
        text = note if isinstance(note, str) and note else "No baselines were measured in this evaluation."
        return f'<p class="note">{html.escape(text)}</p>'
    losses = []
    for key in COMPARED:
        for name, values in baselines.items():
            if _higher(values.get(key), metrics.get(key)):
                label = METRIC_LABELS[key]
                losses.append(f"<li>The {html.escape(_baseline_label(name))} is higher on {html.escape(label)}: "
                              f"{_number(values[key])} vs {_number(metrics[key])} for this run.</li>")
    compared = [METRIC_LABELS[k] for k in COMPARED if k in metrics and any(k in v for v in baselines.values())]
    if losses:
        verdict = '<ul class="verdict">' + "".join(losses) + "</ul>"
    elif compared:
        verdict = (f"<p>This run is at least as high as every baseline on {html.escape(', '.join(compared))}.</p>")
    else:
        verdict = ""
    how = []
    for name, values in baselines.items():
        count = values.get("num_normal_images")
        fit = (f"the {_number(count)} held-out normal images of the calibration set (not the training set, so with few "
               "images it is weaker than the zscore bundle's fit)")
        text = _BASELINE_HOW.get(name, "see medad.engine.comparison").format(fit=fit)
        topk = values.get("image_score_topk")
        score = f"; image score: the mean of the {_number(topk)} largest map values" if topk is not None else ""
        how.append(f"the {html.escape(_baseline_label(name))} is {html.escape(text)}{html.escape(score)}.")
    cases = next(iter(baselines.values())).get("num_cases")
    fitted = (f'<p class="note">Baselines were measured in this run on the same {_number(cases)} test cases and the '
              "same pixels as the method, with the same metric code; " + " ".join(how)
              + " They have no calibrated threshold, so the threshold-based metrics are the method's only.")
    if isinstance(note, str) and note:
        fitted += " " + html.escape(note)
    return verdict + fitted + "</p>"


def _calibration(metrics: Mapping[str, Any]) -> str:
    calibration = metrics.get("calibration")
    if not isinstance(calibration, Mapping):
        return '<p class="note">No calibration: decisions and thresholded segmentations were not made.</p>'
    image_fpr, pixel_fpr = calibration.get("image_fpr"), calibration.get("pixel_fpr")
    count = calibration.get("num_calibration_cases")
    return (
        f"<p>Thresholds were calibrated on {_number(count)} held-out <b>normal</b> cases only: the image threshold "
        f"{_number(calibration.get('image_threshold'))} is exceeded by {_number(image_fpr)} of normal images "
        f"(a case at or above it is reported anomalous), the pixel threshold "
        f"{_number(calibration.get('pixel_threshold'))} by {_number(pixel_fpr)} of normal pixels (it draws the "
        "segmentations). No test label was used to choose them; the best-possible Dice above uses an oracle "
        "threshold and is an upper bound.</p>"
    )


def _settings(record: Mapping[str, Any] | None) -> str:
    if not record:
        return '<p class="note">No run.json beside this evaluation.</p>'
    rows = []
    for section in ("data", "trained_on", "settings"):
        for key, value in (record.get(section) or {}).items():
            rows.append(f'<tr><td class="text">{section}</td><td class="text">{html.escape(key)}</td>'
                        f'<td class="text">{html.escape(json.dumps(value))}</td></tr>')
    network = record.get("network") or {}
    if network:
        rows.append('<tr><td class="text">network</td><td class="text">constructor</td><td class="text">'
                    f"{html.escape(json.dumps(network))}</td></tr>")
    return ('<table><tr><th class="text">section</th><th class="text">key</th><th class="text">value</th></tr>'
            + "".join(rows) + "</table>")


def _case_table(records: Sequence[Mapping[str, Any]]) -> str:
    if not records:
        return "<p>No cases.</p>"
    columns = [c for c in records[0] if c not in ("voxel_spacing",)]
    head = "".join(f'<th class="{"text" if c in ("case_id", "defect_type") else ""}">{html.escape(c)}</th>'
                   for c in columns)
    body = []
    for record in records:
        cells = []
        for column in columns:
            value = record.get(column)
            sort_value = "" if not isinstance(value, (int, float)) or isinstance(value, bool) else f' data-v="{value}"'
            css = ' class="text"' if column in ("case_id", "defect_type") else ""
            cells.append(f"<td{css}{sort_value}>{_number(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _ordered_overlays(overlays: Path, records: Sequence[Mapping[str, Any]]) -> list[tuple[Path, str]]:
    """The drawn overlays, grouped by defect type, highest image score first within each type."""
    by_id = {str(r.get("case_id")): r for r in records}
    found = []
    for path in sorted(overlays.glob("*.png")) if overlays.is_dir() else []:
        record = by_id.get(path.stem, {})
        score = record.get("image_score")
        score = float(score) if isinstance(score, (int, float)) else float("nan")
        group = str(record.get("defect_type") or "")
        caption = f"{path.stem} ({group}) score {_number(score)}"
        if record.get("decision") is not None:
            caption += ", decision: " + ("anomalous" if record["decision"] else "normal")
        found.append((group, -score if math.isfinite(score) else math.inf, path, caption))
    return [(path, caption) for _, _, path, caption in sorted(found, key=lambda item: item[:2])]


def write_report(
    output_dir: str | Path,
    metrics: Mapping[str, Any],
    cases: Sequence[Mapping[str, Any]],
    run_record: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``<output_dir>/report.html`` (atomically) and return its path.

    Args:
        output_dir: the evaluation folder (its ``image_roc.png`` / ``image_pr.png`` / ``learning_curve.png`` and
            ``overlays/*.png`` are embedded when present).
        metrics: the content of ``metrics.json``.
        cases: the case-table records (``cases.csv`` rows), in table order.
        run_record: the run's ``run.json`` (bundle, data, settings, network), if any.
        title: page title (default: the bundle and the folder).
    """
    output_dir = Path(output_dir)
    bundle = (run_record or {}).get("bundle", "")
    title = title or f"medad {bundle} — {output_dir.parent.name}/{output_dir.name}"
    curves = [(output_dir / name, caption) for name, caption in (
        ("image_roc.png", "image-level ROC curve"), ("image_pr.png", "image-level precision-recall curve"),
        ("learning_curve.png", "learning curve: restoration error vs doing nothing"))
        if (output_dir / name).is_file()]
    overlays = _ordered_overlays(output_dir / "overlays", cases)
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Written {datetime.datetime.now().isoformat(timespec="seconds")} from '
        f"{html.escape(str(output_dir))}; the numbers are those of metrics.json and cases.csv beside this file. "
        "Compare runs with <code>medad cohort summarize</code>.</p>",
        "<h2>Metrics</h2>", _metrics_table(metrics, f"{bundle} (this run)" if bundle else "this run"),
        _verdicts(metrics),
        "<h2>Calibration</h2>", _calibration(metrics),
        "<h2>Run</h2>", _settings(run_record),
    ]
    if curves:
        parts += ["<h2>Curves</h2>", *(_image(path, caption) for path, caption in curves)]
    if overlays:
        parts += ["<h2>Overlays</h2>", '<p class="note">image | restoration | anomaly map | ground truth; per '
                  "defect type, highest score first.</p>", *(_image(path, caption) for path, caption in overlays)]
    parts += ["<h2>Cases</h2>", '<p class="note">Click a column header to sort.</p>', _case_table(cases),
              f"<script>{_SORT_SCRIPT}</script></body></html>"]
    path = output_dir / REPORT_FILE
    with atomic_write(path, "w") as out:
        out.write("\n".join(parts))
    return path
