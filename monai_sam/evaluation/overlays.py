"""Overlay pictures people can look at: predicted vs true contours on representative slices."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from monai_sam.utils import atomic_path

__all__ = ["radiological_view", "representative_slices", "save_figure", "save_overlay", "save_preview"]


def representative_slices(truth: np.ndarray, pred: np.ndarray | None = None, count: int = 3) -> list[int]:
    """Axial slices (last axis) at the 25/50/75 % points of the labelled extent.

    Falls back to the prediction's extent, then to the middle of the volume, so a case with
    an empty truth still gets a picture of what was predicted.
    """
    for vol in (truth, pred):
        if vol is None:
            continue
        present = np.flatnonzero(np.asarray(vol).reshape(-1, vol.shape[-1]).any(axis=0))
        if present.size:
            qs = np.linspace(0, 1, count + 2)[1:-1]
            return sorted({int(present[int(round(q * (present.size - 1)))]) for q in qs})
    return [truth.shape[-1] // 2]


def save_overlay(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray,
    path: str | os.PathLike,
    label_names: Mapping[int, str],
    slices: Sequence[int] | None = None,
    title: str = "",
    window: tuple[float, float] | None = None,
) -> Path:
    """One PNG with a panel per slice: the image, truth contours solid, prediction dashed.

    Args:
        image, truth, pred: ``(X, Y, Z)`` arrays in RAS (truth may be None at inference).
        window: display range (e.g. ``(-160, 240)`` HU for the abdomen); default 1-99th percentiles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, pred = np.asarray(image).squeeze(), np.asarray(pred).squeeze()
    truth = None if truth is None else np.asarray(truth).squeeze()
    slices = list(slices) if slices else representative_slices(truth if truth is not None else pred, pred)
    lo, hi = window if window else np.percentile(image, (1, 99))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(slices), figsize=(4 * len(slices), 4.4), squeeze=False)
    for ax, k in zip(axes[0], slices):
        ax.imshow(_radiological(image[:, :, k]), cmap="gray", vmin=lo, vmax=hi)
        for i, (label, name) in enumerate(sorted((int(k_), v) for k_, v in label_names.items() if int(k_) != 0)):
            color = colors(i % 10)
            if truth is not None and (truth[:, :, k] == label).any():
                ax.contour(_radiological(truth[:, :, k] == label), levels=[0.5], colors=[color], linewidths=1.5)
            if (pred[:, :, k] == label).any():
                ax.contour(
                    _radiological(pred[:, :, k] == label), levels=[0.5], colors=[color], linewidths=1.2, linestyles="--"
                )
            ax.plot([], [], color=color, label=name)
        ax.set_title(f"slice {k}")
        ax.axis("off")
    axes[0][0].legend(loc="lower left", fontsize=7, framealpha=0.6)
    return save_figure(fig, path, (title + "  " if title else "") + "truth: solid, prediction: dashed")


def save_preview(
    image: np.ndarray,
    label: np.ndarray,
    path: str | os.PathLike,
    label_names: Mapping[int, str],
    spacing: Sequence[float],
    window: tuple[float, float] | None = None,
    title: str = "",
    axial_count: int = 4,
) -> Path:
    """One PNG to check a result at a glance: ``axial_count`` axial slices and one coronal view,
    the masks filled in colour, in radiological convention (patient's right on the left).

    Args:
        image, label: ``(X, Y, Z)`` arrays in RAS; ``spacing``: their voxel sizes in mm (the
            views keep true proportions).
        window: display range (e.g. ``(-160, 240)`` HU); default 1-99th percentiles.

    Written atomically: a reader sees the previous picture or the new one, never half of one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    image, label = np.asarray(image).squeeze(), np.asarray(label).squeeze()
    sx, sy, sz = (float(v) for v in spacing)
    lo, hi = window if window else np.percentile(image, (1, 99))
    ids = sorted(int(k) for k in label_names if int(k) != 0)
    tab = plt.get_cmap("tab10")
    colors = ListedColormap([(0, 0, 0, 0)] + [(*tab(i % 10)[:3], 0.45) for i in range(len(ids))])
    index = np.zeros(label.shape, np.int16)  # label -> colour index (0 transparent)
    for i, oid in enumerate(ids, start=1):
        index[label == oid] = i
    axial = representative_slices(label, None, axial_count)
    labelled = np.argwhere(label > 0)
    coronal = int(np.median(labelled[:, 1])) if labelled.size else label.shape[1] // 2
    fig, axes = plt.subplots(1, len(axial) + 1, figsize=(3.6 * (len(axial) + 1), 4.2), squeeze=False)
    views = [(f"axial {k}", *radiological_view(image, index, "axial", k), sy / sx) for k in axial]
    views.append((f"coronal {coronal}", *radiological_view(image, index, "coronal", coronal), sz / sx))
    for ax, (name, img, idx, aspect) in zip(axes[0], views):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.imshow(idx, cmap=colors, vmin=0, vmax=len(ids), aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    for i, oid in enumerate(ids):
        axes[0][0].plot([], [], color=tab(i % 10), linewidth=6, label=label_names[oid])
    if ids:
        axes[0][0].legend(loc="lower left", fontsize=7, framealpha=0.6)
    return save_figure(fig, path, (title + "  " if title else "") + "patient's right on the left")


def radiological_view(image: np.ndarray, label: np.ndarray, plane: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One slice of RAS ``(X, Y, Z)`` arrays as shown on screen, in radiological convention.

    ``"axial"`` (slice ``index`` of Z): anterior at the top; ``"coronal"`` (row ``index`` of
    Y): superior at the top; both with the patient's right on the screen's left.
    """
    if plane == "axial":
        return _radiological(image[:, :, index]), _radiological(label[:, :, index])
    if plane == "coronal":
        # (X, Z) -> rows Z from superior down, columns X from the patient's right
        return image[::-1, index, ::-1].T, label[::-1, index, ::-1].T
    raise ValueError(f"plane must be 'axial' or 'coronal', got {plane!r}")


def save_figure(fig, path: str | os.PathLike, title: str) -> Path:
    """Title, lay out, write atomically and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return Path(path)


def _radiological(ras_slice: np.ndarray) -> np.ndarray:
    """RAS ``(i, j)`` slice -> screen rows/columns: patient's right on the left, anterior up."""
    return ras_slice[::-1, ::-1].T
