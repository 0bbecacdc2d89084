"""DISYRE's official training augmentation of 2D slices, drawn per slice and applied to a whole batch at once.

The official loader (``snavalm/disyre`` ``preprocessing/preprocessing.py``, batchgenerators) augments every sample:
elastic deformation, rotation ±15° and scaling 0.75-1.25 (each p = 0.1), mirroring on every axis (p = 0.5 each),
then multiplicative brightness 0.9-1.1, gamma 0.5-2 and inverted gamma 0.5-2, Gaussian noise (variance up to 0.05)
and Gaussian blur σ 0.5-1.5 (each p = 0.15), and clips to [0, 1]. The same chain written as twelve MONAI ``Rand*d``
transforms costs about 3 ms per slice on one CPU thread (meta data and random draws for every slice, even when a
transform does not fire): 27 % of a quick DISYRE training step. Here the parameters are drawn per slice as before,
and each operation runs once on the slices of the batch it fires for; the three spatial ones are composed into one
resampling. :class:`AugmentingCollate` runs it on each collated training batch (in the loader's workers when
there are any).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.transforms import Randomizable

from medad.scores.filters import gaussian_filter_each

__all__ = ["RandSliceAugmentation", "RandFlipBatch", "AugmentingCollate"]


def _mirror(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip each image of ``(N, C, H, W)`` along H where ``flips[:, 0]`` and along W where ``flips[:, 1]`` (exact)."""
    for axis, dim in ((0, -2), (1, -1)):
        images = torch.where(flips[:, axis].view(-1, *[1] * (images.ndim - 1)), images.flip(dim), images)
    return images


def _gamma(images: torch.Tensor, gammas: torch.Tensor, invert: bool) -> torch.Tensor:
    """MONAI's ``AdjustContrast`` per image: ``((x - min) / range) ** γ · range + min``; ``invert`` applies it to
    ``-x`` and keeps each image's mean and standard deviation (the official inverted gamma, ``retain_stats``).

    Args:
        images: ``(K, C, H, W)``; gammas: ``(K,)``.
    """
    dims = (1, 2, 3)
    x = -images if invert else images
    if invert:
        mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    low = x.amin(dims, keepdim=True)
    span = x.amax(dims, keepdim=True) - low
    out = ((x - low) / (span + 1e-7)) ** gammas.view(-1, 1, 1, 1) * span + low
    if invert:
        out = out - out.mean(dims, keepdim=True)
        out = out / (out.std(dims, keepdim=True) + 1e-8) * std + mean
        out = -out
    return out


