"""Bad input to `monai-sam segment`: each problem fails its own case with a clear message.

One archive holds one study per problem; it is segmented once with the CT bundle (module
fixture) and every test checks its case: status failed, the message names the file, folder or
study and says what is wrong, and nothing of that case is left in the output folder. No case
reaches the model (none has trained weights here: a case that did would stop the whole run
with "no trained weights", and every test would fail).

Compressed transfer syntaxes are also checked the other way round: with their plugins, JPEG,
JPEG-LS, JPEG 2000 and RLE series decode to the same Hounsfield units as the original.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers_dicom_pipeline import (
    REPO,
    SHAPE,
    base_checkpoint,
    free_port,
    phantom_series,
    segment_args,
    tiny_bundle,
)
from pydicom.uid import generate_uid

from monai_sam.cli import main
from monai_sam.data.loading import load_volume
from monai_sam.pipeline import discover_cases

PROBLEMS = [
    "compressed_without_plugin",
    "compressed_truncated",
    "duplicate_slice",
    "gantry_tilt",
    "localizer_mixed_in",
    "missing_pixel_data",
    "missing_slice",
    "mr_for_ct_bundle",
    "multi_frame",
    "non_uniform_spacing",
    "prompt_file_missing",
    "rgb",
    "truncated_header",
    "truncated_pixel_data",
    "two_series",
]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(path, write_like_original=False)


def _shift(path: Path, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0) -> None:
    ds = pydicom.dcmread(path)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x + dx, y + dy, z + dz]
    ds.save_as(path, write_like_original=False)


def _transcode(folder: Path, syntax_name: str) -> None:
    """Re-encode every file of ``folder`` losslessly with GDCM (python-gdcm, in requirements.txt)."""
    gdcm = pytest.importorskip("gdcm", reason="python-gdcm (requirements.txt) encodes the test files")
    syntax = gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax_name))
    for f in _files(folder):
        reader = gdcm.ImageReader()
        reader.SetFileName(str(f))
        assert reader.Read(), f
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(syntax)
        change.SetInput(reader.GetImage())
        assert change.Change(), f"GDCM cannot encode {syntax_name}"
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(f))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()


def _make(root: Path, problem: str) -> Path:
    """The study folder of one problem (its case is named after the folder)."""
    folder = root / problem
    seed = PROBLEMS.index(problem)
    if problem == "two_series":
        # two CT series of one study, their files mixed in one folder
        first = phantom_series(root / "tmp_a", seed=seed, series_description="venous")
        del first
        study = pydicom.dcmread(_files(root / "tmp_a")[0]).StudyInstanceUID
        phantom_series(
            root / "tmp_b",
            seed=seed,
            study_instance_uid=study,
            series_number=2,
            series_description="arterial",
        )
        folder.mkdir()
        for tag in ("a", "b"):
            for f in _files(root / f"tmp_{tag}"):
                f.rename(folder / f"{tag}_{f.name}")
            (root / f"tmp_{tag}").rmdir()
        return folder
    modality = "MR" if problem == "mr_for_ct_bundle" else "CT"
    phantom_series(folder, seed=seed, modality=modality)
    files = _files(folder)
    if problem == "missing_slice":
        files[5].unlink()
    elif problem == "duplicate_slice":
        shutil.copy(files[4], folder / "copy_of_slice_0005.dcm")
        _edit(folder / "copy_of_slice_0005.dcm", SOPInstanceUID=generate_uid(), InstanceNumber=99)
    elif problem == "non_uniform_spacing":
        for f in files[7:]:
            _shift(f, dz=3.0)
    elif problem == "gantry_tilt":
        for k, f in enumerate(files):
            _shift(f, dy=1.5 * k)
    elif problem == "localizer_mixed_in":
        shutil.copy(files[0], folder / "scout.dcm")
        _edit(
            folder / "scout.dcm", SOPInstanceUID=generate_uid(), ImageOrientationPatient=[0, 1, 0, 0, 0, -1]
        )
    elif problem == "truncated_pixel_data":
        data = files[3].read_bytes()
        files[3].write_bytes(data[: len(data) - 1000])
    elif problem == "truncated_header":
        files[3].write_bytes(files[3].read_bytes()[:700])
    elif problem == "missing_pixel_data":
        ds = pydicom.dcmread(files[6])
        del ds.PixelData
        ds.save_as(files[6], write_like_original=False)
    elif problem == "rgb":
        for f in files:
            ds = pydicom.dcmread(f)
            grey = ds.pixel_array.astype(np.uint8)
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()
            ds.save_as(f, write_like_original=False)
    elif problem == "multi_frame":
        # one multi-frame file holding every slice, as some scanners export
        datasets = [pydicom.dcmread(f) for f in files]
        merged = datasets[0]
        merged.NumberOfFrames = len(datasets)
        merged.PixelData = b"".join(ds.PixelData for ds in datasets)
        for f in files:
            f.unlink()
        merged.save_as(folder / "multiframe.dcm", write_like_original=False)
    elif problem == "prompt_file_missing":
        # a good series with exports' clutter beside it: ignored (the case fails on its prompt file)
        (folder / "README.txt").write_text("exported by the PACS")
        (folder / "DICOMDIR.pdf").write_bytes(b"%PDF-1.4 not DICOM")
        (folder / "raw").write_bytes(b"\x08\x00\x05\x00not really a tag" * 5)
    elif problem == "compressed_without_plugin":
        _transcode(folder, "JPEGLSLossless")
    elif problem == "compressed_truncated":
        _transcode(folder, "RLELossless")
        data = files[2].read_bytes()
        files[2].write_bytes(data[: len(data) - 300])
    return folder


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """Segment the archive once: pydicom without its JPEG plugins, as on a machine missing them."""
    from pydicom import config
    from pydicom.pixel_data_handlers import numpy_handler, rle_handler

    root = tmp_path_factory.mktemp("bad_archive")
    archive = root / "in"
    archive.mkdir()
    folders = {p: _make(archive, p) for p in PROBLEMS}
    # a NIfTI beside them cannot get a DICOM-SEG
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), archive / "volume.nii.gz")
    (root / "prompts").mkdir()  # only prompt_file_missing gets that far, and finds none
    ckpt = base_checkpoint(root / "sam2.1_hiera_tiny_128.pt")  # real weights: cases fail on input only
    bundle = tiny_bundle(root / "bundle", ckpt)
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "pixel_data_handlers", [numpy_handler, rle_handler])
        rc = main(segment_args(archive, root / "prompts", out, bundle, ckpt))
    summary = json.loads((out / "summary.json").read_text())
    errors = {e["case"]: e for e in summary["cases"]}
    return rc, out, folders, errors


def _failed(bad_run, case: str, *needles: str) -> str:
    rc, out, folders, errors = bad_run
    assert rc == 2
    entry = errors[case]
    assert entry["status"] == "failed", entry
    message = entry["error"]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert not list(out.glob(f"{case}_seg*")), "a failed case leaves no output"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], (
        "no staging folder or temporary file left"
    )
    return message


def test_every_problem_is_one_failed_case(bad_run):
    rc, out, folders, errors = bad_run
    assert rc == 2
    assert sorted(errors) == sorted([*PROBLEMS, "volume"])
    assert all(e["status"] == "failed" for e in errors.values())
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_two_series_in_one_folder(bad_run):
    msg = _failed(
        bad_run, "two_series", "2 CT series could be segmented", "--series-uid", "venous", "arterial"
    )
    assert str(bad_run[2]["two_series"]) in msg


def test_missing_slice(bad_run):
    _failed(bad_run, "missing_slice", str(bad_run[2]["missing_slice"]), "missing slice(s)", "slice_0005.dcm")


def test_duplicate_slice_positions(bad_run):
    _failed(
        bad_run, "duplicate_slice", "duplicate slice positions", "copy_of_slice_0005.dcm", "slice_0005.dcm"
    )


def test_non_uniform_spacing(bad_run):
    _failed(bad_run, "non_uniform_spacing", "non-uniform slice spacing", "13.000", "slice_0007.dcm")


def test_gantry_tilt(bad_run):
    expected = np.degrees(np.arctan2(1.5 * (SHAPE[2] - 1), 10.0 * (SHAPE[2] - 1)))
    _failed(bad_run, "gantry_tilt", f"gantry tilt of {expected:.2f} degrees", "resampled")


def test_localizer_mixed_into_the_series(bad_run):
    _failed(bad_run, "localizer_mixed_in", "mixed ImageOrientationPatient", "scout.dcm", "localizer")


def test_truncated_pixel_data(bad_run):
    _failed(bad_run, "truncated_pixel_data", "slice_0004.dcm is truncated", "pixel data needs")


def test_truncated_header(bad_run):
    _failed(bad_run, "truncated_header", "slice_0004.dcm", "truncated or corrupt")


def test_missing_pixel_data(bad_run):
    _failed(bad_run, "missing_pixel_data", "no pixel data", "slice_0007.dcm")


def test_rgb_series_for_a_ct_bundle(bad_run):
    _failed(bad_run, "rgb", "no series usable as a CT volume", "colour images (SamplesPerPixel 3)")


def test_multi_frame_series_for_a_ct_bundle(bad_run):
    _failed(bad_run, "multi_frame", "no series usable as a CT volume", "multi-frame", "multiframe.dcm")


def test_mr_series_for_a_ct_bundle(bad_run):
    _failed(bad_run, "mr_for_ct_bundle", "modality MR (this model reads CT)")


def test_compressed_syntax_without_its_plugin(bad_run):
    _failed(
        bad_run,
        "compressed_without_plugin",
        "slice_0001.dcm",
        "JPEG-LS Lossless",
        "install pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    )


def test_truncated_compressed_file(bad_run):
    _failed(bad_run, "compressed_truncated", "slice_0003.dcm", "RLE Lossless", "truncated")


def test_missing_prompt_file_after_non_dicom_files_were_ignored(bad_run):
    # the series loaded (only the prompt file is missing)
    _failed(bad_run, "prompt_file_missing", "no prompt file", "prompt_file_missing.json")


def test_nifti_cannot_get_a_dicom_seg(bad_run):
    _failed(bad_run, "volume", "volume.nii.gz", "--dicom-seg needs a DICOM input")


def test_non_dicom_files_mixed_in_are_ignored(tmp_path):
    ph = phantom_series(tmp_path / "study" / "ct", seed=7)
    (tmp_path / "study" / "ct" / "README.txt").write_text("exported by the PACS")
    (tmp_path / "study" / "report.pdf").write_bytes(b"%PDF-1.4 not a DICOM file")
    (tmp_path / "study" / "ct" / "raw").write_bytes(b"\x08\x00\x05\x00not really a tag" * 5)
    (tmp_path / "study" / "ct" / "Thumbs.db").write_bytes(np.random.default_rng(0).bytes(5000))
    cases = discover_cases(tmp_path / "study")
    assert [(c.name, c.kind, c.error) for c in cases] == [("ct", "dicom", None)]
    volume = load_volume(cases[0].path, series_uid=cases[0].series_uid)
    np.testing.assert_allclose(volume[0].numpy(), ph.image, atol=0.5 + 1e-3)


def test_empty_input_folder(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        rc = main(
            [
                "segment",
                "--input",
                str(tmp_path / "empty"),
                "--prompts",
                str(tmp_path),
                "--output",
                str(tmp_path / "out"),
                "--demo",
            ]
        )
    assert rc == 2
    assert f"{tmp_path / 'empty'}: no NIfTI file and no DICOM file found" in caplog.text


def test_dicomweb_server_down(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    out = tmp_path / "out"
    rc = main(
        [
            "segment",
            "--dicomweb",
            url,
            "--study",
            "1.2.3.4",
            "--prompts",
            str(tmp_path),
            "--output",
            str(out),
            "--dicomweb-attempts",
            "2",
            "--demo",
        ]
    )
    assert rc == 2
    entry = json.loads((out / "summary.json").read_text())["cases"][0]
    assert entry["case"] == "study_1.2.3.4" and entry["status"] == "failed"
    assert f"DICOMweb server {url} cannot be reached" in entry["error"] and "1.2.3.4" in entry["error"]
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_output_folder_without_write_permission(tmp_path):
    """The run stops before any case, naming the folder (tested as root without DAC override)."""
    phantom_series(tmp_path / "ct", seed=8)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    cmd = [
        sys.executable,
        "-m",
        "monai_sam.cli",
        "segment",
        "--input",
        str(tmp_path / "ct"),
        "--prompts",
        str(tmp_path),
        "--output",
        str(readonly / "out"),
        "--demo",
    ]
    if os.geteuid() == 0:  # root writes anywhere: drop the capabilities that allow it
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip(
                "running as root and setpriv (util-linux) is missing: cannot take away write permission"
            )
        cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner", *cmd]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    readonly.chmod(0o755)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot write to output folder {readonly / 'out'}" in done.stderr
    assert "Permission denied" in done.stderr
    assert list(readonly.iterdir()) == []


# ----------------------------------------------------------------------------- compressed syntaxes


@pytest.mark.parametrize(
    "syntax,name",
    [
        ("JPEGLSLossless", "JPEG-LS Lossless"),
        ("JPEG2000Lossless", "JPEG 2000"),
        ("JPEGLosslessProcess14_1", "JPEG Lossless"),
        ("RLELossless", "RLE Lossless"),
    ],
)
def test_compressed_series_decode_with_the_plugins(syntax, name):
    """With requirements.txt's plugins installed, compressed series read like the original."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        ph = phantom_series(folder, seed=9)
        original = [pydicom.dcmread(f).pixel_array for f in _files(folder)]
        _transcode(folder, syntax)
        ds = pydicom.dcmread(_files(folder)[0])
        assert name in ds.file_meta.TransferSyntaxUID.name and ds.file_meta.TransferSyntaxUID.is_compressed
        for f, ref in zip(_files(folder), original, strict=True):
            np.testing.assert_array_equal(pydicom.dcmread(f).pixel_array, ref)  # pydicom + plugin
        volume = load_volume(folder)  # checks (one decode per syntax) + ITK
        np.testing.assert_allclose(volume[0].numpy(), ph.image, atol=0.5 + 1e-3)
