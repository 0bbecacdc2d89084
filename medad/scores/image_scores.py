"""Image-level scores from pixel-level anomaly maps, and map standardisation."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "max_score", "default_pool_kernel", "pooled_max_score", "topk_mean_score", "standardize_map", "sampled_image_score",
]


def max_score(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Maximum of each map (FAIR's image score, after its mean filter).

    Args:
        anomaly_map: ``(B, C, *spatial)``.

    Returns:
        ``(B,)``.
    """
    return anomaly_map.reshape(anomaly_map.shape[0], -1).amax(dim=1)


def default_pool_kernel(width: int) -> int:
    """Seed 000's pooling kernel: ``round(W / 25)`` (at least 1), e.g. 8 for 192-pixel images."""
    return max(1, round(width / 25))


def pooled_max_score(anomaly_map: torch.Tensor, kernel_size: int | None = None, stride: int = 1) -> torch.Tensor:
    """Seed 000's image score: maximum of the average-pooled map.

    Channels are averaged first (seed 000 pools "over the channel direction" too), then a
    ``kernel_size``-wide average pooling without padding runs over every spatial axis.

    Args:
        anomaly_map: ``(B, C, *spatial)``, 1D to 3D spatial.
        kernel_size: pooling window; default :func:`default_pool_kernel` of the last spatial size.
        stride: pooling stride (seed 000 leaves it unspecified; 1 by default).

    Returns:
        ``(B,)``.
    """
    spatial_dims = anomaly_map.ndim - 2
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"image_scores.py: maps must have 1 to 3 spatial dimensions, got shape {tuple(anomaly_map.shape)}.")
    if kernel_size is None:
        kernel_size = default_pool_kernel(anomaly_map.shape[-1])
    kernel_size = min(kernel_size, *anomaly_map.shape[2:])
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial_dims - 1]
    pooled = pool(anomaly_map.float().mean(dim=1, keepdim=True), kernel_size, stride=stride)
    return max_score(pooled)


def topk_mean_score(anomaly_map: torch.Tensor, k: int = 64) -> torch.Tensor:
    """Mean of the ``k`` largest values of each map (ddpm_kl's image score, k = 64).

    Args:
        anomaly_map: ``(B, C, *spatial)``.
        k: number of values (clipped to the map size).

    Returns:
        ``(B,)``.
    """
    flat = anomaly_map.reshape(anomaly_map.shape[0], -1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


def sampled_image_score(
    image_score: Callable[[torch.Tensor], torch.Tensor], fraction: float, width: int | None = None
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The image score for a map that holds a sample (``fraction`` of the values) of the map it is defined on.

    Used when thresholds are calibrated on sampled slices of a volume. A top-k mean is the mean of the values
    above the map's ``1 - k/N`` quantile, which the sample estimates with its top ``round(k · fraction)`` values
    (same meaning, with sampling error). Any other score (a maximum, pooled or not) is evaluated on the sample as
    it is, which cannot exceed its value on the whole map: such an image threshold is biased low.

    Args:
        image_score: ``(B, 1, *spatial) -> (B,)``, e.g. ``functools.partial(topk_mean_score, k=1000)``.
        fraction: sampled share of the whole map's values, in (0, 1].
        width: last spatial size of the whole map (a pooled maximum's default kernel depends on it).

    Returns:
        ``(score for the sample, how it estimates the whole-map score)``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"image_scores.py: the sampled fraction must lie in (0, 1], got {fraction}.")
    func = getattr(image_score, "func", image_score)
    keywords = dict(getattr(image_score, "keywords", None) or {})
    if func is topk_mean_score:
        k = int(keywords.pop("k", 64))
        sample_k = max(1, round(k * fraction))
        return functools.partial(topk_mean_score, **keywords, k=sample_k), f"top-{sample_k} mean of the sample (k = {k} x {fraction:.3f})"
    if func is pooled_max_score and keywords.get("kernel_size") is None and width is not None:
        keywords["kernel_size"] = default_pool_kernel(width)
        return functools.partial(pooled_max_score, **keywords), "pooled maximum over the sample (biased low)"
    return image_score, "the score of the sample (a maximum is biased low)"


def standardize_map(
    anomaly_map: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """``(map - mean) / std`` with statistics of normal data (scalars or tensors broadcastable to the map).

    Args:
        anomaly_map: ``(B, C, *spatial)``.
        mean: e.g. the mean of the maps of normal validation images (scalar or per pixel).
        std: their standard deviation.
        eps: lower bound of ``std``.

    Returns:
        ``(B, C, *spatial)``.
    """
    std = torch.as_tensor(std, dtype=anomaly_map.dtype, device=anomaly_map.device).clamp_min(eps)
    return (anomaly_map - mean) / std