class RandSliceAugmentation(Randomizable):
    """DISYRE's official spatial + intensity augmentation of a batch of 2D slices, each slice drawn on its own.

    Per slice, in this order: mirroring along H and along W (p = ``flip_prob`` each); elastic deformation
    (displacements drawn on a control grid every ``elastic_spacing`` pixels with standard deviation
    U(``elastic_magnitude``) pixels, bicubically interpolated, as MONAI's ``Rand2DElastic``), rotation by
    U(±``rotate_degrees``) and zoom U(``zoom_range``) about the centre (p = 0.1 each), composed into one bilinear
    resampling of the image and one nearest-neighbour resampling of the brain mask (zeros outside); then the
    intensity chain of the image only: brightness ×(1 + U(±``brightness``)), gamma, inverted gamma with the image's
    mean and std kept, additive Gaussian noise with std U(0, ``noise_std``), Gaussian blur with σ U(``blur_sigma``)
    per axis (p = 0.15 each), and clipping to ``clip``. The parameters and probabilities are those of
    :func:`medad.engine.builders.slice_augmentation` (the same chain as MONAI transforms): the mirroring is applied
    first instead of last, which leaves the distribution unchanged because the rotation angles and the elastic
    field are drawn symmetrically; the elastic field is evaluated on the output grid. Deviations from the official
    batchgenerators chain (as in that MONAI chain): MONAI's elastic field for batchgenerators' (whose σ and
    magnitude are drawn per case), bilinear instead of cubic image interpolation, and the noise's standard
    deviation drawn uniformly in [0, √0.05] rather than its variance.

    Args:
        image_key / brain_mask_key: batch entries ``(N, C, H, W)``; the brain mask is optional.
        elastic_spacing / elastic_magnitude: None derives them from the slice size as the MONAI chain does
            (``max(2, side // 8)`` pixels and ``(0, max(1, side / 16))``).
        clip: ``(low, high)`` or None.

    Returns (``__call__``):
        a new dict, image float32 ``(N, C, H, W)`` augmented, brain mask moved with it; other entries unchanged.
    """

    def __init__(
        self,
        image_key: str = "image",
        brain_mask_key: str | None = "brain_mask",
        flip_prob: float = 0.5,
        elastic_prob: float = 0.1,
        elastic_spacing: int | None = None,
        elastic_magnitude: Sequence[float] | None = None,
        rotate_prob: float = 0.1,
        rotate_degrees: float = 15.0,
        zoom_prob: float = 0.1,
        zoom_range: Sequence[float] = (0.75, 1.25),
        intensity_prob: float = 0.15,
        brightness: float = 0.1,
        gamma_range: Sequence[float] = (0.5, 2.0),
        noise_std: float = math.sqrt(0.05),
        blur_sigma: Sequence[float] = (0.5, 1.5),
        clip: Sequence[float] | None = (0.0, 1.0),
    ) -> None:
        self.image_key = image_key
        self.brain_mask_key = brain_mask_key
        self.flip_prob = float(flip_prob)
        self.elastic_prob = float(elastic_prob)
        self.elastic_spacing = elastic_spacing
        self.elastic_magnitude = None if elastic_magnitude is None else tuple(float(m) for m in elastic_magnitude)
        self.rotate_prob = float(rotate_prob)
        self.rotate_radians = math.radians(float(rotate_degrees))
        self.zoom_prob = float(zoom_prob)
        self.zoom_range = tuple(float(z) for z in zoom_range)
        self.intensity_prob = float(intensity_prob)
        self.brightness = float(brightness)
        self.gamma_range = tuple(float(g) for g in gamma_range)
        self.noise_std = float(noise_std)
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))

    def randomize(self, data: Any = None) -> None:  # the draws depend on the batch: see _draw
        pass

    def _draw(self, n: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Every per-slice parameter; the same number of draws whatever fires, so a seed fixes the whole stream."""
        r = self.R
        side = min(size)
        spacing = self.elastic_spacing or max(2, side // 8)
        magnitude = self.elastic_magnitude or (0.0, max(1.0, side / 16))
        grid = tuple(int(math.ceil(s / spacing)) + 1 for s in size)
        p = self.intensity_prob
        return {
            "flip": r.random_sample((n, 2)) < self.flip_prob,
            "elastic": r.random_sample(n) < self.elastic_prob,
            "elastic_magnitude": r.uniform(*magnitude, size=n),
            "elastic_offsets": r.normal(size=(n, 2, *grid)),
            "rotate": r.random_sample(n) < self.rotate_prob,
            "angle": r.uniform(-self.rotate_radians, self.rotate_radians, size=n),
            "zoom": r.random_sample(n) < self.zoom_prob,
            "zoom_factor": r.uniform(*self.zoom_range, size=n),
            "brightness": r.random_sample(n) < p,
            "brightness_factor": 1.0 + r.uniform(-self.brightness, self.brightness, size=n),
            "gamma": r.random_sample(n) < p,
            "gamma_value": r.uniform(*self.gamma_range, size=n),
            "inverted_gamma": r.random_sample(n) < p,
            "inverted_gamma_value": r.uniform(*self.gamma_range, size=n),
            "noise": r.random_sample(n) < p,
            "noise_std": r.uniform(0.0, self.noise_std, size=n),
            "blur": r.random_sample(n) < p,
            "blur_sigma": r.uniform(*self.blur_sigma, size=(n, 2)),
        }

    def _sampling_grid(self, draw: dict[str, np.ndarray], rows: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """``(K, H, W, 2)`` grid for ``F.grid_sample(align_corners=True)``: zoom, rotation, elastic displacement."""
        h, w = size
        k = len(rows)
        zoom = np.where(draw["zoom"][rows], draw["zoom_factor"][rows], 1.0)
        angle = np.where(draw["rotate"][rows], draw["angle"][rows], 0.0)
        cos, sin = torch.from_numpy(np.cos(angle) / zoom).float(), torch.from_numpy(np.sin(angle) / zoom).float()
        y = torch.arange(h, dtype=torch.float32) - (h - 1) / 2  # pixel coordinates about the centre
        x = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        src_y = cos.view(k, 1, 1) * yy - sin.view(k, 1, 1) * xx
        src_x = sin.view(k, 1, 1) * yy + cos.view(k, 1, 1) * xx
        elastic = draw["elastic"][rows]
        if elastic.any():
            offsets = draw["elastic_offsets"][rows] * (draw["elastic_magnitude"][rows] * elastic)[:, None, None, None]
            field = F.interpolate(torch.from_numpy(offsets).float(), size=(h, w), mode="bicubic", align_corners=False)
            src_y, src_x = src_y + field[:, 0], src_x + field[:, 1]
        return torch.stack((src_x / max((w - 1) / 2, 1e-6), src_y / max((h - 1) / 2, 1e-6)), dim=-1)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        image = torch.as_tensor(batch[self.image_key]).float()
        mask = batch.get(self.brain_mask_key) if self.brain_mask_key else None
        mask = None if mask is None else torch.as_tensor(mask).float()
        n, size = image.shape[0], (int(image.shape[-2]), int(image.shape[-1]))
        draw = self._draw(n, size)

        flips = torch.from_numpy(draw["flip"])
        image = _mirror(image, flips)
        mask = None if mask is None else _mirror(mask, flips)

        moved = np.flatnonzero(draw["elastic"] | draw["rotate"] | draw["zoom"])
        if len(moved):
            grid = self._sampling_grid(draw, moved, size)
            index = torch.from_numpy(moved)
            image = image.clone()
            image[index] = F.grid_sample(image[index], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            if mask is not None:
                mask = mask.clone()
                mask[index] = F.grid_sample(mask[index], grid, mode="nearest", padding_mode="zeros", align_corners=True)

        image = self._intensity(image, draw)
        out[self.image_key] = image
        if mask is not None:
            out[self.brain_mask_key] = mask  # type: ignore[index]
        return out

    def _intensity(self, image: torch.Tensor, draw: dict[str, np.ndarray]) -> torch.Tensor:
        def rows(name: str) -> torch.Tensor:
            return torch.from_numpy(np.flatnonzero(draw[name]))

        image = image.clone()
        if (i := rows("brightness")).numel():
            image[i] = image[i] * torch.from_numpy(draw["brightness_factor"][i.numpy()]).float().view(-1, 1, 1, 1)
        for name, invert in (("gamma", False), ("inverted_gamma", True)):
            if (i := rows(name)).numel():
                gammas = torch.from_numpy(draw[f"{name}_value"][i.numpy()]).float()
                image[i] = _gamma(image[i], gammas, invert=invert)
        if (i := rows("noise")).numel():
            std = torch.from_numpy(draw["noise_std"][i.numpy()]).float().view(-1, 1, 1, 1)
            noise = torch.from_numpy(self.R.normal(size=tuple(image[i].shape))).float()
            image[i] = image[i] + std * noise
        if (i := rows("blur")).numel():
            sigmas = torch.from_numpy(draw["blur_sigma"][i.numpy()])  # MONAI GaussianSmooth's kernels, per slice
            image[i] = gaussian_filter_each(image[i], sigmas, approx="erf", normalize=False)
        if self.clip is not None:
            image = image.clamp(*self.clip)
        return image


class RandFlipBatch(Randomizable):
    """Mirror each image of a batch (and its mask alike) along H and along W, each with probability ``prob``.

    The same draws' distribution as two MONAI ``RandFlipd`` per image (the industrial bundles' augmentation), in two
    tensor operations for the whole batch instead of meta-data-tracking transforms on every cached image (11-12 %
    of a quick ddpm_partial / ddpm_kl training step, docs/results.md "Training throughput").

    Args:
        keys: batch entries ``(N, C, H, W)`` flipped alike (missing keys are skipped).
        prob: probability of each of the two flips.
    """

    def __init__(self, keys: Sequence[str] = ("image", "mask"), prob: float = 0.5) -> None:
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        self.prob = float(prob)

    def randomize(self, data: Any = None) -> None:  # the draws depend on the batch size: see __call__
        pass

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        present = [k for k in self.keys if isinstance(batch.get(k), torch.Tensor)]
        if not present:
            return out
        n = batch[present[0]].shape[0]
        flips = torch.from_numpy(self.R.random_sample((n, 2)) < self.prob)
        for key in present:
            out[key] = _mirror(batch[key], flips)
        return out


class AugmentingCollate:
    """A ``DataLoader`` ``collate_fn``: collate the samples, then augment the whole batch.

    In a loader worker the augmentation is seeded once from the worker's own seed (PyTorch draws it per worker and
    epoch from the main process's generator), so workers do not repeat each other's draws; without workers it
    draws from its own generator, which :func:`medad.engine.random_state.capture_random_state` records.

    Args:
        augmentation: called on the collated batch dict.
        collate_fn: how samples are collated (MONAI's ``list_data_collate`` flattens multi-sample transforms).
    """

    def __init__(self, augmentation: Callable[[Mapping[str, Any]], Any], collate_fn: Callable = list_data_collate):
        self.augmentation = augmentation
        self.collate_fn = collate_fn
        self._worker: int | None = None

    def __call__(self, samples: list) -> Any:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker != info.id and hasattr(self.augmentation, "set_random_state"):
            self.augmentation.set_random_state(seed=info.seed % (2**32))
            self._worker = info.id
        return self.augmentation(self.collate_fn(samples))
