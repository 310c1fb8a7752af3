"""Prompts drawn from a label: boxes, clicks and masks on key slices, as SAM2 is trained with.

The helpers work on one 2D boolean mask ``(H, W) = (X, Y)`` of a slice and return SAM's
coordinates (see docs/conventions.md): points ``(x, y) = (column, row)``, boxes
``(x0, y0, x1, y1)`` as inclusive pixel extents. The dict transforms turn a label volume into
the shared prompt representation, a list of `monai_sam.prompts.ObjectPrompts`.

``rng`` arguments accept ``numpy.random.RandomState`` (what MONAI's ``self.R`` is) or
``numpy.random.Generator``; only ``uniform`` and ``choice`` are used.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable
from scipy.ndimage import distance_transform_edt

from monai_sam.prompts import ObjectPrompts, SlicePrompt
from monai_sam.transforms.slices import as_int_list, label_volume, present_labels, source_name

__all__ = [
    "PROMPT_MODES",
    "box_from_mask",
    "central_pixel",
    "clicks_from_mask",
    "PromptFromLabelBase",
    "RandPromptFromLabeld",
    "PromptFromLabeld",
    "LoadPromptFiled",
]

Rng = np.random.RandomState | np.random.Generator

#: What a key slice can be prompted with; ``"box+clicks"`` gives both on the same slice.
PROMPT_MODES = ("box", "clicks", "box+clicks", "mask")


def _check_mask(mask: np.ndarray, what: str) -> np.ndarray:
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"{what}: expected a 2D mask (H, W), got shape {mask.shape}")
    if not mask.any():
        raise ValueError(f"{what}: the mask is empty; cannot draw a prompt from it")
    return mask


def _positive_extent(lo: float, hi: float, size: int) -> tuple[float, float]:
    """Widen ``[lo, hi]`` by one pixel where it has zero length (a one-pixel-wide object)."""
    if hi > lo:
        return lo, hi
    if size < 2:
        raise ValueError(f"a box of positive area needs a slice at least 2 pixels wide, got {size}")
    return (lo, hi + 1) if hi + 1 <= size - 1 else (lo - 1, hi)


def box_from_mask(mask: np.ndarray, jitter: float = 0.0, rng: Rng | None = None) -> np.ndarray:
    """The box ``(x0, y0, x1, y1) = (col_min, row_min, col_max, row_max)`` of a 2D mask.

    Args:
        mask: ``(H, W)`` boolean mask, not empty.
        jitter: largest shift of each side in pixels, drawn uniformly in ``[-jitter, jitter]``
            (an imprecise user box; SAM2 trains with noisy boxes too). 0 gives the exact extent.
        rng: random source for the jitter (a fresh ``default_rng()`` when None and jitter > 0).

    Returns:
        ``(4,)`` float32. The box stays inside the slice and always has positive area: a side
        moving inwards stops half a pixel short of the box centre, and the extent of a
        one-pixel-wide object is widened to 2 pixels (``PromptError`` wants ``x1 > x0``).
    """
    mask = _check_mask(mask, "box_from_mask")
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, x1 = _positive_extent(float(cols[0]), float(cols[-1]), w)
    y0, y1 = _positive_extent(float(rows[0]), float(rows[-1]), h)
    if jitter > 0:
        rng = np.random.default_rng() if rng is None else rng
        d = rng.uniform(-jitter, jitter, size=4)
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        x0, x1 = min(x0 + d[0], cx - 0.5), max(x1 + d[2], cx + 0.5)
        y0, y1 = min(y0 + d[1], cy - 0.5), max(y1 + d[3], cy + 0.5)
        x0, x1 = max(x0, 0.0), min(x1, w - 1.0)
        y0, y1 = max(y0, 0.0), min(y1, h - 1.0)
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def central_pixel(mask: np.ndarray, border_is_edge: bool = False) -> tuple[int, int]:
    """``(row, col)``: the mask pixel farthest from its boundary; ties go to the one nearest their centroid.

    ``border_is_edge``: the image border bounds the mask too (a region cut by the border is
    centred inside the image, not on its edge).
    """
    dist = (
        distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        if border_is_edge
        else distance_transform_edt(mask)
    )
    best = np.argwhere(dist == dist.max())
    centre = best.mean(axis=0)
    r, c = best[np.argmin(((best - centre) ** 2).sum(axis=1))]
    return int(r), int(c)


def clicks_from_mask(
    mask: np.ndarray,
    num_positive: int = 1,
    num_negative: int = 0,
    rng: Rng | None = None,
    negative_margin: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Positive clicks inside a 2D mask and negative clicks just outside it.

    Args:
        mask: ``(H, W)`` boolean mask, not empty.
        num_positive: clicks inside the mask (label 1). With ``rng``, drawn without replacement
            with probability proportional to the distance to the mask boundary (users click
            well inside an object). Without ``rng`` the first one is the most interior pixel
            (deterministic, the "centre click" of oracle prompts), further ones as with
            ``rng = default_rng(0)``.
        num_negative: clicks outside the mask (label 0), uniformly among the background pixels
            of the mask's box grown by ``negative_margin``: where a user corrects a leak.
            Anywhere in the background if that ring is empty.
        rng: random source; None = deterministic as described above.
        negative_margin: growth of the box in pixels for negative clicks.

    Returns:
        ``points`` ``(N, 2)`` float32 as ``(x, y) = (column, row)``, positives first, and
        ``labels`` ``(N,)`` int64 (1 positive, 0 negative), ``N = num_positive + num_negative``.
    """
    mask = _check_mask(mask, "clicks_from_mask")
    if num_positive < 0 or num_negative < 0 or num_positive + num_negative == 0:
        raise ValueError(
            f"need at least one click, got num_positive={num_positive}, num_negative={num_negative}"
        )
    rows_cols: list[np.ndarray] = []
    first_fixed = rng is None
    rng = np.random.default_rng(0) if rng is None else rng
    if num_positive:
        inside = np.argwhere(mask)
        if first_fixed:
            centre = central_pixel(mask)
            rows_cols.append(np.array([centre]))
            rest = inside[~((inside[:, 0] == centre[0]) & (inside[:, 1] == centre[1]))]
            n_rest = num_positive - 1
        else:
            rest, n_rest = inside, num_positive
        if n_rest:
            if len(rest) == 0:
                rest = inside
            weight = distance_transform_edt(mask)[rest[:, 0], rest[:, 1]]
            pick = rng.choice(len(rest), size=n_rest, replace=n_rest > len(rest), p=weight / weight.sum())
            rows_cols.append(rest[pick])
    if num_negative:
        outside = ~mask
        if not outside.any():
            raise ValueError(
                "clicks_from_mask: the mask covers the whole slice; no place for a negative click"
            )
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        m = int(negative_margin)
        ring = np.zeros_like(mask)
        ring[max(rows[0] - m, 0) : rows[-1] + m + 1, max(cols[0] - m, 0) : cols[-1] + m + 1] = True
        ring &= outside
        candidates = np.argwhere(ring if ring.any() else outside)
        pick = rng.choice(len(candidates), size=num_negative, replace=num_negative > len(candidates))
        rows_cols.append(candidates[pick])
    rc = np.concatenate(rows_cols, axis=0)
    points = rc[:, ::-1].astype(np.float32)  # (row, col) -> (x, y) = (col, row)
    labels = np.concatenate([np.ones(num_positive, np.int64), np.zeros(num_negative, np.int64)])
    return points, labels


