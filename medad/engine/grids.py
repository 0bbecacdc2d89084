"""Put a result computed on the loaded grid back onto the grid of the file the user gave.

The loaders reorient volumes to RAS (``Orientationd``), may resample them (``Spacingd``) and resize pictures; an
anomaly map is computed on that *loaded* grid. A viewer overlays a result on the input only if it has the input's
shape and affine, so the evaluator maps every written result back:

- 3D, loaded grid = input grid up to axis permutation / flips (the usual RAS reorientation): an exact index
  rearrangement, no interpolation;
- 3D, otherwise (resampled): trilinear resampling of the map with the two affines (:func:`to_input_grid`);
- 2D: bilinear resize to the picture's ``(height, width)`` (:func:`to_image_size`);
- template space (preprocessed MRI): the inverse registration saved at preprocessing
  (:func:`to_native_space`, :func:`medad.transforms.mri.apply_inverse_transform`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["to_input_grid", "to_image_size", "to_native_space", "registration_record_for"]


def _signed_permutation(matrix: np.ndarray, tol: float = 1e-4) -> bool:
    rounded = np.round(matrix)
    return (
        np.allclose(matrix, rounded, atol=tol)
        and set(np.unique(np.abs(rounded))) <= {0.0, 1.0}
        and np.all(np.abs(rounded).sum(0) == 1)
        and np.all(np.abs(rounded).sum(1) == 1)
    )


def to_input_grid(
    volume: np.ndarray,
    affine: np.ndarray,
    input_affine: np.ndarray,
    input_shape: Sequence[int],
    order: int = 1,
) -> np.ndarray:
    """Map ``volume`` ``(X, Y, Z)`` with voxel-to-world ``affine`` onto the grid ``(input_affine, input_shape)``.

    Args:
        volume: the map on the loaded grid.
        affine: its 4x4 voxel-to-RAS affine (the loaded ``MetaTensor``'s ``affine``).
        input_affine: the input file's 4x4 affine (``original_affine`` in MONAI's meta).
        input_shape: the input file's spatial shape.
        order: spline order when resampling is needed (1: trilinear; 0: nearest, for labels).

    Returns:
        ``(*input_shape)`` float32 array; voxels of the input grid outside the loaded grid are 0.
    """
    volume = np.asarray(volume)
    input_shape = tuple(int(s) for s in input_shape[:3])
    # input voxel index -> loaded voxel index
    index_map = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(input_affine, np.float64)
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    if _signed_permutation(linear) and np.allclose(offset, np.round(offset), atol=1e-3):
        rounded = np.round(linear).astype(int)
        # loaded axis feeding each input axis, and whether it runs backwards
        source_axis = [int(np.nonzero(rounded[:, i])[0][0]) for i in range(3)]
        out = np.transpose(volume, source_axis)
        slices = []
        for i, j in enumerate(source_axis):
            sign, start = rounded[j, i], int(round(offset[j]))
            stop = start + sign * input_shape[i]
            if sign > 0 and start >= 0 and stop <= volume.shape[j]:
                slices.append(slice(start, stop))
            elif sign < 0 and stop >= -1 and start < volume.shape[j]:
                slices.append(slice(start, stop if stop >= 0 else None, -1))
            else:
                break
        else:
            return np.ascontiguousarray(out[tuple(slices)], dtype=np.float32)
    from scipy import ndimage

    return ndimage.affine_transform(
        volume.astype(np.float32), linear, offset=offset, output_shape=input_shape, order=order, mode="constant",
        cval=0.0,
    ).astype(np.float32)


def to_image_size(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of ``(H, W)`` to ``size = (height, width)`` (the input picture's size)."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape) == size:
        return np.asarray(image, np.float32)
    tensor = torch.as_tensor(np.asarray(image, np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def registration_record_for(
    case: Mapping[str, Any], registration_dir: str | os.PathLike | None, record_key: str = "registration_record"
) -> str | None:
    """The ``registration.json`` of a case: the item's ``record_key``, else ``registration_dir/<case_id>/``."""
    record = case.get(record_key)
    if record:
        return str(record)
    if registration_dir is not None and case.get("case_id"):
        candidate = Path(registration_dir) / str(case["case_id"]) / "registration.json"
        if candidate.is_file():
            return str(candidate)
    return None


def to_native_space(
    volume: np.ndarray, affine: np.ndarray, record: str | os.PathLike | Mapping[str, Any], interpolator: str = "linear"
) -> tuple[np.ndarray, np.ndarray]:
    """Map a template-space map (``(X, Y, Z)`` with its affine) back to the patient's original image grid.

    Uses the inverse of the registration saved at preprocessing (:func:`medad.transforms.mri.apply_inverse_transform`).

    Returns:
        ``(native map (X', Y', Z') float32, native 4x4 affine)``.
    """
    from monai.data import MetaTensor

    from medad.transforms.mri import apply_inverse_transform

    moving = MetaTensor(torch.as_tensor(np.asarray(volume, np.float32))[None],
                        affine=torch.as_tensor(np.asarray(affine, np.float64)))
    native = apply_inverse_transform(moving, record, interpolator=interpolator)
    return np.asarray(native[0].numpy(), np.float32), np.asarray(native.affine.numpy(), np.float64)
