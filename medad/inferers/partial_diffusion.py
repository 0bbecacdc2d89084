"""Restoration by partial diffusion: seed 000 ("diffusion" / "no diffusion") and the AnoDDPM protocol (seed 004)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from medad.diffusion import GaussianDiffusion
from medad.scores import squared_error_map

from .base import AnomalyInferer, from_model_range, to_model_range

__all__ = ["PartialDiffusionInferer"]


class PartialDiffusionInferer(AnomalyInferer):
    """Noise (or not) to ``t_start``, take ``num_steps`` strided reverse steps, compare with the input.

    Args:
        diffusion: the shared :class:`~medad.diffusion.GaussianDiffusion` the network was trained with.
        t_start: first timestep (0-based). Seed 000's k reverse steps from x_k: ``t_start = k - 1``.
            AnoDDPM: 200-250 (of 1000); the ADDM bundle's MRI default is 25 (chosen on validation heads).
        num_steps: network evaluations (strided steps), default ``t_start + 1`` (every step).
        noise_start: True: x_t ~ q(x_t | x_0) (seed 000 "diffusion", AnoDDPM); False: the test image itself is x_t
            (seed 000 "no diffusion").
        noise: ``"gaussian"`` or ``"simplex"`` (AnoDDPM; the network must have been trained with simplex noise).
        step_noise: noise of every reverse step, ``"gaussian"`` or ``"simplex"``; None follows ``noise`` (AnoDDPM's
            ``sample_p`` draws the step noise with the same noise function it starts with).
        simplex_kwargs: octaves / persistence / frequency of :func:`medad.corruptions.simplex_noise`.
        data_range: range of the input images, mapped to the models' [-1, 1].
        seed: seed of the noise draws, for repeatable maps (None: global RNG).
        max_training_timestep: the network's training drew t below this only (the bundle key of that name);
            a ``t_start`` at or above it raises ValueError. None: trained on all T timesteps.
        num_samples: restorations from independent noise draws; the map is the mean of their squared errors (a
            Monte Carlo estimate of E[(x − x̂0)²], less noisy than one draw), the restoration their mean. 1: one draw
            (AnoDDPM). Costs ``num_samples`` times the network evaluations.
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        t_start: int,
        num_steps: int | None = None,
        noise_start: bool = True,
        noise: str = "gaussian",
        step_noise: str | None = None,
        simplex_kwargs: dict[str, Any] | None = None,
        data_range: tuple[float, float] = (0.0, 1.0),
        seed: int | None = 0,
        max_training_timestep: int | None = None,
        num_samples: int = 1,
    ) -> None:
        super().__init__()
        if noise not in ("gaussian", "simplex"):
            raise ValueError(f"noise must be 'gaussian' or 'simplex', got {noise!r}.")
        step_noise = noise if step_noise is None else step_noise
        if step_noise not in ("gaussian", "simplex"):
            raise ValueError(f"step_noise must be 'gaussian' or 'simplex', got {step_noise!r}.")
        self.diffusion = diffusion
        self.t_start = int(t_start)
        self.num_steps = int(num_steps) if num_steps is not None else self.t_start + 1
        diffusion.timesteps_for_restoration(self.t_start, self.num_steps)  # validate early
        diffusion.check_trained_range(self.t_start, max_training_timestep)
        self.noise_start = noise_start
        self.noise = noise
        self.step_noise = step_noise
        self.simplex_kwargs = dict(simplex_kwargs or {})
        self.data_range = tuple(data_range)
        self.seed = seed
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.num_samples = int(num_samples)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """(B, C, *spatial) images -> ``anomaly_map`` (B, 1, *spatial), ``restoration`` (B, C, *spatial)."""
        x0 = to_model_range(inputs, self.data_range)
        generator = self._generator(inputs.device)
        # simplex_noise draws its permutation and offsets on the CPU, so it needs a CPU generator even on a GPU
        simplex_generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)

        def simplex(x: torch.Tensor) -> torch.Tensor:
            from medad.corruptions import simplex_noise

            return simplex_noise(tuple(x.shape), generator=simplex_generator, device=x.device, dtype=x.dtype, **self.simplex_kwargs)

        noise_fn = simplex if self.step_noise == "simplex" else None
        anomaly_map, restoration = torch.zeros_like(inputs[:, :1]), torch.zeros_like(inputs)
        for _ in range(self.num_samples):  # the generators move on: every sample draws new noise
            start, noise_start = x0, self.noise_start
            if self.noise_start and self.noise == "simplex":
                t = torch.full((x0.shape[0],), self.t_start, dtype=torch.long, device=x0.device)
                start, noise_start = self.diffusion.q_sample(x0, t, noise=simplex(x0)), False
            out = self.diffusion.restore(
                network, start, self.t_start, self.num_steps, noise_start=noise_start, generator=generator, noise_fn=noise_fn
            )
            sample = from_model_range(out["restoration"], self.data_range)
            # seed 000: squared error summed over channels; AnoDDPM: (x - x̂0)², the same for one channel.
            anomaly_map += squared_error_map(inputs, sample) / self.num_samples
            restoration += sample / self.num_samples
        return {"anomaly_map": anomaly_map, "restoration": restoration}
