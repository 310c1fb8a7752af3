"""Write a 3D volume as a DICOM series (one CT / MR Image Storage file per axial slice).

The volume follows the project's conventions (``docs/conventions.md``): a ``(X, Y, Z)`` array
and a 4x4 RAS voxel-to-world affine in mm. DICOM patient coordinates are LPS, so the affine is
converted by flipping the signs of world x and y.

Geometry of one slice file (DICOM PS3.3 C.7.6.2): the pixel at (row ``r``, column ``c``) lies at
``IPP + c * PixelSpacing[1] * row_cosine + r * PixelSpacing[0] * column_cosine``. Columns
therefore run along one in-plane array axis and rows along the other. The in-plane axes are
flipped where needed so that the row cosine points towards the patient's left and the column
cosine towards posterior (``ImageOrientationPatient`` close to ``1\\0\\0\\0\\1\\0`` for an axial
volume), which is how scanners write axial CT: viewers show the patient's right on the
screen's left. Readers (ITK, SimpleITK, MONAI) then give back the same voxels and world
geometry; after ``Orientation("RAS")`` the array equals the RAS-oriented input.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

__all__ = ["write_dicom_series", "CT_IMAGE_STORAGE", "MR_IMAGE_STORAGE"]

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

MANUFACTURER = "monai-sam phantom"
# CT stored values are HU + 1024 (the usual scanner convention: air, -1000 HU, stays >= 0).
_CT_INTERCEPT = -1024.0
_INT16_MIN, _INT16_MAX = -32768, 32767
# the date written when uid_seed makes the series deterministic
_FIXED_DATETIME = datetime.datetime(2000, 1, 1, 12, 0, 0)


def _ds(value: float) -> str:
    """A decimal string (DS, at most 16 characters) with as much precision as fits."""
    value = float(value)
    if abs(value) < 1e-12:
        value = 0.0
    return format_number_as_ds(value)


def _affine_geometry(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[bool, bool]]:
    """LPS affine of the array as written, and which in-plane axes (i, j) are flipped to write it."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise ValueError("affine contains non-finite values")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    cols = lps[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis (voxel sizes {spacing.tolist()})")
    unit = cols / spacing
    gram = unit.T @ unit
    if not np.allclose(gram, np.eye(3), atol=1e-4):
        raise ValueError(
            "affine axes are not orthogonal (sheared or gantry-tilted grid); a DICOM series "
            f"needs orthogonal axes, got direction cosines {unit.T.round(5).tolist()}"
        )
    flips = []
    for axis in (0, 1):
        u = unit[:, axis]
        # the row cosine (array axis 0) should point to +x (left) and the column cosine
        # (array axis 1) to +y (posterior) in LPS as far as the direction allows
        dominant = int(np.argmax(np.abs(u)))
        flips.append(bool(u[dominant] < 0))
    flip_i, flip_j = flips
    for axis, flipped in ((0, flip_i), (1, flip_j)):
        if flipped:
            n = shape[axis]
            # voxel index a' = n - 1 - a along this axis
            lps[:3, 3] = lps[:3, 3] + lps[:3, axis] * (n - 1)
            lps[:3, axis] = -lps[:3, axis]
    return lps, (flip_i, flip_j)


def _rescale(image: np.ndarray, modality: str) -> tuple[np.ndarray, float, float]:
    """int16 stored values and (slope, intercept) such that value = stored * slope + intercept."""
    lo, hi = float(image.min()), float(image.max())
    slope, intercept = 1.0, _CT_INTERCEPT
    if modality != "CT" or lo - intercept < _INT16_MIN or hi - intercept > _INT16_MAX:
        # arbitrary units (or HU beyond 16 bits): map [lo, hi] onto [0, 32767], so that the
        # precision is (hi - lo) / 32767
        intercept = float(_ds(lo))
        slope = float(_ds((hi - intercept) / _INT16_MAX)) if hi > intercept else 1.0
        if slope <= 0.0:
            slope = 1.0
        if (hi - intercept) / slope > _INT16_MAX:  # the DS rounding went down
            slope = float(_ds(slope * (1 + 1e-6)))
    stored = np.rint((image.astype(np.float64) - intercept) / slope)
    stored = np.clip(stored, _INT16_MIN, _INT16_MAX).astype("<i2")
    return stored, slope, intercept


def _uid(seed: str | None, *parts: object) -> str:
    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[str(seed), *(str(p) for p in parts)])


