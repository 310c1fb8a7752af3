"""Lesions as objects: each connected component of a tumour label becomes its own object id.

The memory network tracks objects, and a tumour class is not one object: a patient may have
several lesions at different heights, each prompted on its own slice and propagated through
its own extent. These transforms turn a semantic label map (e.g. LiTS / MSD Task03: 1 liver,
2 tumour) into an *object map* where the organ keeps its id and lesion ``k`` (``k = 1..N``,
3D connected components in raster order) gets the id ``first_id + k - 1`` (100, 101, ... by
default), and back.

Object maps are ordinary label maps, so the prompt transforms (`RandPromptFromLabeld`,
`PromptFromLabeld`), `SampleSliceSequenced` and the trainer's per-object targets work on them
unchanged; the lesions only need to be disjoint from the organ (LiTS-style labels, where the
liver label excludes its tumours).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from monai_sam.evaluation.lesions import label_lesions
from monai_sam.transforms.prompts import PromptFromLabelBase, RandPromptFromLabeld
from monai_sam.transforms.slices import label_volume, source_name

__all__ = [
    "FIRST_LESION_ID",
    "LesionInstancesd",
    "LesionPromptsd",
    "RandLesionPromptsd",
    "MergeLesionsd",
    "lesion_instances",
    "merge_lesions",
]

logger = logging.getLogger(__name__)

#: Object id of the first lesion; organs keep their (smaller) label values.
FIRST_LESION_ID = 100


def _spacing_of(label: Any, spacing: Sequence[float] | None) -> tuple[float, float, float]:
    if spacing is not None:
        return tuple(float(s) for s in spacing)  # type: ignore[return-value]
    affine = getattr(label, "affine", None)
    if affine is None:
        return (1.0, 1.0, 1.0)
    a = np.asarray(convert_to_numpy(affine), dtype=float)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a**2).sum(axis=0)))  # type: ignore[return-value]


def lesion_instances(
    label: np.ndarray,
    lesion_label: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    first_id: int = FIRST_LESION_ID,
    connectivity: int = 3,
    min_volume_mm3: float = 0.0,
    fill_label: int = 0,
    where: str = "label",
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Object map of a ``(X, Y, Z)`` label: lesion ``k`` of ``lesion_label`` -> ``first_id + k - 1``.

    Components are 3D (``connectivity`` as in `monai_sam.evaluation.lesions.label_lesions`, 26
    neighbours by default, the same rule the lesion-level evaluation counts lesions with).
    Components under ``min_volume_mm3`` (annotation specks) become ``fill_label``. Other
    labels are kept.

    Returns:
        ``(objects, lesions)``: an int64 array and one dict per lesion (``object_id``,
        ``voxels``, ``volume_mm3``, ``diameter_mm`` = longest axial diameter, ``axial_slice``
        where it is found, ``size_bin``).

    Raises:
        ValueError: the label already holds values ``>= first_id`` (they would be mistaken
            for lesions), naming ``where``.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"{where}: expected a (X, Y, Z) label volume, got shape {label.shape}")
    others = np.unique(label[(label != lesion_label) & (label != 0)])
    if others.size and int(others.max()) >= first_id:
        raise ValueError(
            f"{where}: label values {others[others >= first_id].tolist()} collide with lesion object ids "
            f"(lesions are numbered from {first_id}); map them first or raise first_id"
        )
    components, lesions = label_lesions(
        label == lesion_label, spacing, connectivity=connectivity, min_volume_mm3=min_volume_mm3
    )
    objects = label.astype(np.int64, copy=True)
    objects[label == lesion_label] = int(fill_label)  # specks under min_volume_mm3 keep this
    objects[components > 0] = components[components > 0].astype(np.int64) + (int(first_id) - 1)
    described = [
        {
            "object_id": int(first_id) + les.id - 1,
            "voxels": les.voxels,
            "volume_mm3": les.volume_mm3,
            "diameter_mm": les.max_axial_diameter_mm,
            "axial_slice": les.axial_slice,
            "size_bin": les.size_bin,
        }
        for les in lesions
    ]
    return objects, described


def merge_lesions(
    objects: NdarrayOrTensor, lesion_label: int, first_id: int = FIRST_LESION_ID
) -> NdarrayOrTensor:
    """Object map -> class map: every id ``>= first_id`` becomes ``lesion_label``; others are kept.

    The input type (MetaTensor with its metadata, tensor or array) and dtype are kept.
    """
    if isinstance(objects, torch.Tensor):
        out = objects.clone()
        out[objects >= first_id] = lesion_label
        return out
    out = np.array(objects, copy=True)
    out[out >= first_id] = lesion_label
    return out


class LesionInstancesd(MapTransform):
    """Turn the tumour class of label maps into one object id per lesion (`lesion_instances`).

    Put it after the label is loaded and mapped to the bundle's classes, before
    `SampleSliceSequenced` (lesions are 3D components of the whole volume, so a lesion cut by
    the sequence window keeps its id) and before the prompt transforms.

    Args:
        keys: label maps ``(1, X, Y, Z)`` (or ``(X, Y, Z)``); replaced by their object maps,
            keeping the MetaTensor metadata (spacing from its affine).
        lesion_label: the tumour class value (2 for LiTS / MSD Task03).
        first_id: id of the first lesion.
        connectivity, min_volume_mm3, fill_label: see `lesion_instances`.
        spacing: voxel size in mm when the label has no affine (default: from the affine).
        lesions_key: where the lesion descriptions of the first key are written (None: nowhere).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        lesion_label: int = 2,
        first_id: int = FIRST_LESION_ID,
        connectivity: int = 3,
        min_volume_mm3: float = 0.0,
        fill_label: int = 0,
        spacing: Sequence[float] | None = None,
        lesions_key: str | None = "lesions",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(first_id) <= int(lesion_label):
            raise ValueError(f"first_id ({first_id}) must be above the lesion label ({lesion_label})")
        self.lesion_label, self.first_id = int(lesion_label), int(first_id)
        self.connectivity = connectivity
        self.min_volume_mm3, self.fill_label = float(min_volume_mm3), int(fill_label)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.lesions_key = lesions_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            where = source_name(d, key)
            value = d[key]
            arr = label_volume(value, where)
            objects, lesions = lesion_instances(
                arr, self.lesion_label, _spacing_of(value, self.spacing), self.first_id, self.connectivity,
                self.min_volume_mm3, self.fill_label, where,
            )  # fmt: skip
            d[key] = _like(value, objects)
            if first and self.lesions_key is not None:
                d[self.lesions_key] = lesions
            first = False
            logger.debug("%s: %d lesion object(s) from label %d", where, len(lesions), self.lesion_label)
        return d


