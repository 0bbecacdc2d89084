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
singular / non-finite affine  error: the voxel-to-world matrix has no inverse (or holds NaN/inf); fix the header
empty mask of an anomalous    accepted with one warning naming the files: the case stays anomalous at image level
case                          (it counts in image AUROC) and contributes no positive pixel (its pixels count as
                              normal in the pixel metrics); MVTec AD ships a few such masks
non-square picture            accepted with one warning (it is resized to ``image_size``, changing its aspect ratio;
                              maps are written back at the file's own size)
16-bit / gray / palette PNG   accepted: scaled by the file's own range, converted to the requested channels
folder with no images         error from the datalist builders naming the folder
============================  ================================================================================

:func:`check_files` checks a whole datalist before anything is computed (file headers only: cheap) and reports
every bad file together (up to :data:`MAX_REPORTED`) in one error; the datalist builders and the evaluator call it.

MONAI wraps an exception raised inside a ``Compose`` as ``RuntimeError("applying transform ...")`` (and the
``DataLoader`` of a worker process re-raises it with the traceback as text); :func:`clear_input_errors` unwraps
those so the user sees only the sentence above.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform

__all__ = [
    "MAX_REPORTED",
    "InvalidInputError",
    "LoadInputd",
    "CheckInputd",
    "affine_problem",
    "check_files",
    "input_error",
    "clear_input_errors",
]

logger = logging.getLogger("medad.data")

#: At most this many bad files are named in one error.
MAX_REPORTED = 20

_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".mgz", ".mgh")
_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Masks already named in a warning, so a file is warned about once per process (datalist check, then loading).
_warned_empty_masks: set[str] = set()


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


def affine_problem(affine: Any) -> str | None:
    """Why a voxel-to-world ``affine`` (4x4) cannot place the voxels in space, or None when it can.

    Singular (a zero or collapsed axis, e.g. a pixdim of 0) or non-finite matrices are rejected: orientation,
    resampling and writing results back on the input's grid all invert it.
    """
    matrix = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        return f"the affine has shape {matrix.shape} instead of 4x4"
    if not np.isfinite(matrix).all():
        return "the affine (voxel-to-world matrix) holds NaN or infinite values"
    singular = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    if singular[0] <= 0 or singular[-1] <= 1e-6 * singular[0]:
        return "the affine (voxel-to-world matrix) is singular, so the voxels have no position in space"
    return None


