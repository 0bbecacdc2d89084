"""Multi-scale gradient magnitude similarity (MSGMS), FAIR's structural anomaly map (seed 002, eq. 7).

GMS (Xue et al., 2013) compares Prewitt gradient magnitudes ``g1, g2`` of two images:
``GMS = (2 g1 g2 + c) / (g1^2 + g2^2 + c)``, 1 where they agree. MSGMS (RIAD, Zavrtanik et al. 2021)
averages GMS over an image pyramid (2x2 average pooling per scale), each scale upsampled back
bilinearly; the anomaly map is ``1 - mean_scales GMS``. FAIR uses 2 scales and ``c = 0.0026`` on
images in ``[0, 1]``, and averages the per-channel maps of RGB images (official ``msgms.py``); pass
``grayscale=True`` to compare BT.601 gray images instead.

Borders: the official code pads the Prewitt convolution with zeros, so at the image border the gradient holds
the step from the image to 0 and GMS there compares *intensities* rather than gradients: a restoration a little
darker than the image everywhere scores 0 inside and > 0 along the border (part of FAIR's border frame, issue
#11). ``padding_mode="reflect"`` (default; OpenCV's ``BORDER_REFLECT_101``, the default of its gradient filters)
mirrors the image at the border instead, so the border pixels compare gradients like every other pixel;
``"replicate"`` gives one-sided differences there, ``"zeros"`` reproduces the official code. (On flat image
borders, e.g. MVTec bottle's white background, GMS is most sensitive: a restoration gradient of 0.01 already
scores 0.04; one-sided differences pick up more of the restoration's border ripple than mirrored ones.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: border extensions of the Prewitt convolution (``torch.nn.functional.pad`` modes, "zeros" = the official code).
GRADIENT_PADDING_MODES = ("reflect", "replicate", "zeros")

from medad.scores.color import to_grayscale

__all__ = ["GRADIENT_PADDING_MODES", "prewitt_kernels", "gradient_magnitude", "gradient_magnitude_similarity", "msgms_map"]


def prewitt_kernels(spatial_dims: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Prewitt derivative kernels, one per spatial axis: ``[1, 0, -1]`` along it, mean over the others.

    In 2D these are FAIR's ``[[1, 0, -1]] * 3 / 3`` kernels (derivative along W) and its transpose.

    Returns:
        ``(spatial_dims, 1, 3, ..., 3)`` convolution weights, axis order of the image's spatial axes.
    """
    derivative = torch.tensor([1.0, 0.0, -1.0], dtype=dtype, device=device)
    average = torch.full((3,), 1.0 / 3.0, dtype=dtype, device=device)
    kernels = []
    for axis in range(spatial_dims):
        kernel = torch.ones((), dtype=dtype, device=device)
        for other in range(spatial_dims):
            factor = derivative if other == axis else average
            kernel = kernel[..., None] * factor
        kernels.append(kernel)
    return torch.stack(kernels)[:, None]


def gradient_magnitude(image: torch.Tensor, padding_mode: str = "reflect") -> torch.Tensor:
    """Prewitt gradient magnitude of every channel.

    Args:
        image: ``(B, C, *spatial)``, 2D or 3D.
        padding_mode: ``"reflect"`` (default), ``"replicate"`` or ``"zeros"`` (FAIR's ``F.conv2d(padding=1)``).

    Returns:
        ``(B, C, *spatial)``.
    """
    spatial_dims = image.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"gradient_similarity.py: expected 2D or 3D images, got shape {tuple(image.shape)}.")
    if padding_mode not in GRADIENT_PADDING_MODES:
        raise ValueError(
            f"gradient_similarity.py: unknown padding mode {padding_mode!r}; use one of {GRADIENT_PADDING_MODES}."
        )
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    batch, channels = image.shape[:2]
    flat = image.reshape(batch * channels, 1, *image.shape[2:]).float()
    if padding_mode == "reflect" and min(flat.shape[2:]) < 2:
        padding_mode = "replicate"  # reflect needs two samples per axis
    if padding_mode != "zeros":
        flat = F.pad(flat, [1] * (2 * spatial_dims), mode=padding_mode)
    grads = conv(flat, prewitt_kernels(spatial_dims, device=image.device), padding=1 if padding_mode == "zeros" else 0)
    magnitude = torch.sqrt((grads**2).sum(dim=1, keepdim=True) + 1e-12)
    return magnitude.reshape(image.shape)


def gradient_magnitude_similarity(
    x: torch.Tensor, y: torch.Tensor, c: float = 0.0026, padding_mode: str = "reflect"
) -> torch.Tensor:
    """Per-channel GMS map ``(2 g_x g_y + c) / (g_x^2 + g_y^2 + c)`` of ``(B, C, *spatial)`` inputs."""
    gx, gy = gradient_magnitude(x, padding_mode), gradient_magnitude(y, padding_mode)
    return (2 * gx * gy + c) / (gx**2 + gy**2 + c + 1e-12)


def msgms_map(
    x: torch.Tensor,
    y: torch.Tensor,
    scales: int = 2,
    c: float = 0.0026,
    grayscale: bool = False,
    padding_mode: str = "reflect",
) -> torch.Tensor:
    """MSGMS anomaly map ``1 - mean_s upsample(GMS_s)``, averaged over channels.

    Args:
        x: ``(B, C, *spatial)`` image (2D or 3D), values in ``[0, 1]`` for the default ``c``.
        y: ``(B, C, *spatial)`` restoration.
        scales: pyramid levels (FAIR: 2, the original and a 2x downsampled copy).
        c: GMS stability constant (FAIR/GMSD: 0.0026).
        grayscale: compare BT.601 gray versions of RGB inputs instead of averaging channel maps.
        padding_mode: border extension of the Prewitt filters (see the module docstring; official: ``"zeros"``).

    Returns:
        ``(B, 1, *spatial)``, 0 where the images' gradients agree, at most 1.
    """
    if x.shape != y.shape:
        raise ValueError(f"gradient_similarity.py: images {tuple(x.shape)} and {tuple(y.shape)} differ in shape.")
    if grayscale:
        x, y = to_grayscale(x), to_grayscale(y)
    spatial = tuple(x.shape[2:])
    pool = F.avg_pool2d if len(spatial) == 2 else F.avg_pool3d
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    x, y = x.float(), y.float()
    total = torch.zeros_like(x)
    for scale in range(scales):
        if scale > 0:
            x, y = pool(x, 2, stride=2), pool(y, 2, stride=2)
        gms = gradient_magnitude_similarity(x, y, c, padding_mode)
        total = total + (gms if scale == 0 else F.interpolate(gms, size=spatial, mode=mode, align_corners=False))
    return (1 - total / scales).mean(dim=1, keepdim=True)
