"""2D prompts for regions that are unions of label values, and a crop around one of them.

Photographs such as fundus images label disjoint classes (REFUGE: 1 optic disc rim, 2 optic cup)
while the objects a user prompts are nested regions (the optic disc = labels {1, 2}, the cup =
label 2). These transforms work on a 2D label map ``(1, H, W)`` (rows = the vertical axis, as
loaded with ``LoadImaged(reader="PILReader", reverse_indexing=False)``):

- `RandRegionPromptd` / `RegionPromptd`: one `ObjectPrompts` per region (its id is the object
  id, its prompt on slice 0), drawn by `RandPromptFromLabeld` / `PromptFromLabeld` from the
  region's mask, plus the regions' masks ``(N, H, W)`` under ``object_masks`` (the training
  targets of `monai_sam.networks.SamImageSegmenter` / `Sam2ImageSegmenter`).
- `LoadPhotoPromptFiled`: a user's prompt file (docs/prompt_file.md, ``"coordinates": "voxel"``)
  for a photograph: points ``[x, y, 0]``, x the column and y the row of the picture, which are
  the "indices of the array as stored" of a PNG/JPEG (pixel positions any viewer shows).
- `CropAroundRegiond`: a window around one region (the optic disc), sized relative to it, so
  that the structure fills the encoder input whatever the photograph's resolution (the usual
  region-of-interest step for REFUGE). It is deterministic, so a frozen encoder's cached
  features stay valid across epochs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Crop, InvertibleTransform, MapTransform, Randomizable
from monai.utils import convert_to_numpy

from monai_sam.prompts import ObjectPrompts, SlicePrompt
from monai_sam.transforms.prompts import LoadPromptFiled, PromptFromLabeld, RandPromptFromLabeld
from monai_sam.transforms.slices import source_name

__all__ = [
    "OBJECT_MASKS_KEY",
    "CropAroundRegiond",
    "LoadPhotoPromptFiled",
    "load_photo_prompt_file",
    "RandRegionPromptd",
    "RegionPromptd",
    "label_map_2d",
    "region_masks",
]

#: Batch-item key of the objects' binary masks ``(N, H, W)``, in the order of the prompts
#: (written here, read by the 2D networks as their training targets).
OBJECT_MASKS_KEY = "object_masks"


def label_map_2d(label: Any, where: str) -> np.ndarray:
    """A label ``(1, H, W)`` / ``(H, W)`` as an integer ``(H, W)`` array (error naming ``where``)."""
    arr = convert_to_numpy(label)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{where}: expected a 2D label map (1, H, W), got shape {arr.shape}")
    return np.rint(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.int64)


def _regions(regions: Mapping[Any, Sequence[int]]) -> dict[int, list[int]]:
    out = {
        int(k): [int(v) for v in (vals if isinstance(vals, Sequence) else [vals])]
        for k, vals in regions.items()
    }
    if not out or any(k <= 0 for k in out) or any(not v for v in out.values()):
        raise ValueError(
            f"regions must map positive object ids to non-empty lists of label values, got {regions}"
        )
    return out


def region_masks(label: np.ndarray, regions: Mapping[int, Sequence[int]]) -> np.ndarray:
    """Boolean masks ``(N, H, W)`` of the regions (each the union of its label values), in order."""
    return np.stack([np.isin(label, list(vals)) for vals in regions.values()])


class RegionPromptBase(MapTransform):
    """Prompts for each region of a 2D label map (box with jitter, clicks...), and the regions' masks.

    The logic shared by `RandRegionPromptd` (training) and `RegionPromptd` (oracle prompts, not
    ``Randomizable``: a ``CacheDataset`` caches it).

    Args:
        label_key: the 2D label map ``(1, H, W)``.
        regions: ``{object id: [label values]}``, e.g. ``{1: [1, 2], 2: [2]}`` for the optic disc
            (rim + cup) and the optic cup. Regions may overlap.
        region_names: ``{object id: name}`` for `ObjectPrompts.name`.
        prompt_key: where the ``list[ObjectPrompts]`` goes (prompts on slice 0).
        masks_key: where the ``(N, H, W)`` uint8 masks go, in the order of the prompts.
        mode_probs, box_jitter, num_positive, num_negative, negative_margin: as in
            `RandPromptFromLabeld` (``"mask"`` prompts only suit SAM2).
        allow_missing_keys: do nothing without a label.

    Raises:
        ValueError: a region is empty ("empty label where one is required", naming the file).
    """

    def __init__(
        self,
        label_key: str = "label",
        regions: Mapping[int, Sequence[int]] | None = None,
        region_names: Mapping[int, str] | None = None,
        prompt_key: str = "prompts",
        masks_key: str = OBJECT_MASKS_KEY,
        mode_probs: Mapping[str, float] | None = None,
        box_jitter: float = 5.0,
        num_positive: int = 1,
        num_negative: int = 0,
        negative_margin: int = 10,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(label_key, allow_missing_keys)
        if regions is None:
            raise ValueError("regions are required, e.g. {1: [1, 2], 2: [2]}")
        self.regions = _regions(regions)
        self.label_key, self.prompt_key, self.masks_key = label_key, prompt_key, masks_key
        self.prompter = self._prompter(
            region_names=region_names,
            mode_probs=mode_probs,
            box_jitter=box_jitter,
            num_positive=num_positive,
            num_negative=num_negative,
            negative_margin=negative_margin,
        )

    def _prompter(self, region_names, mode_probs, box_jitter, num_positive, num_negative, negative_margin):
        raise NotImplementedError

    def _share_random_state(self) -> None:
        """The random variant hands its stream to the prompter; the oracle one has none."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.label_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"no label key {self.label_key!r} to draw prompts from (keys: {list(d)})")
        where = source_name(d, self.label_key)
        label = label_map_2d(d[self.label_key], where)
        masks = region_masks(label, self.regions)
        self._share_random_state()
        objects: list[ObjectPrompts] = []
        for (object_id, values), mask in zip(self.regions.items(), masks, strict=True):
            if not mask.any():
                raise ValueError(
                    f"{where}: empty label where one is required: region {object_id} "
                    f"(label values {values}) is absent (labels present: {np.unique(label).tolist()})"
                )
            one = {"label": (mask.astype(np.int64) * object_id)[None, :, :, None]}
            objects += self.prompter(one)["prompts"]
        d[self.prompt_key] = objects
        d[self.masks_key] = torch.from_numpy(masks.astype(np.uint8))
        return d


