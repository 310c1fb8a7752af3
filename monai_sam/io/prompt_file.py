"""Prompt files: which objects to segment and where, shared by the CLI, bundles and MONAI Label.

A prompt file is JSON (the format is documented with examples in docs/prompt_file.md)::

    {
      "version": 1,
      "coordinates": "voxel",            # or "world" (mm)
      "world_frame": "RAS",              # world only: "RAS" (default, as NIfTI/MONAI) or "LPS" (DICOM)
      "objects": [
        {"id": 1, "name": "liver",
         "slices": [
           {"box": [[i0, j0, k], [i1, j1, k]], "points": [[i, j, k]], "point_labels": [1]},
           {"mask": "liver_mask.nii.gz", "mask_value": 1}
         ]}
      ]
    }

Coordinates are 3D and unambiguous: ``"voxel"`` means indices ``(i, j, k)`` into the image
array *as stored in the file* (before any re-orientation), ``"world"`` means millimetres in
the named frame. Both are converted through the image's affines to the RAS array the network
sees (``docs/conventions.md``), where the key slice is ``k`` and the SAM prompt is
``x = j`` (column), ``y = i`` (row). All points of one entry must fall on one axial slice.
A mask entry names a label file on the image's grid; every axial slice holding mask voxels
becomes a mask prompt on that slice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_sam.prompts import ObjectPrompts, PromptError, SlicePrompt, validate_prompts

__all__ = ["PROMPT_FILE_VERSION", "PromptFileError", "ImageGeometry", "load_prompt_file", "write_prompt_file"]

logger = logging.getLogger(__name__)

PROMPT_FILE_VERSION = 1
_TOP_KEYS = {"version", "coordinates", "world_frame", "objects", "description"}
_OBJECT_KEYS = {"id", "name", "slices"}
_ENTRY_KEYS = {"box", "points", "point_labels", "mask", "mask_value"}
_SNAP_TOL = 0.01  # voxel coordinates must land on a slice to within this (world ones are snapped)


class PromptFileError(PromptError):
    """A prompt file that cannot be read or does not fit its image (the message names both)."""


class ImageGeometry:
    """What converting prompt coordinates needs from an image: its grid and its two affines.

    ``affine``: RAS voxel-to-world of the array the network sees (after ``Orientation("RAS")``);
    ``original_affine``: the same for the array as stored in the file (MONAI's
    ``original_affine`` meta key); ``shape``: the RAS array's spatial shape ``(X, Y, Z)``.
    """

    def __init__(self, shape: Sequence[int], affine: Any, original_affine: Any | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.original_affine = np.asarray(
            original_affine if original_affine is not None else affine, dtype=np.float64
        )
        if len(self.shape) != 3 or self.affine.shape != (4, 4) or self.original_affine.shape != (4, 4):
            raise ValueError(f"need a 3D shape and 4x4 affines, got shape {self.shape}")

    @classmethod
    def of(cls, image: Any) -> ImageGeometry:
        """From a channel-first ``(C, X, Y, Z)`` MetaTensor as `monai_sam.data.loading.load_volume` gives."""
        if isinstance(image, ImageGeometry):
            return image
        meta = getattr(image, "meta", None)
        if meta is None or image.ndim != 4:
            raise TypeError("the image must be a channel-first (C, X, Y, Z) MetaTensor with its affines")
        affine = image.affine
        original = meta.get("original_affine", affine)
        return cls(image.shape[1:], _np(affine), _np(original))

    def to_network(self, coords: np.ndarray, coordinates: str, world_frame: str = "RAS") -> np.ndarray:
        """``(n, 3)`` voxel (as stored) or world coordinates -> ``(n, 3)`` RAS-array indices."""
        c = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
        if coordinates == "voxel":
            world = _apply(self.original_affine, c)
        else:
            world = c.copy()
            if world_frame == "LPS":
                world[:, :2] *= -1.0
        return _apply(np.linalg.inv(self.affine), world)

    def from_network(self, ijk: np.ndarray, coordinates: str, world_frame: str = "RAS") -> np.ndarray:
        """Inverse of `to_network`."""
        world = _apply(self.affine, np.asarray(ijk, dtype=np.float64).reshape(-1, 3))
        if coordinates == "voxel":
            return _apply(np.linalg.inv(self.original_affine), world)
        if world_frame == "LPS":
            world[:, :2] *= -1.0
        return world


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _apply(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ affine[:3, :3].T + affine[:3, 3]


# ---------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PromptFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected a JSON object at the top, found {type(data).__name__}")
    return data


def _triples(value: Any, what: str, where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64) if isinstance(value, list) else None
    if arr is None or arr.ndim != 2 or arr.shape[1] != 3 or not np.isfinite(arr).all():
        raise PromptFileError(
            f"{where}: {what} must be a list of [a, b, c] coordinate triples, got {value!r}"
        )
    return arr


def _one_slice(ijk: np.ndarray, where: str, snap: bool) -> int:
    ks = np.rint(ijk[:, 2])
    if not snap and np.abs(ijk[:, 2] - ks).max() > _SNAP_TOL:
        raise PromptFileError(
            f"{where}: voxel coordinates fall between axial slices (k = {ijk[:, 2].round(3).tolist()})"
        )
    if len(set(ks.astype(int).tolist())) != 1:
        raise PromptFileError(
            f"{where}: the points of one entry must lie on one axial slice of the RAS image, "
            f"they fall on slices {sorted(set(ks.astype(int).tolist()))}; use one entry per slice"
        )
    return int(ks[0])


def _geometry_prompt(entry: Mapping, geo: ImageGeometry, coords: str, frame: str, where: str) -> SlicePrompt:
    box = points = labels = None
    all_ijk = []
    if "box" in entry:
        corners = _triples(entry["box"], "box", where)
        if corners.shape[0] != 2:
            raise PromptFileError(
                f"{where}: a box is two opposite corners [[a0, b0, c0], [a1, b1, c1]], got {entry['box']!r}"
            )
        ijk = geo.to_network(corners, coords, frame)
        all_ijk.append(ijk)
        # SAM box (x0, y0, x1, y1) = (j_min, i_min, j_max, i_max) on the RAS slice
        box = [ijk[:, 1].min(), ijk[:, 0].min(), ijk[:, 1].max(), ijk[:, 0].max()]
    if "points" in entry:
        pts = _triples(entry["points"], "points", where)
        ijk = geo.to_network(pts, coords, frame)
        all_ijk.append(ijk)
        points = np.stack([ijk[:, 1], ijk[:, 0]], axis=1)
        labels = entry.get("point_labels", [1] * len(pts))
        if not isinstance(labels, list) or len(labels) != len(pts) or any(v not in (0, 1) for v in labels):
            raise PromptFileError(
                f"{where}: point_labels must be {len(pts)} values, each 1 (positive) or 0 (negative)"
            )
    elif "point_labels" in entry:
        raise PromptFileError(f"{where}: point_labels given without points")
    if not all_ijk:
        raise PromptFileError(f"{where}: an entry needs a box, points or a mask")
    k = _one_slice(np.concatenate(all_ijk), where, snap=coords == "world")
    return SlicePrompt(k, box=box, points=points, point_labels=labels)


def _mask_prompts(entry: Mapping, geo: ImageGeometry, base: Path, where: str) -> list[SlicePrompt]:
    from monai_sam.data.loading import load_volume

    if any(k in entry for k in ("box", "points", "point_labels")):
        raise PromptFileError(f"{where}: a mask entry cannot also hold a box or points; use separate entries")
    name = entry["mask"]
    if not isinstance(name, str) or not name:
        raise PromptFileError(f"{where}: mask must be a file name, got {name!r}")
    path = Path(name) if Path(name).is_absolute() else base / name
    if not path.exists():
        raise PromptFileError(f"{where}: mask file not found: {path}")
    mask_img = load_volume(path)
    if tuple(mask_img.shape[1:]) != geo.shape or not np.allclose(_np(mask_img.affine), geo.affine, atol=1e-3):
        raise PromptFileError(
            f"{where}: mask {path} is not on the image's grid "
            f"(mask {tuple(mask_img.shape[1:])}, image {geo.shape} "
            f"after RAS orientation, or different affines); draw it on the same image"
        )
    arr = _np(mask_img[0])
    value = entry.get("mask_value")
    mask = arr != 0 if value is None else np.isclose(arr, float(value))
    slices = np.nonzero(mask.any(axis=(0, 1)))[0]
    if len(slices) == 0:
        raise PromptFileError(
            f"{where}: mask {path} has no voxel" + ("" if value is None else f" equal to {value}")
        )
    return [SlicePrompt(int(k), mask=mask[..., k]) for k in slices]


def _merge(prompts: list[SlicePrompt], where: str) -> list[SlicePrompt]:
    """Entries landing on the same slice: a box and clicks combine, anything with a mask clashes."""
    by_slice: dict[int, SlicePrompt] = {}
    for p in prompts:
        q = by_slice.get(p.slice_index)
        if q is None:
            by_slice[p.slice_index] = p
            continue
        if p.mask is not None or q.mask is not None or (p.box is not None and q.box is not None):
            raise PromptFileError(
                f"{where}: two entries on slice {p.slice_index} that cannot be combined (two boxes or a mask)"
            )
        pts = [x for x in (q.points, p.points) if x is not None]
        lbl = [x for x in (q.point_labels, p.point_labels) if x is not None]
        by_slice[p.slice_index] = SlicePrompt(
            p.slice_index,
            box=q.box if q.box is not None else p.box,
            points=np.concatenate(pts) if pts else None,
            point_labels=np.concatenate(lbl) if lbl else None,
        )
    return [by_slice[k] for k in sorted(by_slice)]


def load_prompt_file(path: str | os.PathLike, image: Any) -> list[ObjectPrompts]:
    """Read a prompt file and convert it to `ObjectPrompts` on the RAS array of ``image``.

    Args:
        path: the JSON file (mask file names in it are relative to its folder).
        image: the volume the prompts are for, as `monai_sam.data.loading.load_volume` returns
            it (channel-first RAS MetaTensor with ``affine`` and ``original_affine``), or an
            `ImageGeometry`.
    Raises:
        FileNotFoundError: no such prompt file.
        PromptFileError: bad JSON or schema, or prompts that do not fit the image; the message
            names the file and the object.
    """
    path = Path(path)
    data = _read_json(path)
    geo = ImageGeometry.of(image)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PromptFileError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    if data.get("version", PROMPT_FILE_VERSION) != PROMPT_FILE_VERSION:
        raise PromptFileError(
            f"{path}: version {data.get('version')!r} is not supported (expected {PROMPT_FILE_VERSION})"
        )
    coords = data.get("coordinates")
    if coords not in ("voxel", "world"):
        raise PromptFileError(f'{path}: "coordinates" must be "voxel" or "world", got {coords!r}')
    frame = str(data.get("world_frame", "RAS")).upper()
    if frame not in ("RAS", "LPS"):
        raise PromptFileError(
            f'{path}: "world_frame" must be "RAS" or "LPS", got {data.get("world_frame")!r}'
        )
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects:
        raise PromptFileError(f'{path}: "objects" must be a non-empty list; no object has a prompt')
    result: list[ObjectPrompts] = []
    for n, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise PromptFileError(f"{path}: objects[{n}] must be an object, got {obj!r}")
        name = str(obj.get("name", ""))
        where = f"{path}: object {obj.get('id', f'#{n}')}" + (f" ({name})" if name else "")
        unknown = set(obj) - _OBJECT_KEYS
        if unknown:
            raise PromptFileError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_OBJECT_KEYS)}"
            )
        oid = obj.get("id")
        if not isinstance(oid, int) or isinstance(oid, bool) or oid < 1:
            raise PromptFileError(f'{where}: "id" must be a positive integer (the label value), got {oid!r}')
        entries = obj.get("slices")
        if not isinstance(entries, list) or not entries:
            raise PromptFileError(f'{where}: "slices" must be a non-empty list of prompts')
        slices: list[SlicePrompt] = []
        for e, entry in enumerate(entries):
            at = f"{where}, slices[{e}]"
            if not isinstance(entry, dict):
                raise PromptFileError(f"{at}: must be an object, got {entry!r}")
            unknown = set(entry) - _ENTRY_KEYS
            if unknown:
                raise PromptFileError(
                    f"{at}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}"
                )
            if "mask" in entry:
                slices.extend(_mask_prompts(entry, geo, path.parent, at))
            else:
                slices.append(_geometry_prompt(entry, geo, coords, frame, at))
        result.append(ObjectPrompts(oid, name, _merge(slices, where)))
    try:
        validate_prompts(result, geo.shape[:2], geo.shape[2], source=str(path))
    except PromptFileError:
        raise
    except PromptError as err:
        raise PromptFileError(f"{err} (coordinates converted to the RAS image of shape {geo.shape})") from err
    return result


# ---------------------------------------------------------------------------------- writing
def _round(a: np.ndarray) -> list:
    return np.round(np.asarray(a, dtype=np.float64), 4).tolist()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_prompt_file(
    path: str | os.PathLike,
    objects: Sequence[ObjectPrompts],
    image: Any,
    coordinates: str = "voxel",
    world_frame: str = "RAS",
) -> Path:
    """Write `ObjectPrompts` (on the RAS array of ``image``) as a prompt file; atomically.

    Mask prompts go to ``<stem>_object<id>_mask.nii.gz`` beside the JSON (one file per object,
    on the RAS grid with its affine: the same voxels in space as the image).
    """
    if coordinates not in ("voxel", "world"):
        raise ValueError(f"coordinates must be 'voxel' or 'world', got {coordinates!r}")
    world_frame = world_frame.upper()
    if world_frame not in ("RAS", "LPS"):
        raise ValueError(f"world_frame must be 'RAS' or 'LPS', got {world_frame!r}")
    path = Path(path)
    geo = ImageGeometry.of(image)
    validate_prompts(list(objects), geo.shape[:2], geo.shape[2], source=str(path))
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.stem
    doc: dict[str, Any] = {"version": PROMPT_FILE_VERSION, "coordinates": coordinates}
    if coordinates == "world":
        doc["world_frame"] = world_frame
    out_objects = []
    for obj in objects:
        entries: list[dict[str, Any]] = []
        mask_vol = None
        for p in sorted(obj.slices, key=lambda q: q.slice_index):
            k = p.slice_index
            if p.mask is not None:
                mask_vol = np.zeros(geo.shape, dtype=bool) if mask_vol is None else mask_vol
                mask_vol[..., k] = p.mask
                continue
            entry: dict[str, Any] = {}
            if p.box is not None:
                x0, y0, x1, y1 = (float(v) for v in p.box)
                entry["box"] = _round(
                    geo.from_network(np.array([[y0, x0, k], [y1, x1, k]]), coordinates, world_frame)
                )
            if p.points is not None:
                ijk = np.stack([p.points[:, 1], p.points[:, 0], np.full(len(p.points), k)], axis=1)
                entry["points"] = _round(geo.from_network(ijk, coordinates, world_frame))
                entry["point_labels"] = [int(v) for v in p.point_labels]
            entries.append(entry)
        if mask_vol is not None:
            mask_name = f"{stem}_object{obj.object_id}_mask.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_mask(path.parent / mask_name, mask_vol, geo.affine)
            entries.append({"mask": mask_name})
        item: dict[str, Any] = {"id": int(obj.object_id)}
        if obj.name:
            item["name"] = obj.name
        item["slices"] = entries
        out_objects.append(item)
    doc["objects"] = out_objects
    _atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    logger.info("wrote %d object prompt(s) to %s", len(out_objects), path)
    return path
