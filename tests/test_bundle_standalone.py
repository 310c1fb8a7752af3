"""Each bundle's inference.yaml works on its own (model-zoo style), from the repository root or
from the bundle's own folder, and its copies of train.yaml's keys stay equal to them."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "inference.yaml").is_file())
# keys inference.yaml sets on purpose to other values than train.yaml: the trained model's
# settings read from models/model_record.json, and the workflow itself
OWN_KEYS = {"model_size", "image_size", "window", "mr_percentiles", "roi_scale", "initialize", "run", "dataset",
            "evaluator", "inferer", "trained_model", "model_record", "multimask_fallback"}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_inference_yaml_alone_has_every_workflow_property(bundle: Path, tmp_path: Path):
    wf = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.yaml"), workflow_type="infer",
                        bundle_root=str(tmp_path / "b"), dataset_dir=str(tmp_path / "no_data"), demo=True)
    wf.initialize()
    assert wf.check_properties() in (None, []), wf.check_properties()
    # model-zoo ids, as MONAI Label's BundleInferTask reads them (the 2D bundle writes its PNGs
    # from a handler: no post-processing transforms)
    keys = ("preprocessing",) if bundle.name == "sam2_fundus_optic_disc_cup" else ("preprocessing", "postprocessing")
    for key in keys:
        assert wf.parser.get(key) is not None, f"{bundle.name}: no top-level '{key}'"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_inference_keeps_train_yaml_keys_equal(bundle: Path):
    train = yaml.safe_load((bundle / "configs" / "train.yaml").read_text())
    infer = yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())
    shared = sorted(set(train) & set(infer) - OWN_KEYS)
    assert {"network_def", "trainable_checkpoint", "bundle_root"} <= set(shared)
    for key in shared:
        assert infer[key] == train[key], f"{bundle.name}: inference.yaml's '{key}' differs from train.yaml's"


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_bundle_runs_from_its_own_folder(bundle: Path, tmp_path: Path):
    """``cd bundles/<name>; python -m monai.bundle run ... --bundle_root .``: paths resolve there."""
    folder = tmp_path / bundle.name
    (folder / "configs").mkdir(parents=True)
    for f in (bundle / "configs").iterdir():
        (folder / "configs" / f.name).write_bytes(f.read_bytes())
    code = (
        "from monai.bundle import ConfigWorkflow\n"
        "for config, kind in (('configs/inference.yaml', 'infer'), ('configs/train.yaml', 'train')):\n"
        "    wf = ConfigWorkflow(config_file=config, workflow_type=kind, bundle_root='.', demo=True)\n"
        "    wf.initialize()\n"
        "    assert wf.check_properties() in (None, []), (config, wf.check_properties())\n"
        "    import os\n"
        "    assert os.path.abspath(wf.parser.get_parsed_content('ckpt_dir')).startswith(os.getcwd())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
