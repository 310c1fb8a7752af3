"""Synthetic phantoms: the embedded default dataset of monai-sam.

Three kinds of deterministic volumes, generated from an integer seed:

``"ct"``
    Abdominal CT in Hounsfield units. Labels: 0 background, 1 liver, 2 spleen, 3 kidney_right,
    4 kidney_left, 5 aorta, 6 liver_tumor.
``"mr"``
    The same abdominal anatomy with T1-like contrast (arbitrary positive units, fat bright, liver
    brighter than spleen, flowing blood dark, tumours hypointense), a smooth multiplicative bias
    field and Rician noise. Same label map as ``"ct"``: for a given seed, shape and spacing the
    two kinds give the *same* labels (paired CT/MR phantoms).
``"cardiac-mr"``
    One short-axis cine-like frame (bright blood, dark myocardium). Labels follow ACDC:
    0 background, 1 right_ventricle, 2 myocardium, 3 left_ventricle.

Geometry (``docs/conventions.md``): arrays are ``(X, Y, Z)`` in RAS; the affine is diagonal
(the spacing) with the origin chosen so that world ``(0, 0, 0)`` mm is the centre of the volume.
World +x is the patient's right, +y anterior, +z superior (RAS+). The anatomy is laid out in a
mirrored frame (+x to the patient's left, as the code's "left"/"right" comments read) and the
arrays are flipped along x at the end, which on the centred grid maps that frame's x to -x.
Every anatomical size is defined in
mm, so changing ``shape`` or ``spacing`` changes the sampling and the field of view
(``shape * spacing``), never the size of the organs; a small field of view crops them.

How an abdominal phantom is built:

1. A smooth random displacement field (a few mm, B-spline on a 40 mm grid) warps the in-plane
   world coordinates, so that every boundary is slightly irregular.
2. The body is an ellipse whose radius is modulated by a few angular harmonics and changes
   slowly along z, with a flatter back; a subcutaneous fat layer and an abdominal-wall muscle
   layer follow its outline inwards. Inside, the visceral background is a blotchy mix of fat and
   bowel-like soft tissue (a thresholded smooth random field).
3. A lumbar spine (vertebral bodies with cortex and marrow, discs, canal, arches, spinous and
   transverse processes), paraspinal muscles and psoas muscles are unlabelled landmarks.
4. Organs are deformed ellipsoids: a rotated ellipsoid whose normalised radius is divided by
   ``1 + sum_m a_m cos(2 pi k_m . u + phi_m)`` (``u`` the unit direction, a handful of random
   low-frequency modes: spherical-harmonic-like lumps), with optional shear along z, taper
   and bend. The liver is the smooth union of a right lobe and a left lobe; kidneys have a
   medial hilum (renal sinus fat) and a brighter cortex; the spleen is a bent crescent. Each
   organ has a craniocaudal extent (liver upper abdomen, kidneys lower, right kidney lower than
   left, spleen high on the left).
5. Organs are only drawn inside the abdominal cavity and never on bone or paraspinal muscle.
   Label priority (later wins where shapes touch): liver < spleen < kidneys < inferior vena cava
   (unlabelled) < aorta. The placements keep these overlaps small (impressions, not holes).
6. 0 to 4 tumours (count and sizes from the seed, diameters 5 to 40 mm, log-uniform) are
   deformed ellipsoids placed only where a shell of probe points around them (their largest
   radius plus a margin) lies in the liver, so they are surrounded by liver. They become label 6
   and are hypodense/hypointense. A tumour is at least one voxel.
7. Intensities come from a per-tissue table (jittered per case), plus a smooth texture; the
   image is blurred by a small Gaussian (partial volume; labels stay crisp) before noise: CT gets
   slightly correlated Gaussian noise (10-18 HU), MR a bias field and Rician noise.

The cardiac phantom is built the same way in 2D per slice: thorax, chest wall, lungs, spine,
descending aorta, a liver dome on low slices and the heart: the LV cavity and myocardium are
half-ellipsoids from the base (top slices) to the apex, with irregular radius and myocardial
thickness (8-12 mm); the RV cavity is a crescent attached to the septum that ends before the
apex, with a thin unlabelled free wall; papillary muscles sit in the LV cavity (labelled LV, as
in ACDC). Each slice averages three sub-slices (thick-slice partial volume).

Random numbers: one :class:`numpy.random.SeedSequence` per seed, spawned into independent
streams (anatomy, tumours, warp, texture, contrast, bias, noise), each used through
``np.random.default_rng``. No global random state is touched; the same seed and arguments give
byte-identical arrays. The anatomy does not depend on ``shape``/``spacing`` (only its sampling).

Files written by :func:`write_phantom_dataset`: CT images as int16 HU, MR images as float32
(arbitrary units), labels as uint8, all NIfTI-1 (``.nii.gz``) with the phantom's affine.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SHAPES",
    "DEFAULT_SPACINGS",
    "LABEL_NAMES",
    "MODALITIES",
    "PHANTOM_KINDS",
    "Phantom",
    "ensure_phantom_dataset",
    "make_phantom",
    "save_phantom",
    "write_phantom_dataset",
]

PHANTOM_KINDS = ("ct", "mr", "cardiac-mr")

#: Default array shapes (X, Y, Z) per kind. The abdominal kinds share a ~205 x 205 x 160 mm
#: field of view; the cardiac one is ~288 x 288 x 96 mm.
DEFAULT_SHAPES: dict[str, tuple[int, int, int]] = {
    "ct": (256, 256, 64),
    "mr": (160, 160, 40),
    "cardiac-mr": (192, 192, 12),
}
#: Default voxel spacings in mm (x, y, z) per kind.
DEFAULT_SPACINGS: dict[str, tuple[float, float, float]] = {
    "ct": (0.8, 0.8, 2.5),
    "mr": (1.28, 1.28, 4.0),
    "cardiac-mr": (1.5, 1.5, 8.0),
}

_ABDOMEN_LABELS = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "aorta",
    6: "liver_tumor",
}
_CARDIAC_LABELS = {0: "background", 1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}

LABEL_NAMES: dict[str, dict[int, str]] = {
    "ct": dict(_ABDOMEN_LABELS),
    "mr": dict(_ABDOMEN_LABELS),
    "cardiac-mr": dict(_CARDIAC_LABELS),
}
MODALITIES: dict[str, str] = {"ct": "CT", "mr": "MR", "cardiac-mr": "MR"}

# Abdominal label values.
LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, AORTA, TUMOR = 1, 2, 3, 4, 5, 6
# Cardiac label values (ACDC).
RV, MYO, LV = 1, 2, 3


@dataclass
class Phantom:
    """One synthetic volume.

    Attributes:
        image: float32 ``(X, Y, Z)``; Hounsfield units for CT, arbitrary positive units for MR.
        label: uint8 ``(X, Y, Z)``; values as in ``label_names``.
        affine: float64 4x4 RAS voxel-to-world matrix in mm (diagonal spacing, volume centred
            on world (0, 0, 0)).
        label_names: ``{value: name}``, e.g. ``{0: "background", 1: "liver", ...}``.
        modality: ``"CT"`` or ``"MR"``.
        kind: ``"ct"``, ``"mr"`` or ``"cardiac-mr"``.
        info: generation details: seed, spacing, field of view, noise level, and for abdominal
            kinds the placed tumours (centre in world mm, diameter in mm, voxel count).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    label_names: dict[int, str]
    modality: str
    kind: str
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# argument checks


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {PHANTOM_KINDS}")
    return kind


def _check_shape(shape, kind: str) -> tuple[int, int, int]:
    if shape is None:
        return DEFAULT_SHAPES[kind]
    try:
        values = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be 3 positive integers (X, Y, Z), got {shape!r}") from None
    if len(values) != 3 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"shape must be 3 positive integers (X, Y, Z), got {shape!r}")
    if min(values) < 1:
        raise ValueError(f"shape must be 3 positive integers (X, Y, Z), got {shape!r}")
    return tuple(int(v) for v in values)


def _check_spacing(spacing, kind: str) -> tuple[float, float, float]:
    if spacing is None:
        return DEFAULT_SPACINGS[kind]
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing!r}")
    return values


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


# --------------------------------------------------------------------------------------------
# grid, random streams and smooth random fields

_STREAMS = ("anatomy", "tumor", "warp", "texture", "contrast", "bias", "noise")


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children, strict=True)}


