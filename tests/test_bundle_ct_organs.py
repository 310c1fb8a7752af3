"""The CT organ bundle: valid metadata, complete workflows, and tiny real runs of each."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from monai_sam.engines.checkpoint import trained_weights

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sam2_ct_abdominal_organs"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
TRAIN = str(CONFIGS / "train.yaml")
EVALUATE = [TRAIN, str(CONFIGS / "evaluate.yaml")]
INFER = [TRAIN, str(CONFIGS / "inference.yaml")]

pytestmark = pytest.mark.slow


def tiny(root: Path, data: Path, **extra) -> dict:
    """Overrides that make the bundle run in seconds: small phantoms, 128 px, 4-slice sequences."""
    return {
        "bundle_root": str(root), "demo": True, "dataset_dir": str(data), "num_phantoms": 3,
        "phantom_shape": [48, 48, 20], "phantom_spacing": [4.3, 4.3, 8.0], "image_size": 128,
        "num_slices": 4, "epochs": 1, "batch_size": 2, "sequences_per_volume": 1, **extra,
    }


def workflow(config, workflow_type, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=config, workflow_type=workflow_type,
                        logging_file=str(CONFIGS / "logging.conf"), **overrides)
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the evaluate / inference / resume tests."""
    base = tmp_path_factory.mktemp("ct_bundle")
    wf = workflow(TRAIN, "train", **tiny(base / "bundle", base / "data"))
    wf.run()
    return base, wf


def test_metadata_is_valid_against_monai_schema():
    if not SCHEMA.exists():
        pytest.skip(f"bundle schema not found at {SCHEMA}")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("config,kind", [(TRAIN, "train"), (EVALUATE, "eval"), (INFER, "infer")])
def test_workflow_properties_are_complete(tmp_path, config, kind):
    wf = ConfigWorkflow(config_file=config, workflow_type="infer" if kind == "infer" else kind,
                        **tiny(tmp_path / "b", tmp_path / "d"))
    wf.initialize()
    assert wf.check_properties() in (None, []), wf.check_properties()


def test_training_writes_checkpoints_logs_metrics_and_cache(trained):
    base, wf = trained
    root = base / "bundle"
    assert (base / "data" / "dataset.json").exists(), "phantoms are generated when dataset_dir is absent"
    assert (root / "models" / "model.pt").exists()
    assert list((root / "models").glob("checkpoint_epoch=1.pt"))
    assert list((root / "runs").glob("events.out.tfevents.*"))
    assert (root / "eval" / "validation" / "metrics_per_case.csv").exists()
    assert list((root / "cache").rglob("*.feat")), "the frozen encoder's features are cached"
    # our checkpoint holds only trained parts, stamped with the frozen encoder's identity
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state["model_name"] == "sam2.1_hiera_t" and len(state["frozen_identity"]) == 64
    assert trained_weights(state) and not any(k.startswith("image_encoder.") for k in trained_weights(state))
    assert wf.train_handlers is not None and wf.trainer.state.epoch == 1


def test_training_draws_single_slices_and_few_organ_sequences_per_volume(trained):
    """Each epoch visits every volume sequences_per_volume times: a single slice with every organ in
    view prompted, or a sequence with a few organs prompted."""
    from monai.bundle import ConfigParser

    base, _ = trained
    parser = ConfigParser()
    parser.read_config(TRAIN)
    for k, v in tiny(base / "bundle", base / "data", sequences_per_volume=8, objects_per_sequence=2,
                     single_slice_fraction=0.5).items():
        parser[k] = v
    volumes = parser.get_parsed_content("split")[0]
    dataset = parser.get_parsed_content("train#sequences")
    assert len(dataset) == 8 * len(volumes)
    assert parser.get_parsed_content("train#dataloader").dataset is dataset
    organs = set(parser.get_parsed_content("organ_ids"))
    kinds = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        ids = [o.object_id for o in sample["prompts"]]
        label = torch.as_tensor(sample["label"])
        frames = label.shape[-1]
        kinds.add(frames)
        assert frames in (1, 4) and ids and set(ids) <= organs, (frames, ids)
        if frames == 1:  # every organ on the slice, boxes or clicks (a mask prompt would teach nothing)
            assert ids == sorted(organs & set(torch.unique(label).int().tolist())), ids
            assert all(sp.mask is None for o in sample["prompts"] for sp in o.slices)
        else:
            assert len(ids) <= 2, ids
    assert kinds == {1, 4}
    # random init (demo): memory parts at lr 1e-3 and no memory-attention dropout; SAM2's with weights
    assert parser.get_parsed_content("learning_rates")["memory_attention"] == 1e-3
    assert parser.get_parsed_content("sam2_model#memory_attention_dropout") == 0.0
    # SAM2's focal weight (20) only with a checkpoint: from random weights it collapses the decoder
    assert parser.get_parsed_content("loss").mask_loss.lambda_focal == 1.0
    parser["checkpoint"] = "sam2.1_hiera_tiny.pt"
    parser.parse()
    assert parser.get_parsed_content("loss").mask_loss.lambda_focal == 20.0
    assert parser.get_parsed_content("learning_rates")["memory_attention"] == 1e-4
    assert parser.get_parsed_content("sam2_model#memory_attention_dropout") is None


