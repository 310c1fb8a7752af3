"""DICOM series: writing (:mod:`.dicom_writer`), discovery and checks (:mod:`.dicom_series`).

This module is the stable import path: ``from monai_sam.io.dicom import select_series, ...``.
"""

from monai_sam.io.dicom_series import (
    NON_IMAGE_MODALITIES,
    DicomSeries,
    DicomSeriesError,
    SliceHeader,
    check_series,
    find_series,
    read_header,
    select_series,
)
from monai_sam.io.dicom_writer import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, write_dicom_series

__all__ = [
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "NON_IMAGE_MODALITIES",
    "DicomSeries",
    "DicomSeriesError",
    "SliceHeader",
    "check_series",
    "find_series",
    "read_header",
    "select_series",
    "write_dicom_series",
]
