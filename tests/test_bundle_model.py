"""One model path: a bundle trained over an official-format checkpoint serves every door alike.

The checkpoint is a SAM2.1 hiera-t written in the official format (``{"model": state_dict}``)
from a model seeded apart from the bundles' default initialisation, so each door is checked to
carry *those* weights. Training writes models/model_record.json; with it ``monai.bundle run
inference`` and ``monai-sam segment --bundle`` need no image-size option, give the same maps
voxel for voxel (the liver bundle's lesion merge included), and refuse another encoder naming
the setting that differs.
"""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_bundle_autosam_cardiac as cardiac
import test_bundle_ct_organs as organs
import test_bundle_liver_tumor as liver
import torch
from helpers_dicom_pipeline import base_checkpoint, checkpoint_digest, weights_digest
from monai.bundle import ConfigWorkflow

from monai_sam.bundle import BundleError, load_bundle_model
from monai_sam.cli import main as cli_main
from monai_sam.engines import read_model_record

pytestmark = pytest.mark.slow

BUNDLES = {
    "sam2_ct_abdominal_organs": (organs, ["seg"]),
    "sam2_ct_liver_tumor": (liver, ["seg", "objects"]),
    "autosam_mri_cardiac": (cardiac, ["seg_auto"]),  # prompt-free: segment --auto
}
PREPROCESSING = {"autosam_mri_cardiac": "mr_percentiles"}


