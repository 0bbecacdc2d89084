"""FAIR's anomaly map (seed 002, eqs. 7-9; official ``test.py``)."""

from __future__ import annotations

import torch

from medad.scores.color import cielab_color_map
from medad.scores.filters import mean_filter
from medad.scores.gradient_similarity import msgms_map

__all__ = ["fair_anomaly_map"]


def fair_anomaly_map(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    color_weight: float = 0.0003,
    mean_filter_size: int = 21,
    msgms_scales: int = 2,
    channel_order: str = "rgb",
    padding_mode: str = "zeros",
    gradient_padding_mode: str = "reflect",
) -> torch.Tensor:
    """``mean_filter(MSGMS(x, x_hat) + color_weight * ((Δa*)^2 + (Δb*)^2))``; the image score is its max.

    Args:
        x: ``(B, C, H, W)`` image in ``[0, 1]`` (C = 3 RGB, or 1 where the colour term is 0).
        x_hat: ``(B, C, H, W)`` restoration.
        color_weight: weight of the CIELAB term (FAIR: 0.0003).
        mean_filter_size: side of the mean filter (FAIR: 21 on 256^2 images; 1 disables it).
        msgms_scales: pyramid levels of MSGMS (FAIR: 2).
        channel_order: ``"rgb"`` (default) or ``"bgr"``, see :func:`medad.scores.color.cielab_color_map`.
        padding_mode: mean-filter padding: ``"zeros"`` (default, FAIR's code: the map is damped within
            ``mean_filter_size // 2`` pixels of the border, to at most half at the edges, defects there too) or
            ``"reflect"`` (no damping; measured to leave more of the restoration's border error in the map).
        gradient_padding_mode: Prewitt padding inside MSGMS: ``"reflect"`` (default) or ``"zeros"`` (FAIR's
            code, which makes MSGMS compare intensities instead of gradients along the border).

    Returns:
        ``(B, 1, H, W)``.
    """
    anomaly_map = msgms_map(x, x_hat, scales=msgms_scales, padding_mode=gradient_padding_mode)
    if color_weight:
        anomaly_map = anomaly_map + color_weight * cielab_color_map(x, x_hat, channel_order)
    return mean_filter(anomaly_map, mean_filter_size, padding_mode)
