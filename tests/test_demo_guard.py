"""Random weights only on request (`monai_sam.demo`): refused by default, labelled 'demo' when asked.

Each door is checked: `segment_volume`, `monai-sam segment` (NIfTI and DICOM-SEG out), the batch
pipeline's PACS store and a bundle's inference.yaml. Also the CLI's `--version` and `--device`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from helpers_dicom_pipeline import IMAGE_SIZE, mask_prompt_file, phantom_series

from monai_sam.bundle import load_checkpoint_model
from monai_sam.cli import main
from monai_sam.demo import DEMO_CONTENT_LABEL, DEMO_TEXT, DemoWeightsError
from monai_sam.pipeline import Case, PipelineError, resolve_device, run_pipeline


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    phantom = phantom_series(root / "in" / "ct")
    prompts = mask_prompt_file(root / "prompts.json", phantom)
    return root, root / "in" / "ct", prompts


def _segment(series_dir: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["segment", "--input", str(series_dir), "--prompts", str(prompts), "--output", str(out),
            "--image-size", str(IMAGE_SIZE), "--device", "cpu", *extra]


def test_segment_volume_refuses_random_weights(series):
    from monai_sam.segment import segment_volume

    _, folder, prompts = series
    with pytest.raises(DemoWeightsError, match="--checkpoint"):
        segment_volume(folder, prompts, image_size=IMAGE_SIZE, device="cpu")


def test_cli_refuses_random_weights_and_writes_nothing(series, tmp_path, caplog):
    _, folder, prompts = series
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        assert main(_segment(folder, prompts, tmp_path / "out", "--dicom-seg")) == 2
    assert "random weights" in caplog.text and "--demo" in caplog.text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_cli_demo_outputs_say_demo(series, tmp_path):
    _, folder, prompts = series
    out = tmp_path / "out"
    assert main(_segment(folder, prompts, out, "--dicom-seg", "--demo")) == 0
    record = json.loads((out / "ct_seg.json").read_text())
    assert record["demo"] is True and record["warning"] == DEMO_TEXT
    header = nib.load(out / "ct_seg.nii.gz").header
    assert header["descrip"].tobytes().rstrip(b"\0").decode() == DEMO_TEXT
    seg = pydicom.dcmread(out / "ct_seg.dcm")
    assert seg.SeriesDescription.startswith("DEMO ")
    assert seg.ContentLabel == DEMO_CONTENT_LABEL and "DEMO" in seg.ContentDescription


class _FakePacs:
    """A DICOMweb source that serves one local series and records what is stored to it."""

    url = "http://pacs.invalid/dicom-web"

    def __init__(self, folder: Path) -> None:
        self.folder, self.stored = folder, []

    def fetch_study(self, study_uid, dest, modalities=("CT", "MR")):
        shutil.copytree(self.folder, Path(dest) / "series")
        return Path(dest), None

    def store(self, path) -> None:
        self.stored.append(pydicom.dcmread(path).SeriesDescription)


@pytest.mark.parametrize("store_demo", [False, True])
def test_demo_seg_reaches_the_pacs_only_with_store_demo(series, tmp_path, store_demo):
    _, folder, prompts = series
    study = str(pydicom.dcmread(sorted(folder.glob("*.dcm"))[0]).StudyInstanceUID)
    pacs = _FakePacs(folder)
    case = Case(name="study", kind="dicomweb", source=f"{pacs.url} study {study}", study_uid=study)

    def model():
        return load_checkpoint_model(None, image_size=IMAGE_SIZE, device="cpu", demo=True)

    summary = run_pipeline([case], model, tmp_path / "out", prompts=prompts, dicom_seg=True, dicomweb=pacs,
                           store=True, store_demo=store_demo)
    assert summary["counts"]["done"] == 1
    record = json.loads((tmp_path / "out" / "study_seg.json").read_text())
    if store_demo:
        assert len(pacs.stored) == 1 and pacs.stored[0].startswith("DEMO ")
        assert record["stored_to"] == pacs.url
    else:
        assert pacs.stored == [] and "stored_to" not in record and "demo" in record["not_stored"]


def test_checkpoint_model_refuses_random_weights_unless_demo():
    with pytest.raises(DemoWeightsError):
        load_checkpoint_model(None, image_size=IMAGE_SIZE, device="cpu")
    assert load_checkpoint_model(None, image_size=IMAGE_SIZE, device="cpu", demo=True).demo


def test_bundle_inference_refuses_random_weights_unless_demo(tmp_path):
    from monai.bundle import ConfigWorkflow

    configs = Path(__file__).resolve().parents[1] / "bundles" / "sam2_ct_abdominal_organs" / "configs"
    files = [str(configs / "train.yaml"), str(configs / "inference.yaml")]
    overrides = {"bundle_root": str(tmp_path / "b"), "dataset_dir": str(tmp_path / "d"), "num_phantoms": 1,
                 "phantom_shape": [48, 48, 12], "image_size": IMAGE_SIZE}
    wf = ConfigWorkflow(config_file=files, workflow_type="infer", **overrides)
    with pytest.raises(Exception) as err:  # MONAI wraps what the expression raised
        wf.initialize()
    cause = err.value
    while cause is not None and not isinstance(cause, DemoWeightsError):
        cause = cause.__cause__
    assert cause is not None and "random weights" in str(cause) and "--demo true" in str(cause)
    wf = ConfigWorkflow(config_file=files, workflow_type="infer", demo=True, **overrides)
    wf.initialize()
    assert wf.parser.get_parsed_content("output_postfix").endswith("_demo")


def test_version_and_unknown_device(capsys, series, tmp_path, caplog):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    from monai_sam import __version__

    assert capsys.readouterr().out.strip() == f"monai-sam {__version__}"
    with pytest.raises(PipelineError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(PipelineError, match="cuda:7"):
        resolve_device("cuda:7")  # no such GPU here (or on a 1-GPU machine)
    _, folder, prompts = series
    argv = _segment(folder, prompts, tmp_path / "out", "--demo")
    argv[argv.index("--device") + 1] = "gpu"
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        assert main(argv) == 2
    assert "unknown device 'gpu'" in caplog.text
