"""DISYRE's corruption-strength schedule (seed 003): α_t and its inverse t(α), built on the shared Gaussian schedule.

DISYRE (:mod:`medad.methods.disyre`) replaces Gaussian noise by a synthetic anomaly blended in with strength α, and α
follows a DDPM schedule indexed by t. Schedule direction. The paper: "α_t increases with t, α_0 = 0 ... α_T = 1",
built from the DDPM linear schedule (β from 1e-3 to 0.2, T = 100). The official scheduler (``snavalm/disyre``,
``diffusion/scheduler.py``) steps with ``α_t = sqrt_alphas_cumprod.flip(0)[t]`` = √ᾱ_{T-1-t}, which grows from
√ᾱ_{T-1} ≈ 0.004 to √ᾱ_0 ≈ 0.9995, i.e. corruption strength growing with t as the paper says. Its trainer, however,
maps a training strength α to ``argmin_t |√ᾱ_t − α|`` on the *unflipped* array, so there strength *decreases* with t
and the network's t-conditioning is mirrored with respect to the restoration steps. We use one convention everywhere:

    α_t = √ᾱ_{T-1-t}   (strength grows with t),     t(α) = argmin_t |α_t − α| = T − 1 − argmin_s |√ᾱ_s − α|,

the METHODS.md formula ``argmin |√ᾱ − α|`` read on the flipped schedule. ᾱ comes from the shared
:func:`medad.diffusion.make_diffusion` (no schedule math is re-derived here). The training step
(:class:`medad.methods.SyntheticAnomalyStep`) and the restoration inferer
(:class:`medad.inferers.SyntheticRestorationInferer`) both take this schedule.
"""

from __future__ import annotations

import numpy as np
import torch

from medad.diffusion.gaussian import make_diffusion

__all__ = ["CONDITIONINGS", "SyntheticAnomalySchedule"]

CONDITIONINGS = ("consistent", "official")


class SyntheticAnomalySchedule:
    """DISYRE's corruption-strength schedule α_t and its inverse t(α).

    Args:
        num_timesteps: T (DISYRE: 100).
        schedule: β schedule name of :func:`medad.diffusion.get_named_beta_schedule` (DISYRE: ``"linear"``).
        conditioning: which timestep the *network* is told for a corruption of strength α:
            ``"consistent"``: t(α) = argmin_t |α_t − α| on the same increasing table the restoration steps with,
            so the first restoration step (t = T − 1) is conditioned on "α ≈ 1";
            ``"official"``: t(α) = argmin_t |√ᾱ_t − α| on the *unflipped* table, exactly as the official
            trainer (``map_alpha_to_timestep``), so a clean image is t = T − 1 and the restoration steps
            99, 79, 59, 39, 19 are conditioned on α ≈ 0.004, 0.03, 0.15, 0.44, 0.82 while the sampler's
            arithmetic uses α_t = √ᾱ_{T-1-t} as the official ``DISYREScheduler.step`` does.
            The default is chosen by the ablation recorded in ``bundles/disyre/docs/README.md``.
        schedule_kwargs: its options; for ``"linear"`` ``beta_start`` / ``beta_end`` default to DISYRE's 1e-3 / 0.2.

    Attributes:
        alphas: float64 ``(T,)``, α_t = √ᾱ_{T-1-t}, increasing in t (α_0 ≈ 0.004, α_{T-1} ≈ 0.9995 for DISYRE).
    """

    def __init__(
        self, num_timesteps: int = 100, schedule: str = "linear", conditioning: str = "consistent", **schedule_kwargs: float
    ) -> None:
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}.")
        self.conditioning = conditioning
        if schedule == "linear":
            schedule_kwargs = {"beta_start": 1e-3, "beta_end": 0.2, **schedule_kwargs}
        diffusion = make_diffusion(schedule, num_timesteps, "start_x", **schedule_kwargs)
        self.num_timesteps = diffusion.num_timesteps
        # official DISYREScheduler.step: alpha_prod_t = sqrt_alphas_cumprod.flip(0)[t]
        self.alphas = np.ascontiguousarray(diffusion.sqrt_alphas_cumprod[::-1])

    def alpha(self, t: torch.Tensor | int) -> torch.Tensor:
        """α_t for integer timesteps ``t`` (any shape; ``t = -1`` gives 0, the clean image). float32 tensor."""
        t = torch.as_tensor(t, dtype=torch.long)
        table = torch.from_numpy(np.append(self.alphas, 0.0)).float()  # index -1 -> appended 0
        return table.to(t.device)[t]

    def timestep_for_alpha(self, alpha: torch.Tensor | float) -> torch.Tensor:
        """The network's timestep for strength ``alpha`` (values in [0, 1]); LongTensor of ``alpha``'s shape.

        ``"consistent"``: the t whose α_t is closest; ``"official"``: the t whose √ᾱ_t (unflipped) is closest.
        """
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        table = self.alphas if self.conditioning == "consistent" else self.alphas[::-1].copy()
        return (torch.from_numpy(table).to(alpha.device) - alpha.unsqueeze(-1)).abs().argmin(dim=-1)

    def restoration_timesteps(self, num_steps: int) -> list[int]:
        """Descending timesteps of a ``num_steps``-step restoration, "trailing" spacing as the official code.

        ``round(T - i * T / n) - 1`` for ``i = 0..n-1``: T = 100, n = 5 gives ``[99, 79, 59, 39, 19]`` (skip 20, the
        paper's choice); the step after the last one lands on the clean image (α = 0).
        """
        n = int(num_steps)
        if not 1 <= n <= self.num_timesteps:
            raise ValueError(f"num_steps must lie in [1, {self.num_timesteps}], got {num_steps}.")
        return [int(np.floor(self.num_timesteps - i * self.num_timesteps / n + 0.5)) - 1 for i in range(n)]
