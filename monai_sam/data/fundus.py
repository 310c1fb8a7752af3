"""Synthetic colour fundus photographs: the embedded default data of the 2D optic disc/cup bundle.

:func:`make_fundus` draws one deterministic fundus photograph from an integer seed, with its
label map in the REFUGE convention of the project (:data:`monai_sam.data.converters.REFUGE_LABELS`,
disjoint classes): 0 background, 1 optic_disc_rim (disc minus cup), 2 optic_cup. The optic disc
of the evaluation is labels {1, 2}, the cup label 2. :func:`write_fundus_dataset` writes a
Decathlon-style folder of them (PNG files, as :func:`~monai_sam.data.converters.convert_refuge`
does) and :func:`vertical_cup_to_disc_ratio` measures the vertical cup-to-disc ratio (vCDR) of a
label map, the clinical number the fundus bundle's evaluation reports.

How a photograph is drawn (image coordinates: rows ``i`` downwards, columns ``j`` to the right;
all lengths scale with ``size``, so two sizes of one seed show the same eye: the same layout,
disc, cup and vessel tree, up to pixel rounding; only the per-pixel texture and noise differ):

1. **Field of view**: a circle of radius ~0.46 ``size`` around the centre, black outside
   (anti-aliased edge).
2. **Eye and layout**: even seeds are right eyes (OD: optic disc right of the centre, macula
   left), odd seeds left eyes (OS: mirrored), so any run of seeds is balanced. The disc's
   vertical diameter ``D`` is 1/8 to 1/6 of the field-of-view diameter; the fovea lies
   2.3-2.7 ``D`` temporally from the disc centre and slightly below it; the disc-fovea
   midpoint is near the image centre.
3. **Retina**: a reddish-orange base colour (hue and brightness jittered per seed) modulated by a
   smooth blotchy "choroidal" texture; a darker, browner macula (Gaussian, sigma 0.75 ``D``)
   with a darker fovea in its centre; sometimes a pale peripapillary crescent on the temporal
   side of the disc (outside the disc label, as in real images).
4. **Optic disc**: a slightly vertically elongated ellipse (horizontal/vertical 0.87-0.95,
   tilted up to 10 degrees) whose radius is modulated by a few angular harmonics (irregular
   boundary). It is painted yellowish-orange, brighter towards the cup.
5. **Optic cup**: an irregular ellipse inside the disc, shifted slightly temporally and
   vertically, painted paler/whiter with a softer margin. Its vertical semi-axis is solved for
   (a few fixed-point iterations on the rasterised masks) so that the label's vertical
   cup-to-disc ratio equals the drawn one: ~0.3-0.6 for "normal" seeds, 0.6-0.8 for
   "glaucomatous" ones (about a third of the seeds), whose cups are also vertically elongated.
   The cup is kept inside the disc eroded by a thin rim. The match is within ~0.02 from
   ``size`` 256 up; at 64-128 px the cup is a few pixels tall and rounding can cost ~0.05.
6. **Vessels**: paired arteries (lighter red, with a central light reflex) and veins (darker,
   wider) leave the nasal side of the cup as four main trunks: the superior and inferior
   temporal arcades curve around the macula, the nasal trunks run up and down towards the nasal
   periphery; a few thin macular branches head for the fovea. Each vessel is a smooth random
   walk (heading driven by a trunk-specific curvature plus an AR(1) wobble) that tapers with
   length, branches recursively (two levels, children 55-80 % as wide) and stops at the
   field-of-view edge, in the foveal avascular zone or below 0.6 px diameter (at size 512).
   Centre lines are drawn as anti-aliased capsules (coverage = clip(radius - distance + 1/2,
   0, 1)); thin vessels have less contrast. Vessels darken the picture multiplicatively, so
   they show over the disc too (the label ignores them, as REFUGE's masks do).
7. **Camera**: vignetting (radial darkening towards the edge) times a gentle illumination
   gradient, a mild Gaussian blur (optics), a little colour noise (sensor), the field-of-view
   mask, then 8-bit quantisation.

Random numbers: one :class:`numpy.random.SeedSequence` per seed spawned into independent streams
(layout, disc, vessels, texture, colour, noise), each used through ``np.random.default_rng``;
no global random state is touched; the same seed and size give byte-identical arrays.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "FUNDUS_LABELS",
    "FUNDUS_REGIONS",
    "MIN_SIZE",
    "Fundus",
    "make_fundus",
    "save_fundus",
    "vertical_cup_to_disc_ratio",
    "write_fundus_dataset",
]

#: Label map of the synthetic photographs: the REFUGE convention of the project (disjoint classes).
FUNDUS_LABELS: dict[int, str] = {0: "background", 1: "optic_disc_rim", 2: "optic_cup"}
#: Evaluation regions as unions of labels (as ``convert_refuge`` records them).
FUNDUS_REGIONS: dict[str, list[int]] = {"optic_disc": [1, 2], "optic_cup": [2]}
#: Smallest image size accepted by :func:`make_fundus` (the cup must stay a few pixels tall).
MIN_SIZE = 64

RIM, CUP = 1, 2


@dataclass
class Fundus:
    """One synthetic colour fundus photograph.

    Attributes:
        image: uint8 ``(H, W, 3)`` RGB; black outside the circular field of view.
        label: uint8 ``(H, W)``: 0 background, 1 optic_disc_rim (disc minus cup), 2 optic_cup.
        cup_to_disc_ratio: the vertical cup-to-disc ratio of ``label``
            (:func:`vertical_cup_to_disc_ratio`), which the cup was drawn to have;
            ``info["design_vertical_cdr"]`` is the target it was solved for.
        info: generation details: ``seed``, ``size``, ``eye`` (``"right"``/``"left"``),
            ``glaucomatous`` (the large-cup regime), ``design_vertical_cdr``, ``fov_center``
            and ``fov_radius``, ``disc_center``, ``disc_diameter_px`` ``[vertical, horizontal]``
            (label extents), ``cup_center``, ``fovea_center`` (``[row, column]`` pixels),
            ``num_vessels`` and ``peripapillary_atrophy``.
    """

    image: np.ndarray
    label: np.ndarray
    cup_to_disc_ratio: float
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# argument checks


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE} (pixels), got {size!r}")
    return int(size)


# --------------------------------------------------------------------------------------------
# vertical cup-to-disc ratio


def _vertical_extent(mask: np.ndarray, axis: int) -> int:
    """``max - min + 1`` of the indices along ``axis`` holding a pixel of ``mask`` (0 if empty)."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    rows = np.flatnonzero(mask.any(axis=other))
    return 0 if rows.size == 0 else int(rows[-1] - rows[0] + 1)


