"""Small helpers shared by the corruption generators (random draws, rotation, blurring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medad.scores.filters import gaussian_filter_each, gaussian_filter_map

__all__ = [
    "uniform", "randint", "bernoulli", "rotate_2d", "gaussian_blur", "gaussian_blur_each", "generator_from_seed",
]


def uniform(low: float, high: float, generator: torch.Generator | None = None, size: tuple[int, ...] = ()) -> torch.Tensor:
    """Uniform draw in ``[low, high)`` (float64 tensor of shape ``size``)."""
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


def randint(low: int, high: int, generator: torch.Generator | None = None) -> int:
    """One integer in ``[low, high)``."""
    return int(torch.randint(low, high, (1,), generator=generator).item())


def bernoulli(p: float, generator: torch.Generator | None = None) -> bool:
    """True with probability ``p``."""
    return bool(torch.rand((), generator=generator).item() < p)


def generator_from_seed(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def rotate_2d(
    images: torch.Tensor, angles: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Rotate each image of a batch about its centre.

    Args:
        images: ``(B, C, H, W)``.
        angles: ``(B,)`` angles in radians (counter-clockwise in display coordinates).
        mode: ``grid_sample`` interpolation.
        padding_mode: ``grid_sample`` padding (``"zeros"`` fills uncovered corners with 0 as imgaug does).

    Returns:
        ``(B, C, H, W)`` rotated images.
    """
    angles = angles.to(images.device, torch.float32).reshape(-1)
    height, width = images.shape[-2:]
    cos, sin = torch.cos(angles), torch.sin(angles)
    # affine_grid works in normalised coordinates; the aspect factors keep the rotation rigid on non-square images.
    aspect = width / height
    theta = torch.zeros(angles.shape[0], 2, 3, device=images.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin / aspect
    theta[:, 1, 0] = sin * aspect
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode=mode, padding_mode=padding_mode, align_corners=False).to(images.dtype)


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "zeros", truncated: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of every channel of ``(B, C, *spatial)`` with standard deviation ``sigma`` pixels.

    Zero padding by default so that a mask touching nothing outside its patch fades to 0 at the border.
    """
    return gaussian_filter_map(x, sigma, truncated=truncated, padding_mode=mode)


def gaussian_blur_each(x: torch.Tensor, sigmas: Sequence[float], truncated: float = 4.0) -> torch.Tensor:
    """:func:`gaussian_blur` (zero padding) of each sample of ``(B, C, *spatial)`` with its own sigma (``B`` values),
    in one grouped convolution per axis (:func:`medad.scores.filters.gaussian_filter_each`)."""
    if len(sigmas) != x.shape[0]:
        raise ValueError(f"gaussian_blur_each: {len(sigmas)} sigmas for a batch of {x.shape[0]}.")
    return gaussian_filter_each(x, list(sigmas), truncated=truncated)
