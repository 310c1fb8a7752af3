"""Shared by the DICOM pipeline tests: tiny phantoms as DICOM, a tiny trained bundle, prompt files.

Not a test module (no ``test_`` prefix): imported by test_segment_pipeline.py,
test_dicom_bad_input.py and test_orthanc_roundtrip.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CT_BUNDLE = REPO / "bundles" / "sam2_ct_abdominal_organs"
IMAGE_SIZE = 128
SHAPE = (48, 48, 12)  # voxels; 4.3 x 4.3 x 10 mm keeps the whole phantom abdomen
SPACING = (4.3, 4.3, 10.0)
LIVER = 1


def require_servers() -> bool:
    """CI sets MONAI_SAM_REQUIRE_SERVERS=1: a missing orthanc / dciodvfy is then a failure, not a skip."""
    return os.environ.get("MONAI_SAM_REQUIRE_SERVERS", "") not in ("", "0")


def need_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (Debian package {package}: apt-get install -y {package})"
        if require_servers():
            pytest.fail(f"{message}; MONAI_SAM_REQUIRE_SERVERS is set, so this is an error")
        pytest.skip(message)
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy (dicom3tools) prints for a file; it exits 0 either way."""
    binary = need_binary("dciodvfy", "dicom3tools")
    out = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def base_checkpoint(path: Path, seed: int = 1234) -> Path:
    """A SAM2.1 hiera-t at 128 px saved in the official format (``{"model": ...}``).

    Seeded apart from the bundles' ``seed: 0`` so that its weights differ from the default
    initialisation: a path that ignored the file would not produce them (`weights_digest`).
    """
    from monai_sam.networks import build_sam2_model

    torch.manual_seed(seed)
    model = build_sam2_model("sam2.1_hiera_t", image_size=IMAGE_SIZE)
    torch.save({"model": model.state_dict()}, path)
    return path


def weights_digest(state: dict, prefix: str = "image_encoder.") -> str:
    """SHA-256 of the tensors of a state dict under ``prefix`` (names as in the official file)."""
    import hashlib

    h = hashlib.sha256()
    for name, value in sorted(state.items()):
        if name.startswith(prefix):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_digest(path: Path, prefix: str = "image_encoder.") -> str:
    """`weights_digest` of an official checkpoint file."""
    return weights_digest(torch.load(path, map_location="cpu", weights_only=True)["model"], prefix)


def tiny_bundle(root: Path, checkpoint: Path) -> Path:
    """The CT bundle's configs at 128 px with trained parts saved in models/model.pt.

    The trained parts are the random-init decoder/memory of ``checkpoint``'s model, saved the
    way training saves them (`TrainableCheckpoint`, stamped with the frozen encoder's identity,
    and the model record beside them), so that loading them exercises the real path.
    """
    from monai.bundle import ConfigParser

    configs = root / "configs"
    configs.mkdir(parents=True)
    for name in ("inference.yaml", "metadata.json", "logging.conf"):
        shutil.copy(CT_BUNDLE / "configs" / name, configs / name)
    import yaml

    train = yaml.safe_load((CT_BUNDLE / "configs" / "train.yaml").read_text())
    train["image_size"] = IMAGE_SIZE
    (configs / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False))
    parser = ConfigParser()
    parser.read_config(str(configs / "train.yaml"))  # what training builds (inference.yaml reads the record)
    parser["bundle_root"] = str(root)
    parser["checkpoint"] = str(checkpoint)
    parser["device"] = "$torch.device('cpu')"
    state = parser.get_parsed_content("trainable_checkpoint").state_dict()
    (root / "models").mkdir()
    torch.save(state, root / "models" / "model.pt")
    parser.get_parsed_content("train#model_record")(None)  # models/model_record.json, as training writes it
    return root


