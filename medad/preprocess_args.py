"""The options of ``medad preprocess`` (``scripts/preprocess_mri.py``), importable without torch, MONAI or ANTs.

:mod:`medad.preprocess` and :mod:`medad.transforms.mri` take their choices from here, so ``medad preprocess --help``
answers at once instead of after the imaging stack has loaded.
"""

from __future__ import annotations

import argparse

__all__ = ["SKULL_STRIP_BACKENDS", "REGISTRATION_TRANSFORMS", "NORMALIZATION_MODES", "build_parser"]

SKULL_STRIP_BACKENDS: tuple[str, ...] = ("deepbet", "brainextractor", "atlas")
#: registration name -> ANTs ``type_of_transform``
REGISTRATION_TRANSFORMS: dict[str, str] = {"rigid": "Rigid", "affine": "Affine", "syn": "SyN"}
NORMALIZATION_MODES: tuple[str, ...] = ("minmax", "zscore")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``medad preprocess``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Preprocess a cohort of T1 brain MRI volumes to MNI152 2 mm."
    )
    parser.add_argument("--input", required=True, help="folder of NIfTI volumes")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--skull-strip", default="deepbet", choices=SKULL_STRIP_BACKENDS,
                        help="deepbet and brainextractor need `pip install \"medad[skullstrip]\"`; atlas needs nothing")
    parser.add_argument("--registration", default="affine", choices=tuple(REGISTRATION_TRANSFORMS))
    parser.add_argument("--normalization", default="minmax", choices=NORMALIZATION_MODES)
    parser.add_argument("--no-n4", action="store_true", help="skip N4 bias-field correction")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    parser.add_argument("--glob", default="*.nii*", help="file pattern inside --input")
    parser.add_argument("--limit", type=int, default=None, help="process at most N files")
    parser.add_argument("--device", default="cpu", help="torch device for deepbet")
    parser.add_argument("--montage", default=None, help="write a PNG montage of mid-axial slices here")
    return parser
