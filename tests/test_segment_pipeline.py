"""`monai-sam segment` over a DICOM archive with a bundle: DICOM-SEG out, resume, failures, ranks, --auto.

One archive of three studies is segmented once (module fixture) with a tiny trained bundle
(SAM2.1 hiera-t at 128 px, random weights saved as official + trained-part checkpoints):
patient1 (a CT series plus a 2-slice localizer series), patient2 (a CT series) and patient3
(a CT series with a missing slice). Mask prompts on the key slice are reproduced by SAM2 on
that slice, which pins the geometry from the prompt file to the DICOM-SEG frames.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers_dicom_pipeline import (
    CT_BUNDLE,
    REPO,
    base_checkpoint,
    dciodvfy_errors,
    key_slice_iou,
    mask_prompt_file,
    phantom_series,
    segment_args,
    set_auto_prompter,
    tiny_bundle,
)

from monai_sam.cli import main
from monai_sam.data.loading import load_volume
from monai_sam.io.dicom import check_series, select_series
from monai_sam.io.dicom_seg import read_dicom_seg
from monai_sam.pipeline import discover_cases

AUTO_PROMPTER = (
    "$lambda image: [monai_sam.prompts.ObjectPrompts(1, 'liver', [monai_sam.prompts.SlicePrompt("
    "image.shape[-1] // 2, box=monai_sam.transforms.prompts.box_from_mask("
    "(image[0, :, :, image.shape[-1] // 2] > 0).numpy()))])]"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ckpt = base_checkpoint(root / "sam2.1_hiera_tiny_128.pt")
    return ckpt, tiny_bundle(root / "bundle", ckpt)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    phantoms = {}
    p1 = phantom_series(root / "in" / "patient1" / "ct", seed=0, series_description="abdomen")
    study1 = pydicom.dcmread(next((root / "in" / "patient1" / "ct").iterdir())).StudyInstanceUID
    # a localizer of the same study: 2 slices, left aside by the series picker
    from monai_sam.data.phantom import make_phantom
    from monai_sam.io.dicom import write_dicom_series

    scout = make_phantom("ct", seed=0, shape=(48, 48, 2), spacing=(4.3, 4.3, 60.0))
    write_dicom_series(
        scout.image,
        scout.affine,
        root / "in" / "patient1" / "scout",
        study_instance_uid=study1,
        series_number=9,
        series_description="localizer",
    )
    phantoms["patient1_ct"] = p1
    phantoms["patient2_ct"] = phantom_series(root / "in" / "patient2" / "ct", seed=1)
    phantoms["patient3_ct"] = phantom_series(root / "in" / "patient3" / "ct", seed=2)
    sorted((root / "in" / "patient3" / "ct").iterdir())[5].unlink()  # a missing slice
    prompts = root / "prompts"
    prompts.mkdir()
    for name, ph in phantoms.items():
        mask_prompt_file(prompts / f"{name}.json", ph)
    return root, phantoms


def _segment(archive, models, out: Path, *extra: str) -> int:
    root, _ = archive
    ckpt, bundle = models
    return main(segment_args(root / "in", root / "prompts", out, bundle, ckpt, *extra))


@pytest.fixture(scope="module")
def first_run(archive, models):
    out = archive[0] / "out"
    rc = _segment(archive, models, out)
    return rc, out, json.loads((out / "summary.json").read_text())


def test_failed_case_is_listed_and_the_others_are_done(first_run, archive):
    rc, out, summary = first_run
    assert rc == 2  # one case failed
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    by_case = {e["case"]: e for e in summary["cases"]}
    assert sorted(by_case) == ["patient1_ct", "patient2_ct", "patient3_ct"]
    failed = by_case["patient3_ct"]
    assert failed["status"] == "failed"
    assert "missing slice" in failed["error"] and str(archive[0] / "in" / "patient3") in failed["error"]
    # nothing partial: no output of the failed case, no staging folder or temporary file
    assert not list(out.glob("patient3_ct*"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_dicom_seg_is_valid_and_overlays_the_source_series(first_run, archive):
    """The issue's 'done when': a SEG that dciodvfy accepts and that lies on the source slices."""
    _, out, _ = first_run
    root, phantoms = archive
    seg_path = out / "patient1_ct_seg.dcm"
    assert dciodvfy_errors(seg_path) == []
    series = check_series(select_series(root / "in" / "patient1" / "ct"))
    volume = load_volume(root / "in" / "patient1" / "ct")
    back, names = read_dicom_seg(seg_path, series, volume)
    assert names == {1: "liver"}
    iou = key_slice_iou(back[0].numpy(), phantoms["patient1_ct"])
    assert iou > 0.85, f"the prompted liver is not where the source series shows it (IoU {iou:.3f})"
    # the NIfTI written beside it is the same label
    nifti = load_volume(out / "patient1_ct_seg.nii.gz")
    np.testing.assert_array_equal(nifti[0].numpy(), back[0].numpy())
    np.testing.assert_allclose(nifti.affine.numpy(), volume.affine.numpy(), atol=1e-3)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid  # the CT, not the localizer