def set_auto_prompter(bundle: Path, expression: str | None) -> None:
    """Give the bundle's inference.yaml this ``auto_prompter`` (None: remove the key)."""
    import yaml

    path = bundle / "configs" / "inference.yaml"
    config = yaml.safe_load(path.read_text())
    config.pop("auto_prompter", None)
    if expression is not None:
        config["auto_prompter"] = expression
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def phantom_series(folder: Path, seed: int = 0, modality: str = "CT", **kwargs):
    """A small abdominal phantom written as a DICOM series; returns the phantom."""
    from monai_sam.data.phantom import make_phantom
    from monai_sam.io.dicom import write_dicom_series

    ph = make_phantom("ct", seed=seed, shape=SHAPE, spacing=SPACING)
    write_dicom_series(ph.image, ph.affine, folder, modality=modality, **kwargs)
    return ph


def key_slice(label: np.ndarray, value: int = LIVER) -> int:
    return int(np.argmax((label == value).sum(axis=(0, 1))))


def mask_prompt_file(path: Path, phantom, value: int = LIVER, name: str = "liver") -> Path:
    """A prompt file with one mask prompt: the object on its largest slice (RAS grid of the phantom).

    With random weights SAM2 reproduces a mask prompt on its key slice, which pins the geometry
    of everything downstream (DICOM-SEG frames included).
    """
    k = key_slice(phantom.label, value)
    mask = np.zeros(phantom.label.shape, np.uint8)
    mask[..., k] = phantom.label[..., k] == value
    mask_path = path.with_name(path.stem + "_mask.nii.gz")
    nib.save(nib.Nifti1Image(mask, phantom.affine), str(mask_path))
    doc = {
        "version": 1,
        "coordinates": "voxel",
        "objects": [{"id": value, "name": name, "slices": [{"mask": mask_path.name}]}],
    }
    path.write_text(json.dumps(doc))
    return path


def key_slice_iou(pred: np.ndarray, phantom, value: int = LIVER) -> float:
    """IoU of ``value`` on the prompted key slice between a RAS prediction and the phantom."""
    k = key_slice(phantom.label, value)
    ref, got = phantom.label[..., k] == value, pred[..., k] == value
    return float((ref & got).sum() / max((ref | got).sum(), 1))


ORTHANC_DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
)


def segment_args(
    input_dir: Path, prompts: Path, output: Path, bundle: Path, checkpoint: Path | None = None, *extra: str
) -> list[str]:
    """``monai-sam segment`` arguments: a local input folder through ``bundle`` to DICOM-SEG, on the CPU."""
    args = ["segment", "--input", str(input_dir), "--bundle", str(bundle)]
    if checkpoint is not None:
        args += ["--checkpoint", str(checkpoint)]
    return [*args, "--prompts", str(prompts), "--output", str(output), "--dicom-seg", "--device", "cpu", *extra]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_orthanc(root: Path, name: str = "MONAI_SAM_TEST"):
    """Start an Orthanc with the DICOMweb plugin on a free loopback port (its own config and
    storage under ``root``), yield its base URL once DICOMweb answers, stop it afterwards.

    A generator for module fixtures: skips (or fails under MONAI_SAM_REQUIRE_SERVERS) when the
    Debian packages orthanc / orthanc-dicomweb are missing.
    """
    import glob
    import time

    import requests

    binary = need_binary("Orthanc", "orthanc")
    candidates = [*ORTHANC_DICOMWEB_PLUGINS, *glob.glob("/usr/lib/*/orthanc/plugins/libOrthancDicomWeb.so")]
    plugin = next((p for p in candidates if Path(p).is_file()), None)
    if plugin is None:
        message = "the Orthanc DICOMweb plugin is missing (Debian package orthanc-dicomweb)"
        if require_servers():
            pytest.fail(message + "; MONAI_SAM_REQUIRE_SERVERS is set, so this is an error")
        pytest.skip(message)
    port = free_port()
    config = {
        "Name": name,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # loopback clients only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,  # DICOMweb only: no DICOM listener
        "DicomPort": free_port(),
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen(
        [binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                tail = (root / "orthanc.log").read_text()[-3000:]
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{tail}")
            try:
                if requests.get(f"{base}/system", timeout=2).ok and requests.get(
                    f"{base}/dicom-web/studies", timeout=2
                ).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer on {base}/system within 60 s")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
