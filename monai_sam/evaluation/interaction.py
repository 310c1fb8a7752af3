"""Interactive 3D segmentation judged as users judge it: one box, then corrective clicks.

The protocol is the CVPR 2025 challenge's ("Foundation Models for Interactive 3D Biomedical
Image Segmentation", its ``CVPR25_iter_eval.py``), applied per object:

- interaction 0: one box on the object's middle axial slice (the middle of its slice range, or
  the nearest slice showing it; ``box_slice="largest"``: the slice where it is largest);
- interactions 1..5: one click each, at the centre of the largest error region: the largest
  26-connected component of ``prediction XOR truth``, on that component's slice with the most
  voxels, at the pixel farthest from the component's edge there; positive where the object was
  missed, negative where the prediction is false. No error: no click, the scores stand.

After each interaction the volume is segmented again from every prompt so far (a model keeps
its encoder features: only the propagation runs again). Scored per object after each
interaction: Dice and NSD (normalised surface Dice at 2 mm); DSC AUC and NSD AUC are the
trapezoidal areas under the scores of the click interactions at unit spacing (so at most
``num_clicks - 1``), as the challenge computes them (its box is optional and not counted);
final Dice and NSD are those after the last interaction. Unlike the challenge, NSD is computed
for every mask (the challenge scores 0 when Dice <= 0.2, to save time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice
from scipy.ndimage import label

from monai_sam.evaluation.metrics import nanmean, write_csv
from monai_sam.evaluation.overlays import save_figure
from monai_sam.prompts import ObjectPrompts, SlicePrompt
from monai_sam.transforms.prompts import box_from_mask, central_pixel

__all__ = [
    "Click",
    "InteractionCase",
    "InteractionStep",
    "Sam2InteractiveSession",
    "box_prompt",
    "interaction_auc",
    "interaction_prompts",
    "load_interaction_case",
    "mask_scores",
    "next_click",
    "mean_curves",
    "plot_interaction_curves",
    "run_interaction_benchmark",
    "simulate_interactions",
    "summarize_interactions",
    "write_interaction_csvs",
]

logger = logging.getLogger(__name__)

#: ``segment(prompts) -> (H, W, T) bool``: one object's mask in the volume from all its prompts
Segment = Callable[[ObjectPrompts], np.ndarray]


@dataclass(frozen=True)
class Click:
    """A simulated user click on axial slice ``slice_index`` at column ``x``, row ``y``."""

    slice_index: int
    x: int
    y: int
    positive: bool


@dataclass
class InteractionStep:
    """One object's scores after one interaction (0: the box; 1..: corrective clicks)."""

    method: str
    case: str
    object_id: int
    name: str
    interaction: int
    prompt: str  # "box", "positive click", "negative click" or "none" (no error left)
    slice_index: int
    x: float
    y: float
    dice: float
    nsd: float
    seconds: float


def _object_slices(truth: np.ndarray) -> np.ndarray:
    return np.flatnonzero(truth.any(axis=(0, 1)))


def box_prompt(truth: np.ndarray, where: Literal["middle", "largest"] = "middle") -> SlicePrompt:
    """The initial box: the object's extent on its middle (or largest) axial slice."""
    on = _object_slices(truth)
    if on.size == 0:
        raise ValueError("the object is absent from the reference mask: nothing to box")
    if where == "largest":
        k = int(np.argmax(truth.sum(axis=(0, 1))))
    elif where == "middle":
        middle = (on[0] + on[-1]) / 2.0
        k = int(on[np.argmin(np.abs(on - middle))])  # the middle, or the nearest slice showing it
    else:
        raise ValueError(f"box slice must be 'middle' or 'largest', got {where!r}")
    return SlicePrompt(k, box=box_from_mask(truth[..., k]))


