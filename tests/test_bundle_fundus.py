"""The fundus optic disc / cup bundle: metadata, complete workflows, tiny real runs (SAM2 and SAM),
REFUGE converted from a fake layout, and the disc / cup scores on hand-made label maps."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from monai_sam.data.fundus import make_fundus, vertical_cup_to_disc_ratio, write_fundus_dataset
from monai_sam.engines.checkpoint import trained_weights
from monai_sam.evaluation.optic_disc_cup import format_disc_cup_table, score_disc_cup, summarize_disc_cup

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sam2_fundus_optic_disc_cup"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
TRAIN = str(CONFIGS / "train.yaml")
EVALUATE = [TRAIN, str(CONFIGS / "evaluate.yaml")]
INFER = [TRAIN, str(CONFIGS / "inference.yaml")]

#: a small SAM v1 from segment_anything's modules, as a config node (vit_b at 1024 px is too slow here)
TINY_SAM = {
    "_target_": "segment_anything.modeling.Sam",
    "image_encoder": {
        "_target_": "segment_anything.modeling.ImageEncoderViT",
        "img_size": 128,
        "patch_size": 16,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 2.0,
        "out_chans": 32,
        "qkv_bias": True,
        "use_rel_pos": True,
        "window_size": 4,
        "global_attn_indexes": [1],
        "norm_layer": "$__import__('functools').partial(torch.nn.LayerNorm, eps=1e-6)",
    },
    "prompt_encoder": {
        "_target_": "segment_anything.modeling.PromptEncoder",
        "embed_dim": 32,
        "image_embedding_size": [8, 8],
        "input_image_size": [128, 128],
        "mask_in_chans": 4,
    },
    "mask_decoder": {
        "_target_": "segment_anything.modeling.MaskDecoder",
        "num_multimask_outputs": 3,
        "transformer_dim": 32,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 32,
        "transformer": {
            "_target_": "segment_anything.modeling.TwoWayTransformer",
            "depth": 2,
            "embedding_dim": 32,
            "mlp_dim": 64,
            "num_heads": 2,
        },
    },
}


def tiny(root: Path, data: Path, **extra) -> dict:
    """Overrides that make the bundle run in seconds: 6 photographs of 128 px, model input 128 px."""
    return {
        "bundle_root": str(root),
        "demo": True,  # random weights: inference runs only when told
        "dataset_dir": str(data),
        "num_images": 6,
        "fundus_size": 128,
        "image_size": 128,
        "epochs": 1,
        "batch_size": 2,
        "val_fraction": 0.34,
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


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------- scores (fast)


def test_scores_on_hand_made_label_maps():
    """Disc 10 rows x 8 columns (rows 2-11) with a cup of 4 rows (rows 5-8); a prediction with a
    6-row cup (rows 4-9) and a disc one column narrower."""
    truth = np.zeros((16, 16), np.uint8)
    truth[2:12, 4:12] = 1
    truth[5:9, 6:10] = 2
    pred = np.zeros_like(truth)
    pred[2:12, 4:11] = 1
    pred[4:10, 6:10] = 2
    s = score_disc_cup(pred, truth, case="hand", prompt_source="oracle")
    assert s.vcdr_true == pytest.approx(4 / 10) and s.vcdr_pred == pytest.approx(6 / 10)
    assert s.vcdr_abs_error == pytest.approx(0.2)
    # disc: 80 true pixels, 70 predicted, all inside: Dice 140/150, IoU 70/80
    assert s.dice_disc == pytest.approx(140 / 150) and s.iou_disc == pytest.approx(70 / 80)
    # cup: 16 true, 24 predicted, 16 shared: Dice 32/40, IoU 16/24
    assert s.dice_cup == pytest.approx(32 / 40) and s.iou_cup == pytest.approx(16 / 24)
    assert (s.disc_pixels_true, s.disc_pixels_pred, s.cup_pixels_true, s.cup_pixels_pred) == (80, 70, 16, 24)
    # the vertical axis is the rows: transposing both maps measures the horizontal ratio instead
    st = score_disc_cup(pred.T, truth.T, vertical_axis=0)
    assert st.vcdr_true == pytest.approx(4 / 8) and st.vcdr_true == vertical_cup_to_disc_ratio(
        truth, vertical_axis=1
    )


def test_scores_never_hide_a_miss():
    truth = np.zeros((16, 16), np.uint8)
    truth[2:12, 4:12] = 1
    truth[5:9, 6:10] = 2
    missed = score_disc_cup(np.zeros_like(truth), truth, case="missed", prompt_source="oracle")
    assert missed.dice_disc == 0.0 and missed.dice_cup == 0.0 and math.isnan(missed.vcdr_abs_error)
    no_cup = truth.copy()
    no_cup[no_cup == 2] = 1
    s = score_disc_cup(no_cup, truth, case="no cup", prompt_source="oracle")
    assert s.dice_cup == 0.0 and s.vcdr_pred == 0.0 and s.vcdr_abs_error == pytest.approx(0.4)
    both_empty = score_disc_cup(np.zeros((4, 4)), np.zeros((4, 4)), case="empty")
    assert math.isnan(both_empty.dice_disc) and math.isnan(both_empty.iou_cup)
    perfect = score_disc_cup(truth, truth, case="perfect", prompt_source="oracle")
    summary = summarize_disc_cup([missed, s, perfect])
    assert len(summary) == 1 and summary[0]["cases"] == 3 and summary[0]["vcdr_failures"] == 1
    assert summary[0]["dice_disc"] == pytest.approx((0.0 + 1.0 + 1.0) / 3)
    assert summary[0]["vcdr_abs_error"] == pytest.approx((0.4 + 0.0) / 2)  # the missed disc is counted apart
    assert "oracle" in format_disc_cup_table(summary)
    with pytest.raises(ValueError, match="prediction shape"):
        score_disc_cup(np.zeros((4, 4)), np.zeros((4, 5)), case="x")
    with pytest.raises(ValueError, match="values must be 0"):
        score_disc_cup(np.full((4, 4), 3), np.zeros((4, 4)), case="x")


def test_metadata_is_valid_against_monai_schema():
    if not SCHEMA.exists():
        pytest.skip(f"bundle schema not found at {SCHEMA}")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


# ---------------------------------------------------------------------------------- workflows (slow)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny SAM2 training run shared by the evaluate / inference tests."""
    base = tmp_path_factory.mktemp("fundus_bundle")
    wf = workflow(TRAIN, "train", **tiny(base / "bundle", base / "data"))
    wf.run()
    return base, wf


