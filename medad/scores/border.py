"""Border-frame diagnostic of anomaly maps (issue #11 item 5).

A map whose largest values gather along the image border (a "frame") is an artefact of padding or of the
periodic wrap-around of an FFT filter, not of the image: on normal images the largest map values should lie
near the border no more often than the border's share of the image area. :func:`border_top_share` measures
this: the share of the top ``top_fraction`` of every map's values that lie within ``width`` pixels of the
border, to be compared with :func:`border_area_share`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["border_mask", "border_area_share", "border_top_share"]


def border_mask(spatial_shape: Sequence[int], width: int = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask of the pixels (voxels) within ``width`` of any face of a ``spatial_shape`` grid.

    Returns:
        ``spatial_shape`` bool tensor, True on the border band.
    """
    if width < 0:
        raise ValueError(f"border.py: the border width must be >= 0, got {width}.")
    inner = torch.zeros(tuple(spatial_shape), dtype=torch.bool, device=device)
    if all(s > 2 * width for s in spatial_shape):
        inner[tuple(slice(width, s - width) for s in spatial_shape)] = True
    return ~inner


def border_area_share(spatial_shape: Sequence[int], width: int = 8) -> float:
    """Fraction of the grid within ``width`` of the border, e.g. ``1 - (240/256)^2 = 0.121`` for 256² and 8 px."""
    return float(border_mask(spatial_shape, width).float().mean())


def border_top_share(anomaly_map: torch.Tensor, width: int = 8, top_fraction: float = 0.01) -> torch.Tensor:
    """Share of each map's top ``top_fraction`` values that lie within ``width`` pixels of the border.

    A map without a border frame gives about :func:`border_area_share` (or less, when the object is centred);
    a frame gives up to 1. Ties at the cut-off are broken by position (``torch.topk``), so give maps with
    distinct values (a constant map is meaningless here).

    Args:
        anomaly_map: ``(B, C, *spatial)`` maps (channels are averaged), 2D or 3D.
        width: border band in pixels (issue #11: 8).
        top_fraction: fraction of the largest values looked at (issue #11: 0.01).

    Returns:
        ``(B,)`` float tensor of shares in [0, 1].
    """
    if anomaly_map.ndim < 3:
        raise ValueError(f"border.py: expected (B, C, *spatial) maps, got shape {tuple(anomaly_map.shape)}.")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"border.py: top_fraction must be in (0, 1], got {top_fraction}.")
    spatial = tuple(anomaly_map.shape[2:])
    flat = anomaly_map.float().mean(dim=1).reshape(anomaly_map.shape[0], -1)
    k = max(1, math.ceil(top_fraction * flat.shape[1]))
    top = flat.topk(k, dim=1).indices
    band = border_mask(spatial, width, device=anomaly_map.device).reshape(-1)
    return band[top].float().mean(dim=1)