def vertical_cup_to_disc_ratio(label, vertical_axis: int = 0) -> float:
    """Vertical cup-to-disc ratio (vCDR) of a label map in the REFUGE convention.

    ``vCDR = extent(cup) / extent(disc)`` where the cup is label 2, the disc is labels {1, 2}
    and the *extent* of a region is ``max row - min row + 1`` over all of its pixels (rows being
    the vertical image axis). All pixels count, connected or not: a prediction with stray
    islands gets a larger extent, so clean it up (e.g. keep the largest component) first if that
    is what you want to measure.

    Args:
        label: integer label map ``(H, W)`` with values in {0, 1, 2} (0 background,
            1 optic_disc_rim, 2 optic_cup). Singleton axes are squeezed, so MONAI's
            channel-first ``(1, H, W)`` works; torch tensors and float arrays holding integer
            values are accepted.
        vertical_axis: which of the two spatial axes is vertical. ``0`` for arrays read with
            PIL/imageio/``np.asarray(Image.open(...))`` (``(H, W)``); ``1`` for PNGs loaded by
            MONAI's ``LoadImage`` with its default PIL reader, which returns ``(W, H)``
            (``reverse_indexing=True``).

    Returns:
        The ratio in ``[0, 1]`` when the cup lies within the disc's rows; ``nan`` when there is
        no disc (no pixel with label 1 or 2); ``0.0`` when there is a disc but no cup.

    Raises:
        ValueError: not a 2D map after squeezing, ``vertical_axis`` not 0 or 1, or values other
            than 0, 1, 2.
    """
    if hasattr(label, "detach"):  # torch tensor / MetaTensor
        label = label.detach().cpu().numpy()
    arr = np.asarray(label)
    if arr.ndim != 2:
        arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(
            f"label must be a 2D map (H, W) (singleton axes allowed), got shape {np.shape(label)}"
        )
    if isinstance(vertical_axis, bool) or vertical_axis not in (0, 1):
        raise ValueError(f"vertical_axis must be 0 or 1, got {vertical_axis!r}")
    if arr.dtype == bool:
        raise ValueError("label must hold the integer labels 0, 1, 2, got a boolean mask")
    if arr.size:
        values = np.unique(arr)
        bad = values[~np.isin(values, (0, 1, 2))]
        if bad.size:
            raise ValueError(
                f"label values must be 0 (background), 1 (optic_disc_rim) or 2 (optic_cup); "
                f"found {bad[:10].tolist()}"
            )
    disc = _vertical_extent((arr == RIM) | (arr == CUP), vertical_axis)
    if disc == 0:
        return float("nan")
    return _vertical_extent(arr == CUP, vertical_axis) / disc


# --------------------------------------------------------------------------------------------
# random streams and helpers