@dataclass
class _Grid:
    shape: tuple[int, int, int]
    spacing: np.ndarray  # (3,) mm
    origin: np.ndarray  # (3,) world mm of voxel (0, 0, 0)

    @classmethod
    def centred(cls, shape, spacing) -> _Grid:
        spacing = np.asarray(spacing, dtype=np.float64)
        origin = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * spacing
        return cls(tuple(shape), spacing, origin)

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag(np.append(self.spacing, 1.0))
        affine[:3, 3] = self.origin
        return affine

    def axis(self, a: int, offset_mm: float = 0.0) -> np.ndarray:
        return (self.origin[a] + offset_mm + np.arange(self.shape[a]) * self.spacing[a]).astype(np.float32)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the world box ``[lo, hi]``."""
        out = []
        for a in range(3):
            i0 = max(0, int(math.floor((lo[a] - self.origin[a]) / self.spacing[a])))
            i1 = min(self.shape[a], int(math.ceil((hi[a] - self.origin[a]) / self.spacing[a])) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def nearest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest voxel index of world points ``(N, 3)`` and whether it is inside the grid."""
        idx = np.rint((points - self.origin) / self.spacing).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=1)
        return np.clip(idx, 0, np.asarray(self.shape) - 1), inside


def _bspline_weights(coords: np.ndarray, cell: float) -> np.ndarray:
    """Cubic B-spline interpolation matrix ``(len(coords), n_nodes)`` for nodes every ``cell`` mm."""
    start = float(coords.min()) - 2.0 * cell
    n_nodes = int(math.ceil((float(coords.max()) - start) / cell)) + 3
    u = (coords.astype(np.float64) - start) / cell
    i = np.floor(u).astype(np.int64)
    t = u - i
    w = np.stack(
        [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6],
        axis=1,
    )
    mat = np.zeros((coords.size, n_nodes), dtype=np.float64)
    rows = np.arange(coords.size)
    for k in range(4):
        mat[rows, i - 1 + k] = w[:, k]
    return mat.astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, axes: tuple[np.ndarray, np.ndarray, np.ndarray], cell_mm
) -> np.ndarray:
    """A smooth random field, about unit standard deviation, on the grid given by 1D world axes.

    Gaussian random values on a coarse node grid (``cell_mm`` apart, per axis) interpolated by
    separable cubic B-splines: three small matrix products, no full-size temporaries.
    """
    cells = np.broadcast_to(np.asarray(cell_mm, dtype=np.float64), (3,))
    mats = [_bspline_weights(c, float(s)) for c, s in zip(axes, cells, strict=True)]
    coarse = rng.standard_normal(tuple(m.shape[1] for m in mats), dtype=np.float32)
    f = np.tensordot(mats[0], coarse, axes=(1, 0))  # (X, ny, nz)
    f = np.tensordot(f, mats[1], axes=(1, 1))  # (X, nz, Y)
    f = np.tensordot(f, mats[2], axes=(1, 1))  # (X, Y, Z)
    # a cubic B-spline interpolant of unit white noise has variance (151/315) per axis on average
    f *= np.float32((315.0 / 151.0) ** 1.5)
    return np.ascontiguousarray(f, dtype=np.float32)


def _warped_xy(grid: _Grid, rng: np.random.Generator, amplitude_mm: float, z_offset: float = 0.0):
    """World x, y (full 3D arrays) displaced by a smooth random in-plane field; z as a 1D axis."""
    axes = (grid.axis(0), grid.axis(1), grid.axis(2, z_offset))
    dx = _smooth_field(rng, axes, 40.0)
    dy = _smooth_field(rng, axes, 40.0)
    dx *= np.float32(amplitude_mm)
    dy *= np.float32(amplitude_mm)
    dx += axes[0][:, None, None]
    dy += axes[1][None, :, None]
    return dx, dy, axes[2][None, None, :]


# --------------------------------------------------------------------------------------------
# deformed ellipsoids


