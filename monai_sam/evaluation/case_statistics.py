"""Per-case figures to check a segmentation by, as TotalSegmentator's ``--statistics`` gives them.

Per object: voxel count, volume in mL, first/last axial slice (and their z in mm), mean
intensity (HU for CT); per slice: SAM2's object score and predicted IoU. Slices inside an
object's range where SAM2 said "absent" (object score <= 0) are listed as ``check_slices``:
there the propagation left a gap in an organ that continues above and below, the first place
a reader should look.

Slice indices count axial slices of the RAS-oriented volume (0 = most inferior), the frames
SAM2 propagated through; ``z_mm`` is the slice centre's world z, which equals the DICOM
patient z (LPS and RAS share the z axis) and 3D Slicer's S coordinate.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monai_sam.utils import atomic_path

__all__ = ["case_statistics", "write_statistics_csv", "write_slice_scores_csv", "OBJECT_COLUMNS", "SLICE_COLUMNS"]

OBJECT_COLUMNS = (
    "object_id",
    "name",
    "voxels",
    "volume_ml",
    "first_slice",
    "last_slice",
    "first_z_mm",
    "last_z_mm",
    "mean_intensity",
    "intensity_unit",
    "min_predicted_iou",
    "check_slices",
)
SLICE_COLUMNS = ("object_id", "name", "slice", "z_mm", "voxels", "object_score", "predicted_iou", "check")


def _slice_z(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World z (mm) of each axial slice's centre."""
    k = np.arange(shape[2], dtype=np.float64)
    centre = np.stack([np.full_like(k, (shape[0] - 1) / 2), np.full_like(k, (shape[1] - 1) / 2), k, np.ones_like(k)])
    return (affine @ centre)[2]


def case_statistics(
    label: np.ndarray,
    image: np.ndarray,
    affine: np.ndarray,
    names: Mapping[int, str],
    slice_scores: Any | None = None,
    intensity_unit: str = "HU",
) -> dict[str, Any]:
    """Figures for each object in ``names``, from a label and its image on the same RAS grid.

    Args:
        label: ``(X, Y, Z)`` object ids, RAS, the last axis axial.
        image: ``(X, Y, Z)`` intensities before any windowing (HU for CT).
        affine: the grid's 4x4 voxel-to-world (RAS mm) matrix.
        names: object id -> name, for every object that was prompted (a prompted object that
            is absent from the label is reported with 0 voxels, not left out).
        slice_scores: a `monai_sam.inferers.SliceScores` filled during propagation, or None.
        intensity_unit: what ``mean_intensity`` is in ("HU" for CT, "signal" for MR).

    Returns:
        ``{"slice_axis", "intensity_unit", "objects": [...]}``, one dict per object with the
        columns of `OBJECT_COLUMNS` (``check_slices`` a list) and ``slices``: one dict per
        slice with a score or a mask, with the columns of `SLICE_COLUMNS`.
    """
    label, image = np.asarray(label), np.asarray(image)
    if label.shape != image.shape or label.ndim != 3:
        raise ValueError(f"label {label.shape} and image {image.shape} must be one (X, Y, Z) grid")
    affine = np.asarray(affine, dtype=np.float64)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    z_mm = _slice_z(affine, label.shape)
    objects = []
    for oid, name in sorted((int(k), str(v)) for k, v in names.items()):
        mask = label == oid
        per_slice = mask.reshape(-1, mask.shape[2]).sum(axis=0)
        present = np.flatnonzero(per_slice)
        scores = slice_scores.for_object(oid) if slice_scores is not None else {}
        first, last = (int(present[0]), int(present[-1])) if present.size else (None, None)
        check = [
            k for k, (score, _) in scores.items() if first is not None and first <= k <= last and score <= 0
        ]
        ious = [iou for k, (_, iou) in scores.items() if per_slice[k] > 0]
        slices = [
            {
                "slice": k,
                "z_mm": round(float(z_mm[k]), 2),
                "voxels": int(per_slice[k]),
                "object_score": round(scores[k][0], 4) if k in scores else None,
                "predicted_iou": round(scores[k][1], 4) if k in scores else None,
                "check": k in check,
            }
            for k in sorted(set(scores) | set(present.tolist()))
        ]
        voxels = int(per_slice.sum())
        objects.append(
            {
                "object_id": oid,
                "name": name,
                "voxels": voxels,
                "volume_ml": round(voxels * voxel_ml, 3),
                "first_slice": first,
                "last_slice": last,
                "first_z_mm": round(float(z_mm[first]), 2) if first is not None else None,
                "last_z_mm": round(float(z_mm[last]), 2) if last is not None else None,
                "mean_intensity": round(float(image[mask].mean()), 2) if voxels else None,
                "intensity_unit": intensity_unit,
                "min_predicted_iou": round(min(ious), 4) if ious else None,
                "check_slices": check,
                "slices": slices,
            }
        )
    return {
        "slice_axis": "axial slices of the RAS-oriented volume, 0 = most inferior; z_mm = world z",
        "intensity_unit": intensity_unit,
        "objects": objects,
    }


def _write_csv(path: str | os.PathLike, columns: tuple[str, ...], rows: list[dict]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fp:
            writer = csv.DictWriter(fp, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def write_statistics_csv(stats: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One row per object (`OBJECT_COLUMNS`); ``check_slices`` space-separated."""
    rows = [{**o, "check_slices": " ".join(str(k) for k in o["check_slices"])} for o in stats["objects"]]
    return _write_csv(path, OBJECT_COLUMNS, rows)


def write_slice_scores_csv(stats: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One row per object and slice (`SLICE_COLUMNS`): SAM2's confidence along the volume."""
    rows = [
        {"object_id": o["object_id"], "name": o["name"], **s, "check": int(s["check"])}
        for o in stats["objects"]
        for s in o["slices"]
    ]
    return _write_csv(path, SLICE_COLUMNS, rows)