_STREAMS = ("layout", "disc", "vessels", "texture", "colour", "noise")


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children, strict=True)}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (float32)."""
    # filter a coarser grid and zoom up: same look, far cheaper for large sigma
    step = max(1, int(sigma // 4))
    coarse = rng.standard_normal((shape[0] // step + 2, shape[1] // step + 2)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma / step, mode="wrap")
    if step > 1:
        coarse = ndimage.zoom(coarse, step, order=1)
    field_ = coarse[: shape[0], : shape[1]]
    field_ -= field_.mean()
    return field_ / max(float(field_.std()), 1e-6)


def _harmonics(
    rng: np.random.Generator, amplitude: float, orders=(2, 3, 4, 5)
) -> list[tuple[int, float, float]]:
    """``(order, amplitude, phase)`` of a few angular harmonics (amplitude ~ 1/sqrt(order - 1))."""
    return [
        (k, float(rng.uniform(0, amplitude) / math.sqrt(k - 1)), float(rng.uniform(0, 2 * math.pi)))
        for k in orders
    ]


def _irregular_ellipse(
    ii: np.ndarray, jj: np.ndarray, centre, semi_v: float, semi_h: float, tilt: float, harmonics
) -> np.ndarray:
    """Boolean mask of an ellipse (vertical/horizontal semi-axes, tilted) with a wavy radius."""
    di, dj = ii - centre[0], jj - centre[1]
    c, s = math.cos(tilt), math.sin(tilt)
    u = c * dj + s * di  # along the (tilted) horizontal axis
    v = -s * dj + c * di  # along the (tilted) vertical axis
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k, amp, phase in harmonics:
        radius += amp * np.cos(k * theta + phase)
    return (u / semi_h) ** 2 + (v / semi_v) ** 2 < radius**2


# --------------------------------------------------------------------------------------------
# vessels


@dataclass
class _Vessel:
    points: np.ndarray  # (N, 2) [row, column]
    radii: np.ndarray  # (N,) px
    artery: bool


def _walk(
    rng: np.random.Generator,
    start,
    heading: float,
    radius: float,
    *,
    artery: bool,
    curvature: float,
    turn_until: float | None,
    max_length: float,
    depth: int,
    geo: dict,
    out: list[_Vessel],
) -> None:
    """Grow one vessel (and, recursively, its branches) as a smooth random walk.

    Coordinates are in the canonical frame (temporal = +column); ``heading`` is an angle in
    image axes (0 = +column, pi/2 = +row, i.e. downwards); ``curvature`` in rad/px; the turn
    stops once the heading has passed ``turn_until`` (in the direction of the turn).
    """
    step = geo["step"]
    taper = geo["taper"]
    pos = np.array(start, dtype=np.float64)
    pts, rads = [pos.copy()], [radius]
    wobble = 0.0
    length = 0.0
    branch_rate = geo["branch_rate"] * (1.0 if depth == 0 else 0.6)
    turning = True
    while length < max_length:
        if turning and turn_until is not None and curvature != 0.0:
            if (curvature > 0 and heading >= turn_until) or (curvature < 0 and heading <= turn_until):
                turning = False
        wobble = 0.85 * wobble + rng.normal(0.0, geo["wobble"])
        heading += (curvature if turning else 0.0) * step + wobble * step
        pos = pos + step * np.array([math.sin(heading), math.cos(heading)])
        length += step
        radius *= math.exp(-step / taper)
        pts.append(pos.copy())
        rads.append(radius)
        # the wall of the field of view, the foveal avascular zone, a capillary-thin end
        if np.hypot(*(pos - geo["fov_centre"])) > geo["fov_radius"] + geo["step"]:
            break
        if np.hypot(*(pos - geo["fovea"])) < geo["faz"]:
            break
        if radius < geo["min_radius"]:
            break
        in_disc = np.hypot(*(pos - geo["disc"])) < geo["disc_radius"]
        thick = radius > 0.9 * geo["scale"]
        if depth < 2 and not in_disc and thick and rng.random() < branch_rate * step:
            side = 1.0 if rng.random() < 0.5 else -1.0
            child_heading = heading + side * rng.uniform(math.radians(25), math.radians(70))
            child_radius = radius * rng.uniform(0.55, 0.8)
            radius *= 0.92  # the parent thins after giving a branch
            _walk(
                rng,
                pos,
                child_heading,
                child_radius,
                artery=artery,
                curvature=float(rng.normal(0.0, 0.12 / geo["D"])),
                turn_until=None,
                max_length=max_length * rng.uniform(0.35, 0.7),
                depth=depth + 1,
                geo=geo,
                out=out,
            )
    if len(pts) >= 2:
        out.append(_Vessel(np.asarray(pts), np.asarray(rads), artery))


def _vessel_tree(rng: np.random.Generator, geo: dict) -> list[_Vessel]:
    """All vessels, canonical frame (temporal = +column), starting in the cup."""
    D = geo["D"]
    R = geo["fov_radius"]
    cup = np.asarray(geo["cup"], dtype=np.float64)
    w_vein = D / rng.uniform(11.0, 14.0)  # diameter, px
    vessels: list[_Vessel] = []
    deg = math.radians
    for vert in (-1.0, 1.0):  # superior (upwards, -row) then inferior
        for artery in (True, False):
            r0 = 0.5 * w_vein * (0.72 if artery else 1.0)
            # the central vessels emerge on the nasal side of the cup
            nasal_shift = rng.uniform(0.3, 0.6) * geo["cup_semi_h"]
            start = cup + np.array([vert * rng.uniform(0.0, 0.08) * D, -nasal_shift])
            # temporal arcade: leaves steeply, curves temporally around the macula
            elev = deg(rng.uniform(60.0, 82.0))
            kappa = 1.0 / (rng.uniform(1.6, 2.4) * D)
            _walk(
                rng,
                start,
                vert * elev,
                r0,
                artery=artery,
                curvature=-vert * kappa,
                turn_until=-vert * deg(rng.uniform(5.0, 25.0)),
                max_length=2.2 * R,
                depth=0,
                geo=geo,
                out=vessels,
            )
            # nasal trunk: thinner, up/down and nasally, mild turn towards the horizontal
            elev = deg(rng.uniform(45.0, 75.0))
            kappa = 1.0 / (rng.uniform(3.0, 5.0) * D)
            _walk(
                rng,
                start + np.array([0.0, -0.05 * D]),
                vert * (math.pi - elev),
                r0 * rng.uniform(0.7, 0.85),
                artery=artery,
                curvature=vert * kappa,
                turn_until=vert * deg(rng.uniform(150.0, 170.0)),
                max_length=1.6 * R,
                depth=0,
                geo=geo,
                out=vessels,
            )
    # thin macular branches from the temporal disc margin towards the fovea
    fovea = np.asarray(geo["fovea"], dtype=np.float64)
    for _ in range(int(rng.integers(2, 5))):
        start = np.asarray(geo["disc"]) + np.array([rng.uniform(-0.3, 0.3) * D, rng.uniform(0.38, 0.45) * D])
        to_fovea = fovea - start
        heading = math.atan2(to_fovea[0], to_fovea[1]) + deg(rng.uniform(-35.0, 35.0))
        _walk(
            rng,
            start,
            heading,
            0.5 * w_vein * rng.uniform(0.25, 0.4),
            artery=bool(rng.random() < 0.5),
            curvature=float(rng.normal(0.0, 0.5 / D)),
            turn_until=None,
            max_length=float(np.hypot(*to_fovea)) * rng.uniform(0.5, 0.9),
            depth=1,
            geo=geo,
            out=vessels,
        )
    return vessels


def _render_vessels(
    vessels: list[_Vessel], shape: tuple[int, int], chunk: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased opacity maps (veins, arteries) in ``[0, 1]`` of capsule chains."""
    veins = np.zeros(shape, dtype=np.float32)
    arteries = np.zeros(shape, dtype=np.float32)
    h, w = shape
    for vessel in vessels:
        target = arteries if vessel.artery else veins
        pts, rads = vessel.points, vessel.radii
        for k0 in range(0, len(pts) - 1, chunk):
            p = pts[k0 : k0 + chunk + 1]
            r = rads[k0 : k0 + chunk + 1]
            margin = float(r.max()) + 2.0
            i0 = max(0, int(math.floor(p[:, 0].min() - margin)))
            i1 = min(h, int(math.ceil(p[:, 0].max() + margin)) + 1)
            j0 = max(0, int(math.floor(p[:, 1].min() - margin)))
            j1 = min(w, int(math.ceil(p[:, 1].max() + margin)) + 1)
            if i1 <= i0 or j1 <= j0:
                continue
            ii, jj = np.mgrid[i0:i1, j0:j1].astype(np.float32)
            pix = np.stack([ii.ravel(), jj.ravel()], axis=1)  # (N, 2)
            a, b = p[:-1].astype(np.float32), p[1:].astype(np.float32)  # (K, 2)
            ab = b - a
            len2 = np.maximum((ab**2).sum(axis=1), 1e-6)
            t = ((pix[None, :, :] - a[:, None, :]) * ab[:, None, :]).sum(axis=2) / len2[:, None]
            t = np.clip(t, 0.0, 1.0)  # (K, N)
            closest = a[:, None, :] + t[..., None] * ab[:, None, :]
            dist = np.sqrt(((pix[None] - closest) ** 2).sum(axis=2))
            rad = r[:-1, None].astype(np.float32) + t * (r[1:] - r[:-1])[:, None].astype(np.float32)
            cover = np.clip(rad - dist + 0.5, 0.0, 1.0)
            # thin vessels are fainter (partial volume in the retina, not only in the pixel)
            cover *= np.clip(0.35 + 0.45 * rad, 0.35, 1.0)
            if vessel.artery:  # central light reflex of arteries
                reflex = np.clip(1.0 - dist / np.maximum(0.3 * rad, 1e-3), 0.0, 1.0) * (rad > 1.4)
                cover *= 1.0 - 0.35 * reflex
            patch = cover.max(axis=0).reshape(ii.shape)
            view = target[i0:i1, j0:j1]
            np.maximum(view, patch, out=view)
    return veins, arteries


