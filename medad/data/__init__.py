"""medad.data: everything that reads inputs: dataset layouts (MVTec AD, NIfTI folders), DICOM series, the volume
readers (:mod:`medad.data.readers`), loading transforms, the MNI152 template and the embedded demo data."""

from medad.data.dicom import DicomSeriesReader, find_dicom_series, read_dicom_series
from medad.data.demo import DEMO_DEFECTS, MARKER_NAME, demo_root, make_demo_mri, make_demo_mvtec
from medad.data.mvtec import IMAGE_EXTENSIONS, mvtec_datalist, split_train_val
from medad.data.templates import load_mni152
from medad.data.nifti import (
    BRAIN_MASK_SUFFIXES,
    MASK_SUFFIXES,
    ScalePercentilesInMaskd,
    nifti_datalist,
    nifti_stem,
    volume_transforms,
)
from medad.data.validation import (
    CheckInputd,
    InvalidInputError,
    LoadInputd,
    affine_problem,
    check_files,
    clear_input_errors,
    input_error,
)
from medad.data.transforms import (
    DropNoneKeysd,
    EnsureMaskd,
    ResizeImaged,
    ScaleIntensityByDtyped,
    ToChannelsd,
    image_reader,
    image_transforms,
    pil_converter,
)

__all__ = [
    "BRAIN_MASK_SUFFIXES",
    "CheckInputd",
    "affine_problem",
    "check_files",
    "InvalidInputError",
    "LoadInputd",
    "clear_input_errors",
    "input_error",
    "DEMO_DEFECTS",
    "DicomSeriesReader",
    "IMAGE_EXTENSIONS",
    "MARKER_NAME",
    "MASK_SUFFIXES",
    "DropNoneKeysd",
    "EnsureMaskd",
    "ResizeImaged",
    "ScaleIntensityByDtyped",
    "ScalePercentilesInMaskd",
    "ToChannelsd",
    "demo_root",
    "find_dicom_series",
    "image_reader",
    "image_transforms",
    "load_mni152",
    "make_demo_mri",
    "make_demo_mvtec",
    "mvtec_datalist",
    "nifti_datalist",
    "nifti_stem",
    "pil_converter",
    "read_dicom_series",
    "split_train_val",
    "volume_transforms",
]
