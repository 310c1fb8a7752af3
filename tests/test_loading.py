"""Loading volumes as channel-first RAS MetaTensors (monai_sam.data.loading)."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_sam.data.loading import CheckImageLabeld, LoadVolumed, load_volume
from monai_sam.io.dicom import write_dicom_series

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_ct"
SPACING = (0.7, 0.8, 2.0)
ORIGIN = (-20.0, 15.0, 100.0)


def ras_volume(shape=(20, 16, 8)) -> tuple[np.ndarray, np.ndarray]:
    """A RAS volume with a marker voxel near the origin corner and a block elsewhere."""
    img = np.zeros(shape, dtype=np.float32)
    img[1, 2, 3] = 100.0  # the marker
    img[12:18, 8:14, 5:7] = 50.0
    img += np.arange(shape[0], dtype=np.float32)[:, None, None] * 0.01  # a gradient along x
    aff = np.diag([*SPACING, 1.0])
    aff[:3, 3] = ORIGIN
    return img, aff


def reoriented(img: np.ndarray, aff: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored in another orientation (e.g. "LPS", "SPL") with the matching affine."""
    src = nib.orientations.io_orientation(aff)
    dst = nib.orientations.axcodes2ornt(tuple(axcodes))
    ornt = nib.orientations.ornt_transform(src, dst)
    data = nib.orientations.apply_orientation(img, ornt)
    new_aff = aff @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    return np.ascontiguousarray(data), new_aff


def world(aff: np.ndarray, ijk) -> np.ndarray:
    return (np.asarray(aff) @ np.array([*ijk, 1.0]))[:3]