def _rotation(az: float = 0.0, ay: float = 0.0, ax: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz(az) @ Ry(ay) @ Rx(ax) (radians); its columns are the local axes."""
    cz, sz, cy, sy, cx, sx = (
        math.cos(az),
        math.sin(az),
        math.cos(ay),
        math.sin(ay),
        math.cos(ax),
        math.sin(ax),
    )
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass
class _Blob:
    """A deformed ellipsoid: inside where :meth:`value` < 1."""

    center: np.ndarray  # (3,) world mm
    semi: np.ndarray  # (3,) semi-axes in mm along the local axes
    rot: np.ndarray  # (3, 3) columns = local axes in world
    wave: np.ndarray  # (M, 3) wave vectors of the radius modulation (cycles per unit direction)
    amp: np.ndarray  # (M,) relative amplitudes
    phase: np.ndarray  # (M,)
    shear: tuple[float, float] = (0.0, 0.0)  # centre (x, y) shift per mm of z offset
    taper: tuple[float, float] = (0.0, 0.0)  # local y, z thinning per unit of local x
    bend: float = 0.0  # local x offset per unit of local y squared (crescent)

    def half_extent(self) -> np.ndarray:
        """A conservative world half-size of the shape around its centre."""
        h = np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(axis=1))
        grow = (1.0 + min(float(np.abs(self.amp).sum()), 0.5)) / (
            1.0 - min(max(abs(t) for t in self.taper), 0.6)
        )
        h = h * grow * (1.0 + abs(self.bend))
        h[:2] += np.abs(np.asarray(self.shear)) * h[2]
        return h

    def value(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dz = z - np.float32(self.center[2])
        dx = x - np.float32(self.center[0])
        dy = y - np.float32(self.center[1])
        if self.shear[0]:
            dx = dx - np.float32(self.shear[0]) * dz
        if self.shear[1]:
            dy = dy - np.float32(self.shear[1]) * dz
        r = self.rot.astype(np.float32)
        s = self.semi.astype(np.float32)
        qx = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / s[0]
        qy = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / s[1]
        qz = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / s[2]
        if self.bend:
            qx = qx + np.float32(self.bend) * qy * qy
        if self.taper[0] or self.taper[1]:
            qy = qy / np.maximum(1.0 - np.float32(self.taper[0]) * qx, np.float32(0.35))
            qz = qz / np.maximum(1.0 - np.float32(self.taper[1]) * qx, np.float32(0.35))
        rho = np.sqrt(qx * qx + qy * qy + qz * qz)
        if self.amp.size == 0:
            return rho
        inv = 1.0 / np.maximum(rho, np.float32(1e-6))
        ux, uy, uz = qx * inv, qy * inv, qz * inv
        pert = np.zeros_like(rho)
        for (kx, ky, kz), a, p in zip(self.wave.astype(np.float32), self.amp, self.phase, strict=True):
            pert += np.float32(a) * np.cos(
                np.float32(2 * np.pi) * (kx * ux + ky * uy + kz * uz) + np.float32(p)
            )
        np.clip(pert, -0.5, 0.5, out=pert)
        return rho / (1.0 + pert)


def _lumps(rng: np.random.Generator, n: int, amplitude: float, frequency: float):
    """Random radius modulation: ``n`` modes of total standard deviation ~``amplitude``."""
    wave = rng.standard_normal((n, 3)) * frequency
    amp = rng.uniform(0.5, 1.5, n) * amplitude * math.sqrt(2.0 / n)
    phase = rng.uniform(0, 2 * np.pi, n)
    return wave, amp, phase


def _blob(rng, center, semi, rot, amplitude=0.06, frequency=0.7, n=6, **kw) -> _Blob:
    wave, amp, phase = _lumps(rng, n, amplitude, frequency)
    return _Blob(np.asarray(center, float), np.asarray(semi, float), rot, wave, amp, phase, **kw)


def _eval_blob(blob: _Blob, grid: _Grid, x, y, z, margin_mm: float = 8.0):
    """Evaluate a blob's value on the sub-box of the grid that can contain it.

    Returns ``(slices, value)`` or ``(None, None)`` when the blob is outside the field of view.
    """
    h = blob.half_extent() + margin_mm
    sl = grid.box(blob.center - h, blob.center + h)
    if sl is None:
        return None, None
    return sl, blob.value(_sub(x, sl), _sub(y, sl), _sub(z, sl))


def _sub(a: np.ndarray, sl) -> np.ndarray:
    """Slice a broadcastable array (axes of size 1 stay whole)."""
    return a[tuple(s if n > 1 else slice(None) for s, n in zip(sl, a.shape, strict=True))]


def _mask(shape, sl, sub_mask) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    if sl is not None:
        out[sl] = sub_mask
    return out


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


_PROBE_DIRECTIONS = _fibonacci_sphere(64)


# --------------------------------------------------------------------------------------------
# abdomen

# tissue codes (internal; intensities come from the tables below)
AIR, FAT, MUSCLE, BOWEL, CORTEX_BONE, MARROW, DISC, CANAL, IVC = 0, 1, 2, 3, 4, 5, 6, 7, 8
T_LIVER, T_SPLEEN, T_KCORTEX, T_KMEDULLA, T_AORTA, T_TUMOR = 9, 10, 11, 12, 13, 14
STOMACH, GAS = 15, 16
_N_TISSUES = 17

# (mean low, mean high, texture std) per tissue
_CT_TABLE = {
    AIR: (-1000, -1000, 0),
    FAT: (-110, -90, 6),
    MUSCLE: (45, 55, 5),
    BOWEL: (20, 40, 18),
    CORTEX_BONE: (650, 750, 30),
    MARROW: (320, 400, 35),
    DISC: (80, 100, 5),
    CANAL: (10, 20, 3),
    IVC: (120, 160, 4),
    T_LIVER: (56, 68, 4),
    T_SPLEEN: (44, 52, 4),
    T_KCORTEX: (160, 190, 5),
    T_KMEDULLA: (120, 145, 5),
    T_AORTA: (180, 205, 3),
    T_TUMOR: (20, 35, 4),  # overridden per tumour
    STOMACH: (10, 30, 8),
    GAS: (-1000, -950, 10),
}
_MR_TABLE = {  # T1-weighted gradient echo, arbitrary units
    AIR: (0, 0, 0),
    FAT: (850, 950, 25),
    MUSCLE: (280, 320, 12),
    BOWEL: (280, 360, 50),
    CORTEX_BONE: (25, 40, 5),
    MARROW: (580, 660, 40),
    DISC: (240, 280, 10),
    CANAL: (100, 140, 8),
    IVC: (70, 110, 10),
    T_LIVER: (530, 600, 12),
    T_SPLEEN: (380, 430, 12),
    T_KCORTEX: (410, 450, 12),
    T_KMEDULLA: (300, 340, 12),
    T_AORTA: (50, 80, 8),
    T_TUMOR: (260, 330, 10),  # overridden per tumour
    STOMACH: (150, 220, 20),
    GAS: (0, 0, 0),
}


def _abdomen_params(rng: np.random.Generator) -> dict:
    """All anatomical parameters of one abdomen (a fixed number of draws: independent of the grid)."""
    u = rng.uniform
    deg = np.pi / 180
    p: dict = {}
    p["warp_mm"] = u(1.5, 3.0)
    # body outline
    p["body"] = dict(
        a=u(90, 97),
        b=u(76, 84),
        yc=u(-3, 3),
        ga=u(-0.04, 0.04),
        gb=u(-0.04, 0.04),
        flat=u(0.05, 0.12),
        harm_amp=u(0, 0.015, 5),
        harm_phase=u(0, 2 * np.pi, 5),
        fat=u(7, 13),
        fat_amp=u(0.1, 0.3),
        fat_phase=u(0, 2 * np.pi),
        fat_anterior=u(0, 5),
        muscle=u(5, 8),
    )
    b = p["body"]
    b_post = b["b"] / (1 + b["flat"])
    # spine: vertebral body centre from the back of the body
    y_vb = b["yc"] - b_post + u(42, 47)
    p["spine"] = dict(
        y=y_vb,
        x=u(-2, 2),
        semi=(u(16, 19), u(12.5, 15)),
        cortex=u(1.5, 2.5),
        period=u(33, 38),
        disc=u(7, 9),
        phase=u(0, 40),
        canal_r=u(7, 9),
    )
    p["paraspinal"] = dict(dx=u(19, 24), dy=u(-30, -26), semi=(u(14, 18), u(10, 12)))
    p["psoas"] = dict(dx=u(27, 32), dy=u(0, 4), top=u(15, 40), r0=u(4, 6), gain=u(7, 10))
    # vessels
    r_a = u(9, 11.5)
    p["aorta"] = dict(
        x=u(7, 14), y=y_vb + 14 + r_a + u(1, 3), r=r_a, ecc=u(0.9, 1.1), sx=u(-0.04, 0.04), sy=u(-0.04, 0.04)
    )
    p["ivc"] = dict(x=u(-24, -17), y=y_vb + 20 + u(-2, 4), semi=(u(10, 13), u(7, 10)))
    # organs
    p["liver_r"] = _blob(
        rng,
        center=(-31 + u(-4, 4), 4 + u(-4, 4), 22 + u(-5, 5)),
        semi=np.array([52, 64, 80]) * u(0.92, 1.08, 3),
        rot=_rotation(az=u(-10, 10) * deg),
        amplitude=u(0.04, 0.07),
        frequency=0.8,
        shear=(0.15, -0.3),
        taper=(0.3, 0.25),
    )
    p["liver_l"] = _blob(
        rng,
        center=(12 + u(-5, 5), 36 + u(-4, 4), 42 + u(-5, 5)),
        semi=np.array([50, 26, 34]) * u(0.85, 1.12, 3),
        rot=_rotation(az=u(5, 25) * deg, ay=u(-8, 8) * deg),
        amplitude=u(0.04, 0.08),
        frequency=0.8,
        taper=(0.3, 0.2),
    )
    p["spleen"] = _blob(
        rng,
        center=(55 + u(-3, 3), -15 + u(-4, 4), 50 + u(-5, 5)),
        semi=np.array([22, 50, 38]) * u(0.85, 1.12, 3),
        rot=_rotation(az=u(-30, -10) * deg, ax=u(-10, 10) * deg),
        amplitude=u(0.04, 0.08),
        frequency=0.8,
        bend=u(0.2, 0.4),
    )
    for side, sign, zc in (("kidney_r", -1.0, u(-28, -16)), ("kidney_l", 1.0, u(-16, -6))):
        az = u(-40, -25) * deg
        if sign < 0:
            az = np.pi - az
        kid = _blob(
            rng,
            center=(sign * (46 + u(-3, 3)), -27 + u(-3, 3), zc),
            semi=np.array([23, 20, 54]) * u(0.9, 1.1, 3),
            rot=_rotation(az=az) @ _rotation(ay=-sign * u(5, 15) * deg),
            amplitude=u(0.03, 0.06),
            frequency=0.7,
        )
        # hilum: a notch on the medial side (local -x), filled with renal sinus fat
        hil = _Blob(
            center=kid.center - kid.rot[:, 0] * kid.semi[0] * u(0.75, 0.9),
            semi=np.array([u(8, 10), u(7, 9), u(13, 17)]),
            rot=kid.rot,
            wave=np.zeros((0, 3)),
            amp=np.zeros(0),
            phase=np.zeros(0),
        )
        p[side] = kid
        p[side + "_hilum"] = hil
    # stomach (unlabelled): left upper quadrant, behind the left lobe, with an anterior gas cap
    p["stomach"] = _blob(
        rng,
        center=(30 + u(-4, 4), -2 + u(-4, 4), 38 + u(-6, 6)),
        semi=np.array([24, 26, 34]) * u(0.8, 1.15, 3),
        rot=_rotation(az=u(-30, 30) * deg, ay=u(10, 30) * deg),
        amplitude=u(0.05, 0.1),
        frequency=0.8,
    )
    p["stomach_gas"] = u(0.35, 0.7)  # fraction of the anterior semi-axis that holds gas
    p["medulla"] = u(0.62, 0.72)
    p["bowel_threshold"] = u(0.0, 0.4)
    return p


def _rasterize_abdomen(p: dict, grid: _Grid, x: np.ndarray, y: np.ndarray, z: np.ndarray):
    """Tissue codes (uint8) and labels (uint8) of the abdomen, without tumours."""
    shape = grid.shape
    b = p["body"]
    # ---- body outline, fat and muscle layers ------------------------------------------------
    yr = y - np.float32(b["yc"])
    yr_s = np.where(yr < 0, yr * np.float32(1 + b["flat"]), yr)
    a_z = np.float32(b["a"]) * (1 + np.float32(b["ga"]) * z / 100)
    b_z = np.float32(b["b"]) * (1 + np.float32(b["gb"]) * z / 100)
    un, vn = x / a_z, yr_s / b_z
    theta = np.arctan2(vn, un)
    pert = np.zeros_like(theta)
    for n, (amp, ph) in enumerate(zip(b["harm_amp"], b["harm_phase"], strict=True), start=2):
        pert += np.float32(amp) * np.cos(n * theta + np.float32(ph))
    rho = np.sqrt(un * un + vn * vn) / (1 + pert)
    del un, vn, pert
    rr = np.sqrt(x * x + yr * yr)
    depth = rr * (1 / np.maximum(rho, np.float32(1e-3)) - 1)  # mm inwards along the ray
    del rr
    fat_t = np.float32(b["fat"]) * (1 + np.float32(b["fat_amp"]) * np.cos(theta + np.float32(b["fat_phase"])))
    fat_t += np.float32(b["fat_anterior"]) * np.maximum(np.sin(theta), 0)
    del theta
    body = rho < 1
    del rho
    wall = depth < fat_t + np.float32(b["muscle"])
    subcut = depth < fat_t
    del depth, fat_t
    cavity = body & ~wall

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[body] = MUSCLE
    # ---- spine and back muscles (2D shapes per slice, warped) -----------------------------------
    s = p["spine"]
    xs, ys = x - np.float32(s["x"]), y - np.float32(s["y"])
    vb = (xs / s["semi"][0]) ** 2 + (ys / s["semi"][1]) ** 2
    vb_in = vb < 1
    vb_cortex = vb_in & (vb > (1 - s["cortex"] / min(s["semi"])) ** 2)
    level = np.mod(z - np.float32(s["phase"]), np.float32(s["period"]))
    disc = level < s["disc"]
    arch_level = (level > s["disc"] + 2) & (level < s["period"] - 2)
    canal_y = -s["semi"][1] - s["canal_r"] - 1.0
    rc = np.sqrt(xs * xs + (ys - np.float32(canal_y)) ** 2)
    canal = rc < s["canal_r"]
    arch = (rc < s["canal_r"] + 5) & ~canal & (ys < -s["semi"][1] * 0.6) & arch_level
    spinous = ((xs / 3.5) ** 2 + ((ys - np.float32(canal_y - s["canal_r"] - 8)) / 9.0) ** 2 < 1) & arch_level
    transverse = ((xs / 30.0) ** 2 + ((ys - np.float32(canal_y + 4)) / 4.0) ** 2 < 1) & arch_level
    bone = (vb_in & ~disc) | arch | spinous | transverse
    spine_all = vb_in | bone | canal
    ps = p["paraspinal"]
    paraspinal = np.zeros(shape, dtype=bool)
    for sign in (-1, 1):
        paraspinal |= ((xs - sign * ps["dx"]) / ps["semi"][0]) ** 2 + (
            (ys - ps["dy"]) / ps["semi"][1]
        ) ** 2 < 1
    paraspinal &= body
    pso = p["psoas"]
    r_ps = np.float32(pso["r0"]) + np.float32(pso["gain"]) * np.clip((np.float32(pso["top"]) - z) / 60, 0, 1)
    psoas = np.zeros(shape, dtype=bool)
    for sign in (-1, 1):
        psoas |= ((xs - sign * pso["dx"]) / (1.15 * r_ps)) ** 2 + ((ys - pso["dy"]) / r_ps) ** 2 < 1
    psoas &= (z < pso["top"]) & cavity

    # ---- visceral background: fat and bowel blotches ----------------------------------------
    visceral = p["_bowel_field"] > np.float32(p["bowel_threshold"])
    tissue[cavity] = FAT
    tissue[cavity & visceral] = BOWEL
    del visceral
    tissue[paraspinal] = MUSCLE
    tissue[psoas] = MUSCLE
    tissue[subcut] = FAT
    free = cavity & ~spine_all & ~paraspinal  # where organs may be
    # no liver/spleen behind the vertebral body next to the spine (crura, adrenals live there)
    retro = (xs / 36.0) ** 2 + ((ys + 14.0) / 24.0) ** 2 < 1

    # ---- organs -------------------------------------------------------------------------------
    label = np.zeros(shape, dtype=np.uint8)
    sl_r, v_r = _eval_blob(p["liver_r"], grid, x, y, z)
    sl_l, v_l = _eval_blob(p["liver_l"], grid, x, y, z)
    liver = np.zeros(shape, dtype=bool)
    if sl_r is not None or sl_l is not None:
        # smooth union of the two lobes on the union of their boxes
        vr = np.full(shape, np.float32(10.0))
        vl = np.full(shape, np.float32(10.0))
        if sl_r is not None:
            vr[sl_r] = v_r
        if sl_l is not None:
            vl[sl_l] = v_l
        k = np.float32(0.08)
        m = np.minimum(vr, vl)
        liver = (m - k * np.log1p(np.exp(-np.abs(vr - vl) / k))) < 1
        del vr, vl, m
    label[liver & free & ~retro] = LIVER
    del liver
    sl, v = _eval_blob(p["stomach"], grid, x, y, z)
    stomach = _mask(shape, sl, v < 1) & free & ~retro
    label[stomach] = 0
    tissue[stomach] = STOMACH
    gas_level = np.float32(p["stomach"].center[1] + p["stomach"].semi[1] * (1 - p["stomach_gas"]))
    tissue[stomach & (y > gas_level)] = GAS
    del stomach

    sl, v = _eval_blob(p["spleen"], grid, x, y, z)
    label[_mask(shape, sl, v < 1) & free & ~retro] = SPLEEN
    del xs, ys, vb, rc, level
    kidney_value = {}
    for side, value in (("kidney_r", KIDNEY_R), ("kidney_l", KIDNEY_L)):
        sl, v = _eval_blob(p[side], grid, x, y, z)
        if sl is None:
            continue
        envelope = _mask(shape, sl, v < 1) & free
        sl_h, v_h = _eval_blob(p[side + "_hilum"], grid, x, y, z)
        sinus = envelope & _mask(shape, sl_h, v_h < 1)
        kid = envelope & ~sinus
        label[kid] = value
        label[sinus] = 0
        tissue[sinus] = FAT
        kidney_value[side] = (sl, v, kid)

    # ---- vessels (circular-ish tubes along z, slightly oblique) --------------------------------
    a = p["aorta"]
    ax_ = x - np.float32(a["x"]) - np.float32(a["sx"]) * z
    ay_ = y - np.float32(a["y"]) - np.float32(a["sy"]) * z
    aorta = ((ax_ / (a["r"] * a["ecc"])) ** 2 + (ay_ / a["r"]) ** 2 < 1) & cavity & ~spine_all
    iv = p["ivc"]
    ivc = ((x - np.float32(iv["x"])) / iv["semi"][0]) ** 2 + (
        (y - np.float32(iv["y"])) / iv["semi"][1]
    ) ** 2 < 1
    ivc &= cavity & ~spine_all & ~aorta
    label[ivc] = 0
    tissue[ivc] = IVC
    label[aorta] = AORTA

    # ---- tissues of labelled organs, bone last ------------------------------------------------
    tissue[label == LIVER] = T_LIVER
    tissue[label == SPLEEN] = T_SPLEEN
    for side, value in (("kidney_r", KIDNEY_R), ("kidney_l", KIDNEY_L)):
        if side not in kidney_value:
            continue
        sl, v, _ = kidney_value[side]
        kid = label == value
        medulla = _mask(shape, sl, v < p["medulla"])
        tissue[kid] = T_KCORTEX
        tissue[kid & medulla] = T_KMEDULLA
    tissue[aorta] = T_AORTA
    tissue[vb_in & disc & body] = DISC
    tissue[canal & body] = CANAL
    tissue[bone & body] = MARROW
    tissue[vb_cortex & ~disc & body] = CORTEX_BONE
    tissue[(arch | spinous | transverse) & body] = CORTEX_BONE
    label[spine_all] = 0
    tissue[~body] = AIR
    label[~body] = 0
    # carving by higher-priority structures can leave specks: keep one piece per organ
    for value in (LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, AORTA):
        _keep_largest_component(label, tissue, value, FAT)
    return tissue, label


def _keep_largest_component(label: np.ndarray, tissue: np.ndarray, value: int, fill_tissue: int) -> None:
    """Relabel all but the largest connected piece of ``label == value`` as background."""
    boxes = ndimage.find_objects((label == value).astype(np.uint8))
    if not boxes or boxes[0] is None:
        return
    sl = boxes[0]
    pieces, n = ndimage.label(label[sl] == value)
    if n <= 1:
        return
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    drop = (pieces > 0) & (pieces != int(sizes.argmax()))
    label[sl][drop] = 0
    tissue[sl][drop] = fill_tissue


def _tumor_draws(rng: np.random.Generator, num_tumors: int | None = None) -> list[dict]:
    """Tumour parameters: a fixed number of draws whatever the grid.

    ``num_tumors`` overrides the seed's count; the count is drawn all the same and extra
    tumours are drawn after the usual four, so the first four tumours of a seed never change.
    """
    count = int(rng.choice(5, p=[0.3, 0.25, 0.2, 0.15, 0.1]))
    if num_tumors is not None:
        count = int(num_tumors)
    tumors = []
    for i in range(max(4, count)):
        diameter = float(np.exp(rng.uniform(np.log(5.0), np.log(40.0))))
        aspect = rng.uniform(0.8, 1.25, 3)
        aspect /= np.prod(aspect) ** (1 / 3)
        blob = _blob(
            rng,
            center=(0.0, 0.0, 0.0),
            semi=diameter / 2 * aspect,
            rot=_random_rotation(rng),
            amplitude=rng.uniform(0.05, 0.1),
            frequency=0.7,
        )
        candidates = rng.uniform(0, 1, (48, 3))
        ct_hu = rng.uniform(20, 35)
        mr_ratio = rng.uniform(0.45, 0.6)
        tumors.append(
            dict(active=i < count, diameter=diameter, blob=blob, candidates=candidates, ct=ct_hu, mr=mr_ratio)
        )
    return tumors


def _tumor_candidates(u: np.ndarray, lobe: _Blob, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Candidate centres (world mm) from uniform draws ``u`` (N, 3): the first two thirds in the
    thick core of the right lobe (a ball scaled to 65% of its semi-axes), the rest anywhere in
    the liver's bounding box."""
    n_core = (2 * len(u)) // 3
    a = u[:n_core]
    radius = np.cbrt(a[:, 0])
    cos_t = 2 * a[:, 1] - 1
    sin_t = np.sqrt(1 - cos_t**2)
    phi = 2 * np.pi * a[:, 2]
    ball = radius[:, None] * np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=1)
    core = lobe.center + (ball * lobe.semi * 0.65) @ lobe.rot.T
    return np.concatenate([core, lo + u[n_core:] * (hi - lo)])