class PromptFromLabelBase(MapTransform):
    """Prompts for the objects of a label volume on key slices where they are present.

    The logic shared by `RandPromptFromLabeld` (training: random draws from MONAI's ``self.R``)
    and `PromptFromLabeld` (oracle prompts). It is not ``Randomizable``, so a ``CacheDataset``
    caches the deterministic one and everything before it.

    Writes ``data[prompt_key]``: a ``list[ObjectPrompts]``, one per object, each with up to
    ``num_key_slices`` `SlicePrompt`s. Slice indices refer to the volume in the dict (after
    `SampleSliceSequenced`, indices inside the sequence). The prompt kind is drawn per key
    slice from ``mode_probs``.

    Args:
        label_key: label map ``(1, X, Y, Z)`` (or ``(X, Y, Z)``) of integer object ids.
        prompt_key: where the list of `ObjectPrompts` is written.
        object_ids: objects to prompt; every one must be present (else ValueError). None: the
            id in ``data[object_key]`` when present (set by `SampleSliceSequenced`), otherwise
            all non-zero labels present.
        object_key: see ``object_ids``.
        key_slices: how key slices are chosen among the slices containing the object:
            ``"random"`` (distinct, uniformly), ``"middle"`` (evenly spaced through the object's
            extent; one slice = its median slice), ``"largest"`` (largest areas) or an int
            (that slice; the object must be on it, ``num_key_slices`` must be 1). Fewer slices
            than ``num_key_slices`` contain the object: all of them are used.
        num_key_slices: prompted slices per object.
        mode_probs: probability of each prompt kind among `PROMPT_MODES` (normalised;
            ``{"mask": 1}`` always gives the label slice as a mask prompt).
        box_jitter: largest shift of each box side in pixels (see `box_from_mask`).
        num_positive: positive clicks per clicked slice.
        num_negative: negative clicks per clicked slice.
        negative_margin: see `clicks_from_mask`.
        label_names: optional ``{id: name}`` for `ObjectPrompts.name`.
        deterministic: no randomness at all (oracle prompts for evaluation and inference):
            ``key_slices`` must not be ``"random"``, ``mode_probs`` must name a single mode, boxes
            are exact and clicks start at the most interior pixel. `PromptFromLabeld` sets it.
        shared_key_slices: choose the key slices once for all objects (ranked by how many
            objects they hold, with the ``key_slices`` rule) and prompt each object on those of
            them it appears on; objects on none of them get no prompt. All objects then share
            their conditioning slices, so the memory network tracks them as one batch (training
            is several times faster than with a separate key slice per object).
        label_ids: when neither ``object_ids`` nor ``data[object_key]`` names the objects, the
            ids to prompt among those present (None: every non-zero label present).
        max_objects: prompt at most this many of the objects, drawn at random: a training
            sequence then costs the memory network a few objects, not every organ in view.
            None: all.
        allow_missing_keys: do nothing when ``label_key`` is absent.

    Raises:
        ValueError: a required object is absent ("empty label where one is required", with the
            file name and the id), the label holds no object at all, or a given key slice
            does not contain the object.
    """

    def __init__(
        self,
        label_key: str = "label",
        prompt_key: str = "prompts",
        object_ids: Sequence[int] | None = None,
        object_key: str = "object_id",
        key_slices: str | int = "random",
        num_key_slices: int = 1,
        mode_probs: Mapping[str, float] | None = None,
        box_jitter: float = 5.0,
        num_positive: int = 1,
        num_negative: int = 0,
        negative_margin: int = 10,
        label_names: Mapping[int, str] | None = None,
        deterministic: bool = False,
        shared_key_slices: bool = False,
        label_ids: Sequence[int] | None = None,
        max_objects: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(label_key, allow_missing_keys)
        self.shared_key_slices = bool(shared_key_slices)
        if max_objects is not None and int(max_objects) < 1:
            raise ValueError(f"max_objects must be at least 1 or None, got {max_objects}")
        if max_objects is not None and deterministic:
            raise ValueError("deterministic prompts cover every object: max_objects must be None")
        self.max_objects = None if max_objects is None else int(max_objects)
        self.label_ids = None if label_ids is None else as_int_list(label_ids)
        mode_probs = {"box": 0.5, "clicks": 0.25, "mask": 0.25} if mode_probs is None else dict(mode_probs)
        unknown = sorted(set(mode_probs) - set(PROMPT_MODES))
        if unknown:
            raise ValueError(f"unknown prompt modes {unknown}; modes are {list(PROMPT_MODES)}")
        if any(p < 0 for p in mode_probs.values()) or sum(mode_probs.values()) <= 0:
            raise ValueError(f"mode_probs must be non-negative with a positive sum, got {mode_probs}")
        if isinstance(key_slices, str) and key_slices not in ("random", "middle", "largest"):
            raise ValueError(
                f"key_slices must be 'random', 'middle', 'largest' or an int, got {key_slices!r}"
            )
        if int(num_key_slices) < 1:
            raise ValueError(f"num_key_slices must be at least 1, got {num_key_slices}")
        if not isinstance(key_slices, str) and int(num_key_slices) != 1:
            raise ValueError(f"key_slices={key_slices} names one slice; num_key_slices must be 1")
        self.modes = [m for m in PROMPT_MODES if mode_probs.get(m, 0) > 0]
        total = sum(mode_probs[m] for m in self.modes)
        self.mode_p = np.array([mode_probs[m] / total for m in self.modes])
        if deterministic:
            if key_slices == "random":
                raise ValueError("deterministic prompts need key_slices 'middle', 'largest' or an int")
            if len(self.modes) != 1:
                raise ValueError(f"deterministic prompts need a single mode, got mode_probs={mode_probs}")
            box_jitter = 0.0
        if (num_positive < 0 or num_negative < 0 or num_positive + num_negative == 0) and any(
            "clicks" in m for m in self.modes
        ):
            raise ValueError(
                f"click prompts need clicks: num_positive={num_positive}, num_negative={num_negative}"
            )
        self.label_key = label_key
        self.prompt_key = prompt_key
        self.object_ids = None if object_ids is None else as_int_list(object_ids)
        self.object_key = object_key
        self.key_slices = key_slices if isinstance(key_slices, str) else int(key_slices)
        self.num_key_slices = int(num_key_slices)
        self.box_jitter = float(box_jitter)
        self.num_positive = int(num_positive)
        self.num_negative = int(num_negative)
        self.negative_margin = int(negative_margin)
        self.label_names = {int(k): str(v) for k, v in (label_names or {}).items()}
        self.deterministic = deterministic

    def _random(self) -> np.random.RandomState:
        """The random stream of the random variant; deterministic prompts never draw."""
        raise RuntimeError(f"{type(self).__name__} draws no random numbers (deterministic prompts)")

    def _rng(self) -> Rng | None:
        return None if self.deterministic else self._random()

    def _objects(self, d: Mapping[Hashable, Any], present: list[int], where: str) -> list[int]:
        if self.object_ids is not None:
            ids = self.object_ids
        elif self.object_key in d:
            ids = as_int_list(d[self.object_key])
        else:
            ids = present if self.label_ids is None else [i for i in present if i in self.label_ids]
            if not ids:
                wanted = "non-zero label" if self.label_ids is None else f"label of {self.label_ids}"
                raise ValueError(f"{where}: empty label where one is required: no {wanted} to prompt")
            return self._at_most(ids)
        for i in ids:
            if i not in present:
                raise ValueError(
                    f"{where}: empty label where one is required: object {i} is absent "
                    f"(labels present: {present})"
                )
        return self._at_most(ids)

    def _at_most(self, ids: list[int]) -> list[int]:
        if self.max_objects is None or len(ids) <= self.max_objects:
            return list(ids)
        return sorted(int(i) for i in self._random().choice(ids, size=self.max_objects, replace=False))

    def _key_slices(self, areas: np.ndarray, object_id: int, where: str) -> list[int]:
        on = np.flatnonzero(areas)
        n = min(self.num_key_slices, len(on))
        if not isinstance(self.key_slices, str):
            k = self.key_slices
            if not (0 <= k < len(areas) and areas[k] > 0):
                raise ValueError(
                    f"{where}: object {object_id} is not on key slice {k} (it is on slices {on.tolist()})"
                )
            return [k]
        if self.key_slices == "random":
            return sorted(int(k) for k in self._random().choice(on, size=n, replace=False))
        if self.key_slices == "middle":
            # centres of n equal parts of the object's slices: distinct, n = 1 gives the median
            return [int(on[i]) for i in ((np.arange(n) + 0.5) * len(on) / n).astype(int)]
        order = on[np.argsort(-areas[on], kind="stable")]  # largest areas, ties to lower index
        return sorted(int(k) for k in order[:n])

    def _slice_prompt(self, mask: np.ndarray, k: int) -> SlicePrompt:
        mode = self.modes[0]
        if len(self.modes) > 1:  # no draw for a single mode: deterministic prompts stay deterministic
            mode = self.modes[int(self._random().choice(len(self.modes), p=self.mode_p))]
        if mode == "mask":
            return SlicePrompt(slice_index=k, mask=mask)
        box = points = labels = None
        if "box" in mode:
            box = box_from_mask(mask, jitter=self.box_jitter, rng=self._rng())
        if "clicks" in mode:
            points, labels = clicks_from_mask(
                mask,
                self.num_positive,
                self.num_negative,
                rng=self._rng(),
                negative_margin=self.negative_margin,
            )
        return SlicePrompt(slice_index=k, box=box, points=points, point_labels=labels)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.label_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"no label key {self.label_key!r} to draw prompts from (keys: {list(d)})")
        where = source_name(d, self.label_key)
        label = label_volume(d[self.label_key], where)
        objects = []
        ids = self._objects(d, present_labels(label), where)
        masks = {i: label == i for i in ids}
        areas = {i: m.sum(axis=(0, 1)) for i, m in masks.items()}  # per slice
        shared = None
        if self.shared_key_slices:
            # slices ranked by how many of the objects they hold, then by how large the objects
            # are there relative to their largest section (so no object is boxed at its tip):
            # one cohort for the memory network
            table = np.stack([areas[i] for i in ids]).astype(np.float64)
            relative = (table / np.maximum(table.max(axis=1, keepdims=True), 1)).mean(axis=0)
            shared = self._key_slices((table > 0).sum(axis=0) + 0.999 * relative, -1, where)
        for object_id in ids:
            obj, area = masks[object_id], areas[object_id]
            keys = (
                self._key_slices(area, object_id, where) if shared is None else [k for k in shared if area[k]]
            )
            if keys:
                prompts = [self._slice_prompt(obj[..., k], k) for k in keys]
                objects.append(ObjectPrompts(object_id, self.label_names.get(object_id, ""), prompts))
        d[self.prompt_key] = objects
        return d


