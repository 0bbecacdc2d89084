"""medad.scores: anomaly maps from an image and its restoration, and image-level scores."""

from medad.scores.border import border_area_share, border_mask, border_top_share
from medad.scores.color import cielab_color_map, rgb_to_lab, to_grayscale
from medad.scores.error_maps import absolute_error_map, squared_error_map
from medad.scores.fair import fair_anomaly_map
from medad.scores.filters import gaussian_filter_map, masked_gaussian_filter, mean_filter
from medad.scores.gradient_similarity import (
    gradient_magnitude,
    gradient_magnitude_similarity,
    msgms_map,
    prewitt_kernels,
)
from medad.scores.image_scores import (
    default_pool_kernel,
    max_score,
    pooled_max_score,
    sampled_image_score,
    standardize_map,
    topk_mean_score,
)

__all__ = [
    "absolute_error_map",
    "border_area_share",
    "border_mask",
    "border_top_share",
    "cielab_color_map",
    "default_pool_kernel",
    "fair_anomaly_map",
    "gaussian_filter_map",
    "gradient_magnitude",
    "gradient_magnitude_similarity",
    "max_score",
    "mean_filter",
    "masked_gaussian_filter",
    "msgms_map",
    "pooled_max_score",
    "prewitt_kernels",
    "rgb_to_lab",
    "sampled_image_score",
    "squared_error_map",
    "standardize_map",
    "to_grayscale",
    "topk_mean_score",
]
