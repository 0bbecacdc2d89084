"""medad.io: result writers.

NIfTI maps on the input image's grid, 3D Slicer segmentations (``.seg.nrrd``) and colour tables, DICOM
Segmentation / Parametric Map for DICOM series inputs (highdicom), PNG overlays, per-case CSV/Parquet tables with a
cohort summary and ROC/PR curves, a DICOM series converted to NIfTI. Every writer is atomic (temporary file in
the target folder, then rename), and no writer modifies its inputs. Reading inputs is :mod:`medad.data`'s.
"""

from medad.io.atomic import atomic_save, atomic_write, to_jsonable, write_json
from medad.io.dicom import dicom_to_nifti
from medad.io.dicom_outputs import write_dicom_case
from medad.io.case_outputs import ANOMALY_SEGMENT, compact_float, write_image_case, write_volume_case
from medad.io.nifti import reference_grid, write_label_nifti, write_nifti_like
from medad.io.overlays import save_overlay_png, save_volume_overlay_png, select_slices
from medad.io.slicer import (
    RAS_TO_LPS,
    lps_affine_to_ras,
    ras_affine_to_lps,
    write_color_table,
    write_seg_nrrd,
    write_seg_nrrd_2d,
)
from medad.io.tables import (
    CASE_COLUMNS,
    anomaly_extent,
    case_table,
    cohort_summary,
    save_roc_pr_curves,
    write_table_csv,
    write_tables,
)

__all__ = [
    "ANOMALY_SEGMENT",
    "CASE_COLUMNS",
    "RAS_TO_LPS",
    "anomaly_extent",
    "atomic_save",
    "atomic_write",
    "case_table",
    "compact_float",
    "cohort_summary",
    "dicom_to_nifti",
    "lps_affine_to_ras",
    "ras_affine_to_lps",
    "reference_grid",
    "save_overlay_png",
    "save_roc_pr_curves",
    "save_volume_overlay_png",
    "select_slices",
    "to_jsonable",
    "write_color_table",
    "write_dicom_case",
    "write_image_case",
    "write_json",
    "write_label_nifti",
    "write_nifti_like",
    "write_seg_nrrd",
    "write_seg_nrrd_2d",
    "write_table_csv",
    "write_tables",
    "write_volume_case",
]
