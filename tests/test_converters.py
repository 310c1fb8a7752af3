"""Converters from public dataset layouts, on tiny fake copies of those layouts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from monai_sam.data.converters import (
    ACDC_LABELS,
    BTCV_LABELS,
    CONVERTERS,
    REFUGE_LABELS,
    LayoutError,
    convert_acdc,
    convert_btcv,
    convert_lits,
    convert_msd,
    convert_refuge,
    refuge_grey_to_labels,
)
from monai_sam.data.datalist import datalist_from_decathlon


def _nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    return path


def _label_volume(seed: int, max_label: int, shape=(4, 5, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, max_label + 1, shape).astype(np.uint8)


def _image_volume(seed: int, shape=(4, 5, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _check_paths_exist(ds: Path, content: dict) -> None:
    for entry in content["training"]:
        assert (ds.parent / entry["image"]).exists() and (ds.parent / entry["label"]).exists()
    for entry in content["test"]:
        assert (ds.parent / (entry["image"] if isinstance(entry, dict) else entry)).exists()


def _write(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ------------------------------------------------------------------ BTCV


def _btcv(root: Path, prefix: str = "RawData") -> Path:
    base = root / prefix if prefix else root
    train_img, train_lbl = (base / "Training" / "img", base / "Training" / "label") if prefix else (
        base / "img", base / "label")
    for i in (1, 2):
        _nifti(train_img / f"img000{i}.nii.gz", _image_volume(i))
        _nifti(train_lbl / f"label000{i}.nii.gz", _label_volume(i, 13))
    if prefix:
        _nifti(base / "Testing" / "img" / "img0061.nii.gz", _image_volume(61))
    return root


def test_btcv_rawdata_layout(tmp_path: Path) -> None:
    src = _btcv(tmp_path / "Abdomen")
    before = _snapshot(src)
    ds = convert_btcv(src, tmp_path / "out")
    assert ds == tmp_path / "out" / "dataset.json"
    content = _load_json(ds)
    assert content["labels"] == {str(k): v for k, v in BTCV_LABELS.items()}
    assert content["labels"]["10"] == "portal_vein_splenic_vein"
    assert (content["numTraining"], content["numTest"]) == (2, 1)
    assert content["training"][0] == {
        "image": "./imagesTr/img0001.nii.gz", "label": "./labelsTr/img0001.nii.gz"
    }
    assert content["test"] == ["./imagesTs/img0061.nii.gz"]
    assert content["modality"] == {"0": "CT"}
    _check_paths_exist(ds, content)
    out_label = tmp_path / "out" / "labelsTr" / "img0002.nii.gz"
    assert out_label.is_symlink()  # link=True by default
    np.testing.assert_array_equal(np.asarray(nib.load(str(out_label)).dataobj), _label_volume(2, 13))
    assert _snapshot(src) == before  # source untouched
    assert not list(tmp_path.joinpath("out").glob("*.tmp"))  # atomic write left no temp file
    # the output reads back as a datalist
    dl = datalist_from_decathlon(ds)
    assert [Path(d["image"]).name for d in dl] == ["img0001.nii.gz", "img0002.nii.gz"]


def test_btcv_flat_layout_copy(tmp_path: Path) -> None:
    src = _btcv(tmp_path / "flat", prefix="")
    ds = convert_btcv(src, tmp_path / "out", link=False)
    content = _load_json(ds)
    assert content["numTraining"] == 2 and content["numTest"] == 0
    image = tmp_path / "out" / "imagesTr" / "img0001.nii.gz"
    assert image.is_file() and not image.is_symlink()
    np.testing.assert_array_equal(np.asarray(nib.load(str(image)).dataobj), _image_volume(1))
    # converting again replaces the outputs
    assert convert_btcv(src, tmp_path / "out", link=False) == ds


def test_btcv_errors(tmp_path: Path) -> None:
    src = _btcv(tmp_path / "b")
    (src / "RawData" / "Training" / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(ValueError, match="without a label: img0002.nii.gz"):
        convert_btcv(src, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError) as err:
        convert_btcv(tmp_path / "empty", tmp_path / "out2")
    msg = str(err.value)
    assert "empty" in msg and "RawData/Training/img" in msg and "img/ + label/" in msg
    with pytest.raises(ValueError, match="source folder"):
        convert_btcv(src, src)


# ------------------------------------------------------------------ MSD


def _msd_liver(root: Path) -> Path:
    task = root / "Task03_Liver"
    for i in (0, 1):
        _nifti(task / "imagesTr" / f"liver_{i}.nii.gz", _image_volume(i))
        _nifti(task / "labelsTr" / f"liver_{i}.nii.gz", _label_volume(i, 2))
        # macOS resource-fork junk, as in the MSD archives
        (task / "imagesTr" / f"._liver_{i}.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
        (task / "labelsTr" / f"._liver_{i}.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    _nifti(task / "imagesTs" / "liver_5.nii.gz", _image_volume(5))
    (task / "imagesTs" / "._liver_5.nii.gz").write_bytes(b"junk")
    (task / "._dataset.json").write_bytes(b"junk")
    (task / "dataset.json").write_text(json.dumps({
        "name": "LiverTumour", "description": "Liver and tumour segmentation", "tensorImageSize": "3D",
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": 2, "numTest": 1,
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
                     for i in (0, 1)],
        "test": ["./imagesTs/liver_5.nii.gz"],
    }))
    return task


def test_msd_liver(tmp_path: Path) -> None:
    task = _msd_liver(tmp_path / "msd")
    before = _snapshot(task)
    ds = convert_msd(tmp_path / "msd", tmp_path / "out")  # the parent of one task is accepted
    content = _load_json(ds)
    assert content["labels"] == {"0": "background", "1": "liver", "2": "liver_tumor"}
    assert content["source_labels"]["2"] == "cancer"
    assert (content["numTraining"], content["numTest"]) == (2, 1)
    assert content["modality"] == {"0": "CT"} and content["tensorImageSize"] == "3D"
    _check_paths_exist(ds, content)
    out_files = [p.name for p in (tmp_path / "out").rglob("*")]
    assert not [n for n in out_files if n.startswith("._")]
    out_label = tmp_path / "out" / "labelsTr" / "liver_1.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(str(out_label)).dataobj), _label_volume(1, 2))
    assert _snapshot(task) == before
    assert len(datalist_from_decathlon(ds, section="test")) == 1


def test_msd_multimodal_4d(tmp_path: Path) -> None:
    task = tmp_path / "Task01_BrainTumour"
    _nifti(task / "imagesTr" / "BRATS_001.nii.gz", np.zeros((4, 4, 3, 4), np.float32))
    _nifti(task / "labelsTr" / "BRATS_001.nii.gz", _label_volume(0, 3, (4, 4, 3)))
    meta = {
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "tensorImageSize": "4D",
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
        "test": [],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    content = _load_json(convert_msd(task, tmp_path / "out"))
    assert content["modality"] == meta["modality"] and content["tensorImageSize"] == "4D"
    assert content["labels"] == {"0": "background", "1": "edema", "2": "non_enhancing_tumor",
                                 "3": "enhancing_tumour"}
    # without modality in the source, the channels are read from the image header
    del meta["modality"], meta["tensorImageSize"]
    (task / "dataset.json").write_text(json.dumps(meta))
    content = _load_json(convert_msd(task, tmp_path / "out2"))
    assert content["modality"] == {"0": "unknown", "1": "unknown", "2": "unknown", "3": "unknown"}
    assert content["tensorImageSize"] == "4D"


def test_msd_errors(tmp_path: Path) -> None:
    task = _msd_liver(tmp_path / "msd")
    (task / "labelsTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"dataset.json references 1 missing.*labelsTr/liver_1"):
        convert_msd(task, tmp_path / "out")
    (tmp_path / "notask").mkdir()
    with pytest.raises(LayoutError, match=r"notask is not an MSD task folder.*dataset.json, imagesTr/"):
        convert_msd(tmp_path / "notask", tmp_path / "out2")


# ------------------------------------------------------------------ ACDC


def _acdc(root: Path) -> Path:
    for p, (ed, es) in ((1, (1, 12)), (2, (1, 9))):
        pdir = root / "training" / f"patient{p:03d}"
        for frame in (ed, es):
            case = f"patient{p:03d}_frame{frame:02d}"
            _nifti(pdir / f"{case}.nii.gz", _image_volume(p * 100 + frame))
            _nifti(pdir / f"{case}_gt.nii.gz", _label_volume(p * 100 + frame, 3))
        _nifti(pdir / f"patient{p:03d}_4d.nii.gz", np.zeros((4, 5, 3, 2), np.int16))
        (pdir / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 180.0\nNbFrame: 30\n")
    tdir = root / "testing" / "patient101"
    for frame in (1, 14):
        _nifti(tdir / f"patient101_frame{frame:02d}.nii.gz", _image_volume(frame))
    _nifti(tdir / "patient101_4d.nii.gz", np.zeros((4, 5, 3, 2), np.int16))
    (tdir / "Info.cfg").write_text("ED: 1\nES: 14\nGroup: NOR\n")
    return root


def test_acdc(tmp_path: Path) -> None:
    src = _acdc(tmp_path / "database")
    before = _snapshot(src)
    ds = convert_acdc(tmp_path, tmp_path / "out")  # the parent holding database/ is accepted
    content = _load_json(ds)
    assert content["labels"] == {
        "0": "background", "1": "right_ventricle", "2": "myocardium", "3": "left_ventricle"
    }
    assert content["labels"] == {str(k): v for k, v in ACDC_LABELS.items()}
    assert (content["numTraining"], content["numTest"]) == (4, 2)
    first = content["training"][0]
    assert first == {
        "image": "./imagesTr/patient001_frame01.nii.gz", "label": "./labelsTr/patient001_frame01.nii.gz",
        "patient": "patient001", "phase": "ED", "group": "DCM",
    }
    assert [e["phase"] for e in content["training"]] == ["ED", "ES", "ED", "ES"]
    assert content["test"] == ["./imagesTs/patient101_frame01.nii.gz", "./imagesTs/patient101_frame14.nii.gz"]
    _check_paths_exist(ds, content)
    assert not [p for p in (tmp_path / "out").rglob("*4d*")]  # the cine volumes are ignored
    label = tmp_path / "out" / "labelsTr" / "patient002_frame09.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(str(label)).dataobj), _label_volume(209, 3))
    assert _snapshot(src) == before
    dl = datalist_from_decathlon(ds)
    assert dl[1]["phase"] == "ES" and Path(dl[1]["label"]).is_file()


def test_acdc_errors(tmp_path: Path) -> None:
    src = _acdc(tmp_path / "acdc")
    (src / "training" / "patient002" / "patient002_frame09_gt.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"patient002.*without a label: patient002_frame09.nii.gz"):
        convert_acdc(src, tmp_path / "out")
    with pytest.raises(LayoutError, match=r"not an ACDC folder.*training,testing"):
        convert_acdc(src / "training" / "patient001", tmp_path / "out2")


# ------------------------------------------------------------------ REFUGE


def _refuge_grey_mask() -> np.ndarray:
    """Hand-made REFUGE mask, 8 rows x 10 columns: 255 background, 128 rim, 0 cup."""
    mask = np.full((8, 10), 255, np.uint8)
    mask[1:7, 2:9] = 128
    mask[3:5, 4:7] = 0
    return mask


def _fundus(seed: int, shape=(8, 10)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8), "RGB")


def test_refuge_grey_levels() -> None:
    grey = np.array([[0, 128, 255], [10, 120, 250]], np.uint8)
    np.testing.assert_array_equal(refuge_grey_to_labels(grey), [[2, 1, 0], [2, 1, 0]])


def test_refuge_official_layout(tmp_path: Path) -> None:
    src = tmp_path / "REFUGE"
    _write(src / "Training400" / "Glaucoma" / "g0001.jpg", _fundus(1))
    _write(src / "Training400" / "Non-Glaucoma" / "n0001.jpg", _fundus(2))
    masks = src / "Annotation-Training400" / "Disc_Cup_Masks"
    _write(masks / "Glaucoma" / "g0001.bmp", Image.fromarray(_refuge_grey_mask(), "L"))
    _write(masks / "Non-Glaucoma" / "n0001.bmp", Image.fromarray(np.full((8, 10), 255, np.uint8), "L"))
    _write(src / "Validation400" / "V0001.jpg", _fundus(3))
    before = _snapshot(src)
    ds = convert_refuge(tmp_path, tmp_path / "out")  # the parent holding REFUGE/ is accepted
    content = _load_json(ds)
    assert content["labels"] == {"0": "background", "1": "optic_disc_rim", "2": "optic_cup"}
    assert content["labels"] == {str(k): v for k, v in REFUGE_LABELS.items()}
    assert content["modality"] == {"0": "RGB"} and content["tensorImageSize"] == "2D"
    assert content["regions"] == {"optic_disc": [1, 2], "optic_cup": [2]}
    assert (content["numTraining"], content["numTest"]) == (2, 1)
    assert content["training"][0] == {
        "image": "./imagesTr/g0001.png", "label": "./labelsTr/g0001.png", "glaucoma": 1
    }
    assert content["training"][1]["glaucoma"] == 0
    assert content["test"] == ["./imagesTs/V0001.png"]
    _check_paths_exist(ds, content)
    label = np.asarray(Image.open(tmp_path / "out" / "labelsTr" / "g0001.png"))
    expected = np.zeros((8, 10), np.uint8)
    expected[1:7, 2:9] = 1
    expected[3:5, 4:7] = 2
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, expected)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "labelsTr" / "n0001.png")), 0)
    with Image.open(tmp_path / "out" / "imagesTr" / "g0001.png") as im:
        assert (im.mode, im.size, im.format) == ("RGB", (10, 8), "PNG")
    assert _snapshot(src) == before


def test_refuge_mirror_layout_majority_vote(tmp_path: Path) -> None:
    src = tmp_path / "REFUGE"
    case = src / "Training-400" / "c1"
    _write(case / "c1.jpg", _fundus(1))
    disc = np.zeros((8, 10), np.uint8)
    disc[1:7, 2:9] = 255
    cup = np.zeros((8, 10), np.uint8)
    cup[3:5, 4:7] = 255
    odd = cup.copy()
    odd[0, 0] = 255  # one rater of three marks an extra pixel: outvoted
    for i, m in enumerate((cup, cup, odd), start=1):
        _write(case / f"c1_seg_cup_{i}.png", Image.fromarray(m, "L"))
    for i, m in enumerate((disc, disc, np.zeros_like(disc)), start=1):
        _write(case / f"c1_seg_disc_{i}.png", Image.fromarray(m, "L"))
    test = src / "Test-400" / "t1"
    _write(test / "t1.jpg", _fundus(2))
    _write(test / "t1_seg_cup_1.png", Image.fromarray(cup, "L"))
    _write(test / "t1_seg_disc_1.png", Image.fromarray(disc, "L"))
    ds = convert_refuge(src, tmp_path / "out")
    content = _load_json(ds)
    assert content["training"] == [{"image": "./imagesTr/c1.png", "label": "./labelsTr/c1.png"}]
    assert content["test"] == [{"image": "./imagesTs/t1.png", "label": "./labelsTs/t1.png"}]
    expected = np.zeros((8, 10), np.uint8)
    expected[1:7, 2:9] = 1
    expected[3:5, 4:7] = 2
    for path in ("labelsTr/c1.png", "labelsTs/t1.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / path)), expected)
    dl = datalist_from_decathlon(ds, section="test")
    assert Path(dl[0]["label"]).is_file()


def test_refuge_errors(tmp_path: Path) -> None:
    (tmp_path / "fundus").mkdir()
    with pytest.raises(LayoutError) as err:
        convert_refuge(tmp_path / "fundus", tmp_path / "out")
    msg = str(err.value)
    assert "fundus is not a REFUGE folder" in msg
    assert "Training400/" in msg and "Training-400/<case>/<case>.jpg" in msg and "Disc_Cup_Masks" in msg
    src = tmp_path / "r"
    _write(src / "Training400" / "Glaucoma" / "g0001.jpg", _fundus(1))
    with pytest.raises(ValueError, match=r"g0001.jpg has no mask"):
        convert_refuge(src, tmp_path / "out2")
    _write(src / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0001.bmp",
           Image.fromarray(np.full((4, 4), 255, np.uint8), "L"))
    with pytest.raises(ValueError, match=r"g0001.*\(8, 10\).*\(4, 4\)"):
        convert_refuge(src, tmp_path / "out3")


def test_converters_registry() -> None:
    assert CONVERTERS == {
        "btcv": convert_btcv, "msd": convert_msd, "acdc": convert_acdc, "refuge": convert_refuge,
        "lits": convert_lits,
    }
