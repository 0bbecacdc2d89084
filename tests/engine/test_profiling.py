"""Issue #12: ``scripts/benchmark.py --profile`` measures a bundle's trainer against a bare loop, per part of a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from medad.engine.profiling import PARTS, profile_bundle, profile_table

REPO = Path(__file__).resolve().parents[2]


def test_profile_of_the_disyre_demo_run(tmp_path: Path):
    row = profile_bundle(REPO / "bundles" / "disyre", tmp_path, steps=2, rounds=1, warmup=1, prebuilt=1,
                         inference_repeats=1, overrides={"slices_per_volume": 2, "batch_size": 2})
    assert row["trainer_steps_per_second"] > 0 and row["bare_steps_per_second"] > 0
    assert row["ratio"] == pytest.approx(sum(row["bare_seconds"]) / sum(row["trainer_seconds"]))
    assert set(row["shares"]) == set(PARTS) and sum(row["shares"].values()) == pytest.approx(1.0)
    assert row["shares"]["forward"] > 0 and row["shares"]["backward"] > 0 and row["shares"]["data"] > 0
    assert row["batch"][0] == (4, 1, 32, 32)  # 2 volumes x 2 slices of 32² patches
    # DISYRE's inferer: 5 steps per brain slice, nothing but the network worth counting
    assert row["network_evaluations"] % 5 == 0 and row["network_evaluations"] > 0
    assert 0.5 < row["inference_overhead"] < 2.0
    table = profile_table([row])
    assert table.count("\n") == 2 and "| disyre |" in table
