"""Restoration inferers (``monai.inferers.Inferer`` subclasses), composable: slices ∘ sliding window ∘ method."""

from .base import AnomalyInferer, CountingNetwork, from_model_range, to_model_range
from .partial_diffusion import PartialDiffusionInferer
from .slices import SliceInferer
from .sliding_window import SlidingWindowAnomalyInferer

__all__ = [
    "AnomalyInferer",
    "CountingNetwork",
    "PartialDiffusionInferer",
    "SliceInferer",
    "SlidingWindowAnomalyInferer",
    "from_model_range",
    "to_model_range",
]
