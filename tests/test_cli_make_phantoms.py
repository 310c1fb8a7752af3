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


def test_oracle_prompt_files_fit_nifti_and_dicom_alike(phantom_dir):
    """make-phantoms writes prompts/<case>.json (a box per organ, world mm) for README's segment line."""
    from monai_sam.io.prompt_file import load_prompt_file

    doc = json.loads((phantom_dir / "prompts" / "phantom_ct_001.json").read_text())
    assert doc["coordinates"] == "world" and [o["name"] for o in doc["objects"]] == [
        "liver", "spleen", "kidney_right", "kidney_left", "aorta"]
    nii = load_volume(phantom_dir / "imagesTr" / "phantom_ct_001.nii.gz")
    dcm = load_volume(phantom_dir / "dicom" / "phantom_ct_001")
    label = load_volume(phantom_dir / "labelsTr" / "phantom_ct_001.nii.gz")[0].numpy().round().astype(int)
    from_nii = load_prompt_file(phantom_dir / "prompts" / "phantom_ct_001.json", nii)
    from_dcm = load_prompt_file(phantom_dir / "prompts" / "phantom_ct_001.json", dcm)
    for a, b in zip(from_nii, from_dcm):
        assert a.key_slices == b.key_slices
        np.testing.assert_allclose(a.slices[0].box, b.slices[0].box, atol=0.05)
        k = a.key_slices[0]
        organ = np.isin(label[..., k], (a.object_id, 6) if a.object_id == 1 else (a.object_id,))
        assert organ.sum() == np.isin(label, (a.object_id, 6) if a.object_id == 1 else (a.object_id,)).sum(
            axis=(0, 1)).max(), "the box is on the organ's largest slice"
        rows, cols = np.nonzero(organ)
        x0, y0, x1, y1 = a.slices[0].box
        assert abs(x0 - cols.min()) < 0.6 and abs(x1 - cols.max()) < 0.6
        assert abs(y0 - rows.min()) < 0.6 and abs(y1 - rows.max()) < 0.6
