"""Networks: the one UNet shared by every method, and the ADDM discriminator."""

from monai.networks.nets import PatchDiscriminator

from .unet import AnomalyUNet, timestep_embedding

__all__ = ["AnomalyUNet", "PatchDiscriminator", "timestep_embedding"]
