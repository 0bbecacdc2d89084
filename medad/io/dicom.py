"""DICOM series to NIfTI, once, without patient data: ``python -m medad.io.dicom <series_folder> <out.nii.gz>``.

The series is read by :func:`medad.data.dicom.read_dicom_series` (voxels and geometry only, no tag kept); the NIfTI
written here has a fresh header whose description fields stay empty. A bundle does not need this step: its loaders
read a DICOM series folder directly (:class:`medad.data.dicom.DicomSeriesReader`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from medad.io.atomic import atomic_save

__all__ = ["dicom_to_nifti"]

PathLike = str | os.PathLike


def dicom_to_nifti(folder: PathLike, path: PathLike, series_id: str | None = None) -> Path:
    """Convert one DICOM series to a float32 NIfTI (atomically), without any patient data in its header."""
    import nibabel as nib

    from medad.data.dicom import read_dicom_series  # here: importing medad.io stays light

    volume, affine = read_dicom_series(folder, series_id)
    image = nib.Nifti1Image(volume, affine)  # a fresh header: descrip / db_name / aux_file stay empty
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return atomic_save(path, lambda name: nib.save(image, name))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m medad.io.dicom <dicom_series_folder> <output.nii.gz>", file=sys.stderr)
        return 2
    print(dicom_to_nifti(argv[0], argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
