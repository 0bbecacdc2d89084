"""Datalists for the MVTec AD folder layout (and VisA once converted to that layout).

The layout, for one category::

    <category>/train/good/000.png
    <category>/test/good/000.png
    <category>/test/<defect>/000.png
    <category>/ground_truth/<defect>/000_mask.png

VisA converted by its official ``prepare_data`` script has the same shape except that a mask is
named like its image (``ground_truth/<defect>/000.png``); both names are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medad.data.validation import MAX_REPORTED

__all__ = ["IMAGE_EXTENSIONS", "mvtec_datalist", "split_train_val"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_NORMAL = "good"


def _image_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    wanted = {e.lower() for e in extensions}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in wanted)


def _find_mask(ground_truth: Path, defect: str, stem: str, extensions: Sequence[str]) -> Path | None:
    folder = ground_truth / defect
    for name in (f"{stem}_mask", stem):  # MVTec AD names first, then the VisA-converted name
        for ext in extensions:
            for candidate in (folder / f"{name}{ext}", folder / f"{name}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def mvtec_datalist(
    root: str | Path,
    category: str | None = None,
    split: str = "train",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> list[dict]:
    """List the images of one MVTec AD category as MONAI datalist items.

    Args:
        root: the dataset root holding category folders, or the category folder itself when
            ``category`` is None.
        category: category name (e.g. ``"bottle"``); None means ``root`` is the category folder.
        split: ``"train"`` (the normal images in ``train/good``) or ``"test"`` (``test/good`` and
            every ``test/<defect>`` folder).
        extensions: image file extensions to accept (case-insensitive).

    Returns:
        items sorted by defect then file name, each
        ``{"image": str, "mask": str | None, "label": 0 | 1, "defect": str, "case_id": "<defect>/<stem>"}``;
        ``mask`` is None for normal images, ``label`` is 1 for every defect folder (also when its mask is empty:
        :func:`medad.data.validation.check_files` then warns, and the case adds no positive pixel).

    Raises:
        FileNotFoundError: the folder is missing or holds no images, or defect images have no mask (all named).
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    category_dir = Path(root) if category is None else Path(root) / category
    if not category_dir.is_dir():
        raise FileNotFoundError(f"MVTec AD category folder {category_dir} does not exist.")
    split_dir = category_dir / split
    layout_hint = f"expected MVTec AD layout {split}/good/*.png"
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no images found in {split_dir}: {layout_hint} (folder missing).")

    defects = [_NORMAL] if split == "train" else sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    items: list[dict] = []
    missing: list[str] = []
    for defect in defects:
        folder = split_dir / defect
        if not folder.is_dir():
            continue
        for image in _image_files(folder, extensions):
            mask = None
            if defect != _NORMAL:
                found = _find_mask(category_dir / "ground_truth", defect, image.stem, extensions)
                if found is None:
                    missing.append(f"{image} (expected {category_dir / 'ground_truth' / defect / (image.stem + '_mask.png')})")
                    continue
                mask = str(found)
            items.append(
                {
                    "image": str(image),
                    "mask": mask,
                    "label": int(defect != _NORMAL),
                    "defect": defect,
                    "case_id": f"{defect}/{image.stem}",
                }
            )
    if missing:  # every missing mask at once (up to MAX_REPORTED), not only the first
        shown = ", ".join(missing[:MAX_REPORTED]) + (f" and {len(missing) - MAX_REPORTED} more" if len(missing) > MAX_REPORTED else "")
        raise FileNotFoundError(f"{len(missing)} defect image(s) have no mask: {shown}.")
    if not items:
        raise FileNotFoundError(f"no images found in {split_dir}: {layout_hint}.")
    return items


def split_train_val(datalist: Sequence[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out a random part of a (normal) training datalist, e.g. to calibrate a threshold.

    Args:
        datalist: items, normally the output of ``mvtec_datalist(..., split="train")``.
        val_fraction: fraction in [0, 1) to hold out; rounded, and at least one item when > 0.
        seed: seed of the permutation; the same seed always gives the same split.

    Returns:
        ``(train, val)``, each in the original order of ``datalist``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    n = len(datalist)
    n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * n)))
    if n_val >= n and n > 0:
        raise ValueError(f"val_fraction {val_fraction} would leave no training item out of {n}.")
    held = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [item for i, item in enumerate(datalist) if i not in held]
    val = [item for i, item in enumerate(datalist) if i in held]
    return train, val
