"""Automatic prompts: a prompt-free head's prediction on key slices seeds SAM2's memory.

Nobody has to click: `AutoPrompter` segments every slice with a
`monai_sam.networks.PromptFreeSamSegmenter` (`PromptFreeSliceInferer`), keeps each class's
largest connected component, picks its key slice(s) and turns the prediction there into a
mask or box prompt. The memory network then carries those prompts through the volume as it
would carry a user's box.

The contract others rely on (DICOM CLI ``--auto``, MONAI Label's automatic task, the bundles'
``auto_prompter`` key): ``auto_prompter(image)`` with ``image`` a ``(1, X, Y, Z)`` MetaTensor
as `monai_sam.data.load_volume` returns it (RAS, original intensities) returns
``list[ObjectPrompts]``, one per class found, in the image's RAS voxel grid. Prompts made this
way are reported apart from user prompts (``prompt_source="auto"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor
from scipy import ndimage

from monai_sam.inferers.slice_inference import PromptFreeSliceInferer
from monai_sam.networks.prompt_free import PromptFreeSamSegmenter
from monai_sam.prompts import ObjectPrompts, PromptError, SlicePrompt
from monai_sam.transforms.prompts import box_from_mask

__all__ = ["AutoPrompter", "AutoPromptd"]

logger = logging.getLogger(__name__)

UNTRAINED_WARNING = "auto-prompter without a trained head checkpoint: prompts are random (demo only)"


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


class AutoPrompter:
    """``auto_prompter(image) -> list[ObjectPrompts]`` from a prompt-free head's prediction.

    Args:
        segmenter: the trained `PromptFreeSamSegmenter` (its ``object_ids`` are the classes).
        intensity: ``[0, 1]`` scaling of the raw image: a CT window name, ``"mr"``, a callable
            or None; the one the head was trained with.
        image_size: the encoder input the head was trained at; checked against the segmenter
            (None: the segmenter's).
        object_ids: classes to prompt (default: all of the segmenter's).
        key_slices: ``"largest"``: the slices where the class's predicted area is largest;
            ``"middle"``: evenly spaced through the class's predicted extent (one: its median).
        num_key_slices: prompted slices per class.
        prompt: ``"mask"`` (the predicted mask on the key slice) or ``"box"`` (its extent).
        min_area: fewer predicted pixels than this on the key slice: the class counts as absent
            (a head's stray pixels should not become a prompt).
        candidate_stride: predict only every n-th slice when choosing key slices (faster on
            long volumes; the memory network segments every slice anyway).
        checkpoint: our trained-head checkpoint (`monai_sam.engines.TrainableCheckpoint`
            format), loaded on first use so that configs can name it before it exists; None:
            the segmenter is used as it is (warned: untrained heads give random prompts).
        model_name, base_checkpoint: the frozen encoder's size name and official file, checked
            against the checkpoint's stamp.
        label_names: names for the prompts (default: the segmenter's ``label_names``).
        inferer: the slice inferer (default: whole slices resized to the model input).
    """

    def __init__(
        self,
        segmenter: PromptFreeSamSegmenter,
        intensity: str | Callable | None = "abdomen",
        image_size: int | None = None,
        object_ids: Sequence[int] | None = None,
        key_slices: Literal["largest", "middle"] = "largest",
        num_key_slices: int = 1,
        prompt: Literal["mask", "box"] = "mask",
        min_area: int = 10,
        candidate_stride: int = 1,
        checkpoint: str | os.PathLike | None = None,
        model_name: str | None = None,
        base_checkpoint: str | None = None,
        label_names: Mapping[int, str] | None = None,
        inferer: PromptFreeSliceInferer | None = None,
    ) -> None:
        if not isinstance(segmenter, PromptFreeSamSegmenter):
            raise TypeError(f"segmenter must be a PromptFreeSamSegmenter, got {type(segmenter).__name__}")
        if image_size is not None and int(image_size) != segmenter.image_size:
            raise ValueError(
                f"image_size {image_size} differs from the segmenter's encoder input {segmenter.image_size}"
            )
        if key_slices not in ("largest", "middle"):
            raise ValueError(f"key_slices must be 'largest' or 'middle', got {key_slices!r}")
        if prompt not in ("mask", "box"):
            raise ValueError(f"prompt must be 'mask' or 'box', got {prompt!r}")
        if int(num_key_slices) < 1 or int(candidate_stride) < 1 or int(min_area) < 1:
            raise ValueError(
                f"num_key_slices, candidate_stride and min_area must be >= 1, got "
                f"{num_key_slices}, {candidate_stride}, {min_area}"
            )
        ids = list(segmenter.object_ids) if object_ids is None else [int(i) for i in object_ids]
        unknown = sorted(set(ids) - set(segmenter.object_ids))
        if unknown:
            raise ValueError(f"object_ids {unknown} are not classes of the head ({segmenter.object_ids})")
        self.segmenter = segmenter
        if not callable(intensity):
            from monai_sam.segment import intensity_transform

            intensity = intensity_transform(intensity) or (lambda x: x)  # None: already in [0, 1]
        self.intensity = intensity
        self.object_ids = ids
        self.key_slices = key_slices
        self.num_key_slices = int(num_key_slices)
        self.prompt = prompt
        self.min_area = int(min_area)
        self.candidate_stride = int(candidate_stride)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.model_name = model_name
        self.base_checkpoint = base_checkpoint
        self.label_names = {int(k): str(v) for k, v in (label_names or segmenter.label_names).items()}
        self.inferer = inferer or PromptFreeSliceInferer(output="probabilities")
        self._ready = False

    def _load(self) -> None:
        if self._ready:
            return
        if self.checkpoint is None:
            logger.warning(UNTRAINED_WARNING)
        else:
            from monai_sam.engines.checkpoint import load_trained_parts

            if not os.path.isfile(self.checkpoint):
                raise FileNotFoundError(
                    f"auto-prompt head checkpoint {self.checkpoint} does not exist: "
                    "train the prompt-free head "
                    "first (the bundle's docs/README.md gives the command)"
                )
            name = self.model_name or "unknown"
            load_trained_parts(self.segmenter, self.checkpoint, name, ["head"], self.base_checkpoint)
        self._ready = True

    def predict(self, image: torch.Tensor) -> np.ndarray:
        """The head's label map ``(X, Y, Z)`` (object ids) on the candidate slices (others 0)."""
        self._load()
        where = _name(image)
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(
                f"{where}: expected a (1, X, Y, Z) volume as load_volume returns, got {tuple(image.shape)}"
            )
        x = convert_to_tensor(self.intensity(image), track_meta=False).float()
        depth = x.shape[-1]
        picked = list(range(0, depth, self.candidate_stride))
        probs = self.inferer(x[..., picked], self.segmenter)
        if isinstance(probs, tuple):  # an inferer configured with output="both"
            probs = probs[1]
        if probs.shape[0] != self.segmenter.num_classes:
            raise ValueError(
                f"the inferer must return probabilities ({self.segmenter.num_classes} channels), "
                f"got {tuple(probs.shape)}"
            )
        classes = convert_to_tensor(probs, track_meta=False).argmax(0)
        label = np.zeros(tuple(x.shape[1:]), dtype=np.int64)
        label[..., picked] = self.segmenter.label_from_classes(classes).cpu().numpy()
        return label

    def prompts_from_label(self, label: np.ndarray, source: str = "<label>") -> list[ObjectPrompts]:
        """Key-slice prompts of each class found in a predicted label map ``(X, Y, Z)``."""
        out: list[ObjectPrompts] = []
        for object_id in self.object_ids:
            mask = _largest_component(label == object_id)
            areas = mask.sum(axis=(0, 1))
            on = np.flatnonzero(areas >= self.min_area)
            if len(on) == 0:
                logger.info("%s: auto-prompt found no %s", source, self.label_names.get(object_id, object_id))
                continue
            n = min(self.num_key_slices, len(on))
            if self.key_slices == "largest":
                keys = sorted(int(k) for k in on[np.argsort(-areas[on], kind="stable")[:n]])
            else:
                keys = [int(on[i]) for i in ((np.arange(n) + 0.5) * len(on) / n).astype(int)]
            slices = []
            for k in keys:
                m = _largest_component(mask[..., k])
                if self.prompt == "mask":
                    slices.append(SlicePrompt(k, mask=m))
                else:
                    slices.append(SlicePrompt(k, box=box_from_mask(m)))
            out.append(ObjectPrompts(object_id, self.label_names.get(object_id, ""), slices))
        return out

    def __call__(self, image: torch.Tensor) -> list[ObjectPrompts]:
        where = _name(image)
        objects = self.prompts_from_label(self.predict(image), where)
        logger.info(
            "%s: automatic %s prompts for %s",
            where,
            self.prompt,
            ", ".join(f"{o.name or o.object_id} (slice {o.key_slices})" for o in objects) or "no object",
        )
        return objects


class AutoPromptd(MapTransform):
    """Dict transform: ``data[prompt_key] = prompter(data[image_key])`` (raw intensities, RAS).

    Place it right after `monai_sam.data.LoadVolumed`, before any intensity transform: the
    prompter applies the intensity scaling its head was trained with.

    Args:
        prompter: an `AutoPrompter` (or any callable with the same contract).
        image_key: the loaded volume.
        prompt_key: where the ``list[ObjectPrompts]`` goes.
        require_objects: raise a `PromptError` naming the file when no class is found (the
            memory network needs at least one prompt); False leaves an empty list.
    """

    def __init__(
        self,
        prompter: Callable[[torch.Tensor], list[ObjectPrompts]],
        image_key: str = "image",
        prompt_key: str = "prompts",
        require_objects: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(image_key, allow_missing_keys)
        self.prompter = prompter
        self.image_key, self.prompt_key = image_key, prompt_key
        self.require_objects = bool(require_objects)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"no image under {self.image_key!r} to prompt automatically (keys: {list(d)})")
        objects = self.prompter(d[self.image_key])
        if not objects and self.require_objects:
            raise PromptError(
                f"{_name(d[self.image_key])}: automatic prompting found none of the head's classes; "
                "check the intensity preset and the head checkpoint, or give prompts"
            )
        d[self.prompt_key] = objects
        return d


def _name(image: Any) -> str:
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else "<image>"
