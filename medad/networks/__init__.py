"""Networks: the one UNet shared by every method, the ADDM discriminator, and the baselines' models."""

from monai.networks.nets import PatchDiscriminator

from .baselines import BrainIntensity, PixelGaussian
from .unet import AnomalyUNet, timestep_embedding

__all__ = ["AnomalyUNet", "PatchDiscriminator", "timestep_embedding", "PixelGaussian", "BrainIntensity"]
