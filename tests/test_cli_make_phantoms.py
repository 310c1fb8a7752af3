"""`monai-sam make-phantoms --dicom`: the embedded default data, read back by MONAI in both formats."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from monai_sam.cli import main
from monai_sam.data import datalist_from_decathlon, load_volume


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms") / "ct"
    rc = main(["make-phantoms", "--kind", "ct", "--cases", "2", "--out", str(out), "--shape", "64", "64", "24",
               "--dicom"])
    assert rc == 0
    return out


def test_layout_and_dataset_json(phantom_dir):
    meta = json.loads((phantom_dir / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    assert meta["labels"]["1"] == "liver" and meta["labels"]["6"] == "liver_tumor"
    items = datalist_from_decathlon(phantom_dir / "dataset.json")
    assert len(items) == 2 and all(p.exists() for d in items for p in map(__import__("pathlib").Path, d.values()))
    series = sorted((phantom_dir / "dicom").iterdir())
    assert [s.name for s in series] == ["phantom_ct_000", "phantom_ct_001"]
    assert len(list(series[0].glob("*.dcm"))) == 24


def test_monai_loadimaged_reads_nifti_and_dicom_alike(phantom_dir):
    """Plain MONAI (no monai_sam code in the loop) reads both formats to the same voxels and geometry."""
    load = Compose([LoadImaged(["image"], reader="ITKReader"), EnsureChannelFirstd(["image"]),
                    Orientationd(["image"], axcodes="RAS")])
    nii = load({"image": str(phantom_dir / "imagesTr" / "phantom_ct_000.nii.gz")})["image"]
    dcm = load({"image": str(phantom_dir / "dicom" / "phantom_ct_000")})["image"]
    assert nii.shape == dcm.shape == (1, 64, 64, 24)
    np.testing.assert_allclose(dcm.numpy(), nii.numpy(), atol=0.51)  # int16 HU in both
    np.testing.assert_allclose(np.asarray(dcm.affine), np.asarray(nii.affine), atol=1e-3)
    # and the project's loader agrees with MONAI's
    ours = load_volume(phantom_dir / "dicom" / "phantom_ct_000")
    assert torch.allclose(ours.as_tensor(), nii.as_tensor().float(), atol=0.51)


def test_liver_is_on_the_patients_right_after_loading(phantom_dir):
    label = load_volume(phantom_dir / "labelsTr" / "phantom_ct_001.nii.gz")
    lab = label[0].numpy().round().astype(int)
    affine = np.asarray(label.affine)
    def world_x(mask):
        idx = np.argwhere(mask).mean(axis=0)
        return (affine @ np.append(idx, 1.0))[0]
    assert world_x(lab == 1) > world_x(lab == 2), "RAS+: the liver (patient's right) has the larger x"


def test_console_script_and_bad_arguments(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "monai_sam.cli", "make-phantoms", "--kind", "cardiac-mr", "--cases",
                         "1", "--out", str(tmp_path / "acdc"), "--shape", "48", "48", "6"], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "acdc" / "dataset.json").exists()
    bad = subprocess.run([sys.executable, "-m", "monai_sam.cli", "make-phantoms", "--cases", "0", "--out",
                          str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode != 0 and "cases" in bad.stderr.lower()
    assert not (tmp_path / "none" / "dataset.json").exists()
