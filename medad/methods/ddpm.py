"""The DDPM training step (Ho et al. 2020; improved-DDPM's hybrid loss): the plain diffusion objective.

Every training step is ``step(network, batch) -> {"loss": scalar, ...}`` and lives in :mod:`medad.methods`; this one
trains ddpm_partial and ddpm_kl and is the base of ADDM's adversarial step (:mod:`medad.methods.addm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from medad.diffusion import GaussianDiffusion
from medad.inferers.base import to_model_range

__all__ = ["DiffusionStep"]


class DiffusionStep(nn.Module):
    """DDPM objective on normal images: sample t and noise, ``diffusion.training_losses``.

    Args:
        diffusion: the shared :class:`~medad.diffusion.GaussianDiffusion` (its loss type chooses MSE / L1 / hybrid).
        data_range: range of the loaders' images, mapped to [-1, 1].
        noise: ``"gaussian"`` or ``"simplex"`` (AnoDDPM trains on simplex noise to detect with it).
        simplex_kwargs: arguments of :func:`medad.corruptions.simplex_noise`.
        image_key: batch key of the images.
        max_timestep: train on t uniform in [0, ``max_timestep``) instead of [0, T). Partial-diffusion detection
            (AnoDDPM, ddpm_partial) never runs the chain above its noise level, so this spends every training step
            on the timesteps that detection uses; ``None`` (default) is the full DDPM range.
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        data_range: tuple[float, float] = (0.0, 1.0),
        noise: str = "gaussian",
        simplex_kwargs: dict[str, Any] | None = None,
        image_key: str = "image",
        max_timestep: int | None = None,
    ) -> None:
        super().__init__()
        if noise not in ("gaussian", "simplex"):
            raise ValueError(f"noise must be 'gaussian' or 'simplex', got {noise!r}.")
        self.diffusion = diffusion
        self.data_range = tuple(data_range)
        self.noise = noise
        self.simplex_kwargs = dict(simplex_kwargs or {})
        self.image_key = image_key
        self.max_timestep = max_timestep
        if max_timestep is not None:
            # validates the range now rather than mid-training (its own generator: the global RNG stays untouched)
            diffusion.sample_timesteps(1, generator=torch.Generator().manual_seed(0), max_timestep=max_timestep)

    def sample_noise(self, x0: torch.Tensor) -> torch.Tensor:
        if self.noise == "gaussian":
            return torch.randn_like(x0)
        from medad.corruptions import simplex_noise

        return simplex_noise(tuple(x0.shape), device=x0.device, dtype=x0.dtype, **self.simplex_kwargs)

    def losses(self, network: Callable[..., torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The per-sample terms of ``training_losses`` plus the step's ``x0`` (model range) and ``t`` (for steps that
        add to them, e.g. ADDM's adversary)."""
        x0 = to_model_range(batch[self.image_key], self.data_range)
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device, max_timestep=self.max_timestep)
        terms = self.diffusion.training_losses(network, x0, t, noise=self.sample_noise(x0))
        return {**terms, "x0": x0, "t": t}

    def forward(self, network: Callable[..., torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        terms = self.losses(network, batch)
        out = {"loss": terms["loss"].mean(), "mse": terms["mse"].mean()}
        if "vb" in terms:
            out["vb"] = terms["vb"].mean()
        return out