@pytest.mark.slow
@pytest.mark.parametrize("config,kind", [(TRAIN, "train"), (EVALUATE, "eval"), (INFER, "infer")])
def test_workflow_properties_are_complete(tmp_path, config, kind):
    wf = workflow(config, kind, **tiny(tmp_path / "b", tmp_path / "d"))
    assert wf.check_properties() in (None, []), wf.check_properties()


@pytest.mark.slow
def test_training_writes_checkpoints_tables_overlays_and_cache(trained):
    base, wf = trained
    root = base / "bundle"
    content = json.loads((base / "data" / "dataset.json").read_text())
    assert content["numTraining"] == 6, "the synthetic photographs are generated when dataset_dir is empty"
    assert (root / "models" / "model.pt").exists() and list((root / "models").glob("checkpoint_epoch=1.pt"))
    assert list((root / "runs").glob("events.out.tfevents.*"))
    assert list((root / "cache").rglob("*.feat")), "the frozen encoder's features are cached"
    rows = _rows(root / "eval" / "validation" / "metrics_per_case.csv")
    assert len(rows) == 2 and all(r["prompt_source"] == "oracle" for r in rows)
    assert list((root / "eval" / "validation" / "overlays").glob("*.png"))
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state["model_name"] == "sam2.1_hiera_t" and state["trainable"] == ["mask_decoder"]
    assert trained_weights(state) and all(k.startswith("sam_mask_decoder.") for k in trained_weights(state))
    assert wf.trainer.state.epoch == 1 and "val_mean_dice" in wf.evaluator.state.metrics
    assert {"dice_disc", "dice_cup", "vcdr_mae"} <= set(wf.evaluator.state.metrics)


@pytest.mark.slow
def test_evaluate_writes_the_disc_cup_table(trained):
    base, _ = trained
    wf = workflow(EVALUATE, "eval", **tiny(base / "bundle", base / "data"))
    wf.run()
    out = base / "bundle" / "eval"
    rows = _rows(out / "metrics_per_case.csv")
    assert list(rows[0]) == [
        "case",
        "dice_disc",
        "iou_disc",
        "dice_cup",
        "iou_cup",
        "vcdr_true",
        "vcdr_pred",
        "vcdr_abs_error",
        "disc_pixels_true",
        "disc_pixels_pred",
        "cup_pixels_true",
        "cup_pixels_pred",
        "prompt_source",
    ]
    truth = json.loads((base / "data" / "dataset.json").read_text())["training"]
    by_case = {Path(e["image"]).stem: e["vertical_cdr"] for e in truth}
    for r in rows:
        # the reference vCDR measured on the loaded (cropped) label is the generator's: rows are vertical
        assert float(r["vcdr_true"]) == pytest.approx(by_case[r["case"]], abs=1e-3)
        for key in ("dice_disc", "dice_cup", "iou_disc", "iou_cup"):
            assert 0.0 <= float(r[key]) <= 1.0
        assert float(r["iou_disc"]) <= float(r["dice_disc"]) + 1e-9
    summary = _rows(out / "metrics_summary.csv")
    assert summary[0]["prompt_source"] == "oracle" and int(summary[0]["cases"]) == 2
    assert len(list((out / "overlays").glob("*.png"))) == 2


