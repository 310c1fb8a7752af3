"""De-identified exports: blank Study/Series/SOP Instance UIDs still read as one series, but no SEG.

A file cut short before its SeriesInstanceUID is still reported as truncated (the other case).
"""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
from helpers_dicom_pipeline import phantom_series

from monai_sam.data.loading import load_volume
from monai_sam.io.dicom import DicomSeriesError, find_series, select_series
from monai_sam.io.dicom_seg import AlgorithmInfo, DicomSegError, write_dicom_seg
from monai_sam.pipeline import discover_cases, run_pipeline

BLANKED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _blank_uids(folder, remove: bool = False) -> None:
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for tag in BLANKED:
            if remove:
                delattr(ds, tag)
            else:
                setattr(ds, tag, "")
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"  # kept valid: only the data set is stripped
        ds.save_as(f, write_like_original=False)


@pytest.fixture(scope="module")
def deidentified(tmp_path_factory):
    root = tmp_path_factory.mktemp("deid")
    phantom = phantom_series(root / "ct")
    reference = load_volume(root / "ct")
    _blank_uids(root / "ct")
    return root, phantom, reference


@pytest.mark.parametrize("remove", [False, True])
def test_blank_or_removed_uids_load_as_one_series_with_a_warning(tmp_path, caplog, remove):
    phantom_series(tmp_path / "ct")
    reference = load_volume(tmp_path / "ct")
    _blank_uids(tmp_path / "ct", remove=remove)
    with caplog.at_level(logging.WARNING, logger="monai_sam"):
        volume = load_volume(tmp_path / "ct")
    assert "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID blank or missing" in caplog.text
    assert volume.shape == reference.shape
    np.testing.assert_array_equal(volume.numpy(), reference.numpy())
    np.testing.assert_allclose(np.asarray(volume.affine), np.asarray(reference.affine), atol=1e-4)


def test_a_seg_is_refused_naming_the_missing_uids(deidentified, tmp_path):
    root, phantom, reference = deidentified
    series = select_series(root / "ct")
    assert series.missing_uids == BLANKED
    label = reference.clone()
    label[:] = 0
    label[0, 10:20, 10:20, 5] = 1
    with pytest.raises(DicomSegError, match="a SEG must reference its source images by their UIDs") as err:
        write_dicom_seg(label, series, tmp_path / "x.dcm", {1: "liver"}, AlgorithmInfo("m", "1"))
    assert "SOPInstanceUID" in str(err.value) and not (tmp_path / "x.dcm").exists()


def test_the_pipeline_fails_the_case_before_any_model(deidentified, tmp_path):
    root, _, _ = deidentified
    cases = discover_cases(root)
    assert len(cases) == 1 and cases[0].error is None

    def no_model():
        raise AssertionError("the model must not be built for a case that cannot get a SEG")

    prompts = tmp_path / "p.json"
    prompts.write_text('{"version": 1, "coordinates": "voxel", "objects": []}')
    summary = run_pipeline(cases, no_model, tmp_path / "out", prompts=prompts, dicom_seg=True)
    assert summary["counts"]["failed"] == 1
    assert "a SEG must reference its source images" in summary["cases"][0]["error"]


def test_a_file_cut_before_its_uids_is_still_truncated(tmp_path):
    phantom_series(tmp_path / "ct")
    victim = sorted((tmp_path / "ct").glob("*.dcm"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[:400])  # inside the header, before SeriesInstanceUID and pixel data
    with pytest.raises(DicomSeriesError, match="truncated or corrupt"):
        find_series(tmp_path / "ct")
