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
