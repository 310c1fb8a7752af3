"""DICOM Segmentation objects (DICOM-SEG) for a label map on a source DICOM series, with highdicom.

`write_dicom_seg` turns a label map (any orientation, with its RAS affine) into a SEG that
references every slice of the source series and its frame of reference: one segment per
label with its name and SNOMED-CT coded category and type (``monai_sam/resources/snomed_segments.yaml``),
and the algorithm that made it (model name, version, checkpoint hash, prompt source). PACS
viewers then overlay it on the series. `read_dicom_seg` reads one back onto the grid of the
source series as loaded by `monai_sam.data.load_volume`, so a round trip can be checked voxel
by voxel.

The label and the source slices are matched through world coordinates, not array order:
for every pixel of every source slice, the voxel of the label at the same point (in mm) is
taken. A label on another grid (resampled, cropped, shifted) is refused instead of being
written misaligned.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import yaml

from monai_sam.demo import DEMO_CONTENT_LABEL, DEMO_TEXT
from monai_sam.io.dicom_series import DicomSeries, check_series
from monai_sam.resources import resource
from monai_sam.utils import file_sha256  # re-exported: the SEG names checkpoints by it

__all__ = [
    "AlgorithmInfo",
    "DicomSegError",
    "SegmentCode",
    "file_sha256",
    "label_to_frames",
    "frames_to_label",
    "read_dicom_seg",
    "refuse_without_uids",
    "segment_code",
    "write_dicom_seg",
]

logger = logging.getLogger(__name__)

GRID_ATOL_VOXELS = 0.05  # a source pixel must fall this close to a label voxel centre
_LPS = np.array([-1.0, -1.0, 1.0])  # DICOM patient coordinates (LPS) <-> RAS


class DicomSegError(ValueError):
    """A label that cannot be written as (or a file that is not) a SEG of the given series."""


#: The segment-code table shipped with the package (package data, any install).
SNOMED_TABLE = "snomed_segments.yaml"


def _table_name(table: str | os.PathLike | None) -> str:
    """The table file a message should name: ``table`` or the packaged one."""
    return str(table) if table else str(resource(SNOMED_TABLE))


@functools.lru_cache(maxsize=4)
def _snomed_table(path: str | None) -> dict[str, Any]:
    """The segment-code table at ``path``, or the packaged ``monai_sam/resources/snomed_segments.yaml``."""
    source = resource(SNOMED_TABLE) if path is None else Path(path)
    with source.open(encoding="utf-8") as fp:
        table = yaml.safe_load(fp)
    if not isinstance(table, dict) or "segments" not in table or "default" not in table:
        raise ValueError(f"{source}: expected the keys 'default' and 'segments'")
    return table


@dataclasses.dataclass(frozen=True)
class SegmentCode:
    """Coded meaning of one segment: SNOMED-CT category, type and optional modifier / region."""

    category: Any  # pydicom.sr.coding.Code
    type: Any
    modifier: Any | None = None
    region: Any | None = None
    known: bool = True  # False: the generic default was used for an unknown name


def _normalise(name: str) -> str:
    return "_".join(str(name).strip().lower().replace("-", " ").split())


def segment_code(name: str, table: str | os.PathLike | None = None) -> SegmentCode:
    """The SNOMED-CT codes of a label name (``"liver"``, ``"kidney_left"``, ``"liver_tumor"``...).

    Names are looked up in ``monai_sam/resources/snomed_segments.yaml`` (or ``table``); the codes come from
    pydicom's code dictionary (``codes.cid7150`` categories, ``codes.SCT`` types). An unknown
    name gets category Tissue / type Tissue (``known=False``).
    """
    from pydicom.sr.codedict import codes

    spec = _snomed_table(str(table) if table else None)
    path = _table_name(table)
    entry = spec["segments"].get(_normalise(name))
    known = entry is not None
    entry = entry or spec["default"]

    def sct(keyword: str | None):
        if keyword is None:
            return None
        try:
            return getattr(codes.SCT, keyword)
        except AttributeError as err:
            raise ValueError(
                f"{path}: {keyword!r} is not a SNOMED-CT keyword of pydicom's codes.SCT"
            ) from err

    try:
        category = getattr(codes.cid7150, entry["category"])
    except AttributeError as err:
        raise ValueError(f"{path}: {entry['category']!r} is not a category of codes.cid7150") from err
    return SegmentCode(
        category, sct(entry["type"]), sct(entry.get("modifier")), sct(entry.get("region")), known
    )


@dataclasses.dataclass
class AlgorithmInfo:
    """What made a segmentation, written into the SEG (segment and series level).

    Attributes:
        name: the model (a bundle name, or the SAM2 size for bare checkpoints).
        version: model/bundle version; monai-sam's version is added to SoftwareVersions.
        checkpoint_sha256: SHA-256 of the weights file(s) used ("random init / demo" if none).
        prompt_source: ``"user"`` (prompt files), ``"automatic"`` (an automatic prompter) or
            ``"oracle"`` (prompts drawn from reference labels).
        parameters: more name=value pairs for AlgorithmParameters (image size, window...).
        demo: random weights (`monai_sam.demo`): the series description, content label and
            content description say so.
    """

    name: str
    version: str
    checkpoint_sha256: str = "random init / demo"
    prompt_source: str = "user"
    parameters: dict[str, str] = dataclasses.field(default_factory=dict)
    demo: bool = False

    @property
    def algorithm_type(self) -> str:
        # prompts drawn by a person make the result semi-automatic; a prompter makes it automatic
        return "AUTOMATIC" if self.prompt_source == "automatic" else "SEMIAUTOMATIC"


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("monai-sam")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "unknown"


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _checked(series: DicomSeries) -> DicomSeries:
    return series if series.checked else check_series(series)


def _slice_geometry(series: DicomSeries) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]:
    """Per source slice: RAS position of pixel (0, 0), RAS step per column, per row; rows, columns."""
    out = []
    for f in series.files:
        h = series.headers[f]
        iop = np.asarray(h.orientation, float)
        ipp = np.asarray(h.position, float)
        row_spacing, col_spacing = (float(v) for v in h.pixel_spacing)
        origin = ipp * _LPS
        step_col = iop[:3] * col_spacing * _LPS  # moving one column along the row direction
        step_row = iop[3:] * row_spacing * _LPS
        out.append((origin, step_col, step_row, int(h.rows), int(h.columns)))
    return out


def _voxel_indices(affine: np.ndarray, shape: Sequence[int], geom, where: str) -> list[np.ndarray]:
    """For each source slice, the ``(3, rows, cols)`` integer voxel indices of the label grid."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    result = []
    for k, (origin, step_col, step_row, rows, cols) in enumerate(geom):
        v0 = inv[:3, :3] @ origin + inv[:3, 3]
        dc, dr = inv[:3, :3] @ step_col, inv[:3, :3] @ step_row
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        idx = v0[:, None, None] + dc[:, None, None] * c + dr[:, None, None] * r
        rounded = np.rint(idx)
        off = float(np.abs(idx - rounded).max())
        if off > GRID_ATOL_VOXELS:
            raise DicomSegError(
                f"{where}: the label grid does not match source slice {k} (pixels fall {off:.3f} voxel "
                "between label voxels): the label must lie on the series' own grid (nothing is resampled)"
            )
        rounded = rounded.astype(np.int64)
        for axis in range(3):
            if rounded[axis].min() < 0 or rounded[axis].max() >= shape[axis]:
                raise DicomSegError(
                    f"{where}: source slice {k} lies outside the label volume (shape {tuple(shape)}, "
                    f"indices along axis {axis} from {rounded[axis].min()} to {rounded[axis].max()})"
                )
        result.append(rounded)
    return result