@pytest.mark.parametrize("axcodes", ["LPS", "SPL", "RAS", "LAI"])
def test_nifti_orientation_to_ras(tmp_path, axcodes):
    img, aff = ras_volume()
    data, stored_aff = reoriented(img, aff, axcodes)
    assert nib.aff2axcodes(stored_aff) == tuple(axcodes)
    if axcodes != "RAS":
        assert data.shape != img.shape or not np.array_equal(data, img)
    path = tmp_path / f"{axcodes}.nii.gz"
    nib.save(nib.Nifti1Image(data, stored_aff), path)

    loaded = load_volume(path)
    assert isinstance(loaded, MetaTensor)
    assert loaded.dtype == torch.float32
    assert loaded.shape == (1, *img.shape)
    affine = loaded.affine.numpy()
    assert np.all(np.diag(affine)[:3] > 0)  # RAS: every axis points to +x, +y, +z
    np.testing.assert_allclose(affine, aff, atol=1e-4)
    np.testing.assert_allclose(loaded[0].numpy(), img, atol=1e-6)
    # the marker is where RAS says: same world position as in the original
    marker = np.argwhere(loaded[0].numpy() == loaded[0].numpy().max())[0]
    np.testing.assert_allclose(world(affine, marker), world(aff, (1, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(loaded.meta["original_affine"], stored_aff, atol=1e-4)
    np.testing.assert_allclose(loaded.meta["spacing"], SPACING, atol=1e-5)
    assert loaded.meta["filename_or_obj"] == str(path)


def test_load_volumed_image_label_and_inverse(tmp_path):
    img, aff = ras_volume()
    label = (img > 40).astype(np.uint8)
    data, stored_aff = reoriented(img, aff, "LPS")
    lab, _ = reoriented(label, aff, "LPS")
    nib.save(nib.Nifti1Image(data, stored_aff), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(lab, stored_aff), tmp_path / "lab.nii.gz")

    loader = LoadVolumed(keys=["image", "label"], image_only=False)
    out = loader({"image": str(tmp_path / "img.nii.gz"), "label": tmp_path / "lab.nii.gz", "id": 7})
    assert out["id"] == 7
    for key in ("image", "label"):
        assert out[key].shape == (1, *img.shape)
        np.testing.assert_allclose(out[key].affine.numpy(), aff, atol=1e-4)
        assert f"{key}_meta_dict" in out
    np.testing.assert_allclose(out["image"][0].numpy(), img, atol=1e-6)
    np.testing.assert_array_equal(out["label"][0].numpy(), label)
    assert out["label"].meta["filename_or_obj"] == str(tmp_path / "lab.nii.gz")
    CheckImageLabeld()(out)  # same grid: no error

    # the re-orientation is invertible (Invertd relies on it): back to the stored LPS layout
    inverted = loader.inverse(out)
    np.testing.assert_allclose(inverted["image"][0].numpy(), data, atol=1e-6)
    np.testing.assert_allclose(inverted["image"].affine.numpy(), stored_aff, atol=1e-4)

    with pytest.raises(KeyError):
        loader({"image": str(tmp_path / "img.nii.gz")})
    partial = LoadVolumed(keys=["image", "label"], allow_missing_keys=True)
    only_image = partial({"image": tmp_path / "img.nii.gz"})
    assert "label" not in only_image
    CheckImageLabeld(allow_missing_keys=True)(only_image)


def test_load_volumed_dicom_image_nifti_label(tmp_path):
    img, aff = ras_volume()
    label = (img > 40).astype(np.uint8)
    other = img[::-1].copy() * 2
    write_dicom_series(img * 10 - 500, aff, tmp_path / "dicom" / "a")
    files = write_dicom_series(other, aff, tmp_path / "dicom" / "b", series_number=2)
    import pydicom

    uid_a = pydicom.dcmread(next((tmp_path / "dicom" / "a").iterdir())).SeriesInstanceUID
    uid_b = pydicom.dcmread(files[0]).SeriesInstanceUID
    nib.save(nib.Nifti1Image(label, aff), tmp_path / "label.nii.gz")

    loader = LoadVolumed(keys=["image", "label"], series_uid_key="series_uid")
    out = loader({"image": tmp_path / "dicom", "label": tmp_path / "label.nii.gz", "series_uid": uid_a})
    CheckImageLabeld()(out)
    np.testing.assert_allclose(out["image"][0].numpy(), img * 10 - 500, atol=0.5 + 1e-3)
    np.testing.assert_array_equal(out["label"][0].numpy(), label)
    assert out["image"].meta["dicom_series_uid"] == uid_a
    out_b = loader({"image": tmp_path / "dicom", "label": tmp_path / "label.nii.gz", "series_uid": uid_b})
    np.testing.assert_allclose(out_b["image"][0].numpy(), other, atol=0.5 + 1e-3)


def test_check_image_label_shape_mismatch(tmp_path):
    img, aff = ras_volume()
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "case_img.nii.gz")
    nib.save(nib.Nifti1Image(img[:, :, :-1].astype(np.uint8), aff), tmp_path / "case_lab.nii.gz")
    load = LoadVolumed(keys=["image", "label"])
    data = load({"image": tmp_path / "case_img.nii.gz", "label": tmp_path / "case_lab.nii.gz"})
    with pytest.raises(ValueError, match="spatial shapes") as err:
        CheckImageLabeld()(data)
    assert "case_img.nii.gz" in str(err.value) and "case_lab.nii.gz" in str(err.value)
    assert "(20, 16, 8)" in str(err.value) and "(20, 16, 7)" in str(err.value)


def test_check_image_label_affine_mismatch(tmp_path):
    img, aff = ras_volume()
    shifted = aff.copy()
    shifted[0, 3] += 1.5
    nearly = aff.copy()
    nearly[1, 3] += 5e-4  # within atol
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(img.astype(np.uint8), shifted), tmp_path / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(img.astype(np.uint8), nearly), tmp_path / "nearly.nii.gz")
    load = LoadVolumed(keys=["image", "label"])
    data = load({"image": tmp_path / "ct.nii.gz", "label": tmp_path / "shifted.nii.gz"})
    with pytest.raises(ValueError, match="different affines") as err:
        CheckImageLabeld(atol=1e-3)(data)
    assert "ct.nii.gz" in str(err.value) and "shifted.nii.gz" in str(err.value)
    assert "1.5" in str(err.value)
    CheckImageLabeld(atol=1e-3)(load({"image": tmp_path / "ct.nii.gz", "label": tmp_path / "nearly.nii.gz"}))


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nowhere" / "ct.nii.gz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_volume(missing)
    with pytest.raises(FileNotFoundError, match="ct.nii.gz"):
        LoadVolumed(keys="image")({"image": missing})
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a gzip file")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        load_volume(bad)


def test_single_dicom_file_loads_its_series(tmp_path):
    img, aff = ras_volume()
    files = write_dicom_series(img * 10 - 500, aff, tmp_path / "s")
    loaded = load_volume(files[3])
    assert loaded.shape == (1, *img.shape)
    np.testing.assert_allclose(loaded.affine.numpy(), aff, atol=1e-3)


@pytest.mark.real_data
def test_real_ct_loads_in_ras():
    ct_path, seg_path = REAL_CT / "ct.nii.gz", REAL_CT / "seg.nii.gz"
    if not (ct_path.exists() and seg_path.exists()):
        pytest.skip(f"real CT not found at {REAL_CT} (../shared/data/totalseg_ct)")
    data = LoadVolumed(keys=["image", "label"])({"image": ct_path, "label": seg_path})
    CheckImageLabeld()(data)
    ct, seg = data["image"], data["label"]
    assert ct.shape == (1, 122, 101, 30)
    affine = ct.affine.numpy()
    assert np.all(np.diag(affine)[:3] > 0)
    assert float(ct.min()) <= -900 and float(ct.max()) >= 300

    def centroid(label: int) -> np.ndarray:
        idx = np.argwhere(seg[0].numpy() == label)
        assert len(idx) > 100, f"label {label} nearly absent"
        return world(affine, idx.mean(axis=0))

    liver, spleen = centroid(5), centroid(1)
    kidney_right, kidney_left = centroid(2), centroid(3)
    body = world(affine, np.argwhere(ct[0].numpy() > -500).mean(axis=0))
    # RAS+ world (nibabel/MONAI/NIfTI): x grows towards the patient's Right (DICOM's LPS is the
    # opposite), so the liver and the right kidney lie at larger x than the spleen and left kidney.
    assert liver[0] > spleen[0] + 50
    assert liver[0] > body[0]
    assert kidney_right[0] > kidney_left[0]
    # and with RAS array axes, the liver is at large i
    assert np.argwhere(seg[0].numpy() == 5).mean(axis=0)[0] > np.argwhere(seg[0].numpy() == 1).mean(axis=0)[0]


def test_invertd_restores_stored_orientation(tmp_path):
    """Bundles invert predictions with Invertd through the loader's re-orientation."""
    from monai.transforms import Compose, Invertd, ScaleIntensityRanged

    img, aff = ras_volume()
    data, stored_aff = reoriented(img, aff, "LPS")
    write_dicom_series(data * 10, stored_aff, tmp_path / "dicom")
    pre = Compose([
        LoadVolumed(keys="image"),
        ScaleIntensityRanged(keys="image", a_min=0, a_max=1000, b_min=0, b_max=1),
    ])
    out = pre({"image": tmp_path / "dicom"})
    np.testing.assert_allclose(out["image"].affine.numpy(), aff, atol=1e-3)
    out["pred"] = (out["image"] > 0.3).float()
    inv = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(out)
    assert inv["pred"].shape == (1, *data.shape)
    np.testing.assert_array_equal(inv["pred"][0].numpy(), (data * 10 / 1000 > 0.3).astype(np.float32))