class RandRegionPromptd(Randomizable, RegionPromptBase):
    """Random prompts for the regions (training); arguments as `RegionPromptBase`."""

    def _prompter(self, region_names, mode_probs, box_jitter, num_positive, num_negative, negative_margin):
        return RandPromptFromLabeld(
            label_key="label",
            prompt_key="prompts",
            key_slices="random",
            mode_probs=mode_probs,
            box_jitter=box_jitter,
            num_positive=num_positive,
            num_negative=num_negative,
            negative_margin=negative_margin,
            label_names=region_names,
        )

    def randomize(self, data: Any = None) -> None:
        """Nothing to pre-draw: the prompter draws from ``self.R`` (shared) in ``__call__``."""

    def _share_random_state(self) -> None:
        self.prompter.R = self.R  # one random stream: set_random_state / set_determinism reach it


class RegionPromptd(RegionPromptBase):
    """Oracle prompts for the regions without randomness (evaluation, inference with labels).

    ``mode``: ``"box"`` (the exact extent), ``"clicks"`` (the most interior pixel, plus
    ``num_negative`` negatives from a fixed seed), ``"box+clicks"`` or ``"mask"``.
    """

    def __init__(
        self,
        label_key: str = "label",
        regions: Mapping[int, Sequence[int]] | None = None,
        region_names: Mapping[int, str] | None = None,
        prompt_key: str = "prompts",
        masks_key: str = OBJECT_MASKS_KEY,
        mode: str = "box",
        num_positive: int = 1,
        num_negative: int = 0,
        negative_margin: int = 10,
        allow_missing_keys: bool = False,
    ) -> None:
        self.mode = mode
        super().__init__(
            label_key=label_key,
            regions=regions,
            region_names=region_names,
            prompt_key=prompt_key,
            masks_key=masks_key,
            mode_probs={mode: 1.0},
            box_jitter=0.0,
            num_positive=num_positive,
            num_negative=num_negative,
            negative_margin=negative_margin,
            allow_missing_keys=allow_missing_keys,
        )

    def _prompter(self, region_names, mode_probs, box_jitter, num_positive, num_negative, negative_margin):
        return PromptFromLabeld(
            label_key="label",
            prompt_key="prompts",
            key_slices="largest",
            mode=self.mode,
            num_positive=num_positive,
            num_negative=num_negative,
            negative_margin=negative_margin,
            label_names=region_names,
        )