# --------------------------------------------------------------------------------------------
# the photograph


def _layout(rng: np.random.Generator, size: int, seed: int) -> dict:
    fov_centre = np.array([(size - 1) / 2.0, (size - 1) / 2.0])
    fov_radius = size * rng.uniform(0.445, 0.47)
    right_eye = seed % 2 == 0  # balanced in any run of consecutive seeds
    D = 2.0 * fov_radius / rng.uniform(6.0, 8.0)  # vertical disc diameter, px
    fovea_dist = rng.uniform(2.3, 2.7) * D
    fovea_drop = rng.uniform(0.05, 0.35) * D  # the fovea sits a little below the disc
    temporal = -1.0 if right_eye else 1.0  # column direction from the disc to the macula
    mid = fov_centre + rng.uniform(-0.06, 0.06, size=2) * fov_radius
    horiz = math.sqrt(max(fovea_dist**2 - fovea_drop**2, 1.0))
    disc = mid - np.array([fovea_drop / 2.0, temporal * horiz / 2.0])
    fovea = mid + np.array([fovea_drop / 2.0, temporal * horiz / 2.0])
    return {
        "fov_centre": fov_centre,
        "fov_radius": float(fov_radius),
        "right_eye": right_eye,
        "temporal": temporal,
        "D": float(D),
        "disc": disc,
        "fovea": fovea,
    }


