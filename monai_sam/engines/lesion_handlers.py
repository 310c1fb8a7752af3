"""Evaluation of tumour bundles: one memory-network object per lesion, scored per class and per lesion.

`LesionVolumeEvaluator` runs the memory network over a volume whose prompts name one object
per lesion (object ids ``>= first_lesion_id``, see `monai_sam.transforms.lesions`) and hands
the handlers *class* maps (lesion objects merged back into the tumour class), so the organ
table (`ClassMetricsWriter`) and MONAI's ``MeanDice`` read it like any other bundle's output.
`LesionMetricsWriter` then judges the tumour class lesion by lesion
(`monai_sam.evaluation.lesions.match_lesions`): detection, false positives per case,
lesion-wise Dice and results by lesion size, as a per-lesion CSV, a per-case CSV and a
summary table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.networks.utils import one_hot
from monai.utils import CommonKeys

from monai_sam.engines.evaluator import PRED_LABEL, PromptedVolumeEvaluator
from monai_sam.engines.handlers import EpochMetricsWriter
from monai_sam.engines.trainer import encoder_features, plain_tensor
from monai_sam.evaluation.lesions import (
    SIZE_BINS,
    CaseLesionSummary,
    LesionRow,
    match_lesions,
    summarize_lesions,
    write_lesion_cases_csv,
    write_lesion_summary_csv,
    write_lesions_csv,
)
from monai_sam.inferers.memory_propagation import propagate_to_label
from monai_sam.networks.sam2_volume import frames_from_sam_input
from monai_sam.transforms.lesions import FIRST_LESION_ID, merge_lesions

__all__ = ["LesionMetricsWriter", "LesionVolumeEvaluator", "OBJECT_LABEL", "PROMPT_SOURCE"]

logger = logging.getLogger(__name__)

OBJECT_LABEL = "pred_objects"  # the predicted object map (one id per lesion), beside the class map
PROMPT_SOURCE = "prompt_source"  # where an iteration's prompts came from: "oracle", "user", "auto"


class LesionVolumeEvaluator(PromptedVolumeEvaluator):
    """`PromptedVolumeEvaluator` for object maps with one object per lesion.

    Batch items hold ``image`` ``(3, S, S, T)`` (`SamInputd`), ``label`` ``(1, H, W, T)``: the
    object map of `LesionInstancesd` (organs with their class id, lesion ``k`` with
    ``first_lesion_id + k - 1``), and ``prompts`` in that grid, one `ObjectPrompts` per object.
    The predicted object map (each voxel to the most confident object, as in
    `logits_to_label`) is kept under `OBJECT_LABEL`; ``pred`` / ``label`` (one-hot over
    ``num_classes``), `PRED_LABEL` and ``label_map`` are class maps, lesions merged into
    ``lesion_label``.

    Args:
        lesion_label: the tumour class every lesion object is merged into.
        first_lesion_id: object ids from this one up are lesions.
        prompt_source: written to every output (`PROMPT_SOURCE`): "oracle" for prompts drawn
            from the reference labels, "user" for prompt files, "auto" for a prompt-free head's
            (`monai_sam.inferers.AutoPromptd` in the preprocessing); reported apart, never mixed.
            An item with no prompt at all (the head found nothing) gets an empty prediction.
        Other arguments are `PromptedVolumeEvaluator`'s.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network,
        num_classes: int,
        lesion_label: int = 2,
        first_lesion_id: int = FIRST_LESION_ID,
        prompt_source: str = "oracle",
        **kwargs: Any,
    ) -> None:
        super().__init__(device, val_data_loader, network, num_classes, **kwargs)
        if not 0 < int(lesion_label) < self.num_classes:
            raise ValueError(f"lesion_label {lesion_label} is not a class of num_classes={self.num_classes}")
        self.lesion_label = int(lesion_label)
        self.first_lesion_id = int(first_lesion_id)
        self.prompt_source = str(prompt_source)

    def _iteration(self, engine, batchdata: list[dict]) -> dict[str, Any]:  # type: ignore[override]
        if len(batchdata) != 1:
            raise ValueError(f"evaluate one volume per batch (batch_size 1), got {len(batchdata)}")
        item = batchdata[0]
        seg = self.network
        seg.eval()
        image, label = item[CommonKeys.IMAGE], item[CommonKeys.LABEL]
        prompts = list(item["prompts"])
        hw = tuple(int(v) for v in label.shape[-3:-1])
        num_slices = int(label.shape[-1])
        if prompts:
            frames = frames_from_sam_input(plain_tensor(image))
            features = None
            if self.feature_cache is not None:
                features = encoder_features(seg, frames, self.state.device, self.feature_cache)
            objects = propagate_to_label(seg, None if features is not None else frames, prompts, self.threshold,
                                         torch.float32, features=features, original_size=hw, output_size=hw)
        else:  # nothing to segment (the automatic mode found nothing): an empty prediction
            objects = torch.zeros((*hw, num_slices))
        objects = objects[None].to(label.device)  # (1, H, W, T)
        pred = merge_lesions(objects, self.lesion_label, self.first_lesion_id)
        truth = merge_lesions(label, self.lesion_label, self.first_lesion_id)  # keeps the MetaTensor's meta
        too_big = int(torch.as_tensor(truth).max()) if truth.numel() else 0
        if too_big >= self.num_classes:
            raise ValueError(
                f"{_case(label)}: label value {too_big} is not below num_classes={self.num_classes}; "
                "map the dataset's labels to the bundle's classes (label_mapping) first"
            )
        engine.state.output = {
            CommonKeys.IMAGE: image,
            CommonKeys.LABEL: one_hot(torch.as_tensor(truth)[None].long(), self.num_classes),
            CommonKeys.PRED: one_hot(pred[None].long(), self.num_classes),
            PRED_LABEL: pred,
            OBJECT_LABEL: objects,
            "label_map": truth,
            "prompts": prompts,
            PROMPT_SOURCE: self.prompt_source,
            "meta": getattr(label, "meta", {}),
        }
        return engine.state.output


