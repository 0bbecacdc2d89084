"""The two baselines every method is compared with: a per-pixel Gaussian of normal images, and brain intensity.

- ``zscore`` (:class:`PixelGaussian`, :class:`GaussianFitter`): the mean and variance of every pixel / voxel of the
  normal training images (at the working image size, or in template space for preprocessed MRI), accumulated in one
  pass in float64. The anomaly map is the z-score of a test image (:class:`medad.inferers.GaussianScoreInferer`).
- ``intensity`` (:class:`BrainIntensity`): FLAIR/T2 "intensity thresholding" (Meissen et al., BrainLes 2021): the
  image normalised within the brain is itself the anomaly map (:class:`medad.inferers.IntensityScoreInferer`).

Both are ``nn.Module`` s saved as ``models/model.pt`` with :func:`medad.engine.save_checkpoint`, so calibration,
evaluation, maps, Slicer files and tables come from :class:`medad.engine.AnomalyEvaluator` unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medad.data.validation import clear_input_errors
from medad.networks.baselines import BrainIntensity, PixelGaussian
from medad.engine.checkpoint import save_checkpoint
from medad.engine.distributed import is_main_process, unwrap

__all__ = ["PixelGaussian", "GaussianFitter", "BrainIntensity", "save_model", "whole_volume_loaders"]

logger = logging.getLogger("medad.train")


def save_model(network: nn.Module, path: str | os.PathLike, bundle: str | None = None, **extra: Any) -> None:
    """Write ``network`` as a bundle checkpoint (``{"bundle", "network", ...}``, as :class:`medad.engine.Trainer`)."""
    if is_main_process():
        save_checkpoint(path, {"bundle": bundle, "network": unwrap(network).state_dict(), **extra})


class GaussianFitter:
    """"Train" a :class:`PixelGaussian`: one pass over the normal training images, then save ``model.pt``.

    Args:
        network: the :class:`PixelGaussian` (statistics are reset first, so a rerun refits from scratch).
        train_loader: batches with ``image`` ``(B, C, *spatial)`` of normal images, all on one grid.
        model_path: ``models/model.pt``; its calibration is dropped (the evaluator recalibrates the new fit).
        bundle: bundle name stored in the checkpoint.
        device: where the sums are accumulated.
        image_key: batch key of the images.

    Under ``torchrun`` every rank fits on all the data (a single cheap pass) and rank 0 writes.
    """

    def __init__(
        self,
        network: nn.Module,
        train_loader: Iterable[Mapping[str, Any]],
        model_path: str | os.PathLike,
        bundle: str | None = None,
        device: str | torch.device = "cpu",
        image_key: str = "image",
    ) -> None:
        self.network = network
        self.train_loader = train_loader
        self.model_path = Path(model_path)
        self.bundle = bundle
        self.device = torch.device(device)
        self.image_key = image_key

    def run(self) -> dict[str, Any]:
        """Fit and save; returns ``{"images": N, "shape": (C, *spatial), "train_seconds": s}``."""
        model = unwrap(self.network)
        if not isinstance(model, PixelGaussian):
            raise TypeError(f"GaussianFitter fits a PixelGaussian, got {type(model).__name__}.")
        fresh = PixelGaussian(model.std_floor).to(self.device)
        start = time.perf_counter()
        for batch in clear_input_errors(self.train_loader):
            image = batch[self.image_key]
            plain = image.as_tensor() if hasattr(image, "as_tensor") else image
            try:
                fresh.update(plain.to(self.device))
            except ValueError as error:
                source = getattr(image, "meta", {}).get("filename_or_obj", "a training image")
                raise ValueError(f"{source}: {error}") from None
        if not fresh.fitted:
            raise ValueError("GaussianFitter: the training loader gave no images; check dataset_dir.")
        model.load_state_dict(fresh.state_dict())
        seconds = time.perf_counter() - start
        save_model(model, self.model_path, self.bundle, step=int(fresh.count), train_seconds=seconds)
        logger.info("fitted a per-pixel Gaussian of %d images of shape %s in %.1f s", int(fresh.count), fresh.shape,
                    seconds)
        return {"images": int(fresh.count), "shape": fresh.shape, "train_seconds": seconds}


def whole_volume_loaders(
    pixdim: float | Sequence[float] | None = None, intensity: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """:func:`medad.engine.volume_loaders` whose ``train`` loader yields whole volumes ``(1, 1, X, Y, Z)``.

    The same datalists, split and demo data as every MRI bundle (its arguments are passed on), but a per-voxel
    model needs the whole volume, not random axial slices.
    """
    from monai.data import DataLoader, Dataset

    from medad.data import volume_transforms
    from medad.engine import volume_loaders

    loaders = volume_loaders(pixdim=pixdim, intensity=intensity, cache=False, **kwargs)
    items = loaders["train"].dataset.data
    loaders["train"] = DataLoader(Dataset(items, volume_transforms(pixdim=pixdim, intensity=intensity)),
                                  batch_size=1, shuffle=False, num_workers=int(kwargs.get("num_workers", 0)))
    return loaders