def _disc_and_cup(rng: np.random.Generator, lay: dict, size: int) -> dict:
    """Disc and cup masks (label), solving the cup's vertical semi-axis for the design vCDR."""
    D = lay["D"]
    glaucomatous = bool(rng.random() < 0.35)
    design = float(rng.uniform(0.6, 0.8) if glaucomatous else rng.uniform(0.3, 0.6))
    semi_v = D / 2.0
    semi_h = semi_v * rng.uniform(0.87, 0.95)
    tilt = math.radians(rng.uniform(-10.0, 10.0))
    disc_harm = _harmonics(rng, 0.04)
    # cup: horizontal/vertical ratio, offsets (temporal and vertical), shape
    cup_h_ratio = design * (rng.uniform(0.78, 0.95) if glaucomatous else rng.uniform(0.9, 1.12))
    cup_h_ratio = min(cup_h_ratio, 0.82)
    off_j = lay["temporal"] * rng.uniform(0.0, 0.45) * (1.0 - cup_h_ratio) * semi_h
    off_i = rng.uniform(-0.25, 0.25) * (1.0 - design) * semi_v
    cup_tilt = tilt + math.radians(rng.uniform(-8.0, 8.0))
    cup_harm = _harmonics(rng, 0.05)

    pad = int(math.ceil(0.75 * D)) + 2
    ci, cj = (int(round(c)) for c in lay["disc"])
    i0, i1 = max(0, ci - pad), min(size, ci + pad + 1)
    j0, j1 = max(0, cj - pad), min(size, cj + pad + 1)
    ii, jj = np.mgrid[i0:i1, j0:j1].astype(np.float64)
    disc = _irregular_ellipse(ii, jj, lay["disc"], semi_v, semi_h, tilt, disc_harm)
    disc = ndimage.binary_fill_holes(disc)
    rim_px = max(1, int(round(0.03 * D)))
    allowed = ndimage.binary_erosion(disc, iterations=rim_px)
    disc_extent = _vertical_extent(disc, 0)
    cup_centre = lay["disc"] + np.array([off_i, off_j])
    target = design * disc_extent
    cup_semi_v = design * semi_v
    cup = np.zeros_like(disc)
    for _ in range(6):
        cup = _irregular_ellipse(
            ii, jj, cup_centre, cup_semi_v, cup_h_ratio * semi_h, cup_tilt, cup_harm
        ) & allowed
        extent = _vertical_extent(cup, 0)
        if extent == 0:
            cup_semi_v *= 1.5
            continue
        if abs(extent - target) <= 0.5:
            break
        cup_semi_v *= target / extent
    cup = ndimage.binary_fill_holes(cup)
    label = np.zeros((size, size), dtype=np.uint8)
    sub = label[i0:i1, j0:j1]
    sub[disc] = RIM
    sub[cup] = CUP
    return {
        "label": label,
        "design": design,
        "glaucomatous": glaucomatous,
        "cup_centre": cup_centre,
        "semi_h": semi_h,
        "cup_semi_h": cup_h_ratio * semi_h,
    }


