"""Lesion-level evaluation of tumour masks: detection, lesion-wise Dice, size bins.

Tumours are judged lesion by lesion, not as one blob: each connected component of the true
mask is a lesion that is detected or missed, each connected component of the prediction that
touches no tumour is a false positive. Volumes are 3D ``(X, Y, Z)`` in RAS with ``Z`` the
axial axis (``docs/conventions.md``); everything is measured in millimetres at the voxel
spacing.

Size: the **longest axial diameter** (RECIST 1.1 measures the longest diameter in the axial
plane) is what the size bins use. It is computed here, not by ``skimage``: on every axial slice
the lesion's pixels are taken as rectangles of ``spacing[0] x spacing[1]`` mm, the longest
distance between two of their corners is found on the convex hull (the maximum Feret diameter
of the pixel squares, exact for anisotropic in-plane spacing), and the largest value over the
slices is kept. A bar of 12 pixels by 1 at 0.8 mm therefore measures
``sqrt(9.6**2 + 0.8**2) = 9.63`` mm (outer extent, not centre-to-centre: ``skimage``'s
``feret_diameter_max`` measures a contour through the pixel centres and gives about one pixel
less, and it does not take anisotropic spacing). The equivalent diameter (of the sphere of
equal volume) is reported beside it.

Honest by construction, as in :mod:`monai_sam.evaluation.metrics`: a case without true
lesions has sensitivity NaN (excluded from means, never 1); a true lesion with no prediction
scores Dice 0; the whole-tumour voxel Dice is NaN only when both masks are empty.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

# the CSV writer and NaN-aware mean shared with the per-class metrics
from monai_sam.evaluation.metrics import nanmean, write_csv

__all__ = [
    "SIZE_BINS",
    "CaseLesionSummary",
    "Lesion",
    "LesionMatch",
    "LesionRow",
    "label_lesions",
    "match_lesions",
    "size_bin",
    "summarize_lesions",
    "write_lesion_cases_csv",
    "write_lesion_summary_csv",
    "write_lesions_csv",
]

SIZE_BIN_EDGES_MM = (10.0, 20.0)
SIZE_BINS = ("<10 mm", "10-20 mm", ">20 mm")
CRITERIA = ("iou", "dice", "overlap")
_CONNECTIVITY = {1: 1, 2: 2, 3: 3, 6: 1, 18: 2, 26: 3}  # scipy rank or neighbour count -> rank


@dataclass
class Lesion:
    """One connected component of a mask.

    ``bbox`` is per axis ``(start, stop)`` in voxels, stop exclusive (``slice(start, stop)``
    crops the lesion). ``centroid_mm`` is in the affine's world frame (RAS mm for MONAI
    volumes), ``None`` when no affine was given.
    """

    id: int
    voxels: int
    volume_mm3: float
    equivalent_diameter_mm: float  # diameter of the sphere of the same volume
    max_axial_diameter_mm: float  # longest in-plane diameter over axial slices (RECIST)
    axial_slice: int  # index along Z of the slice where that diameter is found
    centroid_voxel: tuple[float, ...]
    centroid_mm: tuple[float, ...] | None
    bbox: tuple[tuple[int, int], ...]

    @property
    def size_bin(self) -> str:
        return size_bin(self.max_axial_diameter_mm)


@dataclass
class LesionRow:
    """One true lesion of one case (one CSV row)."""

    case: str
    lesion_id: int  # its value in the labelled truth
    diameter_mm: float  # longest axial diameter: decides ``size_bin``
    equivalent_diameter_mm: float
    size_bin: str
    volume_mm3: float
    voxels: int
    detected: bool
    lesion_dice: float  # against the lesion's own share of the touching predicted components
    lesion_iou: float
    pred_ids: tuple[int, ...]  # predicted components touching it, detected or not
    axial_slice: int
    centroid_voxel: tuple[float, ...]
    centroid_mm: tuple[float, ...] | None = None
    prompt_source: str = ""  # "oracle", "user", "auto": reported apart, never mixed


@dataclass
class CaseLesionSummary:
    """Detection counts of one case."""

    case: str
    num_true: int
    num_pred: int  # predicted components kept (after ``min_pred_volume_mm3``)
    tp: int  # true lesions detected
    fn: int  # true lesions missed
    fp: int  # predicted components that are false positives
    sensitivity: float  # tp / num_true; NaN when the case has no true lesion
    voxel_dice: float  # whole tumour mask, as given; NaN when both masks are empty
    fp_ids: tuple[int, ...] = ()
    fp_diameters_mm: tuple[float, ...] = ()  # longest axial diameter of each FP component
    prompt_source: str = ""


@dataclass
class LesionMatch:
    """Result of :func:`match_lesions`: the case summary, one row per true lesion, the lesions.

    The labelled arrays are not kept (a dataset's worth would not fit in memory); call
    :func:`label_lesions` with the same arguments to get them.
    """

    summary: CaseLesionSummary
    rows: list[LesionRow]
    true_lesions: list[Lesion] = field(default_factory=list)
    pred_lesions: list[Lesion] = field(default_factory=list)


def size_bin(diameter_mm: float) -> str:
    """``"<10 mm"`` below 10, ``"10-20 mm"`` from 10 to 20 inclusive, ``">20 mm"`` above."""
    lo, hi = SIZE_BIN_EDGES_MM
    if diameter_mm < lo:
        return SIZE_BINS[0]
    return SIZE_BINS[1] if diameter_mm <= hi else SIZE_BINS[2]


def label_lesions(
    mask: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    connectivity: int = 3,
    min_volume_mm3: float = 0.0,
    affine: np.ndarray | torch.Tensor | None = None,
    label: int | None = None,
) -> tuple[np.ndarray, list[Lesion]]:
    """Connected components of a 3D mask, described in millimetres.

    Args:
        mask: ``(X, Y, Z)`` volume (a leading channel of size 1 is accepted), ``Z`` axial.
            Foreground is ``mask != 0``, or ``mask == label`` when ``label`` is given (e.g. 2
            for the tumour of a LiTS label map).
        spacing: voxel size in mm along X, Y, Z.
        connectivity: 3 (default, 26 neighbours: voxels sharing a face, edge or corner are one
            lesion), 2 (18: face or edge), 1 (6: face only); 26, 18 and 6 are accepted too.
        min_volume_mm3: components smaller than this are dropped (set to 0 in the output).
        affine: optional 4x4 voxel-to-world matrix for ``centroid_mm``; its column norms must
            match ``spacing``. When ``None`` and ``mask`` is a ``MetaTensor``, its affine is used.
        label: foreground label; ``None`` means any non-zero value.

    Returns:
        ``(labels, lesions)``: an int32 array of the spatial shape with lesions numbered
        ``1..N`` in raster order (``lesions[k].id == k + 1``), and their descriptions.
    """
    if affine is None and hasattr(mask, "affine"):
        affine = mask.affine
    binary = _binary(mask, label, "mask")
    spacing = _check_spacing(spacing, binary.ndim)
    affine = _check_affine(affine, spacing)
    if connectivity not in _CONNECTIVITY:
        raise ValueError(f"connectivity must be one of 1, 2, 3 (or 6, 18, 26), got {connectivity!r}")
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY[connectivity])
    labels, n = ndimage.label(binary, structure=structure, output=np.int32)
    voxel_mm3 = float(np.prod(spacing))
    if n and min_volume_mm3 > 0:
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        keep = counts * voxel_mm3 >= min_volume_mm3
        keep[0] = False
        lut = np.zeros(n + 1, np.int32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        labels, n = lut[labels], int(keep.sum())
    return labels, _describe(labels, n, spacing, affine)


def match_lesions(
    pred_mask: np.ndarray | torch.Tensor,
    true_mask: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    criterion: str = "iou",
    threshold: float = 0.1,
    fp_overlap: float = 0.0,
    connectivity: int = 3,
    min_true_volume_mm3: float = 0.0,
    min_pred_volume_mm3: float = 0.0,
    label: int | None = None,
    affine: np.ndarray | torch.Tensor | None = None,
    case: str = "",
    prompt_source: str = "",
) -> LesionMatch:
    """Match predicted lesions to true lesions of one case.

    Both masks are split into connected components (:func:`label_lesions` with
    ``connectivity``; true components under ``min_true_volume_mm3`` and predicted ones under
    ``min_pred_volume_mm3`` are dropped). Then, with ``T_i`` a true lesion and ``P_j`` a
    predicted component:

    1. **Touching**: ``P_j`` touches ``T_i`` when they share at least one voxel.
    2. **Shares** (merges): a ``P_j`` touching one true lesion belongs wholly to it. A ``P_j``
       touching several is divided among them: each of its voxels goes to the nearest of the
       lesions it touches (Euclidean distance in mm to the lesions' voxels; its voxels inside a
       lesion go to that lesion). A merged prediction is thus cut along the mid-surface between
       the lesions, and each lesion is judged on its own part.
    3. **The lesion's prediction** ``U_i`` is the union of the shares given to ``T_i`` by every
       ``P_j`` touching it (splits: all parts together).
    4. **Detection**: ``T_i`` is detected (TP) when ``score(T_i, U_i) >= threshold``, with
       score the IoU (``criterion="iou"``, default threshold 0.1) or the Dice (``"dice"``);
       with ``"overlap"`` it is detected when any predicted voxel lies in it (threshold unused).
       Otherwise it is missed (FN). A split lesion is one TP; a merged prediction over two
       lesions gives two TPs when each lesion's share reaches the threshold.
    5. **Lesion Dice** (and IoU): ``2|T_i & U_i| / (|T_i| + |U_i|)`` for every true lesion,
       missed ones included (0 when nothing touches it; below-threshold values are kept).
    6. **False positives**: ``P_j`` is a FP when it touches no detected lesion and at most a
       fraction ``fp_overlap`` of its voxels lies in the true tumour mask (all true foreground,
       lesions dropped by ``min_true_volume_mm3`` included). With the default 0 a FP is a
       component disjoint from the truth; a component touching only missed lesions (too small
       an overlap) is then neither a TP nor a FP: its lesion is the FN. Raise ``fp_overlap`` to
       also count such poor hits (and components over lesions too small to be scored) as FPs.

    The whole-tumour ``voxel_dice`` is computed on the binary masks as given (no component
    filtering). ``label`` selects the tumour label in both masks (``None``: any non-zero).
    Shapes: ``(X, Y, Z)``, or with a leading channel of size 1; ``spacing`` in mm.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion != "overlap" and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold for {criterion!r} must be in (0, 1], got {threshold}")
    if not 0.0 <= fp_overlap < 1.0:
        raise ValueError(f"fp_overlap must be in [0, 1), got {fp_overlap}")
    if affine is None and hasattr(true_mask, "affine"):
        affine = true_mask.affine
    p = _binary(pred_mask, label, f"case {case!r} prediction")
    t = _binary(true_mask, label, f"case {case!r} truth")
    if p.shape != t.shape:
        raise ValueError(f"case {case!r}: prediction shape {p.shape} != truth shape {t.shape}")
    spacing = _check_spacing(spacing, t.ndim)
    t_lab, t_les = label_lesions(t, spacing, connectivity, min_true_volume_mm3, affine)
    p_lab, p_les = label_lesions(p, spacing, connectivity, min_pred_volume_mm3, affine)
    n_t, n_p = len(t_les), len(p_les)

    # overlap[i, j] = voxels shared by true lesion i and predicted component j (0 = background)
    both = (t_lab > 0) & (p_lab > 0)
    pair = t_lab[both].astype(np.int64) * (n_p + 1) + p_lab[both]
    overlap = np.bincount(pair, minlength=(n_t + 1) * (n_p + 1)).reshape(n_t + 1, n_p + 1)
    touched_by = {j: tuple(int(i) for i in np.flatnonzero(overlap[1:, j]) + 1) for j in range(1, n_p + 1)}

    # owner[v] = true lesion whose prediction U_i the predicted voxel v belongs to (0: none)
    lut = np.zeros(n_p + 1, np.int32)
    for j, lesions in touched_by.items():
        if len(lesions) == 1:
            lut[j] = lesions[0]
    owner = lut[p_lab]
    for j, lesions in touched_by.items():
        if len(lesions) > 1:
            boxes = [p_les[j - 1].bbox] + [t_les[i - 1].bbox for i in lesions]
            _share_merged(owner, p_lab, t_lab, j, lesions, boxes, spacing)
    pred_size = np.bincount(owner.ravel(), minlength=n_t + 1)
    same = (owner > 0) & (owner == t_lab)
    inter = np.bincount(t_lab[same], minlength=n_t + 1)

    rows, detected_ids = [], set()
    for les in t_les:
        i = les.id
        a, b, c = int(inter[i]), les.voxels, int(pred_size[i])
        dice, iou = 2.0 * a / (b + c), a / (b + c - a)
        detected = a > 0 if criterion == "overlap" else {"iou": iou, "dice": dice}[criterion] >= threshold
        if detected:
            detected_ids.add(i)
        pred_ids = tuple(int(j) for j in np.flatnonzero(overlap[i, 1:]) + 1)
        rows.append(
            LesionRow(
                case, i, les.max_axial_diameter_mm, les.equivalent_diameter_mm, les.size_bin, les.volume_mm3,
                les.voxels, bool(detected), dice, iou, pred_ids, les.axial_slice, les.centroid_voxel,
                les.centroid_mm, prompt_source,
            )
        )  # fmt: skip

    in_truth = np.bincount(p_lab[t], minlength=n_p + 1)
    fp_ids = tuple(
        les.id
        for les in p_les
        if not detected_ids.intersection(touched_by[les.id]) and in_truth[les.id] / les.voxels <= fp_overlap
    )
    tp = len(detected_ids)
    denom = int(p.sum()) + int(t.sum())
    summary = CaseLesionSummary(
        case=case,
        num_true=n_t,
        num_pred=n_p,
        tp=tp,
        fn=n_t - tp,
        fp=len(fp_ids),
        sensitivity=tp / n_t if n_t else float("nan"),
        voxel_dice=2.0 * int((p & t).sum()) / denom if denom else float("nan"),
        fp_ids=fp_ids,
        fp_diameters_mm=tuple(p_les[j - 1].max_axial_diameter_mm for j in fp_ids),
        prompt_source=prompt_source,
    )
    return LesionMatch(summary, rows, t_les, p_les)


def summarize_lesions(rows: Sequence[LesionRow], cases: Sequence[CaseLesionSummary]) -> list[dict]:
    """Summary table per prompt source: all lesions, then each size bin.

    ``rows`` are the lesion rows and ``cases`` the case summaries of the same cases (the FP
    counts, and cases without any lesion, are only in the latter). Columns:

    - ``lesions``, ``detected``; ``sensitivity`` = detected / lesions, pooled over lesions;
    - ``case_sensitivity``: mean over cases of each case's sensitivity, cases without a
      lesion (in that bin) excluded, not counted as 1;
    - ``lesion_dice``: mean lesion Dice over the lesions (missed ones included);
    - ``fp``, ``fp_per_case`` = FP components / cases; in a size bin, the FP components whose
      own longest axial diameter falls in that bin (the bins add up to the total);
    - ``voxel_dice``: mean whole-tumour Dice over cases (NaN cases excluded), "all" row only.
    """
    sources = sorted({c.prompt_source for c in cases} | {r.prompt_source for r in rows})
    out = []
    for source in sources:
        cs = [c for c in cases if c.prompt_source == source]
        names = [c.case for c in cs]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt source {source!r}: duplicate case names in the case summaries")
        sub = [r for r in rows if r.prompt_source == source]
        missing = sorted({r.case for r in sub} - set(names))
        if missing:
            raise ValueError(f"prompt source {source!r}: lesion rows of cases {missing} have no case summary")
        for bin_name in ("all",) + SIZE_BINS:
            rs = sub if bin_name == "all" else [r for r in sub if r.size_bin == bin_name]
            if bin_name == "all":
                fp = sum(c.fp for c in cs)
            else:
                fp = sum(size_bin(d) == bin_name for c in cs for d in c.fp_diameters_mm)
            per_case = [[r.detected for r in rs if r.case == name] for name in names]
            row = {
                "prompt_source": source,
                "size_bin": bin_name,
                "cases": len(cs),
                "lesions": len(rs),
                "detected": sum(r.detected for r in rs),
                "sensitivity": sum(r.detected for r in rs) / len(rs) if rs else float("nan"),
                "case_sensitivity": nanmean([float(np.mean(d)) if d else float("nan") for d in per_case]),
                "lesion_dice": nanmean([r.lesion_dice for r in rs]),
                "fp": int(fp),
                "fp_per_case": fp / len(cs) if cs else float("nan"),
            }
            if bin_name == "all":
                row["voxel_dice"] = nanmean([c.voxel_dice for c in cs])
            out.append(row)
    return out


SUMMARY_FIELDS = [
    "prompt_source", "size_bin", "cases", "lesions", "detected", "sensitivity", "case_sensitivity",
    "lesion_dice", "fp", "fp_per_case", "voxel_dice",
]  # fmt: skip


def write_lesions_csv(rows: Sequence[LesionRow], path: str | os.PathLike) -> Path:
    """One row per true lesion (atomic write); tuples are written space-separated."""
    return write_csv(path, list(LesionRow.__dataclass_fields__), [_flat(asdict(r)) for r in rows])


def write_lesion_cases_csv(cases: Sequence[CaseLesionSummary], path: str | os.PathLike) -> Path:
    """One row per case (atomic write)."""
    return write_csv(path, list(CaseLesionSummary.__dataclass_fields__), [_flat(asdict(c)) for c in cases])


def write_lesion_summary_csv(summary: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """The table of :func:`summarize_lesions` (atomic write; blank where not applicable)."""
    return write_csv(path, SUMMARY_FIELDS, summary)


# ----------------------------------------------------------------------------------------------


def _flat(row: dict) -> dict:
    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, (tuple, list)):
            return " ".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in v)
        return v

    return {k: fmt(v) for k, v in row.items()}


