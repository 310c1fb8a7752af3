"""Prompted 2D evaluation and inference (fundus photographs) on MONAI's SupervisedEvaluator, and its handlers.

`PromptedImageEvaluator` segments each photograph's prompted objects with a 2D network
(`monai_sam.networks.SamImageSegmenter` or `Sam2ImageSegmenter`), reading the frozen encoder's
features from the `FeatureCache` when one is given, and paints the objects into one label map
in the order of ``regions`` (nested regions: the optic disc first, then the cup over it, which
gives REFUGE's disjoint labels back). Its output has per-region channels ``pred`` / ``label``
``(1, R, H, W)`` for MONAI's metric handlers (``MeanDice``, ``MeanIoU``) and the label map under
``PRED_LABEL``. `DiscCupMetricsWriter` writes the per-case and summary tables (Dice, IoU, vCDR
error) and overlay PNGs; `LabelPngWriter` saves predictions as PNG label maps at the size of the
uncropped photograph.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import CommonKeys
from torch import Tensor, nn

from monai_sam.engines.evaluator import PRED_LABEL
from monai_sam.engines.feature_cache import FeatureCache
from monai_sam.engines.handlers import EpochMetricsWriter
from monai_sam.engines.trainer import encoder_features
from monai_sam.evaluation.optic_disc_cup import (
    format_disc_cup_table,
    save_fundus_overlay,
    score_disc_cup,
    summarize_disc_cup,
    write_disc_cup_csv,
)
from monai_sam.networks.sam_image import frames_from_image
from monai_sam.transforms.sam_input import IMAGENET_MEAN, IMAGENET_STD, SAM_ORIGINAL_SIZE_KEY

__all__ = [
    "DiscCupMetricsWriter",
    "LabelPngWriter",
    "PromptedImageEvaluator",
    "paint_regions",
    "photo_from_sam_input",
]

logger = logging.getLogger(__name__)


def paint_regions(masks: Tensor, object_ids: Sequence[int], shape: tuple[int, int]) -> Tensor:
    """A label map ``(H, W)`` with each object's mask painted with its id, later objects over earlier ones."""
    label = torch.zeros(shape, dtype=torch.uint8)
    for mask, object_id in zip(masks, object_ids, strict=True):
        label[mask.cpu()] = int(object_id)
    return label


def photo_from_sam_input(image: Tensor, size: tuple[int, int]) -> np.ndarray:
    """RGB ``(H, W, 3)`` in ``[0, 1]`` back from a `SamInput` image ``(3, S, S)`` (for overlays)."""
    img = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image).detach().float().cpu()
    img = img[..., 0] if img.ndim == 4 else img
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    img = (img * std + mean).clamp(0, 1)
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return img.permute(1, 2, 0).numpy()


def _name(item: Mapping[str, Any]) -> str:
    for key in (CommonKeys.LABEL, CommonKeys.IMAGE):
        meta = getattr(item.get(key), "meta", None) or {}
        name = meta.get("filename_or_obj")
        if name:
            return Path(str(name)).name.rsplit(".", 1)[0]
    return "case"


def _original_size(item: Mapping[str, Any]) -> tuple[int, int]:
    label = item.get(CommonKeys.LABEL)
    if label is not None:
        return int(label.shape[-2]), int(label.shape[-1])
    meta = getattr(item[CommonKeys.IMAGE], "meta", None) or {}
    if SAM_ORIGINAL_SIZE_KEY not in meta:
        raise ValueError(
            f"{_name(item)}: no label and no {SAM_ORIGINAL_SIZE_KEY!r} in the image metadata "
            "(run SamInputd on the image) to size the prediction"
        )
    h, w = meta[SAM_ORIGINAL_SIZE_KEY]
    return int(h), int(w)