def _prompt_extent(
    objects: Sequence[ObjectPrompts], object_id: int, where: str
) -> tuple[float, float, float, float]:
    """``(row0, col0, row1, col1)`` spanned by one object's box, clicks and mask."""
    obj = next((o for o in objects if int(o.object_id) == int(object_id)), None)
    if obj is None or not obj.slices:
        raise ValueError(
            f"{where}: no prompt for object {object_id} to crop around "
            f"(prompted objects: {[o.object_id for o in objects]})"
        )
    rows: list[float] = []
    cols: list[float] = []
    for p in obj.slices:
        if p.box is not None:
            cols += [float(p.box[0]), float(p.box[2])]
            rows += [float(p.box[1]), float(p.box[3])]
        if p.points is not None:
            positive = p.points[np.asarray(p.point_labels) == 1]
            cols += positive[:, 0].tolist()
            rows += positive[:, 1].tolist()
        if p.mask is not None and p.mask.any():
            r, c = np.nonzero(p.mask)
            rows += [float(r.min()), float(r.max())]
            cols += [float(c.min()), float(c.max())]
    if not rows:
        raise ValueError(
            f"{where}: the prompts of object {object_id} have no positive location to crop around"
        )
    return min(rows), min(cols), max(rows), max(cols)


def _shift_prompts(
    objects: Sequence[ObjectPrompts], r0: int, c0: int, r1: int, c1: int
) -> list[ObjectPrompts]:
    """Prompts moved into the window ``[r0, r1) x [c0, c1)`` (coordinates clipped to it)."""
    h, w = r1 - r0, c1 - c0
    out = []
    for obj in objects:
        slices = []
        for p in obj.slices:
            box = points = mask = None
            if p.box is not None:
                box = p.box - np.array([c0, r0, c0, r0], np.float32)
                box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
            if p.points is not None:
                points = np.clip(p.points - np.array([c0, r0], np.float32), 0, [w - 1, h - 1]).astype(
                    np.float32
                )
            if p.mask is not None:
                mask = p.mask[r0:r1, c0:c1]
            slices.append(
                SlicePrompt(p.slice_index, box=box, points=points, point_labels=p.point_labels, mask=mask)
            )
        out.append(ObjectPrompts(obj.object_id, obj.name, slices))
    return out


