"""Ignite handlers the bundles need beyond MONAI's: resume, per-class tables and pictures."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from monai_sam.engines.checkpoint import latest_checkpoint
from monai_sam.engines.evaluator import PRED_LABEL
from monai_sam.evaluation.metrics import score_case, summarize, write_scores_csv, write_summary_csv
from monai_sam.evaluation.overlays import save_overlay

__all__ = ["ResumeFromLatest", "EpochMetricsWriter", "ClassMetricsWriter"]

logger = logging.getLogger(__name__)


class ResumeFromLatest:
    """On start, load the newest checkpoint in ``directory`` if there is one (else start fresh).

    Rerunning the same training command after a crash continues from the last saved epoch
    (model, optimizer, scheduler, epoch) instead of starting over.
    """

    def __init__(self, directory: str | Path, load_dict: Mapping[str, Any], pattern: str = "checkpoint_*.pt",
                 enabled: bool = True) -> None:
        self.directory, self.load_dict, self.pattern, self.enabled = Path(directory), dict(load_dict), pattern, enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.directory, self.pattern)
        if path is None:
            logger.info("no checkpoint in %s: training starts from epoch 0", self.directory)
            return
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location="cpu")(engine)
        logger.info("resumed from %s at epoch %d", path, engine.state.epoch)


class EpochMetricsWriter:
    """The metric writers' life cycle: reset when an epoch starts, score each iteration's case,
    write the tables when the epoch completes (subclasses give the three steps)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        raise NotImplementedError

    def _score(self, engine: Engine) -> None:
        raise NotImplementedError

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError


class ClassMetricsWriter(EpochMetricsWriter):
    """Per-case, per-class Dice / HD95 (mm) / surface Dice as CSV, a summary, overlays, a log table.

    Reads each iteration's integer prediction (``PRED_LABEL``) and truth at the volume's own
    spacing, so the numbers are 3D and in millimetres.
    """

    def __init__(
        self,
        output_dir: str | Path,
        label_names: Mapping[int, str],
        prompt_source: str = "oracle",
        overlays: int = 3,
        window: tuple[float, float] | None = None,
        prefix: str = "",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.label_names = {int(k): str(v) for k, v in label_names.items()}
        self.prompt_source = prompt_source
        self.overlays = int(overlays)
        self.window = tuple(window) if window else None
        self.prefix = prefix
        self.scores: list = []
        self.summary: list[dict] = []

    def _reset(self, engine: Engine) -> None:
        self.scores = []

    def _score(self, engine: Engine) -> None:
        out = engine.state.output
        truth = out["label_map"]
        meta = getattr(truth, "meta", {}) or {}
        spacing = _spacing(truth)
        case = Path(str(meta.get("filename_or_obj", f"case_{len(self.scores)}"))).name.split(".nii")[0]
        pred = np.asarray(out[PRED_LABEL].detach().cpu())[0]
        lab = np.asarray(truth.detach().cpu() if hasattr(truth, "detach") else truth)[0]
        self.scores += score_case(pred, lab, spacing, self.label_names, case=case, prompt_source=self.prompt_source)
        done = len({s.case for s in self.scores})
        if done <= self.overlays and _is_rank_zero():
            image = out.get("overlay_image")
            if image is None:
                image = np.asarray(out["image"])[0]  # SAM input channel 0, resized to S x S
                image = _resize_like(image, lab.shape)
            save_overlay(np.asarray(image), lab, pred, self.output_dir / "overlays" / f"{self.prefix}{case}.png",
                         self.label_names, title=f"{case} ({_source_words(self.prompt_source)})", window=self.window)

    def _write(self, engine: Engine) -> None:
        self.scores = _gather_across_ranks(self.scores)
        if not self.scores or not _is_rank_zero():
            return
        self.summary = summarize(self.scores)
        write_scores_csv(self.scores, self.output_dir / f"{self.prefix}metrics_per_case.csv")
        write_summary_csv(self.summary, self.output_dir / f"{self.prefix}metrics_summary.csv")
        lines = [f"{'organ':<24}{'Dice':>8}{'HD95 mm':>10}{'sDice':>8}  ({_source_words(self.prompt_source)})"]
        for row in self.summary:
            lines.append(f"{row['name']:<24}{_fmt(row['dice'])}{_fmt(row['hd95_mm'], 10)}{_fmt(row['surface_dice'])}")
        logger.info("per-class metrics over %d case(s):\n%s", len({s.case for s in self.scores}), "\n".join(lines))


def _source_words(prompt_source: str) -> str:
    """How a table or picture says where the prompts came from (prompt-free heads have none)."""
    return "no prompts" if prompt_source in ("none", "", None) else f"{prompt_source} prompts"


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _gather_across_ranks(rows: list) -> list:
    """Every rank's per-case rows (each rank validates its own share of the cases under DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def _fmt(v: float, width: int = 8) -> str:
    return f"{'n/a':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{width}.3f}"


def _spacing(t: Any) -> list[float]:
    affine = getattr(t, "affine", None)
    if affine is None:
        return [1.0, 1.0, 1.0]
    a = np.asarray(affine, dtype=float)[:3, :3]
    return [float(v) for v in np.sqrt((a**2).sum(axis=0))]


def _resize_like(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if image.shape == tuple(shape):
        return image
    from scipy.ndimage import zoom

    return zoom(image, [t / s for t, s in zip(shape, image.shape)], order=1)
