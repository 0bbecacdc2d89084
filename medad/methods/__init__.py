"""medad.methods: the method-specific training steps and helpers, one module per method."""

from medad.methods.addm import AdversarialDiffusionStep
from medad.methods.ddpm import DiffusionStep
from medad.methods.baselines import BrainIntensity, GaussianFitter, PixelGaussian
from medad.methods.disyre import SyntheticAnomalyStep
from medad.methods.fair import FairTrainingStep

__all__ = [
    "AdversarialDiffusionStep",
    "BrainIntensity",
    "DiffusionStep",
    "GaussianFitter",
    "PixelGaussian",
    "FairTrainingStep",
    "SyntheticAnomalyStep",
]