def test_record_and_csvs_give_per_object_figures(first_run, archive):
    """Volume, slice range and mean HU of the liver, from the written label and the source CT;
    SAM2's score for every slice; a preview picture."""
    import csv

    from PIL import Image

    _, out, _ = first_run
    root, _ = archive
    record = json.loads((out / "patient2_ct_seg.json").read_text())
    (liver,) = record["statistics"]["objects"]
    volume = load_volume(root / "in" / "patient2" / "ct")  # RAS, HU
    label = load_volume(out / "patient2_ct_seg.nii.gz")
    mask = label[0].numpy() == 1
    assert mask.any()
    spacing = np.abs(np.linalg.det(volume.affine.numpy()[:3, :3]))
    assert liver["name"] == "liver" and liver["voxels"] == int(mask.sum())
    assert liver["volume_ml"] == pytest.approx(mask.sum() * spacing / 1000, rel=1e-3)
    present = np.flatnonzero(mask.any(axis=(0, 1)))
    assert (liver["first_slice"], liver["last_slice"]) == (present[0], present[-1])
    assert liver["mean_intensity"] == pytest.approx(float(volume[0].numpy()[mask].mean()), abs=0.01)
    assert liver["intensity_unit"] == "HU"
    scored = {s["slice"]: s for s in liver["slices"]}
    assert sorted(scored) == list(range(volume.shape[-1])), "every slice has SAM2's score"
    assert all(s["object_score"] > 0 for k, s in scored.items() if s["voxels"] > 0)
    assert liver["check_slices"] == [k for k, s in scored.items() if s["check"]]
    with open(out / "patient2_ct_seg_statistics.csv") as fp:
        (row,) = csv.DictReader(fp)
    assert int(row["voxels"]) == liver["voxels"] and row["intensity_unit"] == "HU"
    with open(out / "patient2_ct_seg_slice_scores.csv") as fp:
        assert len(list(csv.DictReader(fp))) == volume.shape[-1]
    with Image.open(out / "patient2_ct_seg_preview.png") as png:
        assert png.format == "PNG"


def test_record_names_model_weights_and_prompts(first_run, models):
    _, out, _ = first_run
    ckpt, bundle = models
    record = json.loads((out / "patient2_ct_seg.json").read_text())
    model_sha = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    assert record["status"] == "done" and record["prompts"] == "user"
    assert record["outputs"] == [
        "patient2_ct_seg.nii.gz",
        "patient2_ct_seg.dcm",
        "patient2_ct_seg_statistics.csv",
        "patient2_ct_seg_slice_scores.csv",
        "patient2_ct_seg_preview.png",
    ]
    assert record["checkpoint_sha256"] == model_sha and record["model"] == "bundle"
    assert (
        record["model_version"]
        == json.loads((CT_BUNDLE / "configs" / "metadata.json").read_text())["version"]
    )
    seg = pydicom.dcmread(out / "patient2_ct_seg.dcm", stop_before_pixels=True)
    assert seg.DeviceSerialNumber == model_sha
    params = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "base_checkpoint_sha256=" + hashlib.sha256(ckpt.read_bytes()).hexdigest() in params
    assert "image_size=128" in params
    assert str(seg.SeriesInstanceUID) == record["seg_series_uid"]


def test_rerun_skips_done_cases_and_retries_the_failed_one(first_run, archive, models, caplog):
    _, out, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("patient[12]_ct_seg.*")}
    killed = out / ".patient3_ct_seg.staging-killed"  # as a run killed in the middle of a case leaves it
    killed.mkdir()
    (killed / "patient3_ct_seg.nii.gz").write_bytes(b"half a file")
    with caplog.at_level(logging.INFO, logger="monai_sam"):
        rc = _segment(archive, models, out)
    assert rc == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 0, "skipped": 2, "failed": 1}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("patient[12]_ct_seg.*")} == before
    assert "case patient1_ct: skipped (already done" in caplog.text
    assert "case patient3_ct FAILED" in caplog.text and "missing slice" in caplog.text
    assert not killed.exists() and not list(out.glob("patient3*"))


def test_ranks_split_the_cases(first_run, archive, models, monkeypatch):
    """With WORLD_SIZE=2 each rank takes every other case (here all done: no model is loaded)."""
    _, out, _ = first_run
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        _segment(archive, models, out)
        summary = json.loads((out / f"summary_rank{rank}.json").read_text())
        assert summary["rank"] == rank and summary["world_size"] == 2
        seen.append([e["case"] for e in summary["cases"]])
    assert seen == [["patient1_ct", "patient3_ct"], ["patient2_ct"]]


@pytest.mark.slow
def test_torchrun_processes_share_the_archive(first_run, archive, models):
    _, out, _ = first_run
    root, _ = archive
    ckpt, bundle = models
    for f in out.glob("summary_rank*.json"):
        f.unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=0",
        "-m",
        "monai_sam.cli",
        *segment_args(root / "in", root / "prompts", out, bundle, ckpt),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # patient3 fails on rank 0, and torchrun reports it
    cases = {}
    for rank in (0, 1):
        summary = json.loads((out / f"summary_rank{rank}.json").read_text())
        cases.update({e["case"]: (rank, e["status"]) for e in summary["cases"]})
    assert cases == {
        "patient1_ct": (0, "skipped"),
        "patient2_ct": (1, "skipped"),
        "patient3_ct": (0, "failed"),
    }


