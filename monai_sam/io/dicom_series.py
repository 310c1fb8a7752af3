"""Find DICOM series in a folder tree, pick one, and check that it is a regular volume.

``find_series`` reads headers only (no pixel data) and groups files by study and series UID.
``select_series`` picks the one series a folder should hold (or the one named by its UID).
``check_series`` verifies that the slices form a regular grid that ITK/MONAI read correctly
(one size, one orientation, one pixel spacing, uniform spacing along the slice normal, no
gantry tilt, no missing or duplicate slices, pixel data present and decodable) and returns the
files sorted along the normal.
``pick_image_series`` chooses, among the series of one study, the one a model can use (its
modality, greyscale, single-frame, axial-ish, enough slices) and says why the others were left.

Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) are decoded through pydicom's
pixel data plugins (pylibjpeg with its libjpeg / openjpeg / rle plugins, or python-gdcm, see
requirements.txt): ``check_series`` decodes one file per transfer syntax and names the
missing plugin when pydicom cannot.

Every problem is a :class:`DicomSeriesError` naming the folder/file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

__all__ = [
    "DicomSeriesError",
    "SliceHeader",
    "DicomSeries",
    "find_series",
    "select_series",
    "check_series",
    "NON_IMAGE_MODALITIES",
    "DECODER_PLUGINS",
    "check_decodable",
    "pick_image_series",
    "series_folder",
]

logger = logging.getLogger(__name__)

# Series of these modalities hold no image volume (segmentations, structure sets, reports,
# presentation states...). `select_series` skips them unless asked for by UID.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"})

# transfer syntaxes whose pixel data is stored raw, so that its length can be checked
_UNCOMPRESSED = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian (length unknown on disk)
}

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: no series of its own

_JPEG = "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm"
# transfer syntax -> the pip packages with a pydicom plugin that decodes it (requirements.txt)
DECODER_PLUGINS = {
    "1.2.840.10008.1.2.4.50": _JPEG + " (or Pillow)",  # JPEG baseline (8 bit)
    "1.2.840.10008.1.2.4.51": _JPEG,  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.57": _JPEG,  # JPEG lossless, process 14
    "1.2.840.10008.1.2.4.70": _JPEG,  # JPEG lossless, process 14, selection value 1
    "1.2.840.10008.1.2.4.80": _JPEG,  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": _JPEG,  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.5": "numpy (pydicom's own RLE decoder) or pylibjpeg + pylibjpeg-rle",  # RLE lossless
}
# little-endian sequence delimitation item that ends encapsulated (compressed) pixel data
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"

# tolerances of check_series
POSITION_ATOL_MM = 0.01  # two slices closer than this along the normal are duplicates
SPACING_RTOL = 0.01  # a gap differing from the usual spacing by more than 1% (and 0.01 mm) is an error
ORIENTATION_ATOL = 1e-4  # direction cosines compared component-wise
PIXEL_SPACING_ATOL_MM = 1e-4
TILT_DEGREES_MAX = 0.05  # slice positions deviating more than this from the normal: gantry tilt
IN_PLANE_ATOL_MM = 0.1  # in-plane shift of a slice origin tolerated on top of that


class DicomSeriesError(ValueError):
    """A DICOM folder or series that cannot be read as one regular volume."""


@dataclasses.dataclass(frozen=True)
class SliceHeader:
    """The header fields of one file that the series checks need."""

    path: Path
    rows: int | None
    columns: int | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 cosines)
    position: tuple[float, ...] | None  # ImagePositionPatient (mm, LPS)
    pixel_spacing: tuple[float, ...] | None  # (between rows, between columns) in mm
    number_of_frames: int
    samples_per_pixel: int
    bits_allocated: int | None
    instance_number: int | None
    transfer_syntax: str | None
    pixel_data_offset: int | None  # where the pixel data element starts (None: no pixel data)
    file_size: int


@dataclasses.dataclass
class DicomSeries:
    """One DICOM series found under ``folder``.

    Attributes:
        folder: the folder that was searched (the series' files may lie in sub-folders).
        study_uid, series_uid: StudyInstanceUID and SeriesInstanceUID.
        modality, description, series_number: from the first file's header.
        files: the files of the series; sorted by name from :func:`find_series`, sorted by
            position along the slice normal from :func:`check_series`.
        checked: True once :func:`check_series` has passed.
        slice_spacing: distance between slices along the normal in mm (after checking).
        pixel_spacing: (between rows, between columns) in mm (after checking).
        orientation: ImageOrientationPatient (after checking).
        headers: per-file header summaries, keyed by path (not shown in repr).
        missing_uids: the UIDs some of its files have blank or absent (StudyInstanceUID,
            SeriesInstanceUID, SOPInstanceUID), as de-identification leaves them: the series
            still reads as a volume, but nothing can reference it (no DICOM-SEG).
    """

    folder: Path
    study_uid: str
    series_uid: str
    modality: str
    description: str
    series_number: int | None
    files: list[Path]
    checked: bool = False
    slice_spacing: float | None = None
    pixel_spacing: tuple[float, float] | None = None
    orientation: tuple[float, ...] | None = None
    headers: dict[Path, SliceHeader] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    missing_uids: tuple[str, ...] = ()

    @property
    def n_files(self) -> int:
        return len(self.files)

    @property
    def n_slices(self) -> int:
        """Number of slices (frames) in the series."""
        if self.headers and all(f in self.headers for f in self.files):
            return sum(self.headers[f].number_of_frames for f in self.files)
        return len(self.files)

    def summary(self) -> str:
        """One line naming the series, for messages and logs."""
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.series_uid} ({self.modality}{desc}, {self.n_files} files)"


def _float_tuple(value) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _looks_like_dicom(path: Path) -> tuple[bool, bool]:
    """(has the DICM preamble, might be a preamble-less DICOM stream)."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError:
        return False, False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True, False
    # raw data sets without preamble start with a group 0008 (or file meta 0002) element
    return False, len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x02\x00")


def read_header(path: str | os.PathLike) -> tuple[pydicom.Dataset, SliceHeader] | None:
    """Read the header of ``path``; None if it is not a DICOM file.

    Raises:
        DicomSeriesError: the file has the DICOM preamble but its header cannot be parsed
            (truncated or corrupt).
    """
    path = Path(path)
    has_preamble, maybe_raw = _looks_like_dicom(path)
    if not (has_preamble or maybe_raw):
        return None
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_preamble)
            offset = fp.tell()
    except (InvalidDicomError, EOFError, struct.error, ValueError, KeyError, TypeError,
            IndexError, OverflowError, NotImplementedError) as err:
        if has_preamble:
            raise DicomSeriesError(
                f"{path}: DICOM file cannot be read (truncated or corrupt?): {err}"
            ) from err
        logger.debug("not a DICOM file (%s): %s", err, path)
        return None
    if "SOPInstanceUID" not in ds and not has_preamble:
        logger.debug("not a DICOM file (no SOPInstanceUID): %s", path)
        return None
    file_size = path.stat().st_size
    # dcmread stops right before the pixel data element; at end of file there is none
    pixel_offset = offset if offset < file_size else None
    meta = getattr(ds, "file_meta", None)
    header = SliceHeader(
        path=path,
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        orientation=_float_tuple(ds.get("ImageOrientationPatient")),
        position=_float_tuple(ds.get("ImagePositionPatient")),
        pixel_spacing=_float_tuple(ds.get("PixelSpacing")),
        number_of_frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        samples_per_pixel=_int_or_none(ds.get("SamplesPerPixel")) or 1,
        bits_allocated=_int_or_none(ds.get("BitsAllocated")),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        transfer_syntax=(
            str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
        ),
        pixel_data_offset=pixel_offset,
        file_size=file_size,
    )
    return ds, header


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def find_series(
    root: str | os.PathLike, unreadable: list[tuple[Path, str]] | None = None
) -> list[DicomSeries]:
    """All DICOM series under ``root`` (a folder tree, or a single file).

    Only headers are read. Files that are not DICOM are skipped (logged at debug level); DICOM
    files without a SeriesInstanceUID (e.g. DICOMDIR) are skipped too.

    Args:
        root: folder tree or file.
        unreadable: when a list is given, DICOM files that cannot be parsed are appended to it
            as ``(path, message)`` instead of raising, so that one broken file in an archive
            does not hide the other studies (the caller decides whose case it spoils).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DicomSeriesError: a file with the DICOM preamble cannot be parsed (truncated, corrupt)
            and ``unreadable`` is None.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"DICOM folder not found: {root}")
    paths = [root] if root.is_file() else list(_walk(root))
    groups: dict[tuple[str, str], DicomSeries] = {}
    for path in paths:
        try:
            read = read_header(path)
        except DicomSeriesError as err:
            if unreadable is None:
                raise
            unreadable.append((path, str(err)))
            continue
        if read is None:
            logger.debug("skipping non-DICOM file %s", path)
            continue
        ds, header = read
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        blank = tuple(tag for tag in _REFERENCING_UIDS if not str(ds.get(tag, "") or "").strip())
        if not series_uid:
            sop_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
            if header.pixel_data_offset is not None and header.rows and header.columns:
                # the header was read whole up to its pixel data: de-identified, not cut short
                logger.debug("%s: blank %s (de-identified?)", path, ", ".join(blank))
            elif getattr(ds, "preamble", None) is not None and sop_class != _MEDIA_STORAGE_DIRECTORY:
                # every composite object has a SeriesInstanceUID: this file was cut short
                message = (
                    f"{path}: DICOM file without SeriesInstanceUID (truncated or corrupt?); "
                    f"only {len(ds)} data elements could be read from its {header.file_size} bytes"
                )
                if unreadable is None:
                    raise DicomSeriesError(message)
                unreadable.append((path, message))
                continue
            else:
                logger.debug("skipping DICOM file without SeriesInstanceUID: %s", path)
                continue
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        key = (study_uid, series_uid)
        series = groups.get(key)
        if series is None:
            series = groups[key] = DicomSeries(
                folder=root,
                study_uid=study_uid,
                series_uid=series_uid,
                modality=str(ds.get("Modality", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
                series_number=_int_or_none(ds.get("SeriesNumber")),
                files=[],
            )
        series.files.append(path)
        series.headers[path] = header
        if blank:
            series.missing_uids = tuple(u for u in _REFERENCING_UIDS if u in blank or u in series.missing_uids)
    result = list(groups.values())
    for series in result:
        series.files.sort()
        if series.missing_uids:
            logger.warning(
                "DICOM series in %s (%d files): %s blank or missing (a de-identified export?); read as one "
                "series if its geometry is consistent, but a DICOM-SEG cannot reference it",
                series.folder, len(series.files), ", ".join(series.missing_uids),
            )
    result.sort(key=lambda s: (s.study_uid, -1 if s.series_number is None else s.series_number, s.series_uid))
    logger.debug("found %d DICOM series under %s", len(result), root)
    return result


#: the UIDs a DICOM-SEG needs to reference its source images
_REFERENCING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _listing(series: Iterable[DicomSeries]) -> str:
    return "\n".join(f"  - {s.summary()}" for s in series)


def select_series(folder: str | os.PathLike, series_uid: str | None = None) -> DicomSeries:
    """The one DICOM series under ``folder``, or the one whose SeriesInstanceUID is ``series_uid``.

    Without ``series_uid``, series of non-image modalities (SEG, RTSTRUCT, SR, ...) are ignored;
    if several image series remain, a :class:`DicomSeriesError` lists them.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        DicomSeriesError: no DICOM file under ``folder``; several series and no ``series_uid``;
            ``series_uid`` not found.
    """
    folder = Path(folder)
    found = find_series(folder)
    if not found:
        raise DicomSeriesError(f"no DICOM files found in {folder}")
    if series_uid is not None:
        matches = [s for s in found if s.series_uid == str(series_uid)]
        if not matches:
            raise DicomSeriesError(
                f"series_uid {series_uid} not found in {folder}; it holds:\n{_listing(found)}"
            )
        if len(matches) > 1:
            raise DicomSeriesError(
                f"series_uid {series_uid} appears in {len(matches)} studies in {folder}: "
                + ", ".join(s.study_uid for s in matches)
            )
        return matches[0]
    images = [s for s in found if s.modality.upper() not in NON_IMAGE_MODALITIES]
    if not images:
        raise DicomSeriesError(f"no image series in {folder} (only non-image series):\n{_listing(found)}")
    if len(images) > 1:
        raise DicomSeriesError(
            f"{folder} holds {len(images)} DICOM image series; pass series_uid to choose one:\n"
            f"{_listing(images)}"
        )
    skipped = [s for s in found if s not in images]
    if skipped:
        logger.info("ignoring non-image series in %s:\n%s", folder, _listing(skipped))
    return images[0]


def _where(series: DicomSeries) -> str:
    return f"DICOM series {series.series_uid} in {series.folder}"


def _groups(headers: list[SliceHeader], key, same) -> list[list[SliceHeader]]:
    """Group headers whose key values are `same`; largest group first."""
    groups: list[tuple[object, list[SliceHeader]]] = []
    for h in headers:
        value = key(h)
        for ref, members in groups:
            if same(ref, value):
                members.append(h)
                break
        else:
            groups.append((value, [h]))
    return [members for _, members in sorted(groups, key=lambda g: -len(g[1]))]


def _close(atol: float):
    def same(a, b) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return len(a) == len(b) and bool(np.allclose(a, b, atol=atol, rtol=0))

    return same


def _name_files(headers: list[SliceHeader], limit: int = 3) -> str:
    names = [str(h.path) for h in headers[:limit]]
    more = f" and {len(headers) - limit} more" if len(headers) > limit else ""
    return ", ".join(names) + more


def _expected_pixel_bytes(h: SliceHeader) -> int | None:
    if h.rows is None or h.columns is None or h.bits_allocated is None:
        return None
    return h.rows * h.columns * h.samples_per_pixel * h.number_of_frames * ((h.bits_allocated + 7) // 8)


def check_series(series: DicomSeries) -> DicomSeries:
    """Check that ``series`` is one regular 3D volume; return it with files sorted along the normal.

    The slice normal is the cross product of the row and column direction cosines of
    ImageOrientationPatient; files are sorted by ``dot(ImagePositionPatient, normal)``.

    Raises:
        DicomSeriesError: naming the folder/files and the problem: multi-frame files (not
            supported yet), colour images, missing geometry tags, missing or truncated pixel
            data, a compressed transfer syntax without its decoder plugin (see
            `check_decodable`), mixed
            Rows/Columns, mixed ImageOrientationPatient (e.g. a localizer), mixed PixelSpacing,
            fewer than 2 slices, duplicate positions, gantry tilt, missing slices, non-uniform
            spacing.
    """
    where = _where(series)
    headers = []
    for path in series.files:
        h = series.headers.get(path)
        if h is None:
            read = read_header(path)
            if read is None:
                raise DicomSeriesError(f"{where}: {path} is not a DICOM file")
            h = read[1]
        headers.append(h)
    if not headers:
        raise DicomSeriesError(f"{where}: the series has no files")

    multi = [h for h in headers if h.number_of_frames > 1]
    if multi:
        raise DicomSeriesError(
            f"{where}: multi-frame files (NumberOfFrames > 1) are not supported yet: "
            f"{_name_files(multi)} ({multi[0].number_of_frames} frames); convert to one file per slice"
        )
    colour = [h for h in headers if h.samples_per_pixel != 1]
    if colour:
        raise DicomSeriesError(
            f"{where}: {series.modality or 'image'} slices must be greyscale (SamplesPerPixel 1), "
            f"found SamplesPerPixel {colour[0].samples_per_pixel} in {_name_files(colour)}"
        )
    for tag, attr in (("Rows", "rows"), ("Columns", "columns"), ("ImageOrientationPatient", "orientation"),
                      ("ImagePositionPatient", "position"), ("PixelSpacing", "pixel_spacing")):
        missing = [h for h in headers if getattr(h, attr) is None]
        if missing:
            raise DicomSeriesError(
                f"{where}: {tag} missing or unreadable in {_name_files(missing)} (truncated or corrupt file?)"
            )
    bad_len = [h for h in headers if h.orientation is not None and len(h.orientation) != 6
               or h.position is not None and len(h.position) != 3
               or h.pixel_spacing is not None and len(h.pixel_spacing) != 2]
    if bad_len:
        raise DicomSeriesError(
            f"{where}: malformed geometry tags (IOP/IPP/PixelSpacing) in {_name_files(bad_len)}"
        )

    no_pixels = [h for h in headers if h.pixel_data_offset is None]
    if no_pixels:
        raise DicomSeriesError(
            f"{where}: no pixel data (7FE0,0010) in {_name_files(no_pixels)} "
            "(file truncated, or a header-only object?)"
        )
    for h in headers:
        if h.transfer_syntax not in _UNCOMPRESSED or h.transfer_syntax == "1.2.840.10008.1.2.1.99":
            continue
        expected = _expected_pixel_bytes(h)
        available = h.file_size - h.pixel_data_offset
        # the pixel data element header takes 8 (implicit VR) or 12 (explicit VR OW) bytes
        if expected is not None and available < expected + 8:
            raise DicomSeriesError(
                f"{where}: {h.path} is truncated: its pixel data needs {expected} bytes "
                f"({h.rows}x{h.columns}x{h.bits_allocated // 8}), "
                f"only {max(available - 12, 0)} are in the file"
            )

    check_decodable(headers, where)

    sizes = _groups(headers, lambda h: (h.rows, h.columns), lambda a, b: a == b)
    if len(sizes) > 1:
        detail = "; ".join(
            f"{g[0].rows}x{g[0].columns} in {len(g)} files ({_name_files(g, 2)})" for g in sizes
        )
        raise DicomSeriesError(f"{where}: mixed image sizes (Rows x Columns): {detail}")

    orients = _groups(headers, lambda h: h.orientation, _close(ORIENTATION_ATOL))
    if len(orients) > 1:
        odd = [h for g in orients[1:] for h in g]
        raise DicomSeriesError(
            f"{where}: mixed ImageOrientationPatient: {len(orients[0])} files have "
            f"{list(orients[0][0].orientation)}, but {_name_files(odd)} "
            f"{'has' if len(odd) == 1 else 'have'} {list(odd[0].orientation)} "
            "(a localizer/scout or another plane mixed into the series?)"
        )

    spacings = _groups(headers, lambda h: h.pixel_spacing, _close(PIXEL_SPACING_ATOL_MM))
    if len(spacings) > 1:
        detail = "; ".join(
            f"{list(g[0].pixel_spacing)} in {len(g)} files ({_name_files(g, 2)})" for g in spacings
        )
        raise DicomSeriesError(f"{where}: mixed PixelSpacing: {detail}")

    if len(headers) < 2:
        raise DicomSeriesError(
            f"{where}: only {len(headers)} slice ({headers[0].path}); a volume needs at least 2 slices"
        )

    iop = np.asarray(headers[0].orientation, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise DicomSeriesError(
            f"{where}: ImageOrientationPatient {list(iop)} has parallel row and column cosines"
        )
    normal = normal / norm
    positions = np.asarray([h.position for h in headers], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions, along = positions[order], along[order]

    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < POSITION_ATOL_MM)
    if dup.size:
        pairs = "; ".join(
            f"{headers[i].path} and {headers[i + 1].path} at {along[i]:.3f} mm" for i in dup[:3]
        )
        more = f" (and {dup.size - 3} more)" if dup.size > 3 else ""
        raise DicomSeriesError(f"{where}: duplicate slice positions along the normal: {pairs}{more}")

    # gantry tilt: the slice origins must move along the normal only
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    span = along[-1] - along[0]
    shift = np.linalg.norm(in_plane[-1])
    tilt = float(np.degrees(np.arctan2(shift, span)))
    if tilt > TILT_DEGREES_MAX:
        raise DicomSeriesError(
            f"{where}: gantry tilt of {tilt:.2f} degrees: slice positions move {shift:.2f} mm within "
            f"the slice plane over {span:.2f} mm along the normal ({headers[0].path} -> {headers[-1].path}); "
            "tilted series must be resampled first (e.g. dcm2niix corrects gantry tilt)"
        )
    worst = int(np.argmax(np.linalg.norm(in_plane, axis=1)))
    if np.linalg.norm(in_plane[worst]) > IN_PLANE_ATOL_MM:
        raise DicomSeriesError(
            f"{where}: slice origins are not aligned along the slice normal: {headers[worst].path} is "
            f"shifted {np.linalg.norm(in_plane[worst]):.2f} mm within the slice plane from {headers[0].path}"
        )

    usual = float(np.median(gaps))
    tol = max(SPACING_RTOL * usual, POSITION_ATOL_MM)
    bad = np.flatnonzero(np.abs(gaps - usual) > tol)
    if bad.size:
        problems = []
        for i in bad[:5]:
            ratio = gaps[i] / usual
            steps = round(ratio)
            between = (
                f"between positions {along[i]:.3f} and {along[i + 1]:.3f} mm "
                f"({headers[i].path.name} and {headers[i + 1].path.name})"
            )
            if steps >= 2 and abs(ratio - steps) * usual <= tol * steps:
                problems.append(
                    f"missing slice(s) {between}: gap {gaps[i]:.3f} mm is {steps}x the usual "
                    f"{usual:.3f} mm ({steps - 1} slice(s) missing)"
                )
            else:
                problems.append(f"gap {gaps[i]:.3f} mm {between}")
        more = f"; and {bad.size - 5} more" if bad.size > 5 else ""
        missing_only = all(p.startswith("missing") for p in problems)
        kind = "missing slices" if missing_only else "non-uniform slice spacing"
        raise DicomSeriesError(
            f"{where}: {kind} (usual spacing {usual:.3f} mm, gaps from {gaps.min():.3f} to "
            f"{gaps.max():.3f} mm): " + "; ".join(problems) + more
        )

    if series.modality.upper() in NON_IMAGE_MODALITIES:
        logger.warning("%s: modality %s is not an image volume", where, series.modality)
    ps = headers[0].pixel_spacing
    return dataclasses.replace(
        series,
        files=[h.path for h in headers],
        checked=True,
        slice_spacing=usual,
        pixel_spacing=(float(ps[0]), float(ps[1])),
        orientation=tuple(float(v) for v in iop),
        headers={h.path: h for h in headers},
    )


def _syntax_name(uid: str | None) -> str:
    if not uid:
        return "unknown transfer syntax (no TransferSyntaxUID)"
    name = pydicom.uid.UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def check_decodable(headers: Sequence[SliceHeader], where: str = "DICOM series") -> None:
    """Check that compressed pixel data is complete and that pydicom's plugins decode it.

    For every compressed file, the encapsulated pixel data must end with its sequence
    delimiter (a cheap test for truncation); one file per transfer syntax is decoded in full by
    pydicom, so that a missing plugin is reported here, naming the packages to install, rather
    than deep inside a reader.

    Raises:
        DicomSeriesError: naming the file, its transfer syntax and what is wrong.
    """
    tried: set[str] = set()
    for h in headers:
        ts = h.transfer_syntax
        if ts in _UNCOMPRESSED or ts is None:
            continue
        with open(h.path, "rb") as fp:
            fp.seek(max(h.file_size - len(_SEQUENCE_DELIMITER), 0))
            complete = fp.read() == _SEQUENCE_DELIMITER
        if not complete or ts not in tried:
            _decode_one(h, where, truncated=not complete)
            tried.add(ts)


def _decode_one(h: SliceHeader, where: str, truncated: bool) -> None:
    """Decode ``h.path`` with pydicom; a DicomSeriesError says which plugin or what data is missing."""
    name = _syntax_name(h.transfer_syntax)
    plugins = DECODER_PLUGINS.get(str(h.transfer_syntax))
    try:
        ds = pydicom.dcmread(h.path)
        ds.pixel_array  # noqa: B018 (decoding is the check)
    except (NotImplementedError, ImportError) as err:
        hint = f"install {plugins}" if plugins else "no pydicom plugin known to monai-sam decodes it"
        raise DicomSeriesError(
            f"{where}: {h.path} is compressed with {name}, which no installed pixel data plugin can "
            f"decode: {hint} (pip install -r requirements.txt). pydicom said: {err}"
        ) from err
    except RuntimeError as err:
        if "plugin" in str(err).lower() or "handler" in str(err).lower():
            hint = f"install {plugins}" if plugins else "no pydicom plugin known to monai-sam decodes it"
            raise DicomSeriesError(
                f"{where}: {h.path} is compressed with {name}, which no installed pixel data plugin can "
                f"decode: {hint}. pydicom said: {err}"
            ) from err
        raise DicomSeriesError(
            f"{where}: {h.path}: compressed pixel data ({name}) cannot be decoded "
            f"(truncated or corrupt?): {err}"
        ) from err
    except Exception as err:  # decoders raise anything from ValueError to their own error types
        raise DicomSeriesError(
            f"{where}: {h.path}: compressed pixel data ({name}) cannot be decoded "
            f"(truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err
    if truncated:
        # decoders may pad a short last fragment silently: no delimiter is still an error
        raise DicomSeriesError(
            f"{where}: {h.path} is truncated: its compressed pixel data ({name}) does not end with the "
            "sequence delimiter"
        )


def series_folder(series: DicomSeries) -> Path:
    """The deepest folder holding every file of ``series`` (what `load_volume` is given)."""
    if not series.files:
        return Path(series.folder)
    return Path(os.path.commonpath([str(Path(f).parent) for f in series.files]))


def _axial_angle(orientation: Sequence[float] | None) -> float | None:
    """Angle in degrees between the slice normal and the patient's z (head-feet) axis."""
    if orientation is None or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return None
    return float(np.degrees(np.arccos(min(abs(normal[2]) / norm, 1.0))))