class PromptedImageEvaluator(SupervisedEvaluator):
    """Segments the prompted regions of each photograph and scores them per region.

    Batch items (``collate_as_list``, one per batch) hold ``image`` ``(3, S, S)`` (`SamInputd`),
    ``prompts`` (one `ObjectPrompts` per region, in the photograph's pixel grid) and, when
    scoring, ``label`` ``(1, H, W)``.

    Args:
        regions: ``{object id: [label values]}`` in painting order, e.g. ``{1: [1, 2], 2: [2]}``
            (the optic disc, then the cup). Each object paints its own id, so an id must be one
            of its region's values.
        feature_cache: the frozen encoder's features (shared with training).
        threshold: logit threshold (0 = probability 0.5, SAM's).
        clip_nested: a region whose label values are a subset of an earlier region's (the cup
            inside the disc) keeps only the pixels inside that region's final prediction: the cup
            is part of the disc by definition, so cup pixels outside the predicted disc are
            dropped rather than made disc.
        largest_component: keep each object's largest connected component (a disc and a cup
            are one piece each; stray islands would inflate the vertical extents of the vCDR).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network: nn.Module,
        regions: Mapping[int, Sequence[int]],
        feature_cache: FeatureCache | None = None,
        threshold: float = 0.0,
        clip_nested: bool = True,
        largest_component: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(
            device=torch.device(device), val_data_loader=val_data_loader, network=network, **kwargs
        )
        self.regions = {int(k): [int(v) for v in vals] for k, vals in regions.items()}
        bad = [k for k, vals in self.regions.items() if k not in vals]
        if bad:
            raise ValueError(
                f"each region's id is the label value it paints; ids {bad} are not in their "
                f"regions {self.regions}"
            )
        self.feature_cache = feature_cache
        self.threshold = float(threshold)
        ids = list(self.regions)
        # (inner, outer) positions: inner's label values inside an earlier (outer) region's
        self.nested = [
            (i, next(j for j in range(i) if set(self.regions[ids[i]]) <= set(self.regions[ids[j]])))
            for i in range(len(ids))
            if clip_nested and any(set(self.regions[ids[i]]) <= set(self.regions[ids[j]]) for j in range(i))
        ]
        self.keep_largest = (
            KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False) if largest_component else None
        )

    def _region_channels(self, label_map: Tensor) -> Tensor:
        """``(1, R, H, W)`` float masks of the regions from a label map ``(H, W)``."""
        lab = label_map.long()
        return torch.stack([torch.isin(lab, torch.tensor(v)) for v in self.regions.values()])[None].float()

    def _iteration(self, engine, batchdata: list[dict]) -> dict[str, Any]:  # type: ignore[override]
        if len(batchdata) != 1:
            raise ValueError(f"evaluate one photograph per batch (batch_size 1), got {len(batchdata)}")
        item = batchdata[0]
        net = self.network
        net.eval()
        hw = _original_size(item)
        prompts = list(item["prompts"])
        by_id = {int(p.object_id): p for p in prompts}
        missing = [k for k in self.regions if k not in by_id]
        if missing:
            raise ValueError(f"{_name(item)}: no prompt for region(s) {missing} (prompted: {sorted(by_id)})")
        ordered = [by_id[k] for k in self.regions]
        frames = frames_from_image(item[CommonKeys.IMAGE])
        features = encoder_features(net, frames, self.state.device, self.feature_cache)
        logits = net.predict(None, ordered, original_size=hw, features=features).cpu()  # (R, H, W)
        masks = logits > self.threshold
        outer_of = dict(self.nested)
        for i in range(len(masks)):  # in order: an outer region is final before its inner one is clipped
            if i in outer_of:
                masks[i] &= masks[outer_of[i]]
            if self.keep_largest is not None:
                masks[i] = torch.as_tensor(self.keep_largest(masks[i][None].to(torch.uint8)))[0].bool()
        pred_label = paint_regions(masks, list(self.regions), hw)
        out: dict[str, Any] = {
            CommonKeys.IMAGE: item[CommonKeys.IMAGE],
            CommonKeys.PRED: self._region_channels(pred_label),
            PRED_LABEL: pred_label[None],
            "logits": logits,
            "case": _name(item),
            "roi": item.get("roi"),
            "roi_source_shape": item.get("roi_source_shape"),
        }
        label = item.get(CommonKeys.LABEL)
        if label is not None:
            label_map = torch.as_tensor(label.as_tensor() if hasattr(label, "as_tensor") else label)
            label_map = label_map.reshape(label_map.shape[-2:]).round().to(torch.uint8)
            out[CommonKeys.LABEL] = self._region_channels(label_map)
            out["label_map"] = label_map[None]
        engine.state.output = out
        return out


class DiscCupMetricsWriter(EpochMetricsWriter):
    """Per-case and summary tables (disc/cup Dice and IoU, vCDR error), overlay PNGs, a log table.

    Reads each iteration's ``PRED_LABEL`` and ``label_map`` (REFUGE labels, rows vertical). The
    summary's means also go to ``engine.state.metrics`` (``dice_disc``, ``dice_cup``,
    ``iou_disc``, ``iou_cup``, ``vcdr_mae``) for the logs and TensorBoard.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        prompt_source: str = "oracle",
        overlays: int = 3,
        prefix: str = "",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.prompt_source = prompt_source
        self.overlays = int(overlays)
        self.prefix = prefix
        self.scores: list = []
        self.summary: list[dict] = []

    def _reset(self, engine: Engine) -> None:
        self.scores = []

    def _score(self, engine: Engine) -> None:
        out = engine.state.output
        if "label_map" not in out:
            raise ValueError(f"{out.get('case')}: DiscCupMetricsWriter needs a reference label")
        case = str(out.get("case") or f"case_{len(self.scores)}")
        pred, truth = out[PRED_LABEL][0].numpy(), out["label_map"][0].numpy()
        self.scores.append(score_disc_cup(pred, truth, case=case, prompt_source=self.prompt_source))
        if len(self.scores) <= self.overlays:
            photo = photo_from_sam_input(out[CommonKeys.IMAGE], truth.shape)
            save_fundus_overlay(
                photo,
                truth,
                pred,
                self.output_dir / "overlays" / f"{self.prefix}{case}.png",
                title=f"{case} ({self.prompt_source} prompts)",
            )

    def _write(self, engine: Engine) -> None:
        if not self.scores:
            return
        self.summary = summarize_disc_cup(self.scores)
        write_disc_cup_csv(self.scores, self.summary, self.output_dir, self.prefix)
        row = self.summary[0]
        for key, name in (
            ("dice_disc", "dice_disc"),
            ("dice_cup", "dice_cup"),
            ("iou_disc", "iou_disc"),
            ("iou_cup", "iou_cup"),
            ("vcdr_abs_error", "vcdr_mae"),
        ):
            engine.state.metrics[name] = row[key]
        logger.info(
            "optic disc / cup over %d photograph(s):\n%s",
            len(self.scores),
            format_disc_cup_table(self.summary),
        )


