"""CIELAB colour difference, FAIR's colour anomaly map (seed 002, eq. 8).

FAIR converts the image and its restoration to CIELAB and sums the squared differences of the
chroma channels ``(Δa*)^2 + (Δb*)^2`` (lightness ``L*`` is ignored so illumination changes do not
count). The conversion here follows scikit-image's ``rgb2lab`` (sRGB gamma, D65 white, 2° observer).
The official code feeds OpenCV's BGR arrays to ``kornia.color.rgb_to_lab``, so its a*/b* are those
of the channel-swapped colour; we convert the colour correctly by default. ``channel_order="bgr"``
reverses the channels before converting: use it for BGR-ordered tensors, or on RGB tensors to
reproduce the official code's numbers.
"""

from __future__ import annotations

import torch

__all__ = ["to_grayscale", "rgb_to_lab", "cielab_color_map"]

# sRGB (D65) -> XYZ, as skimage.color.colorconv.xyz_from_rgb.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
# ITU-R BT.601 luma, what OpenCV's COLOR_BGR2GRAY (used by FAIR) computes.
_GRAY_WEIGHTS_RGB = (0.299, 0.587, 0.114)


def to_grayscale(image: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """RGB -> gray with BT.601 weights (as OpenCV); single-channel input is returned unchanged.

    Args:
        image: tensor with 1 or 3 channels along ``channel_dim`` (``(B, C, *spatial)`` by default).

    Returns:
        the same tensor with 1 channel along ``channel_dim``.
    """
    channels = image.shape[channel_dim]
    if channels == 1:
        return image
    if channels != 3:
        raise ValueError(f"color.py: grayscale conversion needs 1 or 3 channels, got {channels}.")
    view = [1] * image.ndim
    view[channel_dim] = 3
    weights = torch.tensor(_GRAY_WEIGHTS_RGB, dtype=image.dtype, device=image.device).view(view)
    return (image * weights).sum(dim=channel_dim, keepdim=True)


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """sRGB in ``[0, 1]`` to CIELAB (``L*`` in ``[0, 100]``), scikit-image's formulas, differentiable.

    Args:
        image: ``(B, 3, *spatial)`` RGB.

    Returns:
        ``(B, 3, *spatial)`` with channels ``(L*, a*, b*)``.
    """
    if image.ndim < 3 or image.shape[1] != 3:
        raise ValueError(f"color.py: rgb_to_lab expects (B, 3, *spatial) RGB, got shape {tuple(image.shape)}.")
    rgb = image.float()
    linear = torch.where(rgb > 0.04045, ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bj...->bi...", matrix, linear) / white.view(1, 3, *[1] * (rgb.ndim - 2))
    # clamp inside the cube-root branch keeps gradients finite where that branch is not selected
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def cielab_color_map(x: torch.Tensor, y: torch.Tensor, channel_order: str = "rgb") -> torch.Tensor:
    """``(Δa*)^2 + (Δb*)^2`` between an image and its restoration.

    Args:
        x: ``(B, C, *spatial)`` image in ``[0, 1]``; ``C = 3`` colour, or ``C = 1`` (gray images
            have ``a* = b* = 0``, so the map is 0).
        y: ``(B, C, *spatial)`` restoration.
        channel_order: ``"rgb"`` (default) or ``"bgr"`` (channels are reversed before the conversion).

    Returns:
        ``(B, 1, *spatial)``.
    """
    if x.shape != y.shape:
        raise ValueError(f"color.py: images {tuple(x.shape)} and {tuple(y.shape)} differ in shape.")
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"color.py: channel_order must be 'rgb' or 'bgr', got {channel_order!r}.")
    if x.shape[1] == 1:
        return torch.zeros_like(x, dtype=torch.float32)
    if channel_order == "bgr":
        x, y = x.flip(1), y.flip(1)
    difference = (rgb_to_lab(x) - rgb_to_lab(y))[:, 1:]
    return (difference**2).sum(dim=1, keepdim=True)