def test_resume_after_interruption_continues_from_the_saved_epoch(trained, tmp_path):
    base, _ = trained
    root = tmp_path / "bundle"
    shutil.copytree(base / "bundle" / "models", root / "models")
    # a second run asked for 3 epochs is killed in the middle of epoch 2 ...
    wf = workflow(TRAIN, "train", **tiny(root, base / "data", epochs=3))

    def crash(engine):
        if engine.state.epoch == 2:
            raise KeyboardInterrupt("simulated kill in epoch 2")

    from ignite.engine import Events

    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, crash)
    started = []
    wf.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    with pytest.raises(KeyboardInterrupt):
        wf.run()
    assert started == [2], "the run resumed after epoch 1 instead of starting over"
    # ... and the same command again continues from the last saved epoch (1): epochs 2 and 3
    wf = workflow(TRAIN, "train", **tiny(root, base / "data", epochs=3))
    started = []
    wf.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    wf.run()
    assert started == [2, 3]
    assert list((root / "models").glob("checkpoint_epoch=3.pt"))


def test_evaluate_writes_per_organ_table_and_overlays(trained):
    base, _ = trained
    wf = workflow(EVALUATE, "eval", **tiny(base / "bundle", base / "data"))
    wf.run()
    out = base / "bundle" / "eval"
    rows = (out / "metrics_per_case.csv").read_text().splitlines()
    assert rows[0].startswith("case,label,name,dice,hd95_mm,surface_dice")
    assert len(rows) - 1 == 5  # one validation case x five organs
    assert all(r.endswith(",oracle") for r in rows[1:]), "oracle prompts are marked as such"
    overlays = list((out / "overlays").glob("*.png"))
    assert overlays
    # the slices are shown with contrast: air around the body is black, not an even grey
    from PIL import Image

    rgb = np.asarray(Image.open(overlays[0]).convert("RGB")).astype(int)
    black = (rgb.max(axis=-1) < 30).mean()
    assert black > 0.05, f"overlay background has no contrast (black fraction {black:.3f})"


def test_interactive_evaluation_scores_box_and_clicks_per_organ(trained):
    import csv

    base, _ = trained
    config = [*EVALUATE, str(CONFIGS / "evaluate_interactive.yaml")]
    wf = workflow(config, "eval", **tiny(base / "bundle", base / "data"), interaction_clicks=2, stop_after_absent=2)
    wf.run()
    out = base / "bundle" / "eval" / "interaction"
    with open(out / "interaction_steps.csv") as f:
        steps = list(csv.DictReader(f))
    organs = {r["name"] for r in steps}
    assert organs and organs <= {"liver", "spleen", "kidney_right", "kidney_left", "aorta"}
    assert len(steps) == 3 * len(organs)  # the box, then 2 clicks, per organ of the validation case
    assert [r["prompt"] for r in steps[:1]] == ["box"]
    assert {r["prompt"] for r in steps[1:3]} <= {"positive click", "negative click", "none"}
    assert {r["method"] for r in steps} == {"monai-sam demo (random encoder)"}  # random encoder: a demo
    with open(out / "interaction_summary.csv") as f:
        assert len(list(csv.DictReader(f))) == len(organs)
    assert (out / "interaction_curves.png").is_file()
    # the run used the trained parts of models/model.pt, not the initial weights
    state = torch.load(base / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    trained = trained_weights(state.get("model", state))
    served = wf.parser.get_parsed_content("network").model.state_dict()
    assert trained and all(torch.equal(served[name], t) for name, t in trained.items())


def test_inference_from_labels_and_from_prompt_files(trained, tmp_path):
    base, _ = trained
    data = base / "data"
    wf = workflow(INFER, "infer", **tiny(base / "bundle", data, input_dir=str(data / "imagesTr"),
                                          label_dir=str(data / "labelsTr"),
                                          inference_output_dir=str(tmp_path / "oracle")))
    wf.run()
    outs = sorted((tmp_path / "oracle").glob("*_seg_oracle_prompts_demo.nii.gz"))
    assert len(outs) == 3
    ref = nib.load(data / "imagesTr" / "phantom_ct_000.nii.gz")
    pred = nib.load(outs[0])
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)

    # a user prompt file: one box on the liver, in voxel indices of the file as stored
    label = np.asarray(nib.load(data / "labelsTr" / "phantom_ct_000.nii.gz").dataobj)
    k = int(np.argmax((label == 1).sum(axis=(0, 1))))
    ii, jj = np.nonzero(label[:, :, k] == 1)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "phantom_ct_000.json").write_text(json.dumps({
        "version": 1, "coordinates": "voxel",
        "objects": [{"id": 1, "name": "liver", "slices": [{"box": [[int(ii.min()), int(jj.min()), k],
                                                                                [int(ii.max()), int(jj.max()), k]]}]}],
    }))
    single = tmp_path / "single"
    single.mkdir()
    os.symlink(data / "imagesTr" / "phantom_ct_000.nii.gz", single / "phantom_ct_000.nii.gz")
    wf = workflow(INFER, "infer", **tiny(base / "bundle", data, input_dir=str(single), prompt_dir=str(prompts),
                                          inference_output_dir=str(tmp_path / "user")))
    wf.run()
    assert [p.name for p in (tmp_path / "user").glob("*.nii.gz")] == ["phantom_ct_000_seg_demo.nii.gz"]


