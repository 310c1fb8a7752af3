"""Datalists from dataset.json and folders, splits, label maps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from monai_sam.data.converters import ACDC_LABELS, BTCV_LABELS, REFUGE_LABELS
from monai_sam.data.datalist import (
    datalist_from_decathlon,
    datalist_from_folders,
    label_names_from_decathlon,
    list_label_maps,
    load_label_map,
    split_datalist,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


# ------------------------------------------------------------------ Decathlon dataset.json


@pytest.fixture
def decathlon(tmp_path: Path) -> Path:
    root = tmp_path / "Task"
    for case in ("a", "b"):
        _touch(root / "imagesTr" / f"{case}.nii.gz")
        _touch(root / "labelsTr" / f"{case}.nii.gz")
    _touch(root / "imagesTs" / "c.nii.gz")
    return _write_json(root / "dataset.json", {
        "labels": {"0": "background", "1": "liver", "2": "liver_tumor"},
        "training": [
            {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz", "fold": 0},
            {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz", "fold": 1},
        ],
        "test": ["./imagesTs/c.nii.gz"],
        "validation": [],
    })


def test_decathlon_paths_absolute(decathlon: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(decathlon.parent.parent)
    dl = datalist_from_decathlon(Path("Task") / "dataset.json")  # relative json path on purpose
    root = decathlon.parent.resolve()
    assert [d["image"] for d in dl] == [str(root / "imagesTr/a.nii.gz"), str(root / "imagesTr/b.nii.gz")]
    assert [d["label"] for d in dl] == [str(root / "labelsTr/a.nii.gz"), str(root / "labelsTr/b.nii.gz")]
    assert all(os.path.isabs(d["image"]) and os.path.isabs(d["label"]) for d in dl)
    assert [d["fold"] for d in dl] == [0, 1]  # other keys pass through


def test_decathlon_test_section_and_empty_section(decathlon: Path) -> None:
    test = datalist_from_decathlon(decathlon, section="test")
    assert test == [{"image": str(decathlon.parent.resolve() / "imagesTs/c.nii.gz")}]
    assert datalist_from_decathlon(decathlon, section="validation") == []


def test_decathlon_base_dir(decathlon: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    for case in ("a", "b"):
        _touch(other / "imagesTr" / f"{case}.nii.gz")
        _touch(other / "labelsTr" / f"{case}.nii.gz")
    dl = datalist_from_decathlon(decathlon, base_dir=other)
    assert dl[0]["image"] == str(other.resolve() / "imagesTr/a.nii.gz")


def test_decathlon_missing_files(decathlon: Path) -> None:
    (decathlon.parent / "labelsTr" / "b.nii.gz").unlink()
    (decathlon.parent / "imagesTr" / "a.nii.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        datalist_from_decathlon(decathlon)
    msg = str(err.value)
    assert str(decathlon) in msg
    assert "labelsTr/b.nii.gz" in msg and "imagesTr/a.nii.gz" in msg
    assert "2 missing" in msg


def test_decathlon_errors(decathlon: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no section 'nope'.*training"):
        datalist_from_decathlon(decathlon, section="nope")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        datalist_from_decathlon(tmp_path / "absent.json")


def test_label_names_from_decathlon(decathlon: Path, tmp_path: Path) -> None:
    assert label_names_from_decathlon(decathlon) == {0: "background", 1: "liver", 2: "liver_tumor"}
    v2 = _write_json(tmp_path / "v2.json", {"labels": {"background": 0, "spleen": 1}})
    assert label_names_from_decathlon(v2) == {0: "background", 1: "spleen"}
    bad = _write_json(tmp_path / "bad.json", {"training": []})
    with pytest.raises(ValueError, match="bad.json.*labels"):
        label_names_from_decathlon(bad)


# ------------------------------------------------------------------ folders


def test_folders_msd_names_and_junk(tmp_path: Path) -> None:
    for case in ("liver_1", "liver_0"):
        _touch(tmp_path / "img" / f"{case}.nii.gz")
        _touch(tmp_path / "lbl" / f"{case}.nii.gz")
    _touch(tmp_path / "img" / "._liver_0.nii.gz")  # macOS junk
    _touch(tmp_path / "lbl" / "._liver_0.nii.gz")
    _touch(tmp_path / "img" / "notes.txt")  # not an image
    dl = datalist_from_folders(tmp_path / "img", tmp_path / "lbl")
    assert [Path(d["image"]).name for d in dl] == ["liver_0.nii.gz", "liver_1.nii.gz"]
    assert [Path(d["label"]).name for d in dl] == ["liver_0.nii.gz", "liver_1.nii.gz"]
    assert all(Path(d["image"]).parent.name == "img" and os.path.isabs(d["image"]) for d in dl)


def test_folders_nnunet_channels(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "case_001_0000.nii.gz")
    _touch(tmp_path / "img" / "case_002_0001.nii.gz")
    _touch(tmp_path / "img" / "case_002_0000.nii.gz")
    _touch(tmp_path / "lbl" / "case_001.nii.gz")
    _touch(tmp_path / "lbl" / "case_002.nii.gz")
    dl = datalist_from_folders(tmp_path / "img", tmp_path / "lbl")
    assert len(dl) == 2
    assert Path(dl[0]["image"]).name == "case_001_0000.nii.gz"
    assert Path(dl[0]["label"]).name == "case_001.nii.gz"
    # two channels of one case: a list in channel order
    assert [Path(p).name for p in dl[1]["image"]] == ["case_002_0000.nii.gz", "case_002_0001.nii.gz"]
    assert Path(dl[1]["label"]).name == "case_002.nii.gz"


def test_folders_identical_name_wins_over_nnunet(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "scan_0000.nii.gz")
    _touch(tmp_path / "lbl" / "scan_0000.nii.gz")
    dl = datalist_from_folders(tmp_path / "img", tmp_path / "lbl")
    assert Path(dl[0]["label"]).name == "scan_0000.nii.gz"


def test_folders_dicom_series_images(tmp_path: Path) -> None:
    for i in range(3):
        _touch(tmp_path / "img" / "pat1" / f"IM{i:04d}.dcm")
    _touch(tmp_path / "img" / "pat2" / "series" / "1.2.3.4")  # any files, even nested
    (tmp_path / "img" / "empty").mkdir()  # a folder without files is not an image
    _touch(tmp_path / "lbl" / "pat1.nii.gz")
    _touch(tmp_path / "lbl" / "pat2.nii.gz")
    dl = datalist_from_folders(tmp_path / "img", tmp_path / "lbl")
    assert [d["image"] for d in dl] == [str((tmp_path / "img" / p).resolve()) for p in ("pat1", "pat2")]
    assert [Path(d["label"]).name for d in dl] == ["pat1.nii.gz", "pat2.nii.gz"]
    assert Path(dl[0]["image"]).is_dir()


def test_folders_label_suffix_map_and_other_extension(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "p1_frame01.nii.gz")
    _touch(tmp_path / "lbl" / "p1_frame01_gt.nii.gz")
    dl = datalist_from_folders(tmp_path / "img", tmp_path / "lbl", label_suffix_map={".nii.gz": "_gt.nii.gz"})
    assert Path(dl[0]["label"]).name == "p1_frame01_gt.nii.gz"
    # a 2D image with a label of another format pairs by stem
    _touch(tmp_path / "img2" / "g0001.jpg")
    _touch(tmp_path / "lbl2" / "g0001.png")
    dl2 = datalist_from_folders(tmp_path / "img2", tmp_path / "lbl2")
    assert Path(dl2[0]["label"]).name == "g0001.png"


def test_folders_unpaired_error(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "a.nii.gz")
    _touch(tmp_path / "img" / "b.nii.gz")
    _touch(tmp_path / "lbl" / "a.nii.gz")
    _touch(tmp_path / "lbl" / "zz.nii.gz")
    with pytest.raises(ValueError) as err:
        datalist_from_folders(tmp_path / "img", tmp_path / "lbl")
    msg = str(err.value)
    assert "without a label: b.nii.gz" in msg
    assert "without an image: zz.nii.gz" in msg


def test_folders_images_only_and_empty(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "x_0000.nii.gz")
    _touch(tmp_path / "img" / "x_0001.nii.gz")
    dl = datalist_from_folders(tmp_path / "img")
    assert [list(d) for d in dl] == [["image"], ["image"]]  # no grouping without labels
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no images in"):
        datalist_from_folders(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="labels folder not found"):
        datalist_from_folders(tmp_path / "img", tmp_path / "absent")


# ------------------------------------------------------------------ split


def test_split_deterministic_and_sizes() -> None:
    data = [{"image": f"{i}.nii.gz"} for i in range(10)]
    train, val = split_datalist(data, val_fraction=0.2, seed=3)
    assert (len(train), len(val)) == (8, 2)
    assert split_datalist(data, val_fraction=0.2, seed=3) == (train, val)
    assert sorted(d["image"] for d in train + val) == sorted(d["image"] for d in data)
    # original order kept within each part
    assert [data.index(d) for d in train] == sorted(data.index(d) for d in train)
    # seeds change the split (at least one of these differs from seed 3)
    assert any(split_datalist(data, seed=s)[1] != val for s in range(4, 10))
    train, val = split_datalist(data, num_val=3, seed=0)
    assert (len(train), len(val)) == (7, 3)


def test_split_small_lists() -> None:
    two = [{"image": "a"}, {"image": "b"}]
    assert [len(p) for p in split_datalist(two, val_fraction=0.01)] == [1, 1]
    assert [len(p) for p in split_datalist(two, val_fraction=0.99)] == [1, 1]
    assert split_datalist([{"image": "a"}]) == ([{"image": "a"}], [])
    assert split_datalist([]) == ([], [])
    with pytest.raises(ValueError, match="num_val"):
        split_datalist(two, num_val=2)
    with pytest.raises(ValueError, match="val_fraction"):
        split_datalist(two, val_fraction=1.5)


# ------------------------------------------------------------------ label maps


def test_label_maps_load() -> None:
    names = list_label_maps()
    for expected in ("btcv", "msd_liver", "acdc", "refuge", "phantom_ct", "phantom_mr", "phantom_cardiac_mr",
                     "totalseg_ct"):
        assert expected in names
        labels = load_label_map(expected)
        assert labels[0] == "background"
        assert all(isinstance(k, int) for k in labels)
    assert load_label_map("btcv") == BTCV_LABELS
    assert load_label_map("acdc") == ACDC_LABELS == load_label_map("phantom_cardiac_mr")
    assert load_label_map("refuge") == REFUGE_LABELS
    assert load_label_map("msd_liver") == {0: "background", 1: "liver", 2: "liver_tumor"}
    assert load_label_map("phantom_ct") == {
        0: "background", 1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "aorta",
        6: "liver_tumor",
    }
    total = load_label_map("totalseg_ct")
    assert (total[1], total[5], total[52], total[63], total[64]) == (
        "spleen", "liver", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein"
    )


def test_phantom_label_maps_match_generator() -> None:
    from monai_sam.data.phantom import LABEL_NAMES

    assert load_label_map("phantom_ct") == LABEL_NAMES["ct"]
    assert load_label_map("phantom_mr") == LABEL_NAMES["mr"]
    assert load_label_map("phantom_cardiac_mr") == LABEL_NAMES["cardiac-mr"]


def test_label_map_path_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("# mine\nlabels:\n  0: background\n  3: tumour\n")
    assert load_label_map(path) == {0: "background", 3: "tumour"}
    with pytest.raises(ValueError, match=r"unknown label map 'nope'.*btcv"):
        load_label_map("nope")
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_label_map(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels:\n  0: background\n  1: liver\n  2: liver\n")
    with pytest.raises(ValueError, match="used twice"):
        load_label_map(bad)
