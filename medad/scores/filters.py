"""Smoothing of anomaly maps: FAIR's mean filter and a Gaussian filter, 2D and 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

__all__ = ["mean_filter", "gaussian_filter_map", "masked_gaussian_filter", "gaussian_filter_each"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _avg_pool(spatial_dims: int):
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"filters.py: maps must have 1 to 3 spatial dimensions, got {spatial_dims}.")
    return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial_dims - 1]


def mean_filter(anomaly_map: torch.Tensor, size: int = 21, padding_mode: str = "zeros") -> torch.Tensor:
    """Box (mean) filter of every channel, output the same size as the input.

    FAIR smooths its anomaly map with a 21x21 mean filter implemented as a zero-padded convolution
    (``test.py``, ``mean_smoothing``), which lowers values within ``size // 2`` pixels of the border;
    ``padding_mode="zeros"`` (default) reproduces it, ``"reflect"``/``"replicate"`` avoid the fall-off.

    Args:
        anomaly_map: ``(B, C, *spatial)``, 1D to 3D spatial.
        size: odd kernel side in pixels.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``(B, C, *spatial)``.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"filters.py: the mean filter size must be a positive odd number, got {size}.")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"filters.py: unknown padding mode {padding_mode!r}; use one of {_PADDING_MODES}.")
    spatial_dims = anomaly_map.ndim - 2
    pool = _avg_pool(spatial_dims)
    radius = size // 2
    if size == 1:
        return anomaly_map
    if padding_mode == "zeros":
        return pool(anomaly_map, size, stride=1, padding=radius, count_include_pad=True)
    if padding_mode == "reflect" and any(s <= radius for s in anomaly_map.shape[2:]):
        padding_mode = "replicate"  # reflect padding needs every side to exceed the radius
    padded = F.pad(anomaly_map, [radius] * (2 * spatial_dims), mode=padding_mode)
    return pool(padded, size, stride=1)


