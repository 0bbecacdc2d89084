"""MONAI dictionary transforms (synthetic-anomaly corruptions, MRI preprocessing) and FAIR's frequency filters with its
high-frequency network input (:class:`HighFrequencyInput`)."""

from . import mri

from .corruption import RandFairCorruptiond, RandLargeCutPasted, RandPerlinTextured
from .mri import (
    SKULL_STRIP_BACKENDS,
    REGISTRATION_TRANSFORMS,
    NORMALIZATION_MODES,
    REGISTRATION_RECORD_NAME,
    load_volume,
    save_volume,
    metatensor_to_ants,
    ants_to_metatensor,
    metatensor_to_sitk,
    atlas_brain_mask,
    ReorientToCanonicald,
    N4BiasCorrectiond,
    SkullStripd,
    RegisterToTemplated,
    NormalizeIntensityInBraind,
    load_registration_record,
    apply_forward_transform,
    apply_inverse_transform,
)
from .slices import RandBrainSlicesd
from .frequency import (
    EXTRACTORS,
    HighFrequencyInput,
    butterworth_highpass_filter,
    gaussian_highpass_filter,
    highpass,
    ideal_highpass_filter,
    sobel_gradients,
    to_grayscale,
)

__all__ = [
    "EXTRACTORS",
    "HighFrequencyInput",
    "N4BiasCorrectiond",
    "NORMALIZATION_MODES",
    "NormalizeIntensityInBraind",
    "REGISTRATION_RECORD_NAME",
    "REGISTRATION_TRANSFORMS",
    "RandFairCorruptiond",
    "RandLargeCutPasted",
    "RandBrainSlicesd",
    "RandPerlinTextured",
    "RegisterToTemplated",
    "ReorientToCanonicald",
    "SKULL_STRIP_BACKENDS",
    "SkullStripd",
    "ants_to_metatensor",
    "apply_forward_transform",
    "apply_inverse_transform",
    "atlas_brain_mask",
    "butterworth_highpass_filter",
    "gaussian_highpass_filter",
    "highpass",
    "ideal_highpass_filter",
    "load_registration_record",
    "load_volume",
    "metatensor_to_ants",
    "metatensor_to_sitk",
    "mri",
    "save_volume",
    "sobel_gradients",
    "to_grayscale",
]
