"""Prompts for one volume: which objects, on which key slices, with a box, clicks or a mask.

One representation is shared by the transforms that draw prompts from labels, the prompt
file (``monai_sam.io.prompt_file``), the memory network and the MONAI Label app, so that a
prompt means the same thing everywhere. Coordinates follow SAM (see docs/conventions.md):
points are ``(x, y) = (column, row)`` and boxes ``(x0, y0, x1, y1)`` in pixels of the slice,
slices being ``volume[..., k]`` of a channel-first RAS volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PromptError", "SlicePrompt", "ObjectPrompts", "validate_prompts"]


class PromptError(ValueError):
    """A prompt that cannot be used on the volume it was given for."""


@dataclass
class SlicePrompt:
    """One object's prompt on one key slice: any of box, clicks and mask (at least one)."""

    slice_index: int
    box: np.ndarray | None = None  # (4,) float: x0, y0, x1, y1
    points: np.ndarray | None = None  # (N, 2) float: x, y
    point_labels: np.ndarray | None = None  # (N,) int: 1 positive, 0 negative
    mask: np.ndarray | None = None  # (H, W) bool

    def __post_init__(self) -> None:
        self.slice_index = int(self.slice_index)
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float32).reshape(-1)
        if self.points is not None:
            self.points = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
            if self.point_labels is None:
                self.point_labels = np.ones(len(self.points), dtype=np.int64)
            self.point_labels = np.asarray(self.point_labels, dtype=np.int64).reshape(-1)
        if self.mask is not None:
            self.mask = np.asarray(self.mask).astype(bool)

    @property
    def kind(self) -> str:
        """'mask', 'box+clicks', 'box' or 'clicks': what SAM2 will be conditioned on."""
        if self.mask is not None:
            return "mask"
        if self.box is not None and self.points is not None:
            return "box+clicks"
        return "box" if self.box is not None else "clicks"

    def validate(self, slice_shape: tuple[int, int], num_slices: int, where: str = "prompt") -> None:
        """Raise `PromptError` naming ``where`` if this prompt does not fit the volume."""
        h, w = int(slice_shape[0]), int(slice_shape[1])
        if not 0 <= self.slice_index < num_slices:
            raise PromptError(f"{where}: key slice {self.slice_index} is out of range [0, {num_slices - 1}]")
        if self.box is None and self.points is None and self.mask is None:
            raise PromptError(f"{where}: slice {self.slice_index} has no box, clicks or mask")
        if self.box is not None:
            if self.box.shape != (4,):
                raise PromptError(f"{where}: a box needs 4 numbers (x0, y0, x1, y1), got {self.box.tolist()}")
            x0, y0, x1, y1 = self.box.tolist()
            if x1 <= x0 or y1 <= y0:
                raise PromptError(f"{where}: box {self.box.tolist()} has zero or negative area (need x1>x0, y1>y0)")
            if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
                raise PromptError(f"{where}: box {self.box.tolist()} lies outside the {w}x{h} (WxH) slice")
        if self.points is not None:
            if len(self.points) == 0:
                raise PromptError(f"{where}: an empty list of clicks")
            if len(self.point_labels) != len(self.points):
                raise PromptError(
                    f"{where}: {len(self.points)} clicks but {len(self.point_labels)} click labels"
                )
            if not np.isin(self.point_labels, (0, 1)).all():
                raise PromptError(f"{where}: click labels must be 1 (positive) or 0 (negative)")
            x, y = self.points[:, 0], self.points[:, 1]
            if (x < 0).any() or (y < 0).any() or (x > w - 1).any() or (y > h - 1).any():
                raise PromptError(f"{where}: clicks {self.points.tolist()} lie outside the {w}x{h} (WxH) slice")
        if self.mask is not None:
            if self.mask.shape != (h, w):
                raise PromptError(f"{where}: mask prompt has shape {self.mask.shape}, the slice is {(h, w)}")
            if not self.mask.any():
                raise PromptError(f"{where}: mask prompt on slice {self.slice_index} is empty")


@dataclass
class ObjectPrompts:
    """All prompts of one object (an organ, a lesion) in one volume."""

    object_id: int
    name: str = ""
    slices: list[SlicePrompt] = field(default_factory=list)

    @property
    def key_slices(self) -> list[int]:
        return sorted(p.slice_index for p in self.slices)


def validate_prompts(
    objects: list[ObjectPrompts], slice_shape: tuple[int, int], num_slices: int, source: str = "prompts"
) -> None:
    """Check a whole prompt set against a volume; errors name ``source`` and the object."""
    if not objects:
        raise PromptError(f"{source}: no object has a prompt; give at least one box, click or mask")
    ids = [o.object_id for o in objects]
    if len(set(ids)) != len(ids):
        raise PromptError(f"{source}: object ids must be unique, got {ids}")
    for obj in objects:
        where = f"{source}: object {obj.object_id}" + (f" ({obj.name})" if obj.name else "")
        if not obj.slices:
            raise PromptError(f"{where} has no prompted slice")
        seen = [p.slice_index for p in obj.slices]
        if len(set(seen)) != len(seen):
            raise PromptError(f"{where} has two prompts on the same slice ({seen}); merge them into one")
        for p in obj.slices:
            p.validate(slice_shape, num_slices, where)
