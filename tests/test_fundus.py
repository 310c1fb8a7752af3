"""Tests of the synthetic fundus photographs (monai_sam.data.fundus)."""

from __future__ import annotations

import json
import math
from functools import cache

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from monai_sam.data import fundus as fundus_mod
from monai_sam.data.fundus import (
    FUNDUS_LABELS,
    FUNDUS_REGIONS,
    Fundus,
    make_fundus,
    save_fundus,
    vertical_cup_to_disc_ratio,
    write_fundus_dataset,
)

SIZE = 256
SEEDS = tuple(range(10))


@cache
def _fundus(seed: int, size: int = SIZE) -> Fundus:
    return make_fundus(seed, size)


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32).mean(axis=-1)


def _fov(f: Fundus) -> np.ndarray:
    size = f.label.shape[0]
    ii, jj = np.mgrid[0:size, 0:size]
    ci, cj = f.info["fov_center"]
    return np.hypot(ii - ci, jj - cj) < f.info["fov_radius"]


# ---------------------------------------------------------------------------------------------
# vertical cup-to-disc ratio on hand-made masks


def _hand_label(disc_rows=(10, 29), cup_rows=(15, 24), shape=(40, 30)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    if disc_rows is not None:
        label[disc_rows[0] : disc_rows[1] + 1, 5:25] = 1
    if cup_rows is not None:
        label[cup_rows[0] : cup_rows[1] + 1, 10:20] = 2
    return label


def test_vcdr_hand_made_exact():
    label = _hand_label()  # disc rows 10-29 (20 px), cup rows 15-24 (10 px)
    assert vertical_cup_to_disc_ratio(label) == 0.5
    # the width of the regions does not matter, only their vertical extents
    label[15:25, 6:24] = 2
    assert vertical_cup_to_disc_ratio(label) == 0.5
    # cup rows 12-26 (15 px) / 20 px
    assert vertical_cup_to_disc_ratio(_hand_label(cup_rows=(12, 26))) == 0.75


def test_vcdr_no_cup_no_disc():
    assert vertical_cup_to_disc_ratio(_hand_label(cup_rows=None)) == 0.0
    assert math.isnan(vertical_cup_to_disc_ratio(np.zeros((20, 20), dtype=np.uint8)))
    # a cup with no rim is still a disc (disc = labels {1, 2}): ratio 1
    assert vertical_cup_to_disc_ratio(_hand_label(disc_rows=None, cup_rows=(3, 12))) == 1.0


def test_vcdr_extent_counts_all_pixels():
    # two cup pieces, rows 12-13 and 26-27: extent 16 rows, not 4
    label = _hand_label(cup_rows=None)
    label[12:14, 10:20] = 2
    label[26:28, 10:20] = 2
    assert vertical_cup_to_disc_ratio(label) == pytest.approx(16 / 20)


def test_vcdr_axes_and_containers():
    label = _hand_label()
    # columns are not rows: the horizontal extents are 10/20 px as well, so use an asymmetric cup
    label2 = _hand_label(cup_rows=(15, 18))  # 4 / 20 vertically, 10 / 20 horizontally
    assert vertical_cup_to_disc_ratio(label2) == pytest.approx(0.2)
    assert vertical_cup_to_disc_ratio(label2.T, vertical_axis=1) == pytest.approx(0.2)
    assert vertical_cup_to_disc_ratio(label2.T) == pytest.approx(0.5)  # (W, H) read as (H, W)
    # MONAI channel-first, float arrays with integer values, torch tensors
    assert vertical_cup_to_disc_ratio(label[None]) == 0.5
    assert vertical_cup_to_disc_ratio(label.astype(np.float32)) == 0.5
    torch = pytest.importorskip("torch")
    assert vertical_cup_to_disc_ratio(torch.as_tensor(label)[None]) == 0.5


def test_vcdr_bad_input():
    with pytest.raises(ValueError, match="2D"):
        vertical_cup_to_disc_ratio(np.zeros((2, 5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="found \\[3\\]"):
        vertical_cup_to_disc_ratio(np.full((5, 5), 3, dtype=np.uint8))
    with pytest.raises(ValueError, match="found"):
        vertical_cup_to_disc_ratio(np.full((5, 5), 0.5))
    with pytest.raises(ValueError, match="boolean"):
        vertical_cup_to_disc_ratio(np.ones((5, 5), dtype=bool))
    with pytest.raises(ValueError, match="vertical_axis"):
        vertical_cup_to_disc_ratio(_hand_label(), vertical_axis=2)


# ---------------------------------------------------------------------------------------------
# one photograph


def test_types_shapes_and_black_corners():
    f = _fundus(0)
    assert isinstance(f, Fundus)
    assert f.image.shape == (SIZE, SIZE, 3) and f.image.dtype == np.uint8
    assert f.label.shape == (SIZE, SIZE) and f.label.dtype == np.uint8
    assert set(np.unique(f.label).tolist()) == {0, 1, 2}
    for corner in (f.image[:8, :8], f.image[:8, -8:], f.image[-8:, :8], f.image[-8:, -8:]):
        assert corner.max() == 0
    fov = _fov(f)
    assert f.image[fov].mean() > 60  # a lit retina inside the field of view
    # reddish-orange: red > green > blue on the retina
    means = f.image[fov & (f.label == 0)].reshape(-1, 3).mean(axis=0)
    assert means[0] > means[1] > means[2]
    assert means[0] > 1.5 * means[1]
    # nothing labelled outside the field of view
    assert not f.label[~fov].any()


def test_deterministic_per_seed():
    a, b = make_fundus(3, 128), make_fundus(3, 128)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.cup_to_disc_ratio == b.cup_to_disc_ratio
    assert a.info == b.info
    c = make_fundus(4, 128)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)


@pytest.mark.parametrize("seed", SEEDS)
def test_cup_inside_disc(seed):
    f = _fundus(seed)
    disc, cup = f.label > 0, f.label == 2
    assert cup.sum() > 20 and (f.label == 1).sum() > 20
    # one disc, one cup, and the cup never touches the background (a rim all around it)
    assert ndimage.label(disc)[1] == 1
    assert ndimage.label(cup)[1] == 1
    assert not (ndimage.binary_dilation(cup) & ~disc).any()
    rows = np.flatnonzero(disc.any(axis=1))
    cup_rows = np.flatnonzero(cup.any(axis=1))
    assert rows[0] < cup_rows[0] and cup_rows[-1] < rows[-1]


@pytest.mark.parametrize("seed", SEEDS)
def test_disc_geometry(seed):
    f = _fundus(seed)
    fov_diameter = 2 * f.info["fov_radius"]
    vertical, horizontal = f.info["disc_diameter_px"]
    assert fov_diameter / 9 < vertical < fov_diameter / 5.5  # ~1/6-1/8 of the field of view
    assert horizontal <= vertical + 1  # vertically elongated (or round)
    # eye by seed parity: right eye = disc right of the centre, macula on the other side
    centre_col = f.info["fov_center"][1]
    disc_col, fovea_col = f.info["disc_center"][1], f.info["fovea_center"][1]
    if f.info["eye"] == "right":
        assert seed % 2 == 0
        assert disc_col > centre_col > fovea_col
    else:
        assert disc_col < centre_col < fovea_col
    distance = math.dist(f.info["disc_center"], f.info["fovea_center"])
    assert 2.0 * vertical < distance < 3.0 * vertical


def test_cdr_matches_label_and_varies():
    measured, design = [], []
    for seed in SEEDS:
        f = _fundus(seed)
        assert f.cup_to_disc_ratio == vertical_cup_to_disc_ratio(f.label)
        assert abs(f.cup_to_disc_ratio - f.info["design_vertical_cdr"]) < 0.05
        measured.append(f.cup_to_disc_ratio)
        design.append(f.info["design_vertical_cdr"])
    assert min(measured) < 0.45 and max(measured) > 0.6
    assert 0.25 <= min(design) and max(design) <= 0.8
    # glaucomatous (large-cup) cases have the large cups
    glaucoma = [_fundus(s).info["glaucomatous"] for s in SEEDS]
    assert any(glaucoma) and not all(glaucoma)
    for g, m in zip(glaucoma, measured, strict=True):
        assert (m > 0.55) if g else (m < 0.65)


@pytest.mark.parametrize("seed", SEEDS)
def test_disc_brighter_than_background_cup_brighter_than_rim(seed):
    f = _fundus(seed)
    grey = _grey(f.image)
    fov = _fov(f)
    background = grey[fov & (f.label == 0)].mean()
    rim, cup = grey[f.label == 1].mean(), grey[f.label == 2].mean()
    disc = grey[f.label > 0].mean()
    assert disc > background + 30
    assert cup > rim + 5
    # the disc is yellowish: more green relative to red than the retina around it
    img = f.image.astype(np.float32)
    ratio = img[..., 1] / np.maximum(img[..., 0], 1)
    assert ratio[f.label > 0].mean() > ratio[fov & (f.label == 0)].mean() + 0.1


def test_macula_darker_and_vignetting():
    for seed in SEEDS[:4]:
        f = _fundus(seed)
        grey = _grey(f.image)
        size = grey.shape[0]
        ii, jj = np.mgrid[0:size, 0:size]
        ci, cj = f.info["fov_center"]
        radius = np.hypot(ii - ci, jj - cj) / f.info["fov_radius"]
        fi, fj = f.info["fovea_center"]
        d_fovea = np.hypot(ii - fi, jj - fj)
        vertical = f.info["disc_diameter_px"][0]
        background = f.label == 0
        # the macula against the rest of the retina at the same distance from the centre
        r_fovea = math.hypot(fi - ci, fj - cj) / f.info["fov_radius"]
        ring = background & (abs(radius - r_fovea) < 0.05) & (d_fovea > 1.5 * vertical)
        ring &= np.hypot(ii - f.info["disc_center"][0], jj - f.info["disc_center"][1]) > vertical
        macula = d_fovea < 0.3 * vertical
        assert grey[macula].mean() < 0.9 * np.median(grey[ring])
        # darker towards the edge of the field of view
        centre_region = background & (radius < 0.35) & (d_fovea > vertical)
        edge_region = background & (radius > 0.8) & (radius < 0.95)
        assert np.median(grey[edge_region]) < 0.9 * np.median(grey[centre_region])


def _dark_thin_fraction(f: Fundus) -> tuple[float, float]:
    """Fraction of retina pixels much darker (green) than their local background, and the part
    of them that survives an opening by a 7x7 square (i.e. not thin)."""
    green = f.image[..., 1].astype(np.float32)
    local = ndimage.median_filter(green, size=15)
    fov = ndimage.binary_erosion(_fov(f), iterations=10)
    region = fov & ~ndimage.binary_dilation(f.label > 0, iterations=4)
    dark = (green < 0.8 * local) & region
    fraction = dark.sum() / region.sum()
    thick = ndimage.binary_opening(dark, structure=np.ones((7, 7), dtype=bool))
    return float(fraction), float(thick.sum() / max(dark.sum(), 1))


def test_vessels_are_dark_thin_structures(monkeypatch):
    for seed in SEEDS[:3]:
        f = _fundus(seed)
        fraction, thick = _dark_thin_fraction(f)
        assert fraction > 0.01
        assert thick < 0.2
        assert f.info["num_vessels"] >= 10
        # darker and denser near the disc: the main trunks
        # (the dark pixels are connected to the disc through long structures)
        green = f.image[..., 1].astype(np.float32)
        dark = green < 0.8 * ndimage.median_filter(green, size=15)
        components, n = ndimage.label(dark & _fov(f))
        sizes = np.bincount(components.ravel())[1:]
        assert n > 0 and sizes.max() > 200
    # control: the same photograph with its vessels removed has no such structures
    monkeypatch.setattr(
        fundus_mod,
        "_render_vessels",
        lambda vessels, shape, chunk=12: (np.zeros(shape, np.float32), np.zeros(shape, np.float32)),
    )
    fraction, _ = _dark_thin_fraction(make_fundus(0, SIZE))
    assert fraction < 0.002


def test_size_changes_sampling_not_anatomy():
    small, large = make_fundus(5, 256), make_fundus(5, 512)
    assert small.info["eye"] == large.info["eye"]
    assert small.info["design_vertical_cdr"] == large.info["design_vertical_cdr"]
    for key in ("disc_center", "fovea_center"):
        np.testing.assert_allclose(np.asarray(small.info[key]) * 2, large.info[key], atol=3.0)
    assert abs(small.cup_to_disc_ratio - large.cup_to_disc_ratio) < 0.05
    down = ndimage.zoom((large.label > 0).astype(np.float32), 0.5, order=1) > 0.5
    disc = small.label > 0
    dice = 2 * (down & disc).sum() / (down.sum() + disc.sum())
    assert dice > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"size": 32}, "size"),
        ({"size": 256.0}, "size"),
        ({"size": False}, "size"),
    ],
)
def test_make_fundus_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_fundus(**kwargs)


