"""Random 2D training slices through the brain of a cached volume, in one transform (the MRI bundles' training data)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.transforms.traits import MultiSampleTrait

__all__ = ["RandBrainSlicesd", "symmetric_pad"]


def symmetric_pad(amount: int) -> tuple[int, int]:
    """MONAI's "symmetric" padding: half before, the rest after."""
    return amount // 2, amount - amount // 2


class RandBrainSlicesd(Randomizable, MapTransform, MultiSampleTrait):
    """``num_samples`` random axial slices through the brain of a ``(C, X, Y, Z)`` volume, as ``(C, H, W)`` patches.

    The same sampling as MONAI's ``RandCropByPosNegLabeld(spatial_size=(-1, -1, 1), pos=1, neg=0)`` on the brain
    mask followed by ``SqueezeDimd``, ``SpatialPadd`` + ``RandSpatialCropd`` (``patch_size``) and ``DivisiblePadd``
    (a slice is drawn with probability proportional to its brain voxels, the patch offset uniformly, padding
    symmetric with zeros), computed on plain tensors in one call: those five MONAI transforms, each tracking meta
    data for every slice, took a third of a quick DISYRE training step (docs/results.md, "Speed"). The draws come
    from this transform's own generator, so they differ from the MONAI chain's, not their distribution.

    Args:
        keys: volumes to slice alike (image and brain mask).
        label_key: the brain mask (foreground > 0) that weights the slices; a volume without any brain voxel gets
            uniformly drawn slices.
        num_samples: slices per volume.
        patch_size: in-plane ``(H, W)`` patch; None keeps whole slices.
        size_divisor: pad each patch to a multiple of this (the UNet's ``2 ** (levels - 1)``).

    Returns:
        a list of ``num_samples`` dicts holding only ``keys`` (float tensors ``(C, H, W)``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        num_samples: int,
        patch_size: Sequence[int] | None = None,
        size_divisor: int = 1,
    ) -> None:
        MapTransform.__init__(self, keys)
        if int(num_samples) < 1:
            raise ValueError(f"slices.py: num_samples must be at least 1, got {num_samples}.")
        self.label_key = label_key
        self.num_samples = int(num_samples)
        self.patch_size = None if patch_size is None else tuple(int(p) for p in patch_size)
        self.size_divisor = max(1, int(size_divisor))

    def randomize(self, weights: np.ndarray, plane: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Slice indices drawn by ``weights`` and, with a patch, one in-plane offset per slice."""
        total = float(weights.sum())
        p = weights / total if total > 0 else None
        indices = self.R.choice(len(weights), size=self.num_samples, p=p)
        offsets = []
        for _ in range(self.num_samples):
            if self.patch_size is None:
                offsets.append((0, 0))
            else:
                offsets.append(tuple(int(self.R.randint(0, size - patch + 1)) for size, patch in zip(plane, self.patch_size)))
        return indices, offsets

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, torch.Tensor]]:
        label = data[self.label_key]
        label = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        weights = (label > 0).flatten(0, -2).sum(dim=0).double().numpy()  # brain voxels per axial slice
        volumes = {}
        for key in self.key_iterator(dict(data)):
            value = data[key]
            value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            volumes[key] = value
        plane = tuple(int(s) for s in label.shape[1:3])
        if self.patch_size is not None:
            plane = tuple(max(s, p) for s, p in zip(plane, self.patch_size))
        indices, offsets = self.randomize(weights, plane)
        chosen = torch.as_tensor(indices, dtype=torch.long)
        samples: list[dict[Hashable, torch.Tensor]] = [{} for _ in range(self.num_samples)]
        for key, volume in volumes.items():
            slices = volume.index_select(-1, chosen).movedim(-1, 0).float()  # (n, C, X, Y)
            slices = self._pad_to(slices, plane)
            for i, (top, left) in enumerate(offsets):
                patch = slices[i]
                if self.patch_size is not None:
                    patch = patch[:, top : top + self.patch_size[0], left : left + self.patch_size[1]]
                samples[i][key] = self._pad_divisible(patch).contiguous()
        return samples

    @staticmethod
    def _pad_to(slices: torch.Tensor, plane: Sequence[int]) -> torch.Tensor:
        h, w = symmetric_pad(plane[0] - slices.shape[-2]), symmetric_pad(plane[1] - slices.shape[-1])
        return F.pad(slices, (*w, *h)) if any(h + w) else slices

    def _pad_divisible(self, patch: torch.Tensor) -> torch.Tensor:
        k = self.size_divisor
        target = [-(-s // k) * k for s in patch.shape[-2:]]
        return self._pad_to(patch[None], target)[0]
