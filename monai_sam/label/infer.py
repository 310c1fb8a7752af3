"""MONAI Label infer tasks: interactive clicks/ROI with SAM2 memory propagation, and automatic.

Their names (``monai_sam_interactive``, ``monai_sam_auto``) do not collide with MONAI Label's
built-in ``sam_2d`` / ``sam_3d``. Both return a NIfTI label on the grid of the image as stored
(what Slicer and OHIF overlay) with ``label_names`` in the result JSON, and both report the
encoder-feature cache in ``info()`` (hence in ``/info``).
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from monai_sam.label.engine import ImageGeometry, Sam2LabelEngine
from monai_sam.label.prompting import ParsedRequest, parse_request
from monai_sam.prompts import ObjectPrompts, PromptError, validate_prompts

__all__ = ["INTERACTIVE_TASK", "AUTO_TASK", "InteractiveSam2Infer", "AutoSam2Infer"]

logger = logging.getLogger(__name__)

INTERACTIVE_TASK = "monai_sam_interactive"
AUTO_TASK = "monai_sam_auto"


class _EngineTask(InferTask):
    def __init__(self, engine: Sam2LabelEngine, type: InferType, description: str) -> None:
        super().__init__(
            type=type,
            labels=engine.settings.labels,
            dimension=3,
            description=description,
            config={"device": engine.settings.device},
        )
        self.engine = engine

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(self.engine.info())
        return d

    @staticmethod
    def _image(request: dict[str, Any]) -> str:
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise PromptError(f"infer request without an image path: {request.get('image')!r}")
        return image


class InteractiveSam2Infer(_EngineTask):
    """Clicks and/or an ROI box on one or more slices -> a 3D mask propagated both ways.

    The request format is in `monai_sam.label.prompting`; clients resend all clicks of the
    segment each time, so each clicked slice is a conditioning frame of SAM2's memory. The
    image's encoder features are computed on the first click and reused by the next ones.
    """

    def __init__(self, engine: Sam2LabelEngine) -> None:
        super().__init__(
            engine,
            InferType.DEEPGROW,
            "SAM2 memory propagation: clicks/ROI on slices -> 3D mask (features cached per image)",
        )

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        image = self._image(request)
        labels = self.engine.settings.labels

        def prompts(geometry: ImageGeometry, _ras) -> ParsedRequest:
            return parse_request(request, geometry.vmap, labels, where=f"{image}")

        return self.engine.segment(image, prompts)


class AutoSam2Infer(_EngineTask):
    """No clicks: the bundle's ``auto_prompter`` (prompt-free head) seeds the memory propagation."""

    def __init__(self, engine: Sam2LabelEngine) -> None:
        super().__init__(
            engine,
            InferType.SEGMENTATION,
            "Automatic: the bundle's prompt-free head prompts SAM2's memory propagation",
        )

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        image = self._image(request)
        prompter = self.engine.auto_prompter()

        def prompts(geometry: ImageGeometry, ras) -> ParsedRequest:
            volume = ras if ras is not None else self.engine.load_image(image)[1]
            objects: list[ObjectPrompts] = list(prompter(volume))
            if not objects:
                raise PromptError(f"{image}: the automatic prompter found no object")
            validate_prompts(
                objects, geometry.slice_size, geometry.num_slices, source=f"{image} (auto prompts)"
            )
            return ParsedRequest(objects)

        out, result = self.engine.segment(image, prompts)
        result["prompt_source"] = "auto"
        return out, result
