"""DICOM-SEG writing and reading back (monai_sam.io.dicom_seg): codes, references, geometry, dciodvfy.

No model is involved: the phantom's own label map is written as the SEG of its DICOM series,
so every expectation is known exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from helpers_dicom_pipeline import dciodvfy_errors
from monai.data import MetaTensor

from monai_sam.data.datalist import list_label_maps, load_label_map
from monai_sam.data.loading import load_volume
from monai_sam.data.phantom import make_phantom
from monai_sam.io.dicom import check_series, select_series, write_dicom_series
from monai_sam.io.dicom_seg import (
    AlgorithmInfo,
    DicomSegError,
    read_dicom_seg,
    segment_code,
    write_dicom_seg,
)
from monai_sam.segment import to_input_geometry

NAMES = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "aorta", 6: "liver_tumor"}
ALGORITHM = AlgorithmInfo("sam2_ct_abdominal_organs", "0.1.0", "ab" * 32, "user", {"image_size": "128"})


@pytest.fixture(scope="module")
def phantom():
    return make_phantom("ct", seed=2, shape=(40, 36, 10), spacing=(5.0, 5.0, 12.0))


@pytest.fixture(scope="module")
def source(tmp_path_factory, phantom):
    """The phantom as a DICOM series, its checked series, its loaded volume and the label on it."""
    root = tmp_path_factory.mktemp("seg_source")
    write_dicom_series(phantom.image, phantom.affine, root / "ct", uid_seed="seg-test")
    series = check_series(select_series(root / "ct"))
    volume = load_volume(root / "ct")
    assert np.allclose(volume.affine.numpy(), phantom.affine, atol=1e-3)
    ras = MetaTensor(torch.as_tensor(phantom.label[None].astype(np.uint8)), affine=volume.affine)
    label = to_input_geometry(ras, volume)  # as segment_volume returns it: the series' own orientation
    return root, series, volume, label


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    root, series, _, label = source
    path = tmp_path_factory.mktemp("seg_out") / "case_seg.dcm"
    write_dicom_seg(label, series, path, NAMES, ALGORITHM)
    return path


def test_seg_passes_dciodvfy(written):
    assert dciodvfy_errors(written) == []


def test_seg_reads_back_to_the_same_mask_and_geometry(written, source, phantom):
    _, series, volume, _ = source
    back, names = read_dicom_seg(written, series, volume)
    assert names == {n: NAMES[v] for n, v in enumerate(NAMES, start=1)}
    np.testing.assert_array_equal(back[0].numpy(), phantom.label)  # segment n = label value n here
    np.testing.assert_allclose(back.affine.numpy(), volume.affine.numpy(), atol=1e-6)


def test_seg_frames_overlay_the_source_pixels(written, source, phantom):
    """Independent of our reader: each SEG frame sits on its source instance, pixel for pixel.

    The series writer stores RAS slice ``k`` as ``image[::-1, ::-1, k].T`` (rows posterior,
    columns to the patient's left), so the label seen by a viewer on that slice is the same
    transform of ``label[..., k]``.
    """
    _, series, _, _ = source
    seg = pydicom.dcmread(written)
    sop_to_k = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): k for k, f in enumerate(series.files)
    }
    pixels = seg.pixel_array  # (frames, rows, cols) binary
    assert len(seg.PerFrameFunctionalGroupsSequence) == pixels.shape[0] > 0
    checked = 0
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = sop_to_k[str(src)]
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        src_ds = pydicom.dcmread(series.files[k], stop_before_pixels=True)
        np.testing.assert_allclose(ipp, [float(v) for v in src_ds.ImagePositionPatient], atol=1e-3)
        expected = (phantom.label[::-1, ::-1, k] == number).T
        np.testing.assert_array_equal(frame.astype(bool), expected)
        checked += 1
    present = {(v, k) for k in range(phantom.label.shape[2]) for v in np.unique(phantom.label[..., k]) if v}
    assert checked == len(present)  # one frame per (segment, slice) it appears on; empty ones left out


def test_seg_references_series_frame_of_reference_and_algorithm(written, source):
    _, series, _, _ = source
    seg = pydicom.dcmread(written)
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == series.series_uid
    assert len(ref.ReferencedInstanceSequence) == len(series.files)
    assert seg.SeriesDescription == "sam2_ct_abdominal_organs (user prompts)"
    assert seg.DeviceSerialNumber == "ab" * 32
    assert seg.ManufacturerModelName == "sam2_ct_abdominal_organs"
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"  # a person drew the prompts
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "sam2_ct_abdominal_organs" and algo.AlgorithmVersion == "0.1.0"
        assert "checkpoint_sha256=" + "ab" * 32 in algo.AlgorithmParameters
        assert "prompts=user" in algo.AlgorithmParameters


def _codes(item) -> tuple[str, str, list[str], list[str]]:
    typ = item.SegmentedPropertyTypeCodeSequence[0]
    modifiers = [c.CodeMeaning for c in getattr(typ, "SegmentedPropertyTypeModifierCodeSequence", [])]
    regions = [c.CodeValue for c in getattr(item, "AnatomicRegionSequence", [])]
    return item.SegmentedPropertyCategoryCodeSequence[0].CodeValue, typ.CodeValue, modifiers, regions


def test_segments_carry_snomed_codes(written):
    seg = pydicom.dcmread(written)
    by_label = {item.SegmentLabel: item for item in seg.SegmentSequence}
    assert {
        item.CodingSchemeDesignator
        for s in seg.SegmentSequence
        for item in (s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0])
    } == {"SCT"}
    assert _codes(by_label["liver"]) == ("123037004", "10200004", [], [])  # anatomical structure, liver
    assert _codes(by_label["spleen"])[1] == "78961009"
    assert _codes(by_label["kidney_right"]) == ("123037004", "64033007", ["Right"], [])
    assert _codes(by_label["kidney_left"])[2] == ["Left"]
    assert _codes(by_label["aorta"])[1] == "15825003"
    # a tumor: a neoplasm (morphologically abnormal structure) in the liver
    assert _codes(by_label["liver_tumor"]) == ("49755003", "108369006", [], ["10200004"])
    assert [item.TrackingID for item in seg.SegmentSequence] == [f"label {v}" for v in NAMES]


def test_every_label_map_name_has_a_code():
    """The organs and tumors of our label maps are all coded (not the generic 'Tissue')."""
    missing = []
    for map_name in list_label_maps():
        if map_name == "refuge":  # 2D fundus photographs: no DICOM series to segment
            continue
        for name in load_label_map(map_name).values():
            if name != "background" and not segment_code(name).known:
                missing.append(f"{map_name}: {name}")
    assert missing == []
    unknown = segment_code("banana")
    assert not unknown.known and unknown.type.meaning == "Tissue"


def test_fractional_seg_round_trip(source, tmp_path, phantom):
    _, series, volume, label = source
    rng = np.random.default_rng(0)
    prob = np.stack([(phantom.label == v) * rng.uniform(0.5, 1.0, phantom.label.shape) for v in (1, 2)])
    prob_meta = to_input_geometry(torch.as_tensor(prob, dtype=torch.float32), volume)
    two = label.clone()
    two[(two != 1) & (two != 2)] = 0
    path = tmp_path / "fractional.dcm"
    write_dicom_seg(two, series, path, {1: "liver", 2: "spleen"}, ALGORITHM, probabilities=prob_meta)
    assert pydicom.dcmread(path, stop_before_pixels=True).SegmentationType == "FRACTIONAL"
    assert dciodvfy_errors(path) == []
    back, names = read_dicom_seg(path, series, volume)
    assert names == {1: "liver", 2: "spleen"} and back.shape == (2, *phantom.label.shape)
    np.testing.assert_allclose(back.numpy(), prob, atol=1 / 255 + 1e-6)  # 8-bit fractions


def test_label_off_the_series_grid_is_refused(source, tmp_path):
    _, series, _, label = source
    shifted = label.clone()
    shifted.affine[:3, 3] += torch.tensor([1.3, 0.0, 0.0], dtype=shifted.affine.dtype)  # 1.3 mm: not a voxel
    with pytest.raises(DicomSegError, match="does not match"):
        write_dicom_seg(shifted, series, tmp_path / "x.dcm", NAMES, ALGORITHM)
    cropped = label[:, :20]
    with pytest.raises(DicomSegError, match="outside the label volume"):
        write_dicom_seg(cropped, series, tmp_path / "y.dcm", NAMES, ALGORITHM)
    assert list(tmp_path.iterdir()) == []  # no file, not even a temporary one


def test_unnamed_values_and_unknown_names(source, tmp_path, caplog):
    _, series, _, label = source
    with pytest.raises(DicomSegError, match=r"label values \[3, 4, 5, 6\] have no name"):
        write_dicom_seg(label, series, tmp_path / "x.dcm", {1: "liver", 2: "spleen"}, ALGORITHM)
    only_liver = label.clone()
    only_liver[only_liver != 1] = 0
    with caplog.at_level(logging.WARNING, logger="monai_sam"):
        write_dicom_seg(only_liver, series, tmp_path / "ok.dcm", {1: "hepar"}, ALGORITHM)
    assert "no SNOMED-CT code known for segment 'hepar'" in caplog.text
    item = pydicom.dcmread(tmp_path / "ok.dcm").SegmentSequence[0]
    assert item.SegmentLabel == "hepar" and item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"


def test_empty_result_is_still_a_valid_seg(source, tmp_path):
    _, series, volume, label = source
    empty = torch.zeros_like(label)
    path = tmp_path / "empty.dcm"
    auto = AlgorithmInfo("m", "1", "cd" * 32, "automatic")
    write_dicom_seg(empty, series, path, {1: "liver"}, auto)
    ds = pydicom.dcmread(path)
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert ds.SeriesDescription == "m (automatic prompts)"
    assert dciodvfy_errors(path) == []
    back, _ = read_dicom_seg(path, series, volume)
    assert int(back.sum()) == 0


def test_reading_a_seg_of_another_series_fails(written, tmp_path, phantom):
    write_dicom_series(phantom.image, phantom.affine, tmp_path / "other")
    other = check_series(select_series(tmp_path / "other"))
    with pytest.raises(DicomSegError, match="frame of reference"):
        read_dicom_seg(written, other, load_volume(tmp_path / "other"))
    not_seg = Path(other.files[0])
    with pytest.raises(DicomSegError, match="not a readable DICOM Segmentation"):
        read_dicom_seg(not_seg, other, load_volume(tmp_path / "other"))
