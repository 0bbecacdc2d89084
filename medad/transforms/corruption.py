"""MONAI dictionary transforms that add FAIR's synthetic anomalies to a training sample.

Each transform reads one channel-first sample ``(C, *spatial)`` (values in ``[0, 1]``) under its key and
writes two new keys, leaving the original image as the restoration target:

- ``"corrupted"`` (``corrupted_key``): the corrupted image ``(C, *spatial)``;
- ``"corruption_mask"`` (``mask_key``): where it was corrupted, ``(1, *spatial)`` in ``{0, 1}``
  (all zeros when the sample was left clean).

With several keys the outputs are ``f"{key}_{corrupted_key}"`` and ``f"{key}_{mask_key}"``.
Randomness comes from MONAI's ``self.R`` (``set_random_state`` makes runs reproducible): each call
draws a seed from it for a ``torch.Generator`` used by :mod:`medad.corruptions`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_dst_type, convert_to_tensor

from medad.corruptions._common import generator_from_seed, rotate_2d
from medad.corruptions.cutpaste import LargeCutPaste
from medad.corruptions.perlin import PerlinTextureCorruption

__all__ = ["RandPerlinTextured", "RandLargeCutPasted", "RandFairCorruptiond"]


class _RandCorruptiond(Randomizable, MapTransform):
    """Shared plumbing: seed drawing, output key names, batch-of-one calls."""

    def __init__(
        self, keys: KeysCollection, corrupted_key: str, mask_key: str, allow_missing_keys: bool
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.corrupted_key = corrupted_key
        self.mask_key = mask_key
        self._seed = 0

    def randomize(self, data: object = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def _output_keys(self, key: Hashable, n_keys: int) -> tuple[str, str]:
        if n_keys == 1:
            return self.corrupted_key, self.mask_key
        return f"{key}_{self.corrupted_key}", f"{key}_{self.mask_key}"

    def _corrupt(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # each subclass defines its corruption

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            self.randomize()
            generator = generator_from_seed(self._seed)
            image = convert_to_tensor(d[key], track_meta=False).float()
            corrupted, mask = self._corrupt(image[None], generator)
            corrupted_key, mask_key = self._output_keys(key, len(keys))
            d[corrupted_key], d[mask_key] = corrupted[0], mask[0]
        return d


class RandPerlinTextured(_RandCorruptiond):
    """DRAEM/FAIR Perlin-mask texture anomaly as a dictionary transform (see :class:`PerlinTextureCorruption`).

    Args:
        keys: image key(s).
        texture_source: folder of texture images (DTD-like) or ``None`` for the image's own texture.
        beta_range: texture/image blend range (DRAEM: ``[0, 0.8)``).
        p_clean: probability of leaving the sample clean (FAIR: 0.5).
        scale_range: Perlin lattice exponent range (``(0, 6)``).
        threshold: Perlin threshold (0.5).
        corrupted_key: output key of the corrupted image (default ``"corrupted"``).
        mask_key: output key of the mask (default ``"corruption_mask"``).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        texture_source: str | Path | None = None,
        beta_range: tuple[float, float] = (0.0, 0.8),
        p_clean: float = 0.5,
        scale_range: tuple[int, int] = (0, 6),
        threshold: float = 0.5,
        corrupted_key: str = "corrupted",
        mask_key: str = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, corrupted_key, mask_key, allow_missing_keys)
        self.corruption = PerlinTextureCorruption(
            texture_source, beta_range=beta_range, p_clean=p_clean, scale_range=scale_range, threshold=threshold
        )

    def _corrupt(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.corruption(image, generator)


class RandLargeCutPasted(_RandCorruptiond):
    """FAIR's large CutPaste as a dictionary transform (2D samples; see :class:`LargeCutPaste`).

    Args:
        keys: image key(s).
        patch_fraction: patch side range as a fraction of the image side (FAIR: ``[0.8, 0.9)``).
        rotate: rotate the patch by a random angle.
        p_clean: probability of leaving the sample clean (FAIR: 0.5).
        corrupted_key: output key of the corrupted image (default ``"corrupted"``).
        mask_key: output key of the mask (default ``"corruption_mask"``).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        patch_fraction: tuple[float, float] = (0.8, 0.9),
        rotate: bool = True,
        p_clean: float = 0.5,
        corrupted_key: str = "corrupted",
        mask_key: str = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, corrupted_key, mask_key, allow_missing_keys)
        self.corruption = LargeCutPaste(patch_fraction, rotate=rotate, p_clean=p_clean)

    def _corrupt(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.corruption(image, generator)


class RandFairCorruptiond(_RandCorruptiond):
    """FAIR's full training corruption (seed 002, Sec. 3.1; official ``data_loader*.py``).

    1. With probability ``rotate_prob`` (0.3) the clean image itself is rotated by a uniform angle in
       ``[-rotate_range_deg, rotate_range_deg]`` (90; imgaug ``Affine(rotate=(-90, 90))`` as the official
       code, corners filled with 0) and written back under its key, so target and input agree. 2D only.
    2. With probability ``p_perlin`` (0.5, the paper's 50/50 choice) the Perlin texture anomaly is used,
       otherwise the large CutPaste; each branch leaves the sample clean with probability ``p_clean``.
       The CutPaste branch needs 2D samples; for 3D volumes set ``p_perlin=1``.

    Args:
        keys: image key(s).
        texture_source: texture folder for the Perlin branch, or ``None`` for the image's own texture.
        p_perlin: probability of the Perlin branch (the rest is CutPaste).
        p_clean: probability that the chosen branch leaves the sample clean (FAIR: 0.5).
        rotate_prob: probability of rotating the clean image (FAIR: 0.3).
        rotate_range_deg: rotation range in degrees (FAIR: 90).
        beta_range: Perlin texture blend range.
        patch_fraction: CutPaste patch side range.
        corrupted_key: output key of the corrupted image (default ``"corrupted"``).
        mask_key: output key of the mask (default ``"corruption_mask"``).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        texture_source: str | Path | None = None,
        p_perlin: float = 0.5,
        p_clean: float = 0.5,
        rotate_prob: float = 0.3,
        rotate_range_deg: float = 90.0,
        beta_range: tuple[float, float] = (0.0, 0.8),
        patch_fraction: tuple[float, float] = (0.8, 0.9),
        corrupted_key: str = "corrupted",
        mask_key: str = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, corrupted_key, mask_key, allow_missing_keys)
        self.p_perlin = p_perlin
        self.rotate_prob = rotate_prob
        self.rotate_range_deg = rotate_range_deg
        self.perlin = PerlinTextureCorruption(texture_source, beta_range=beta_range, p_clean=p_clean)
        self.cutpaste = LargeCutPaste(patch_fraction, rotate=True, p_clean=p_clean)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            self.randomize()
            generator = generator_from_seed(self._seed)
            image = convert_to_tensor(d[key], track_meta=False).float()[None]
            if image.ndim == 4 and torch.rand((), generator=generator).item() < self.rotate_prob:
                limit = math.radians(self.rotate_range_deg)
                angle = (torch.rand(1, generator=generator, dtype=torch.float64) * 2 - 1) * limit
                image = rotate_2d(image, angle)
                d[key] = convert_to_dst_type(image[0], d[key], dtype=image.dtype)[0]  # keeps MetaTensor metadata
            if torch.rand((), generator=generator).item() < self.p_perlin:
                corrupted, mask = self.perlin(image, generator)
            else:
                corrupted, mask = self.cutpaste(image, generator)
            corrupted_key, mask_key = self._output_keys(key, len(keys))
            d[corrupted_key], d[mask_key] = corrupted[0], mask[0]
        return d
