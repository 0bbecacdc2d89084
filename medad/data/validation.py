"""Bad input gives one clear error naming the file, never a silent wrong map.

What is checked (every rule raises :class:`InvalidInputError`, a ``ValueError`` whose message is one sentence
``"<file>: <problem>."``):

============================  ================================================================================
input                         behaviour
============================  ================================================================================
truncated / corrupt file      error: not a readable image (the reader's reason in brackets)
4D volume (4th dim > 1)       error: a 4D series where one 3D volume is expected (a 4th dim of 1 is accepted)
2D file where 3D is expected  error (and the reverse)
NaN / infinite values         error with the count: replace them (e.g. with 0) before running
image of one constant value   accepted (a blank image is a valid, if odd, input)
mask of another size          error naming the mask and both sizes
empty mask of an anomalous    error: the datalist marks the case anomalous (its mask file exists) but the mask
case                          has no foreground; fix the mask or remove it (the case then counts as normal)
16-bit / gray / palette PNG   accepted: scaled by the file's own range, converted to the requested channels
folder with no images         error from the datalist builders naming the folder
============================  ================================================================================

MONAI wraps an exception raised inside a ``Compose`` as ``RuntimeError("applying transform ...")`` (and the
``DataLoader`` of a worker process re-raises it with the traceback as text); :func:`clear_input_errors` unwraps
those so the user sees only the sentence above.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform

__all__ = ["InvalidInputError", "LoadInputd", "CheckInputd", "input_error", "clear_input_errors"]


class InvalidInputError(ValueError):
    """An input file that cannot be used; the message names the file and the problem in one sentence."""


def _source(value: Any, fallback: str) -> str:
    if isinstance(value, MetaTensor):
        name = value.meta.get("filename_or_obj")
        if name:
            return str(name)
    return fallback


def _reason(error: BaseException) -> str:
    # MONAI's "no suitable reader" message is several lines of installation advice; keep its first line.
    text = " ".join(str(error).strip().splitlines()[:1]) or type(error).__name__
    return f"{type(error).__name__}: {text}"


class LoadInputd(LoadImaged):
    """``LoadImaged`` whose failures name the file: ``"<file>: not a readable image file (<reason>)."``.

    A folder is read as a DICOM series (:class:`medad.io.dicom.DicomSeriesReader`, no patient data kept).
    Same arguments as :class:`monai.transforms.LoadImaged` with ``image_only=True`` (meta data travel in the
    ``MetaTensor``); files are only read, never modified.
    """

    def __init__(self, keys: KeysCollection, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("image_only", True)
        if not kwargs["image_only"]:
            raise ValueError("LoadInputd keeps the meta data in the MetaTensor; use image_only=True.")
        super().__init__(keys, *args, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            try:
                if reader is None and isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
                    from medad.io.dicom import DicomSeriesReader  # a folder is a DICOM series

                    d[key] = self._loader(path, DicomSeriesReader())
                    continue
                d[key] = self._loader(path, reader)
            except InvalidInputError:
                raise
            except Exception as error:  # readers raise many types for truncated or foreign files
                raise InvalidInputError(f"{path}: not a readable image file ({_reason(error)}).") from error
        return d


class CheckInputd(MapTransform):
    """Check loaded, channel-first images ``(C, *spatial)`` and their masks before anything is computed.

    Args:
        keys: image key(s).
        spatial_dims: 2 (pictures) or 3 (volumes); a file of the other kind is an error.
        mask_keys: masks checked against the first image key (same spatial size, finite values).
        anomaly_mask_key: the ground-truth mask, which must not be empty when the item's ``label_key`` is 1
            (the datalist says the case is anomalous); None skips this check.
        label_key: datalist key of the image label.
        max_channels: more channels than this is an error (3D: 1, so a 4D series is caught; 2D: 4 for RGBA).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        spatial_dims: int = 2,
        mask_keys: KeysCollection = ("mask",),
        anomaly_mask_key: str | None = "mask",
        label_key: str = "label",
        max_channels: int | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.mask_keys = [mask_keys] if isinstance(mask_keys, str) else list(mask_keys)
        self.anomaly_mask_key = anomaly_mask_key
        self.label_key = label_key
        self.max_channels = max_channels if max_channels is not None else (1 if spatial_dims == 3 else 4)

    def _check_image(self, image: torch.Tensor, name: str) -> None:
        spatial = tuple(image.shape[1:])
        if len(spatial) != self.spatial_dims:
            kind = "3D volume" if self.spatial_dims == 3 else "2D image"
            raise InvalidInputError(f"{name}: expected a {kind} but the file holds an array of size {spatial}.")
        if image.shape[0] > self.max_channels:
            if self.spatial_dims == 3:
                raise InvalidInputError(
                    f"{name}: a 4D series of {image.shape[0]} volumes where one 3D volume is expected; "
                    "split it and pass one volume."
                )
            raise InvalidInputError(f"{name}: {image.shape[0]} channels, at most {self.max_channels} are supported.")
        if min(spatial) < 1:
            raise InvalidInputError(f"{name}: the image is empty (size {spatial}).")
        if image.is_floating_point():
            bad = int((~torch.isfinite(image)).sum())
            if bad:
                raise InvalidInputError(
                    f"{name}: {bad} voxel(s) are NaN or infinite; replace them (e.g. with 0) before running."
                )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        reference = None
        for key in self.key_iterator(d):
            name = _source(d[key], str(key))
            self._check_image(d[key], name)
            reference = reference if reference is not None else (d[key], name)
        if reference is None:
            return d
        image, image_name = reference
        for key in self.mask_keys:
            mask = d.get(key)
            if not isinstance(mask, torch.Tensor):
                continue
            mask_name = _source(mask, str(key))
            if tuple(mask.shape[1:]) != tuple(image.shape[1:]):
                raise InvalidInputError(
                    f"mask {mask_name} has size {tuple(mask.shape[1:])} but its image has size "
                    f"{tuple(image.shape[1:])} ({image_name})."
                )
            if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
                raise InvalidInputError(f"{mask_name}: the mask contains NaN or infinite values.")
            label = d.get(self.label_key) if key == self.anomaly_mask_key else None
            if label is not None and int(label) == 1 and not bool((mask > 0).any()):
                raise InvalidInputError(
                    f"{mask_name}: the mask is empty although it marks {image_name} as anomalous; "
                    "fix the mask or remove it (the case then counts as normal)."
                )
        return d


_TEXT_ERROR = re.compile(r"InvalidInputError: (.+)")


def input_error(error: BaseException) -> InvalidInputError | None:
    """The :class:`InvalidInputError` behind ``error`` (MONAI / DataLoader wrapping removed), or None."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, InvalidInputError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    # A DataLoader worker re-raises with the original traceback as text.
    match = _TEXT_ERROR.findall(str(error))
    return InvalidInputError(match[-1].strip()) if match else None


def clear_input_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``batches``; an :class:`InvalidInputError` raised while loading surfaces as itself, unwrapped."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as error:
            clear = input_error(error)
            if clear is None or clear is error:
                raise
            raise InvalidInputError(str(clear)) from None
        yield batch