def write_dicom_series(
    image: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    modality: str = "CT",
    patient_id: str = "ANON",
    patient_name: str | None = None,
    study_instance_uid: str | None = None,
    series_description: str = "",
    series_number: int = 1,
    uid_seed: str | None = None,
) -> list[Path]:
    """Write ``image`` as a DICOM series, one file per axial slice ``image[:, :, k]``.

    Args:
        image: ``(X, Y, Z)`` array; Hounsfield units for CT, arbitrary units for MR.
        affine: 4x4 RAS voxel-to-world matrix in mm (any orthogonal direction, flips allowed).
        out_dir: the series folder to create; must not exist or be empty. The files are written
            into a temporary sibling folder that is renamed to ``out_dir`` at the end.
        modality: ``"CT"`` (CT Image Storage, RescaleType HU, stored = HU + 1024) or ``"MR"``
            (MR Image Storage, slope/intercept spreading the value range over 0..32767).
        patient_id, patient_name: patient module (the name defaults to ``"<patient_id>^"``).
        study_instance_uid: reuse a study (e.g. to put several series in one study).
        series_description, series_number: general series module.
        uid_seed: makes every UID (and the dates) deterministic; the same seed and inputs give
            byte-identical files. Without it UIDs are random and the dates are today's.

    Returns:
        The written files in slice order (``k = 0 .. Z-1``), named ``slice_0001.dcm`` ...

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty folder.
        ValueError: bad image shape/values, affine or modality.
    """
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    image = np.asarray(image)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z), got shape {image.shape}")
    if min(image.shape) < 1:
        raise ValueError(f"image has an empty axis: shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite values")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"refusing to write a DICOM series into {out_dir}: it exists and is not empty")

    lps, (flip_i, flip_j) = _affine_geometry(affine, image.shape)
    data = image
    if flip_i:
        data = data[::-1]
    if flip_j:
        data = data[:, ::-1]
    stored, slope, intercept = _rescale(np.ascontiguousarray(data), modality)

    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos = lps[:3, 0] / spacing[0]  # direction in which the column index (array axis 0) grows
    col_cos = lps[:3, 1] / spacing[1]  # direction in which the row index (array axis 1) grows
    iop = [_ds(v) for v in (*row_cos, *col_cos)]
    pixel_spacing = [_ds(spacing[1]), _ds(spacing[0])]  # [between rows, between columns]
    normal = np.cross(row_cos, col_cos)
    n_x, n_y, n_z = stored.shape

    when = _FIXED_DATETIME if uid_seed is not None else datetime.datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    study_uid = study_instance_uid or _uid(uid_seed, "study")
    series_uid = _uid(uid_seed, "series", series_number, modality)
    frame_uid = _uid(uid_seed, "frame", study_uid)  # one frame of reference per (seeded) study
    sop_class = _SOP_CLASS[modality]

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SOPClassUID = sop_class
    base.StudyDate = base.SeriesDate = base.AcquisitionDate = base.ContentDate = date
    base.StudyTime = base.SeriesTime = base.AcquisitionTime = base.ContentTime = time
    base.AccessionNumber = ""
    base.Modality = modality
    base.Manufacturer = MANUFACTURER
    base.InstitutionName = ""
    base.ReferringPhysicianName = ""
    base.StationName = "monai-sam"
    base.StudyDescription = ""
    base.SeriesDescription = series_description
    base.ManufacturerModelName = "synthetic"
    # PN: "family^given"; a bare id becomes the family name (trailing caret, as highdicom advises)
    base.PatientName = patient_name if patient_name is not None else f"{patient_id}^"
    base.PatientID = patient_id
    base.PatientBirthDate = ""
    base.PatientSex = ""
    base.BodyPartExamined = ""
    base.SliceThickness = _ds(spacing[2])
    base.SpacingBetweenSlices = _ds(spacing[2])
    base.PatientPosition = "HFS"
    base.SoftwareVersions = "monai-sam"
    if modality == "CT":
        base.KVP = "120"
    else:
        base.ScanningSequence = "RM"  # research mode: synthetic data
        base.SequenceVariant = "NONE"
        base.ScanOptions = ""
        base.MRAcquisitionType = "3D"
        base.RepetitionTime = "0"
        base.EchoTime = "0"
        base.EchoTrainLength = "1"
        base.MagneticFieldStrength = "0"
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.StudyID = "1"
    base.SeriesNumber = int(series_number)
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = iop
    base.FrameOfReferenceUID = frame_uid
    base.PositionReferenceIndicator = ""
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = n_y
    base.Columns = n_x
    base.PixelSpacing = pixel_spacing
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1
    base.RescaleIntercept = _ds(intercept)
    base.RescaleSlope = _ds(slope)
    if modality == "CT":
        base.RescaleType = "HU"
    if modality == "CT":
        level, width = 40.0, 400.0  # abdomen window
    else:  # the whole value range
        s_lo, s_hi = int(stored.min()), int(stored.max())
        level, width = intercept + slope * (s_lo + s_hi) / 2, max(slope * (s_hi - s_lo), 1.0)
    base.WindowCenter = _ds(level)
    base.WindowWidth = _ds(width)

    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp_dir.mkdir(parents=True)
    names: list[str] = []
    try:
        for k in range(n_z):
            ds = Dataset()
            ds.update(base)
            sop_uid = _uid(uid_seed, "instance", series_uid, k)
            position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(position @ normal))
            # DICOM pixel data is row-major (rows, columns) = (array axis 1, array axis 0)
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = "MONAI_SAM"
            ds.file_meta = meta
            ds.preamble = b"\x00" * 128
            ds.is_little_endian = True
            ds.is_implicit_VR = False

            name = f"slice_{k + 1:04d}.dcm"
            pydicom.dcmwrite(tmp_dir / name, ds, write_like_original=False)
            names.append(name)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename needs it gone
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.debug(
        "wrote %d %s slices to %s (flips i=%s j=%s, slope %s, intercept %s)",
        n_z, modality, out_dir, flip_i, flip_j, slope, intercept,
    )
    return [out_dir / name for name in names]
