"""Promptable 2D segmentation (fundus photographs...) with SAM or SAM2 on a frozen image encoder.

Two networks share one interface, the frozen-encoder trainer's protocol (``encode``,
``split_encoded``, ``join_encoded``, ``training_inputs``, ``forward(None, features=...)``) plus
``predict`` for evaluation and inference:

- `SamImageSegmenter` wraps ``segment_anything``'s ``Sam`` (SAM v1, ``vit_b|l|h``): ``encode``
  is ``image_encoder``; ``forward`` runs the prompt encoder and the mask decoder, one object
  at a time, and returns SAM's 256 x 256 low-resolution logits (``image_size / 4``) and its IoU
  predictions: the recipe of the seed (frozen encoders, trained mask decoder, loss on the
  low-resolution masks). Its sub-modules keep SAM's names (``image_encoder``,
  ``prompt_encoder``, ``mask_decoder``) so the trainer's part names select them.
- `Sam2ImageSegmenter` is SAM2 in image mode: `Sam2VolumeSegmenter` on a one-slice volume. The
  prompted slice is a conditioning frame with no memory, which gets SAM2's ``no_mem_embed``
  exactly as ``SAM2ImagePredictor`` adds it (tests/test_sam_image.py checks the two agree).

Prompts are `monai_sam.prompts.ObjectPrompts` on slice 0, in the pixel grid ``(H, W)`` of the
photograph (``x`` = column, ``y`` = row; docs/conventions.md); images are ``(3, S, S)`` from
`monai_sam.transforms.SamInput`. Training targets are the objects' masks: ``item["object_masks"]``
``(N, H, W)`` when the data carry them (nested regions such as the optic disc around the cup,
see `monai_sam.transforms.RandRegionPromptd`), else ``label == object_id``; they are resized to
the low-resolution grid, where the loss is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_sam.networks.sam2_volume import Sam2VolumeSegmenter
from monai_sam.prompts import ObjectPrompts, PromptError, SlicePrompt, validate_prompts
from monai_sam.transforms.regions import OBJECT_MASKS_KEY

__all__ = [
    "OBJECT_MASKS_KEY",
    "Sam2ImageSegmenter",
    "SamImageSegmenter",
    "build_image_model",
    "build_image_segmenter",
    "frames_from_image",
    "image_object_targets",
]

logger = logging.getLogger(__name__)


def frames_from_image(image: Tensor) -> Tensor:
    """A `SamInput` image ``(3, S, S)`` (or a one-slice ``(3, S, S, 1)``) -> one frame ``(1, 3, S, S)``."""
    if image.ndim == 4 and image.shape[-1] == 1 and image.shape[0] == 3:
        image = image[..., 0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, S, S) SamInput image, got {tuple(image.shape)}")
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    return image[None]


def _plain_2d(x: Any, what: str) -> Tensor:
    """A label ``(1, H, W)`` / ``(H, W)`` / ``(1, H, W, 1)`` as a plain ``(H, W)`` tensor."""
    t = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x)
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    while t.ndim > 2 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 2:
        raise ValueError(f"{what}: expected a 2D map (1, H, W), got shape {tuple(torch.as_tensor(x).shape)}")
    return t


def image_object_targets(item: Mapping[str, Any], low_res_size: int) -> tuple[Tensor, tuple[int, int]]:
    """The prompted objects' masks of a batch item on the low-resolution grid, and the original size.

    Returns ``(N, 1, h, w)`` float targets in ``[0, 1]`` (area fractions: a boundary pixel of the
    low-resolution grid is partly object) and ``(H, W)``. Masks come from ``item["object_masks"]``
    when present (one per prompted object, in order), else from ``item["label"] == object_id``.
    """
    prompts: Sequence[ObjectPrompts] = item["prompts"]
    if OBJECT_MASKS_KEY in item:
        masks = torch.as_tensor(item[OBJECT_MASKS_KEY])
        masks = masks.as_tensor() if hasattr(masks, "as_tensor") else masks
        if masks.ndim != 3 or masks.shape[0] != len(prompts):
            raise ValueError(
                f"{OBJECT_MASKS_KEY} must be (N, H, W) with one mask per prompted object ({len(prompts)}), "
                f"got {tuple(masks.shape)}"
            )
    else:
        label = _plain_2d(item["label"], "label")
        masks = torch.stack([label == int(o.object_id) for o in prompts])
    hw = (int(masks.shape[-2]), int(masks.shape[-1]))
    target = masks[:, None].float()
    if hw != (low_res_size, low_res_size):
        # antialiased bilinear = area fractions for any ratio (shrinking); clamp the overshoot
        target = F.interpolate(
            target, size=(low_res_size,) * 2, mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    return target, hw


def _as_prompt_list(prompts: Sequence[ObjectPrompts] | ObjectPrompts) -> list[ObjectPrompts]:
    return [prompts] if isinstance(prompts, ObjectPrompts) else list(prompts)


class SamImageSegmenter(nn.Module):
    """SAM v1 on one image: frozen image encoder (cacheable), prompt encoder + mask decoder on top.

    Args:
        model: a ``segment_anything.modeling.Sam`` (see `monai_sam.networks.build_sam_model`).
            Its image encoder, prompt encoder and mask decoder become this module's own
            sub-modules under the same names; SAM's pixel normalisation is not used (images
            come normalised by `SamInput`, which applies the same mean and std).
        encoder_batch_size: images per image-encoder call (feature cache fills, evaluation).
        multimask_output: ask the decoder for its three masks and keep the one with the highest
            predicted IoU (SAM's answer to ambiguous single clicks); False (the seed recipe)
            uses the single-mask output.

    Shapes: ``frames`` ``(1, 3, S, S)``, ``S = image_encoder.img_size`` (1024 for the official
    weights); low-resolution logits ``(N, 1, S/4, S/4)``; ``predict`` returns ``(N, H, W)``.
    """

    def __init__(self, model: nn.Module, encoder_batch_size: int = 4, multimask_output: bool = False) -> None:
        super().__init__()
        for attr in ("image_encoder", "prompt_encoder", "mask_decoder"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"model must be a segment_anything Sam (missing {attr}), got {type(model).__name__}"
                )
        if int(encoder_batch_size) < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {encoder_batch_size}")
        self.image_encoder = model.image_encoder
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.encoder_batch_size = int(encoder_batch_size)
        self.multimask_output = bool(multimask_output)

    # ------------------------------------------------------------------ basics
    @property
    def image_size(self) -> int:
        """Side ``S`` of the square encoder input in pixels."""
        return int(self.image_encoder.img_size)

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution masks (4 x the embedding grid: 256 at 1024 px)."""
        return 4 * int(self.prompt_encoder.image_embedding_size[0])

    @property
    def device(self) -> torch.device:
        return next(self.mask_decoder.parameters()).device

    # ------------------------------------------------------------------ frozen encoder (cacheable)
    def encode(self, frames: Tensor) -> dict[str, Tensor]:
        """Image embeddings ``(n, 256, S/16, S/16)`` of ``(n, 3, S, S)`` frames."""
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"frames must be (n, 3, {self.image_size}, {self.image_size}) "
                f"(SamInput(image_size={self.image_size})), got {tuple(frames.shape)}"
            )
        return {"image_embeddings": self.image_encoder(frames)}

    @staticmethod
    def split_encoded(raw: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """One CPU dict per frame (the feature cache's unit)."""
        emb = raw["image_embeddings"]
        return [{"image_embeddings": emb[n].detach().cpu()} for n in range(emb.shape[0])]

    @staticmethod
    def join_encoded(
        per_frame: Sequence[Mapping[str, Tensor]], device: torch.device | str
    ) -> dict[str, Tensor]:
        """The inverse of `split_encoded`: what ``forward(features=...)`` takes."""
        return {
            "image_embeddings": torch.stack([f["image_embeddings"] for f in per_frame]).to(device).float()
        }

    # ------------------------------------------------------------------ prompts
    def _sam_prompt(self, p: SlicePrompt, original_size: tuple[int, int]) -> dict[str, Any]:
        """A prompt scaled from the photograph ``(H, W)`` to the model input ``(S, S)``."""
        if p.mask is not None:
            raise PromptError(
                "SamImageSegmenter (SAM v1) takes box and click prompts; "
                "a mask prompt needs the SAM2 segmenter"
            )
        h, w = original_size
        scale = torch.tensor([self.image_size / w, self.image_size / h], dtype=torch.float32)
        dev = self.device
        points = boxes = None
        if p.points is not None:
            xy = torch.as_tensor(p.points, dtype=torch.float32).reshape(1, -1, 2) * scale
            labels = torch.as_tensor(p.point_labels, dtype=torch.int64).reshape(1, -1)
            points = (xy.to(dev), labels.to(dev))
        if p.box is not None:
            boxes = (
                (torch.as_tensor(p.box, dtype=torch.float32).reshape(1, 2, 2) * scale).reshape(1, 4).to(dev)
            )
        return {"points": points, "boxes": boxes, "masks": None}

    def _check(self, features, frames, prompts, original_size) -> tuple[dict[str, Tensor], tuple[int, int]]:
        if features is None:
            if frames is None:
                raise ValueError("give the image (frames) or its cached encoder features")
            features = self.encode(frames.to(self.device).float())
        emb = features["image_embeddings"]
        if emb.ndim != 4 or emb.shape[0] != 1:
            raise ValueError(
                f"one image at a time: image_embeddings must be (1, C, h, w), got {tuple(emb.shape)}"
            )
        hw = (self.image_size, self.image_size) if original_size is None else original_size
        hw = (int(hw[0]), int(hw[1]))
        validate_prompts(prompts, hw, 1)
        return features, hw

    # ------------------------------------------------------------------ decoding
    def forward(
        self,
        frames: Tensor | None,
        prompts: Sequence[ObjectPrompts] | ObjectPrompts,
        original_size: tuple[int, int] | None = None,
        output_size: tuple[int, int] | None = None,
        features: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Logits of every prompted object (with gradients through the trainable parts).

        Args:
            frames: ``(1, 3, S, S)``, or None when ``features`` (cached `encode` output) are given.
            prompts: one `ObjectPrompts` per object, each with its prompt on slice 0, in the
                pixel grid of the photograph.
            original_size: ``(H, W)`` of the photograph the prompts were drawn on (default
                ``(S, S)``).
            output_size: size of the returned logits; default the low-resolution grid
                (``S/4``), where the seed recipe computes its loss.

        Returns:
            ``{"logits": (N, 1, h, w), "iou_predictions": (N, 1)}``.
        """
        prompts = _as_prompt_list(prompts)
        features, hw = self._check(features, frames, prompts, original_size)
        emb = features["image_embeddings"].to(self.device)
        dense_pe = self.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        # objects one by one: their prompts differ in kind and click count (SAM batches equal ones)
        for obj in prompts:
            sparse, dense = self.prompt_encoder(**self._sam_prompt(obj.slices[0], hw))
            low, iou = self.mask_decoder(
                image_embeddings=emb,
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=self.multimask_output,
            )
            if self.multimask_output:
                best = iou.argmax(dim=1)
                low, iou = low[torch.arange(low.shape[0]), best][:, None], iou.gather(1, best[:, None])
            logits.append(low)
            ious.append(iou)
        out = torch.cat(logits)
        if output_size is not None and tuple(out.shape[-2:]) != tuple(output_size):
            out = F.interpolate(
                out, size=tuple(int(v) for v in output_size), mode="bilinear", align_corners=False
            )
        return {"logits": out, "iou_predictions": torch.cat(ious)}

    def training_inputs(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
        """``forward`` keyword arguments and the low-res target ``(N, 1, S/4, S/4)`` of a batch item."""
        target, hw = image_object_targets(item, self.low_res_size)
        return {"prompts": list(item["prompts"]), "original_size": hw}, target

    @torch.inference_mode()
    def predict(
        self,
        frames: Tensor | None,
        prompts: Sequence[ObjectPrompts] | ObjectPrompts,
        original_size: tuple[int, int],
        features: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Inference: logits ``(N, H, W)`` at the photograph's size (threshold 0 = SAM's)."""
        was_training = self.training
        self.eval()
        try:
            out = self.forward(frames, prompts, original_size, output_size=original_size, features=features)
        finally:
            self.train(was_training)
        return out["logits"][:, 0].float()


class Sam2ImageSegmenter(Sam2VolumeSegmenter):
    """SAM2 in image mode: `Sam2VolumeSegmenter` on a one-slice volume.

    The single prompted slice is a conditioning frame with an empty memory bank, so SAM2 adds
    ``no_mem_embed`` to its lowest-resolution features and runs the SAM heads, which is what
    ``SAM2ImagePredictor`` does. One difference remains: like SAM2's video path, this one blanks
    a mask whose object score says "absent", which the image predictor ignores; a prompted region
    is present, and `monai_sam.engines.mask_loss.MaskPredictionLoss` trains the score to say so.
    What this class adds: targets from the objects' masks on the
    low-resolution grid (``image_size / 4``) for the frozen-encoder trainer, a 2D `predict`, and
    memory kept in float32 (one slice: nothing to save).

    Args:
        model: a ``sam2`` ``SAM2Base`` (`monai_sam.networks.build_sam2_model`).
        encoder_batch_size: images per image-encoder call.
        autocast_dtype, multimask_fallback: see `Sam2VolumeSegmenter`.
    """

    def __init__(
        self,
        model: nn.Module,
        encoder_batch_size: int = 8,
        autocast_dtype: torch.dtype | None = None,
        multimask_fallback: bool | None = None,
    ):
        super().__init__(
            model,
            encoder_batch_size=encoder_batch_size,
            memory_dtype=None,
            autocast_dtype=autocast_dtype,
            multimask_fallback=multimask_fallback,
        )

    @property
    def low_res_size(self) -> int:
        """Side of SAM2's low-resolution masks (``image_size / 4``)."""
        return self.image_size // 4

    def training_inputs(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
        """``forward`` keyword arguments (logits on the low-resolution grid) and the matching target."""
        target, hw = image_object_targets(item, self.low_res_size)
        return {
            "prompts": list(item["prompts"]),
            "original_size": hw,
            "output_size": (self.low_res_size, self.low_res_size),
        }, target

    def predict(
        self,
        frames: Tensor | None,
        prompts: Sequence[ObjectPrompts] | ObjectPrompts,
        original_size: tuple[int, int],
        features: Mapping[str, Sequence[Tensor]] | None = None,
    ) -> Tensor:
        """Inference: logits ``(N, H, W)`` at the photograph's size."""
        logits = self.propagate(
            frames,
            _as_prompt_list(prompts),
            original_size=original_size,
            output_size=original_size,
            features=features,
        )
        return logits[:, 0].float()


def build_image_model(
    model_family: str,
    model_size: str,
    checkpoint: str | None = None,
    image_size: int = 1024,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build the SAM (``model_family="sam"``) or SAM2 (``"sam2"``) model of ``model_size``.

    The family is stated apart from the size so that a bundle's ``model_family`` switch cannot
    silently run the other recipe: a size of the other family is an error naming both.
    """
    from monai_sam.networks.builders import MODEL_SIZES, build_model, canonical_model_size

    family = str(model_family).strip().lower()
    if family not in ("sam", "sam2"):
        raise ValueError(f"model_family must be 'sam' or 'sam2', got {model_family!r}")
    name = canonical_model_size(model_size)
    if MODEL_SIZES[name].family != family:
        raise ValueError(
            f"model_size {name} is a {MODEL_SIZES[name].family} model but model_family is {family}; "
            f"sizes of {family}: {[k for k, v in MODEL_SIZES.items() if v.family == family]}"
        )
    return build_model(name, checkpoint, image_size=image_size, device=device)


def build_image_segmenter(
    model: nn.Module,
    encoder_batch_size: int = 4,
    multimask_output: bool = False,
    multimask_fallback: bool | None = None,
) -> SamImageSegmenter | Sam2ImageSegmenter:
    """The 2D segmenter for a built model: `SamImageSegmenter` for SAM v1, `Sam2ImageSegmenter` for SAM2.

    ``multimask_output`` applies to SAM v1 (SAM2 chooses by itself, as its predictors do);
    ``multimask_fallback`` to SAM2 (see `Sam2VolumeSegmenter`; SAM v1 has no such fallback).
    """
    if all(hasattr(model, a) for a in ("image_encoder", "prompt_encoder", "mask_decoder")):
        return SamImageSegmenter(
            model, encoder_batch_size=encoder_batch_size, multimask_output=multimask_output
        )
    if hasattr(model, "sam_mask_decoder"):
        return Sam2ImageSegmenter(
            model, encoder_batch_size=encoder_batch_size, multimask_fallback=multimask_fallback
        )
    raise TypeError(f"expected a segment_anything Sam or a sam2 SAM2Base, got {type(model).__name__}")
