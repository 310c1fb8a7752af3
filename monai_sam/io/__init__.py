"""DICOM input/output: series discovery and checks, series writing (DICOM-SEG lives beside it)."""

from monai_sam.io.dicom import (
    DicomSeries,
    DicomSeriesError,
    check_series,
    find_series,
    select_series,
    write_dicom_series,
)

__all__ = [
    "DicomSeries",
    "DicomSeriesError",
    "check_series",
    "find_series",
    "select_series",
    "write_dicom_series",
]