def _place_tumors(draws: list[dict], grid: _Grid, x, y, z, label: np.ndarray, lobe: _Blob) -> list[dict]:
    """Put the active tumours where a probe shell around them lies in the liver; label them 6.

    A tumour that fits nowhere is shrunk (x0.8, twice) before being given up.
    """
    liver = label == LIVER
    if not liver.any():
        return []
    idx = np.nonzero(liver)
    lo = np.array([grid.origin[a] + idx[a].min() * grid.spacing[a] for a in range(3)])
    hi = np.array([grid.origin[a] + idx[a].max() * grid.spacing[a] for a in range(3)])
    margin = 2.0 + 0.5 * float(grid.spacing.max())
    placed: list[dict] = []
    for t in draws:
        if not t["active"]:
            continue
        blob: _Blob = t["blob"]
        candidates = _tumor_candidates(t["candidates"], lobe, lo, hi)
        for c, scale in ((c, scale) for scale in (1.0, 0.8, 0.64) for c in candidates):
            r_eff = scale * float(blob.semi.max()) * (1 + min(float(np.abs(blob.amp).sum()), 0.5))
            if any(np.linalg.norm(c - q["center"]) < r_eff + q["r_eff"] + 2 for q in placed):
                continue
            probes = np.concatenate(
                [c[None], c + _PROBE_DIRECTIONS * (r_eff + margin), c + _PROBE_DIRECTIONS * (0.5 * r_eff)]
            )
            vox, inside = grid.nearest(probes)
            if not inside.all() or not liver[tuple(vox.T)].all():
                continue
            blob.center = c
            blob.semi = blob.semi * scale
            sl, v = _eval_blob(blob, grid, x, y, z, margin_mm=4.0)
            mask = _mask(grid.shape, sl, v < 1) & liver
            if not mask.any():  # smaller than a voxel: keep the centre voxel
                mask[tuple(vox[0])] = True
            label[mask] = TUMOR
            liver &= ~mask
            placed.append(
                dict(
                    center=c,
                    r_eff=r_eff,
                    diameter=t["diameter"] * scale,
                    mask=mask,
                    ct=t["ct"],
                    mr=t["mr"],
                )
            )
            break
        else:
            logger.debug("no room in the liver for a %.1f mm tumour; skipped", t["diameter"])
    return placed