class MergeLesionsd(MapTransform):
    """Object maps back to class maps (`merge_lesions`): lesion ids ``>= first_id`` -> ``lesion_label``.

    Args:
        keys: object maps (predictions or `LesionInstancesd` outputs).
        lesion_label: the tumour class value written for every lesion.
        first_id: id of the first lesion object.
        output_keys: where the class maps go (default: in place); one per key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lesion_label: int = 2,
        first_id: int = FIRST_LESION_ID,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lesion_label, self.first_id = int(lesion_label), int(first_id)
        if output_keys is None:
            outs = self.keys
        else:
            outs = (output_keys,) if isinstance(output_keys, str) else tuple(output_keys)
        if len(outs) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(outs)} output_keys")
        self.output_keys = dict(zip(self.keys, outs, strict=True))

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_keys[key]] = merge_lesions(d[key], self.lesion_label, self.first_id)
        return d


class _LesionNames:
    """Adds lesion naming to a prompt transform: objects ``>= first_id`` of its output are named
    ``"<lesion_name>_<k>"`` (k from 1); ``shared_key_slices`` is False by default (lesions lie at
    different heights, and a box on one slice must carry through *that* lesion)."""

    def __init__(
        self,
        *,
        first_id: int = FIRST_LESION_ID,
        lesion_name: str = "lesion",
        shared_key_slices: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(shared_key_slices=shared_key_slices, **kwargs)
        self.first_id = int(first_id)
        self.lesion_name = str(lesion_name)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        d = super().__call__(data)
        for obj in d.get(self.prompt_key, []):
            if obj.object_id >= self.first_id and not obj.name:
                obj.name = f"{self.lesion_name}_{obj.object_id - self.first_id + 1}"
        return d


class RandLesionPromptsd(_LesionNames, RandPromptFromLabeld):
    """`RandPromptFromLabeld` on an object map, one prompt set per lesion, lesions named (training).

    Each lesion is its own object with its own key slice(s), so the memory network propagates
    each lesion from where it was prompted. Keyword arguments: ``first_id``, ``lesion_name``,
    ``shared_key_slices`` (default False) and every one of `RandPromptFromLabeld`'s; organs take
    their names from ``label_names``.
    """


class LesionPromptsd(_LesionNames, PromptFromLabelBase):
    """Oracle lesion prompts (evaluation, inference with a reference): `RandLesionPromptsd` without
    randomness.

    Defaults to what a reader draws: the exact box of each lesion on its largest axial slice
    (``key_slices="largest"``, ``mode_probs={"box": 1}``; one mode only). Not ``Randomizable``:
    a ``CacheDataset`` caches it with the loading before it.
    """

    def __init__(
        self, key_slices: str | int = "largest", mode_probs: Mapping[str, float] | None = None, **kwargs: Any
    ) -> None:
        if not kwargs.pop("deterministic", True):
            raise ValueError("LesionPromptsd is deterministic; use RandLesionPromptsd for random prompts")
        super().__init__(
            key_slices=key_slices,
            mode_probs={"box": 1.0} if mode_probs is None else mode_probs,
            deterministic=True,
            **kwargs,
        )


def _like(value: NdarrayOrTensor, objects: np.ndarray) -> NdarrayOrTensor:
    """``objects`` ``(X, Y, Z)`` in the container, channel layout and metadata of ``value``."""
    arr = objects[None] if np.ndim(value) == 4 else objects
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        if not dtype.is_floating_point and int(objects.max(initial=0)) > torch.iinfo(dtype).max:
            dtype = torch.int32  # e.g. a uint8 label with lesion ids past 255
        out = value.clone().to(dtype)  # a MetaTensor keeps its meta and applied operations
        out.copy_(torch.as_tensor(arr, dtype=dtype))
        return out
    dtype = np.asarray(value).dtype
    if np.issubdtype(dtype, np.integer) and int(objects.max(initial=0)) > np.iinfo(dtype).max:
        dtype = np.int32
    return arr.astype(dtype)