def _rejection(
    series: DicomSeries, modalities: Sequence[str], min_slices: int, max_oblique_degrees: float
) -> str | None:
    """Why ``series`` cannot be segmented as a volume by a model for ``modalities`` (None: it can)."""
    modality = series.modality.upper()
    if modality not in modalities:
        return f"modality {series.modality or 'missing'} (this model reads {'/'.join(modalities)})"
    headers = [series.headers[f] for f in series.files if f in series.headers]
    if any(h.samples_per_pixel != 1 for h in headers):
        spp = next(h.samples_per_pixel for h in headers if h.samples_per_pixel != 1)
        return f"colour images (SamplesPerPixel {spp}), not a greyscale {modality} volume"
    frames = [h for h in headers if h.number_of_frames > 1]
    if frames:
        return (
            f"multi-frame file(s) ({frames[0].number_of_frames} frames in {frames[0].path.name}); "
            "only one-file-per-slice series are read"
        )
    angles = [a for a in (_axial_angle(h.orientation) for h in headers) if a is not None]
    if angles:
        # the orientation shared by most slices decides (a mixed-in localizer is check_series' business)
        angle = float(np.median(angles))
        if angle > max_oblique_degrees:
            return f"not axial: slice normal {angle:.0f} degrees from the head-feet axis (sagittal/coronal?)"
    if series.n_slices < min_slices:
        return f"only {series.n_slices} slice(s) (a localizer?); at least {min_slices} needed"
    return None


