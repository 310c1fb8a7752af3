"""MONAI Label's DICOMweb datastore, saving final labels as DICOM-SEG written by highdicom.

MONAI Label 0.8.5 converts a label to DICOM-SEG with dcmqi's ``itkimage2segimage``, which it
downloads from GitHub when the app starts; hospitals (and this project's machines) often cannot
reach it. Here the SEG is written by `monai_sam.io.dicom_seg.write_dicom_seg` (highdicom:
coded segments, algorithm identification, references to the source series) and stored back on
the PACS with STOW-RS; everything else (QIDO/WADO, the local cache, NIfTI conversion) is
MONAI Label's own `DICOMWebDatastore`.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

__all__ = ["SegDICOMWebDatastore"]

logger = logging.getLogger(__name__)


class SegDICOMWebDatastore(DICOMWebDatastore):
    """`DICOMWebDatastore` whose final labels go to the PACS as highdicom DICOM-SEG.

    Args:
        label_names: label value -> segment name (values not listed are named ``label_<v>``).
        algorithm: what made the labels, for the SEG's algorithm identification
            (`monai_sam.io.dicom_seg.AlgorithmInfo`).
        **kwargs: `DICOMWebDatastore`'s arguments (client, search_filter, cache_path...).
    """

    def __init__(self, *args: Any, label_names: Mapping[int, str], algorithm: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_names = {int(k): str(v) for k, v in label_names.items() if int(k) != 0}
        self.algorithm = algorithm

    def write_seg(self, image_id: str, label_filename: str) -> str:
        """Write the label of series ``image_id`` as a DICOM-SEG file; returns its path."""
        from monai.transforms import LoadImage

        from monai_sam.io.dicom_seg import write_dicom_seg
        from monai_sam.io.dicom_series import select_series

        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        series = select_series(image_dir, series_uid=image_id)
        label = LoadImage(image_only=True, ensure_channel_first=True)(label_filename)
        values = sorted(int(v) for v in np.unique(np.asarray(label)) if int(v) != 0)
        # one segment per label present (an empty label still needs its segments named)
        names = {v: self.label_names.get(v, f"label_{v}") for v in values} or dict(self.label_names)
        if not names:
            raise ValueError(
                f"label {label_filename} for series {image_id} is empty and the app has no label names"
            )
        fd, path = tempfile.mkstemp(suffix=".dcm", prefix="monai_sam_seg_")
        os.close(fd)
        write_dicom_seg(label, series, path, names, self.algorithm)
        return path

    def save_label(
        self,
        image_id: str,
        label_filename: str,
        label_tag: str,
        label_info: dict[str, Any],
        label_id: str = "",
    ) -> str:
        if label_tag != DefaultLabelTag.FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info)
        self.get_image_uri(image_id)  # the series is in the local cache
        converted = ""
        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":  # OHIF sends raw masks
            converted = binary_to_image(self.get_image_uri(image_id), label_filename)
            label_filename = converted
        seg = self.write_seg(image_id, label_filename)
        try:
            seg_series = dicom_web_upload_dcm(seg, self._client)
        finally:
            os.unlink(seg)
        image_info = self.get_image_info(image_id)
        label_info = dict(label_info or {})
        label_info.update(
            {
                "SeriesInstanceUID": seg_series,
                "Modality": image_info.get("Modality"),
                "PatientID": image_info.get("PatientID"),
                "StudyInstanceUID": image_info.get("StudyInstanceUID"),
            }
        )
        logger.info("stored DICOM-SEG series %s for image series %s", seg_series, image_id)
        saved = LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        if converted:
            os.unlink(converted)
        return saved