def _header_problem(path: str) -> str | None:
    """A problem found from the file's header alone (cheap), or None."""
    lower = path.lower()
    if lower.endswith(_NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            image = nib.load(path)
        except Exception as error:  # nibabel raises many types for truncated or foreign files
            return f"not a readable image file ({_reason(error)})"
        problem = affine_problem(image.affine)
        return f"{problem}; fix the file's sform/qform (e.g. copy them from the scan it came from)" if problem else None
    if lower.endswith(_PICTURE_SUFFIXES):
        from PIL import Image

        try:
            with Image.open(path) as picture:
                picture.verify()  # chunk structure and checksums, without decoding the pixels
        except Exception as error:
            return f"not a readable image file ({_reason(error)})"
    return None


def _picture_size(path: str) -> tuple[int, int] | None:
    if not path.lower().endswith(_PICTURE_SUFFIXES):
        return None
    from PIL import Image

    with Image.open(path) as picture:
        return int(picture.height), int(picture.width)


def _is_empty_picture(path: str) -> bool:
    from PIL import Image

    with Image.open(path) as picture:
        return not np.asarray(picture).any()


def check_files(
    items: Sequence[Mapping[str, Any]],
    keys: Sequence[str] = ("image", "mask", "brain_mask"),
    mask_key: str = "mask",
    label_key: str = "label",
    image_size: Sequence[int] | None = None,
    max_reported: int = MAX_REPORTED,
) -> None:
    """Check every file of a datalist before any result is computed; report all bad files in one error.

    Per file (headers only, no pixel data decoded except for 2D anomaly masks): it exists, it is readable, a volume's
    affine is invertible and finite (:func:`affine_problem`). Warnings, once each: 2D ground-truth masks of anomalous
    items that are empty (the case stays anomalous, with no positive pixel), and pictures whose aspect ratio differs
    from ``image_size`` (they are resized, not padded).

    Args:
        items: datalist items; ``keys`` hold file paths (or None); folders (DICOM series) are left to the loader.
        keys: the item keys holding files.
        mask_key / label_key: the ground-truth mask and the image label (1 anomalous).
        image_size: ``(H, W)`` the pictures are resized to, for the aspect-ratio warning; None skips it.
        max_reported: at most this many bad files are named.

    Raises:
        InvalidInputError: one sentence naming every bad file (up to ``max_reported``) and its problem.
    """
    problems: list[str] = []
    empty_masks: list[str] = []
    distorted: list[tuple[str, tuple[int, int]]] = []
    aspect = None if image_size is None else float(image_size[0]) / float(image_size[1])
    for item in items:
        for key in keys:
            path = item.get(key)
            if not isinstance(path, (str, os.PathLike)):
                continue
            path = os.fspath(path)
            if os.path.isdir(path):
                continue
            problem = "the file does not exist" if not os.path.isfile(path) else _header_problem(path)
            if problem:
                problems.append(f"{path}: {problem}")
                continue
            if key == mask_key and item.get(label_key) == 1 and path.lower().endswith(_PICTURE_SUFFIXES):
                if path not in _warned_empty_masks and _is_empty_picture(path):
                    empty_masks.append(path)
            elif key == "image" and aspect is not None:
                size = _picture_size(path)
                if size is not None and abs(size[0] / size[1] - aspect) > 0.01 * aspect:
                    distorted.append((path, size))
    if problems:
        shown = "; ".join(problems[:max_reported])
        more = f"; and {len(problems) - max_reported} more" if len(problems) > max_reported else ""
        if len(problems) == 1:
            raise InvalidInputError(f"{shown}.")
        raise InvalidInputError(f"{len(problems)} input files cannot be used (fix or remove them): {shown}{more}.")
    if empty_masks:
        _warn_empty_masks(empty_masks)
    if distorted:
        path, (height, width) = distorted[0]
        logger.warning(
            "%d picture(s) do not have the aspect ratio of image_size %s (e.g. %s, %dx%d px): they are resized to it, "
            "which stretches them; maps are written back at each file's own size (pad or crop them to that aspect "
            "ratio first to avoid the stretch).",
            len(distorted), tuple(int(s) for s in image_size), path, height, width,
        )


def _warn_empty_masks(paths: Sequence[str]) -> None:
    _warned_empty_masks.update(paths)
    more = f" and {len(paths) - MAX_REPORTED} more" if len(paths) > MAX_REPORTED else ""
    shown = ", ".join(paths[:MAX_REPORTED]) + more
    logger.warning(
        "%d ground-truth mask(s) of anomalous cases are empty (%s): those cases stay anomalous for the image metrics "
        "and add no positive pixel to the pixel metrics.", len(paths), shown,
    )


class LoadInputd(LoadImaged):
    """``LoadImaged`` whose failures name the file: ``"<file>: not a readable image file (<reason>)."``.

    A folder is read as a DICOM series by ``folder_reader`` (default :class:`medad.data.dicom.DicomSeriesReader`;
    :func:`medad.data.readers.volume_reader` gives the ITK one), no patient data kept.
    Same arguments as :class:`monai.transforms.LoadImaged` with ``image_only=True`` (meta data travel in the
    ``MetaTensor``); files are only read, never modified.
    """

    def __init__(self, keys: KeysCollection, *args: Any, folder_reader: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("image_only", True)
        if not kwargs["image_only"]:
            raise ValueError("LoadInputd keeps the meta data in the MetaTensor; use image_only=True.")
        super().__init__(keys, *args, **kwargs)
        self.folder_reader = folder_reader

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            try:
                if reader is None and isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
                    from medad.data.dicom import DicomSeriesReader  # a folder is a DICOM series

                    d[key] = self._loader(path, self.folder_reader or DicomSeriesReader())
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
        anomaly_mask_key: the ground-truth mask; when it is empty although the item's ``label_key`` is 1 (the
            datalist says the case is anomalous) one warning names it (the case stays anomalous, without a
            positive pixel); None skips this check.
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
        if self.spatial_dims == 3 and isinstance(image, MetaTensor):
            problem = affine_problem(image.meta.get("original_affine", image.affine))
            if problem:
                raise InvalidInputError(f"{name}: {problem}; fix the file's sform/qform before running.")
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
                if mask_name not in _warned_empty_masks:
                    _warn_empty_masks([mask_name])
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