#: grey levels of REFUGE's own masks for labels 0 (background), 1 (disc rim), 2 (cup)
_REFUGE_GREY = np.array([255, 128, 0], dtype=np.uint8)


class LabelPngWriter:
    """Saves each prediction as a PNG label map at the size of the uncropped photograph.

    Args:
        output_dir: where ``<case>_<postfix>.png`` files go (written atomically).
        postfix: file-name postfix (say ``seg_oracle_prompts`` when prompts came from labels).
        encoding: ``"labels"`` (0 background, 1 disc rim, 2 cup) or ``"refuge"`` (REFUGE's grey
            levels: 255 background, 128 rim, 0 cup).
        overlays: also write ``<case>_overlay.png`` (prediction contours on the photograph).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        postfix: str = "seg",
        encoding: str = "labels",
        overlays: bool = True,
    ) -> None:
        if encoding not in ("labels", "refuge"):
            raise ValueError(f"encoding must be 'labels' or 'refuge', got {encoding!r}")
        self.output_dir, self.postfix, self.encoding, self.overlays = (
            Path(output_dir),
            postfix,
            encoding,
            overlays,
        )
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from PIL import Image

        out = engine.state.output
        pred = out[PRED_LABEL][0].numpy().astype(np.uint8)
        full = pred
        roi, shape = out.get("roi"), out.get("roi_source_shape")
        if roi is not None and shape is not None:  # paste the crop back into the whole photograph
            r0, c0, r1, c1 = (int(v) for v in roi)
            full = np.zeros([int(v) for v in shape], dtype=np.uint8)
            full[r0:r1, c0:c1] = pred
        if self.encoding == "refuge":
            full = _REFUGE_GREY[full]
        case = str(out.get("case") or "case")
        path = self.output_dir / f"{case}_{self.postfix}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
        os.close(fd)
        try:
            Image.fromarray(full).save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.written.append(path)
        if self.overlays:
            photo = photo_from_sam_input(out[CommonKeys.IMAGE], pred.shape)
            truth = out["label_map"][0].numpy() if "label_map" in out else None
            save_fundus_overlay(photo, truth, pred, self.output_dir / f"{case}_overlay.png", title=case)
        logger.info("wrote %s", path)
