"""ddpm_kl (seed 001): the KL scoring inferer against closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medad.diffusion import make_diffusion
from medad.inferers import CountingNetwork, KLScoringInferer, feature_distance_map, from_model_range
from medad.networks import AnomalyUNet


class OracleNetwork(torch.nn.Module):
    """Knows x_0: returns the true ε of x_t (plus ``offset``), and v = -1 (the posterior variance) if learned."""

    def __init__(self, diffusion, x0: torch.Tensor, learned: bool, offset: float = 0.0) -> None:
        super().__init__()
        self.diffusion, self.x0, self.learned, self.offset = diffusion, x0, learned, offset

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.diffusion.predict_noise_from_start(x_t, t, self.x0) + self.offset
        return torch.cat([eps, -torch.ones_like(eps)], dim=1) if self.learned else eps


def _images(shape=(2, 2, 8, 8), seed=0) -> torch.Tensor:
    return 0.25 + 0.5 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))  # x0 inside (-0.5, 0.5)


@pytest.mark.parametrize("var_type", ["learned_range", "fixed_small"])
@pytest.mark.parametrize("stride", [1, 4])
def test_kl_map_is_zero_when_the_network_epsilon_is_exact(var_type: str, stride: int):
    diffusion = make_diffusion("linear", 1000, var_type=var_type, loss_type="hybrid" if var_type == "learned_range" else "mse")
    images = _images()
    oracle = OracleNetwork(diffusion, images * 2 - 1, learned=var_type == "learned_range")
    inferer = KLScoringInferer(diffusion, (20, 200, 400), feature_weight=0.0, standardize=None, stride=stride)
    maps = inferer.raw_maps(images, oracle)
    for kl in maps["kl"]:
        assert kl.shape == (2, 1, 8, 8) and kl.abs().max() < 1e-4
    assert inferer(images, oracle)["anomaly_map"].abs().max() < 1e-4


@pytest.mark.parametrize("stride", [1, 4])
def test_kl_of_an_epsilon_offset_matches_the_closed_form(stride: int):
    # ε̂ = ε + δ  =>  x̂_0 − x_0 = −√(1/ᾱ_t − 1)·δ, μ_p − μ_q = coef1·(x̂_0 − x_0); equal variances β̃ give
    # KL = (μ_p − μ_q)² / (2 β̃) nats per channel; the map sums C = 2 channels and is in bits.
    diffusion = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    delta, steps = 0.1, (20, 200, 400)  # KL well above normal_kl's float32 rounding (~1e-7 nats)
    images = _images()
    oracle = OracleNetwork(diffusion, images * 2 - 1, learned=True, offset=delta)
    inferer = KLScoringInferer(diffusion, steps, feature_weight=0.0, standardize=None, stride=stride, clip_denoised=False)
    maps = inferer.raw_maps(images, oracle)
    abar = diffusion.alphas_cumprod
    for t, kl in zip(steps, maps["kl"]):
        abar_t, abar_s = abar[t], abar[t - stride]
        beta = 1 - abar_t / abar_s
        coef1 = math.sqrt(abar_s) * beta / (1 - abar_t)
        variance = beta * (1 - abar_s) / (1 - abar_t)
        expected = 2 * (coef1 * math.sqrt(1 / abar_t - 1) * delta) ** 2 / (2 * variance) / math.log(2)
        assert torch.allclose(kl, torch.full_like(kl, expected), rtol=2e-3), (t, float(kl.mean()), expected)


def test_feature_distance_is_zero_for_identical_images_and_matches_closed_forms():
    images = torch.rand(2, 3, 8, 8)
    two_levels = lambda x: [x, torch.nn.functional.avg_pool2d(x, 2)]  # noqa: E731
    assert feature_distance_map(two_levels, images, images.clone()).abs().max() == 0
    # identity features: channel mean of the squared error
    other = torch.rand(2, 3, 8, 8)
    expected = ((images - other) ** 2).mean(dim=1, keepdim=True)
    assert torch.allclose(feature_distance_map(lambda x: [x], images, other), expected)
    # a constant shift c gives c² at every level, also after the bilinear upsampling of the coarse level
    shifted = feature_distance_map(two_levels, images, images + 0.3)
    assert shifted.shape == (2, 1, 8, 8) and torch.allclose(shifted, torch.full_like(shifted, 0.09), atol=1e-6)


def test_feature_term_vanishes_when_the_restoration_is_the_input():
    diffusion = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    images = _images((2, 3, 8, 8))
    oracle = OracleNetwork(diffusion, images * 2 - 1, learned=True)
    inferer = KLScoringInferer(diffusion, (20, 400), feature_extractor=lambda x: [x, x.mean(dim=1, keepdim=True)], standardize=None)
    out = inferer(images, oracle)
    assert out["feature_map"].abs().max() < 1e-9 and out["anomaly_map"].abs().max() < 1e-4
    assert torch.allclose(out["restoration"], images, atol=1e-5)


def _tiny_unet(channels: int = 3, spatial_dims: int = 2) -> AnomalyUNet:
    torch.manual_seed(0)
    return AnomalyUNet(spatial_dims, channels, channels, channels=(8, 16), num_res_blocks=1, attention_levels=(False, False),
                       num_head_channels=8, learned_variance=True).eval()


def test_shapes_counts_standardisation_and_restoration_of_the_smallest_t():
    diffusion = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    network = CountingNetwork(_tiny_unet())  # the UNet encoder is found through the counting wrapper
    images = torch.rand(2, 3, 16, 16)
    inferer = KLScoringInferer(diffusion, (400, 20, 200), stride=4)
    out = inferer(images, network)
    assert network.calls == 3 and network.items == 6  # one network evaluation per noise scale
    assert out["anomaly_map"].shape == out["kl_map"].shape == out["feature_map"].shape == (2, 1, 16, 16)
    assert out["restoration"].shape == (2, 3, 16, 16) and torch.isfinite(out["anomaly_map"]).all()
    # "image": every scale's map has mean 0 per image, so their average has too; the sum keeps the 1:1 weights
    assert out["kl_map"].mean(dim=(1, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(out["anomaly_map"], out["kl_map"] + out["feature_map"])
    raw = inferer.raw_maps(images, network)  # same seed -> same noise draws
    assert torch.allclose(out["restoration"], from_model_range(raw["pred_x0"][1], (0.0, 1.0)))
    per_image = [(m - m.mean(dim=(1, 2, 3), keepdim=True)) / m.std(dim=(1, 2, 3), keepdim=True) for m in raw["kl"]]
    assert torch.allclose(out["kl_map"], torch.stack(per_image).mean(0), atol=1e-5)


def test_calibrated_standardisation_uses_normal_statistics_per_timestep():
    diffusion = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    network = _tiny_unet()
    normal = [{"image": torch.rand(2, 3, 16, 16)} for _ in range(2)]
    inferer = KLScoringInferer(diffusion, (20, 200), standardize="calibrated")
    with pytest.raises(ValueError, match="calibration_loader"):
        inferer(normal[0]["image"], network)
    stats = inferer.fit_statistics(network, normal)
    raw = [inferer.raw_maps(b["image"], network) for b in normal]
    kl0 = torch.cat([r["kl"][0] for r in raw]).double()
    assert stats["kl"][0][0] == pytest.approx(float(kl0.mean()), rel=1e-6)
    assert stats["kl"][0][1] == pytest.approx(float(kl0.std(unbiased=False)), rel=1e-5)
    test = torch.rand(1, 3, 16, 16)
    r, out = inferer.raw_maps(test, network), inferer(test, network)
    expected = torch.stack([(r["kl"][i] - m) / s for i, (m, s) in enumerate(stats["kl"])]).mean(0)
    assert torch.allclose(out["kl_map"], expected.float(), atol=1e-5)
    # lazily fitted from a calibration loader on the first call
    lazy = KLScoringInferer(diffusion, (20, 200), standardize="calibrated", calibration_loader=normal)
    assert torch.allclose(lazy(test, network)["anomaly_map"], out["anomaly_map"], atol=1e-5)


def test_torchscript_backbone_from_a_local_file(tmp_path: Path):
    class Backbone(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x * 2.0, torch.nn.functional.avg_pool2d(x, 2)]

    path = tmp_path / "backbone.pt"
    torch.jit.script(Backbone()).save(str(path))
    diffusion = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    images = torch.rand(1, 3, 16, 16)
    from_file = KLScoringInferer(diffusion, (20,), feature_extractor_path=str(path), standardize=None)
    direct = KLScoringInferer(diffusion, (20,), feature_extractor=Backbone(), standardize=None)
    network = _tiny_unet()
    assert torch.allclose(from_file(images, network)["feature_map"], direct(images, network)["feature_map"])
    with pytest.raises(FileNotFoundError, match="feature extractor file not found"):
        KLScoringInferer(diffusion, feature_extractor_path=str(tmp_path / "missing.pt"))


def test_rejects_bad_arguments():
    diffusion = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    with pytest.raises(ValueError, match="stride"):
        KLScoringInferer(diffusion, (2, 200), stride=4)
    with pytest.raises(ValueError, match="standardize"):
        KLScoringInferer(diffusion, standardize="global")
    with pytest.raises(ValueError, match="encoder_features"):
        KLScoringInferer(diffusion, (20,))(torch.rand(1, 1, 8, 8), lambda x, t: torch.zeros(1, 2, 8, 8))
