"""One Python call and one command segment a phantom volume from prompts on one slice.

The phantom is stored in a non-RAS orientation (flipped x and z) so that the way back to the
input's geometry is checked. Random weights make the propagated slices meaningless, but a mask
prompt is reproduced on its key slice by SAM2 itself, which pins the whole geometry chain:
prompt file (stored voxels) -> RAS network grid -> 128 px model input -> label back in the
stored orientation.
"""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_sam.cli import main
from monai_sam.data.phantom import LIVER, SPLEEN, make_phantom
from monai_sam.networks import build_sam2_model
from monai_sam.prompts import ObjectPrompts, SlicePrompt
from monai_sam.segment import case_name, segment_volume

S = 128
FLIP = np.diag([-1.0, 1.0, -1.0, 1.0])  # stored axes: x and z reversed against RAS


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A small CT phantom written as LAI NIfTI, its label, and the stored key slice."""
    root = tmp_path_factory.mktemp("case")
    ph = make_phantom("ct", seed=3, shape=(64, 64, 8), spacing=(3.4, 3.4, 18.0))
    nx, _, nz = ph.label.shape
    # stored[i, j, k] = ras[nx-1-i, j, nz-1-k]; the affine maps stored indices to the same world points
    reindex = np.array([[-1, 0, 0, nx - 1], [0, 1, 0, 0], [0, 0, -1, nz - 1], [0, 0, 0, 1]], float)
    affine = ph.affine @ reindex
    image = np.ascontiguousarray(ph.image[::-1, :, ::-1]).astype(np.int16)
    label = np.ascontiguousarray(ph.label[::-1, :, ::-1])
    nib.save(nib.Nifti1Image(image, affine), str(root / "phantom_ct.nii.gz"))
    k = int(np.argmax((label == LIVER).sum(axis=(0, 1))))  # stored slice with the most liver
    assert (label[..., k] == SPLEEN).sum() > 10, "the key slice should show the spleen too"
    return root, affine, label, k


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_sam2_model("sam2.1_hiera_t", image_size=S)
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def _prompt_file(case) -> str:
    """Liver: a mask on the key slice; spleen: a box (stored voxel corners) on the same slice."""
    root, affine, label, k = case
    mask = np.zeros(label.shape, np.uint8)
    mask[..., k] = label[..., k] == LIVER
    nib.save(nib.Nifti1Image(mask, affine), str(root / "liver_key_slice.nii.gz"))
    ii, jj = np.nonzero(label[..., k] == SPLEEN)
    doc = {
        "version": 1,
        "coordinates": "voxel",
        "objects": [
            {"id": LIVER, "name": "liver", "slices": [{"mask": "liver_key_slice.nii.gz"}]},
            {
                "id": SPLEEN,
                "name": "spleen",
                "slices": [{"box": [[int(ii.min()), int(jj.min()), k], [int(ii.max()), int(jj.max()), k]]}],
            },
        ],
    }
    path = root / "prompts.json"
    path.write_text(json.dumps(doc, indent=2))
    return str(path)


def _check_output(seg: np.ndarray, case) -> None:
    _, _, label, k = case
    assert seg.shape == label.shape
    assert set(np.unique(seg).tolist()) <= {0, LIVER, SPLEEN}
    liver, pred = label[..., k] == LIVER, seg[..., k] == LIVER
    iou = (liver & pred).sum() / (liver | pred).sum()
    assert iou > 0.85, f"the mask prompt is not reproduced on its key slice (IoU {iou:.3f})"


def test_one_python_call(case, checkpoint):
    root, affine, label, k = case
    out = segment_volume(
        root / "phantom_ct.nii.gz", _prompt_file(case), checkpoint=checkpoint, image_size=S, device="cpu"
    )
    np.testing.assert_allclose(out.affine.numpy(), affine, atol=1e-4)
    _check_output(out[0].numpy().astype(int), case)

    # the same objects given in Python on the RAS grid give the same label
    ras_label = label[::-1, :, ::-1]
    kr = label.shape[2] - 1 - k
    ii, jj = np.nonzero(ras_label[..., kr] == SPLEEN)
    objects = [
        ObjectPrompts(LIVER, "liver", [SlicePrompt(kr, mask=ras_label[..., kr] == LIVER)]),
        ObjectPrompts(SPLEEN, "spleen", [SlicePrompt(kr, box=[jj.min(), ii.min(), jj.max(), ii.max()])]),
    ]
    again = segment_volume(
        root / "phantom_ct.nii.gz", objects, checkpoint=checkpoint, image_size=S, device="cpu"
    )
    assert (again.numpy() == out.numpy()).mean() > 0.999


def test_command_line(case, checkpoint, tmp_path):
    root, affine, _, _ = case
    argv = [
        "segment",
        "--input",
        str(root / "phantom_ct.nii.gz"),
        "--prompts",
        _prompt_file(case),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(tmp_path / "out"),
        "--image-size",
        str(S),
        "--device",
        "cpu",
        "--encoder-batch-size",
        "4",
    ]
    assert main(argv) == 0
    written = tmp_path / "out" / "phantom_ct_seg.nii.gz"
    img = nib.load(str(written))
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    assert img.get_data_dtype() == np.uint8
    _check_output(np.asarray(img.dataobj).astype(int), case)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_command_line_errors_are_clear(case, checkpoint, tmp_path, caplog):
    root, _, _, _ = case
    base = [
        "segment",
        "--input",
        str(root / "phantom_ct.nii.gz"),
        "--output",
        str(tmp_path),
        "--image-size",
        str(S),
        "--device",
        "cpu",
    ]
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        assert (
            main(
                base
                + [
                    "--prompts",
                    _prompt_file(case),
                    "--checkpoint",
                    str(checkpoint),
                    "--model-size",
                    "sam2.1_hiera_s",
                ]
            )
            == 2
        )
    assert "built as sam2.1_hiera_s but the checkpoint looks like sam2.1_hiera_t" in caplog.text
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": 1, "coordinates": "voxel", "objects": []}))
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        assert main(base + ["--prompts", str(empty), "--checkpoint", str(checkpoint)]) == 2
    assert "empty.json" in caplog.text and "no object has a prompt" in caplog.text
    assert not list(tmp_path.glob("*_seg.nii.gz"))


def test_case_names():
    assert case_name("/data/ct_001.nii.gz") == "ct_001"
    assert case_name("/data/series_folder") == "series_folder"


def test_stop_after_absent_reaches_the_propagation(case, checkpoint, tmp_path, monkeypatch):
    from monai_sam.networks.sam2_volume import Sam2VolumeSegmenter

    root, _, _, _ = case
    seen = []
    real = Sam2VolumeSegmenter._frames  # the propagation loop, where the early stop acts

    def spy(self, run, progress=False, stop_after_absent=None):
        seen.append(stop_after_absent)
        return real(self, run, progress, stop_after_absent)

    monkeypatch.setattr(Sam2VolumeSegmenter, "_frames", spy)
    argv = ["segment", "--input", str(root / "phantom_ct.nii.gz"), "--prompts", _prompt_file(case),
            "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--image-size", str(S),
            "--device", "cpu", "--stop-after-absent", "2"]
    assert main(argv) == 0
    assert seen and set(seen) == {2}
    assert main([*argv[:-1], "0", "--overwrite"]) != 0  # K must be at least 1
