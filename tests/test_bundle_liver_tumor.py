"""The liver tumour bundle: valid metadata, complete workflows, tiny real runs of each, and the
LiTS layout converter feeding it."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from scipy import ndimage

from monai_sam.data import load_volume
from monai_sam.data.converters import LITS_LABELS, LayoutError, convert_lits
from monai_sam.data.phantom import make_phantom, write_phantom_dataset
from monai_sam.engines.checkpoint import trained_weights
from monai_sam.transforms import lesion_instances

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sam2_ct_liver_tumor"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
TRAIN = str(CONFIGS / "train.yaml")
EVALUATE = [TRAIN, str(CONFIGS / "evaluate.yaml")]
INFER = [TRAIN, str(CONFIGS / "inference.yaml")]
HEAD = [TRAIN, str(CONFIGS / "train_autoprompt_head.yaml")]
SHAPE, SPACING = (48, 48, 12), (4.3, 4.3, 8.0)


def tiny(root: Path, data: Path, **extra) -> dict:
    """Overrides that make the bundle run in seconds: 3 small phantoms with 2 tumours, 128 px."""
    return {
        "bundle_root": str(root), "demo": True, "dataset_dir": str(data), "num_phantoms": 3, "phantom_tumors": 2,
        "phantom_shape": list(SHAPE), "phantom_spacing": list(SPACING), "image_size": 128,
        "num_slices": 4, "epochs": 1, "batch_size": 2, **extra,
    }


def workflow(config, workflow_type, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=config, workflow_type=workflow_type,
                        logging_file=str(CONFIGS / "logging.conf"), **overrides)
    wf.initialize()
    return wf


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _lesions(label_file: Path) -> list[int]:
    """Voxel counts of the true lesions (26-connected tumour components) of a phantom label."""
    label = np.asarray(nib.load(label_file).dataobj)
    comps, n = ndimage.label(label == 6, structure=np.ones((3, 3, 3)))
    return sorted(int(v) for v in np.bincount(comps.ravel())[1:])


def test_metadata_is_valid_against_monai_schema():
    if not SCHEMA.exists():
        pytest.skip(f"bundle schema not found at {SCHEMA}")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("config,kind", [(TRAIN, "train"), (EVALUATE, "eval"), (INFER, "infer"),
                                         (HEAD, "train")])
def test_workflow_properties_are_complete(tmp_path, config, kind):
    wf = ConfigWorkflow(config_file=config, workflow_type=kind, **tiny(tmp_path / "b", tmp_path / "d"))
    wf.initialize()
    assert wf.check_properties() in (None, []), wf.check_properties()


# ------------------------------------------------------------------------------- LiTS data


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _lits(root: Path) -> Path:
    """A LiTS download in miniature: two training batches of phantoms in LiTS classes, a test volume."""
    for case, batch in ((0, "Training Batch 1"), (1, "Training Batch 1"), (28, "Training Batch 2")):
        ph = make_phantom("ct", seed=case, shape=SHAPE, spacing=SPACING, num_tumors=2)
        lits = np.select([ph.label == 6, ph.label == 1], [2, 1], 0).astype(np.uint8)  # 1 liver, 2 tumour
        _nifti(root / batch / f"volume-{case}.nii", np.rint(ph.image).astype(np.int16), ph.affine)
        _nifti(root / batch / f"segmentation-{case}.nii", lits, ph.affine)
    _nifti(root / "Test-Data" / "test-volume-3.nii", np.zeros(SHAPE, np.int16), np.eye(4))
    (root / "Training Batch 1" / "._volume-0.nii").write_bytes(b"mac resource fork")
    return root


def test_lits_converter_writes_a_decathlon_folder(tmp_path):
    src = _lits(tmp_path / "LiTS")
    ds = json.loads(convert_lits(src, tmp_path / "out").read_text())
    assert ds["labels"] == {"0": "background", "1": "liver", "2": "liver_tumor"} and ds["numTraining"] == 3
    assert [e["image"] for e in ds["training"]] == [f"./imagesTr/lits_{i:03d}.nii" for i in (0, 1, 28)]
    assert ds["test"] == ["./imagesTs/lits_test_003.nii"]
    assert (tmp_path / "out" / "labelsTr" / "lits_028.nii").resolve() == (
        src / "Training Batch 2" / "segmentation-28.nii").resolve()
    assert LITS_LABELS == {0: "background", 1: "liver", 2: "liver_tumor"}
    # errors name the folder and what is wrong
    (src / "Training Batch 2" / "segmentation-28.nii").unlink()
    with pytest.raises(ValueError, match=r"LiTS in .*LiTS: image\(s\) without a label: volume-28.nii"):
        convert_lits(src, tmp_path / "out2")
    with pytest.raises(LayoutError, match="not a LiTS folder"):
        convert_lits(tmp_path / "out", tmp_path / "out3")
    dup = tmp_path / "dup"
    _nifti(dup / "a" / "volume-1.nii", np.zeros((2, 2, 2), np.int16), np.eye(4))
    _nifti(dup / "b" / "volume-1.nii.gz", np.zeros((2, 2, 2), np.int16), np.eye(4))
    with pytest.raises(ValueError, match="volume 1 found twice"):
        convert_lits(dup, tmp_path / "out4")


def test_bundle_reads_lits_classes_as_one_object_per_lesion(tmp_path):
    """The bundle's own validation pipeline on converted LiTS data (label_mapping {}): liver + lesions."""
    src = _lits(tmp_path / "LiTS")
    convert_lits(src, tmp_path / "lits")
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"dataset_dir": str(tmp_path / "lits"), "label_mapping": {}, "image_size": 64,
                   "bundle_root": str(tmp_path / "b")})
    datalist = parser.get_parsed_content("split")[1]
    item = parser.get_parsed_content("validate#preprocessing")(datalist[0])
    label = np.asarray(nib.load(datalist[0]["label"]).dataobj)
    _, n = ndimage.label(label == 2, structure=np.ones((3, 3, 3)))
    prompts = item["prompts"]
    assert [p.object_id for p in prompts] == [1] + [100 + k for k in range(n)] and n >= 1
    assert [p.name for p in prompts][:2] == ["liver", "liver_tumor_1"]
    assert item["image"].shape[:3] == (3, 64, 64) and tuple(item["label"].shape[1:3]) == SHAPE[:2]