class RandPromptFromLabeld(Randomizable, PromptFromLabelBase):
    """Draw prompts for the objects of a label volume at random (training).

    Every argument is `PromptFromLabelBase`'s; the draws (key slices, prompt kind, box jitter,
    clicks, objects) come from MONAI's ``self.R``, so ``set_random_state`` and
    ``set_determinism`` reach them.
    """

    def randomize(self, data: Any = None) -> None:
        """Nothing to pre-draw: all draws depend on the label and use ``self.R`` in ``__call__``."""

    def _random(self) -> np.random.RandomState:
        return self.R


class PromptFromLabeld(PromptFromLabelBase):
    """Oracle prompts without randomness, for evaluation and inference with a reference label.

    Same output as `RandPromptFromLabeld`; key slices by ``"largest"`` area (or ``"middle"``, or
    an int), one ``mode`` from `PROMPT_MODES`: the exact box, the most interior pixel as a
    click (``num_negative > 0`` adds negatives drawn with a fixed seed), or the label slice.
    """

    def __init__(
        self,
        label_key: str = "label",
        prompt_key: str = "prompts",
        object_ids: Sequence[int] | None = None,
        object_key: str = "object_id",
        key_slices: str | int = "largest",
        num_key_slices: int = 1,
        mode: str = "box",
        num_positive: int = 1,
        num_negative: int = 0,
        negative_margin: int = 10,
        label_names: Mapping[int, str] | None = None,
        shared_key_slices: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            label_key=label_key,
            prompt_key=prompt_key,
            object_ids=object_ids,
            object_key=object_key,
            key_slices=key_slices,
            num_key_slices=num_key_slices,
            mode_probs={mode: 1.0},
            shared_key_slices=shared_key_slices,
            box_jitter=0.0,
            num_positive=num_positive,
            num_negative=num_negative,
            negative_margin=negative_margin,
            label_names=label_names,
            deterministic=True,
            allow_missing_keys=allow_missing_keys,
        )


class LoadPromptFiled(MapTransform):
    """Read each case's prompt file (``docs/prompt_file.md``) into ``list[ObjectPrompts]``.

    The file's voxel or world coordinates are converted to the RAS array in ``image_key``
    (loaded by `LoadVolumed`), so this runs after loading and before any in-plane resizing.

    Args:
        path_key: the key holding the prompt file's path.
        image_key: the loaded image the prompts are for.
        prompt_key: where the prompts are written.
    """

    def __init__(
        self,
        path_key: str = "prompt_file",
        image_key: str = "image",
        prompt_key: str = "prompts",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(path_key, allow_missing_keys)
        self.path_key, self.image_key, self.prompt_key = path_key, image_key, prompt_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.path_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"no prompt file under {self.path_key!r} for {source_name(d, self.image_key)}")
        d[self.prompt_key] = self.load(d[self.path_key], d[self.image_key])
        return d

    def load(self, path: str | os.PathLike, image: Any) -> list[ObjectPrompts]:
        """The prompts of one file for its loaded image."""
        from monai_sam.io.prompt_file import load_prompt_file

        return load_prompt_file(path, image)
