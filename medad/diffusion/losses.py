"""Elementwise Gaussian KL and the discretised Gaussian likelihood (improved-diffusion ``losses.py``)."""

from __future__ import annotations

import math

import torch

__all__ = ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood"]


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) ‖ N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other (e.g. ``(B, C, *spatial)`` means with ``(B, 1, ...)`` log variances);
    at least one of them must be a tensor.
    """
    tensor = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if tensor is None:
        raise ValueError("normal_kl needs at least one tensor argument.")
    logvar1, logvar2 = (torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF Φ(x) (as in improved-diffusion / PixelCNN++)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of 8-bit data under a Gaussian discretised into 256 bins (DDPM Sec. 3.3, L_0).

    Args:
        x: data rescaled to [-1, 1], shape ``(B, C, *spatial)``; bin centres are -1 + 2k/255.
        means: Gaussian means, same shape.
        log_scales: log standard deviations, broadcastable to ``x``.

    Returns:
        log-probabilities in nats, shape of ``x``. The outermost bins extend to ±∞, so the 256 bin
        probabilities sum to 1.
    """
    if x.shape != means.shape:
        raise ValueError(f"x and means must have the same shape, got {tuple(x.shape)} and {tuple(means.shape)}.")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
