"""FAIR training (seed 002, Sec. 3; official ``train.py`` / ``data_loaderbhpf.py`` of ``liutongkun/FAIR``).

One training step: corrupt the normal image with FAIR's synthetic anomalies (50 % large CutPaste, 50 %
Perlin-mask texture, each branch clean half of the time, the clean image itself rotated by up to ±90°
with p = 0.3), convert to gray, high-pass it, restore the (colour) clean image with the UNet and
minimise ``L2 + SSIM`` (paper eq. 7). The high-pass input is made by a :class:`medad.transforms.HighFrequencyInput`,
the very object the inferer uses.

Deviations from the official code: the corruption runs on the batch in the training step (so any loader,
including MRI slices, can feed it) instead of inside the dataset; the learning-rate decay ×0.2 at 80 % and
90 % of training is a function of the trainer's progress, stepped per iteration (so it also decays under a time
budget; :func:`medad.engine.multi_step_schedule` with ``fractions=(0.8, 0.9), gamma=0.2``); the official code steps a
MultiStepLR per epoch at the same fractions of its epochs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from monai.utils import convert_to_tensor
from torch import nn

from medad.transforms.corruption import RandFairCorruptiond
from medad.transforms.frequency import HighFrequencyInput

__all__ = ["FairTrainingStep"]


class FairTrainingStep(nn.Module):
    """FAIR's objective (eq. 7): ``L2(x̂, x) + ssim_weight · (1 - SSIM(x̂, x))``.

    ``x̂ = network(highpass(gray(corrupt(x))))``; ``x`` is the clean image (rotated where the corruption rotated it).

    Args:
        high_frequency: the network's input (:class:`~medad.transforms.HighFrequencyInput`; its ``channels`` are the
            network's ``in_channels``); the inferer must use the same. Default ``HighFrequencyInput()``: FAIR's
            Butterworth filter, ``D0 = 30`` on 256² images, order 2, symmetric border extension.
        margin: restore on a canvas mirror-padded by this many pixels (default 8, 0 = official; removes the
            network's border rim, :meth:`medad.transforms.HighFrequencyInput.restore`); the inferer must use the same.
        corrupt: add FAIR's synthetic anomalies (False: a plain frequency-restoration autoencoder).
        texture_source: DTD-like texture folder, or None for the image's own texture (the paper's
            "no extra data" variant, Table 12).
        p_perlin: probability of the Perlin-texture branch (else large CutPaste).
        p_clean: probability that the chosen branch leaves the image clean.
        rotate_prob / rotate_range_deg: rotation of the clean image (FAIR: p = 0.3, ±90°).
        beta_range: Perlin texture blend range (DRAEM: [0, 0.8)).
        patch_fraction: CutPaste patch side range (FAIR: [0.8, 0.9)).
        ssim_weight: weight of the SSIM loss (FAIR: 1).
        ssim_window: Gaussian SSIM window (FAIR: 11, σ = 1.5).
        spatial_dims: 2 (images and MRI slices).
        image_key: batch key of the clean images ``(B, C, H, W)`` in [0, 1].
        corrupted_key: if the batch already holds corrupted images under this key (e.g. made by
            :class:`~medad.transforms.corruption.RandFairCorruptiond` in the loader), they are used as they are.
        seed: seed of the corruption's random state (None: MONAI's shared default state).
    """

    def __init__(
        self,
        high_frequency: HighFrequencyInput | None = None,
        margin: int = 8,
        corrupt: bool = True,
        texture_source: str | Path | None = None,
        p_perlin: float = 0.5,
        p_clean: float = 0.5,
        rotate_prob: float = 0.3,
        rotate_range_deg: float = 90.0,
        beta_range: Sequence[float] = (0.0, 0.8),
        patch_fraction: Sequence[float] = (0.8, 0.9),
        ssim_weight: float = 1.0,
        ssim_window: int = 11,
        spatial_dims: int = 2,
        image_key: str = "image",
        corrupted_key: str = "corrupted",
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.high_frequency = high_frequency if high_frequency is not None else HighFrequencyInput()
        self.margin = int(margin)
        self.image_key = image_key
        self.corrupted_key = corrupted_key
        self.ssim_weight = float(ssim_weight)
        self.corruption: RandFairCorruptiond | None = None
        if corrupt:
            self.corruption = RandFairCorruptiond(
                keys=image_key, texture_source=texture_source, p_perlin=p_perlin, p_clean=p_clean,
                rotate_prob=rotate_prob, rotate_range_deg=rotate_range_deg, beta_range=tuple(beta_range),
                patch_fraction=tuple(patch_fraction), corrupted_key=corrupted_key,
            )
            if seed is not None:
                self.corruption.set_random_state(seed=seed)
        # FAIR's SSIM (official loss.py): Gaussian window 11, sigma 1.5, data range 1, averaged over channels.
        self.ssim = SSIMLoss(spatial_dims=spatial_dims, data_range=1.0, kernel_type="gaussian", win_size=ssim_window,
                             kernel_sigma=1.5)

    def corrupt_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt every sample of ``(B, C, H, W)`` images.

        Returns:
            ``(targets, corrupted)``, both ``(B, C, H, W)``: ``targets`` are the clean images, rotated where the
            corruption rotated them (the network must restore the rotated clean image).
        """
        if self.corruption is None:
            return images, images
        targets, corrupted = [], []
        for sample in images:
            out = self.corruption({self.image_key: sample})
            targets.append(convert_to_tensor(out[self.image_key], track_meta=False))
            corrupted.append(convert_to_tensor(out[self.corrupted_key], track_meta=False))
        return torch.stack(targets).to(images), torch.stack(corrupted).to(images)

    def forward(self, network: Callable[..., torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One batch -> ``{"loss", "l2", "ssim"}`` (scalars; ``loss`` carries the gradient)."""
        images = convert_to_tensor(batch[self.image_key], track_meta=False).float()
        if self.corrupted_key in batch:
            targets, corrupted = images, convert_to_tensor(batch[self.corrupted_key], track_meta=False).float()
        else:
            with torch.no_grad():
                targets, corrupted = self.corrupt_batch(images)
        restoration = self.high_frequency.restore(network, corrupted, self.margin)
        if restoration.shape != targets.shape:
            raise ValueError(
                f"fair.py: the network restored shape {tuple(restoration.shape)} for images of shape "
                f"{tuple(targets.shape)}; its out_channels must equal the image channels."
            )
        l2 = F.mse_loss(restoration, targets)
        ssim = self.ssim(restoration, targets)
        return {"loss": l2 + self.ssim_weight * ssim, "l2": l2.detach(), "ssim": ssim.detach()}

