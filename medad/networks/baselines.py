"""The baselines' models: a per-pixel Gaussian of normal images (``zscore``) and brain intensity (``intensity``).

Plain ``nn.Module`` s, so checkpoints, calibration and evaluation treat them as any network; fitting them and their
loaders are the methods' (:mod:`medad.methods.baselines`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PixelGaussian", "BrainIntensity"]


class PixelGaussian(nn.Module):
    """An independent Gaussian per pixel / voxel and channel, fitted on normal images.

    Buffers (float64): ``count`` (scalar), ``sum`` and ``sum_sq`` ``(C, *spatial)``. Sums rather than a running
    mean: they add up exactly across batches (and ranks), and float64 keeps ``E[x²] − E[x]²`` accurate for
    intensities in [0, 1] over millions of images. The buffers take the shape of the first batch
    (:meth:`update`) or of a loaded checkpoint, so one config serves any image size or template grid.

    ``forward(images)`` returns the Gaussian's parameters for each image, ``(B, 2C, *spatial)``: the mean image
    (channels ``:C``) and the floored standard deviation ``sqrt(σ² + std_floor²)`` (channels ``C:``).

    Args:
        std_floor: added in quadrature to σ, in the images' intensity units (loaders give [0, 1]). Pixels that never
            vary in the training set (background, a brain edge only some subjects reach) would otherwise give
            unbounded z-scores for any change; 0.01 = 1 % of the intensity range.
    """

    def __init__(self, std_floor: float = 0.01) -> None:
        super().__init__()
        if std_floor <= 0:
            raise ValueError(f"PixelGaussian: std_floor must be > 0 (it bounds z where σ = 0), got {std_floor}.")
        self.std_floor = float(std_floor)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("sum_sq", torch.zeros(0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return bool(self.count > 0)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of the fitted images (empty before fitting)."""
        return tuple(self.sum.shape) if self.fitted else ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Take the fitted shape from the checkpoint (like torch's lazy modules), so no shape is configured.
        for name in ("sum", "sum_sq"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """Add a batch ``(B, C, *spatial)`` of normal images to the statistics."""
        images = images.detach().to(device=self.sum.device, dtype=torch.float64)
        if not self.fitted:
            self.sum = torch.zeros_like(images[0])
            self.sum_sq = torch.zeros_like(images[0])
        elif tuple(images.shape[1:]) != self.shape:
            raise ValueError(
                f"image grid {tuple(images.shape[1:])} differs from the first training image's {self.shape}; "
                "zscore compares pixel by pixel, so every image must be on the same grid (MRI: run `medad preprocess` "
                "to one template; images: set image_size)."
            )
        self.count += images.shape[0]
        self.sum += images.sum(0)
        self.sum_sq += (images * images).sum(0)

    def mean(self) -> torch.Tensor:
        """``(C, *spatial)`` float64 mean image."""
        return self.sum / self.count

    def variance(self) -> torch.Tensor:
        """``(C, *spatial)`` float64 unbiased variance (0 for a single image)."""
        n = self.count
        centred = (self.sum_sq - self.sum * self.sum / n).clamp_min(0.0)
        return centred / (n - 1) if n > 1 else torch.zeros_like(centred)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, 2C, *spatial)``: mean image and floored std, in ``images``' dtype."""
        if not self.fitted:
            raise RuntimeError("PixelGaussian is not fitted: train the zscore bundle first (its train workflow).")
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(
                f"input grid {tuple(images.shape[1:])} differs from the training grid {self.shape} of the zscore "
                "model; preprocess the test images to the training template (`medad preprocess`) or use the "
                "training image_size / pixdim."
            )
        std = torch.sqrt(self.variance() + self.std_floor**2)
        params = torch.cat([self.mean(), std], dim=0).to(images.dtype)
        return params.unsqueeze(0).expand(images.shape[0], *params.shape)


class BrainIntensity(nn.Module):
    """Normalise each image within its foreground (nonzero voxels, e.g. a skull-stripped brain); nothing to learn.

    ``forward(images)`` ``(B, C, *spatial)`` -> same shape: per image and channel, ``"zscore"``
    ``(x − mean) / std`` over the foreground voxels, or ``"none"`` (the intensities as loaded, e.g. already
    percentile-scaled inside the brain). Background voxels become 0.

    Args:
        normalization: ``"zscore"`` or ``"none"``.
    """

    def __init__(self, normalization: str = "zscore") -> None:
        super().__init__()
        if normalization not in ("zscore", "none"):
            raise ValueError(f"BrainIntensity: normalization must be 'zscore' or 'none', got {normalization!r}.")
        self.normalization = normalization

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        foreground = (images.abs().amax(dim=1, keepdim=True) > 0).to(images.dtype)
        if self.normalization == "none":
            return images * foreground
        dims = tuple(range(2, images.dim()))
        n = foreground.sum(dim=dims, keepdim=True).clamp_min(1.0)
        mean = (images * foreground).sum(dim=dims, keepdim=True) / n
        var = (((images - mean) * foreground) ** 2).sum(dim=dims, keepdim=True) / n
        return (images - mean) / var.sqrt().clamp_min(1e-6) * foreground
