"""Per-class, per-case metrics on 3D label volumes at their physical spacing.

Honest by construction: computed on whole volumes (not slices) in millimetres; a class absent
from both prediction and truth is excluded (NaN, skipped by the means), never scored 1; a
class present on one side only scores Dice 0 and HD95 = the volume's diagonal in mm (the
worst distance the image allows), so a missed organ is never "free". MONAI's metric functions
do the computing.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

__all__ = ["ClassScore", "nanmean", "score_case", "summarize", "write_csv", "write_scores_csv", "write_summary_csv"]


@dataclass
class ClassScore:
    case: str
    label: int
    name: str
    dice: float
    hd95_mm: float
    surface_dice: float
    truth_voxels: int
    pred_voxels: int
    prompt_source: str = ""  # "oracle", "user", "auto": reported apart, never mixed


def score_case(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    label_names: Mapping[int, str],
    case: str = "",
    surface_tolerance_mm: float = 2.0,
    prompt_source: str = "",
) -> list[ClassScore]:
    """Dice, HD95 (mm) and surface Dice (at ``surface_tolerance_mm``) for each non-zero label.

    Args:
        pred, truth: integer label volumes of identical shape ``(X, Y, Z)`` (a leading channel
            of size 1 is accepted).
        spacing: voxel size in mm, one per spatial axis.
        label_names: the labels to score (0 / background is skipped).
    """
    p = torch.as_tensor(np.asarray(pred)).squeeze()
    t = torch.as_tensor(np.asarray(truth)).squeeze()
    if p.shape != t.shape:
        raise ValueError(f"case {case!r}: prediction shape {tuple(p.shape)} != truth shape {tuple(t.shape)}")
    if len(spacing) != p.ndim:
        raise ValueError(f"case {case!r}: {len(spacing)} spacing values for a {p.ndim}D volume")
    spacing = [float(s) for s in spacing]
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape, spacing)))
    scores = []
    for label, name in sorted(label_names.items()):
        if int(label) == 0:
            continue
        pm = (p == int(label))[None, None].float()
        tm = (t == int(label))[None, None].float()
        n_pred, n_true = int(pm.sum()), int(tm.sum())
        if n_pred == 0 and n_true == 0:
            dice = hd95 = sdice = float("nan")
        elif n_pred == 0 or n_true == 0:
            dice, hd95, sdice = 0.0, diagonal, 0.0
        else:
            # include_background=True: our single channel *is* the class
            dice = float(compute_dice(pm, tm, include_background=True)[0, 0])
            hd95 = float(
                compute_hausdorff_distance(pm, tm, include_background=True, percentile=95, spacing=spacing)[0, 0]
            )
            sdice = float(
                compute_surface_dice(
                    pm, tm, class_thresholds=[surface_tolerance_mm], include_background=True, spacing=spacing
                )[0, 0]
            )
        scores.append(ClassScore(case, int(label), str(name), dice, hd95, sdice, n_true, n_pred, prompt_source))
    return scores


def summarize(scores: Sequence[ClassScore]) -> list[dict]:
    """Mean (and count) per prompt source and class over cases, then the mean over classes."""
    rows = []
    for source in sorted({s.prompt_source for s in scores}):
        sub = [s for s in scores if s.prompt_source == source]
        class_rows = []
        for label in sorted({s.label for s in sub}):
            cls = [s for s in sub if s.label == label]
            class_rows.append(
                {
                    "prompt_source": source,
                    "label": label,
                    "name": cls[0].name,
                    "cases": sum(not math.isnan(s.dice) for s in cls),
                    "dice": nanmean([s.dice for s in cls]),
                    "hd95_mm": nanmean([s.hd95_mm for s in cls]),
                    "surface_dice": nanmean([s.surface_dice for s in cls]),
                }
            )
        rows += class_rows
        rows.append(
            {
                "prompt_source": source,
                "label": "mean",
                "name": "mean over classes",
                "cases": len({s.case for s in sub}),
                "dice": nanmean([r["dice"] for r in class_rows]),
                "hd95_mm": nanmean([r["hd95_mm"] for r in class_rows]),
                "surface_dice": nanmean([r["surface_dice"] for r in class_rows]),
            }
        )
    return rows


def write_scores_csv(scores: Sequence[ClassScore], path: str | os.PathLike) -> Path:
    """One row per case and class (atomic write)."""
    fields = list(ClassScore.__dataclass_fields__)
    return write_csv(path, fields, [asdict(s) for s in scores])


def write_summary_csv(summary: Sequence[Mapping], path: str | os.PathLike) -> Path:
    fields = ["prompt_source", "label", "name", "cases", "dice", "hd95_mm", "surface_dice"]
    return write_csv(path, fields, summary)


def nanmean(values: Sequence[float]) -> float:
    """Mean of the defined values (NaN marks 'excluded', e.g. a class absent on both sides)."""
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def write_csv(path: str | os.PathLike, fields: Sequence[str], rows: Sequence[Mapping]) -> Path:
    """Write rows atomically (temp file + rename): a crash never leaves half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