def _binary(mask, label: int | None, what: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    a = np.asarray(mask)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{what}: expected a 3D (X, Y, Z) volume or (1, X, Y, Z), found shape {a.shape}")
    return a == label if label is not None else a != 0


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing: expected {ndim} positive values in mm, found {spacing}")
    return spacing


def _check_affine(affine, spacing: tuple[float, ...]) -> np.ndarray | None:
    if affine is None:
        return None
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, found shape {a.shape}")
    norms = np.linalg.norm(a[:3, :3], axis=0)
    if not np.allclose(norms, spacing, rtol=1e-3, atol=1e-6):
        raise ValueError(f"affine's voxel size {tuple(np.round(norms, 4))} does not match spacing {spacing}")
    return a


_CORNERS = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])


def _feret_mm(mask2d: np.ndarray, sx: float, sy: float) -> float:
    """Longest distance (mm) between corners of the pixels of a 2D mask (pixel = sx by sy mm)."""
    edge = mask2d & ~ndimage.binary_erosion(mask2d)  # the hull's corners come from edge pixels
    corners = np.unique((np.argwhere(edge)[:, None, :] + _CORNERS).reshape(-1, 2) * (sx, sy), axis=0)
    if len(corners) > 4:
        corners = corners[ConvexHull(corners).vertices]  # squares never make a flat hull
    return float(pdist(corners).max())