def _retina(
    rngs: dict[str, np.random.Generator], lay: dict, dc: dict, size: int, ii, jj
) -> tuple[np.ndarray, bool]:
    """Float RGB picture before the camera effects (no vessels); whether it has a PPA crescent."""
    crng, trng = rngs["colour"], rngs["texture"]
    shape = (size, size)
    D = lay["D"]
    scale = size / 512.0
    brightness = crng.uniform(0.75, 1.05)
    base = np.array(
        [crng.uniform(0.72, 0.88), crng.uniform(0.23, 0.36), crng.uniform(0.07, 0.16)], dtype=np.float32
    ) * np.float32(brightness)
    # choroidal blotches (mostly red/green modulation) and a finer grain
    blotch = _smooth_noise(trng, shape, 9.0 * scale)
    grain = _smooth_noise(trng, shape, 1.5 * scale)
    tex_amp = crng.uniform(0.03, 0.07)
    img = np.empty((size, size, 3), dtype=np.float32)
    for c, (wb, wg) in enumerate(((1.0, 0.35), (1.4, 0.5), (1.2, 0.5))):
        img[..., c] = base[c] * (1.0 + tex_amp * (wb * blotch + wg * grain))

    # macula: darker and browner, with a darker fovea
    d2 = (ii - lay["fovea"][0]) ** 2 + (jj - lay["fovea"][1]) ** 2
    mac = np.exp(-d2 / (2.0 * (0.75 * D) ** 2)).astype(np.float32)
    fov_spot = np.exp(-d2 / (2.0 * (0.18 * D) ** 2)).astype(np.float32)
    depth = crng.uniform(0.25, 0.4)
    for c, k in enumerate((1.0, 1.25, 1.1)):
        img[..., c] *= 1.0 - depth * k * mac - 0.15 * k * fov_spot

    # peripapillary atrophy: a pale crescent on the temporal side of the disc (label 0)
    label = dc["label"]
    disc = label > 0
    ppa = bool(crng.random() < 0.4)
    if ppa:
        dist_out = ndimage.distance_transform_edt(~disc).astype(np.float32)
        width = crng.uniform(0.06, 0.15) * D
        side = (jj - lay["disc"][1]) * lay["temporal"] / (0.5 * D)
        crescent = np.clip(side, 0.0, 1.0) * np.clip(1.0 - dist_out / width, 0.0, 1.0) * (dist_out > 0)
        crescent = ndimage.gaussian_filter(crescent, 1.0 * scale)
        pale = np.array([0.85, 0.55, 0.35], dtype=np.float32) * np.float32(brightness)
        img += crescent[..., None] * 0.6 * (pale - img)

    # optic disc: yellowish-orange rim, brighter towards a paler, whiter cup
    sigma_disc = max(0.6, 0.02 * D)
    sigma_cup = max(0.8, 0.045 * D)
    a_disc = ndimage.gaussian_filter(disc.astype(np.float32), sigma_disc)
    a_cup = ndimage.gaussian_filter((label == CUP).astype(np.float32), sigma_cup)
    disc_bright = min(1.0, brightness * crng.uniform(1.0, 1.15))
    rim_col = np.array(
        [crng.uniform(0.88, 0.98), crng.uniform(0.50, 0.62), crng.uniform(0.26, 0.36)], dtype=np.float32
    ) * np.float32(disc_bright)
    cup_col = np.array(
        [1.0, crng.uniform(0.88, 0.96), crng.uniform(0.70, 0.85)], dtype=np.float32
    ) * np.float32(min(1.0, disc_bright * 1.05))
    dc_r = np.sqrt((ii - dc["cup_centre"][0]) ** 2 + (jj - dc["cup_centre"][1]) ** 2) / (0.5 * D)
    glow = np.clip(1.0 - dc_r, 0.0, 1.0).astype(np.float32)  # rim brighter towards the cup
    rim_field = rim_col[None, None, :] * (0.96 + 0.04 * glow[..., None]) * (1.0 + 0.03 * grain[..., None])
    img = img * (1.0 - a_disc[..., None]) + rim_field * a_disc[..., None]
    img = img * (1.0 - a_cup[..., None]) + cup_col[None, None, :] * a_cup[..., None]
    return img, ppa


