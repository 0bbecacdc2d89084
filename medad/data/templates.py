"""The MNI152 brain template, read offline from the copy that ships inside the nilearn wheel.

One loader for the demo MRI generator (:func:`medad.data.make_demo_mri`, 1 mm) and the registration of the MRI
preprocessing (:mod:`medad.transforms.mri`, 2 mm by default). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["load_mni152"]

_MNI_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _mni152_path() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MNI152 template ships with nilearn: pip install nilearn.")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / _MNI_FILE
    if not path.is_file():
        from nilearn.datasets import struct

        path = Path(struct.MNI152_FILE_PATH)
    return path


@functools.lru_cache(maxsize=4)
def _mni152_arrays(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if resolution == 1:
        # The file itself, read with nibabel: importing nilearn.datasets takes several seconds, and at 1 mm its
        # loaders return exactly these arrays (scaled template, template > 0.2).
        import nibabel as nib

        image = nib.load(_mni152_path())
        template = np.asarray(image.dataobj, dtype=np.float32)
        template /= template.max()
        return template, template > 0.2, np.asarray(image.affine, dtype=np.float64)
    from nilearn import datasets  # resampling to another voxel size: nilearn's own

    template = datasets.load_mni152_template(resolution=resolution)
    mask = datasets.load_mni152_brain_mask(resolution=resolution)
    return (np.asarray(template.get_fdata(), dtype=np.float32), np.asarray(mask.get_fdata()) > 0,
            np.asarray(template.affine, dtype=np.float64))


def load_mni152(resolution: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nilearn MNI152 (ICBM 2009a, symmetric) T1 template, already skull-stripped, and its brain mask.

    Args:
        resolution: isotropic voxel size in mm: 1 is the file's own grid (``(197, 233, 189)``), other sizes are
            nilearn's resampling (2 mm: ``(99, 117, 95)``).

    Returns:
        ``(template, brain_mask, affine)``: the float32 template ``(X, Y, Z)`` scaled to a maximum of 1 (as nilearn's
        ``load_mni152_template``), the boolean brain mask ``template > 0.2`` (as ``load_mni152_brain_mask``) and the
        float64 4x4 voxel-to-RAS-mm affine. Fresh copies: callers may change them.
    """
    template, mask, affine = _mni152_arrays(int(resolution))
    return template.copy(), mask.copy(), affine.copy()