# ------------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run (1 epoch, validation included) shared by the slow tests below."""
    base = tmp_path_factory.mktemp("liver_bundle")
    wf = workflow(TRAIN, "train", **tiny(base / "bundle", base / "data"))
    wf.run()
    return base, wf


def _validation_case(wf) -> tuple[str, Path]:
    """The (only) validation case of the tiny split: its name and label file."""
    (entry,) = wf.parser.get_parsed_content("split")[1]
    return Path(entry["label"]).name.split(".nii")[0], Path(entry["label"])


@pytest.mark.slow
def test_training_writes_checkpoints_and_validation_lesion_tables(trained):
    base, wf = trained
    root = base / "bundle"
    data = json.loads((base / "data" / "dataset.json").read_text())
    assert "num_tumors=2" in data["description"], "phantoms with tumours are generated on first use"
    assert (root / "models" / "model.pt").exists() and list((root / "models").glob("checkpoint_epoch=1.pt"))
    assert list((root / "cache").rglob("*.feat")), "the frozen encoder's features are cached"
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert trained_weights(state) and not any(k.startswith("image_encoder.") for k in trained_weights(state))
    val = root / "eval" / "validation"
    assert [r["name"] for r in _rows(val / "metrics_per_case.csv")] == ["liver", "liver_tumor"]
    _, val_label = _validation_case(wf)
    assert len(_rows(val / "lesions.csv")) == len(_lesions(val_label))
    # the lesion-level figures are logged beside the key metric
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_mean_dice", "lesion_sensitivity", "lesion_fp_per_case"} <= set(metrics), metrics


@pytest.mark.slow
def test_evaluate_writes_class_and_lesion_tables_apart(trained):
    base, trained_wf = trained
    name, label_file = _validation_case(trained_wf)
    wf = workflow(EVALUATE, "eval", **tiny(base / "bundle", base / "data"))
    wf.run()
    out = base / "bundle" / "eval"
    classes = _rows(out / "metrics_per_case.csv")
    assert [(r["case"], r["name"], r["prompt_source"]) for r in classes] == [
        (name, "liver", "oracle"), (name, "liver_tumor", "oracle")]
    lesions = _rows(out / "lesions.csv")
    truth = _lesions(label_file)
    assert sorted(int(r["voxels"]) for r in lesions) == truth  # every true lesion, once
    for r in lesions:
        d = float(r["diameter_mm"])
        assert r["size_bin"] == ("<10 mm" if d < 10 else "10-20 mm" if d <= 20 else ">20 mm")
        assert r["prompt_source"] == "oracle" and 0.0 <= float(r["lesion_dice"]) <= 1.0
    (case,) = _rows(out / "lesion_cases.csv")
    assert int(case["tp"]) + int(case["fn"]) == len(truth)
    summary = _rows(out / "lesion_summary.csv")
    assert [r["size_bin"] for r in summary] == ["all", "<10 mm", "10-20 mm", ">20 mm"]
    assert sum(int(r["lesions"]) for r in summary[1:]) == int(summary[0]["lesions"]) == len(truth)
    overlays = list((out / "overlays").glob("*.png"))
    assert overlays
    # the slices are shown with contrast (air black), not as an even grey
    from PIL import Image

    rgb = np.asarray(Image.open(overlays[0]).convert("RGB")).astype(int)
    assert (rgb.max(axis=-1) < 30).mean() > 0.05


