"""medad.corruptions: synthetic anomalies and structured noise for training restoration models."""

from medad.corruptions.cutpaste import LargeCutPaste, cut_paste
from medad.corruptions.foreign_patch import (
    OFFICIAL_BIAS_CODEBOOK,
    SHAPE_KINDS,
    ForeignPatchCorruption,
    foreign_patch_blend,
    intensity_bias,
    quantized_range_mask,
    random_shape_mask,
)
from medad.corruptions.perlin import (
    PerlinTextureCorruption,
    perlin_fade,
    perlin_mask,
    perlin_noise,
    perlin_noise_2d,
)
from medad.corruptions.simplex import (
    fractal_simplex_noise,
    random_permutation,
    simplex_noise,
    simplex_noise_2d,
    simplex_noise_3d,
)

__all__ = [
    "OFFICIAL_BIAS_CODEBOOK",
    "SHAPE_KINDS",
    "ForeignPatchCorruption",
    "LargeCutPaste",
    "PerlinTextureCorruption",
    "cut_paste",
    "foreign_patch_blend",
    "fractal_simplex_noise",
    "intensity_bias",
    "perlin_fade",
    "perlin_mask",
    "perlin_noise",
    "perlin_noise_2d",
    "quantized_range_mask",
    "random_permutation",
    "random_shape_mask",
    "simplex_noise",
    "simplex_noise_2d",
    "simplex_noise_3d",
]
