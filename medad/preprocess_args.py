"""The options of ``medad preprocess`` (``scripts/preprocess_mri.py``), importable without torch, MONAI or ANTs.

:mod:`medad.preprocess` and :mod:`medad.transforms.mri` take their choices from here, so ``medad preprocess --help``
answers at once instead of after the imaging stack has loaded.
"""

from __future__ import annotations

import argparse

__all__ = ["SKULL_STRIP_BACKENDS", "REGISTRATION_TRANSFORMS", "REGISTRATION_BACKENDS", "REGISTRATION_BACKEND_CHOICES",
           "DEFAULT_REGISTRATION_BACKEND", "NORMALIZATION_MODES", "VOLUME_READERS", "build_parser"]

SKULL_STRIP_BACKENDS: tuple[str, ...] = ("deepbet", "brainextractor", "atlas")
#: registration name -> ANTs ``type_of_transform``
REGISTRATION_TRANSFORMS: dict[str, str] = {"rigid": "Rigid", "affine": "Affine", "syn": "SyN"}
NORMALIZATION_MODES: tuple[str, ...] = ("minmax", "zscore")
#: ``ants``: ANTsPy (a core dependency); ``elastix``: itk-elastix (``pip install "medad[elastix]"``)
REGISTRATION_BACKENDS: tuple[str, ...] = ("ants", "elastix")
#: ``auto``: elastix when itk-elastix is installed (as good and faster on 40 IXI heads, docs/results.md), else ants
REGISTRATION_BACKEND_CHOICES: tuple[str, ...] = ("auto", *REGISTRATION_BACKENDS)
DEFAULT_REGISTRATION_BACKEND = "auto"
#: volume reading (:mod:`medad.data.readers`): MONAI's ITKReader, SimpleITK/nibabel, or ITK when importable
VOLUME_READERS: tuple[str, ...] = ("auto", "itk", "sitk")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``medad preprocess``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Preprocess a cohort of T1 brain MRI volumes to MNI152 2 mm."
    )
    parser.add_argument("--input", required=True, help="folder of volumes (NIfTI; NRRD with --glob '*.nrrd')")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--skull-strip", default="deepbet", choices=SKULL_STRIP_BACKENDS,
                        help="deepbet and brainextractor need `pip install \"medad[skullstrip]\"`; atlas needs nothing")
    parser.add_argument("--registration", default="affine", choices=tuple(REGISTRATION_TRANSFORMS),
                        help="syn needs --registration-backend ants")
    parser.add_argument("--registration-backend", default=DEFAULT_REGISTRATION_BACKEND,
                        choices=REGISTRATION_BACKEND_CHOICES,
                        help="ants: ANTsPy; elastix: itk-elastix, `pip install \"medad[elastix]\"` (full ITK, 1.6 GB), "
                             "as good and faster; auto (default): elastix when installed, else ants; both keep the "
                             "forward and inverse transforms for native-space maps, and the log names the one used")
    parser.add_argument("--reader", default="auto", choices=VOLUME_READERS,
                        help="volume reader: itk (MONAI's ITKReader, `pip install \"medad[itk]\"`), sitk "
                             "(SimpleITK/nibabel), auto = itk when installed")
    parser.add_argument("--normalization", default="minmax", choices=NORMALIZATION_MODES)
    parser.add_argument("--no-n4", action="store_true", help="skip N4 bias-field correction")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    parser.add_argument("--glob", default="*.nii*", help="file pattern inside --input")
    parser.add_argument("--limit", type=int, default=None, help="process at most N files")
    parser.add_argument("--device", default="cpu", help="torch device for deepbet")
    parser.add_argument("--montage", default=None, help="write a PNG montage of mid-axial slices here")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="process only shard K of N of the sorted files (one SLURM array task each, "
                             "e.g. --shard $SLURM_ARRAY_TASK_ID/8); each shard logs to preprocess_log.shard-K-of-N.csv "
                             "and the last to finish merges them into preprocess_log.csv")
    return parser
