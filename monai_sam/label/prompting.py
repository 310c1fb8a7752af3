"""MONAI Label requests -> `ObjectPrompts` on the RAS array the network sees.

MONAI Label clients (3D Slicer, OHIF) send clicks as voxel indices ``[x, y, z]`` of the image
*as stored in its file* (Slicer rounds ``RASToIJK`` of the fiducial; OHIF does the same with
its volume's IJK), i.e. of the array MONAI's ``LoadImage`` returns without reorientation. The
network works on that array reoriented to RAS (docs/conventions.md), so every click goes
through `VoxelMap` (stored index -> RAS index, exact for the axis permutations and flips that
``Orientation`` applies) and then becomes a SAM point ``(x, y) = (column j, row i)`` on RAS
slice ``k``. The label map comes back through the same map, so it overlays the stored image.

Request keys understood (those of MONAI Label's DeepGrow / DeepEdit / ``sam_3d`` tasks):

- ``foreground`` / ``background``: lists of ``[x, y, z]`` positive / negative clicks for one
  object, named by ``label`` (a label name or id; default: the first label of the app);
- ``<label name>``: lists of positive clicks per label (DeepEdit style, several objects at
  once); ``background`` clicks are then negative for every object;
- ``roi``: ``[i_a, i_b, j_a, j_b, k_a, k_b]``, stored voxel indices paired per axis, which is
  what 3D Slicer's MONAI Label plugin sends (``getROIPointsXYZ``: the ROI's RAS min and max
  corners through ``RASToIJK``, rounded, zipped per axis). On an axis the file stores flipped the
  "min" corner has the larger index, so each pair is sorted: min and max are taken per axis.
  The box goes on the ROI's middle axial slice; an ROI spanning several axial slices also
  bounds the output (nothing is labeled outside it).

Clicks on several slices make several conditioning frames of SAM2's memory: clients resend all
the clicks of the current segment with every request, so a new click on another slice adds a
conditioning frame to the earlier ones instead of starting over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monai_sam.prompts import ObjectPrompts, PromptError, SlicePrompt

__all__ = ["VoxelMap", "RasBox", "ParsedRequest", "parse_request", "resolve_label"]


@dataclass(frozen=True)
class VoxelMap:
    """Exact index map between the stored array and its RAS reorientation.

    ``ras_index = matrix @ [stored_index, 1]``, ``matrix`` being a signed axis permutation with
    integer offsets (what ``Orientation`` does: no resampling).
    """

    matrix: np.ndarray  # (4, 4) int64
    stored_shape: tuple[int, int, int]
    ras_shape: tuple[int, int, int]

    @classmethod
    def from_affines(
        cls,
        stored_affine: np.ndarray,
        ras_affine: np.ndarray,
        stored_shape: Sequence[int],
        where: str = "image",
    ) -> VoxelMap:
        """The map from the two voxel-to-world affines of the same voxels (stored, RAS)."""
        m = np.linalg.inv(np.asarray(ras_affine, np.float64)) @ np.asarray(stored_affine, np.float64)
        r = np.rint(m)
        rot = r[:3, :3]
        is_perm = (
            np.allclose(m, r, atol=1e-3)
            and np.all(np.abs(rot).sum(axis=0) == 1)
            and np.all(np.abs(rot).sum(axis=1) == 1)
        )
        if not is_perm:
            raise ValueError(
                f"{where}: the RAS array is not an axis permutation/flip of the stored one "
                f"(index map {np.round(m, 4).tolist()}); was the image resampled?"
            )
        stored = tuple(int(s) for s in stored_shape)
        perm = np.abs(rot).argmax(axis=1)  # RAS axis a comes from stored axis perm[a]
        ras = tuple(stored[p] for p in perm)
        return cls(r.astype(np.int64), stored, ras)  # type: ignore[arg-type]

    def to_ras(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` stored voxel indices (float allowed) -> RAS voxel indices."""
        p = np.asarray(points, np.float64).reshape(-1, 3)
        return p @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def ras_to_stored_array(self, array: np.ndarray) -> np.ndarray:
        """A ``(..., X, Y, Z)`` array on the RAS grid -> the same voxels on the stored grid."""
        rot = self.matrix[:3, :3]
        lead = array.ndim - 3
        out = array
        for a in range(3):  # undo the flips first: RAS index r_a = -s_p + (n_a - 1)
            if rot[a].sum() < 0:
                out = np.flip(out, axis=lead + a)
        perm = np.abs(rot).argmax(axis=1)
        # out is now indexed by (s[perm[0]], s[perm[1]], s[perm[2]]); bring stored axis d to place d
        order = [int(np.where(perm == d)[0][0]) for d in range(3)]
        return np.ascontiguousarray(np.transpose(out, list(range(lead)) + [lead + a for a in order]))


