"""Optic disc and cup scores of a fundus photograph: Dice, IoU and the vertical cup-to-disc ratio error.

The vertical cup-to-disc ratio (vCDR, `monai_sam.data.fundus.vertical_cup_to_disc_ratio`) is
the number glaucoma screening reads off a segmentation; REFUGE ranks methods by its mean
absolute error beside the disc and cup Dice. Label maps follow the REFUGE convention of the
project (disjoint classes: 1 disc rim, 2 cup): the disc is labels {1, 2}, the cup label 2.

Honest by construction, as `monai_sam.evaluation.metrics`: a structure absent from both truth
and prediction is excluded (NaN, skipped by the means), never scored 1; one present on a single
side scores 0. When the prediction has no disc its vCDR cannot be measured: the error is NaN and
the case is counted in ``vcdr_failures`` of the summary, so a missed disc is never hidden.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou

from monai_sam.data.fundus import vertical_cup_to_disc_ratio
from monai_sam.evaluation.metrics import nanmean, write_csv

__all__ = [
    "DISC_LABELS",
    "CUP_LABELS",
    "DiscCupScore",
    "format_disc_cup_table",
    "save_fundus_overlay",
    "score_disc_cup",
    "summarize_disc_cup",
    "write_disc_cup_csv",
]

DISC_LABELS: tuple[int, ...] = (1, 2)
CUP_LABELS: tuple[int, ...] = (2,)


@dataclass
class DiscCupScore:
    case: str
    dice_disc: float
    iou_disc: float
    dice_cup: float
    iou_cup: float
    vcdr_true: float
    vcdr_pred: float
    vcdr_abs_error: float
    disc_pixels_true: int
    disc_pixels_pred: int
    cup_pixels_true: int
    cup_pixels_pred: int
    prompt_source: str = ""  # "oracle", "user": reported apart, never mixed


def _as_2d(x, what: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(
            f"{what} must be a 2D label map (H, W) (singleton axes allowed), got shape {np.shape(x)}"
        )
    return np.rint(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.int64)


def _overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two boolean masks with the exclusion rules of the module."""
    n_pred, n_true = int(pred.sum()), int(truth.sum())
    if n_pred == 0 and n_true == 0:
        return float("nan"), float("nan")
    if n_pred == 0 or n_true == 0:
        return 0.0, 0.0
    p = torch.from_numpy(pred)[None, None].float()
    t = torch.from_numpy(truth)[None, None].float()
    return float(compute_dice(p, t, include_background=True)[0, 0]), float(compute_iou(p, t)[0, 0])


def score_disc_cup(
    pred,
    truth,
    case: str = "",
    prompt_source: str = "",
    vertical_axis: int = 0,
) -> DiscCupScore:
    """Disc and cup Dice / IoU and the vCDR error of one photograph.

    Args:
        pred, truth: label maps ``(H, W)`` (``(1, H, W)`` accepted) with values 0, 1 (disc rim),
            2 (cup), of the same shape.
        case: the case name for the tables.
        prompt_source: where the prompts came from (``"oracle"``: drawn from ``truth``).
        vertical_axis: the image's vertical axis in the maps (0 when rows are vertical, which is
            how the fundus bundle loads PNGs; see `vertical_cup_to_disc_ratio`).
    """
    p, t = _as_2d(pred, f"case {case!r}: prediction"), _as_2d(truth, f"case {case!r}: truth")
    if p.shape != t.shape:
        raise ValueError(f"case {case!r}: prediction shape {p.shape} != truth shape {t.shape}")
    disc_p, disc_t = np.isin(p, DISC_LABELS), np.isin(t, DISC_LABELS)
    cup_p, cup_t = np.isin(p, CUP_LABELS), np.isin(t, CUP_LABELS)
    dice_disc, iou_disc = _overlap(disc_p, disc_t)
    dice_cup, iou_cup = _overlap(cup_p, cup_t)
    vt = vertical_cup_to_disc_ratio(t, vertical_axis=vertical_axis)
    vp = vertical_cup_to_disc_ratio(p, vertical_axis=vertical_axis)
    err = abs(vp - vt) if not (math.isnan(vp) or math.isnan(vt)) else float("nan")
    return DiscCupScore(
        case,
        dice_disc,
        iou_disc,
        dice_cup,
        iou_cup,
        vt,
        vp,
        err,
        int(disc_t.sum()),
        int(disc_p.sum()),
        int(cup_t.sum()),
        int(cup_p.sum()),
        prompt_source,
    )