def _describe(
    labels: np.ndarray, n: int, spacing: tuple[float, ...], affine: np.ndarray | None
) -> list[Lesion]:
    voxel_mm3 = float(np.prod(spacing))
    lesions = []
    for k, sl in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        crop = labels[sl] == k
        idx = np.argwhere(crop)
        voxels = len(idx)
        centroid = idx.mean(axis=0) + [s.start for s in sl]
        best, best_z = 0.0, 0
        for z in np.unique(idx[:, 2]):
            d = _feret_mm(crop[:, :, z], spacing[0], spacing[1])
            if d > best:
                best, best_z = d, int(z) + sl[2].start
        volume = voxels * voxel_mm3
        world = None if affine is None else affine[:3, :3] @ centroid + affine[:3, 3]
        lesions.append(
            Lesion(
                id=k,
                voxels=voxels,
                volume_mm3=volume,
                equivalent_diameter_mm=(6.0 * volume / math.pi) ** (1.0 / 3.0),
                max_axial_diameter_mm=best,
                axial_slice=best_z,
                centroid_voxel=tuple(float(c) for c in centroid),
                centroid_mm=None if world is None else tuple(float(c) for c in world),
                bbox=tuple((s.start, s.stop) for s in sl),
            )
        )
    return lesions


def _share_merged(owner, p_lab, t_lab, j, lesions, boxes, spacing) -> None:
    """Give each voxel of predicted component ``j`` to the nearest of the true ``lesions`` (mm)."""
    sl = tuple(slice(min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(t_lab.ndim))
    t_crop = t_lab[sl]
    seeds = np.isin(t_crop, lesions)
    nearest = ndimage.distance_transform_edt(
        ~seeds, sampling=spacing, return_distances=False, return_indices=True
    )
    mine = p_lab[sl] == j
    owner[sl][mine] = t_crop[tuple(nearest)][mine]
