"""Training samples as short axial slice sequences that contain one object.

The memory network sees a volume as a video whose frames are the axial slices
(``volume[..., k]``). Training on whole volumes is too slow and mostly background, so each
sample is ``T`` consecutive slices around a slice where the chosen object is present.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Crop, InvertibleTransform, MapTransform, Randomizable
from monai.utils import convert_to_numpy

__all__ = ["SampleSliceSequenced", "source_name", "present_labels"]


def source_name(data: Mapping[Hashable, Any], key: Hashable) -> str:
    """The file ``data[key]`` came from (``filename_or_obj`` in its meta), for error messages."""
    value = data.get(key)
    meta = value.meta if isinstance(value, MetaTensor) else data.get(f"{key}_meta_dict", {})
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)) and name:  # a batched meta dict
        name = name[0]
    return str(name) if name else f"<{key!s}: no filename in metadata>"


def label_volume(label: NdarrayOrTensor, where: str) -> np.ndarray:
    """A channel-first single-channel label ``(1, X, Y, Z)`` (or ``(X, Y, Z)``) as ``(X, Y, Z)`` ints."""
    arr = convert_to_numpy(label)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(
                f"{where}: expected a single-channel label map (1, X, Y, Z), got shape {arr.shape}"
                " (one-hot labels are not supported here)"
            )
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{where}: expected a label volume (1, X, Y, Z), got shape {arr.shape}")
    return np.rint(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.int64)


def present_labels(label: np.ndarray) -> list[int]:
    """Non-zero label values present in ``label``, sorted.

    Counts with ``bincount`` for non-negative labels: linear time, where ``np.unique``'s sort of a
    whole CT volume took most of a training step's data time.
    """
    flat = np.asarray(label).ravel()
    if flat.size and np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0:
        return [int(v) for v in np.flatnonzero(np.bincount(flat)) if v != 0]
    return [int(v) for v in np.unique(flat) if v != 0]


class SampleSliceSequenced(Randomizable, InvertibleTransform, MapTransform):
    """Crop ``num_slices`` consecutive axial slices in which a randomly chosen object appears.

    The object is drawn uniformly among the requested ``label_ids`` present in the label (all
    non-zero labels present when ``label_ids`` is None). An anchor slice is drawn uniformly
    among the slices that contain the object, then the window start uniformly among the
    windows that contain the anchor and fit in the volume. So the object is in the sequence
    by construction, and objects spanning few slices are not under-sampled.

    Every key in ``keys`` is cropped along its last axis with MONAI's ``Crop`` (affine updated,
    invertible: ``inverse`` pads the removed slices back with zeros). Put the label key in
    ``keys`` as well, so that image and label stay aligned for the prompt transforms.

    Args:
        keys: keys to crop, e.g. ``("image", "label")``; all ``(C, X, Y, Z)``.
        label_key: label map ``(1, X, Y, Z)`` used to choose the object and its slices.
        num_slices: ``T``, number of consecutive slices (frames) per sample.
        label_ids: object ids to choose from (e.g. the organs this bundle trains on);
            None = any non-zero label present in this volume.
        object_key: the chosen object id is written to ``data[object_key]`` and to the meta of
            every cropped MetaTensor under the same name.
        start_key: index (in the input volume) of the first kept slice, written likewise.
        allow_short: a volume with fewer than ``T`` slices raises a ValueError by default
            (batches need a fixed ``T``; padding would invent empty frames); True keeps all of
            its slices instead, giving a shorter sequence (use with batch size 1).
        allow_missing_keys: don't raise if a key in ``keys`` is absent.

    Raises:
        ValueError: no requested object is present (message names the file and the ids), or
            the volume is shorter than ``T`` and ``allow_short`` is False.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_slices: int,
        label_key: str = "label",
        label_ids: Sequence[int] | None = None,
        object_key: str = "object_id",
        start_key: str = "slice_start",
        allow_short: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if int(num_slices) < 1:
            raise ValueError(f"num_slices must be at least 1, got {num_slices}")
        self.num_slices = int(num_slices)
        self.label_key = label_key
        self.label_ids = None if label_ids is None else [int(i) for i in label_ids]
        self.object_key = object_key
        self.start_key = start_key
        self.allow_short = allow_short
        self.cropper = Crop()
        self._object_id = 0
        self._start = 0
        self._stop = 0

    def randomize(self, label: np.ndarray, where: str = "label") -> None:
        """Choose the object id and the slice window from a ``(X, Y, Z)`` label."""
        present = present_labels(label)
        candidates = present if self.label_ids is None else [i for i in self.label_ids if i in present]
        if not candidates:
            wanted = "any non-zero label" if self.label_ids is None else f"label ids {self.label_ids}"
            raise ValueError(
                f"{where}: empty label where one is required: looked for {wanted}, found {present}"
            )
        depth = label.shape[-1]
        if depth < self.num_slices and not self.allow_short:
            raise ValueError(
                f"{where}: {depth} axial slices, fewer than the {self.num_slices} needed per sequence "
                "(set allow_short=True to keep all slices)"
            )
        self._object_id = int(candidates[self.R.randint(len(candidates))])
        on = np.flatnonzero((label == self._object_id).any(axis=(0, 1)))
        anchor = int(on[self.R.randint(len(on))])
        length = min(self.num_slices, depth)
        lo, hi = max(0, anchor - length + 1), min(anchor, depth - length)
        self._start = int(lo + self.R.randint(hi - lo + 1))
        self._stop = self._start + length

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        d = dict(data)
        where = source_name(d, self.label_key)
        if self.label_key not in d:
            raise KeyError(f"{where}: no label key {self.label_key!r} to choose slices from")
        self.randomize(label_volume(d[self.label_key], where), where)
        for key in self.key_iterator(d):
            img = d[key]
            slices = (slice(None),) * (img.ndim - 2) + (slice(self._start, self._stop),)
            out = self.cropper(img, slices=slices)
            if isinstance(out, MetaTensor):
                out.meta[self.object_key] = self._object_id
                out.meta[self.start_key] = self._start
            d[key] = out
        d[self.object_key] = self._object_id
        d[self.start_key] = self._start
        return d

    def inverse(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        """Pad the cropped keys back to the full volume (zeros outside the sequence)."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d


def as_int_list(values: Sequence[int] | int | torch.Tensor | np.ndarray) -> list[int]:
    """Normalise ids given as an int, a list, an array or a tensor to a list of ints."""
    return [int(v) for v in np.asarray(convert_to_numpy(values)).reshape(-1)]
