"""DICOM series writing, discovery, checks and loading (monai_sam.io.dicom, monai_sam.data.loading)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from monai_sam.data.loading import load_volume
from monai_sam.io.dicom import (
    DicomSeriesError,
    check_series,
    find_series,
    select_series,
    write_dicom_series,
)

SHAPE = (32, 24, 10)
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-12.5, 30.25, -40.0)


def make_volume(shape=SHAPE, seed=0) -> np.ndarray:
    """HU volume with asymmetric blocks (any flip or transpose changes it) and a little noise."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[2:9, 3:7, 1:4] = 400.0  # near the origin corner, low slices
    img[20:30, 14:22, 6:9] = -150.0
    img[10:12, 2:20, :] = 60.0
    img += rng.normal(0, 3, size=shape).astype(np.float32)
    img[0, 0, 0] = -1024.0
    img[-1, -1, -1] = 2500.0
    return img


def diag_affine(spacing=SPACING, origin=ORIGIN, signs=(1, 1, 1)) -> np.ndarray:
    aff = np.diag([*(s * g for s, g in zip(spacing, signs)), 1.0])
    aff[:3, 3] = origin
    return aff


def rotated_affine() -> np.ndarray:
    """In-plane axes swapped (i runs along y, j along -x) and 10 degrees oblique about z."""
    t = np.radians(10.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    perm = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ perm @ np.diag(SPACING)
    aff[:3, 3] = ORIGIN
    return aff


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return make_volume()


@pytest.fixture()
def series_dir(tmp_path, volume) -> Path:
    out = tmp_path / "ct"
    write_dicom_series(volume, diag_affine(), out, uid_seed="test")
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(path, write_like_original=False)


# ----------------------------------------------------------------------------- writer


def test_written_tags(series_dir, volume):
    files = _files(series_dir)
    assert len(files) == SHAPE[2]
    datasets = [pydicom.dcmread(f) for f in files]
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(sop_uids) == len(files)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len(sop_uids | {datasets[0].SeriesInstanceUID, datasets[0].StudyInstanceUID}) == len(files) + 2
    normals = []
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        assert ds.Modality == "CT"
        assert ds.Manufacturer == "monai-sam phantom"
        assert ds.PatientID == "ANON"
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[0])
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.9, 0.8])
        assert float(ds.SliceThickness) == pytest.approx(2.5)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(2.5)
        # a RAS diagonal volume is written like a scanner would: rows to patient left, columns posterior
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
        # LPS position of the first stored pixel = RAS voxel (X-1, Y-1, k) with x, y negated
        ras = diag_affine() @ np.array([SHAPE[0] - 1, SHAPE[1] - 1, k, 1.0])
        ipp = [float(v) for v in ds.ImagePositionPatient]
        np.testing.assert_allclose(ipp, [-ras[0], -ras[1], ras[2]], atol=1e-4)
        assert ds.RescaleType == "HU"
        assert float(ds.RescaleSlope) == 1.0
        assert float(ds.RescaleIntercept) == -1024.0
        assert ds.pixel_array.dtype == np.int16
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(hu, volume[::-1, ::-1, k].T, atol=0.5 + 1e-4)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        normals.append(np.cross(iop[:3], iop[3:]) @ np.array([float(v) for v in ds.ImagePositionPatient]))
    np.testing.assert_allclose(np.diff(normals), 2.5, atol=1e-4)  # ascending along the normal


def test_simpleitk_reads_series(series_dir, volume):
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(series_dir))
    assert len(names) == SHAPE[2]
    reader.SetFileNames(names)
    image = reader.Execute()
    assert image.GetSize() == SHAPE
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-5)
    corner = diag_affine() @ np.array([SHAPE[0] - 1, SHAPE[1] - 1, 0, 1.0])
    np.testing.assert_allclose(image.GetOrigin(), [-corner[0], -corner[1], corner[2]], atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (x, y, z) in LPS
    np.testing.assert_allclose(arr[::-1, ::-1], volume, atol=0.5 + 1e-4)


@pytest.mark.parametrize(
    "affine",
    [diag_affine(), diag_affine(signs=(-1, 1, -1)), diag_affine(signs=(1, -1, 1)), rotated_affine()],
    ids=["ras", "flipped_x_z", "flipped_y", "swapped_oblique"],
)
def test_load_volume_matches_nifti(tmp_path, volume, affine):
    write_dicom_series(volume, affine, tmp_path / "dicom")
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "image.nii.gz")
    from_dicom = load_volume(tmp_path / "dicom")
    from_nifti = load_volume(tmp_path / "image.nii.gz")
    assert from_dicom.shape == from_nifti.shape
    assert from_dicom.dtype == from_nifti.dtype
    np.testing.assert_allclose(from_dicom.numpy(), from_nifti.numpy(), atol=0.5 + 1e-3)
    np.testing.assert_allclose(from_dicom.affine.numpy(), from_nifti.affine.numpy(), atol=1e-3)
    assert from_dicom.meta["filename_or_obj"] == str(tmp_path / "dicom")
    assert from_dicom.meta["modality"] == "CT"
    np.testing.assert_allclose(from_dicom.meta["spacing"], from_nifti.meta["spacing"], atol=1e-5)
    if np.allclose(affine, diag_affine()):
        np.testing.assert_allclose(from_dicom[0].numpy(), volume, atol=0.5 + 1e-4)
        np.testing.assert_allclose(from_dicom.affine.numpy(), affine, atol=1e-3)


