"""Base class of the restoration inferers: images in, ``{"anomaly_map", "restoration"}`` out."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable

import torch
from monai.inferers import Inferer

__all__ = ["AnomalyInferer", "to_model_range", "from_model_range", "nonzero_foreground", "CountingNetwork"]


def to_model_range(images: torch.Tensor, data_range: tuple[float, float]) -> torch.Tensor:
    """Map images from ``data_range`` (the loaders give [0, 1]) to the diffusion models' [-1, 1]."""
    low, high = data_range
    return (images - low) / (high - low) * 2.0 - 1.0


def from_model_range(images: torch.Tensor, data_range: tuple[float, float]) -> torch.Tensor:
    """Inverse of :func:`to_model_range`."""
    low, high = data_range
    return (images + 1.0) / 2.0 * (high - low) + low


def nonzero_foreground(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, 1, *spatial)`` bool: voxels nonzero in any channel (the brain of a skull-stripped
    volume whose background is 0), the region used when no brain mask is given."""
    return images.abs().amax(dim=1, keepdim=True) > 0


class AnomalyInferer(Inferer):
    """A restoration-based anomaly inferer.

    Called as ``inferer(images, network)`` with images ``(B, C, *spatial)`` in the loaders' range; returns a
    dict with ``anomaly_map`` ``(B, 1, *spatial)`` and ``restoration`` ``(B, C, *spatial)`` (same range as the
    input). Dict outputs compose with MONAI's ``sliding_window_inference`` and with
    :class:`~medad.inferers.SliceAggregationInferer`, so a method inferer never needs to know about patches or volumes.
    """

    @abstractmethod
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class CountingNetwork(torch.nn.Module):
    """Wraps a network and counts its evaluations (calls × batch items), for the inference-overhead report."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.calls = 0
        self.items = 0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        self.items += int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 1
        return self.network(*args, **kwargs)

    def reset(self) -> None:
        self.calls = 0
        self.items = 0
