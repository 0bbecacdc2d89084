"""What the network predicts, how the reverse variance is chosen and which loss trains it.

Chosen once, when the :class:`~medad.diffusion.GaussianDiffusion` is built (improved-diffusion style),
instead of if-chains in every caller. Values are lower-case strings so bundle JSON can name them.
"""

from __future__ import annotations

import enum
from typing import TypeVar

__all__ = ["ModelMeanType", "ModelVarType", "LossType", "as_enum"]


class ModelMeanType(str, enum.Enum):
    """What the first C output channels of the network predict."""

    EPSILON = "epsilon"  # the noise ε of x_t = √ᾱ x_0 + √(1−ᾱ) ε (DDPM, seeds 000, 001, 004)
    START_X = "start_x"  # the clean image x_0 (DISYRE, seed 003)


class ModelVarType(str, enum.Enum):
    """Variance Σ_θ(x_t, t) of the reverse step p_θ(x_{t-1} | x_t)."""

    FIXED_SMALL = "fixed_small"  # posterior variance β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
    FIXED_LARGE = "fixed_large"  # β_t
    # Network outputs v ∈ [-1, 1] in C extra channels; log Σ = frac·log β_t + (1 − frac)·log β̃_t with
    # frac = (v + 1)/2 (improved-DDPM eq. 15). The network then has 2·C output channels.
    LEARNED_RANGE = "learned_range"


class LossType(str, enum.Enum):
    """Training objective."""

    MSE = "mse"  # L_simple: mean squared error of the mean parameterisation (DDPM eq. 14)
    L1 = "l1"  # mean |ε − ε_θ| (seed 000 eq. 7); for START_X, mean |x_0 − x̂_0|
    HYBRID = "hybrid"  # L_simple + λ·L_vlb (improved-DDPM eq. 16), requires LEARNED_RANGE


E = TypeVar("E", bound=enum.Enum)


def as_enum(value: str | E, enum_type: type[E]) -> E:
    """Convert a string such as ``"epsilon"`` or ``"EPSILON"`` (or the enum itself) into ``enum_type``."""
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        for member in enum_type:
            if value.lower() in (member.value, member.name.lower()):
                return member
    choices = [m.value for m in enum_type]
    raise ValueError(f"{value!r} is not a valid {enum_type.__name__}; choose one of {choices}.")