def gaussian_filter_map(
    anomaly_map: torch.Tensor,
    sigma: float | Sequence[float],
    truncated: float = 4.0,
    padding_mode: str = "reflect",
) -> torch.Tensor:
    """Separable Gaussian smoothing of every channel (``sigma`` in pixels, kernel cut at ``truncated`` sigma).

    Args:
        anomaly_map: ``(B, C, *spatial)``, 1D to 3D spatial.
        sigma: standard deviation in pixels, one for all axes or one per spatial axis (an axis with ``sigma <= 0``
            is left unfiltered; all ``<= 0`` returns the input).
        truncated: kernel radius in units of sigma.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``(B, C, *spatial)`` with the input's dtype.
    """
    spatial_dims = anomaly_map.ndim - 2
    sigmas = [float(sigma)] * spatial_dims if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != spatial_dims:
        raise ValueError(f"filters.py: {len(sigmas)} sigmas given for {spatial_dims} spatial axes.")
    if all(s <= 0 for s in sigmas):
        return anomaly_map
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"filters.py: unknown padding mode {padding_mode!r}; use one of {_PADDING_MODES}.")
    identity = torch.ones(1)
    kernels = [
        gaussian_1d(torch.tensor(s), truncated=truncated, approx="sampled", normalize=True) if s > 0 else identity
        for s in sigmas
    ]
    kernels = [k.to(device=anomaly_map.device, dtype=torch.float32) for k in kernels]
    radii = [(k.numel() - 1) // 2 for k in kernels]
    if padding_mode == "reflect" and any(s <= r for s, r in zip(anomaly_map.shape[2:], radii)):
        padding_mode = "replicate"
    smoothed = separable_filtering(anomaly_map.float(), kernels, mode=padding_mode)
    return smoothed.to(anomaly_map.dtype)


def masked_gaussian_filter(anomaly_map: torch.Tensor, region: torch.Tensor, sigma: float, truncated: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of a map inside a region only (normalised convolution), zero outside it.

    ``G*(m·R) / G*R``: values outside the region (e.g. outside the brain) neither enter the smoothed map nor are
    replaced by zeros pulled in across the region's edge, so a constant map inside the region stays constant. The
    slice-wise 2D models score each slice on its own; a lesion is 3D, so smoothing the stacked volume pools the
    evidence of neighbouring slices (the brain-MRI maps' only post-processing; see the MRI bundles' docs).

    Args:
        anomaly_map: ``(B, C, *spatial)``, 1D to 3D spatial.
        region: ``(B, 1, *spatial)`` or ``(B, C, *spatial)``, nonzero inside the region.
        sigma: standard deviation in voxels of the map's grid; ``<= 0`` only zeroes the map outside the region.
        truncated: kernel radius in units of sigma.

    Returns:
        ``(B, C, *spatial)`` with the map's dtype.
    """
    if anomaly_map.shape[0] != region.shape[0] or anomaly_map.shape[2:] != region.shape[2:]:
        raise ValueError(
            f"filters.py: the region has shape {tuple(region.shape)} but the map has {tuple(anomaly_map.shape)}."
        )
    inside = (region != 0).to(torch.float32)
    values = anomaly_map.float() * inside
    if sigma <= 0:
        return values.to(anomaly_map.dtype)
    smoothed = gaussian_filter_map(values, sigma, truncated, padding_mode="zeros")
    weight = gaussian_filter_map(inside, sigma, truncated, padding_mode="zeros")
    return (smoothed / weight.clamp_min(1e-6) * inside).to(anomaly_map.dtype)


def gaussian_filter_each(
    images: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    truncated: float = 4.0,
    approx: str = "sampled",
    normalize: bool = True,
) -> torch.Tensor:
    """Separable Gaussian filter of each sample with its own sigma, zero padding, one grouped convolution per axis.

    The kernels are MONAI's ``gaussian_1d`` (``approx="sampled", normalize=True``: those of
    :func:`gaussian_filter_map`; ``approx="erf", normalize=False``: those of MONAI's ``GaussianSmooth``), each
    zero-extended to the batch's largest radius, so every sample gets what a filter of its own would give.

    Args:
        images: ``(B, C, *spatial)``, 2D or 3D spatial.
        sigmas: ``(B,)`` standard deviations in pixels, or ``(B, spatial_dims)`` one per axis; an axis with
            ``sigma <= 0`` is left unfiltered.

    Returns:
        ``(B, C, *spatial)`` with the input's dtype.
    """
    batch, channels, *spatial = images.shape
    if len(spatial) not in (2, 3):
        raise ValueError(f"filters.py: gaussian_filter_each needs 2D or 3D images, got {len(spatial)} spatial axes.")
    per_axis = torch.as_tensor(sigmas, dtype=torch.float64).reshape(batch, -1).expand(batch, len(spatial))
    conv = (F.conv2d, F.conv3d)[len(spatial) - 2]
    out = images.float().reshape(1, batch * channels, *spatial)
    for axis in range(len(spatial)):
        kernels = [gaussian_1d(torch.tensor(float(s)), truncated=truncated, approx=approx, normalize=normalize)
                   if s > 0 else torch.ones(1) for s in per_axis[:, axis].tolist()]
        radius = max((k.numel() - 1) // 2 for k in kernels)
        weight = torch.stack([F.pad(k.float(), ((radius - (k.numel() - 1) // 2),) * 2) for k in kernels])
        weight = weight.to(images.device).repeat_interleave(channels, dim=0)  # one kernel per sample and channel
        shape, padding = [1] * len(spatial), [0] * len(spatial)
        shape[axis], padding[axis] = 2 * radius + 1, radius
        out = conv(out, weight.view(batch * channels, 1, *shape), padding=tuple(padding), groups=batch * channels)
    return out.reshape(images.shape).to(images.dtype)
