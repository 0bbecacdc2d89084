"""Restoration inferers (``monai.inferers.Inferer`` subclasses), composable: slices ∘ sliding window ∘ method."""

from .base import AnomalyInferer, CountingNetwork, from_model_range, to_model_range
from .baselines import GaussianScoreInferer, IntensityScoreInferer
from .frequency import FrequencyRestorationInferer
from .kl_scoring import KLScoringInferer, feature_distance_map, load_feature_extractor
from .partial_diffusion import PartialDiffusionInferer
from .slices import SliceAggregationInferer
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
    "SliceAggregationInferer",
    "SlidingWindowAnomalyInferer",
    "SyntheticRestorationInferer",
    "feature_distance_map",
    "from_model_range",
    "load_feature_extractor",
    "to_model_range",
]


def __getattr__(name: str):
    # `SliceInferer` was this class's name until it was renamed so as not to shadow monai.inferers.SliceInferer
    # (a different class); configs and run folders written before keep working, with a warning.
    if name == "SliceInferer":
        import warnings

        warnings.warn("medad.inferers.SliceInferer is now SliceAggregationInferer; the old name will be removed.",
                      DeprecationWarning, stacklevel=2)
        return SliceAggregationInferer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
