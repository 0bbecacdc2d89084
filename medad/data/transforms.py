"""Dictionary transforms that load 2D inspection images and their masks as ``(C, H, W)`` tensors, and the
anti-aliasing pre-filter of volumes about to be resampled to a coarser grid (:class:`GaussianAntiAliasd`).

MONAI's ``PILReader`` swaps the first two axes by default (``reverse_indexing=True``, giving
``(W, H)`` arrays); here it is built with ``reverse_indexing=False`` so that axis 1 of every tensor
is the image rows (top row first) and axis 2 the columns, as in PIL, OpenCV and matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    Resize,
    Resized,
)

__all__ = [
    "DropNoneKeysd",
    "ScaleIntensityByDtyped",
    "ToChannelsd",
    "EnsureMaskd",
    "ResizeImaged",
    "pil_converter",
    "image_reader",
    "image_transforms",
    "anti_aliasing_sigma",
    "GaussianAntiAliasd",
]

from medad.data.validation import CheckInputd, LoadInputd
from medad.scores.filters import gaussian_filter_map

# ITU-R BT.601 luma weights, the ones PIL's convert("L") uses, so gray images match PIL's.
_LUMA = (0.299, 0.587, 0.114)


def pil_converter(image):
    """Bring any PIL mode to one whose array is gray, RGB, 16-bit gray or float.

    Palette, alpha, bilevel and CMYK/YCbCr images become ``L`` or ``RGB`` (alpha is dropped: the
    inspected surface is the colour, not its transparency); 16-bit and float modes are kept so
    ``ScaleIntensityByDtyped`` can scale them by their own range.
    """
    mode = image.mode
    if mode in ("L", "RGB", "F", "I") or mode.startswith("I;16"):
        return image
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    return image.convert("RGB")  # P, PA, RGBA, RGBa, CMYK, YCbCr, LAB, HSV


class _RowMajorPILReader(PILReader):
    """``PILReader`` that returns a writable copy (PIL's buffer is read-only and torch warns)."""

    def get_data(self, img):
        data, meta = super().get_data(img)
        return np.array(data), meta


def image_reader() -> PILReader:
    """A ``PILReader`` giving ``(H, W[, C])`` arrays in their stored dtype (see module docstring)."""
    return _RowMajorPILReader(converter=pil_converter, reverse_indexing=False)


class DropNoneKeysd(MapTransform):
    """Remove the given keys whose value is None, so later transforms can use ``allow_missing_keys``.

    Datalists mark "no mask" with None (normal images); ``LoadImaged`` cannot load None.
    """

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is None:
                del d[key]
        return d


def _dtype_maximum(image: torch.Tensor) -> float:
    """Full-scale value of the file an image came from: 255 for 8-bit, 65535 for 16-bit, 1 for float."""
    mode = str(getattr(image, "meta", {}).get("mode", "")) if isinstance(image, MetaTensor) else ""
    if mode.startswith("I;16") or mode == "I":
        # PIL opens 16-bit PNGs as "I;16" (or "I", int32, in older Pillow); both are 16-bit data.
        return 65535.0
    if mode in ("L", "RGB", "P", "1"):
        return 255.0
    if image.dtype == torch.uint8:
        return 255.0
    if image.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16):
        return 65535.0
    return 1.0