def test_trained_parts_refuse_another_encoder(trained):
    from monai_sam.engines import CheckpointMismatchError, load_trained_parts
    from monai_sam.networks import build_sam2_model

    base, _ = trained
    torch.manual_seed(123)  # another random encoder than the one trained on
    other = build_sam2_model("sam2.1_hiera_t", image_size=128)
    with pytest.raises(CheckpointMismatchError, match="sam2.1_hiera_t"):
        load_trained_parts(other, base / "bundle" / "models" / "model.pt", "sam2.1_hiera_t",
                           ["mask_decoder", "memory_attention", "memory_encoder", "object_pointers"])


def test_mlflow_tracking_records_the_run(tmp_path):
    """`--tracking mlflow` (MONAI's default MLflow settings) logs the loss and validation Dice."""
    pytest.importorskip("mlflow")
    wf = ConfigWorkflow(config_file=TRAIN, workflow_type="train", logging_file=str(CONFIGS / "logging.conf"),
                        tracking="mlflow", **tiny(tmp_path / "bundle", tmp_path / "data"))
    wf.initialize()
    wf.run()
    wf.finalize()
    from mlflow.tracking import MlflowClient
    from monai.utils import path_to_sqlite_uri

    db = tmp_path / "bundle" / "eval" / "mlruns.db"  # MONAI's default tracking store: output_dir/mlruns.db
    assert db.exists()
    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(db)))
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    metrics = {k for r in runs for k in r.data.metrics}
    assert {"train_loss", "val_mean_dice"} <= metrics, metrics
    assert any(r.data.params for r in runs), "the run's parameters were not logged"


def test_two_process_ddp_training_on_cpu(tmp_path):
    """`torchrun --nproc_per_node=2` with multi_gpu_train.yaml: gloo on CPU, rank 0 saves."""
    from monai_sam.data.phantom import write_phantom_dataset

    write_phantom_dataset("ct", 4, tmp_path / "data", shape=(48, 48, 20), spacing=(4.3, 4.3, 8.0))
    configs = f"['{TRAIN}','{CONFIGS / 'multi_gpu_train.yaml'}']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "monai.bundle", "run", "training", "--config_file", configs,
           "--bundle_root", str(tmp_path / "b"), "--dataset_dir", str(tmp_path / "data"), "--image_size", "128",
           "--num_slices", "4", "--epochs", "1", "--batch_size", "1", "--val_fraction", "0.5",
           "--sequences_per_volume", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "b" / "models" / "checkpoint_epoch=1.pt").exists()
    assert (tmp_path / "b" / "models" / "model.pt").exists()
    assert run.stdout.count("Epoch[1] Complete") + run.stderr.count("Epoch[1] Complete") >= 2  # both ranks trained
    # each rank validated its own case; the per-organ table holds both
    import csv

    with open(tmp_path / "b" / "eval" / "validation" / "metrics_per_case.csv") as f:
        cases = {row["case"] for row in csv.DictReader(f)}
    assert len(cases) == 2, cases