@pytest.mark.slow
def test_inference_from_labels_and_from_a_prompt_file(trained, tmp_path):
    base, _ = trained
    data = base / "data"
    case = "phantom_ct_002"
    single, single_label = tmp_path / "single", tmp_path / "single_label"  # one case: a quicker run
    for folder, kind in ((single, "imagesTr"), (single_label, "labelsTr")):
        folder.mkdir()
        (folder / f"{case}.nii.gz").symlink_to(data / kind / f"{case}.nii.gz")
    oracle = tmp_path / "oracle"
    wf = workflow(INFER, "infer", **tiny(base / "bundle", data, input_dir=str(single),
                                          label_dir=str(single_label), inference_output_dir=str(oracle)))
    wf.run()
    ref = nib.load(data / "imagesTr" / f"{case}.nii.gz")
    seg = nib.load(oracle / f"{case}_seg_oracle_prompts_demo.nii.gz")
    objects = nib.load(oracle / f"{case}_objects_oracle_prompts_demo.nii.gz")
    assert seg.shape == objects.shape == ref.shape and np.allclose(seg.affine, ref.affine, atol=1e-4)
    seg_a, obj_a = np.asarray(seg.dataobj), np.asarray(objects.dataobj)
    n = len(_lesions(data / "labelsTr" / f"{case}.nii.gz"))
    assert set(np.unique(obj_a).tolist()) <= {0, 1, *range(100, 100 + n)}
    assert np.array_equal(seg_a, np.where(obj_a >= 100, 2, obj_a))  # lesion objects are the tumour class

    # a user prompt file: one box on the largest lesion, as object 100, on its largest slice
    label = np.asarray(nib.load(data / "labelsTr" / f"{case}.nii.gz").dataobj)
    comps, _ = ndimage.label(label == 6, structure=np.ones((3, 3, 3)))
    big = comps == np.bincount(comps.ravel())[1:].argmax() + 1
    k = int(np.argmax(big.sum(axis=(0, 1))))
    ii, jj = np.nonzero(big[:, :, k])
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / f"{case}.json").write_text(json.dumps({
        "version": 1, "coordinates": "voxel",
        "objects": [{"id": 100, "name": "liver_tumor_1", "slices": [{"box": [
            [int(ii.min()), int(jj.min()), k], [int(ii.max()), int(jj.max()), k]]}]}],
    }))
    user = tmp_path / "user"
    wf = workflow(INFER, "infer", **tiny(base / "bundle", data, input_dir=str(single),
                                          prompt_dir=str(prompts), inference_output_dir=str(user)))
    wf.run()
    written = sorted(p.name for p in user.glob("*.nii.gz"))
    assert written == [f"{case}_objects_demo.nii.gz", f"{case}_seg_demo.nii.gz"]
    user_seg = np.asarray(nib.load(user / f"{case}_seg_demo.nii.gz").dataobj)
    assert set(np.unique(user_seg).tolist()) <= {0, 2}


@pytest.mark.slow
def test_automatic_mode_trains_a_head_then_prompts_each_lesion_it_finds(trained):
    base, trained_wf = trained
    name, label_file = _validation_case(trained_wf)
    root = base / "bundle"
    head = workflow(HEAD, "train", **tiny(root, base / "data", autoprompt_head="linear", slices_per_volume=3))
    head.run()
    assert (root / "models" / "autoprompt_head" / "model.pt").exists()
    # the head's own validation: its prediction judged per class and lesion by lesion, apart
    head_val = root / "eval" / "autoprompt_head" / "validation"
    assert {r["prompt_source"] for r in _rows(head_val / "lesions.csv")} == {"none"}
    assert len(_rows(head_val / "lesions.csv")) == len(_lesions(label_file))

    auto_run = tiny(root, base / "data", autoprompt_head="linear", prompt_source="auto")
    wf = workflow(EVALUATE, "eval", **auto_run)
    wf.run()
    auto = root / "eval" / "auto"
    classes = _rows(auto / "metrics_per_case.csv")
    assert [(r["case"], r["prompt_source"]) for r in classes] == [(name, "auto")] * 2
    lesions = _rows(auto / "lesions.csv")
    assert len(lesions) == len(_lesions(label_file)) and {r["prompt_source"] for r in lesions} == {"auto"}
    # the prompts were the head's: the liver, then one object per component of its tumour prediction
    (item,) = wf.parser.get_parsed_content("validate#dataset")
    prompter = wf.parser.get_parsed_content("auto_prompter")
    image = load_volume(base / "data" / "imagesTr" / f"{name}.nii.gz")
    n = len(lesion_instances(prompter.predict(image), 2, SPACING)[1])
    got = [(p.object_id, p.key_slices) for p in item["prompts"]]
    assert got == [(p.object_id, p.key_slices) for p in prompter(image)]
    assert [i for i, _ in got if i >= 100] == list(range(100, 100 + n))


def test_phantom_dataset_for_the_bundle_has_the_tumours_asked_for(tmp_path):
    write_phantom_dataset("ct", 2, tmp_path / "d", shape=SHAPE, spacing=SPACING, num_tumors=2)
    for i in range(2):
        assert len(_lesions(tmp_path / "d" / "labelsTr" / f"phantom_ct_{i:03d}.nii.gz")) == 2