def test_auto_prompts_are_marked_as_automatic(archive, models, tmp_path):
    import shutil

    root, phantoms = archive
    ckpt, trained = models
    bundle = tmp_path / "auto_bundle"  # the same trained parts; inference.yaml gets our auto_prompter
    shutil.copytree(trained, bundle)
    set_auto_prompter(bundle, AUTO_PROMPTER)
    out = tmp_path / "out"
    rc = main(
        [
            "segment",
            "--input",
            str(root / "in" / "patient2" / "ct"),
            "--bundle",
            str(bundle),
            "--checkpoint",
            str(ckpt),
            "--auto",
            "--output",
            str(out),
            "--dicom-seg",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "ct_seg_auto_prompts.dcm",
        "ct_seg_auto_prompts.json",
        "ct_seg_auto_prompts.nii.gz",
        "ct_seg_auto_prompts_preview.png",
        "ct_seg_auto_prompts_slice_scores.csv",
        "ct_seg_auto_prompts_statistics.csv",
        "summary.json",
    ]
    record = json.loads((out / "ct_seg_auto_prompts.json").read_text())
    assert record["prompts"] == "automatic" and record["objects"] == {"1": "liver"}
    seg = pydicom.dcmread(out / "ct_seg_auto_prompts.dcm", stop_before_pixels=True)
    assert seg.SeriesDescription == "auto_bundle (automatic prompts)"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert dciodvfy_errors(out / "ct_seg_auto_prompts.dcm") == []
    assert nib.load(out / "ct_seg_auto_prompts.nii.gz").shape == phantoms["patient2_ct"].label.shape


def test_auto_needs_a_bundle_with_an_auto_prompter(archive, models, tmp_path, caplog):
    import shutil

    root, _ = archive
    bundle = tmp_path / "no_auto"
    shutil.copytree(models[1] / "configs", bundle / "configs")
    set_auto_prompter(bundle, None)
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        rc = main(
            [
                "segment",
                "--input",
                str(root / "in"),
                "--bundle",
                str(bundle),
                "--auto",
                "--output",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
    assert rc == 2
    assert f"bundle {bundle} has no automatic mode" in caplog.text and "auto_prompter" in caplog.text
    assert not (tmp_path / "out").exists()


def test_bundle_without_trained_weights_is_refused(archive, models, tmp_path, caplog):
    import shutil

    root, _ = archive
    untrained = tmp_path / "untrained"
    shutil.copytree(models[1] / "configs", untrained / "configs")
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        rc = main(
            [
                "segment",
                "--input",
                str(root / "in" / "patient2" / "ct"),
                "--bundle",
                str(untrained),
                "--prompts",
                str(root / "prompts" / "patient2_ct.json"),
                "--output",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
    assert rc == 2
    assert f"has no trained weights at {untrained / 'models' / 'model.pt'}" in caplog.text
    assert "monai.bundle run training" in caplog.text
    assert not list((tmp_path / "out").glob("*_seg*"))


def test_one_prompt_file_for_many_cases_is_refused(archive, models, tmp_path, caplog):
    root, _ = archive
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        rc = main(
            [
                "segment",
                "--input",
                str(root / "in"),
                "--bundle",
                str(models[1]),
                "--checkpoint",
                str(models[0]),
                "--prompts",
                str(root / "prompts" / "patient1_ct.json"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
    assert rc == 2
    assert "is one prompt file but the input holds 3 cases" in caplog.text


def test_discovery_picks_one_series_per_study(archive):
    root, _ = archive
    cases = discover_cases(root / "in", modalities=("CT",))
    assert [(c.name, c.kind) for c in cases] == [
        ("patient1_ct", "dicom"),
        ("patient2_ct", "dicom"),
        ("patient3_ct", "dicom"),
    ]
    p1 = cases[0]
    assert p1.error is None and p1.path == root / "in" / "patient1" / "ct"  # the localizer is left aside
    ct_uid = pydicom.dcmread(next(p1.path.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert p1.series_uid == ct_uid
    # one file stands for its series, even the localizer (what was asked for explicitly is taken)
    scout_file = next((root / "in" / "patient1" / "scout").iterdir())
    (only,) = discover_cases(scout_file, modalities=("CT",))
    assert only.series_uid == pydicom.dcmread(scout_file, stop_before_pixels=True).SeriesInstanceUID
    # an MR model finds nothing it can use, and says why for each series
    mr = discover_cases(root / "in" / "patient1", modalities=("MR",))
    assert len(mr) == 1 and "no series usable as a MR volume" in mr[0].error
    assert "modality CT (this model reads MR)" in mr[0].error and "localizer" in mr[0].error