def _models_dir(bundle: Path, overrides: dict) -> Path:
    """The bundle's ckpt_dir (the cardiac bundle keeps one per head and labeled budget)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.yaml"))
    parser.update({k: v for k, v in overrides.items() if k != "bundle_root"})
    parser["bundle_root"] = str(bundle)
    return Path(parser.get_parsed_content("ckpt_dir"))


def _encoder_state(network) -> dict:
    """The frozen encoder's tensors under the official file's names (``image_encoder.*``)."""
    return network.model.state_dict() if hasattr(network, "model") else network.state_dict()


def _workflow(module, configs, kind, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=configs, workflow_type=kind,
                        logging_file=str(module.CONFIGS / "logging.conf"), **overrides)
    wf.initialize()
    return wf


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def trained(request, tmp_path_factory):
    """A tiny bundle trained over the official-format checkpoint; the overrides used."""
    name = request.param
    module, outputs = BUNDLES[name]
    base = tmp_path_factory.mktemp(name)
    ckpt = base_checkpoint(base / "sam2.1_hiera_tiny.pt")
    overrides = module.tiny(base / "bundle", base / "data", checkpoint=str(ckpt), demo=False)
    _workflow(module, module.TRAIN, "train", **overrides).run()
    shutil.copytree(module.CONFIGS, base / "bundle" / "configs")  # a bundle folder: configs/ + models/
    return name, module, outputs, base, ckpt, overrides


def _liver_prompt_file(label_path: Path, out: Path) -> None:
    """The liver and each lesion boxed on its largest slice (world mm), as a reader would prompt."""
    from monai_sam.data.loading import load_volume
    from monai_sam.io.prompt_file import write_prompt_file
    from monai_sam.transforms import LesionInstancesd, LesionPromptsd

    label = load_volume(label_path)
    values = np.rint(label[0].numpy()).astype(np.int64)
    classes = np.where(values == 6, 2, np.where(values == 1, 1, 0))  # the bundle's label_mapping
    d = LesionInstancesd(keys="label", lesion_label=2, fill_label=1)({"label": torch.as_tensor(classes)[None]})
    objects = LesionPromptsd(label_key="label", label_names={1: "liver"}, lesion_name="liver_tumor")(d)["prompts"]
    assert any(o.object_id >= 100 for o in objects), "the phantom has lesions"
    write_prompt_file(out, objects, label, coordinates="world")


def test_training_records_the_frozen_encoder(trained):
    name, _, _, base, ckpt, overrides = trained
    record = read_model_record(_models_dir(base / "bundle", overrides))
    assert record is not None, "training writes models/model_record.json"
    assert (record.model_size, record.image_size) == ("sam2.1_hiera_t", overrides["image_size"])
    assert record.checkpoint == ckpt.name
    import hashlib

    assert record.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record.label_names and all(isinstance(k, int) for k in record.label_names)
    assert PREPROCESSING.get(name, "window") in record.preprocessing


def test_the_official_weights_reach_the_network(trained):
    name, _, _, base, ckpt, _ = trained
    model = load_bundle_model(base / "bundle", checkpoint=ckpt, device="cpu", need_auto=name in PREPROCESSING)
    got = weights_digest(_encoder_state(model.network))
    assert got == checkpoint_digest(ckpt)
    default = base_checkpoint(base / "default_init.pt", seed=0)  # what no checkpoint would give
    assert got != checkpoint_digest(default)
    assert model.parameters["image_size"] == "128" and not model.demo


def test_bundle_inference_and_segment_give_the_same_files(trained, tmp_path):
    name, module, outputs, base, ckpt, overrides = trained
    data = base / "data"
    cases = sorted((data / "imagesTr").glob("*.nii.gz"))[:1]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in cases:
        shutil.copy(case, inputs / case.name)
    prompts = data / "prompts"  # the phantoms' organ boxes
    if name == "sam2_ct_liver_tumor":
        prompts = tmp_path / "prompts"
        for case in cases:
            _liver_prompt_file(data / "labelsTr" / case.name, prompts / case.name.replace(".nii.gz", ".json"))
    run = {k: v for k, v in overrides.items() if k != "image_size"}  # the record gives it
    if name not in PREPROCESSING:
        run["prompt_dir"] = str(prompts)
    # inference.yaml on its own, as model-zoo bundles run it
    wf = _workflow(module, str(module.CONFIGS / "inference.yaml"), "infer",
                   **run, input_dir=str(inputs), inference_output_dir=str(tmp_path / "bundle_out"))
    wf.run()
    assert weights_digest(_encoder_state(wf.parser.get_parsed_content("network"))) == checkpoint_digest(ckpt)
    how = ["--auto"] if name in PREPROCESSING else ["--prompts", str(prompts)]
    rc = cli_main(["segment", "--input", str(inputs), "--bundle", str(base / "bundle"), "--checkpoint", str(ckpt),
                   *how, "--output", str(tmp_path / "cli_out"), "--device", "cpu"])
    assert rc == 0
    for case in cases:
        stem = case.name.removesuffix(".nii.gz")
        for out in outputs:
            a = nib.load(tmp_path / "bundle_out" / f"{stem}_{out}.nii.gz")
            b = nib.load(tmp_path / "cli_out" / f"{stem}_{out}.nii.gz")
            assert np.allclose(a.affine, b.affine, atol=1e-5)
            va, vb = np.asarray(a.dataobj), np.asarray(b.dataobj)
            assert va.shape == vb.shape and np.array_equal(va, vb), f"{name} {stem}_{out}: the doors differ"
            assert va.any(), f"{name} {stem}_{out}: empty"
    if name == "sam2_ct_liver_tumor":  # the lesion merge ran: classes 1/2 only, objects keep lesion ids
        seg = np.asarray(nib.load(tmp_path / "cli_out" / f"{stem}_seg.nii.gz").dataobj)
        objects = np.asarray(nib.load(tmp_path / "cli_out" / f"{stem}_objects.nii.gz").dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2} and (objects >= 100).any() == (seg == 2).any()
    record = json.loads((tmp_path / "cli_out" / f"{stem}_{outputs[0]}.json").read_text())
    assert [f"{stem}_{o}.nii.gz" for o in outputs] == [o for o in record["outputs"] if o.endswith(".nii.gz")]


def test_evaluation_runs_on_the_official_weights(trained, tmp_path):
    """evaluate.yaml over train.yaml: the record's encoder, the file's weights, per-class tables."""
    _, module, _, base, ckpt, overrides = trained
    run = {k: v for k, v in overrides.items() if k != "image_size"}
    wf = _workflow(module, module.EVALUATE, "eval", **run, output_dir=str(tmp_path / "eval"))
    wf.run()
    assert weights_digest(_encoder_state(wf.parser.get_parsed_content("network"))) == checkpoint_digest(ckpt)
    assert list((tmp_path / "eval").rglob("metrics_summary.csv"))


def test_another_encoder_is_refused_naming_the_setting(trained, tmp_path):
    name, module, _, base, ckpt, overrides = trained
    auto = name in PREPROCESSING
    other = base_checkpoint(tmp_path / "sam2.1_hiera_tiny.pt", seed=99)  # same name, other weights
    with pytest.raises(BundleError, match="weights: .*SHA-256"):
        load_bundle_model(base / "bundle", checkpoint=other, device="cpu", need_auto=auto)
    with pytest.raises(BundleError, match="weights: no checkpoint given"):
        load_bundle_model(base / "bundle", device="cpu", demo=True, need_auto=auto)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps what a config expression raises
        _workflow(module, [module.TRAIN, str(module.CONFIGS / "inference.yaml")], "infer",
                  **{**overrides, "image_size": 64}).run()
    assert "image size 64 px (trained at 128 px)" in str(info.value.__cause__)
    assert torch.load(_models_dir(base / "bundle", overrides) / "model.pt", weights_only=True)  # left intact


def test_monai_checkpoint_loader_loads_model_pt_into_network_def(trained):
    """model.pt names tensors as network_def does: MONAI's CheckpointLoader(strict=False) loads them."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointLoader

    from monai_sam.engines.checkpoint import trained_weights

    _, module, _, base, ckpt, overrides = trained
    parser = ConfigParser()
    parser.read_config(module.TRAIN)
    parser.update({**overrides, "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network_def")
    model_pt = _models_dir(base / "bundle", overrides) / "model.pt"
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    state = state.get("model", state)  # ignite saves a lone object unwrapped
    key = next(k for k in state if "mask_decoder" in k or k.startswith("head."))  # as network_def names it
    before = network.state_dict()[key].clone()
    assert not torch.equal(before, state[key]), "the fresh network starts elsewhere"
    assert trained_weights(state), "trained parts are in the file"
    CheckpointLoader(load_path=str(model_pt), load_dict={"model": network},
                     strict=False, map_location="cpu")(Engine(lambda engine, batch: None))
    assert torch.equal(network.state_dict()[key], state[key])


def test_a_bare_checkpoint_reaches_the_network_of_segment(tmp_path):
    """``monai-sam segment --checkpoint`` without a bundle: the same kind of model, the file's weights."""
    from monai_sam.bundle import load_checkpoint_model

    ckpt = base_checkpoint(tmp_path / "sam2.1_hiera_tiny.pt")
    model = load_checkpoint_model(ckpt, "sam2.1_hiera_t", image_size=128, window="abdomen", device="cpu")
    assert weights_digest(model.network.model.state_dict()) == checkpoint_digest(ckpt)
    assert weights_digest(model.network.model.state_dict(), "sam_mask_decoder.") == checkpoint_digest(
        ckpt, "sam_mask_decoder."
    )
    assert not model.demo and model.outputs == {"pred": "seg"} and not model.postprocessing_steps


def test_bundles_that_are_not_promptable_volume_networks_are_refused_clearly(tmp_path, caplog):
    """The 2D photograph bundle is not a volume model; the prompt-free one takes no prompt file."""
    import logging

    bundle = tmp_path / "sam2_fundus_optic_disc_cup"
    shutil.copytree(organs.REPO / "bundles" / bundle.name / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"")  # past the "no trained weights" check
    with pytest.raises(BundleError, match="not a promptable SAM2 volume network.*run inference"):
        load_bundle_model(bundle, device="cpu", demo=True)
    cardiac_bundle = organs.REPO / "bundles" / "autosam_mri_cardiac"
    with caplog.at_level(logging.ERROR, logger="monai_sam"):
        rc = cli_main(["segment", "--input", str(tmp_path), "--bundle", str(cardiac_bundle), "--prompts",
                       str(tmp_path), "--output", str(tmp_path / "out"), "--demo"])
    assert rc == 2 and "prompt-free: use --auto" in caplog.text


def test_every_door_runs_the_decoder_output_training_taught(trained):
    """The record says the trained model runs without SAM2's multimask fallback; each door obeys."""
    name, module, _, base, ckpt, overrides = trained
    record = read_model_record(_models_dir(base / "bundle", overrides))
    if name == "autosam_mri_cardiac":  # a prompt-free head: no SAM2 prompt decoding to record
        assert "multimask_fallback" not in record.inference
        return
    assert record.inference == {"multimask_fallback": False}
    assert load_bundle_model(base / "bundle", checkpoint=ckpt, device="cpu").network.multimask_fallback is False
    run = {k: v for k, v in overrides.items() if k != "image_size"}
    for configs, kind in ((str(module.CONFIGS / "inference.yaml"), "infer"), (module.EVALUATE, "eval")):
        wf = _workflow(module, configs, kind, **run)
        assert wf.parser.get_parsed_content("network").multimask_fallback is False, kind
    # a record written before the setting existed keeps SAM2's behaviour (what it was validated with)
    path = _models_dir(base / "bundle", overrides) / "model_record.json"
    old = json.loads(path.read_text())
    old.pop("inference")
    path.write_text(json.dumps(old))
    try:
        assert load_bundle_model(base / "bundle", checkpoint=ckpt, device="cpu").network.multimask_fallback is True
    finally:
        record.write(path)