@pytest.mark.slow
def test_inference_from_labels_and_from_a_prompt_file(trained, tmp_path):
    base, _ = trained
    data = base / "data"
    wf = workflow(
        INFER,
        "infer",
        **tiny(
            base / "bundle",
            data,
            inference_output_dir=str(tmp_path / "oracle"),
            label_encoding="refuge",
            save_overlays=False,
        ),
    )
    wf.run()
    outs = sorted((tmp_path / "oracle").glob("*.png"))
    assert len(outs) == 6 and all(p.name.endswith("_seg_oracle_prompts_demo.png") for p in outs)
    pred = np.asarray(Image.open(outs[0]))
    assert pred.shape == (128, 128), "pasted back into the whole photograph"
    assert set(np.unique(pred).tolist()) <= {0, 128, 255} and (pred == 255).mean() > 0.5

    # a user's prompt file: a box on the disc and a click on the cup, (x, y) = (column, row)
    label = make_fundus(0, 128).label
    ii, jj = np.nonzero(label > 0)
    ci, cj = np.nonzero(label == 2)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "fundus_000.json").write_text(
        json.dumps(
            {
                "version": 1,
                "coordinates": "voxel",
                "objects": [
                    {
                        "id": 1,
                        "name": "optic_disc",
                        "slices": [
                            {"box": [[int(jj.min()), int(ii.min()), 0], [int(jj.max()), int(ii.max()), 0]]}
                        ],
                    },
                    {
                        "id": 2,
                        "name": "optic_cup",
                        "slices": [{"points": [[int(cj.mean()), int(ci.mean()), 0]]}],
                    },
                ],
            }
        )
    )
    single = tmp_path / "single"
    single.mkdir()
    os.symlink(data / "imagesTr" / "fundus_000.png", single / "fundus_000.png")
    wf = workflow(
        INFER,
        "infer",
        **tiny(
            base / "bundle",
            data,
            input_dir=str(single),
            prompt_dir=str(prompts),
            inference_output_dir=str(tmp_path / "user"),
        ),
    )
    wf.run()
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == [
        "fundus_000_overlay.png",
        "fundus_000_seg_demo.png",
    ]
    pred = np.asarray(Image.open(tmp_path / "user" / "fundus_000_seg_demo.png"))
    assert pred.shape == (128, 128) and set(np.unique(pred).tolist()) <= {0, 1, 2}