def label_to_frames(
    label: torch.Tensor | np.ndarray, affine: np.ndarray | None, series: DicomSeries
) -> np.ndarray:
    """Sample a label (``(C, X, Y, Z)`` or ``(X, Y, Z)``) at the pixels of each source slice.

    Args:
        label: label map (or ``C`` per-segment maps) on a grid covering the series.
        affine: its RAS voxel-to-world matrix (taken from ``label.affine`` when None).
        series: the source series; checked (and sorted along the normal) if not yet.

    Returns:
        ``(Z, rows, columns)`` (or ``(Z, rows, columns, C)`` for ``C > 1``), slice ``k`` being
        ``series.files[k]`` of the checked series.
    """
    series = _checked(series)
    if affine is None:
        affine = getattr(label, "affine", None)
        if affine is None:
            raise DicomSegError("label_to_frames: give the label's affine (or a MetaTensor)")
    arr = _np(label)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise DicomSegError(f"label must be (C, X, Y, Z) or (X, Y, Z), got shape {arr.shape}")
    where = f"label for DICOM series {series.series_uid}"
    indices = _voxel_indices(_np(affine), arr.shape[1:], _slice_geometry(series), where)
    frames = np.stack([arr[:, i, j, k] for i, j, k in indices])  # (Z, C, rows, cols)
    frames = np.moveaxis(frames, 1, -1)
    return frames[..., 0] if frames.shape[-1] == 1 else frames