class ScaleIntensityByDtyped(MapTransform):
    """Scale intensities to [0, 1] by the full range of the stored dtype (uint8 / 255, uint16 / 65535).

    Unlike per-image min/max scaling (``ScaleIntensityd``), a dark image stays dark, which is what an
    anomaly detector must see. ``ScaleIntensityRanged`` needs one fixed range for every file; this
    reads the range of each file (PIL mode in the meta data, else the tensor dtype), so one pipeline
    reads 8-bit and 16-bit PNGs alike. Float images are taken to be in [0, 1] already. Output is
    float32, clipped to [0, 1].
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            scale = _dtype_maximum(image)
            d[key] = (image.to(torch.float32) / scale).clamp_(0.0, 1.0)
        return d


class ToChannelsd(MapTransform):
    """Convert a channel-first image ``(C, *spatial)`` to ``channels`` channels (1 or 3).

    RGB -> gray uses the BT.601 luma weights (as PIL); gray -> RGB repeats the channel; a 4th
    (alpha) or 2nd (gray-alpha) channel of an in-memory array is dropped.
    """

    def __init__(self, keys: KeysCollection, channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] == 2:
                image = image[:1]
            elif image.shape[0] == 4:
                image = image[:3]
            if image.shape[0] not in (1, 3):
                raise ValueError(f"cannot convert an image with {image.shape[0]} channels to {self.channels}.")
            if self.channels == 1 and image.shape[0] == 3:
                weights = torch.tensor(_LUMA, dtype=image.dtype, device=image.device)
                image = (image * weights.view(3, *([1] * (image.ndim - 1)))).sum(0, keepdim=True)
            elif self.channels == 3 and image.shape[0] == 1:
                image = image.repeat(3, *([1] * (image.ndim - 1)))
            d[key] = image
        return d


class EnsureMaskd(MapTransform):
    """Make a binary ground-truth mask ``(1, *spatial)`` float32 for every item.

    A loaded mask is binarised as "any channel > 0", so 0/1, 0/255 and 0/65535 mask files all work;
    an item without a mask (key absent or None, e.g. a normal image) gets zeros of the reference
    image's spatial shape. The mask must have the reference image's spatial shape; otherwise the
    error names the mask file.

    Args:
        keys: mask key(s).
        reference_key: key of the (loaded, channel-first) image whose shape a mask must match.
        fill: value for a missing mask, ``"zeros"`` or ``"foreground"`` (reference image != 0, e.g. a
            brain mask of a skull-stripped volume).
    """

    def __init__(self, keys: KeysCollection = "mask", reference_key: str = "image", fill: str = "zeros") -> None:
        super().__init__(keys, allow_missing_keys=True)
        if fill not in ("zeros", "foreground"):
            raise ValueError(f"fill must be 'zeros' or 'foreground', got {fill!r}.")
        self.reference_key = reference_key
        self.fill = fill

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        reference = d[self.reference_key]
        for key in self.keys:
            mask = d.get(key)
            if mask is None:
                if self.fill == "zeros":
                    filled = torch.zeros_like(reference[:1], dtype=torch.float32)
                else:
                    filled = (reference != 0).any(0, keepdim=True).to(torch.float32)
                d[key] = filled
                continue
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask {key!r} must be loaded before EnsureMaskd, got {type(mask).__name__}.")
            if tuple(mask.shape[1:]) != tuple(reference.shape[1:]):
                source = getattr(mask, "meta", {}).get("filename_or_obj", key) if isinstance(mask, MetaTensor) else key
                raise ValueError(
                    f"mask {source} has size {tuple(mask.shape[1:])} but its image has size "
                    f"{tuple(reference.shape[1:])}."
                )
            d[key] = (mask > 0).any(0, keepdim=True).to(torch.float32)
        return d


class ResizeImaged(MapTransform):
    """Resize images ``(C, *spatial)`` without aliasing and without changing flat regions.

    Axes that shrink are box-averaged (``mode="area"``), axes that grow are interpolated
    (``bilinear``/``trilinear``). MONAI's ``Resize(anti_aliasing=True)`` is avoided on purpose: in
    MONAI 1.6 its Gaussian pre-filter pads with zeros and is not normalised, so a constant 0.5 image
    comes out 0.46 inside and 0.42 at the border, which a restoration model would learn as normal.

    Args:
        keys: image keys.
        spatial_size: output spatial size.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            current = tuple(image.shape[1:])
            if len(current) != len(self.spatial_size):
                raise ValueError(f"cannot resize a {len(current)}D image {key!r} to {self.spatial_size}.")
            shrunk = tuple(min(c, s) for c, s in zip(current, self.spatial_size))
            if shrunk != current:
                image = Resize(shrunk, mode="area")(image)
            if shrunk != self.spatial_size:
                image = Resize(self.spatial_size, mode="bilinear" if len(shrunk) == 2 else "trilinear")(image)
            d[key] = image
        return d


