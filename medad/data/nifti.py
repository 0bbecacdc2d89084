"""Datalists and loading transforms for a folder of NIfTI volumes with optional lesion and brain masks.

Matching rule (``nifti_datalist``): names are compared without ``.nii``/``.nii.gz``. A file in
``mask_dir`` is a mask when its name ends with one of ``mask_suffixes``; removing that suffix gives
its *base*. A mask belongs to an image whose name
  1. equals the base (``case1.nii.gz`` <- ``case1_mask.nii.gz``), or
  2. starts with ``base + "_"`` (BIDS/BraTS: ``sub-01_T1w`` <- ``sub-01_lesion``;
     ``BraTS_001_t1`` <- ``BraTS_001_seg``), or
  3. is a prefix of the base followed by ``"_"`` (``sub-01_T1w`` <- ``sub-01_T1w_desc-lesion_mask``).
The underscore boundary keeps ``sub-1`` from matching ``sub-10``. When several masks match one
image the exact match wins, then the longest base; a remaining tie is an error. Brain masks in
``brain_mask_dir`` follow the same rule with ``brain_mask_suffixes``. Files in ``image_dir`` whose
names end with a mask suffix are never taken as images, so masks may sit next to their images.

A folder under ``image_dir`` (or ``image_dir`` itself) that holds DICOM files is one case, a DICOM series read with
ITK or SimpleITK (the ``reader`` setting of :func:`volume_transforms`; :mod:`medad.data.readers`); its name is the name compared with the masks' bases, and the inference and
evaluation write DICOM Segmentation / Parametric Map files for it besides the NIfTI ones.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Spacingd,
)

from medad.data.transforms import DropNoneKeysd, EnsureMaskd, GaussianAntiAliasd
from medad.data.validation import CheckInputd, LoadInputd, check_files

__all__ = [
    "MASK_SUFFIXES",
    "BRAIN_MASK_SUFFIXES",
    "nifti_stem",
    "nifti_datalist",
    "ScalePercentilesInMaskd",
    "volume_transforms",
]

MASK_SUFFIXES: tuple[str, ...] = ("_mask", "_seg", "_label", "_lesion")
BRAIN_MASK_SUFFIXES: tuple[str, ...] = ("_brain_mask", "_brainmask")


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii.gz``, ``.nii`` (or any one other extension)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _strip_suffix(stem: str, suffixes: Sequence[str]) -> str | None:
    # Longest suffix first, so "x_brain_mask" gives "x" and not "x_brain".
    for suffix in sorted(suffixes, key=len, reverse=True):
        if stem.lower().endswith(suffix.lower()) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return None


def _index_masks(folder: Path, suffixes: Sequence[str], other_suffixes: Sequence[str]) -> dict[str, Path]:
    """Map base name -> mask path for the masks in ``folder``; files that are rather one of
    ``other_suffixes`` (a brain mask in a shared folder) are skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"mask folder {folder} does not exist.")
    bases: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.nii*")):
        stem = nifti_stem(path)
        base = _strip_suffix(stem, suffixes)
        if base is None or (other_suffixes and _is_rather_other(suffixes, other_suffixes, stem)):
            continue
        if base in bases:
            raise ValueError(f"masks {bases[base]} and {path} both belong to case {base!r}.")
        bases[base] = path
    return bases


def _is_rather_other(suffixes: Sequence[str], exclude: Sequence[str], stem: str) -> bool:
    # "x_brain_mask" ends with "_mask" (a lesion-mask suffix) but is a brain mask: the longer match decides.
    longest = max((len(s) for s in suffixes if stem.lower().endswith(s.lower())), default=0)
    longest_excluded = max((len(s) for s in exclude if stem.lower().endswith(s.lower())), default=0)
    return longest_excluded > longest


def _match(stem: str, bases: Mapping[str, Path], image: Path, what: str) -> Path | None:
    if stem in bases:
        return bases[stem]
    candidates = [b for b in bases if stem.startswith(b + "_") or b.startswith(stem + "_")]
    if not candidates:
        return None
    candidates.sort(key=len, reverse=True)
    if len(candidates) > 1 and len(candidates[0]) == len(candidates[1]):
        names = ", ".join(str(bases[b]) for b in candidates if len(b) == len(candidates[0]))
        raise ValueError(f"image {image} matches several {what} files ({names}); rename them to one per case.")
    return bases[candidates[0]]


