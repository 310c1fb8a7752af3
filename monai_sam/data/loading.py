"""Load a CT/MR volume (NIfTI, NRRD/MHA, or a DICOM series folder) as a channel-first RAS MetaTensor.

Every volume in the project enters through here (``docs/conventions.md``): shape
``(1, X, Y, Z)``, float32, RAS orientation, with ``filename_or_obj``, ``affine``,
``original_affine`` and ``spacing`` in the metadata.

* NIfTI and other single files are read by MONAI's ``LoadImage`` (nibabel for NIfTI, ITK for
  NRRD/MHA/MHD, or the reader named by ``reader``).
* A DICOM folder (or one file of a series) is first searched and checked with
  :mod:`monai_sam.io.dicom` (one series, sorted along the slice normal, uniform spacing, no
  missing slices...). The checked file list is then read by MONAI's ``ITKReader`` as one
  series, in that order, so that exactly the chosen series is read.

Nothing is resampled: :class:`CheckImageLabeld` refuses an image and a label on different
grids instead.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, ITKReader, MetaTensor
from monai.transforms import LoadImage, MapTransform, Orientation, Orientationd, Transform
from monai.transforms.inverse import InvertibleTransform
from monai.utils import ensure_tuple, ensure_tuple_rep

from monai_sam.io.dicom import DicomSeries, check_series, read_header, select_series

__all__ = [
    "DicomSeriesITKReader",
    "LoadVolume",
    "load_volume",
    "LoadVolumed",
    "CheckImageLabeld",
    "check_same_grid",
    "is_dicom_path",
]

logger = logging.getLogger(__name__)

AXCODES = "RAS"


class DicomSeriesITKReader(ITKReader):
    """MONAI's ``ITKReader`` that reads a list of DICOM files as ONE series, in the given order.

    ``ITKReader`` reads a list of files as separate images stacked as channels and a folder as
    its first series (by ITK's series identifier, not the SeriesInstanceUID). Here a list of
    several files goes to ITK's ``ImageSeriesReader`` as is, so that the files chosen and sorted
    by :func:`monai_sam.io.dicom.check_series` are exactly what is read.
    """

    def read(self, data, **kwargs):
        names = [f"{n}" for n in ensure_tuple(data)]
        if len(names) > 1 and not any(Path(n).is_dir() for n in names):
            import itk

            kwargs_ = {**self.kwargs, **kwargs}
            return itk.imread(names, **kwargs_)
        return super().read(data, **kwargs)


@functools.lru_cache(maxsize=16)
def _image_loader(reader: str | None, dtype) -> LoadImage:
    """One ``LoadImage`` per (reader, dtype) and process: building one instantiates every MONAI
    reader (and logs their optional-dependency warnings), so it is done once."""
    if reader == DicomSeriesITKReader.__name__:
        reader_obj: ImageReader | str | None = _DICOM_READER
    else:
        reader_obj = reader
    return LoadImage(reader=reader_obj, image_only=True, dtype=dtype, ensure_channel_first=True)


# stateless; passed at call time so that LoadImage does not fall back to other readers
_DICOM_READER = DicomSeriesITKReader()


def is_dicom_path(path: str | os.PathLike) -> bool:
    """True for a folder (read as a DICOM series folder) or a file with a DICOM header."""
    path = Path(path)
    if path.is_dir():
        return True
    if not path.is_file():
        return False
    if path.name.endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".npy", ".npz")):
        return False
    return read_header(path) is not None


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


class LoadVolume(Transform):
    """Load one volume as a ``(C, X, Y, Z)`` float32 MetaTensor (channel first; orientation as stored).

    The orientation step is separate (``Orientation("RAS")`` in :func:`load_volume`,
    ``Orientationd`` in :class:`LoadVolumed`) so that it stays invertible.

    Args:
        reader: MONAI reader name for single files (``"NibabelReader"``, ``"ITKReader"``, ...);
            None picks by file extension. DICOM is always read with ITK.
        dtype: output data type.
    """

    def __init__(self, reader: str | None = None, dtype: np.dtype | type | None = np.float32) -> None:
        if reader is not None and not isinstance(reader, str):
            raise TypeError(f"reader must be a reader class name (str) or None, got {type(reader).__name__}")
        self.reader = reader
        self.dtype = dtype

    @property
    def _file_loader(self) -> LoadImage:
        return _image_loader(self.reader, self.dtype)

    @property
    def _dicom_loader(self) -> LoadImage:
        return _image_loader(DicomSeriesITKReader.__name__, self.dtype)

    def _read(self, loader: LoadImage, names, shown: Path, reader: ImageReader | None = None) -> MetaTensor:
        try:
            img = loader(names, reader=reader)
        except (FileNotFoundError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as err:  # readers raise anything from RuntimeError to zlib.error
            raise ValueError(f"cannot read image {shown}: {type(err).__name__}: {err}") from err
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)
        if img.ndim != 4:
            raise ValueError(
                f"{shown}: expected a 3D volume, read an array of shape {tuple(img.shape)} (channel first)"
            )
        return img

    def load_dicom(self, path: Path, series_uid: str | None = None) -> MetaTensor:
        """Find, check and read the DICOM series in folder ``path`` (or containing file ``path``)."""
        folder = path
        if path.is_file():
            folder = path.parent
            if series_uid is None:
                read = read_header(path)
                series_uid = str(read[0].get("SeriesInstanceUID", "")) if read is not None else None
        series: DicomSeries = check_series(select_series(folder, series_uid=series_uid))
        logger.debug("reading DICOM series %s", series.summary())
        img = self._read(self._dicom_loader, [str(f) for f in series.files], folder, reader=_DICOM_READER)
        img.meta["filename_or_obj"] = str(folder)
        img.meta["dicom_series_uid"] = series.series_uid
        img.meta["dicom_study_uid"] = series.study_uid
        img.meta["modality"] = series.modality
        return img

    def __call__(self, path: str | os.PathLike, series_uid: str | None = None) -> MetaTensor:
        path = Path(os.fspath(path)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        if is_dicom_path(path):
            if self.reader is not None and self.reader.lower() not in ("itkreader", "monai.data.itkreader"):
                raise ValueError(f"{path}: DICOM series are read with ITKReader, not {self.reader}")
            img = self.load_dicom(path, series_uid)
        else:
            if series_uid is not None:
                logger.debug("series_uid %s ignored for non-DICOM file %s", series_uid, path)
            img = self._read(self._file_loader, str(path), path)
        img.meta["spacing"] = _voxel_sizes(img.affine)
        return img


def load_volume(
    path: str | os.PathLike, series_uid: str | None = None, reader: str | None = None
) -> MetaTensor:
    """Load a volume as a channel-first ``(1, X, Y, Z)`` float32 MetaTensor in RAS orientation.

    Args:
        path: a NIfTI file (``.nii``/``.nii.gz``), another ITK-readable file (``.nrrd``, ``.mha``),
            a DICOM series folder (searched recursively) or one file of a DICOM series.
        series_uid: SeriesInstanceUID to read when the folder holds several series.
        reader: MONAI reader class name for single files (None: by extension).

    Returns:
        The volume with meta ``filename_or_obj`` (the file, or the DICOM folder), ``affine``
        (RAS), ``original_affine`` (RAS, before re-orientation), ``spacing`` (voxel sizes in mm
        along the returned axes) and, for DICOM, ``dicom_series_uid``/``dicom_study_uid``/``modality``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read (the message names it), or it is not 3D.
        monai_sam.io.dicom.DicomSeriesError: (a ``ValueError``) the DICOM folder holds no, several,
            or an irregular series.
    """
    img = LoadVolume(reader=reader)(path, series_uid=series_uid)
    img = Orientation(axcodes=AXCODES, labels=None)(img)
    img.meta["spacing"] = _voxel_sizes(img.affine)
    return img


class LoadVolumed(MapTransform, InvertibleTransform):
    """Dict version of :func:`load_volume`: load each key's path, channel first, RAS.

    Keys may mix formats, e.g. a DICOM folder ``image`` and a NIfTI ``label``. The re-orientation
    is MONAI's ``Orientationd`` and is inverted by ``Invertd`` (through :meth:`inverse`).

    Args:
        keys: keys of the paths to load.
        series_uid_key: key (or one key per entry of ``keys``) holding the SeriesInstanceUID to
            read from a DICOM folder holding several series; a missing key or None means "the
            only series".
        reader: MONAI reader class name for single files (None: by extension).
        allow_missing_keys: don't raise for missing keys.
        image_only: if False, also store a copy of each meta dict at ``{key}_{meta_key_postfix}``.
        meta_key_postfix: see ``image_only``.
        dtype: data type of the loaded arrays.
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid_key: str | Sequence[str | None] | None = None,
        reader: str | None = None,
        allow_missing_keys: bool = False,
        image_only: bool = True,
        meta_key_postfix: str = "meta_dict",
        dtype: np.dtype | type | None = np.float32,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid_keys = ensure_tuple_rep(series_uid_key, len(self.keys))
        self.image_only = image_only
        self.meta_key_postfix = meta_key_postfix
        self._loader = LoadVolume(reader=reader, dtype=dtype)
        self._orient = Orientationd(
            keys=self.keys, axcodes=AXCODES, labels=None, allow_missing_keys=allow_missing_keys
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, uid_key in self.key_iterator(d, self.series_uid_keys):
            uid = d.get(uid_key) if uid_key is not None else None
            d[key] = self._loader(d[key], series_uid=str(uid) if uid else None)
        d = self._orient(d)
        for key in self.key_iterator(d):
            d[key].meta["spacing"] = _voxel_sizes(d[key].affine)
            if not self.image_only:
                d[f"{key}_{self.meta_key_postfix}"] = dict(d[key].meta)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Undo the re-orientation (the loading itself has nothing to undo)."""
        return self._orient.inverse(data)


def _name(img: torch.Tensor, fallback: str) -> str:
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else fallback


def check_same_grid(image: torch.Tensor, label: torch.Tensor, atol: float = 1e-3) -> None:
    """Raise ``ValueError`` (naming both files) unless image and label share spatial shape and affine.

    Args:
        image, label: channel-first MetaTensors.
        atol: tolerance on affine entries (mm for the origin).
    """
    image_name, label_name = _name(image, "<image>"), _name(label, "<label>")
    if tuple(image.shape[1:]) != tuple(label.shape[1:]):
        raise ValueError(
            f"image {image_name} and label {label_name} have different spatial shapes: "
            f"{tuple(image.shape[1:])} vs {tuple(label.shape[1:])} (the label must be on the image's grid; "
            "nothing is resampled)"
        )
    a = getattr(image, "affine", None)
    b = getattr(label, "affine", None)
    if a is None or b is None:
        return
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, atol=atol, rtol=0):
        diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
        raise ValueError(
            f"image {image_name} and label {label_name} have different affines (max difference "
            f"{diff:.4g} > {atol}):\nimage:\n{np.array2string(a, precision=4)}\nlabel:\n"
            f"{np.array2string(b, precision=4)}\n"
            "(the label must be on the image's grid; nothing is resampled)"
        )


class CheckImageLabeld(MapTransform):
    """Check that ``label_key`` lies on the grid of ``image_key`` (same spatial shape and affine).

    Raises ``ValueError`` naming both files otherwise. Returns the data unchanged.

    Args:
        image_key, label_key: the keys to compare.
        atol: tolerance on affine entries (mm for the origin).
        allow_missing_keys: skip the check when one of the keys is missing (e.g. inference
            without labels).
    """

    def __init__(
        self, image_key: str = "image", label_key: str = "label", atol: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__([image_key, label_key], allow_missing_keys)
        self.image_key = image_key
        self.label_key = label_key
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Mapping[Hashable, torch.Tensor]:
        present = [k for k in (self.image_key, self.label_key) if k in data]
        if len(present) < 2:
            if self.allow_missing_keys:
                return data
            missing = [k for k in (self.image_key, self.label_key) if k not in data]
            raise KeyError(f"CheckImageLabeld: key(s) {missing} not in data (keys: {list(data)})")
        check_same_grid(data[self.image_key], data[self.label_key], atol=self.atol)
        return data