def test_mr_series_keeps_precision(tmp_path):
    rng = np.random.default_rng(3)
    mr = (rng.random((12, 10, 4)) * 1234.5 + 7.25).astype(np.float32)
    files = write_dicom_series(mr, diag_affine(), tmp_path / "mr", modality="MR", series_description="t1")
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assert ds.Modality == "MR" and ds.SeriesDescription == "t1"
    slope = float(ds.RescaleSlope)
    assert slope < 0.05  # the range is spread over 15 bits
    loaded = load_volume(tmp_path / "mr")
    np.testing.assert_allclose(loaded[0].numpy(), mr, atol=slope / 2 + 1e-4)
    assert loaded.meta["modality"] == "MR"


def test_writer_is_deterministic(tmp_path, volume):
    a = write_dicom_series(volume, diag_affine(), tmp_path / "a", uid_seed="case-1")
    b = write_dicom_series(volume, diag_affine(), tmp_path / "b", uid_seed="case-1")
    c = write_dicom_series(volume, diag_affine(), tmp_path / "c")
    for fa, fb, fc in zip(a, b, c):
        assert fa.read_bytes() == fb.read_bytes()
        da, dc = pydicom.dcmread(fa), pydicom.dcmread(fc)
        assert da.PixelData == dc.PixelData
        assert da.SOPInstanceUID != dc.SOPInstanceUID
    other = write_dicom_series(volume, diag_affine(), tmp_path / "d", uid_seed="case-2")
    assert pydicom.dcmread(other[0]).SeriesInstanceUID != pydicom.dcmread(a[0]).SeriesInstanceUID


