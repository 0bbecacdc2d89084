"""Builders the bundle configs call: data loaders for image folders (MVTec layout) and the embedded demo."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset

from medad.transforms.augment import AugmentingCollate, RandFlipBatch, RandSliceAugmentation

from .distributed import is_distributed, main_process_first, rank

__all__ = [
    "image_loaders", "image_folder_loader", "volume_loaders", "volume_input_transforms", "slice_training_transforms",
    "slice_augmentation",
]

logger = logging.getLogger(__name__)


def _loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, drop_last: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    sampler = None
    if shuffle and is_distributed():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True)  # each rank sees its own share
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        **({"collate_fn": collate_fn} if collate_fn is not None else {}),
    )


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    return (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)


def image_loaders(
    dataset_dir: str | os.PathLike | None,
    category: str | None = None,
    image_size: int | Sequence[int] = 256,
    channels: int = 3,
    batch_size: int = 8,
    eval_batch_size: int = 8,
    augment: bool = False,
    batch_augment: bool = True,
    rotate90: bool = False,
    val_fraction: float = 0.1,
    num_workers: int = 0,
    demo_dir: str | os.PathLike | None = None,
    demo_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    max_train_images: int | None = None,
    cache: bool = True,
) -> dict[str, DataLoader]:
    """Train / calibration / test loaders for an MVTec-AD-layout folder, or the embedded demo when none is given.

    Args:
        dataset_dir: an MVTec AD category folder, or the dataset root with ``category``; None: the embedded
            demo data, generated (once) into ``demo_dir``.
        category: category folder inside ``dataset_dir``.
        image_size: images are resized to this.
        channels: 1 (gray) or 3 (RGB).
        batch_size / eval_batch_size: training / evaluation batch sizes.
        augment / rotate90: training augmentation: random flips along both axes (p = 0.5 each, applied to each
            training batch at once), and with ``rotate90`` random quarter turns first (then all per image).
        batch_augment: flip whole batches (:class:`medad.transforms.augment.RandFlipBatch`); False: MONAI's
            ``RandFlipd`` on every image (the same distribution, other draws; 11-12 % of a quick step).
        val_fraction: part of ``train/good`` held out (never trained on) to calibrate thresholds.
        num_workers: DataLoader workers.
        demo_dir: where the demo data goes; demo_kwargs: arguments of :func:`medad.data.make_demo_mvtec`.
        seed: seed of the train/validation split.
        max_train_images: use only the first N training images (quick runs).
        cache: keep decoded, resized images in memory (``monai.data.CacheDataset``).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``; ``val`` holds normal images only.
    """
    from medad import data

    if dataset_dir is None:
        if demo_dir is None:
            raise ValueError("either dataset_dir or demo_dir must be given.")
        with main_process_first():  # under DDP rank 0 writes the demo data once, the others read it
            root = data.make_demo_mvtec(Path(demo_dir), **(demo_kwargs or {}))
        # said, not silent: a shipped model evaluated without --dataset_dir scores these synthetic images
        logger.info("no --dataset_dir: training and test images are the embedded demo data in %s", root)
        category = None
    else:
        root = Path(dataset_dir)
    train_list = data.mvtec_datalist(root, category, split="train")
    train_list, val_list = data.split_train_val(train_list, val_fraction, seed=seed)
    if max_train_images:
        train_list = train_list[: int(max_train_images)]
    test_list = data.mvtec_datalist(root, category, split="test")
    # every file's header before any decoding: all bad files in one error, one warning for empty masks
    data.check_files(train_list + val_list + test_list, image_size=_size_hw(image_size))
    # flips only (the usual case) run on whole batches (RandFlipBatch); with rotate90 the per-image MONAI chain
    batch_flips = augment and batch_augment and not rotate90
    train_tf = data.image_transforms(image_size, channels, augment=augment and not batch_flips, rotate90=rotate90)
    eval_tf = data.image_transforms(image_size, channels, augment=False)
    collate = AugmentingCollate(_seeded(RandFlipBatch(("image", "mask"), prob=0.5), seed)) if batch_flips else None
    # Decoding and resizing are deterministic: cache them once (CacheDataset stops at the first random transform).
    def cached(items: list, transform: Any) -> Dataset:
        return CacheDataset(items, transform, progress=False) if cache else Dataset(items, transform)

    return {
        "train": _loader(cached(train_list, train_tf), batch_size, True, num_workers,
                         drop_last=len(train_list) > batch_size, collate_fn=collate),
        "val": _loader(cached(val_list, eval_tf), eval_batch_size, False, num_workers),
        "test": _loader(cached(test_list, eval_tf), eval_batch_size, False, num_workers),
    }


def image_folder_loader(
    input_dir: str | os.PathLike,
    image_size: int | Sequence[int] = 256,
    channels: int = 3,
    batch_size: int = 8,
    num_workers: int = 0,
) -> DataLoader:
    """A loader over every image under ``input_dir`` (recursively), for inference on new, unlabelled images."""
    from medad import data

    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in data.IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{root}: no images found (looked for {', '.join(data.IMAGE_EXTENSIONS)}).")
    items = [
        {"image": str(p), "mask": None, "case_id": str(p.relative_to(root).with_suffix("")).replace(os.sep, "_")}
        for p in files
    ]
    data.check_files(items, image_size=_size_hw(image_size))
    return _loader(Dataset(items, data.image_transforms(image_size, channels, augment=False)), batch_size, False, num_workers)


def _seeded(augmentation: Any, seed: int) -> Any:
    """Seed a batch augmentation (MONAI seeds a loader's dataset transforms, not its collate_fn, and
    ``set_determinism`` leaves ``Randomizable.R`` alone); each DDP rank draws its own stream."""
    augmentation.set_random_state(seed=(int(seed) + rank()) % (2**32))
    return augmentation


def slice_augmentation(
    image_key: str = "image", brain_mask_key: str = "brain_mask", patch_size: Sequence[int] | None = None,
    seed: int = 0,
) -> AugmentingCollate:
    """DISYRE's official training augmentation (:class:`medad.transforms.augment.RandSliceAugmentation`) as the
    ``collate_fn`` of a slice loader: each collated batch is augmented at once, every slice with its own draws.

    The elastic field's control-point spacing and magnitude follow the training patch (``patch / 8`` pixels,
    displacement 0-``patch / 16``; 128 when whole slices are used).
    """
    side = min(patch_size) if patch_size else 128
    augmentation = RandSliceAugmentation(image_key, brain_mask_key, elastic_spacing=max(2, side // 8),
                                         elastic_magnitude=(0.0, max(1.0, side / 16)))
    return AugmentingCollate(_seeded(augmentation, seed))


def slice_training_transforms(
    slices_per_volume: int,
    patch_size: Sequence[int] | None,
    size_divisor: int,
    image_key: str = "image",
    brain_mask_key: str = "brain_mask",
) -> list:
    """Random axial slices (through the brain) of a loaded ``(1, X, Y, Z)`` volume, as ``(1, H, W)`` patches.

    Slices are drawn in proportion to their brain voxels (:class:`medad.transforms.slices.RandBrainSlicesd`, the
    sampling of ``RandCropByPosNegLabeld`` on the brain mask in one plain-tensor call), so training never sees
    empty slices; with ``patch_size`` each is randomly cropped (DISYRE trains on 128² patches of axial slices) and
    then zero-padded to a multiple of ``size_divisor``. Only the image and the brain mask are kept: training needs
    nothing else (the augmentation, when asked for, runs on whole batches: :func:`slice_augmentation`).
    """
    from medad.transforms.slices import RandBrainSlicesd

    keys = [image_key, brain_mask_key]
    return [RandBrainSlicesd(keys, label_key=brain_mask_key, num_samples=slices_per_volume, patch_size=patch_size,
                             size_divisor=size_divisor)]


def volume_input_transforms(
    pixdim: float | Sequence[float] | None = None,
    intensity: str | None = None,
    space_reference: dict[str, Any] | None = None,
    space_tolerance: float = 0.1,
) -> Callable:
    """Load a test or input volume as a model expects it (:func:`medad.data.volume_transforms`) and, given the
    brain geometry of the model's training volumes (``space_reference``), warn, naming the file, when the volume's
    brain is more than ``space_tolerance`` outside it (:class:`medad.transforms.mri.CheckBrainGeometryd`), measured
    on the volume as read, as the training volumes' geometry was
    (:func:`~medad.transforms.mri.brain_geometry_range`)."""
    from medad import data
    from medad.transforms.mri import CheckBrainGeometryd

    checks = [CheckBrainGeometryd("brain_mask", space_reference, tolerance=space_tolerance)] if space_reference else []
    return data.volume_transforms(pixdim=pixdim, intensity=intensity, checks=checks)


def _demo_on_grid(demo_kwargs: dict[str, Any] | None, pixdim: float | Sequence[float] | None) -> dict[str, Any]:
    """``demo_kwargs`` with ``spacing_mm`` set to the finest spacing of ``pixdim`` unless given (or no ``pixdim``)."""
    kwargs = dict(demo_kwargs or {})
    if pixdim is not None and "spacing_mm" not in kwargs:
        kwargs["spacing_mm"] = float(min(pixdim if isinstance(pixdim, Sequence) else [pixdim]))
    return kwargs


def volume_loaders(
    dataset_dir: str | os.PathLike | None,
    test_dir: str | os.PathLike | None = None,
    test_mask_dir: str | os.PathLike | None = None,
    brain_mask_dir: str | os.PathLike | None = None,
    pixdim: float | Sequence[float] | None = None,
    intensity: str | None = None,
    slices_per_volume: int = 12,
    patch_size: Sequence[int] | None = None,
    size_divisor: int = 8,
    batch_size: int = 8,
    val_fraction: float = 0.1,
    num_workers: int = 0,
    demo_dir: str | os.PathLike | None = None,
    demo_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    cache: bool = True,
    augment: bool = False,
    check_space: bool = True,
    space_tolerance: float = 0.1,
    space_reference: dict[str, Any] | None = None,
) -> dict[str, DataLoader]:
    """Brain-MRI loaders: 2D axial-slice training batches from healthy volumes; whole volumes for calibration/test.

    Args:
        dataset_dir: folder of healthy (preprocessed) NIfTI volumes for training; None: the embedded demo (also
            as the test set unless ``test_dir`` is given).
        test_dir: folder of test volumes; test_mask_dir: their lesion masks (``<case>_mask.nii.gz`` etc.).
        brain_mask_dir: brain masks (``<case>_brain_mask.nii.gz``); default: nonzero voxels.
        pixdim: resample to this spacing in mm (None keeps the files' grid).
        intensity: ``"percentile"`` scales inside the brain to [0, 1]; None when already preprocessed.
        slices_per_volume / batch_size: a training batch holds ``batch_size * slices_per_volume`` slices
            (DISYRE: 8 volumes x 12 slices).
        patch_size: random 2D patch of each slice (DISYRE: 128 x 128); None keeps whole slices.
        size_divisor: slices are padded to a multiple of this (the UNet's ``2 ** (levels - 1)``).
        val_fraction: healthy volumes held out for threshold calibration.
        demo_dir / demo_kwargs: the embedded demo (:func:`medad.data.make_demo_mri`) when ``dataset_dir`` is None;
            with ``pixdim`` and no ``spacing_mm`` in ``demo_kwargs`` it is drawn on that grid (a shipped 2 mm model
            sees 2 mm subjects from the 1 mm template, not 4 mm ones interpolated back up).
        augment: DISYRE's official spatial + intensity training augmentation (:func:`slice_augmentation`).
        check_space: warn, naming the file, when a test volume's brain volume or extent is more than
            ``space_tolerance`` outside the training volumes' range (not preprocessed into the same space:
            :class:`medad.transforms.mri.CheckBrainGeometryd`).
        space_reference: that range as stored with a model (``run.json`` ``data.brain_geometry`` of shipped
            weights, whose training volumes are not on this machine); None computes it from the training volumes.

    Returns:
        ``{"train", "val", "test"}``: ``train`` yields ``image``/``brain_mask`` (B·S, 1, H, W); ``val`` and ``test``
        yield one volume per batch, ``image``/``mask``/``brain_mask`` (1, 1, X, Y, Z), with the affine in the meta.
    """
    from monai import transforms as mt
    from medad import data

    if dataset_dir is None:
        if demo_dir is None:
            raise ValueError("either dataset_dir or demo_dir must be given.")
        with main_process_first():  # under DDP rank 0 writes the demo data once, the others read it
            root = data.make_demo_mri(Path(demo_dir), **_demo_on_grid(demo_kwargs, pixdim))
        dataset_dir, train_brain_mask_dir = root / "train", root / "brain_masks"
        if test_dir is None:
            test_dir, test_mask_dir, brain_mask_dir = root / "test", root / "test_masks", root / "brain_masks"
        # else: a model trained elsewhere (e.g. shipped weights, whose run has no dataset_dir) evaluated on the
        # user's test volumes; the demo only stands in for the training set, never for the test set asked for
        logger.info("no --dataset_dir: the healthy volumes%s are the embedded demo data in %s",
                    " and the test volumes" if test_dir == root / "test" else "", root)
    else:
        train_brain_mask_dir = brain_mask_dir
    train_list = data.nifti_datalist(dataset_dir, brain_mask_dir=train_brain_mask_dir)
    train_list, val_list = data.split_train_val(train_list, val_fraction, seed=seed)
    test_list = data.nifti_datalist(test_dir, mask_dir=test_mask_dir, brain_mask_dir=brain_mask_dir) if test_dir else []
    for item in test_list:
        item["label"] = int(item.get("mask") is not None)

    load = data.volume_transforms(pixdim=pixdim, intensity=intensity)
    # flat: CacheDataset caches up to the first random transform, and a nested Compose counts as random, so the
    # loaded, resampled volumes were not cached and every training step read and resampled them again
    train_tf = mt.Compose([load, *slice_training_transforms(slices_per_volume, patch_size, size_divisor)]).flatten()
    test_tf = load
    if check_space and test_list:
        from medad.transforms.mri import brain_geometry_range

        reference = space_reference or brain_geometry_range(train_list + val_list)
        test_tf = volume_input_transforms(pixdim, intensity, reference, space_tolerance)
    dataset_type = CacheDataset if cache else Dataset
    kwargs = {"progress": False} if cache else {}
    loaders = {
        "train": _loader(dataset_type(train_list, train_tf, **kwargs), batch_size, True, num_workers,
                         collate_fn=slice_augmentation(patch_size=patch_size, seed=seed) if augment else None),
        "val": _loader(Dataset(val_list, load), 1, False, num_workers),
    }
    if test_list:
        loaders["test"] = _loader(Dataset(test_list, test_tf), 1, False, num_workers)
    return loaders