def make_fundus(seed: int = 0, size: int = 512) -> Fundus:
    """Draw one deterministic synthetic colour fundus photograph and its disc/cup label map.

    Args:
        seed: non-negative integer; the same seed and size give byte-identical arrays.
        size: image height and width in pixels (>= :data:`MIN_SIZE`). Every anatomical size is
            relative to the field of view, so the picture is the same at any size (resampled).

    Returns:
        A :class:`Fundus`: uint8 RGB image ``(size, size, 3)``, uint8 label ``(size, size)``
        (0 background, 1 optic_disc_rim, 2 optic_cup), the label's vertical cup-to-disc ratio
        and generation details in ``info``. The module docstring says how it is drawn.

    Raises:
        ValueError: a negative or non-integer seed, a size that is not an integer >= 64.
    """
    seed = _check_seed(seed)
    size = _check_size(size)
    rngs = _streams(seed)
    lay = _layout(rngs["layout"], size, seed)
    dc = _disc_and_cup(rngs["disc"], lay, size)
    label = dc["label"]
    ii, jj = np.mgrid[0:size, 0:size].astype(np.float32)
    img, ppa = _retina(rngs, lay, dc, size, ii, jj)

    # vessels, grown in the canonical frame (temporal = +column) and mirrored for the eye
    t = lay["temporal"]
    cj = lay["disc"][1]

    def canon(p):
        p = np.asarray(p, dtype=np.float64)
        return np.array([p[0], cj + t * (p[1] - cj)])

    geo = {
        "D": lay["D"],
        # lengths scale with the image, so the tree is the same at every size
        "scale": size / 512.0,
        "step": size / 256.0,
        "taper": 1.3 * lay["fov_radius"],
        "wobble": 0.004 * 512.0 / size,
        "branch_rate": 2.2 / (lay["fov_radius"]),
        "min_radius": 0.3 * size / 512.0,
        "fov_centre": canon(lay["fov_centre"]),
        "fov_radius": lay["fov_radius"],
        "fovea": canon(lay["fovea"]),
        "faz": 0.3 * lay["D"],
        "disc": canon(lay["disc"]),
        "disc_radius": 0.5 * lay["D"],
        "cup": canon(dc["cup_centre"]),
        "cup_semi_h": dc["cup_semi_h"],
    }
    vessels = _vessel_tree(rngs["vessels"], geo)
    for v in vessels:
        v.points[:, 1] = cj + t * (v.points[:, 1] - cj)
    veins, arteries = _render_vessels(vessels, (size, size))
    vein_k = np.array([0.45, 0.26, 0.26], dtype=np.float32)
    art_k = np.array([0.66, 0.42, 0.40], dtype=np.float32)
    img *= 1.0 - veins[..., None] * (1.0 - vein_k)
    img *= 1.0 - arteries[..., None] * (1.0 - art_k)

    # camera: vignetting and uneven illumination, blur, sensor noise, field of view
    crng = rngs["colour"]
    R = lay["fov_radius"]
    rr = np.sqrt((ii - lay["fov_centre"][0]) ** 2 + (jj - lay["fov_centre"][1]) ** 2) / np.float32(R)
    vig = crng.uniform(0.35, 0.6)
    g_ang = crng.uniform(0, 2 * math.pi)
    gradient = 1.0 + crng.uniform(0.0, 0.12) * (
        (math.cos(g_ang) * (jj - lay["fov_centre"][1]) + math.sin(g_ang) * (ii - lay["fov_centre"][0])) / R
    )
    img *= ((1.0 - vig * np.clip(rr, 0, 1) ** 2.5) * gradient)[..., None]
    blur = 0.7 * size / 512.0
    img = ndimage.gaussian_filter(img, sigma=(blur, blur, 0.0))
    nrng = rngs["noise"]
    img += nrng.normal(0.0, 0.008, size=img.shape).astype(np.float32)
    img += 0.006 * nrng.standard_normal((size, size, 1)).astype(np.float32)
    fov = np.clip(R - rr * R + 0.5, 0.0, 1.0)
    img *= fov[..., None]
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    label = np.where(fov > 0, label, 0).astype(np.uint8)

    vcdr = vertical_cup_to_disc_ratio(label)
    disc_rows, disc_cols = np.nonzero(label > 0)
    cup_rows, cup_cols = np.nonzero(label == CUP)
    info = {
        "seed": seed,
        "size": size,
        "eye": "right" if lay["right_eye"] else "left",
        "glaucomatous": dc["glaucomatous"],
        "design_vertical_cdr": round(dc["design"], 4),
        "fov_center": [round(float(c), 2) for c in lay["fov_centre"]],
        "fov_radius": round(R, 2),
        "disc_center": [round(float(disc_rows.mean()), 2), round(float(disc_cols.mean()), 2)],
        "disc_diameter_px": [_vertical_extent(label > 0, 0), _vertical_extent(label > 0, 1)],
        "cup_center": [round(float(cup_rows.mean()), 2), round(float(cup_cols.mean()), 2)],
        "fovea_center": [round(float(c), 2) for c in lay["fovea"]],
        "num_vessels": len(vessels),
        "peripapillary_atrophy": ppa,
    }
    return Fundus(image=image, label=label, cup_to_disc_ratio=float(vcdr), info=info)


