"""Tests of the synthetic phantoms (monai_sam.data.phantom)."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
from scipy import ndimage

from monai_sam.data.phantom import (
    DEFAULT_SHAPES,
    DEFAULT_SPACINGS,
    LABEL_NAMES,
    PHANTOM_KINDS,
    Phantom,
    make_phantom,
    write_phantom_dataset,
)

# small grids with the default field of view (~205 x 205 x 160 mm), cheap to generate
TINY = ((64, 64, 24), (3.2, 3.2, 6.7))
MEDIUM = ((128, 128, 48), (1.6, 1.6, 3.34))


@cache
def _phantom(kind: str, seed: int, size: str = "medium") -> Phantom:
    shape, spacing = {"tiny": TINY, "medium": MEDIUM}[size]
    return make_phantom(kind, seed, shape, spacing)


def _voxel_ml(ph: Phantom) -> float:
    return float(abs(np.linalg.det(ph.affine[:3, :3]))) / 1000.0


def _centroid_world(ph: Phantom, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return ph.affine[:3, :3] @ idx + ph.affine[:3, 3]


def _moment_ellipsoid_dice(mask: np.ndarray, spacing: np.ndarray) -> float:
    """Dice between a mask and the solid ellipsoid with the same centre and second moments."""
    pts = np.argwhere(mask) * spacing
    centre = pts.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov((pts - centre).T))
    semi = np.sqrt(5.0 * evals)  # a solid ellipsoid has variance semi**2 / 5 along each axis
    axes = [np.arange(n) * s for n, s in zip(mask.shape, spacing, strict=False)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) - centre
    ellipsoid = (((grid @ evecs) / semi) ** 2).sum(axis=-1) < 1
    return 2.0 * float((ellipsoid & mask).sum()) / float(ellipsoid.sum() + mask.sum())


# ---------------------------------------------------------------------------------------------
# API basics and determinism


def test_defaults_and_types():
    assert PHANTOM_KINDS == ("ct", "mr", "cardiac-mr")
    assert DEFAULT_SHAPES["ct"] == (256, 256, 64)
    assert DEFAULT_SPACINGS["ct"] == (0.8, 0.8, 2.5)
    assert DEFAULT_SHAPES["cardiac-mr"] == (192, 192, 12)
    assert LABEL_NAMES["ct"] == {
        0: "background",
        1: "liver",
        2: "spleen",
        3: "kidney_right",
        4: "kidney_left",
        5: "aorta",
        6: "liver_tumor",
    }
    assert LABEL_NAMES["cardiac-mr"] == {
        0: "background",
        1: "right_ventricle",
        2: "myocardium",
        3: "left_ventricle",
    }
    for kind, modality in (("ct", "CT"), ("mr", "MR"), ("cardiac-mr", "MR")):
        ph = _phantom(kind, 0, "tiny")
        assert ph.kind == kind and ph.modality == modality
        assert ph.image.shape == ph.label.shape == TINY[0]
        assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
        assert ph.affine.dtype == np.float64 and ph.affine.shape == (4, 4)
        assert np.allclose(np.diag(ph.affine)[:3], TINY[1])
        assert ph.label_names == LABEL_NAMES[kind]
        assert set(np.unique(ph.label)) <= set(ph.label_names)
        assert np.isfinite(ph.image).all()
        # the volume is centred on world (0, 0, 0)
        centre = ph.affine @ np.append((np.array(TINY[0]) - 1) / 2.0, 1.0)
        assert np.allclose(centre[:3], 0.0, atol=1e-6)


def test_default_ct_shape_and_fov():
    ph = make_phantom("ct", 0)
    assert ph.image.shape == (256, 256, 64)
    assert np.allclose(np.diag(ph.affine)[:3], (0.8, 0.8, 2.5))
    assert ph.info["fov_mm"] == pytest.approx([204.8, 204.8, 160.0])
    for value in range(1, 6):
        assert (ph.label == value).any(), LABEL_NAMES["ct"][value]
    assert ph.image.min() < -900  # air around the body
    assert (ph.image[ph.label == 5].mean()) > 150  # contrast-enhanced aorta


@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_determinism(kind):
    shape, spacing = TINY
    a = make_phantom(kind, 7, shape, spacing)
    b = make_phantom(kind, 7, shape, spacing)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert np.array_equal(a.affine, b.affine)
    c = make_phantom(kind, 8, shape, spacing)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)


def test_global_random_state_untouched():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    _ = make_phantom("ct", 3, *TINY)
    assert np.array_equal(np.random.random(3), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "pet"},
        {"kind": "CT"},
        {"shape": (64, 0, 24)},
        {"shape": (64, -1, 24)},
        {"shape": (64, 64)},
        {"shape": (64.0, 64, 24)},
        {"spacing": (1.0, 0.0, 2.0)},
        {"spacing": (1.0, float("nan"), 2.0)},
        {"seed": -1},
    ],
)
def test_make_phantom_rejects_bad_arguments(kwargs):
    args = {"kind": "ct", "seed": 0, "shape": TINY[0], "spacing": TINY[1], **kwargs}
    with pytest.raises(ValueError):
        make_phantom(**args)


# ---------------------------------------------------------------------------------------------
# abdominal CT anatomy


@pytest.mark.parametrize("seed", [0, 1])
def test_ct_organs_present_with_plausible_volumes(seed):
    ph = _phantom("ct", seed)
    ml = _voxel_ml(ph)
    volumes = {name: float((ph.label == v).sum()) * ml for v, name in ph.label_names.items() if v}
    # the phantom body is compact (~19 x 16 cm) and the field of view crops the liver dome
    assert 500 <= volumes["liver"] + volumes["liver_tumor"] <= 2500, volumes
    assert 50 <= volumes["spleen"] <= 600, volumes
    assert 50 <= volumes["kidney_right"] <= 350, volumes
    assert 50 <= volumes["kidney_left"] <= 350, volumes
    # aorta: a ~2 cm tube through the whole abdomen
    aorta_slices = (ph.label == 5).any(axis=(0, 1))
    assert aorta_slices.mean() >= 0.8
    assert 20 <= volumes["aorta"] <= 120, volumes


@pytest.mark.parametrize("seed", [0, 1])
def test_ct_anatomical_layout_ras(seed):
    ph = _phantom("ct", seed)
    body = ph.image > -500
    c = {name: _centroid_world(ph, ph.label == v) for v, name in ph.label_names.items() if 0 < v < 6}
    body_c = _centroid_world(ph, body)
    # RAS+: +x points to the patient's right. The liver is on the right, the spleen on the left.
    assert c["liver"][0] > c["spleen"][0]
    assert c["liver"][0] > body_c[0]
    assert c["spleen"][0] < body_c[0]
    assert c["kidney_right"][0] > body_c[0] > c["kidney_left"][0]
    # kidneys are posterior (small y) to the liver; the aorta is left of the midline
    assert c["kidney_right"][1] < c["liver"][1] and c["kidney_left"][1] < c["liver"][1]
    assert c["aorta"][0] < body_c[0] + 2
    # craniocaudal order: liver and spleen above the kidneys (+z superior)
    assert c["liver"][2] > c["kidney_right"][2]
    assert c["spleen"][2] > c["kidney_left"][2]
    # the right kidney sits lower than the left one
    assert c["kidney_right"][2] < c["kidney_left"][2]
    # organs have craniocaudal extents: the kidneys are not on every slice
    assert not (ph.label == 3).any(axis=(0, 1)).all()


def test_ct_intensities():
    ph = _phantom("ct", 0)
    img, lab = ph.image, ph.label
    liver = img[lab == 1].mean()
    spleen = img[lab == 2].mean()
    kidney = img[(lab == 3) | (lab == 4)].mean()
    aorta = img[lab == 5].mean()
    assert 40 < liver < 80
    assert 35 < spleen < 65 and spleen < liver
    assert 110 < kidney < 200
    assert 150 < aorta < 230
    # air outside the body, bone present (unlabelled), noise of the order of 10-20 HU
    assert np.median(img[:3, :3, :]) < -950
    assert (img[lab == 0] > 300).sum() * _voxel_ml(ph) > 5  # > 5 mL of bone
    air = img[:4, :4, :].ravel()
    assert 5 < np.std(air) < 25


def _tumor_seeds():
    counts = {}
    for seed in range(10):
        ph = _phantom("ct", seed, "tiny")
        _, n = ndimage.label(ph.label == 6)
        counts[seed] = n
    return counts


def test_tumor_counts_vary_with_seed():
    counts = _tumor_seeds()
    assert any(n == 0 for n in counts.values()), counts
    assert any(n >= 2 for n in counts.values()), counts
    # the info dict agrees with the label map on which cases have tumours
    for seed, n in counts.items():
        assert (len(_phantom("ct", seed, "tiny").info["tumors"]) > 0) == (n > 0)


def test_tumors_inside_liver_and_hypodense():
    checked = 0
    for seed in range(10):
        ph = _phantom("ct", seed)
        tumor = ph.label == 6
        if not tumor.any():
            continue
        checked += 1
        # the shell just outside every tumour is liver
        ring = ndimage.binary_dilation(tumor, iterations=1) & ~tumor
        assert (ph.label[ring] == 1).mean() > 0.9, seed
        # each tumour is enclosed by the liver: its envelope (liver + tumours) has no gap there
        envelope = ndimage.binary_fill_holes((ph.label == 1) | tumor)
        assert envelope[tumor].all()
        # hypodense: darker than the liver, in the 20-35 HU range before noise
        assert ph.image[tumor].mean() < ph.image[ph.label == 1].mean() - 10
        for t in ph.info["tumors"]:
            assert 5.0 <= t["diameter_mm"] <= 40.0 and t["voxels"] >= 1
        if checked == 3:
            break
    assert checked >= 2


def test_shapes_are_irregular_not_ellipsoids():
    ph = _phantom("ct", 0)
    spacing = np.diag(ph.affine)[:3]
    # control: a voxelised perfect ellipsoid matches its moment ellipsoid almost exactly
    axes = [np.arange(n) * s - n * s / 2 for n, s in zip(ph.label.shape, spacing, strict=False)]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij")
    ellipsoid = (gx / 20) ** 2 + ((gy - 10) / 17) ** 2 + ((gz + 5) / 45) ** 2 < 1
    assert _moment_ellipsoid_dice(ellipsoid, spacing) > 0.97
    # organs do not: bumps, hilum, bends, two liver lobes
    assert _moment_ellipsoid_dice(ph.label == 1, spacing) < 0.9
    assert _moment_ellipsoid_dice(ph.label == 3, spacing) < 0.95
    assert _moment_ellipsoid_dice(ph.label == 2, spacing) < 0.95
    # but they stay organ-like (one blob, roughly the moment ellipsoid)
    assert _moment_ellipsoid_dice(ph.label == 3, spacing) > 0.75
    _, n = ndimage.label(ph.label == 3)
    assert n == 1


def test_physical_size_independent_of_sampling():
    coarse = _phantom("ct", 2, "tiny")
    fine = _phantom("ct", 2, "medium")
    for value in (1, 2, 3, 4):
        v_coarse = (coarse.label == value).sum() * _voxel_ml(coarse)
        v_fine = (fine.label == value).sum() * _voxel_ml(fine)
        assert v_coarse == pytest.approx(v_fine, rel=0.2), LABEL_NAMES["ct"][value]
        assert np.allclose(
            _centroid_world(coarse, coarse.label == value),
            _centroid_world(fine, fine.label == value),
            atol=6.0,
        )


# ---------------------------------------------------------------------------------------------
# abdominal MR


def test_mr_contrast_and_paired_labels():
    mr = _phantom("mr", 0)
    ct = _phantom("ct", 0)
    assert mr.modality == "MR"
    assert np.array_equal(mr.label, ct.label)  # same seed and grid: same anatomy
    img, lab = mr.image, mr.label
    assert img.min() >= 0  # no HU-like negative values
    liver, spleen = np.median(img[lab == 1]), np.median(img[lab == 2])
    assert liver > 1.1 * spleen  # T1: liver brighter than spleen
    tumor = None
    for seed in range(10):
        ph = _phantom("mr", seed)
        if (ph.label == 6).any():
            tumor = ph
            break
    assert tumor is not None
    assert np.median(tumor.image[tumor.label == 6]) < 0.8 * np.median(tumor.image[tumor.label == 1])
    # air near 0, fat (subcutaneous, bright) well above the organs
    assert np.median(img[:3, :3, :]) < 0.1 * liver


def test_mr_bias_field():
    ph = _phantom("mr", 4)
    img = ph.image
    # subcutaneous fat: the brightest tissue, found all around the body
    body = ndimage.binary_fill_holes(img > 0.2 * np.percentile(img, 99))
    shell = body & ~ndimage.binary_erosion(body, iterations=5)
    fat = shell & (img > np.percentile(img[shell], 60))
    idx = np.argwhere(fat)
    centre = np.argwhere(body).mean(axis=0)
    medians = []
    for sx in (-1, 1):
        for sy in (-1, 1):
            sel = ((idx[:, 0] - centre[0]) * sx > 0) & ((idx[:, 1] - centre[1]) * sy > 0)
            medians.append(np.median(img[tuple(idx[sel].T)]))
    assert max(medians) / min(medians) > 1.05, medians
    # the liver, one tissue, is not uniform either once smoothed
    liver = ph.label == 1
    smooth = ndimage.uniform_filter(img, size=5)
    values = smooth[ndimage.binary_erosion(liver, iterations=3)]
    assert np.percentile(values, 95) / np.percentile(values, 5) > 1.05


# ---------------------------------------------------------------------------------------------
# cardiac MR


@pytest.mark.parametrize("seed", [0, 3])
def test_cardiac_structure(seed):
    ph = make_phantom("cardiac-mr", seed)
    img, lab = ph.image, ph.label
    assert ph.image.shape == DEFAULT_SHAPES["cardiac-mr"]
    assert img.min() >= 0
    for value in (1, 2, 3):
        assert (lab == value).any(), ph.label_names[value]
    lv_slices = np.flatnonzero((lab == 3).any(axis=(0, 1)))
    mid = lv_slices[len(lv_slices) // 2]
    lv = lab[:, :, mid] == 3
    ring = ndimage.binary_dilation(lv, iterations=3) & ~lv
    assert (lab[:, :, mid][ring] == 2).mean() > 0.9  # myocardium surrounds the LV
    # myocardium thickness ~8-12 mm: the ring 3 voxels (4.5 mm) out from the LV is still myocardium,
    # 12 voxels (18 mm) out is not
    far = ndimage.binary_dilation(lv, iterations=12) & ~ndimage.binary_dilation(lv, iterations=11)
    assert (lab[:, :, mid][far] == 2).mean() < 0.3
    # the RV touches the myocardium (septum) on its slices
    for k in np.flatnonzero((lab == 1).any(axis=(0, 1))):
        rv = lab[:, :, k] == 1
        touch = ndimage.binary_dilation(rv, iterations=2) & (lab[:, :, k] == 2)
        assert touch.any(), k
    # the heart narrows towards the apex: a slice with myocardium but no RV exists
    myo_slices = (lab == 2).any(axis=(0, 1))
    rv_slices = (lab == 1).any(axis=(0, 1))
    assert (myo_slices & ~rv_slices).any()
    areas = (lab == 3).sum(axis=(0, 1))
    assert areas[lv_slices].max() > 3 * max(areas[lv_slices].min(), 1)
    # bright blood, dark myocardium
    assert np.median(img[lab == 3]) > 2 * np.median(img[lab == 2])
    assert np.median(img[lab == 1]) > 2 * np.median(img[lab == 2])


# ---------------------------------------------------------------------------------------------
# writing a dataset


def test_write_phantom_dataset(tmp_path):
    nib = pytest.importorskip("nibabel")
    shape, spacing = TINY
    out = tmp_path / "ds"
    json_path = write_phantom_dataset("ct", 2, out, seed=5, shape=shape, spacing=spacing)
    assert json_path == out / "dataset.json"
    meta = json.loads(json_path.read_text())
    assert meta["numTraining"] == 2 and len(meta["training"]) == 2
    assert meta["modality"] == {"0": "CT"}
    assert (
        meta["labels"]["0"] == "background"
        and meta["labels"]["1"] == "liver"
        and meta["labels"]["6"] == "liver_tumor"
    )
    assert "synthetic phantom, generated by monai-sam" in meta["description"]
    assert meta["test"] == []
    assert meta["training"][0] == {
        "image": "./imagesTr/phantom_ct_000.nii.gz",
        "label": "./labelsTr/phantom_ct_000.nii.gz",
    }
    # nothing but the dataset is left behind (temporary files are renamed or removed)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "prompts"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "phantom_ct_000.nii.gz",
        "phantom_ct_001.nii.gz",
    ]
    for i, entry in enumerate(meta["training"]):
        ref = make_phantom("ct", 5 + i, shape, spacing)
        img = nib.load(str(out / entry["image"]))
        lab = nib.load(str(out / entry["label"]))
        assert img.get_data_dtype() == np.int16
        assert lab.get_data_dtype() == np.uint8
        assert np.allclose(img.affine, ref.affine, atol=1e-4)
        assert np.allclose(lab.affine, ref.affine, atol=1e-4)
        assert np.array_equal(np.asarray(lab.dataobj), ref.label)
        hu = np.asarray(img.dataobj)
        assert np.abs(hu.astype(np.float32) - ref.image).max() <= 0.5 + 1e-3


def test_write_mr_and_cardiac_datasets(tmp_path):
    nib = pytest.importorskip("nibabel")
    write_phantom_dataset("mr", 1, tmp_path / "mr", shape=(32, 32, 8), spacing=(6.4, 6.4, 20.0))
    img = nib.load(str(tmp_path / "mr" / "imagesTr" / "phantom_mr_000.nii.gz"))
    assert img.get_data_dtype() == np.float32
    write_phantom_dataset("cardiac-mr", 1, tmp_path / "cardiac", shape=(48, 48, 6), spacing=(6.0, 6.0, 16.0))
    meta = json.loads((tmp_path / "cardiac" / "dataset.json").read_text())
    assert meta["modality"] == {"0": "MR"}
    assert meta["labels"] == {
        "0": "background",
        "1": "right_ventricle",
        "2": "myocardium",
        "3": "left_ventricle",
    }
    assert (tmp_path / "cardiac" / meta["training"][0]["image"]).exists()


def test_write_overwrites_and_replaces_dataset_json(tmp_path):
    shape, spacing = (32, 32, 8), (6.4, 6.4, 20.0)
    write_phantom_dataset("ct", 2, tmp_path, shape=shape, spacing=spacing)
    write_phantom_dataset("ct", 1, tmp_path, seed=3, shape=shape, spacing=spacing)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["numTraining"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "xray"},
        {"num_cases": 0},
        {"num_cases": -2},
        {"shape": (0, 32, 8)},
        {"spacing": (1.0, -1.0, 1.0)},
    ],
)
def test_write_phantom_dataset_rejects_bad_arguments(tmp_path, kwargs):
    args = {
        "kind": "ct",
        "num_cases": 1,
        "out_dir": tmp_path / "x",
        "shape": (32, 32, 8),
        "spacing": (6.4, 6.4, 20.0),
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        write_phantom_dataset(**args)
    assert not (tmp_path / "x" / "dataset.json").exists()


def test_write_phantom_dataset_dicom(tmp_path):
    try:
        from monai_sam.io.dicom import write_dicom_series  # noqa: F401
    except ImportError as err:  # written in parallel by another module
        pytest.skip(f"monai_sam.io.dicom.write_dicom_series is not importable yet: {err}")
    pydicom = pytest.importorskip("pydicom")
    shape, spacing = (32, 32, 6), (6.4, 6.4, 26.0)
    write_phantom_dataset("ct", 1, tmp_path, shape=shape, spacing=spacing, dicom=True)
    files = sorted((tmp_path / "dicom" / "phantom_ct_000").glob("*.dcm"))
    assert len(files) == shape[2]
    ds = pydicom.dcmread(str(files[0]))
    assert ds.Modality == "CT"
    assert ds.PatientID == "phantom_ct_000"
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert set(meta) >= {"name", "description", "modality", "labels", "numTraining", "training", "test"}
    assert "dicom" not in json.dumps(meta["training"])