def _make_abdomen(
    kind: str, grid: _Grid, rngs: dict[str, np.random.Generator], num_tumors: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    p = _abdomen_params(rngs["anatomy"])
    tumor_draws = _tumor_draws(rngs["tumor"], num_tumors)
    x, y, z = _warped_xy(grid, rngs["warp"], p["warp_mm"])
    axes = (grid.axis(0), grid.axis(1), grid.axis(2))
    tex_rng = rngs["texture"]
    p["_bowel_field"] = _smooth_field(tex_rng, axes, 14.0)
    tissue, label = _rasterize_abdomen(p, grid, x, y, z)
    del p["_bowel_field"]
    tumors = _place_tumors(tumor_draws, grid, x, y, z, label, p["liver_r"])
    del x, y
    for t in tumors:
        tissue[t["mask"]] = T_TUMOR

    table = _CT_TABLE if kind == "ct" else _MR_TABLE
    crng = rngs["contrast"]
    means = np.zeros(_N_TISSUES, dtype=np.float32)
    textures = np.zeros(_N_TISSUES, dtype=np.float32)
    for t, (lo, hi, tex) in table.items():
        means[t] = crng.uniform(lo, hi)
        textures[t] = tex
    image = means[tissue]
    texture = _smooth_field(tex_rng, axes, (4.0, 4.0, 6.0))
    texture *= textures[tissue]
    image += texture
    del texture
    for t in tumors:
        value = t["ct"] if kind == "ct" else t["mr"] * means[T_LIVER]
        image[t["mask"]] = np.float32(value) + (image[t["mask"]] - means[T_TUMOR])
    # partial volume: a small blur of the intensities (labels stay crisp)
    image = ndimage.gaussian_filter(image, sigma=0.5, truncate=3.0, mode="nearest")
    nrng = rngs["noise"]
    info: dict = {
        "tumors": [
            {
                "center_mm": [round(float(v), 2) for v in t["center"]],
                "diameter_mm": round(float(t["diameter"]), 2),
                "voxels": int(t["mask"].sum()),
            }
            for t in tumors
        ]
    }
    if kind == "ct":
        sigma = float(nrng.uniform(10, 18))
        noise = nrng.standard_normal(grid.shape, dtype=np.float32)
        # in-plane correlated noise (CT noise texture), rescaled to standard deviation `sigma`
        noise = ndimage.gaussian_filter(noise, sigma=(0.6, 0.6, 0.0), truncate=3.0)
        kernel = np.exp(-0.5 * (np.arange(-2, 3) / 0.6) ** 2)
        noise *= np.float32(sigma * kernel.sum() ** 2 / (kernel**2).sum())
        image += noise
        np.clip(image, -1024, 3071, out=image)
        info["noise_sigma_hu"] = round(sigma, 2)
    else:
        bias = _bias_field(rngs["bias"], grid, 0.12, 0.08)
        image *= bias
        sigma = float(nrng.uniform(10, 20))
        image = _rician(nrng, image, sigma)
        info["noise_sigma"] = round(sigma, 2)
    return image, label, info


def _bias_field(rng: np.random.Generator, grid: _Grid, gradient: float, smooth: float, z_offset: float = 0.0):
    """exp(linear gradient in a random direction + smooth random field): a coil-like bias."""
    direction = rng.standard_normal(3) * np.array([1.0, 1.0, 0.5])
    direction /= np.linalg.norm(direction)
    axes = (grid.axis(0), grid.axis(1), grid.axis(2, z_offset))
    log_bias = _smooth_field(rng, axes, 90.0)
    log_bias *= np.float32(smooth)
    log_bias += np.float32(gradient * direction[0] / 100) * axes[0][:, None, None]
    log_bias += np.float32(gradient * direction[1] / 100) * axes[1][None, :, None]
    log_bias += np.float32(gradient * direction[2] / 100) * axes[2][None, None, :]
    return np.exp(log_bias)


def _rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.standard_normal(image.shape, dtype=np.float32)
    n2 = rng.standard_normal(image.shape, dtype=np.float32)
    n1 *= np.float32(sigma)
    n1 += image
    n2 *= np.float32(sigma)
    return np.sqrt(n1 * n1 + n2 * n2).astype(np.float32)


# --------------------------------------------------------------------------------------------
# cardiac MR (short axis, bSSFP-like cine frame)

C_AIR, C_FAT, C_MUSCLE, C_LUNG, C_BLOOD, C_MYO, C_MARROW, C_BONE, C_LIVER, C_SOFT = range(10)
_CARDIAC_TABLE = {
    C_AIR: (0, 0, 0),
    C_FAT: (600, 700, 20),
    C_MUSCLE: (180, 230, 10),
    C_LUNG: (20, 45, 8),
    C_BLOOD: (700, 820, 15),
    C_MYO: (150, 210, 8),
    C_MARROW: (380, 460, 25),
    C_BONE: (25, 50, 5),
    C_LIVER: (240, 290, 8),
    C_SOFT: (260, 330, 15),
}


def _cardiac_params(rng: np.random.Generator) -> dict:
    u = rng.uniform
    deg = np.pi / 180
    p: dict = {"warp_mm": u(1.0, 2.0)}
    p["body"] = dict(
        a=u(118, 130),
        b=u(90, 100),
        yc=u(-4, 4),
        flat=u(0.05, 0.12),
        harm_amp=u(0, 0.015, 4),
        harm_phase=u(0, 2 * np.pi, 4),
        fat=u(6, 14),
        muscle=u(8, 14),
    )
    b = p["body"]
    y_vb = b["yc"] - b["b"] / (1 + b["flat"]) + u(40, 46)
    p["spine"] = dict(y=y_vb, semi=(u(14, 17), u(12, 14)))
    p["aorta"] = dict(x=u(14, 24), y=y_vb + u(16, 22), r=u(10, 13))
    p["lungs"] = [
        dict(x=-u(55, 68), y=u(-12, 0), a=u(45, 55), b=u(62, 72)),
        dict(x=u(58, 70), y=u(-14, -2), a=u(42, 52), b=u(60, 70)),
    ]
    # heart: LV axis along z, base at the top
    h = dict(
        cx=u(12, 26),
        cy=u(2, 14),
        sx=u(-0.12, 0.12),
        sy=u(-0.12, 0.12),
        z_base=u(34, 44),
        length=u(78, 92),
        r_endo=u(21, 27),
        ecc=u(0.9, 1.1),
        ecc_angle=u(0, np.pi),
        thick=u(8.5, 11),
        thick_apex=u(6, 8),
        endo_harm=u(0.0, 0.04, 3),
        endo_phase=u(0, 2 * np.pi, 3),
        th_harm=u(0.05, 0.15, 2),
        th_phase=u(0, 2 * np.pi, 2),
        rv_angle=u(130, 160) * deg,
        rv_offset=u(0.55, 0.75),
        rv_a=u(0.85, 1.05),
        rv_b=u(1.35, 1.7),
        rv_end=u(0.6, 0.8),
        rv_harm=u(0.02, 0.06, 3),
        rv_phase=u(0, 2 * np.pi, 3),
        rv_wall=u(2.5, 3.5),
        pap_r=u(2.5, 4.0, 2),
        pap_angle=u(35, 60, 2) * deg,
        peri_fat=u(1.5, 3.5),
        peri_phase=u(0, 2 * np.pi),
        liver_z=u(-125, -105),
        liver_r=u(75, 90),
    )
    p["heart"] = h
    return p


def _rasterize_cardiac(p: dict, grid: _Grid, x, y, z):
    shape = grid.shape
    b = p["body"]
    yr = y - np.float32(b["yc"])
    yr_s = np.where(yr < 0, yr * np.float32(1 + b["flat"]), yr)
    un, vn = x / np.float32(b["a"]), yr_s / np.float32(b["b"])
    theta = np.arctan2(vn, un)
    pert = np.zeros_like(theta)
    for n, (amp, ph) in enumerate(zip(b["harm_amp"], b["harm_phase"], strict=True), start=2):
        pert += np.float32(amp) * np.cos(n * theta + np.float32(ph))
    rho = np.sqrt(un * un + vn * vn) / (1 + pert)
    depth = np.sqrt(x * x + yr * yr) * (1 / np.maximum(rho, np.float32(1e-3)) - 1)
    body = rho < 1
    subcut = depth < b["fat"]
    cavity = body & (depth >= b["fat"] + b["muscle"])
    tissue = np.zeros(shape, dtype=np.uint8)
    label = np.zeros(shape, dtype=np.uint8)
    tissue[body] = C_MUSCLE
    tissue[subcut] = C_FAT
    tissue[cavity] = C_SOFT
    for lung in p["lungs"]:
        tissue[cavity & (((x - lung["x"]) / lung["a"]) ** 2 + ((y - lung["y"]) / lung["b"]) ** 2 < 1)] = (
            C_LUNG
        )

    h = p["heart"]
    zb = np.float32(h["z_base"])
    cx = np.float32(h["cx"]) + np.float32(h["sx"]) * (z - zb)
    cy = np.float32(h["cy"]) + np.float32(h["sy"]) * (z - zb)
    dx, dy = x - cx, y - cy
    phi = np.arctan2(dy, dx)
    # slight ellipticity of the LV
    e = np.float32(h["ecc"])
    ca, sa = math.cos(h["ecc_angle"]), math.sin(h["ecc_angle"])
    ru = np.sqrt(((dx * ca + dy * sa) / e) ** 2 + ((-dx * sa + dy * ca) * e) ** 2)
    t_epi = (zb - z) / np.float32(h["length"])
    t_endo = (zb - z) / np.float32(h["length"] - h["thick_apex"])
    in_heart_z = (t_epi >= 0) & (t_epi < 1)
    s_epi = np.sqrt(np.clip(1 - t_epi**2, 0, 1)) * in_heart_z
    s_endo = np.sqrt(np.clip(1 - t_endo**2, 0, 1)) * in_heart_z
    endo_mod = np.ones_like(phi)
    for n, (amp, ph) in enumerate(zip(h["endo_harm"], h["endo_phase"], strict=True), start=2):
        endo_mod += np.float32(amp) * np.cos(n * phi + np.float32(ph))
    th_mod = np.ones_like(phi)
    for n, (amp, ph) in enumerate(zip(h["th_harm"], h["th_phase"], strict=True), start=1):
        th_mod += np.float32(amp) * np.cos(n * phi + np.float32(ph))
    r_endo = np.float32(h["r_endo"]) * endo_mod * s_endo
    r_epi = (np.float32(h["r_endo"]) * endo_mod + np.float32(h["thick"]) * th_mod) * s_epi
    lv = ru < r_endo
    epi = (ru < r_epi) & in_heart_z
    myo = epi & ~lv

    # RV: an ellipse on the septal side (patient's right, anterior) minus the LV epicardium
    r0 = np.float32(h["r_endo"] + h["thick"])  # LV epicardial radius at the base
    s_rv = np.sqrt(np.clip(1 - (t_epi / np.float32(h["rv_end"])) ** 2, 0, 1)) * (t_epi >= 0)
    da, db = math.cos(h["rv_angle"]), math.sin(h["rv_angle"])
    rcx = cx + np.float32(da * h["rv_offset"]) * r0 * s_epi
    rcy = cy + np.float32(db * h["rv_offset"]) * r0 * s_epi
    ex, ey = x - rcx, y - rcy
    along = ex * da + ey * db
    across = -ex * db + ey * da
    psi = np.arctan2(across, along)
    rv_mod = np.ones_like(psi)
    for n, (amp, ph) in enumerate(zip(h["rv_harm"], h["rv_phase"], strict=True), start=2):
        rv_mod += np.float32(amp) * np.cos(n * psi + np.float32(ph))
    a_rv = np.maximum(np.float32(h["rv_a"]) * r0 * s_rv, np.float32(1e-3))
    b_rv = np.maximum(np.float32(h["rv_b"]) * r0 * s_rv, np.float32(1e-3))
    q = np.sqrt((along / a_rv) ** 2 + (across / b_rv) ** 2) / rv_mod
    scale = np.sqrt(a_rv * b_rv)
    rv_in = (q < 1) & (s_rv > 0.05)
    rv_outer = (q < 1 + np.float32(h["rv_wall"]) / np.maximum(scale, 1e-3)) & (s_rv > 0.05)
    rv = rv_in & ~epi
    rv_wall = rv_outer & ~rv & ~epi

    # papillary muscles: on the free wall side, inside the LV cavity (labelled LV as in ACDC)
    pap = np.zeros(shape, dtype=bool)
    mid = (t_endo > 0.15) & (t_endo < 0.75)
    for k, sign in enumerate((-1, 1)):
        ang = h["rv_angle"] + np.pi + sign * h["pap_angle"][k]
        px = cx + math.cos(ang) * 0.72 * np.float32(h["r_endo"]) * s_endo
        py = cy + math.sin(ang) * 0.72 * np.float32(h["r_endo"]) * s_endo
        pap |= ((x - px) ** 2 + (y - py) ** 2 < np.float32(h["pap_r"][k]) ** 2) & mid & lv

    heart = epi | rv_outer
    # pericardial fat: a band around the heart in some sectors (atrioventricular groove-like)
    band = np.zeros(shape, dtype=bool)
    steps = max(1, int(round(h["peri_fat"] / float(grid.spacing[0]))))
    for k in range(shape[2]):
        if heart[:, :, k].any():
            band[:, :, k] = ndimage.binary_dilation(heart[:, :, k], iterations=steps) & ~heart[:, :, k]
    band &= np.cos(2 * phi + np.float32(h["peri_phase"])) > -0.2
    tissue[cavity & band] = C_FAT
    tissue[cavity & heart] = C_MYO
    tissue[cavity & rv] = C_BLOOD
    tissue[cavity & lv] = C_BLOOD
    tissue[cavity & pap] = C_MYO
    tissue[cavity & rv_wall] = C_MYO
    label[cavity & rv] = RV
    label[cavity & myo] = MYO
    label[cavity & lv] = LV

    # liver dome (low slices, patient's right), spine and descending aorta: unlabelled
    liver = ((x + 35) ** 2 + (y - 0) ** 2 + (z - np.float32(h["liver_z"])) ** 2) < np.float32(
        h["liver_r"]
    ) ** 2
    liver &= cavity & ~heart & ~band
    tissue[liver] = C_LIVER
    s = p["spine"]
    vb = (x / s["semi"][0]) ** 2 + ((y - s["y"]) / s["semi"][1]) ** 2
    tissue[body & (vb < 1)] = C_MARROW
    tissue[body & (vb < 1) & (vb > 0.75)] = C_BONE
    a = p["aorta"]
    ao = ((x - a["x"]) ** 2 + (y - a["y"]) ** 2 < a["r"] ** 2) & cavity & ~heart
    tissue[ao] = C_BLOOD
    label[(vb < 1) | ao] = 0
    tissue[~body] = C_AIR
    return tissue, label


def _make_cardiac(grid: _Grid, rngs: dict[str, np.random.Generator]) -> tuple[np.ndarray, np.ndarray, dict]:
    p = _cardiac_params(rngs["anatomy"])
    crng = rngs["contrast"]
    means = np.zeros(len(_CARDIAC_TABLE), dtype=np.float32)
    textures = np.zeros(len(_CARDIAC_TABLE), dtype=np.float32)
    for t, (lo, hi, tex) in _CARDIAC_TABLE.items():
        means[t] = crng.uniform(lo, hi)
        textures[t] = tex
    axes = (grid.axis(0), grid.axis(1), grid.axis(2))
    texture = _smooth_field(rngs["texture"], axes, (5.0, 5.0, 8.0))
    warp_seed = int(rngs["warp"].integers(2**32))
    # thick slices: average three sub-slices (partial volume across the slice); labels: centre
    image = np.zeros(grid.shape, dtype=np.float32)
    label = None
    for offset in (-1 / 3, 0.0, 1 / 3):
        x, y, z = _warped_xy(
            grid, np.random.default_rng(warp_seed), p["warp_mm"], offset * float(grid.spacing[2])
        )
        tissue, lab = _rasterize_cardiac(p, grid, x, y, z)
        image += means[tissue] + textures[tissue] * texture
        if offset == 0.0:
            label = lab
    image /= 3
    image = ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0.0), truncate=3.0, mode="nearest")
    image *= _bias_field(rngs["bias"], grid, 0.15, 0.08)
    sigma = float(rngs["noise"].uniform(10, 20))
    image = _rician(rngs["noise"], image, sigma)
    return image, label, {"noise_sigma": round(sigma, 2)}