class LesionMetricsWriter(EpochMetricsWriter):
    """Lesion-level metrics of the tumour class: per-lesion CSV, per-case CSV, summary, log table.

    Reads each iteration's class maps (`PRED_LABEL` and ``label_map``, at the volume's own
    spacing) and matches the connected components of ``lesion_label`` with
    `monai_sam.evaluation.lesions.match_lesions` (detection by IoU >= ``threshold`` by
    default, splits and merges shared, false positives = predicted components touching no
    detected lesion). Writes, at the end of each epoch (atomically):

    - ``<prefix>lesions.csv``: one row per true lesion (diameter, size bin, detected, Dice);
    - ``<prefix>lesion_cases.csv``: one row per case (TP, FN, FP, sensitivity, voxel Dice);
    - ``<prefix>lesion_summary.csv``: all lesions and each size bin (<10, 10-20, >20 mm).

    The "all" row also goes to ``engine.state.metrics`` as ``lesion_sensitivity``,
    ``lesion_fp_per_case``, ``lesion_dice`` and ``tumor_voxel_dice`` (for MONAI's stats
    handlers, which must be attached after this one to show them). Under DDP attach it on every
    rank: the cases of all ranks are gathered, rank 0 writes.

    Args:
        output_dir: where the tables go.
        lesion_label: the tumour class in the class maps.
        prompt_source: the default source when the output does not say (`PROMPT_SOURCE`).
        criterion, threshold, fp_overlap, connectivity: see `match_lesions`.
        min_lesion_volume_mm3: true and predicted components under this volume are ignored
            (annotation specks; 0 counts every voxel).
        prefix: file name prefix (e.g. ``"auto_"``).
    """

    def __init__(
        self,
        output_dir: str | Path,
        lesion_label: int = 2,
        prompt_source: str = "oracle",
        criterion: str = "iou",
        threshold: float = 0.1,
        fp_overlap: float = 0.0,
        connectivity: int = 3,
        min_lesion_volume_mm3: float = 0.0,
        prefix: str = "",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.lesion_label = int(lesion_label)
        self.prompt_source = str(prompt_source)
        self.match_args = dict(
            criterion=criterion, threshold=float(threshold), fp_overlap=float(fp_overlap),
            connectivity=int(connectivity), min_true_volume_mm3=float(min_lesion_volume_mm3),
            min_pred_volume_mm3=float(min_lesion_volume_mm3),
        )  # fmt: skip
        self.prefix = prefix
        self.rows: list[LesionRow] = []
        self.cases: list[CaseLesionSummary] = []
        self.summary: list[dict] = []

    def _reset(self, engine: Engine) -> None:
        self.rows, self.cases = [], []

    def _score(self, engine: Engine) -> None:
        out = engine.state.output
        truth = out["label_map"]
        affine = getattr(truth, "affine", None)
        spacing = _spacing(affine)
        pred = np.asarray(out[PRED_LABEL].detach().cpu())
        lab = np.asarray(truth.detach().cpu() if hasattr(truth, "detach") else truth)
        m = match_lesions(
            pred, lab, spacing, label=self.lesion_label, affine=affine, case=_case(truth, len(self.cases)),
            prompt_source=str(out.get(PROMPT_SOURCE, self.prompt_source)), **self.match_args,
        )  # fmt: skip
        self.rows += m.rows
        self.cases.append(m.summary)

    def _write(self, engine: Engine) -> None:
        # under DDP every rank matched its own share of the cases: all ranks get every case's
        # rows (the logged metrics agree), rank 0 writes the tables
        self.rows, self.cases = _gather_across_ranks((self.rows, self.cases))
        if not self.cases:
            return
        self.summary = summarize_lesions(self.rows, self.cases)
        overall = [r for r in self.summary if r["size_bin"] == "all"]
        if len(overall) == 1:
            row = overall[0]
            engine.state.metrics.update(
                lesion_sensitivity=row["sensitivity"], lesion_fp_per_case=row["fp_per_case"],
                lesion_dice=row["lesion_dice"], tumor_voxel_dice=row["voxel_dice"],
            )  # fmt: skip
        if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
            return
        write_lesions_csv(self.rows, self.output_dir / f"{self.prefix}lesions.csv")
        write_lesion_cases_csv(self.cases, self.output_dir / f"{self.prefix}lesion_cases.csv")
        write_lesion_summary_csv(self.summary, self.output_dir / f"{self.prefix}lesion_summary.csv")
        logger.info("lesion-level metrics over %d case(s):\n%s", len(self.cases), lesion_table(self.summary))


def lesion_table(summary: Sequence[dict]) -> str:
    """The summary of `summarize_lesions` as a fixed-width text table (for logs)."""
    lines = [f"{'size':<10}{'lesions':>8}{'found':>7}{'sens.':>8}{'les. Dice':>10}{'FP/case':>9}  prompts"]
    order = {b: i for i, b in enumerate(("all", *SIZE_BINS))}
    for r in sorted(summary, key=lambda r: (r["prompt_source"], order.get(r["size_bin"], 9))):
        lines.append(
            f"{r['size_bin']:<10}{r['lesions']:>8}{r['detected']:>7}{_fmt(r['sensitivity'])}"
            f"{_fmt(r['lesion_dice'], 10)}{_fmt(r['fp_per_case'], 9)}  {r['prompt_source']}"
        )
    return "\n".join(lines)


def _fmt(v: float, width: int = 8) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'n/a':>{width}}"
    return f"{v:>{width}.3f}"


def _gather_across_ranks(part: tuple[list, list]) -> tuple[list, list]:
    """``(rows, cases)`` of every rank, rank by rank (one rank, or no DDP: as given)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return part
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, part)
    return [r for rows, _ in gathered for r in rows], [c for _, cases in gathered for c in cases]


def _spacing(affine: Any) -> list[float]:
    if affine is None:
        return [1.0, 1.0, 1.0]
    a = np.asarray(torch.as_tensor(affine).cpu(), dtype=float)[:3, :3]
    return [float(v) for v in np.sqrt((a**2).sum(axis=0))]


def _case(t: Any, index: int = 0) -> str:
    meta = getattr(t, "meta", {}) or {}
    name = meta.get("filename_or_obj")
    return Path(str(name)).name.split(".nii")[0] if name else f"case_{index}"