def nifti_datalist(
    image_dir: str | Path,
    mask_dir: str | Path | None = None,
    image_glob: str = "*.nii*",
    mask_suffixes: Sequence[str] = MASK_SUFFIXES,
    brain_mask_dir: str | Path | None = None,
    brain_mask_suffixes: Sequence[str] = BRAIN_MASK_SUFFIXES,
    require_masks: bool = False,
    check: bool = True,
    dicom: bool = True,
) -> list[dict]:
    """List NIfTI volumes (and DICOM series folders) with their lesion and brain masks (rule: module docstring).

    Args:
        image_dir: folder of volumes; ``image_glob`` may descend (``"*/*_t1.nii.gz"``).
        mask_dir: folder (searched recursively) of lesion masks, or None for healthy volumes.
        image_glob: glob pattern of the images inside ``image_dir``.
        mask_suffixes: name endings that mark a lesion mask.
        brain_mask_dir: folder (searched recursively) of brain masks, or None.
        brain_mask_suffixes: name endings that mark a brain mask.
        require_masks: raise when an image has no lesion mask (instead of ``mask=None``).
        check: read every file's header first (:func:`medad.data.validation.check_files`): unreadable files and
            singular / non-finite affines are reported together, before anything is computed.
        dicom: also list the folders holding a DICOM series (:func:`medad.data.dicom.find_dicom_series`) as cases.

    Returns:
        items sorted by path: ``{"image": str, "mask": str | None, "brain_mask": str | None,
        "case_id": str, "label": 0 | 1}``. ``case_id`` is the image path relative to ``image_dir``
        without extension (a DICOM folder: its path relative to ``image_dir``, or its name when it is
        ``image_dir``); ``label`` is 1 when the image has a mask file (its content is not read).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist.")
    not_images = tuple(mask_suffixes) + tuple(brain_mask_suffixes)
    images = [
        (p, nifti_stem(p)) for p in image_dir.glob(image_glob)
        if p.is_file() and _strip_suffix(nifti_stem(p), not_images) is None
    ]
    if dicom:
        from medad.data.dicom import find_dicom_series

        images += [(folder, folder.name) for folder in find_dicom_series(image_dir)]
    images.sort()
    if not images:
        raise FileNotFoundError(f"no images found in {image_dir} matching {image_glob!r} (mask files excluded) and no "
                                "DICOM series folder.")

    # Brain masks are never lesion masks, even when both share a folder ("x_brain_mask" ends with "_mask").
    masks = _index_masks(Path(mask_dir), mask_suffixes, brain_mask_suffixes) if mask_dir else {}
    brains = _index_masks(Path(brain_mask_dir), brain_mask_suffixes, ()) if brain_mask_dir else {}

    items = []
    for image, stem in images:
        mask = _match(stem, masks, image, "mask")
        if mask is None and require_masks:
            raise FileNotFoundError(f"image {image} has no mask in {mask_dir} (expected e.g. {stem}_mask.nii.gz).")
        brain = _match(stem, brains, image, "brain mask")
        relative = image.relative_to(image_dir)
        if image.is_dir():  # a DICOM series folder
            case_id = stem if relative == Path(".") else str(relative)
        else:
            case_id = str(relative.parent / nifti_stem(relative)) if relative.parent != Path(".") else stem
        items.append(
            {
                "image": str(image),
                "mask": None if mask is None else str(mask),
                "brain_mask": None if brain is None else str(brain),
                "case_id": case_id,
                "label": int(mask is not None),
            }
        )
    if check:
        check_files(items)
    return items


class ScalePercentilesInMaskd(MapTransform):
    """Map the [lower, upper] percentiles of the intensities inside a mask to [b_min, b_max], clipped.

    ``ScaleIntensityRangePercentilesd`` takes percentiles over the whole volume, where the zero
    background of a skull-stripped brain dominates; here they are taken over brain voxels
    (``mask_key``; voxels != 0 when the item has no such key). Voxels outside the mask are set to
    ``b_min``. Shapes ``(C, *spatial)``; the mask ``(1, *spatial)``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = "brain_mask",
        lower: float = 0.5,
        upper: float = 99.5,
        b_min: float = 0.0,
        b_max: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}.")
        self.mask_key, self.lower, self.upper, self.b_min, self.b_max = mask_key, lower, upper, b_min, b_max

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key].to(torch.float32)
            inside = d[self.mask_key] > 0 if self.mask_key in d else (image != 0).any(0, keepdim=True)
            inside = torch.as_tensor(inside).expand(image.shape)
            values = torch.as_tensor(image)[inside]
            if values.numel() == 0:
                d[key] = image.fill_(self.b_min)
                continue
            # torch.quantile refuses very large inputs; a strided subsample of > 1M voxels is as good.
            values = values[:: max(1, values.numel() // 1_000_000)]
            low, high = torch.quantile(values, torch.tensor([self.lower, self.upper]) / 100).tolist()
            scaled = ((image - low) / max(high - low, 1e-8)).clamp(0, 1) * (self.b_max - self.b_min) + self.b_min
            d[key] = scaled.masked_fill(~inside, self.b_min)
        return d


def volume_transforms(
    pixdim: Sequence[float] | float | None = None,
    axcodes: str = "RAS",
    intensity: str | None = "percentile",
    lower: float = 0.5,
    upper: float = 99.5,
    image_key: str = "image",
    mask_key: str = "mask",
    brain_mask_key: str = "brain_mask",
    anti_aliasing: bool = True,
    reader: str = "auto",
    checks: Sequence[Callable] = (),
) -> Compose:
    """Load NIfTI volumes (and masks) from a ``nifti_datalist`` item, keeping the affine in the meta.

    Output: ``image`` float32 ``(1, X, Y, Z)`` MetaTensor in ``axcodes`` orientation (its ``affine``
    maps voxels to the scanner space of the file, for writing results back); ``mask`` and
    ``brain_mask`` float32 ``(1, X, Y, Z)`` in {0, 1}: a missing lesion mask is zeros, a missing
    brain mask is the image's non-zero voxels (skull-stripped input).

    Args:
        pixdim: resample to this voxel size in mm (image trilinear, masks nearest); None keeps it.
        axcodes: orientation, ``"RAS"`` as nibabel's canonical.
        intensity: ``"percentile"`` maps the [lower, upper] percentiles inside the brain to [0, 1]
            (``ScalePercentilesInMaskd``); None leaves intensities as stored (already preprocessed).
        lower, upper: percentiles for ``intensity="percentile"``.
        image_key, mask_key, brain_mask_key: datalist keys.
        anti_aliasing: with ``pixdim``, low-pass the image before it is resampled to a coarser grid
            (:class:`medad.data.transforms.GaussianAntiAliasd`, scikit-image's ``anti_aliasing`` rule).
        reader: ``"auto"`` (ITK when installed), ``"itk"`` (MONAI's ITKReader) or ``"sitk"`` (nibabel for NIfTI,
            SimpleITK for DICOM series and NRRD); both give the same arrays and affines (:mod:`medad.data.readers`).
        checks: transforms run on each volume as read (its own grid, before any resampling), e.g.
            :class:`medad.transforms.mri.CheckBrainGeometryd`: a brain measured after resampling to another grid
            is not what the file holds (a linearly upsampled ``image > 0`` grows by a rim).
    """
    from medad.data.readers import volume_reader

    keys = [image_key, mask_key, brain_mask_key]
    volume_file_reader = volume_reader(reader)
    transforms: list = [
        DropNoneKeysd([mask_key, brain_mask_key]),
        LoadInputd(keys, reader=volume_file_reader, folder_reader=volume_file_reader, image_only=True,
                   allow_missing_keys=True),
        EnsureChannelFirstd(keys, allow_missing_keys=True),
        CheckInputd(image_key, spatial_dims=3, mask_keys=[mask_key, brain_mask_key], anomaly_mask_key=mask_key),
        # Labels given explicitly: MONAI 1.6 warns that their default will change.
        Orientationd(keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
        # A missing brain mask is the skull-stripped image's non-zero voxels on the file's own grid, resampled
        # with the image below (nearest): derived after resampling, an upsampled image's ``!= 0`` grows by a rim.
        EnsureMaskd(brain_mask_key, reference_key=image_key, fill="foreground"),
        *checks,
    ]
    if pixdim is not None:
        if anti_aliasing:  # Gaussian pre-filter where the new grid is coarser
            transforms.append(GaussianAntiAliasd(image_key, pixdim=pixdim))
        transforms.append(
            Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest", "nearest"), allow_missing_keys=True)
        )
    transforms += [
        EnsureTyped(image_key, dtype=torch.float32),
        EnsureMaskd(mask_key, reference_key=image_key, fill="zeros"),
    ]
    if intensity == "percentile":
        transforms.append(ScalePercentilesInMaskd(image_key, mask_key=brain_mask_key, lower=lower, upper=upper))
    elif intensity is not None:
        raise ValueError(f"intensity must be 'percentile' or None, got {intensity!r}.")
    return Compose(transforms)