def test_writer_refuses_non_empty_dir(tmp_path, volume):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="out"):
        write_dicom_series(volume, diag_affine(), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(write_dicom_series(volume, diag_affine(), empty)) == SHAPE[2]


def test_writer_rejects_sheared_affine(tmp_path, volume):
    aff = diag_affine()
    aff[1, 2] = 0.5  # slice origins drift in y: a tilted grid
    with pytest.raises(ValueError, match="orthogonal"):
        write_dicom_series(volume, aff, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- discovery


def test_two_series_need_uid(tmp_path, volume):
    other = make_volume(seed=1)[::-1].copy()
    write_dicom_series(volume, diag_affine(), tmp_path / "study" / "a", series_description="first")
    files_b = write_dicom_series(
        other, diag_affine(), tmp_path / "study" / "b", series_number=2, series_description="second"
    )
    uid_b = pydicom.dcmread(files_b[0]).SeriesInstanceUID
    found = find_series(tmp_path / "study")
    assert len(found) == 2
    assert {s.n_slices for s in found} == {SHAPE[2]}
    with pytest.raises(DicomSeriesError) as err:
        select_series(tmp_path / "study")
    msg = str(err.value)
    assert str(tmp_path / "study") in msg and "series_uid" in msg
    assert uid_b in msg and "second" in msg and "first" in msg
    loaded = load_volume(tmp_path / "study", series_uid=uid_b)
    np.testing.assert_allclose(loaded[0].numpy(), other, atol=0.5 + 1e-4)
    assert loaded.meta["dicom_series_uid"] == uid_b
    with pytest.raises(DicomSeriesError, match="1.2.3.4.5.nothere"):
        select_series(tmp_path / "study", series_uid="1.2.3.4.5.nothere")


def test_files_sorted_by_position_not_name(series_dir, volume):
    # rename so that name order is the reverse of position order
    files = _files(series_dir)
    for i, f in enumerate(files):
        f.rename(series_dir / f"tmp_{i}")
    for i in range(len(files)):
        (series_dir / f"tmp_{i}").rename(series_dir / f"IM{len(files) - i:03d}")
    series = check_series(select_series(series_dir))
    positions = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in series.files]
    assert positions == sorted(positions)
    assert series.files[0].name == f"IM{len(files):03d}"
    assert series.slice_spacing == pytest.approx(2.5)
    np.testing.assert_allclose(load_volume(series_dir)[0].numpy(), volume, atol=0.5 + 1e-4)


def test_non_dicom_files_ignored(series_dir, volume):
    (series_dir / "README.txt").write_text("not an image")
    (series_dir / "meta.json").write_text("{}")
    (series_dir / "noise.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    (series_dir / "raw").write_bytes(b"\x08\x00\x05\x00garbage that looks like a tag")
    (series_dir / "sub").mkdir()
    (series_dir / "sub" / "empty").write_bytes(b"")
    assert len(find_series(series_dir)) == 1
    np.testing.assert_allclose(load_volume(series_dir)[0].numpy(), volume, atol=0.5 + 1e-4)


def test_non_image_series_ignored(series_dir, volume):
    seg = series_dir / "seg.dcm"
    shutil.copy(_files(series_dir)[0], seg)
    _edit(seg, Modality="SEG", SeriesInstanceUID=generate_uid(), SOPInstanceUID=generate_uid())
    assert len(find_series(series_dir)) == 2
    assert select_series(series_dir).modality == "CT"
    np.testing.assert_allclose(load_volume(series_dir)[0].numpy(), volume, atol=0.5 + 1e-4)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomSeriesError, match="no DICOM files found in .*empty"):
        select_series(tmp_path / "empty")
    with pytest.raises(DicomSeriesError, match="empty"):
        load_volume(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        find_series(tmp_path / "missing")


# ----------------------------------------------------------------------------- checks


def _check_fails(folder: Path, *patterns: str) -> str:
    with pytest.raises(DicomSeriesError) as err:
        check_series(select_series(folder))
    msg = str(err.value)
    assert str(folder) in msg
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    # load_volume runs the same checks
    with pytest.raises(DicomSeriesError):
        load_volume(folder)
    return msg


def test_missing_slice(series_dir):
    _files(series_dir)[4].unlink()
    # slices 3 and 5 (0-based) are at z = -40 + 2.5 k
    _check_fails(series_dir, "missing slice(s) between positions -32.500 and -27.500", "slice_0004.dcm")


def test_duplicate_positions(series_dir):
    files = _files(series_dir)
    dup = series_dir / "copy.dcm"
    shutil.copy(files[3], dup)
    _edit(dup, SOPInstanceUID=generate_uid(), InstanceNumber=99)
    _check_fails(series_dir, "duplicate slice positions", "copy.dcm", "slice_0004.dcm")


def test_non_uniform_spacing(series_dir):
    for f in _files(series_dir)[6:]:
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(f, ImagePositionPatient=[x, y, z + 1.0])
    msg = _check_fails(series_dir, "non-uniform slice spacing", "3.500")
    assert "slice_0006.dcm" in msg and "slice_0007.dcm" in msg


def test_gantry_tilt(series_dir):
    for k, f in enumerate(_files(series_dir)):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(f, ImagePositionPatient=[x, y + 0.5 * k, z])
    expected = np.degrees(np.arctan2(0.5 * 9, 2.5 * 9))
    _check_fails(series_dir, f"gantry tilt of {expected:.2f} degrees")


def test_localizer_mixed_in(series_dir):
    scout = series_dir / "scout.dcm"
    shutil.copy(_files(series_dir)[0], scout)
    _edit(scout, SOPInstanceUID=generate_uid(), ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    _check_fails(series_dir, "ImageOrientationPatient", "scout.dcm", "localizer")


def test_mixed_rows_columns(series_dir):
    f = _files(series_dir)[2]
    ds = pydicom.dcmread(f)
    ds.Rows, ds.Columns = 16, 16
    ds.PixelData = np.zeros((16, 16), "<i2").tobytes()
    ds.save_as(f, write_like_original=False)
    _check_fails(series_dir, "mixed image sizes", "16x16", "slice_0003.dcm", f"{SHAPE[1]}x{SHAPE[0]}")


def test_mixed_pixel_spacing(series_dir):
    _edit(_files(series_dir)[5], PixelSpacing=[0.5, 0.5])
    _check_fails(series_dir, "mixed PixelSpacing", "slice_0006.dcm")


def test_truncated_file_is_an_error(series_dir):
    f = _files(series_dir)[3]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _check_fails(series_dir, "slice_0004.dcm", "truncated")


@pytest.mark.parametrize("keep", [300, 700, 1100])
def test_truncated_header_is_an_error(series_dir, keep):
    # cut inside the file meta, before SeriesInstanceUID, and before the image plane tags
    f = _files(series_dir)[3]
    f.write_bytes(f.read_bytes()[:keep])
    with pytest.raises(DicomSeriesError) as err:
        check_series(select_series(series_dir))
    assert "slice_0004.dcm" in str(err.value)
    assert "truncated" in str(err.value)


def test_multiframe_and_colour_refused(series_dir):
    _edit(_files(series_dir)[0], NumberOfFrames=2)
    _check_fails(series_dir, "multi-frame", "slice_0001.dcm", "not supported")
    _edit(_files(series_dir)[0], NumberOfFrames=1)
    _edit(_files(series_dir)[1], SamplesPerPixel=3, PhotometricInterpretation="RGB")
    _check_fails(series_dir, "SamplesPerPixel 3", "slice_0002.dcm")


def test_single_slice(tmp_path, volume):
    write_dicom_series(volume[:, :, :1], diag_affine(), tmp_path / "one")
    _check_fails(tmp_path / "one", "at least 2 slices", "slice_0001.dcm")