# --------------------------------------------------------------------------------------------
# files


def _save_png_atomic(array: np.ndarray, path: Path, tmp_dir: Path) -> None:
    from PIL import Image

    tmp = tmp_dir / path.name
    Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_fundus(fundus: Fundus, image_path: str | Path, label_path: str | Path) -> None:
    """Write a photograph as an RGB PNG and its label map as an 8-bit greyscale PNG (0/1/2).

    Each file is written under a temporary name in its target folder and then renamed, so a
    crash never leaves a truncated file under the final name.
    """
    for array, path in ((fundus.image, Path(image_path)), (fundus.label, Path(label_path))):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-fundus-", dir=path.parent) as tmp:
            _save_png_atomic(array, path, Path(tmp))


def write_fundus_dataset(num_cases: int, out_dir: str | Path, seed: int = 0, size: int = 512) -> Path:
    """Write a Decathlon-style dataset of synthetic fundus photographs.

    Layout (as :func:`monai_sam.data.converters.convert_refuge` writes REFUGE)::

        out_dir/imagesTr/fundus_000.png   RGB, uint8
        out_dir/labelsTr/fundus_000.png   uint8: 0 background, 1 optic_disc_rim, 2 optic_cup
        out_dir/dataset.json              written last

    Case ``i`` uses seed ``seed + i``. ``dataset.json`` records ``modality {"0": "RGB"}``,
    ``tensorImageSize "2D"``, the labels, ``regions {"optic_disc": [1, 2], "optic_cup": [2]}``
    and, per training entry, ``vertical_cdr`` (the label's vertical cup-to-disc ratio). Files are
    written under temporary names and renamed; an existing ``dataset.json`` is removed first
    and the new one written last, so an interrupted run never looks like a complete dataset.

    Args:
        num_cases: number of photographs (>= 1).
        out_dir: the dataset folder (created if needed; existing cases are overwritten).
        seed: seed of the first case (non-negative integer).
        size: image height and width in pixels (>= 64).

    Returns:
        The path of ``dataset.json``.

    Raises:
        ValueError: ``num_cases`` < 1 or not an integer, a bad seed or size.
    """
    from tqdm.auto import tqdm

    if isinstance(num_cases, bool) or not isinstance(num_cases, int | np.integer) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}")
    seed = _check_seed(seed)
    size = _check_size(size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")
    images_dir, labels_dir = out_dir / "imagesTr", out_dir / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "dataset.json"
    if json_path.exists():
        logger.warning("%s exists; it is removed until the new dataset is complete", json_path)
        json_path.unlink()

    training = []
    with tempfile.TemporaryDirectory(prefix=".tmp-fundus-", dir=out_dir) as tmp:
        tmp_dir = Path(tmp)
        for i in tqdm(range(int(num_cases)), desc="fundus photographs", unit="case"):
            case = f"fundus_{i:03d}"
            fundus = make_fundus(seed + i, size)
            _save_png_atomic(fundus.image, images_dir / f"{case}.png", tmp_dir)
            _save_png_atomic(fundus.label, labels_dir / f"{case}.png", tmp_dir)
            training.append(
                {
                    "image": f"./imagesTr/{case}.png",
                    "label": f"./labelsTr/{case}.png",
                    "vertical_cdr": round(fundus.cup_to_disc_ratio, 4),
                }
            )
            logger.debug(
                "wrote %s (seed %d, %s eye, vCDR %.3f)",
                case,
                seed + i,
                fundus.info["eye"],
                fundus.cup_to_disc_ratio,
            )
        dataset = {
            "name": "fundus_synthetic",
            "description": (
                "synthetic colour fundus photographs (optic disc and cup), generated by monai-sam "
                f"(seed={seed}, size={size}); label 1 = disc rim, 2 = cup; optic disc = labels 1 and 2"
            ),
            "reference": "monai-sam: monai_sam.data.fundus",
            "licence": "CC0-1.0 (generated data)",
            "release": "1.0",
            "tensorImageSize": "2D",
            "modality": {"0": "RGB"},
            "labels": {str(k): v for k, v in FUNDUS_LABELS.items()},
            "numTraining": len(training),
            "numTest": 0,
            "training": training,
            "test": [],
            "regions": {k: list(v) for k, v in FUNDUS_REGIONS.items()},
            "generator": "monai_sam.data.fundus.write_fundus_dataset",
        }
        tmp_json = tmp_dir / "dataset.json"
        tmp_json.write_text(json.dumps(dataset, indent=4) + "\n", encoding="utf-8")
        os.replace(tmp_json, json_path)
    logger.info("wrote %d synthetic fundus photograph(s) to %s", len(training), out_dir)
    return json_path