# ---------------------------------------------------------------------------------------------
# dataset


def test_write_dataset(tmp_path):
    out = tmp_path / "fundus"
    path = write_fundus_dataset(3, out, seed=4, size=96)
    assert path == out / "dataset.json"
    data = json.loads(path.read_text())
    assert data["modality"] == {"0": "RGB"}
    assert data["tensorImageSize"] == "2D"
    assert data["labels"] == {str(k): v for k, v in FUNDUS_LABELS.items()}
    assert data["labels"] == {"0": "background", "1": "optic_disc_rim", "2": "optic_cup"}
    assert data["regions"] == FUNDUS_REGIONS == {"optic_disc": [1, 2], "optic_cup": [2]}
    assert "synthetic" in data["description"]
    assert data["numTraining"] == 3 and len(data["training"]) == 3
    for i, entry in enumerate(data["training"]):
        assert entry["image"] == f"./imagesTr/fundus_{i:03d}.png"
        assert entry["label"] == f"./labelsTr/fundus_{i:03d}.png"
        expected = make_fundus(4 + i, 96)
        with Image.open(out / entry["image"]) as im:
            assert im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), expected.image)
        with Image.open(out / entry["label"]) as im:
            assert im.mode == "L"
            label = np.asarray(im)
        np.testing.assert_array_equal(label, expected.label)
        assert entry["vertical_cdr"] == pytest.approx(vertical_cup_to_disc_ratio(label), abs=1e-4)
    # only the dataset remains (no temporary files)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert len(list((out / "imagesTr").iterdir())) == 3

    # the project's datalist reader takes it
    from monai_sam.data.datalist import datalist_from_decathlon

    items = datalist_from_decathlon(path)
    assert len(items) == 3
    assert all(str(p).endswith(".png") for item in items for p in (item["image"], item["label"]))

    # writing again replaces the dataset
    write_fundus_dataset(2, out, seed=0, size=96)
    data = json.loads(path.read_text())
    assert data["numTraining"] == 2
    with Image.open(out / "imagesTr" / "fundus_000.png") as im:
        np.testing.assert_array_equal(np.asarray(im), make_fundus(0, 96).image)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_cases": 0}, "num_cases"),
        ({"num_cases": -2}, "num_cases"),
        ({"num_cases": 1.0}, "num_cases"),
        ({"num_cases": True}, "num_cases"),
        ({"num_cases": 1, "seed": -1}, "seed"),
        ({"num_cases": 1, "size": 16}, "size"),
    ],
)
def test_write_dataset_bad_args(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_fundus_dataset(out_dir=tmp_path / "x", **kwargs)
    assert not (tmp_path / "x" / "dataset.json").exists()


def test_write_dataset_out_dir_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        write_fundus_dataset(1, target, size=64)


def test_save_fundus_round_trip(tmp_path):
    f = make_fundus(2, 64)
    save_fundus(f, tmp_path / "a" / "img.png", tmp_path / "b" / "lbl.png")
    with Image.open(tmp_path / "a" / "img.png") as im:
        np.testing.assert_array_equal(np.asarray(im), f.image)
    with Image.open(tmp_path / "b" / "lbl.png") as im:
        np.testing.assert_array_equal(np.asarray(im), f.label)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["img.png"]  # no temporary left
