"""Pixel-wise reconstruction errors: the anomaly maps of ddpm_partial (seed 000), DISYRE and ADDM."""

from __future__ import annotations

import torch

__all__ = ["squared_error_map", "absolute_error_map"]


def _reduce_channels(error: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return error.sum(dim=1, keepdim=True)
    if reduction == "mean":
        return error.mean(dim=1, keepdim=True)
    raise ValueError(f"error_maps.py: channel reduction must be 'sum' or 'mean', got {reduction!r}.")


def _check(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    if x.shape != x_hat.shape:
        raise ValueError(f"error_maps.py: image {tuple(x.shape)} and restoration {tuple(x_hat.shape)} differ in shape.")


def squared_error_map(x: torch.Tensor, x_hat: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``sum_c (x - x_hat)^2``: seed 000's map ("summed in the channel direction"), AnoDDPM/ADDM's map.

    Args:
        x: ``(B, C, *spatial)`` input image.
        x_hat: ``(B, C, *spatial)`` restoration.
        reduction: ``"sum"`` (default) or ``"mean"`` over channels.

    Returns:
        ``(B, 1, *spatial)``.
    """
    _check(x, x_hat)
    return _reduce_channels((x - x_hat) ** 2, reduction)


def absolute_error_map(x: torch.Tensor, x_hat: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``sum_c |x - x_hat|``: DISYRE's single-step residual ``|x - x_hat_0|``.

    Args:
        x: ``(B, C, *spatial)`` input image.
        x_hat: ``(B, C, *spatial)`` restoration.
        reduction: ``"sum"`` (default) or ``"mean"`` over channels.

    Returns:
        ``(B, 1, *spatial)``.
    """
    _check(x, x_hat)
    return _reduce_channels((x - x_hat).abs(), reduction)