class CropAroundRegiond(InvertibleTransform, MapTransform):
    """Crop a square window centred on one region, ``scale`` times its larger extent (clipped to the image).

    The window comes from the label (``region`` values, e.g. the optic disc ``[1, 2]``) when the
    label is there, otherwise from the prompts of ``object_id`` (a user's box around the disc),
    so evaluation with oracle prompts and inference with user prompts crop alike. Prompts present
    in the data are moved into the window. The window ``[row0, col0, row1, col1]`` (end
    exclusive) and the uncropped size are written to ``data[roi_key]`` / ``data[roi_key +
    "_source_shape"]``, so a prediction can be pasted back; ``inverse`` pads the keys back with
    zeros (MONAI's ``Crop``).

    Args:
        keys: the 2D images ``(C, H, W)`` to crop (image and label).
        label_key: the label map to find the region in.
        region: label values of the region to centre on.
        prompt_key, object_id: the prompts used when there is no label.
        scale: window side / the region's larger extent (>= 1); REFUGE pipelines use 2-3.
            None: no crop (the window is the whole image, still recorded).
        min_size: smallest window side in pixels.
        roi_key: where the window is recorded.
        allow_missing_keys: skip keys that are absent (e.g. no label at inference).

    Raises:
        ValueError: the region is absent from the label (naming the file), or no prompt of
            ``object_id`` when there is no label.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        region: Sequence[int] = (1, 2),
        prompt_key: str = "prompts",
        object_id: int = 1,
        scale: float | None = 2.5,
        min_size: int = 64,
        roi_key: str = "roi",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if scale is not None and float(scale) < 1.0:
            raise ValueError(f"scale must be >= 1 (the window holds the region), got {scale}")
        self.label_key, self.region = label_key, [int(v) for v in region]
        self.prompt_key, self.object_id = prompt_key, int(object_id)
        self.scale = None if scale is None else float(scale)
        self.min_size, self.roi_key = int(min_size), roi_key
        self.cropper = Crop()

    def window(self, d: Mapping[Hashable, Any]) -> tuple[int, int, int, int]:
        """``(row0, col0, row1, col1)`` of the crop for this data dict."""
        if self.scale is None:
            key = next((k for k in self.keys if k in d), None)
            if key is None:
                raise KeyError(f"CropAroundRegiond: none of {list(self.keys)} in the data (keys: {list(d)})")
            return 0, 0, int(d[key].shape[-2]), int(d[key].shape[-1])
        if self.label_key in d:
            where = source_name(d, self.label_key)
            label = label_map_2d(d[self.label_key], where)
            rows, cols = np.nonzero(np.isin(label, self.region))
            if rows.size == 0:
                raise ValueError(
                    f"{where}: no pixel with label {self.region} to crop around "
                    f"(labels present: {np.unique(label).tolist()})"
                )
            extent = (float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max()))
            h, w = label.shape
        elif self.prompt_key in d:
            key = next(k for k in self.keys if k in d)
            where = source_name(d, key)
            extent = _prompt_extent(d[self.prompt_key], self.object_id, where)
            h, w = (int(v) for v in d[key].shape[-2:])
        else:
            raise KeyError(
                f"CropAroundRegiond needs {self.label_key!r} or {self.prompt_key!r} (keys: {list(d)})"
            )
        r0, c0, r1, c1 = extent
        side = max(self.min_size, int(round(self.scale * max(r1 - r0 + 1, c1 - c0 + 1))))
        cr, cc = (r0 + r1) / 2.0, (c0 + c1) / 2.0
        top, left = int(round(cr - side / 2.0)), int(round(cc - side / 2.0))
        return max(top, 0), max(left, 0), min(top + side, h), min(left + side, w)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        r0, c0, r1, c1 = self.window(d)
        shape = None
        for key in self.key_iterator(d):
            shape = shape or [int(v) for v in d[key].shape[-2:]]
            d[key] = self.cropper(d[key], (slice(r0, r1), slice(c0, c1)))
        if self.prompt_key in d and d[self.prompt_key]:
            d[self.prompt_key] = _shift_prompts(d[self.prompt_key], r0, c0, r1, c1)
        d[self.roi_key] = [r0, c0, r1, c1]
        d[f"{self.roi_key}_source_shape"] = shape
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d


def photo_geometry(height: int, width: int):
    """Prompt-file geometry of an ``(H, W)`` photograph: stored voxel ``(x, y, 0)`` -> ``(row, column)``."""
    from monai_sam.io.prompt_file import ImageGeometry

    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    return ImageGeometry((int(height), int(width), 1), affine=np.eye(4), original_affine=swap)


def load_photo_prompt_file(path, height: int, width: int) -> list[ObjectPrompts]:
    """Prompts of a photograph ``(H, W)`` from a prompt file with ``"coordinates": "voxel"``.

    Coordinates are ``[x, y, 0]``: x the column, y the row of the picture (0-based pixels, as an
    image viewer shows them). Errors name the file and the object (`PromptFileError`).
    """
    from monai_sam.io.prompt_file import PromptFileError, load_prompt_file

    coords = None
    try:
        coords = json.loads(Path(path).read_text(encoding="utf-8")).get("coordinates")
    except (OSError, ValueError, AttributeError):
        pass  # load_prompt_file reports a missing or malformed file precisely
    if coords == "world":
        raise PromptFileError(
            f'{path}: a photograph has no world coordinates; use "coordinates": "voxel" '
            "with points [x, y, 0] (column, row)"
        )
    return load_prompt_file(path, photo_geometry(height, width))


class LoadPhotoPromptFiled(LoadPromptFiled):
    """Read each photograph's prompt file (``data[path_key]``) into ``list[ObjectPrompts]``.

    Runs after loading (rows vertical, ``reverse_indexing=False``) and before any crop or resize;
    see `load_photo_prompt_file` for the coordinates.
    """

    def load(self, path: str | os.PathLike, image: Any) -> list[ObjectPrompts]:
        h, w = (int(v) for v in image.shape[-2:])
        return load_photo_prompt_file(path, h, w)
