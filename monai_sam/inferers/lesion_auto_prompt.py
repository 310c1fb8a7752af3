"""Automatic prompts for tumours: one memory-network object per lesion the prompt-free head finds.

`AutoPrompter` prompts each class once, on its largest connected component: right for an
organ, wrong for a tumour class, whose lesions lie apart at different heights. Here the
head's tumour prediction is split into 3D connected components
(`monai_sam.transforms.lesions.lesion_instances`, the rule lesion-level evaluation counts
lesions with), and each lesion becomes its own object (``first_lesion_id``, +1, ...) with a
prompt on the slice where that lesion is largest. The memory network then carries each one
through its own lesion; organs (e.g. the liver) are prompted as `AutoPrompter` does.

Same contract as `AutoPrompter`: ``prompter(image)`` with ``image`` a ``(1, X, Y, Z)``
MetaTensor in RAS with original intensities returns ``list[ObjectPrompts]`` in its voxel grid;
outputs made from them are reported as ``prompt_source="auto"``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from monai_sam.inferers.auto_prompt import AutoPrompter
from monai_sam.prompts import ObjectPrompts, SlicePrompt
from monai_sam.transforms.lesions import FIRST_LESION_ID, lesion_instances
from monai_sam.transforms.prompts import box_from_mask

__all__ = ["LesionAutoPrompter"]

logger = logging.getLogger(__name__)


class LesionAutoPrompter(AutoPrompter):
    """`AutoPrompter` that seeds the memory with one object per predicted lesion.

    Args:
        segmenter: the trained `PromptFreeSamSegmenter`; ``lesion_label`` must be one of its
            classes.
        lesion_label: the tumour class of the head; its connected components are the lesions.
        first_lesion_id: object id of the first lesion (the bundles' object maps use 100).
        lesion_name: prompts are named ``"<lesion_name>_<k>"``.
        connectivity: 3D connectivity of a lesion (3 = 26 neighbours).
        min_lesion_volume_mm3: predicted components under this volume are not prompted (a
            head's stray voxels should not become lesions); at the image's spacing.
        max_lesions: prompt at most this many lesions, the largest first (None: all); each is a
            propagation through the volume.
        Other arguments are `AutoPrompter`'s (``prompt``: ``"mask"`` or ``"box"`` for organs
        and lesions alike; ``min_area`` applies to organs only, a lesion's size is judged by
        ``min_lesion_volume_mm3``).
    """

    def __init__(
        self,
        segmenter,
        lesion_label: int = 2,
        first_lesion_id: int = FIRST_LESION_ID,
        lesion_name: str = "lesion",
        connectivity: int = 3,
        min_lesion_volume_mm3: float = 0.0,
        max_lesions: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(segmenter, **kwargs)
        if int(lesion_label) not in self.segmenter.object_ids:
            raise ValueError(
                f"lesion_label {lesion_label} is not a class of the head ({self.segmenter.object_ids})"
            )
        if max_lesions is not None and int(max_lesions) < 1:
            raise ValueError(f"max_lesions must be >= 1 or None, got {max_lesions}")
        self.lesion_label = int(lesion_label)
        self.first_lesion_id = int(first_lesion_id)
        self.lesion_name = str(lesion_name)
        self.connectivity = int(connectivity)
        self.min_lesion_volume_mm3 = float(min_lesion_volume_mm3)
        self.max_lesions = None if max_lesions is None else int(max_lesions)

    def prompts_from_label(
        self, label: np.ndarray, source: str = "<label>", spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    ) -> list[ObjectPrompts]:
        """Organ prompts as `AutoPrompter` makes them, then one object per lesion of ``lesion_label``.

        ``label`` is the head's label map ``(X, Y, Z)``; with ``candidate_stride`` > 1 only every
        n-th slice is predicted, and lesions are the components of those slices (stacked at
        ``n`` times the slice spacing), each prompted on one of them.
        """
        organ_ids = [i for i in self.object_ids if i != self.lesion_label]
        all_ids = self.object_ids
        try:
            self.object_ids = organ_ids
            organs = super().prompts_from_label(np.where(label == self.lesion_label, 0, label), source)
        finally:
            self.object_ids = all_ids
        if self.lesion_label not in all_ids:
            return organs
        picked = np.arange(0, label.shape[-1], self.candidate_stride)
        sub = label[..., picked]
        step = (float(spacing[0]), float(spacing[1]), float(spacing[2]) * self.candidate_stride)
        objects, lesions = lesion_instances(
            sub, self.lesion_label, step, self.first_lesion_id, self.connectivity,
            self.min_lesion_volume_mm3, fill_label=0, where=source,
        )  # fmt: skip
        if self.max_lesions is not None and len(lesions) > self.max_lesions:
            kept = sorted(lesions, key=lambda les: -les["voxels"])[: self.max_lesions]
            logger.info("%s: %d predicted lesions, the %d largest prompted", source, len(lesions), len(kept))
            lesions = sorted(kept, key=lambda les: les["object_id"])
        out = list(organs)
        for k, les in enumerate(lesions, start=1):
            mask = objects == les["object_id"]
            areas = mask.sum(axis=(0, 1))
            z = int(np.argmax(areas))  # the lesion's largest slice (ties: the lowest)
            m = mask[..., z]
            if self.prompt == "mask":
                sp = SlicePrompt(int(picked[z]), mask=m)
            else:
                sp = SlicePrompt(int(picked[z]), box=box_from_mask(m))
            # renumbered after any max_lesions selection: ids stay consecutive
            out.append(ObjectPrompts(self.first_lesion_id + k - 1, f"{self.lesion_name}_{k}", [sp]))
        return out

    def __call__(self, image: torch.Tensor) -> list[ObjectPrompts]:
        where = _name(image)
        spacing = _spacing(image)
        objects = self.prompts_from_label(self.predict(image), where, spacing)
        lesions = sum(o.object_id >= self.first_lesion_id for o in objects)
        logger.info(
            "%s: automatic %s prompts for %d organ(s) and %d lesion(s): %s", where, self.prompt,
            len(objects) - lesions, lesions,
            ", ".join(f"{o.name or o.object_id} (slice {o.key_slices})" for o in objects) or "no object",
        )  # fmt: skip
        return objects


def _spacing(image: Any) -> tuple[float, float, float]:
    affine = getattr(image, "affine", None)
    if affine is None:
        return (1.0, 1.0, 1.0)
    a = np.asarray(torch.as_tensor(affine).cpu(), dtype=float)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a**2).sum(axis=0)))  # type: ignore[return-value]


def _name(image: Any) -> str:
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else "<image>"
