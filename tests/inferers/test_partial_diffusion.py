"""PartialDiffusionInferer: AnoDDPM's simplex noise at every restoration step (ADDM) reaches the diffusion's restore."""

from __future__ import annotations

import pytest
import torch

from medad.diffusion import make_diffusion
from medad.inferers import PartialDiffusionInferer


def lag1_correlation(x: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1])


def test_partial_diffusion_inferer_uses_simplex_step_noise(monkeypatch):
    diffusion = make_diffusion("linear", 1000)
    seen = {}

    def fake_restore(network, x_start, t_start, num_steps, noise_start, generator=None, noise_fn=None, **kwargs):
        seen["noise_fn"] = noise_fn
        return {"restoration": x_start}

    monkeypatch.setattr(diffusion, "restore", fake_restore)
    images = torch.rand(2, 1, 32, 32)
    PartialDiffusionInferer(diffusion, t_start=9, noise="simplex", simplex_kwargs={"frequency": 8})(images, None)
    noise = seen["noise_fn"](torch.zeros(2, 1, 32, 32))
    assert noise.shape == (2, 1, 32, 32) and lag1_correlation(noise) > 0.3  # white noise: ~0
    PartialDiffusionInferer(diffusion, t_start=9, noise="simplex", step_noise="gaussian")(images, None)
    assert seen["noise_fn"] is None
    with pytest.raises(ValueError, match="step_noise"):
        PartialDiffusionInferer(diffusion, t_start=9, step_noise="perlin")


def test_num_samples_averages_the_squared_errors_of_independent_draws():
    diffusion = make_diffusion("linear", 100)
    network = torch.nn.Conv2d(1, 1, 3, padding=1)  # any network: the average is what is tested
    torch.nn.init.normal_(network.weight, std=0.1)
    wrapped = lambda x, t: network(x)  # noqa: E731
    images = torch.rand(2, 1, 16, 16)
    averaged = PartialDiffusionInferer(diffusion, t_start=9, num_steps=3, seed=5, num_samples=3)(images, wrapped)
    # by hand: three restorations with one generator that moves on, their squared errors and restorations averaged
    generator = torch.Generator().manual_seed(5)
    x0 = images * 2 - 1
    draws = [(diffusion.restore(wrapped, x0, 9, 3, noise_start=True, generator=generator)["restoration"] + 1) / 2
             for _ in range(3)]
    expected_map = torch.stack([(images - d).pow(2) for d in draws]).mean(dim=0)
    torch.testing.assert_close(averaged["anomaly_map"], expected_map)
    torch.testing.assert_close(averaged["restoration"], torch.stack(draws).mean(dim=0))
    assert not torch.allclose(draws[0], draws[1])  # the draws differ
    single = PartialDiffusionInferer(diffusion, t_start=9, num_steps=3, seed=5)(images, wrapped)
    torch.testing.assert_close(single["anomaly_map"], (images - draws[0]).pow(2))
    with pytest.raises(ValueError, match="num_samples"):
        PartialDiffusionInferer(diffusion, t_start=9, num_samples=0)
