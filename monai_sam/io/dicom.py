"""DICOM: series writing (:mod:`.dicom_writer`), discovery and checks (:mod:`.dicom_series`),
DICOM-SEG writing and reading back (:mod:`.dicom_seg`).

This module is the stable import path: ``from monai_sam.io.dicom import select_series, ...``.
"""

from monai_sam.io.dicom_series import (
    DECODER_PLUGINS,
    NON_IMAGE_MODALITIES,
    DicomSeries,
    DicomSeriesError,
    SliceHeader,
    check_decodable,
    check_series,
    find_series,
    pick_image_series,
    read_header,
    select_series,
    series_folder,
)
from monai_sam.io.dicom_writer import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, write_dicom_series

__all__ = [
    "DECODER_PLUGINS",
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "NON_IMAGE_MODALITIES",
    "DicomSeries",
    "DicomSeriesError",
    "SliceHeader",
    "check_decodable",
    "check_series",
    "find_series",
    "pick_image_series",
    "read_header",
    "select_series",
    "series_folder",
    "write_dicom_series",
]
