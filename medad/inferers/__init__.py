"""Restoration inferers (``monai.inferers.Inferer`` subclasses), composable: slices ∘ sliding window ∘ method."""

from .base import AnomalyInferer, CountingNetwork, from_model_range, to_model_range
from .baselines import GaussianScoreInferer, IntensityScoreInferer
from .frequency import FrequencyRestorationInferer, high_frequency_input
from .kl_scoring import KLScoringInferer, feature_distance_map, load_feature_extractor
from .partial_diffusion import PartialDiffusionInferer
from .slices import SliceInferer
from .sliding_window import SlidingWindowAnomalyInferer
from .synthetic_restoration import SyntheticRestorationInferer

__all__ = [
    "AnomalyInferer",
    "CountingNetwork",
    "GaussianScoreInferer",
    "IntensityScoreInferer",
    "KLScoringInferer",
    "FrequencyRestorationInferer",
    "PartialDiffusionInferer",
    "SliceInferer",
    "SlidingWindowAnomalyInferer",
    "SyntheticRestorationInferer",
    "feature_distance_map",
    "from_model_range",
    "load_feature_extractor",
    "high_frequency_input",
    "to_model_range",
]