# --------------------------------------------------------------------------------------------
# public API


def make_phantom(
    kind: str = "ct",
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    num_tumors: int | None = None,
) -> Phantom:
    """Generate one deterministic synthetic volume.

    Args:
        kind: ``"ct"`` (abdominal CT, HU), ``"mr"`` (abdominal T1-like MR) or ``"cardiac-mr"``
            (short-axis cine-like frame).
        seed: non-negative integer; the same seed and arguments give byte-identical arrays.
            For a given seed the anatomy is the same whatever ``shape``/``spacing``, and
            ``"ct"`` and ``"mr"`` share it.
        shape: ``(X, Y, Z)`` voxels; default :data:`DEFAULT_SHAPES` ``[kind]``.
        spacing: ``(x, y, z)`` voxel size in mm; default :data:`DEFAULT_SPACINGS` ``[kind]``.
            Organ sizes are in mm: the field of view is ``shape * spacing`` and a small one
            crops the anatomy. The abdomen needs ~205 x 205 x 160 mm to show every organ.
        num_tumors: abdominal kinds only: ask for this many liver tumours (0 to 8) instead of
            the seed's 0 to 4 (a tumour bundle wants lesions in every case). The first four
            keep the seed's sizes and places; a tumour that finds no room in the liver is still
            skipped, so ``info["tumors"]`` says how many were placed. None: the seed decides.

    Returns:
        A :class:`Phantom` (float32 image, uint8 label, RAS affine centred on world 0).

    Raises:
        ValueError: unknown kind, a shape that is not 3 positive integers, a spacing that is
            not 3 positive numbers, a negative seed, or ``num_tumors`` outside 0..8 (or given
            for the cardiac kind).
    """
    kind = _check_kind(kind)
    num_tumors = _check_num_tumors(num_tumors, kind)
    seed = _check_seed(seed)
    shape = _check_shape(shape, kind)
    spacing = _check_spacing(spacing, kind)
    grid = _Grid.centred(shape, spacing)
    rngs = _streams(seed)
    if kind == "cardiac-mr":
        image, label, info = _make_cardiac(grid, rngs)
    else:
        image, label, info = _make_abdomen(kind, grid, rngs, num_tumors)
    # the layout frame has +x to the patient's left; RAS+ has it to the right (see module doc)
    image, label = image[::-1], label[::-1]
    for tumor in info.get("tumors", []):
        tumor["center_mm"][0] = -tumor["center_mm"][0]
    info = {
        "seed": seed,
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "fov_mm": [round(n * s, 3) for n, s in zip(shape, spacing, strict=True)],
        **info,
    }
    return Phantom(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=np.ascontiguousarray(label, dtype=np.uint8),
        affine=grid.affine,
        label_names=dict(LABEL_NAMES[kind]),
        modality=MODALITIES[kind],
        kind=kind,
        info=info,
    )