@pytest.mark.slow
def test_sam_v1_recipe_trains_through_the_bundle(tmp_path):
    """--model_family sam: SAM's mask decoder trains on the same pipeline (a tiny SAM stands in for vit_b)."""
    wf = workflow(
        TRAIN, "train", **tiny(tmp_path / "bundle", tmp_path / "data", model_family="sam", backbone=TINY_SAM)
    )
    assert wf.check_properties() in (None, [])
    wf.run()
    state = torch.load(tmp_path / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state["model_name"] == "sam_vit_b"
    assert trained_weights(state) and all(k.startswith("mask_decoder.") for k in trained_weights(state))
    assert len(_rows(tmp_path / "bundle" / "eval" / "validation" / "metrics_per_case.csv")) == 2


@pytest.mark.slow
def test_bundle_trains_on_refuge_converted_from_a_fake_layout(tmp_path):
    """REFUGE's Hugging Face mirror layout (masks of several raters) -> convert_refuge -> the bundle."""
    from monai_sam.data.converters import convert_refuge

    src = tmp_path / "REFUGE" / "Training-400"
    for n in range(4):
        case = f"case{n}"
        f = make_fundus(10 + n, 128)
        folder = src / case
        folder.mkdir(parents=True)
        Image.fromarray(f.image).save(folder / f"{case}.jpg", quality=95)
        for rater in (1, 2, 3):
            Image.fromarray(((f.label == 2) * 255).astype(np.uint8)).save(
                folder / f"{case}_seg_cup_{rater}.png"
            )
            Image.fromarray(((f.label > 0) * 255).astype(np.uint8)).save(
                folder / f"{case}_seg_disc_{rater}.png"
            )
    dataset_json = convert_refuge(tmp_path / "REFUGE", tmp_path / "refuge")
    wf = workflow(TRAIN, "train", **tiny(tmp_path / "bundle", tmp_path / "refuge", val_fraction=0.25))
    assert Path(wf.parser.get_parsed_content("dataset_json")) == dataset_json, (
        "an existing dataset is used as is"
    )
    wf.run()
    rows = _rows(tmp_path / "bundle" / "eval" / "validation" / "metrics_per_case.csv")
    assert len(rows) == 1
    n = int(rows[0]["case"].removeprefix("case"))
    assert float(rows[0]["vcdr_true"]) == pytest.approx(make_fundus(10 + n, 128).cup_to_disc_ratio, abs=1e-6)


def test_synthetic_dataset_loads_with_rows_vertical(tmp_path):
    """The bundle's loading gives (rows, columns) as in the picture: the vCDR of the generator."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    write_fundus_dataset(2, tmp_path / "d", size=96)
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(tmp_path / "b"), "dataset_dir": str(tmp_path / "d"), "image_size": 64})
    load = Compose(parser.get_parsed_content("load_transforms"))  # a flat list: what CacheDataset caches
    entry = json.loads((tmp_path / "d" / "dataset.json").read_text())["training"][1]
    out = load({"image": str(tmp_path / "d" / entry["image"]), "label": str(tmp_path / "d" / entry["label"])})
    assert out["image"].shape == (3, 64, 64) and out["label"].ndim == 3
    assert vertical_cup_to_disc_ratio(out["label"], vertical_axis=0) == pytest.approx(
        entry["vertical_cdr"], abs=1e-3
    )
    r0, c0, r1, c1 = out["roi"]
    assert out["label"].shape[1:] == (r1 - r0, c1 - c0) and out["roi_source_shape"] == [96, 96]


def test_existing_folder_without_dataset_json_is_not_filled_with_synthetic_data(tmp_path):
    from monai.bundle import ConfigParser

    data = tmp_path / "refuge_raw"
    data.mkdir()
    (data / "g0001.jpg").write_bytes(b"not converted yet")
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(tmp_path / "b"), "dataset_dir": str(data)})
    with pytest.raises(RuntimeError) as err:  # MONAI's config wraps the cause, which names the file
        parser.get_parsed_content("split")
    assert isinstance(err.value.__cause__, FileNotFoundError)
    assert f"dataset json not found: {data / 'dataset.json'}" in str(err.value.__cause__)
    assert sorted(p.name for p in data.iterdir()) == ["g0001.jpg"]


class _HandMadeLogits(torch.nn.Module):
    """A network whose logits are given: the evaluator's post-processing is what is tested."""

    encoder_batch_size = 1

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode(self, frames):
        return {"x": frames}

    def predict(self, frames, prompts, original_size, features=None):
        assert [p.object_id for p in prompts] == [1, 2] and tuple(original_size) == tuple(
            self.logits.shape[-2:]
        )
        return self.logits


def test_evaluator_keeps_the_cup_inside_the_disc_and_one_piece_each():
    from monai.data import MetaTensor

    from monai_sam.engines.evaluator import PRED_LABEL
    from monai_sam.engines.image_evaluator import PromptedImageEvaluator
    from monai_sam.prompts import ObjectPrompts, SlicePrompt

    h = w = 24
    disc = torch.full((h, w), -5.0)
    disc[4:16, 4:16] = 5.0  # the disc
    disc[20:22, 20:22] = 5.0  # a stray island
    cup = torch.full((h, w), -5.0)
    cup[8:12, 8:12] = 5.0  # the cup
    cup[0:4, 9:11] = 5.0  # leaking above the disc: outside it, dropped
    label = torch.zeros(1, h, w, dtype=torch.uint8)
    label[0, 4:16, 4:16] = 1
    label[0, 8:12, 8:12] = 2
    item = {
        "image": MetaTensor(torch.zeros(3, 32, 32)),
        "label": label,
        "prompts": [
            ObjectPrompts(2, slices=[SlicePrompt(0, box=[8, 8, 11, 11])]),
            ObjectPrompts(1, slices=[SlicePrompt(0, box=[4, 4, 15, 15])]),
        ],
    }
    ev = PromptedImageEvaluator(
        "cpu", [[item]], _HandMadeLogits(torch.stack([disc, cup])), {1: [1, 2], 2: [2]}
    )
    ev.run()
    pred = ev.state.output[PRED_LABEL][0]
    assert torch.equal(pred, label[0]), "island removed, leak dropped, cup painted over the disc"
    assert ev.state.output["pred"].shape == (1, 2, h, w) and torch.equal(
        ev.state.output["pred"], ev.state.output["label"]
    )
    raw = PromptedImageEvaluator(
        "cpu",
        [[item]],
        _HandMadeLogits(torch.stack([disc, cup])),
        {1: [1, 2], 2: [2]},
        clip_nested=False,
        largest_component=False,
    )
    raw.run()
    pred = raw.state.output[PRED_LABEL][0]
    assert int((pred == 2).sum()) == 16 + 8 and int((pred == 1).sum()) == 144 - 16 + 4
    # leak and island stretch both vertical extents: 12 / 22 instead of the reference 4 / 12
    assert vertical_cup_to_disc_ratio(pred) == pytest.approx(12 / 22)
    assert vertical_cup_to_disc_ratio(label) == pytest.approx(4 / 12)