def frames_to_label(frames: np.ndarray, series: DicomSeries, reference: torch.Tensor) -> torch.Tensor:
    """The inverse of `label_to_frames`: ``(Z, rows, cols[, C])`` frames onto ``reference``'s grid.

    ``reference`` is a MetaTensor on the series' grid (e.g. ``load_volume(folder)``); the result
    is a ``(C, X, Y, Z)`` MetaTensor with its affine.
    """
    from monai.data import MetaTensor

    series = _checked(series)
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    shape = tuple(reference.shape[1:])
    out = np.zeros((frames.shape[-1], *shape), dtype=frames.dtype)
    where = f"SEG frames for DICOM series {series.series_uid}"
    indices = _voxel_indices(_np(reference.affine), shape, _slice_geometry(series), where)
    if len(indices) != len(frames):
        raise DicomSegError(f"{where}: {len(frames)} frames for {len(indices)} source slices")
    for f, (i, j, k) in zip(frames, indices, strict=True):
        out[:, i, j, k] = np.moveaxis(f, -1, 0)
    meta = {k: v for k, v in reference.meta.items() if k != "affine"}
    return MetaTensor(torch.as_tensor(out), affine=reference.affine.clone(), meta=meta)


def _source_datasets(series: DicomSeries) -> list[pydicom.Dataset]:
    """Headers of the source slices (no pixel data: highdicom needs the attributes only)."""
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]


def _describe(
    number: int, name: str, algorithm: AlgorithmInfo, algorithm_id, table: str | os.PathLike | None
):
    import highdicom as hd

    code = segment_code(name, table)
    if not code.known:
        logger.warning(
            "no SNOMED-CT code known for segment %r (%s): written as Tissue",
            name,
            _table_name(table),
        )
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=str(name)[:64] or f"segment {number}",
        segmented_property_category=code.category,
        segmented_property_type=code.type,
        algorithm_type=algorithm.algorithm_type,
        algorithm_identification=algorithm_id,
        anatomic_regions=[code.region] if code.region is not None else None,
    )
    if code.modifier is not None:
        # highdicom 0.22 has no argument for it; the attribute belongs inside the type's item
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(code.modifier.value, code.modifier.scheme_designator, code.modifier.meaning)
        ]
    return desc