def image_transforms(
    image_size: int | Sequence[int],
    channels: int = 3,
    augment: bool = False,
    rotate90: bool = False,
    flips: bool = True,
    rotate_degrees: float = 0.0,
    image_key: str = "image",
    mask_key: str = "mask",
) -> Compose:
    """Load, scale and resize 2D images (and masks) from a datalist item such as ``mvtec_datalist``'s.

    Output per item: ``image`` float32 ``(channels, H, W)`` in [0, 1]; ``mask`` float32
    ``(1, H, W)`` in {0, 1} (zeros when the item has no mask). H is the image rows.

    Args:
        image_size: output size, an int for square images or ``(H, W)``.
        channels: 1 (gray, BT.601 luma) or 3 (RGB; gray files are repeated).
        augment: add random augmentation (applied to image and mask alike).
        rotate90: with ``augment``, random multiples of 90 degrees (FAIR: p = 0.3 in the paper's
            corruption; textures are rotation-invariant, objects often are not).
        flips: with ``augment``, random horizontal and vertical flips, p = 0.5 each.
        rotate_degrees: with ``augment``, random rotation in [-deg, deg] with p = 0.5 (ddpm_partial
            augments with rotation and flips); borders are filled by reflection.
        image_key: datalist key of the image path.
        mask_key: datalist key of the mask path (None or absent for normal images).
    """
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size}.")
    if augment and rotate90 and size[0] != size[1]:
        raise ValueError(f"rotate90 needs a square image_size (a turn swaps H and W), got {size}.")
    keys = [image_key, mask_key]
    transforms: list = [
        DropNoneKeysd(mask_key),
        LoadInputd(keys, reader=image_reader(), dtype=None, image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys, allow_missing_keys=True),
        CheckInputd(image_key, spatial_dims=2, mask_keys=[mask_key], anomaly_mask_key=mask_key),
        ScaleIntensityByDtyped(image_key),
        ToChannelsd(image_key, channels),
        EnsureMaskd(mask_key, reference_key=image_key),
        # Images: box average when shrinking (900 -> 256 without aliasing), bilinear when growing;
        # masks: nearest, so they stay binary.
        ResizeImaged(image_key, spatial_size=size),
        Resized(mask_key, spatial_size=size, mode="nearest"),
    ]
    if augment:
        if rotate90:
            transforms.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
        if flips:
            transforms += [RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1)]
        if rotate_degrees > 0:
            angle = math.radians(rotate_degrees)
            transforms.append(
                RandRotated(
                    keys, range_x=angle, prob=0.5, mode=("bilinear", "nearest"), padding_mode="reflection"
                )
            )
    transforms.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(transforms)


def anti_aliasing_sigma(current: Sequence[float], target: Sequence[float]) -> list[float]:
    """Gaussian σ in voxels before resampling from spacing ``current`` to ``target`` (mm), per axis.

    scikit-image's ``resize(anti_aliasing=True)`` rule ``σ = max(0, (zoom - 1) / 2)`` with ``zoom = target /
    current``: 0 on axes that keep or refine their spacing, 0.5 for a 2x coarser grid.
    """
    return [max(0.0, (float(t) / float(c) - 1.0) / 2.0) for c, t in zip(current, target)]


class GaussianAntiAliasd(MapTransform):
    """Gaussian pre-filter of the axes that a later ``Spacingd(pixdim)`` makes coarser (anti-aliasing).

    ``Spacingd`` interpolates without low-pass filtering, so downsampling a 1 mm volume to 2 mm aliases fine
    texture into patterns a restoration model then learns as normal (DISYRE's data are downsampled with
    anti-aliasing, issue #11). Put this
    right before ``Spacingd`` with the same ``pixdim``; it reads the current voxel size from the MetaTensor's
    affine and filters with :func:`anti_aliasing_sigma` (edge-replicating borders, so a constant stays
    constant). Masks must not go through it (they are resampled with nearest neighbours).

    Args:
        keys: image keys (channel-first MetaTensors ``(C, *spatial)``).
        pixdim: the target voxel size in mm, one value or one per axis.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, pixdim: float | Sequence[float], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pixdim = pixdim

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            spatial_dims = image.ndim - 1
            current = [float(v) for v in torch.as_tensor(image.pixdim)[:spatial_dims]] if isinstance(
                image, MetaTensor) else [1.0] * spatial_dims
            target = [float(self.pixdim)] * spatial_dims if np.isscalar(self.pixdim) else list(self.pixdim)
            # Spacingd keeps an axis whose target is <= 0 or missing; so does the filter
            target = [t if t and t > 0 else c for c, t in zip(current, list(target) + current[len(target):])]
            sigma = anti_aliasing_sigma(current, target)
            if any(s > 0 for s in sigma):
                d[key] = gaussian_filter_map(image[None].float(), sigma, padding_mode="replicate")[0]
        return d
