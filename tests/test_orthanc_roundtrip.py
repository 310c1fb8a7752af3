"""PACS round trip through a real Orthanc: QIDO-RS / WADO-RS in, segment, STOW-RS the SEG back.

The test starts its own Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) with a
config in a temporary folder: a free loopback HTTP port, remote access refused, no DICOM
listener, storage in the temporary folder. The Debian service is never used. The phantom
series is uploaded through Orthanc's own REST API (not through the code under test), then
``monai-sam segment --dicomweb URL --study UID`` must leave a SEG in Orthanc that references
that series and overlays it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import requests
from helpers_dicom_pipeline import (
    base_checkpoint,
    key_slice_iou,
    mask_prompt_file,
    phantom_series,
    run_orthanc,
    tiny_bundle,
)

from monai_sam.cli import main
from monai_sam.data.loading import load_volume
from monai_sam.io.dicom import check_series, select_series
from monai_sam.io.dicom_seg import read_dicom_seg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """An Orthanc with the DICOMweb plugin on a free loopback port; stopped after the module."""
    yield from run_orthanc(tmp_path_factory.mktemp("orthanc"))


@pytest.fixture(scope="module")
def study(orthanc, tmp_path_factory):
    """The phantom CT uploaded to Orthanc through its REST API; returns the local copy too."""
    root = tmp_path_factory.mktemp("pacs_study")
    ph = phantom_series(root / "ct", seed=4, series_description="abdomen venous")
    for f in sorted((root / "ct").iterdir()):
        r = requests.post(f"{orthanc}/instances", data=f.read_bytes(), timeout=30)
        assert r.ok, r.text
    first = pydicom.dcmread(next((root / "ct").iterdir()), stop_before_pixels=True)
    return root, ph, str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs_models")
    ckpt = base_checkpoint(root / "base.pt")
    return ckpt, tiny_bundle(root / "bundle", ckpt)


def _series_in_orthanc(orthanc: str, study_uid: str) -> dict[str, str]:
    """SeriesInstanceUID -> Modality, asked through Orthanc's REST API (independent of our client)."""
    found = requests.post(
        f"{orthanc}/tools/find",
        json={"Level": "Series", "Expand": True, "Query": {"StudyInstanceUID": study_uid}},
        timeout=30,
    )
    found.raise_for_status()
    return {
        s["MainDicomTags"]["SeriesInstanceUID"]: s["MainDicomTags"].get("Modality", "") for s in found.json()
    }


def _run(orthanc, study, bundle, out: Path, study_uid: str | None = None) -> int:
    root, ph, uid, _ = study
    ckpt, bundle_dir = bundle
    prompts = root / "prompts.json"
    if not prompts.exists():
        mask_prompt_file(prompts, ph)
    return main(
        [
            "segment",
            "--dicomweb",
            f"{orthanc}/dicom-web",
            "--study",
            study_uid or uid,
            "--bundle",
            str(bundle_dir),
            "--checkpoint",
            str(ckpt),
            "--prompts",
            str(prompts),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--dicomweb-attempts",
            "1",
        ]
    )


@pytest.fixture(scope="module")
def round_trip(orthanc, study, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("pacs_out")
    return _run(orthanc, study, bundle, out), out


def test_seg_is_stored_in_orthanc_and_references_the_series(round_trip, orthanc, study):
    rc, out = round_trip
    root, ph, study_uid, series_uid = study
    assert rc == 0
    series = _series_in_orthanc(orthanc, study_uid)
    segs = [uid for uid, modality in series.items() if modality == "SEG"]
    assert series[series_uid] == "CT" and len(segs) == 1
    # fetch the stored SEG back from Orthanc (REST), not from our output folder
    instances = requests.post(
        f"{orthanc}/tools/find",
        json={"Level": "Instance", "Query": {"SeriesInstanceUID": segs[0]}},
        timeout=30,
    )
    (orthanc_id,) = instances.json()
    stored = out / "from_orthanc.dcm"
    stored.write_bytes(requests.get(f"{orthanc}/instances/{orthanc_id}/file", timeout=30).content)
    seg = pydicom.dcmread(stored)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    record = json.loads((out / f"study_{study_uid}_seg.json").read_text())
    assert record["stored_to"] == f"{orthanc}/dicom-web" and record["seg_series_uid"] == segs[0]
    # and it overlays the series it was made from
    local = check_series(select_series(root / "ct"))
    back, names = read_dicom_seg(stored, local, load_volume(root / "ct"))
    assert names == {1: "liver"}
    assert key_slice_iou(back[0].numpy(), ph) > 0.85
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the download folder is gone


def test_rerun_does_not_store_a_second_seg(round_trip, orthanc, study, bundle):
    _, out = round_trip
    assert _run(orthanc, study, bundle, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 0, "skipped": 1, "failed": 0}
    modalities = list(_series_in_orthanc(orthanc, study[2]).values())
    assert modalities.count("SEG") == 1


def test_study_not_on_the_server(orthanc, study, bundle, tmp_path):
    missing = "1.2.826.0.1.3680043.8.498.12345"
    out = tmp_path / "out"
    assert _run(orthanc, study, bundle, out, study_uid=missing) == 2
    entry = json.loads((out / "summary.json").read_text())["cases"][0]
    assert entry["status"] == "failed"
    assert f"study {missing} is not on DICOMweb server {orthanc}/dicom-web" in entry["error"]
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
