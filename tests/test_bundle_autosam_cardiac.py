"""The AutoSAM cardiac MR bundle: valid metadata, complete workflows, few-shot budgets, tiny real runs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from monai_sam.engines.checkpoint import trained_weights

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "autosam_mri_cardiac"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
TRAIN = str(CONFIGS / "train.yaml")
EVALUATE = [TRAIN, str(CONFIGS / "evaluate.yaml")]
INFER = [TRAIN, str(CONFIGS / "inference.yaml")]


def tiny(root: Path, data: Path, **extra) -> dict:
    """Overrides that make the bundle run in seconds: 4 small phantoms, 128 px, 2 slices per volume."""
    return {
        "bundle_root": str(root),
        "demo": True,  # random weights: inference runs only when told
        "dataset_dir": str(data),
        "num_phantoms": 4,
        "phantom_shape": [48, 48, 8],
        "phantom_spacing": [6.0, 6.0, 8.0],
        "image_size": 128,
        "epochs": 1,
        "slices_per_volume": 2,
        "batch_size": 2,
        "val_interval": 1,
        **extra,
    }


def workflow(config, workflow_type, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=config,
        workflow_type=workflow_type,
        logging_file=str(CONFIGS / "logging.conf"),
        **overrides,
    )
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from monai_sam.data.phantom import write_phantom_dataset

    folder = tmp_path_factory.mktemp("cardiac") / "data"
    write_phantom_dataset("cardiac-mr", 4, folder, shape=(48, 48, 8), spacing=(6.0, 6.0, 8.0))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One tiny training run (AutoSAM head, all labeled volumes) shared by the evaluate / inference tests."""
    root = tmp_path_factory.mktemp("cardiac_bundle") / "bundle"
    wf = workflow(TRAIN, "train", **tiny(root, data))
    wf.run()
    return root, wf


def test_metadata_is_valid_against_monai_schema():
    if not SCHEMA.exists():
        pytest.skip(f"bundle schema not found at {SCHEMA}")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("config,kind", [(TRAIN, "train"), (EVALUATE, "eval"), (INFER, "infer")])
def test_workflow_properties_are_complete(tmp_path, data, config, kind):
    wf = workflow(config, kind, **tiny(tmp_path / "b", data))
    assert wf.check_properties() in (None, []), wf.check_properties()


def test_phantoms_are_generated_when_the_dataset_is_absent(tmp_path):
    wf = workflow(
        TRAIN,
        "train",
        **tiny(tmp_path / "b", tmp_path / "new_data", num_phantoms=2, phantom_shape=[32, 32, 4]),
    )
    assert wf.parser.get_parsed_content("dataset_json") == tmp_path / "new_data" / "dataset.json"
    assert (tmp_path / "new_data" / "dataset.json").exists()
    assert len(list((tmp_path / "new_data" / "labelsTr").glob("*.nii.gz"))) == 2
    assert wf.parser.get_parsed_content("label_names") == {
        0: "background",
        1: "right_ventricle",
        2: "myocardium",
        3: "left_ventricle",
    }


@pytest.mark.parametrize(
    "head,cls", [("autosam", "AutoSamHead"), ("conv", "ConvHead"), ("linear", "LinearHead")]
)
def test_head_and_few_shot_budget_options(tmp_path, data, head, cls):
    wf = workflow(TRAIN, "train", **tiny(tmp_path / "b", data, head=head, num_labeled_volumes=1))
    net = wf.parser.get_parsed_content("network_def")
    assert type(net.head).__name__ == cls and net.num_classes == 4
    assert len(wf.parser.get_parsed_content("train_datalist")) == 1, (
        "num_labeled_volumes=1: one labeled volume"
    )
    assert wf.parser.get_parsed_content("ckpt_dir").endswith(f"models/{head}_labeled_1")
    # every trainable parameter is the head's; the frozen encoder is in no optimizer group
    groups = wf.parser.get_parsed_content("train#optimizer").param_groups
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in net.head.parameters()}


def test_a_budget_larger_than_the_training_split_is_refused(tmp_path, data):
    wf = ConfigWorkflow(
        config_file=TRAIN, workflow_type="train", **tiny(tmp_path / "b", data, num_labeled_volumes=4)
    )
    wf.initialize()
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the config expression's error
        wf.parser.get_parsed_content("train_datalist")
    assert "num_labeled_volumes=4 but the training split holds only 3" in str(err.value.__cause__)


@pytest.mark.slow
def test_training_writes_head_checkpoints_metrics_and_cache(trained):
    root, wf = trained
    models = root / "models" / "autosam_labeled_all"
    assert (models / "model.pt").exists() and (models / "checkpoint_epoch=1.pt").exists()
    assert list((root / "runs").glob("events.out.tfevents.*"))
    assert list((root / "cache").rglob("*.feat")), "the frozen encoder's features are cached"
    rows = (root / "eval" / "validation" / "metrics_per_case.csv").read_text().splitlines()
    assert len(rows) - 1 == 3 and all(r.endswith(",none") for r in rows[1:]), "three classes, no prompt"
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state["model_name"] == "sam2.1_hiera_t" and state["trainable"] == ["head"]
    assert trained_weights(state) and all(k.startswith("head.") for k in trained_weights(state))
    assert wf.trainer.state.epoch == 1


@pytest.mark.slow
def test_evaluate_writes_per_class_table_and_overlays(trained, data):
    root, _ = trained
    wf = workflow(EVALUATE, "eval", **tiny(root, data))
    wf.run()
    out = root / "eval"
    rows = (out / "metrics_per_case.csv").read_text().splitlines()
    assert rows[0].startswith("case,label,name,dice,hd95_mm,surface_dice")
    assert [r.split(",")[2] for r in rows[1:]] == ["right_ventricle", "myocardium", "left_ventricle"]
    assert list((out / "overlays").glob("*.png"))


@pytest.mark.slow
def test_inference_writes_automatic_labels_in_the_input_geometry(trained, data, tmp_path):
    root, _ = trained
    wf = workflow(
        INFER,
        "infer",
        **tiny(root, data, input_dir=str(data / "imagesTr"), inference_output_dir=str(tmp_path / "pred")),
    )
    wf.run()
    outs = sorted((tmp_path / "pred").glob("*_seg_auto_demo.nii.gz"))
    assert len(outs) == 4
    ref = nib.load(data / "imagesTr" / "phantom_cardiac_mr_000.nii.gz")
    pred = nib.load(outs[0])
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_two_process_ddp_training_on_cpu(tmp_path, data):
    """`torchrun --nproc_per_node=2` with multi_gpu_train.yaml: gloo on CPU, rank 0 saves the head."""
    import os
    import subprocess
    import sys

    configs = f"['{TRAIN}','{CONFIGS / 'multi_gpu_train.yaml'}']"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29547",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        "--bundle_root",
        str(tmp_path / "b"),
        "--dataset_dir",
        str(data),
        "--image_size",
        "128",
        "--epochs",
        "1",
        "--slices_per_volume",
        "2",
        "--batch_size",
        "2",
        "--val_fraction",
        "0.5",
        "--val_interval",
        "1",
    ]
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    models = tmp_path / "b" / "models" / "autosam_labeled_all"
    assert (models / "checkpoint_epoch=1.pt").exists() and (models / "model.pt").exists()
    assert (
        run.stdout.count("Epoch[1] Complete") + run.stderr.count("Epoch[1] Complete") >= 2
    )  # both ranks trained