MAX_TUMORS = 8


def _check_num_tumors(num_tumors, kind: str) -> int | None:
    if num_tumors is None:
        return None
    if kind == "cardiac-mr":
        raise ValueError("num_tumors applies to the abdominal phantoms ('ct', 'mr'), not 'cardiac-mr'")
    if isinstance(num_tumors, bool) or not isinstance(num_tumors, int | np.integer):
        raise ValueError(f"num_tumors must be an integer from 0 to {MAX_TUMORS} or None, got {num_tumors!r}")
    if not 0 <= num_tumors <= MAX_TUMORS:
        raise ValueError(f"num_tumors must be an integer from 0 to {MAX_TUMORS} or None, got {num_tumors!r}")
    return int(num_tumors)


def _stored_image(phantom: Phantom) -> np.ndarray:
    """The array written to disk: CT as int16 HU, MR as float32."""
    if phantom.modality == "CT":
        return np.clip(np.rint(phantom.image), -1024, 3071).astype(np.int16)
    return phantom.image.astype(np.float32)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, tmp_dir: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    tmp = tmp_dir / path.name
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def save_phantom(phantom: Phantom, image_path: str | Path, label_path: str | Path) -> None:
    """Write a phantom's image (CT int16 HU / MR float32) and label (uint8) as NIfTI files.

    Each file is first written under a temporary name in its target folder, then renamed, so a
    crash never leaves a truncated file under the final name.
    """
    for array, path in ((_stored_image(phantom), Path(image_path)), (phantom.label, Path(label_path))):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-phantom-", dir=path.parent) as tmp:
            _save_nifti(array, phantom.affine, path, Path(tmp))


