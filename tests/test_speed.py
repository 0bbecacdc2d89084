"""Issue #12: the fast inference profile keeps the maps it promises, cheaper calibration, the data-loading fix.

Whole-slice inference must equal the patch-wise blend when a slice fits one window, the channels-last /
inference-mode path must not change the maps, sampled calibration must keep the thresholds' meaning (the same
quantile, with its bootstrap interval), thresholds are kept per inference profile, and the training-slice sampler
must draw slices through the brain as ``RandCropByPosNegLabeld`` did.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.networks.blocks.activation import Swish

from medad.engine import AnomalyEvaluator
from medad.engine.checkpoint import load_checkpoint, save_checkpoint
from medad.inferers import SliceAggregationInferer, SlidingWindowAnomalyInferer
from medad.inferers.base import AnomalyInferer
from medad.metrics import threshold_at_fpr
from medad.metrics.bootstrap import threshold_interval
from medad.networks import AnomalyUNet
from medad.scores import pooled_max_score, sampled_image_score, topk_mean_score
from medad.transforms.slices import RandBrainSlicesd


def tiny_unet(**kwargs) -> AnomalyUNet:
    torch.manual_seed(0)
    net = AnomalyUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), num_res_blocks=1,
                      attention_levels=(False, False), norm_num_groups=8, with_timestep=False, **kwargs)
    for p in net.parameters():  # a non-trivial function (the output layer starts at zero)
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


class ResidualInferer(AnomalyInferer):
    """|x - net(x)| and net(x): a deterministic restoration inferer."""

    def __call__(self, inputs, network, *args, **kwargs):
        restoration = network(inputs)
        return {"anomaly_map": (inputs - restoration).abs().mean(dim=1, keepdim=True), "restoration": restoration}


class InputMapInferer(AnomalyInferer):
    """The input itself as anomaly map (no network): calibration values are known exactly."""

    def __call__(self, inputs, network, *args, **kwargs):
        return {"anomaly_map": inputs[:, :1].clone(), "restoration": inputs.clone()}


def test_swish_runs_as_one_silu_kernel_with_the_same_values():
    net = tiny_unet()
    assert any(isinstance(m, torch.nn.SiLU) for m in net.modules())
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        fused = net(x)
        for module in list(net.modules()):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.SiLU):
                    setattr(module, name, Swish())
        torch.testing.assert_close(net(x), fused, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_whole_image_equals_the_one_window_blend(normalize: bool):
    net = tiny_unet()
    x = torch.rand(3, 1, 24, 28)
    fg = (torch.rand(3, 1, 24, 28) > 0.3).float()
    kwargs = dict(roi_size=(32, 32), normalize_foreground_weight=normalize, foreground_weighting=True)
    windows = SlidingWindowAnomalyInferer(ResidualInferer(), **kwargs)
    whole = SlidingWindowAnomalyInferer(ResidualInferer(), whole_image=True, **kwargs)
    with torch.no_grad():
        expected, got = windows(x, net, foreground=fg), whole(x, net, foreground=fg)
    torch.testing.assert_close(got["anomaly_map"], expected["anomaly_map"], atol=1e-6, rtol=1e-5)
    if normalize:
        torch.testing.assert_close(got["restoration"], expected["restoration"], atol=1e-6, rtol=1e-5)


def test_channels_last_and_inference_mode_keep_the_maps():
    net = tiny_unet()
    volume = torch.rand(1, 1, 20, 18, 6)
    volume[..., 0] = 0  # an empty slice is skipped either way
    plain = SliceAggregationInferer(SlidingWindowAnomalyInferer(ResidualInferer(), roi_size=(24, 24)), size_divisor=2)
    fast = SliceAggregationInferer(SlidingWindowAnomalyInferer(ResidualInferer(), roi_size=(24, 24), whole_image=True),
                        size_divisor=2, channels_last=True, inference_mode=True, slice_batch_size=64)
    expected = plain(volume, net)
    got = fast(volume, net)
    torch.testing.assert_close(got["anomaly_map"], expected["anomaly_map"], atol=1e-5, rtol=1e-4)
    assert net.conv_out.weight.is_contiguous(memory_format=torch.channels_last)


def test_sampled_image_score_estimates_a_top_k_mean_and_says_what_a_maximum_does():
    score, text = sampled_image_score(functools.partial(topk_mean_score, k=100), 0.25)
    assert score.keywords["k"] == 25 and "top-25" in text
    pooled, text = sampled_image_score(pooled_max_score, 0.5, width=100)
    assert pooled.keywords["kernel_size"] == 4 and "biased low" in text
    same, text = sampled_image_score(torch.amax, 0.5)
    assert same is torch.amax and "biased low" in text
    with pytest.raises(ValueError, match="fraction"):
        sampled_image_score(pooled_max_score, 0.0)


def test_threshold_interval_is_reproducible_and_narrows_with_more_clusters():
    rng = np.random.default_rng(0)
    few = [rng.normal(size=200) for _ in range(5)]
    many = [rng.normal(size=200) for _ in range(80)]
    se_few, low_few, high_few = threshold_interval(few, 0.05, n_resamples=100)
    assert (se_few, low_few, high_few) == threshold_interval(few, 0.05, n_resamples=100)
    se_many, low_many, high_many = threshold_interval(many, 0.05, n_resamples=100)
    assert low_many <= threshold_at_fpr(np.concatenate(many), 0.05) <= high_many
    assert 0 < se_many < se_few and high_many - low_many < high_few - low_few


def _volumes(count: int = 3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        image = rng.random((1, 12, 10, 16)).astype(np.float32)
        brain = np.zeros((1, 12, 10, 16), np.float32)
        brain[:, 2:10, 2:8, 3:14] = 1
        items.append({"image": torch.from_numpy(image * brain), "brain_mask": torch.from_numpy(brain),
                      "case_id": f"v{i}"})
    return items


def _evaluator(tmp_path: Path, checkpoint: Path | None, profile: str = "paper", slices: int | None = None,
               loader=True) -> AnomalyEvaluator:
    data = DataLoader(Dataset(_volumes()), batch_size=1)
    return AnomalyEvaluator(
        network=torch.nn.Conv2d(1, 1, 1), inferer=SliceAggregationInferer(InputMapInferer(), size_divisor=1),
        test_loader=[], output_dir=tmp_path / "eval", image_score=functools.partial(topk_mean_score, k=40),
        checkpoint_path=checkpoint, bundle="toy", calibration_loader=data if loader else None,
        region_key="brain_mask", foreground_key="brain_mask", inference_profile=profile,
        calibration_slices=slices, calibration_bootstrap=50, progress=False,
    )


def test_sampled_calibration_keeps_the_threshold_meaning_and_states_its_error(tmp_path: Path):
    full = _evaluator(tmp_path, None).calibrate()
    sampled_evaluator = _evaluator(tmp_path, None, slices=4)
    sampled = sampled_evaluator.calibrate()
    # the sampled pixel values are exactly those of 4 equally spaced brain slices (3, 6, 10, 13) of each volume
    values = np.concatenate([v["image"][0][v["brain_mask"][0] > 0].numpy().reshape(8, 6, 11)[..., [0, 3, 7, 10]].ravel()
                             for v in _volumes()])
    assert sampled["pixel_threshold"] == pytest.approx(threshold_at_fpr(values, 0.01))
    assert sampled["normal_map_mean"] == pytest.approx(values.mean(), rel=1e-5)
    low, high = full["pixel_threshold_ci95"]
    assert abs(sampled["pixel_threshold"] - full["pixel_threshold"]) < 3 * sampled["pixel_threshold_se"]
    assert low <= full["pixel_threshold"] <= high and full["pixel_threshold_se"] > 0
    assert sampled["calibration_slices"] == 4 and "top-" in sampled["image_score_estimate"]
    assert sampled["calibration_region_share"] == pytest.approx(4 / 11)
    assert sampled["calibration_seconds"] > 0 and "slices" in sampled["pixel_threshold_bootstrap"]


def test_each_inference_profile_keeps_its_own_thresholds(tmp_path: Path, caplog):
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, {"bundle": "toy", "network": torch.nn.Conv2d(1, 1, 1).state_dict(),
                                 "calibration": {"image_threshold": 1.0, "pixel_threshold": 2.0}})
    fast = _evaluator(tmp_path, checkpoint, profile="fast")
    fast.load()
    assert fast.calibration is None  # the paper thresholds do not hold for other maps
    made = fast.calibrate()
    state = load_checkpoint(checkpoint)
    assert state["calibration"] == {"image_threshold": 1.0, "pixel_threshold": 2.0}
    assert state["calibrations"]["fast"]["pixel_threshold"] == made["pixel_threshold"]
    assert made["inference_profile"] == "fast"
    again = _evaluator(tmp_path, checkpoint, profile="fast", loader=False)
    again.load()
    assert again.calibrate()["pixel_threshold"] == made["pixel_threshold"]
    paper = _evaluator(tmp_path, checkpoint, loader=False)
    paper.load()
    assert paper.calibrate()["pixel_threshold"] == 2.0
    other = _evaluator(tmp_path, checkpoint, profile="tiny", loader=False)
    other.load()
    with caplog.at_level(logging.WARNING, logger="medad.evaluate"):
        assert other.calibrate() is None
    assert "no thresholds calibrated for inference profile 'tiny'" in caplog.text


def test_brain_slices_are_drawn_through_the_brain_patched_and_padded():
    volume = torch.arange(6, dtype=torch.float32).reshape(1, 1, 1, 6).expand(1, 9, 7, 6).clone()
    brain = torch.zeros(1, 9, 7, 6)
    brain[..., 2] = 1
    brain[0, :3, :3, 4] = 1  # slice 4 holds 9 brain voxels, slice 2 holds 63
    sampler = RandBrainSlicesd(["image", "brain_mask"], "brain_mask", num_samples=400, patch_size=(5, 8),
                               size_divisor=4)
    sampler.set_random_state(0)
    samples = sampler({"image": volume, "brain_mask": brain, "case_id": "x", "mask": brain})
    assert len(samples) == 400 and set(samples[0]) == {"image", "brain_mask"}
    assert all(s["image"].shape == (1, 8, 8) for s in samples)  # 9x7 -> pad 7 to 8 -> crop 5x8 -> pad to 8x8
    drawn = np.array([int(s["image"].max()) for s in samples])
    assert set(drawn) == {2, 4} and 0.8 < (drawn == 2).mean() < 0.95  # 63 / 72 = 0.875
    again = RandBrainSlicesd(["image", "brain_mask"], "brain_mask", num_samples=400, patch_size=(5, 8), size_divisor=4)
    again.set_random_state(0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(samples, again({"image": volume, "brain_mask": brain})))