@dataclass(frozen=True)
class RasBox:
    """An ROI on the RAS grid: inclusive voxel bounds per axis."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        m = np.zeros(tuple(int(s) for s in shape), dtype=bool)
        m[self.lo[0] : self.hi[0] + 1, self.lo[1] : self.hi[1] + 1, self.lo[2] : self.hi[2] + 1] = True
        return m


@dataclass
class ParsedRequest:
    """What a request asks for: the objects' prompts and an optional 3D bound of the output."""

    objects: list[ObjectPrompts]
    bound: RasBox | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-friendly: per object, its conditioning slices (RAS) and what is on each."""
        return {
            str(o.object_id): {
                "name": o.name,
                "conditioning_slices": {
                    str(p.slice_index): p.kind for p in sorted(o.slices, key=lambda s: s.slice_index)
                },
            }
            for o in self.objects
        }


def resolve_label(value: Any, labels: Mapping[str, int], where: str) -> tuple[int, str]:
    """A request's ``label`` (name or id) -> ``(id, name)`` among the app's labels."""
    by_id = {int(v): k for k, v in labels.items()}
    if value is None or value == "":
        if not labels:
            return 1, "object"
        name = min(labels, key=lambda k: int(labels[k]))
        return int(labels[name]), name
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        for name, idx in labels.items():
            if name.lower() == value.strip().lower():
                return int(idx), name
        raise PromptError(f"{where}: unknown label {value!r}; the app's labels are {sorted(labels)}")
    idx = int(value)
    if idx <= 0:
        raise PromptError(f"{where}: label id must be positive (0 is background), got {idx}")
    return idx, by_id.get(idx, f"label_{idx}")


def _points(value: Any, key: str, where: str) -> np.ndarray:
    """A list of ``[x, y, z]`` clicks -> ``(N, 3)`` float array, with a clear error otherwise."""
    if value is None:
        return np.zeros((0, 3))
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise PromptError(
            f"{where}: '{key}' must be a list of [x, y, z] voxel indices, got {value!r}"
        ) from err
    if arr.size == 0:
        return np.zeros((0, 3))
    if arr.ndim == 1 and arr.shape[0] == 3:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise PromptError(
            f"{where}: '{key}' must be a list of [x, y, z] voxel indices, got an array of shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise PromptError(f"{where}: '{key}' holds non-finite coordinates {arr.tolist()}")
    return arr


def _check_inside(ras: np.ndarray, stored: np.ndarray, vmap: VoxelMap, key: str, where: str) -> None:
    shape = np.asarray(vmap.ras_shape)
    bad = ((ras < -0.5) | (ras >= shape - 0.5)).any(axis=1)
    if bad.any():
        raise PromptError(
            f"{where}: '{key}' click(s) {stored[bad].tolist()} lie outside the image "
            f"(voxel indices must be within {list(vmap.stored_shape)})"
        )


def _roi_box(roi: Any, vmap: VoxelMap, where: str) -> tuple[int, np.ndarray, RasBox | None]:
    """``roi`` in 3D Slicer's order -> (RAS key slice, SAM box on it, 3D bound or None)."""
    form = "roi must be [i_min, i_max, j_min, j_max, k_min, k_max] (stored voxel indices, 3D Slicer's order)"
    try:
        vals = np.asarray(roi, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise PromptError(f"{where}: {form}, got {roi!r}") from err
    if vals.size != 6 or not np.isfinite(vals).all():
        raise PromptError(f"{where}: {form}, got {vals.tolist()}")
    pairs = vals.reshape(3, 2)
    (x0, y0, z0), (x1, y1, z1) = pairs.min(axis=1), pairs.max(axis=1)
    corners = np.array([[x, y, z] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])
    ras = vmap.to_ras(corners)
    lo, hi = ras.min(axis=0), ras.max(axis=0)
    top = np.asarray(vmap.ras_shape) - 1
    if (hi < 0).any() or (lo > top).any():
        raise PromptError(f"{where}: roi {vals.tolist()} lies outside the image {list(vmap.stored_shape)}")
    lo, hi = np.clip(lo, 0, top), np.clip(hi, 0, top)
    k = int(round((lo[2] + hi[2]) / 2))
    # RAS slice k is (X, Y) = rows i, columns j: SAM box (x0, y0, x1, y1) = (j_min, i_min, j_max, i_max)
    box = np.array([lo[1], lo[0], hi[1], hi[0]], dtype=np.float64)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise PromptError(f"{where}: roi {vals.tolist()} is thinner than one voxel in the axial plane")
    bound = None
    if hi[2] > lo[2]:  # a 3D ROI: the object lies inside it
        bound = RasBox(tuple(int(np.floor(v)) for v in lo), tuple(int(np.ceil(v)) for v in hi))
    return k, box, bound


def parse_request(
    request: Mapping[str, Any], vmap: VoxelMap, labels: Mapping[str, int], where: str = "request"
) -> ParsedRequest:
    """A MONAI Label infer request -> prompts on the RAS grid (see the module docstring).

    Raises:
        PromptError: clicks outside the image, malformed lists, unknown labels, nothing to segment.
    """
    negatives = _points(request.get("background"), "background", where)
    per_label: dict[tuple[int, str], np.ndarray] = {}
    for name, idx in labels.items():
        if name.lower() == "background" or name not in request:
            continue
        pts = _points(request.get(name), name, where)
        if len(pts):
            per_label[(int(idx), name)] = pts
    foreground = _points(request.get("foreground"), "foreground", where)
    if len(foreground):
        key = resolve_label(request.get("label"), labels, where)
        if key in per_label:
            per_label[key] = np.concatenate([per_label[key], foreground])
        else:
            per_label[key] = foreground
    roi = request.get("roi")
    if roi is None or (isinstance(roi, str) and not roi.strip()):
        has_roi = False
    elif isinstance(roi, (list, tuple, np.ndarray)):
        has_roi = len(roi) > 0
    else:
        raise PromptError(f"{where}: roi must be [x0, y0, x1, y1, z0, z1] (voxel indices), got {roi!r}")
    if not per_label and has_roi:
        per_label[resolve_label(request.get("label"), labels, where)] = np.zeros((0, 3))
    if not per_label:
        raise PromptError(
            f"{where}: nothing to segment: give 'foreground' clicks, per-label clicks or an 'roi' "
            f"(only {len(negatives)} background click(s) were sent)"
        )
    if has_roi and len(per_label) > 1:
        raise PromptError(
            f"{where}: an roi box is for one object, but clicks for {len(per_label)} labels were sent"
        )

    neg_ras = vmap.to_ras(negatives)
    _check_inside(neg_ras, negatives, vmap, "background", where)
    bound = None
    objects = []
    for (idx, name), pos in sorted(per_label.items()):
        pos_ras = vmap.to_ras(pos)
        _check_inside(pos_ras, pos, vmap, name, where)
        top = np.asarray(vmap.ras_shape, np.float64) - 1
        pos_ras, neg_in = np.clip(pos_ras, 0, top), np.clip(neg_ras, 0, top)  # half-voxel margins
        clicks = [(p, 1) for p in pos_ras] + [(p, 0) for p in neg_in]
        by_slice: dict[int, list[tuple[np.ndarray, int]]] = {}
        for p, lab in clicks:
            by_slice.setdefault(int(round(p[2])), []).append((p, lab))
        boxes: dict[int, np.ndarray] = {}
        if has_roi:
            k, box, bound = _roi_box(roi, vmap, where)
            boxes[k] = box
        slices = []
        for k in sorted(set(by_slice) | set(boxes)):
            got = by_slice.get(k, [])
            # SAM point (x, y) = (column j, row i) of RAS slice k
            points = np.array([[p[1], p[0]] for p, _ in got]) if got else None
            point_labels = np.array([lab for _, lab in got]) if got else None
            slices.append(SlicePrompt(k, box=boxes.get(k), points=points, point_labels=point_labels))
        objects.append(ObjectPrompts(idx, name, slices))
    return ParsedRequest(objects, bound)
