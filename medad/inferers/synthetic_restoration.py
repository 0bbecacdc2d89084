"""DISYRE's restoration from the test image (seed 003, Algorithm 1): accumulate |x_t − x̂_0| over strided steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from medad.scores import absolute_error_map

from .base import AnomalyInferer

if TYPE_CHECKING:
    from medad.diffusion import SyntheticAnomalySchedule

__all__ = ["SyntheticRestorationInferer"]

_MODES = ("multi_step", "single_step")
_SAMPLING = ("cold_diffusion", "naive")


class SyntheticRestorationInferer(AnomalyInferer):
    """Heal a test image with a network trained on DISYRE's synthetic-anomaly schedule.

    The test image itself is x_t at the most corrupted step (no noise is added). At each of ``num_steps``
    descending timesteps t (``schedule.restoration_timesteps``: 99, 79, 59, 39, 19 for T = 100, 5 steps)
    the network predicts x̂_0 = net(x_t, t), the step's residual |x_t − x̂_0| is accumulated, and x_t moves
    to the next (weaker) strength t' as in the official ``DISYREScheduler.step``:

    - ``"cold_diffusion"`` (official default; Bansal et al. Alg. 2 with D(x_0, t) = (1 − α_t)·x_0 + α_t·x_T):
      x̂_T = (x_t − (1 − α_t)·x̂_0) / α_t and x_{t'} = x_t − D(x̂_0, t) + D(x̂_0, t'), which simplifies to
      x_{t'} = x̂_0 + (α_{t'} / α_t)·(x_t − x̂_0): the unhealed residual shrinks by α_{t'}/α_t;
    - ``"naive"``: x_{t'} = (1 − α_{t'})·x̂_0 + α_{t'}·x_t;

    clipped to ``clip_range``. After the last step x = x̂_0 (α = 0).

    Returns ``anomaly_map`` = the mean of the residuals over the steps (DISYRE's AS) and ``restoration`` = the
    last x̂_0. ``mode="single_step"`` feeds the unchanged test image at every step instead (the official
    "mean-single-step"; with one step it is the paper's single-step residual |x − f(x, t)|).

    The network works on the loaders' [0, 1] images directly (as the official code; background stays 0).
    Foreground weighting and background zeroing belong to the patch level: wrap this inferer in
    :class:`~medad.inferers.SlidingWindowAnomalyInferer` (``normalize_foreground_weight=False`` for DISYRE's
    blending) and, for volumes, in :class:`~medad.inferers.SliceAggregationInferer`.

    Args:
        schedule: the :class:`~medad.diffusion.SyntheticAnomalySchedule` the network was trained with.
        num_steps: network evaluations (paper: 5, i.e. a skip of 20 on T = 100).
        mode: ``"multi_step"`` (paper) or ``"single_step"``.
        sampling: ``"cold_diffusion"`` (default) or ``"naive"`` re-corruption between steps.
        timesteps: explicit descending timesteps, overriding ``num_steps`` (e.g. ``[49]`` for single-step t = 50).
        clip_range: range the intermediate images and the restoration are clipped to (None: no clipping).
    """

    def __init__(
        self,
        schedule: SyntheticAnomalySchedule,
        num_steps: int = 5,
        mode: str = "multi_step",
        sampling: str = "cold_diffusion",
        timesteps: list[int] | None = None,
        clip_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if sampling not in _SAMPLING:
            raise ValueError(f"sampling must be one of {_SAMPLING}, got {sampling!r}.")
        self.schedule = schedule
        if timesteps is None:
            timesteps = schedule.restoration_timesteps(num_steps)
        timesteps = [int(t) for t in timesteps]
        if not timesteps or any(not 0 <= t < schedule.num_timesteps for t in timesteps) or any(
            a <= b for a, b in zip(timesteps, timesteps[1:])
        ):
            raise ValueError(f"timesteps must be strictly descending values in [0, {schedule.num_timesteps - 1}], got {timesteps}.")
        self.timesteps = timesteps
        self.mode = mode
        self.sampling = sampling
        self.clip_range = None if clip_range is None else tuple(clip_range)

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip_range is None else x.clamp(*self.clip_range)

    def step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
        """Move x_t (B, C, *spatial) from strength α_t to α_{t_next} towards x̂_0 (``t_next = -1``: x̂_0 itself)."""
        if t_next < 0:
            return self._clip(x0_hat)
        alpha_t, alpha_next = float(self.schedule.alpha(t)), float(self.schedule.alpha(t_next))
        if self.sampling == "cold_diffusion":
            return self._clip(x0_hat + (alpha_next / alpha_t) * (x_t - x0_hat))
        return self._clip((1.0 - alpha_next) * x0_hat + alpha_next * x_t)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """(B, C, *spatial) images in [0, 1] -> ``anomaly_map`` (B, 1, *spatial), ``restoration`` (B, C, *spatial)."""
        x_t = inputs
        score = torch.zeros_like(inputs[:, :1])
        x0_hat = inputs
        following = self.timesteps[1:] + [-1]
        for t, t_next in zip(self.timesteps, following):
            timesteps = torch.full((inputs.shape[0],), t, dtype=torch.long, device=inputs.device)
            x0_hat = network(x_t, timesteps)
            # official: |sample - x0_bar| with the unclipped prediction; channels averaged into one map
            score = score + absolute_error_map(x_t, x0_hat, reduction="mean")
            if self.mode == "multi_step":
                x_t = self.step(x_t, x0_hat, t, t_next)
        return {"anomaly_map": score / len(self.timesteps), "restoration": self._clip(x0_hat)}
