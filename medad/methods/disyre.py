"""DISYRE (seed 003): Diffusion-Inspired SYnthetic REstoration, its training step.

A diffusion-like pipeline whose corruption is a synthetic anomaly instead of Gaussian noise: a foreign patch
from another healthy sample is blended in with strength α (eq. 1, :class:`medad.corruptions.ForeignPatchCorruption`),
α follows a DDPM schedule indexed by t (:class:`medad.diffusion.SyntheticAnomalySchedule`, where the schedule's
direction is explained), and a network conditioned on t predicts the healthy image x_0 (MSE).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from medad.corruptions import ForeignPatchCorruption
from medad.diffusion import SyntheticAnomalySchedule

__all__ = ["SyntheticAnomalyStep"]


class SyntheticAnomalyStep(nn.Module):
    """DISYRE's training objective: corrupt healthy slices with foreign patches, predict the healthy image.

    For a batch of healthy images x (B, C, H, W) in [0, 1] (background exactly 0): draw α ~ U(alpha_range)
    per sample, corrupt with a foreign patch taken from another sample of the batch (``x.roll(1, 0)``),
    only inside the foreground (``brain_mask`` when the batch has it), set t = t(α) and minimise
    ``MSE(network(x_t, t), x)``. A sample whose mask came out empty (no foreground) gets α = 0, as the
    official FPI transform does, so its t is the "clean" end of the schedule.

    Args:
        schedule: the :class:`~medad.diffusion.SyntheticAnomalySchedule`.
        corruption: the foreign-patch corruption (default: 64-pixel shapes in the foreground, as DISYRE's
            128² patches; pass a smaller ``patch_size`` for small images).
        alpha_range: range of the uniform strength draw (official: [0, 1]).
        image_key / foreground_key: batch keys of the images and their foreground masks.
        seed: seed of the corruption generator (None: the global torch RNG).
    """

    def __init__(
        self,
        schedule: SyntheticAnomalySchedule,
        corruption: ForeignPatchCorruption | None = None,
        alpha_range: Sequence[float] = (0.0, 1.0),
        image_key: str = "image",
        foreground_key: str | None = "brain_mask",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        low, high = (float(a) for a in alpha_range)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"alpha_range must satisfy 0 <= low <= high <= 1, got {tuple(alpha_range)}.")
        self.schedule = schedule
        self.corruption = corruption if corruption is not None else ForeignPatchCorruption(patch_size=64)
        self.alpha_range = (low, high)
        self.image_key = image_key
        self.foreground_key = foreground_key
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def corrupt(
        self, x: torch.Tensor, foreground: torch.Tensor | None = None, alpha: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Build the network input.

        Args:
            x: ``(B, C, *spatial)`` healthy images.
            foreground: optional ``(B, 1, *spatial)`` masks where anomalies may go.
            alpha: optional ``(B,)`` strengths; default uniform in ``alpha_range``.

        Returns:
            ``x_t`` (B, C, *spatial), ``mask`` (B, 1, *spatial) soft shape m, ``alpha`` (B,) effective strength
            (with the official ``dag`` corruption the larger of the patch's and the bias's strength; 0 where nothing changed),
            ``t`` (B,) timesteps.
        """
        batch = x.shape[0]
        if alpha is None:
            low, high = self.alpha_range
            alpha = low + (high - low) * torch.rand(batch, generator=self.generator)
        alpha = torch.as_tensor(alpha, dtype=x.dtype).reshape(batch).to(x.device)
        foreign = x.roll(1, dims=0)  # another healthy sample of the batch (B = 1: another place of the same image)
        x_t, mask, alpha = self.corruption(x, foreign, alpha, foreground=foreground, generator=self.generator, return_alpha=True)
        changed = (x_t != x).flatten(1).any(dim=1)
        alpha = torch.where(changed, alpha, torch.zeros_like(alpha))
        return {"x_t": x_t, "mask": mask, "alpha": alpha, "t": self.schedule.timestep_for_alpha(alpha).to(x.device)}

    def forward(self, network: Callable[..., torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": MSE(network(x_t, t), x), "alpha": mean strength}`` for a batch of (B, C, H, W) images."""
        x = batch[self.image_key]
        foreground = batch.get(self.foreground_key) if self.foreground_key else None
        corrupted = self.corrupt(x, foreground)
        prediction = network(corrupted["x_t"], corrupted["t"])
        return {"loss": F.mse_loss(prediction, x), "alpha": corrupted["alpha"].mean().detach()}
