"""medad.diffusion: the Gaussian diffusion math shared by every method, written once and tested against closed forms.

MONAI's ``DDPMScheduler.step`` assumes the previous timestep is ``t - 1`` and ``DiffusionInferer.get_likelihood``
breaks with a learned variance, so strided partial-diffusion restoration and the KL pixel score live here, and so
does DISYRE's synthetic-anomaly strength schedule built on the same ᾱ (:class:`SyntheticAnomalySchedule`).
"""

from medad.diffusion.enums import LossType, ModelMeanType, ModelVarType, as_enum
from medad.diffusion.gaussian import GaussianDiffusion, _extract, make_diffusion, mean_flat
from medad.diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from medad.diffusion.schedules import (
    betas_for_alpha_bar,
    cosine_beta_schedule,
    get_named_beta_schedule,
    linear_beta_schedule,
)
from medad.diffusion.synthetic import CONDITIONINGS, SyntheticAnomalySchedule

__all__ = [
    "CONDITIONINGS",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SyntheticAnomalySchedule",
    "approx_standard_normal_cdf",
    "as_enum",
    "betas_for_alpha_bar",
    "cosine_beta_schedule",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "linear_beta_schedule",
    "make_diffusion",
    "mean_flat",
    "normal_kl",
]