def _atomic_write(ds: pydicom.Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.save_as(tmp, write_like_original=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refuse_without_uids(source: DicomSeries, path: str | os.PathLike) -> None:
    """A SEG references its source by Study/Series/SOP Instance UIDs: refuse a series without them.

    Raises:
        DicomSegError: ``source`` has blank UIDs (a de-identified export), naming them.
    """
    if source.missing_uids:
        raise DicomSegError(
            f"{path}: cannot write a DICOM-SEG for the series in {source.folder}: a SEG must reference its "
            f"source images by their UIDs, and this series has {', '.join(source.missing_uids)} blank or "
            "missing (a de-identified export?). Segment it without --dicom-seg (NIfTI out), or restore the "
            "UIDs from the original export"
        )


def write_dicom_seg(
    label: torch.Tensor,
    source: DicomSeries,
    path: str | os.PathLike,
    label_names: Mapping[int, str],
    algorithm: AlgorithmInfo,
    series_description: str | None = None,
    probabilities: torch.Tensor | np.ndarray | None = None,
    series_number: int = 300,
    snomed_table: str | os.PathLike | None = None,
) -> pydicom.Dataset:
    """Write ``label`` as a DICOM Segmentation of ``source``; returns the dataset written.

    Args:
        label: ``(1, X, Y, Z)`` label map (object ids, 0 background) as a MetaTensor with its
            RAS affine, on the grid of ``source`` (any orientation, e.g. `segment_volume`'s output).
        source: the series that was segmented (checked if not yet).
        path: the ``.dcm`` to write (temp file + ``os.replace``: never a partial file).
        label_names: label value -> name for every segment to write, in that value order. Values
            become segment numbers 1..N (the label value is kept as the segment's TrackingID).
        algorithm: model name, version, checkpoint hash and prompt source.
        series_description: defaults to ``"<model> (<prompt source> prompts)"``.
        probabilities: optional ``(N, X, Y, Z)`` per-segment probabilities in ``[0, 1]`` (same
            order as ``label_names``): then a FRACTIONAL (probability) SEG is written instead.
        series_number: SeriesNumber of the new SEG series.
        snomed_table: another segment-code table than ``monai_sam/resources/snomed_segments.yaml``.

    Raises:
        DicomSegError: the label is not on the series' grid, or holds values not in ``label_names``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = _checked(source)
    path = Path(path)
    refuse_without_uids(source, path)
    values = [int(v) for v in label_names if int(v) != 0]
    if not values:
        raise DicomSegError(f"{path}: no segment to write (label_names has no non-zero label)")
    frames = label_to_frames(label, None, source).astype(np.int64)
    present = set(np.unique(frames).tolist()) - {0}
    unknown = sorted(present - set(values))
    if unknown:
        raise DicomSegError(f"{path}: label values {unknown} have no name in label_names {dict(label_names)}")
    numbers = np.zeros(max(max(values), int(frames.max())) + 1, dtype=np.uint16)
    for n, v in enumerate(values, start=1):
        numbers[v] = n
    if probabilities is not None:
        prob = label_to_frames(probabilities, getattr(label, "affine", None), source).astype(np.float32)
        if prob.ndim == 3:
            prob = prob[..., None]
        if prob.shape[-1] != len(values):
            raise DicomSegError(f"{path}: {prob.shape[-1]} probability maps for {len(values)} segments")
        if prob.min() < 0 or prob.max() > 1:
            raise DicomSegError(f"{path}: probabilities must lie in [0, 1], got [{prob.min()}, {prob.max()}]")
        pixel_array, seg_type = prob, hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixel_array, seg_type = numbers[frames], hd.seg.SegmentationTypeValues.BINARY

    parameters = {"prompts": algorithm.prompt_source, "checkpoint_sha256": algorithm.checkpoint_sha256}
    parameters.update({k: str(v) for k, v in algorithm.parameters.items()})
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=str(algorithm.version)[:64],
        source="monai-sam",
        parameters=parameters,
    )
    descriptions = []
    for n, v in enumerate(values, start=1):
        desc = _describe(n, label_names[v], algorithm, algorithm_id, snomed_table)
        desc.TrackingID = f"label {v}"
        desc.TrackingUID = pydicom.uid.generate_uid()
        descriptions.append(desc)
    description = series_description or f"{algorithm.name} ({algorithm.prompt_source} prompts)"
    content = f"{algorithm.prompt_source} prompts"
    if algorithm.demo:
        description, content = f"DEMO {description}", f"{DEMO_TEXT} ({content})"
    software = _software_version()
    seg = hd.seg.Segmentation(
        source_images=_source_datasets(source),
        pixel_array=pixel_array,
        segmentation_type=seg_type,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="monai-sam",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=f"monai-sam {software}",
        # LO holds 64 characters: exactly a SHA-256 in hex
        device_serial_number=algorithm.checkpoint_sha256[:64],
        content_description=content[:64],
        content_label=DEMO_CONTENT_LABEL if algorithm.demo else "MONAI_SAM",
        series_description=description[:64],
        # frames without any segment are left out; an all-empty result keeps them (a SEG needs frames)
        omit_empty_frames=bool(present) or probabilities is not None,
    )
    _atomic_write(seg, path)
    logger.info(
        "wrote DICOM-SEG %s: %d segment(s) %s on series %s (%s)",
        path,
        len(values),
        [label_names[v] for v in values],
        source.series_uid,
        seg_type.value,
    )
    return seg


def read_dicom_seg(
    path: str | os.PathLike, source: DicomSeries, reference: torch.Tensor
) -> tuple[torch.Tensor, dict[int, str]]:
    """Read a SEG of ``source`` onto ``reference``'s grid.

    Args:
        path: the SEG file.
        source: the series it segments.
        reference: a MetaTensor on the series' grid, e.g. ``load_volume(series folder)``.

    Returns:
        (label, names): a ``(1, X, Y, Z)`` MetaTensor of segment numbers (binary SEG) or
        ``(N, X, Y, Z)`` probabilities (fractional SEG), and segment number -> label.

    Raises:
        DicomSegError: not a SEG, another frame of reference, or it does not reference the series.
    """
    import highdicom as hd

    source = _checked(source)
    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as err:  # highdicom/pydicom raise many types for a bad file
        raise DicomSegError(
            f"{path}: not a readable DICOM Segmentation: {type(err).__name__}: {err}"
        ) from err
    datasets = _source_datasets(source)
    if str(seg.FrameOfReferenceUID) != str(datasets[0].FrameOfReferenceUID):
        raise DicomSegError(
            f"{path}: frame of reference {seg.FrameOfReferenceUID} is not the series' "
            f"{datasets[0].FrameOfReferenceUID}"
        )
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if not referenced & set(uids):
        raise DicomSegError(
            f"{path}: references none of the {len(uids)} slices of series {source.series_uid}"
        )
    numbers = [int(n) for n in seg.get_segment_numbers()]
    names = {n: str(seg.get_segment_description(n).segment_label) for n in numbers}
    fractional = str(seg.SegmentationType) == "FRACTIONAL"
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=not fractional
    )
    return frames_to_label(frames, source, reference), names
