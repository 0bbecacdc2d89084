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


def test_inference_overhead_counts_the_encoder_passes_of_the_feature_score():
    """ddpm_kl's feature score runs the UNet's encoder on x and on each x̂_0, outside the network's forward: those
    passes are network work, so the replay that the overhead divides by must include them."""
    import torch

    from medad.diffusion import make_diffusion
    from medad.engine.profiling import _Recorder
    from medad.inferers import KLScoringInferer
    from medad.networks import AnomalyUNet

    torch.manual_seed(0)
    unet = AnomalyUNet(2, 3, 3, channels=(8, 16), num_res_blocks=1, attention_levels=(False, False),
                       num_head_channels=8, learned_variance=True).eval()
    inferer = KLScoringInferer(make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid"), (400, 20, 200))
    recorder = _Recorder(unet, methods=("encoder_features",))
    recorder.recording = True
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = inferer(images, recorder)
    assert len(recorder.calls) == 3  # one forward per noise scale
    assert [name for name, _ in recorder.method_calls] == ["encoder_features"] * 4  # x, then x̂_0 at each scale
    name, args = recorder.method_calls[0]
    replayed = getattr(unet, name).original(*args)  # the replay calls the unpatched method with the same inputs
    assert all(torch.equal(a, b) for a, b in zip(replayed, unet.encoder_features(*args)))
    assert torch.isfinite(out["anomaly_map"]).all()


def test_inference_overhead_alone_of_an_untrained_network(tmp_path: Path):
    from medad.engine.profiling import inference_overhead

    row = inference_overhead(REPO / "bundles" / "fair", tmp_path, repeats=1,
                             overrides={"image_size": 32, "widths": (8, 16)})
    assert row["bundle"] == "fair" and row["parameters"] > 0
    assert row["network_evaluations"] == row["inference_batch"][0] > 0  # FAIR: one restoration per image
    assert 0.5 < row["inference_overhead"] < 20.0 and row["network_seconds"] > 0


def test_network_step_seconds_times_real_optimiser_steps():
    import torch

    from medad.engine.profiling import network_step_seconds
    from medad.networks import AnomalyUNet

    torch.manual_seed(0)
    unet = AnomalyUNet(2, 1, 1, channels=(8, 16), num_res_blocks=1, attention_levels=(False, False), num_head_channels=8)
    before = [p.detach().clone() for p in unet.parameters()]
    seconds = network_step_seconds(unet, (2, 1, 16, 16), num_timesteps=10, repeats=2)
    assert 0 < seconds < 60
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))  # the steps did update the weights
    with pytest.raises(ValueError, match="repeats"):
        network_step_seconds(unet, (2, 1, 16, 16), repeats=0)


def test_step_cost_of_the_shipped_mri_networks():
    """``benchmark.py --step_cost``: the shipped weights load into their bundles' configs and train at the batch
    shapes the table states (the paper-scale networks are only timed by hand: minutes per step)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("medad_benchmark_script", REPO / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.step_cost(["disyre", "addm"], repeats=1, scales=("shipped",))
    assert [(r["bundle"], r["scale"]) for r in rows] == [("disyre", "shipped"), ("addm", "shipped")]
    # the shipped models' sizes as the results table gives them (docs/results.md 1.3)
    assert [round(r["parameters"] / 1e6, 2) for r in rows] == [1.02, 0.69]
    assert all(r["seconds_per_step"] > 0 and r["days_per_100k_steps"] == pytest.approx(r["seconds_per_step"] * 1e5 / 86400)
               for r in rows)
