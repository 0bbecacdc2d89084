"""Noise schedules β_1..β_T, computed in float64 numpy (as improved-diffusion does).

Array index ``i`` (0-based, what the code calls timestep ``t``) holds the paper's β_{i+1}: the
network sees ``t = 0`` for the first noise level x_1, and stepping "from t = 0" yields the data x_0.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["get_named_beta_schedule", "linear_beta_schedule", "cosine_beta_schedule", "betas_for_alpha_bar"]


def linear_beta_schedule(
    num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None
) -> np.ndarray:
    """Linear β schedule (DDPM, Ho et al. 2020, Sec. 4).

    Args:
        num_timesteps: T, the number of diffusion steps.
        beta_start: β_1. Default ``scale * 1e-4`` with ``scale = 1000 / T`` (improved-diffusion's rescaling
            so that any T gives the same ᾱ_T as DDPM's T = 1000).
        beta_end: β_T. Default ``scale * 0.02``. DISYRE uses ``beta_start=1e-3, beta_end=0.2`` with T = 100.

    Returns:
        float64 array of shape ``(T,)``.
    """
    scale = 1000.0 / num_timesteps
    start = scale * 1e-4 if beta_start is None else float(beta_start)
    end = scale * 0.02 if beta_end is None else float(beta_end)
    if not 0.0 < start <= end < 1.0:
        raise ValueError(f"linear beta schedule needs 0 < beta_start <= beta_end < 1, got {start} and {end}.")
    return np.linspace(start, end, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous ᾱ(τ), τ ∈ [0, 1], into β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta).

    Without clipping, ``cumprod(1 - β)[i] == ᾱ((i+1)/T) / ᾱ(0)``.
    """
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (improved-DDPM, Nichol & Dhariwal 2021, eq. 17).

    ᾱ_t = f(t) / f(0) with f(t) = cos²(((t/T) + s) / (1 + s) · π/2), β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped at
    ``max_beta`` = 0.999 to avoid the singularity at t = T.

    Seed 000 (Kashihara & Matsubara) writes f with ``cos`` and no square; we follow improved-DDPM (the
    paper it cites for the schedule) and square it, which is also what MONAI's "cosine" schedule does.

    Returns:
        float64 array of shape ``(T,)``.
    """
    return betas_for_alpha_bar(
        num_timesteps, lambda tau: math.cos((tau + s) / (1.0 + s) * math.pi / 2.0) ** 2, max_beta=max_beta
    )


def get_named_beta_schedule(name: str, num_timesteps: int, **kwargs: float) -> np.ndarray:
    """Return the β schedule called ``name`` ("linear" or "cosine") for ``num_timesteps`` steps.

    Args:
        name: "linear" (kwargs ``beta_start``, ``beta_end``) or "cosine" (kwargs ``s``, ``max_beta``).
        num_timesteps: T >= 2.
        kwargs: schedule options, see :func:`linear_beta_schedule` and :func:`cosine_beta_schedule`.

    Returns:
        float64 numpy array of shape ``(T,)``.
    """
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps}.")
    num_timesteps = int(num_timesteps)
    builders: dict[str, Callable[..., np.ndarray]] = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}
    key = name.lower()
    if key not in builders:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(builders)}.")
    try:
        return builders[key](num_timesteps, **kwargs)
    except TypeError as err:
        raise ValueError(f"beta schedule {name!r} does not accept options {sorted(kwargs)}: {err}") from err