_MEANS = ("dice_disc", "iou_disc", "dice_cup", "iou_cup", "vcdr_abs_error")


def summarize_disc_cup(scores: Sequence[DiscCupScore]) -> list[dict]:
    """One row per prompt source: the means (and standard deviations) over cases.

    ``vcdr_failures`` counts cases with a reference disc but no predicted disc (no vCDR to compare).
    """
    rows = []
    for source in sorted({s.prompt_source for s in scores}):
        sub = [s for s in scores if s.prompt_source == source]
        row: dict = {"prompt_source": source, "cases": len(sub)}
        for name in _MEANS:
            values = [getattr(s, name) for s in sub]
            defined = [v for v in values if not math.isnan(v)]
            row[name] = nanmean(values)
            row[f"{name}_std"] = float(np.std(defined)) if defined else float("nan")
        row["vcdr_failures"] = sum(math.isnan(s.vcdr_pred) and not math.isnan(s.vcdr_true) for s in sub)
        rows.append(row)
    return rows


def write_disc_cup_csv(
    scores: Sequence[DiscCupScore], summary: Sequence[dict], output_dir: str | os.PathLike, prefix: str = ""
) -> tuple[Path, Path]:
    """``<prefix>metrics_per_case.csv`` and ``<prefix>metrics_summary.csv`` (atomic writes)."""
    out = Path(output_dir)
    per_case = write_csv(
        out / f"{prefix}metrics_per_case.csv",
        list(DiscCupScore.__dataclass_fields__),
        [asdict(s) for s in scores],
    )
    fields = ["prompt_source", "cases"] + [f for n in _MEANS for f in (n, f"{n}_std")] + ["vcdr_failures"]
    return per_case, write_csv(out / f"{prefix}metrics_summary.csv", fields, summary)


def _fmt(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"


def format_disc_cup_table(summary: Sequence[dict]) -> str:
    """The evaluation table as text (what the logs show)."""
    lines = [
        f"{'prompts':<10}{'cases':>6}{'Dice disc':>11}{'IoU disc':>10}{'Dice cup':>10}{'IoU cup':>9}"
        f"{'vCDR MAE':>10}{'vCDR n/a':>10}"
    ]
    for r in summary:
        lines.append(
            f"{r['prompt_source']:<10}{r['cases']:>6}{_fmt(r['dice_disc']):>11}{_fmt(r['iou_disc']):>10}"
            f"{_fmt(r['dice_cup']):>10}{_fmt(r['iou_cup']):>9}{_fmt(r['vcdr_abs_error']):>10}{r['vcdr_failures']:>10}"
        )
    return "\n".join(lines)


def save_fundus_overlay(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """A PNG of the photograph with disc and cup contours: reference solid, prediction dashed.

    Args:
        image: RGB ``(H, W, 3)`` in ``[0, 1]`` (float) or ``[0, 255]`` (uint8), rows vertical.
        truth: reference label map ``(H, W)`` (0/1/2), or None at inference.
        pred: predicted label map ``(H, W)``.
        title: put above the picture with the vCDRs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else np.clip(img.astype(np.float32), 0, 1)
    p = _as_2d(pred, "prediction")
    t = None if truth is None else _as_2d(truth, "truth")
    fig, ax = plt.subplots(figsize=(5, 5.3))
    ax.imshow(img)
    text = []
    for labels, name, color in ((DISC_LABELS, "optic disc", "#00e5ff"), (CUP_LABELS, "optic cup", "#ffee00")):
        if t is not None and np.isin(t, labels).any():
            ax.contour(np.isin(t, labels), levels=[0.5], colors=[color], linewidths=1.6)
        if np.isin(p, labels).any():
            ax.contour(np.isin(p, labels), levels=[0.5], colors=[color], linewidths=1.4, linestyles="--")
        ax.plot([], [], color=color, label=name)
    vp = vertical_cup_to_disc_ratio(p)
    text.append(f"vCDR pred {_fmt(vp)}")
    if t is not None:
        text.insert(0, f"vCDR ref {_fmt(vertical_cup_to_disc_ratio(t))}")
    ax.legend(loc="lower left", fontsize=7, framealpha=0.6)
    ax.axis("off")
    ax.set_title(
        ((title + "\n") if title else "") + ", ".join(text) + "  (reference solid, prediction dashed)",
        fontsize=8,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