def next_click(pred: np.ndarray, truth: np.ndarray) -> Click | None:
    """The corrective click for ``pred`` against ``truth`` (``(H, W, T)`` bool), None if equal."""
    error = np.asarray(pred, bool) != np.asarray(truth, bool)
    if not error.any():
        return None
    components, _ = label(error, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    region = components == int(np.argmax(sizes))
    k = int(np.argmax(region.sum(axis=(0, 1))))
    # the slice's border bounds the region, as the challenge's zero-padded crop does
    row, col = central_pixel(region[..., k], border_is_edge=True)
    return Click(k, x=col, y=row, positive=bool(truth[row, col, k]))


def interaction_prompts(
    box: SlicePrompt, clicks: Sequence[Click], object_id: int = 1, name: str = ""
) -> ObjectPrompts:
    """Every prompt so far as one object's prompts: clicks on the box's slice join the box."""
    by_slice: dict[int, list[Click]] = {}
    for c in clicks:
        by_slice.setdefault(c.slice_index, []).append(c)
    slices = []
    for k in sorted({box.slice_index, *by_slice}):
        here = by_slice.get(k, [])
        points = np.array([[c.x, c.y] for c in here], dtype=np.float32) if here else None
        labels = np.array([int(c.positive) for c in here], dtype=np.int64) if here else None
        slices.append(
            SlicePrompt(k, box=box.box if k == box.slice_index else None, points=points, point_labels=labels)
        )
    return ObjectPrompts(object_id, name, slices)


def mask_scores(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0
) -> tuple[float, float]:
    """Dice and NSD (surface Dice at ``tolerance_mm``) of one object's 3D mask; 0 when empty."""
    p = torch.as_tensor(np.asarray(pred, bool))[None, None].float()
    t = torch.as_tensor(np.asarray(truth, bool))[None, None].float()
    if not p.any() or not t.any():
        return (1.0, 1.0) if not p.any() and not t.any() else (0.0, 0.0)
    dice = float(compute_dice(p, t, include_background=True)[0, 0])
    nsd = compute_surface_dice(
        p,
        t,
        class_thresholds=[float(tolerance_mm)],
        include_background=True,
        spacing=[float(s) for s in spacing],
    )
    return dice, float(nsd[0, 0])


def simulate_interactions(
    segment: Segment,
    truth: np.ndarray,
    spacing: Sequence[float],
    object_id: int = 1,
    name: str = "",
    case: str = "",
    method: str = "",
    num_clicks: int = 5,
    box_slice: Literal["middle", "largest"] = "middle",
    tolerance_mm: float = 2.0,
) -> list[InteractionStep]:
    """The protocol on one object: ``num_clicks + 1`` steps (box, then clicks), each scored."""
    truth = np.asarray(truth, bool)
    box = box_prompt(truth, box_slice)
    clicks: list[Click] = []
    steps: list[InteractionStep] = []
    pred: np.ndarray | None = None
    for i in range(int(num_clicks) + 1):
        click = next_click(pred, truth) if pred is not None else None
        if i > 0 and click is None:  # nothing left to correct: the user stops, the mask stands
            prev = steps[-1]
            steps.append(
                InteractionStep(**{**asdict(prev), "interaction": i, "prompt": "none", "seconds": 0.0})
            )
            continue
        if click is not None:
            clicks.append(click)
        t0 = time.perf_counter()
        pred = np.asarray(segment(interaction_prompts(box, clicks, object_id, name)), bool)
        seconds = time.perf_counter() - t0
        if pred.shape != truth.shape:
            raise ValueError(f"{method or 'segment'}: mask shape {pred.shape} != reference {truth.shape}")
        dice, nsd = mask_scores(pred, truth, spacing, tolerance_mm)
        kind = "box" if click is None else ("positive click" if click.positive else "negative click")
        where = (box.slice_index, *box.box[:2]) if click is None else (click.slice_index, click.x, click.y)
        steps.append(
            InteractionStep(
                method=method,
                case=case,
                object_id=int(object_id),
                name=name,
                interaction=i,
                prompt=kind,
                slice_index=int(where[0]),
                x=float(where[1]),
                y=float(where[2]),
                dice=dice,
                nsd=nsd,
                seconds=seconds,
            )
        )
        logger.info(
            "%s %s %s: %s -> Dice %.3f NSD %.3f (%.2f s)", method, case, name, kind, dice, nsd, seconds
        )
    return steps


def interaction_auc(values: Sequence[float]) -> float:
    """Trapezoidal area under scores at unit spacing (the challenge's ``cumulative_trapezoid``)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size < 2:
        raise ValueError(f"an area under the curve needs at least 2 scores, got {v.size}")
    return float(((v[1:] + v[:-1]) / 2.0).sum())


def summarize_interactions(steps: Sequence[InteractionStep]) -> list[dict[str, Any]]:
    """Per method, case and object: DSC/NSD AUC over the clicks, final scores, seconds per interaction."""
    groups: dict[tuple[str, str, int], list[InteractionStep]] = {}
    for s in steps:
        groups.setdefault((s.method, s.case, s.object_id), []).append(s)
    rows = []
    for (method, case, object_id), group in groups.items():
        group = sorted(group, key=lambda s: s.interaction)
        clicks = [s for s in group if s.interaction > 0]
        timed = [s.seconds for s in group if s.prompt != "none"]
        rows.append(
            {
                "method": method,
                "case": case,
                "object_id": object_id,
                "name": group[0].name,
                "dice_box": group[0].dice,
                "dsc_auc": interaction_auc([s.dice for s in clicks]) if len(clicks) > 1 else float("nan"),
                "nsd_auc": interaction_auc([s.nsd for s in clicks]) if len(clicks) > 1 else float("nan"),
                "dice_final": group[-1].dice,
                "nsd_final": group[-1].nsd,
                "interactions": len(timed),
                "seconds_per_interaction": float(np.mean(timed)),
            }
        )
    return rows


def write_interaction_csvs(steps: Sequence[InteractionStep], output_dir: str | Path) -> dict[str, Path]:
    """``interaction_steps.csv`` (every step) and ``interaction_summary.csv`` (per object), atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    step_rows = [asdict(s) for s in steps]
    summary = summarize_interactions(steps)
    return {
        "steps": write_csv(
            out / "interaction_steps.csv", list(InteractionStep.__dataclass_fields__), step_rows
        ),
        "summary": write_csv(out / "interaction_summary.csv", list(summary[0]) if summary else [], summary),
    }


def mean_curves(steps: Sequence[InteractionStep], score: str = "dice") -> dict[str, list[float]]:
    """Per method: the mean ``score`` over objects after each interaction."""
    curves: dict[str, dict[int, list[float]]] = {}
    for s in steps:
        curves.setdefault(s.method, {}).setdefault(s.interaction, []).append(float(getattr(s, score)))
    return {m: [nanmean(c[i]) for i in sorted(c)] for m, c in curves.items()}


def plot_interaction_curves(steps: Sequence[InteractionStep], path: str | Path, title: str = "") -> Path:
    """Dice and NSD vs interactions (0 = box), one line per method, as a PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, score, label_ in zip(axes, ("dice", "nsd"), ("Dice", "NSD (2 mm)"), strict=True):
        for method, curve in mean_curves(steps, score).items():
            ax.plot(range(len(curve)), curve, marker="o", label=method)
        ax.set_xlabel("interaction (0 = box, then clicks)")
        ax.set_ylabel(f"mean {label_}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    return save_figure(fig, path, title)


class Sam2InteractiveSession:
    """Our side of the protocol: a volume encoded once, each interaction only propagates.

    Args:
        network: a `monai_sam.networks.Sam2VolumeSegmenter` (e.g. `monai_sam.bundle`'s
            ``load_checkpoint_model(...).network`` or ``load_bundle_model(...).network``).
        volume: the intensity-scaled volume ``(1, H, W, T)`` in ``[0, 1]`` (RAS array).
        stop_after_absent: the network's early stop (``"default"``: its own setting).
    """

    def __init__(
        self, network: Any, volume: torch.Tensor, stop_after_absent: int | None | str = "default"
    ) -> None:
        from monai_sam.networks import VolumeFrames
        from monai_sam.transforms import SamInput

        self.network = network
        self.stop_after_absent = stop_after_absent
        frames = VolumeFrames(torch.as_tensor(volume).float(), SamInput(network.image_size))
        self.original_size = frames.original_size
        t0 = time.perf_counter()
        self.features = network.encode_volume(frames)
        self.encode_seconds = time.perf_counter() - t0

    def __call__(self, prompts: ObjectPrompts) -> np.ndarray:
        from monai_sam.inferers import propagate_to_label

        label_ = propagate_to_label(
            self.network,
            None,
            [prompts],
            features=self.features,
            original_size=self.original_size,
            output_size=self.original_size,
            stop_after_absent=self.stop_after_absent,
        )
        return (label_ > 0).cpu().numpy()


@dataclass
class InteractionCase:
    """One volume ready for the protocol: its name, file, scaled image and labels (RAS arrays)."""

    name: str
    path: str
    scaled: torch.Tensor  # (1, H, W, T) in [0, 1]
    labels: np.ndarray  # (H, W, T) object ids
    spacing: list[float]


def load_interaction_case(
    item: Mapping[str, str], window: str | None = "auto", merge_labels: Mapping[int, int] | None = None
) -> InteractionCase:
    """A datalist item (``image``, ``label``) loaded in RAS, intensity-scaled as the model expects."""
    from monai_sam.data.loading import load_volume
    from monai_sam.segment import case_name, intensity_transform

    image, truth = load_volume(item["image"]), load_volume(item["label"])
    if tuple(image.shape) != tuple(truth.shape):
        raise ValueError(f"{item['label']}: label shape {tuple(truth.shape)} != image {tuple(image.shape)}")
    labels = np.rint(truth[0].numpy()).astype(np.int64)
    for src, dst in (merge_labels or {}).items():
        labels[labels == int(src)] = int(dst)
    scale = intensity_transform(window, image)
    scaled = scale(image) if scale is not None else image
    return InteractionCase(
        name=case_name(item["image"]),
        path=str(item["image"]),
        scaled=torch.as_tensor(scaled).float(),
        labels=labels,
        spacing=[float(v) for v in image.meta["spacing"]],
    )


def run_interaction_benchmark(
    network: Any,
    datalist: Sequence[Mapping[str, str]],
    label_names: Mapping[int, str],
    output_dir: str | Path,
    window: str | None = "auto",
    merge_labels: Mapping[int, int] | None = None,
    num_clicks: int = 5,
    box_slice: Literal["middle", "largest"] = "middle",
    stop_after_absent: int | None | str = "default",
    tolerance_mm: float = 2.0,
    method: str = "monai-sam",
) -> list[InteractionStep]:
    """The protocol on every object of every case; writes the CSVs and the plot to ``output_dir``."""
    steps: list[InteractionStep] = []
    for item in datalist:
        case = load_interaction_case(item, window, merge_labels)
        session = Sam2InteractiveSession(network, case.scaled, stop_after_absent)
        logger.info(
            "%s: encoded %d slices in %.1f s", case.name, case.labels.shape[-1], session.encode_seconds
        )
        for object_id, name in sorted(label_names.items()):
            if int(object_id) == 0 or not (case.labels == int(object_id)).any():
                continue
            steps += simulate_interactions(
                session,
                case.labels == int(object_id),
                case.spacing,
                int(object_id),
                str(name),
                case=case.name,
                method=method,
                num_clicks=num_clicks,
                box_slice=box_slice,
                tolerance_mm=tolerance_mm,
            )
    write_interaction_csvs(steps, output_dir)
    plot_interaction_curves(steps, Path(output_dir) / "interaction_curves.png", "box + corrective clicks")
    return steps