def pick_image_series(
    found: Sequence[DicomSeries],
    modalities: Sequence[str] = ("CT", "MR"),
    min_slices: int = 8,
    max_oblique_degrees: float = 30.0,
    where: str | None = None,
) -> DicomSeries:
    """The one series of ``found`` (usually one study) that a model for ``modalities`` can segment.

    A series is usable when its modality is one of ``modalities``, its slices are greyscale,
    one file per slice, axial within ``max_oblique_degrees``, and there are at least
    ``min_slices`` of them. Localizers, reports, segmentations, colour screenshots and
    reformats are thus left aside (logged at info level).

    Raises:
        DicomSeriesError: no usable series, or several (listing them with their UIDs, so that
            one can be chosen by SeriesInstanceUID); the message names ``where``.
    """
    modalities = tuple(m.upper() for m in modalities)
    where = where or (str(found[0].folder) if found else "DICOM input")
    if not found:
        raise DicomSeriesError(f"{where}: no DICOM series found")
    usable, rejected = [], []
    for s in found:
        why = _rejection(s, modalities, min_slices, max_oblique_degrees)
        (rejected if why else usable).append((s, why))
    listing = "\n".join(f"  - {s.summary()}: {why}" for s, why in rejected)
    if not usable:
        raise DicomSeriesError(
            f"{where}: no series usable as a {'/'.join(modalities)} volume:\n{listing}"
        )
    if len(usable) > 1:
        raise DicomSeriesError(
            f"{where}: {len(usable)} {'/'.join(modalities)} series could be segmented; choose one by its "
            f"SeriesInstanceUID (--series-uid):\n{_listing(s for s, _ in usable)}"
        )
    if rejected:
        logger.info("%s: using %s; left aside:\n%s", where, usable[0][0].summary(), listing)
    return usable[0][0]