#: organs whose reference mask includes other labels (the liver holds its tumours)
_ORGAN_INCLUDES: dict[str, dict[int, tuple[int, ...]]] = {"ct": {LIVER: (TUMOR,)}, "mr": {LIVER: (TUMOR,)}}


def write_oracle_prompts(label_path: str | Path, prompt_path: str | Path, kind: str) -> Path:
    """One box per organ on its largest axial slice, in world (RAS mm) coordinates: a prompt file.

    Written from the label file as loaded (RAS), so it fits the NIfTI image and its DICOM series
    alike (``monai-sam segment --prompts``). Tumours are not organs: they lie inside the liver's box.
    """
    from monai_sam.data.loading import load_volume
    from monai_sam.io.prompt_file import write_prompt_file
    from monai_sam.prompts import ObjectPrompts, SlicePrompt
    from monai_sam.transforms.prompts import box_from_mask

    label = load_volume(label_path)
    values = np.rint(label[0].numpy()).astype(np.int32)
    includes = _ORGAN_INCLUDES.get(kind, {})
    nested = {v for vs in includes.values() for v in vs}
    objects = []
    for value, name in LABEL_NAMES[kind].items():
        if value == 0 or value in nested:
            continue
        mask = np.isin(values, (value, *includes.get(value, ())))
        if not mask.any():
            continue
        k = int(np.argmax(mask.sum(axis=(0, 1))))
        objects.append(ObjectPrompts(value, name, [SlicePrompt(k, box=box_from_mask(mask[..., k]))]))
    return write_prompt_file(prompt_path, objects, label, coordinates="world")


def write_phantom_dataset(
    kind: str,
    num_cases: int,
    out_dir: str | Path,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    dicom: bool = False,
    num_tumors: int | None = None,
) -> Path:
    """Write a Decathlon-style dataset of phantoms.

    Layout::

        out_dir/imagesTr/phantom_<kind>_000.nii.gz   CT: int16 HU; MR: float32 (arbitrary units)
        out_dir/labelsTr/phantom_<kind>_000.nii.gz   uint8
        out_dir/dicom/phantom_<kind>_000/            only with dicom=True: one DICOM series
        out_dir/prompts/phantom_<kind>_000.json      oracle prompts: a box per organ (world mm)
        out_dir/dataset.json                         written last

    ``<kind>`` is ``ct``, ``mr`` or ``cardiac_mr``; case ``i`` uses seed ``seed + i``. Files are
    written under temporary names and renamed; ``dataset.json`` is written last (and an existing
    one is removed first), so an interrupted run never looks like a complete dataset.

    Args:
        kind: one of :data:`PHANTOM_KINDS`.
        num_cases: number of cases (>= 1).
        out_dir: the dataset folder (created if needed; existing cases are overwritten).
        seed, shape, spacing: as for :func:`make_phantom`.
        dicom: also write each image as a DICOM series (``monai_sam.io.dicom.write_dicom_series``).
        num_tumors: liver tumours asked for in every case (see :func:`make_phantom`).

    Returns:
        The path of ``dataset.json``.

    Raises:
        ValueError: invalid kind, ``num_cases`` < 1, bad shape/spacing/seed.
    """
    from tqdm.auto import tqdm

    kind = _check_kind(kind)
    if isinstance(num_cases, bool) or not isinstance(num_cases, int | np.integer) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}")
    seed = _check_seed(seed)
    shape = _check_shape(shape, kind)
    spacing = _check_spacing(spacing, kind)
    num_tumors = _check_num_tumors(num_tumors, kind)
    out_dir = Path(out_dir)
    images_dir, labels_dir = out_dir / "imagesTr", out_dir / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "dataset.json"
    if json_path.exists():
        logger.warning("%s exists; it is removed until the new dataset is complete", json_path)
        json_path.unlink()

    write_series = None
    if dicom:
        from monai_sam.io.dicom import write_dicom_series as write_series

        takes_uid_seed = "uid_seed" in inspect.signature(write_series).parameters

    stem = "phantom_" + kind.replace("-", "_")
    training = []
    with tempfile.TemporaryDirectory(prefix=".tmp-phantom-", dir=out_dir) as tmp:
        tmp_dir = Path(tmp)
        for i in tqdm(range(int(num_cases)), desc=f"phantoms ({kind})", unit="case"):
            case = f"{stem}_{i:03d}"
            phantom = make_phantom(kind, seed + i, shape, spacing, num_tumors=num_tumors)
            stored = _stored_image(phantom)
            _save_nifti(stored, phantom.affine, images_dir / f"{case}.nii.gz", tmp_dir)
            _save_nifti(phantom.label, phantom.affine, labels_dir / f"{case}.nii.gz", tmp_dir)
            write_oracle_prompts(labels_dir / f"{case}.nii.gz", out_dir / "prompts" / f"{case}.json", kind)
            if write_series is not None:
                series_dir = out_dir / "dicom" / case
                if series_dir.exists():
                    shutil.rmtree(series_dir)
                series_dir.parent.mkdir(parents=True, exist_ok=True)
                kwargs = dict(
                    modality=phantom.modality,
                    patient_id=case,
                    series_description=f"monai-sam synthetic phantom ({kind})",
                )
                if takes_uid_seed:
                    kwargs["uid_seed"] = f"monai-sam-phantom-{kind}-{seed + i}"
                write_series(stored, phantom.affine, series_dir, **kwargs)
                logger.info("DICOM series of %s written to %s", case, series_dir)
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
            logger.debug("wrote %s (seed %d, tumours %s)", case, seed + i, phantom.info.get("tumors"))

        modality = MODALITIES[kind]
        dataset = {
            "name": stem,
            "description": (
                f"synthetic phantom, generated by monai-sam (kind={kind}, seed={seed}, "
                f"shape={list(shape)}, spacing={list(spacing)} mm"
                + (f", num_tumors={num_tumors}" if num_tumors is not None else "")
                + ")"
            ),
            "reference": "monai-sam: monai_sam.data.phantom",
            "licence": "CC0-1.0 (generated data)",
            "release": "1.0",
            "tensorImageSize": "3D",
            "modality": {"0": modality},
            "labels": {str(k): v for k, v in LABEL_NAMES[kind].items()},
            "numTraining": len(training),
            "numTest": 0,
            "training": training,
            "test": [],
        }
        tmp_json = tmp_dir / "dataset.json"
        tmp_json.write_text(json.dumps(dataset, indent=2) + "\n")
        os.replace(tmp_json, json_path)
    logger.info("wrote %d %s phantom case(s) to %s", len(training), kind, out_dir)
    if dicom:
        logger.info("DICOM series are in %s", out_dir / "dicom")
    return json_path


def ensure_phantom_dataset(
    dataset_dir: str | Path,
    kind: str = "ct",
    num_cases: int = 10,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    num_tumors: int | None = None,
) -> Path:
    """``dataset_dir/dataset.json``, generating the phantom dataset first if the folder is absent.

    This is how bundles get their embedded default data on a fresh machine. A folder that
    exists without a ``dataset.json`` is someone's data, not ours to fill: that is an error.
    """
    dataset_dir = Path(dataset_dir)
    dataset_json = dataset_dir / "dataset.json"
    if dataset_json.is_file():
        return dataset_json
    if dataset_dir.exists() and any(dataset_dir.iterdir()):
        raise FileNotFoundError(
            f"{dataset_dir} exists but has no dataset.json; point dataset_dir at a Decathlon-style folder "
            "(imagesTr/, labelsTr/, dataset.json) or at a folder that does not exist yet to generate phantoms"
        )
    logger.info("dataset_dir %s is absent: generating %d synthetic %s phantoms there", dataset_dir, num_cases, kind)
    return write_phantom_dataset(kind, num_cases, dataset_dir, seed=seed, shape=shape, spacing=spacing,
                                 num_tumors=num_tumors)
