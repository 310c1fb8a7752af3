"""One object per lesion: lesion instances, per-lesion prompts, the class maps and lesion tables
the tumour bundle's evaluation writes."""

import csv
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from scipy import ndimage

from monai_sam.data.phantom import make_phantom
from monai_sam.engines.evaluator import PRED_LABEL
from monai_sam.engines.lesion_handlers import (
    OBJECT_LABEL,
    PROMPT_SOURCE,
    LesionMetricsWriter,
    LesionVolumeEvaluator,
)
from monai_sam.transforms import (
    LesionInstancesd,
    LesionPromptsd,
    MergeLesionsd,
    RandLesionPromptsd,
    lesion_instances,
    merge_lesions,
)

LIVER, TUMOR = 1, 2


def _liver_with_tumours(shape=(40, 30, 12)):
    """A liver block holding three separate tumours of different sizes, plus a corner speck."""
    lab = np.zeros(shape, np.uint8)
    lab[2:38, 2:28, 1:11] = LIVER
    lab[4:10, 4:10, 2:6] = TUMOR  # 6 x 6 x 4
    lab[20:23, 5:8, 7:9] = TUMOR  # 3 x 3 x 2
    lab[28:36, 15:26, 3:10] = TUMOR  # 8 x 11 x 7
    lab[14, 20, 5] = TUMOR  # one voxel: a speck
    return lab


def test_lesion_instances_number_components_and_keep_the_organ():
    lab = _liver_with_tumours()
    objects, lesions = lesion_instances(lab, TUMOR, spacing=(0.8, 0.8, 2.5))
    assert sorted(np.unique(objects).tolist()) == [0, 1, 100, 101, 102, 103]
    assert (objects == LIVER).sum() == (lab == LIVER).sum()  # the organ is untouched
    # every lesion id is exactly one tumour component, in raster order
    comps, n = ndimage.label(lab == TUMOR, structure=np.ones((3, 3, 3)))
    assert n == 4
    for k in range(1, n + 1):
        ids = np.unique(objects[comps == k])
        assert ids.tolist() == [99 + k]
    first = next(les for les in lesions if les["object_id"] == 100)
    assert first["voxels"] == 144 and first["volume_mm3"] == pytest.approx(144 * 0.8 * 0.8 * 2.5)
    assert first["diameter_mm"] == pytest.approx(math.hypot(6 * 0.8, 6 * 0.8))
    assert first["size_bin"] == "<10 mm" and 2 <= first["axial_slice"] <= 5
    # back to classes: the round trip is exact
    assert np.array_equal(merge_lesions(objects, TUMOR), lab)


def test_specks_below_the_minimum_volume_become_the_fill_label():
    lab = _liver_with_tumours()
    objects, lesions = lesion_instances(lab, TUMOR, spacing=(1, 1, 1), min_volume_mm3=2.0, fill_label=LIVER)
    assert len(lesions) == 3 and objects[14, 20, 5] == LIVER
    assert not (objects == TUMOR).any()


def test_label_values_that_collide_with_lesion_ids_are_refused():
    lab = _liver_with_tumours()
    lab[0, 0, 0] = 120
    with pytest.raises(ValueError, match=r"case_7.nii.gz.*\[120\].*collide"):
        lesion_instances(lab, TUMOR, where="case_7.nii.gz")
    with pytest.raises(ValueError, match="first_id"):
        LesionInstancesd(keys="label", lesion_label=2, first_id=2)


def test_lesion_instances_transform_keeps_metadata_and_uses_the_affine_spacing():
    lab = _liver_with_tumours()
    affine = torch.diag(torch.tensor([0.8, 0.8, 5.0, 1.0], dtype=torch.float64))
    meta = MetaTensor(torch.as_tensor(lab)[None], affine=affine, meta={"filename_or_obj": "/x/case_3.nii.gz"})
    # the 3 x 3 x 2 tumour is 11.5 mm3 at this spacing, the speck 3.2 mm3: min 4 mm3 drops the speck only
    out = LesionInstancesd(keys="label", lesion_label=TUMOR, min_volume_mm3=4.0)({"label": meta})
    obj = out["label"]
    assert isinstance(obj, MetaTensor) and obj.shape == (1, 40, 30, 12)
    assert obj.meta["filename_or_obj"] == "/x/case_3.nii.gz" and torch.equal(obj.affine, affine)
    assert [les["object_id"] for les in out["lesions"]] == [100, 101, 102]
    assert out["lesions"][0]["volume_mm3"] == pytest.approx(144 * 0.8 * 0.8 * 5.0)
    # a uint8 label with more lesions than uint8 can number is widened, not wrapped around
    many = np.zeros((20, 20, 8), np.uint8)
    many[::2, ::2, ::2] = TUMOR  # 400 single-voxel lesions
    wide = LesionInstancesd(keys="label", lesion_label=TUMOR)({"label": torch.as_tensor(many)[None]})["label"]
    assert wide.dtype == torch.int32 and int(wide.max()) == 499
    back = MergeLesionsd(keys="label", output_keys="classes")({"label": wide})["classes"]
    assert torch.equal(back[0].to(torch.uint8), torch.as_tensor(many))


@pytest.fixture(scope="module")
def phantom_three_lesions():
    """A small CT phantom asked for three liver tumours: three separate lesions."""
    ph = make_phantom("ct", seed=4, shape=(48, 48, 20), spacing=(4.3, 4.3, 8.0), num_tumors=3)
    label = np.where(ph.label == 6, TUMOR, np.where(ph.label == 1, LIVER, 0)).astype(np.uint8)
    return ph, MetaTensor(torch.as_tensor(label)[None], affine=torch.as_tensor(ph.affine))


def test_phantom_can_be_asked_for_a_number_of_tumours(phantom_three_lesions):
    ph, _ = phantom_three_lesions
    assert len(ph.info["tumors"]) == 3
    _, n = ndimage.label(ph.label == 6, structure=np.ones((3, 3, 3)))
    assert n == 3
    # the seed's own tumours keep their sizes and places; more are added after them
    own = make_phantom("ct", seed=4, shape=(48, 48, 20), spacing=(4.3, 4.3, 8.0))
    assert own.info["tumors"][:3] == ph.info["tumors"]
    none = make_phantom("ct", seed=4, shape=(48, 48, 20), spacing=(4.3, 4.3, 8.0), num_tumors=0)
    assert not (none.label == 6).any() and none.info["tumors"] == []
    with pytest.raises(ValueError, match="num_tumors"):
        make_phantom("ct", seed=4, shape=(48, 48, 20), num_tumors=9)
    with pytest.raises(ValueError, match="cardiac"):
        make_phantom("cardiac-mr", seed=0, num_tumors=1)


def test_per_lesion_prompts_on_a_phantom_with_three_lesions_give_three_objects(phantom_three_lesions):
    _, label = phantom_three_lesions
    d = LesionInstancesd(keys="label", lesion_label=TUMOR)({"label": label})
    oracle = LesionPromptsd(label_key="label", key_slices="largest", mode_probs={"box": 1.0},
                            deterministic=True, label_names={1: "liver"}, lesion_name="liver_tumor")
    prompts = oracle(d)["prompts"]
    objects = d["label"][0].numpy()
    assert [p.object_id for p in prompts] == [1, 100, 101, 102]
    assert [p.name for p in prompts] == ["liver", "liver_tumor_1", "liver_tumor_2", "liver_tumor_3"]
    for p in prompts:
        mask = objects == p.object_id
        areas = mask.sum(axis=(0, 1))
        (sp,) = p.slices
        assert sp.kind == "box"
        assert areas[sp.slice_index] == areas.max()  # on the object's own largest slice
        ii, jj = np.nonzero(mask[:, :, sp.slice_index])
        x0, y0, x1, y1 = sp.box
        assert x0 <= jj.min() and jj.max() <= x1 and y0 <= ii.min() and ii.max() <= y1
        assert x0 >= jj.min() - 1 and y0 >= ii.min() - 1  # tight: the box of *this* lesion only
    # training: random prompts, still one object per lesion, each on a slice where it is
    rand = RandLesionPromptsd(label_key="label", mode_probs={"box": 0.5, "clicks": 0.5}, box_jitter=1)
    rand.set_random_state(0)
    for _ in range(3):
        drawn = rand(d)["prompts"]
        assert [p.object_id for p in drawn] == [1, 100, 101, 102]
        for p in drawn:
            assert (objects[..., p.slices[0].slice_index] == p.object_id).any()


class _MaskEcho(torch.nn.Module):
    """A stand-in for the memory network that returns each prompt's mask as that object's
    logits on its key slice (and nothing elsewhere): what the evaluator does with them is tested."""

    encoder_batch_size = 1

    def propagate(self, frames, prompts, original_size, output_size, features=None, output_dtype=None, sink=None):
        t = frames.shape[0]
        logits = torch.full((len(prompts), t, *output_size), -10.0)
        for n, p in enumerate(prompts):
            for sp in p.slices:
                logits[n, sp.slice_index][torch.as_tensor(sp.mask)] = 10.0
        if sink is None:
            return logits
        for f in range(t):  # slice by slice, as Sam2VolumeSegmenter delivers them
            sink(list(range(len(prompts))), f, logits[:, f])
        return None


def test_evaluator_hands_class_maps_to_the_metrics_and_keeps_the_object_map(phantom_three_lesions):
    _, label = phantom_three_lesions
    d = LesionInstancesd(keys="label", lesion_label=TUMOR)({"label": label})
    d = LesionPromptsd(label_key="label", key_slices="largest", mode_probs={"mask": 1.0},
                       deterministic=True)(d)
    t = label.shape[-1]
    item = {"image": torch.zeros(3, 16, 16, t), "label": d["label"], "prompts": d["prompts"]}
    ev = LesionVolumeEvaluator("cpu", [[item]], _MaskEcho(), num_classes=3, lesion_label=TUMOR,
                               prompt_source="oracle")
    out = ev._iteration(ev, [item])
    objects, pred, truth = out[OBJECT_LABEL], out[PRED_LABEL], out["label_map"]
    assert sorted(torch.unique(objects).tolist()) == [0, 1, 100, 101, 102]
    assert sorted(torch.unique(pred).tolist()) == [0, 1, 2] and int(truth.max()) == 2
    assert torch.equal(pred == TUMOR, objects >= 100)
    assert torch.equal(truth, label.to(truth.dtype)) and isinstance(truth, MetaTensor)
    assert out["pred"].shape == (1, 3, 48, 48, t) and out[PROMPT_SOURCE] == "oracle"
    with pytest.raises(ValueError, match="lesion_label"):
        LesionVolumeEvaluator("cpu", [[item]], _MaskEcho(), num_classes=2, lesion_label=2)


def _lesion_outputs():
    """Two hand-made cases at 2 x 2 x 5 mm: (pred, truth) class maps with lesions of known size."""
    affine = torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0], dtype=torch.float64))
    truth_a = torch.zeros(1, 30, 30, 6)
    truth_a[0, 2:8, 2:8, 1:4] = TUMOR  # 12 mm across: 10-20 mm bin, found
    truth_a[0, 20:23, 20:23, 2:3] = TUMOR  # 6 mm: missed
    pred_a = torch.zeros(1, 30, 30, 6)
    pred_a[0, 2:8, 2:7, 1:4] = TUMOR
    pred_a[0, 12:14, 25:27, 4:5] = TUMOR  # a false positive, 5.7 mm
    truth_b = torch.zeros(1, 30, 30, 6)
    truth_b[0, 5:20, 5:20, 0:6] = TUMOR  # 42 mm: found
    pred_b = truth_b.clone()
    outs = []
    for name, pred, truth in (("a", pred_a, truth_a), ("b", pred_b, truth_b)):
        meta = MetaTensor(truth, affine=affine, meta={"filename_or_obj": f"/data/case_{name}.nii.gz"})
        outs.append({PRED_LABEL: pred, "label_map": meta, PROMPT_SOURCE: "oracle"})
    return outs


def test_lesion_metrics_writer_writes_per_lesion_per_case_and_summary_tables(tmp_path):
    outs = _lesion_outputs()
    engine = Engine(lambda e, batch: batch)
    writer = LesionMetricsWriter(tmp_path / "eval", lesion_label=TUMOR)
    writer.attach(engine)
    engine.run(outs, max_epochs=1)
    lesions = list(csv.DictReader((tmp_path / "eval" / "lesions.csv").open()))
    got = [(r["case"], r["size_bin"], r["detected"], r["prompt_source"]) for r in lesions]
    assert got == [("case_a", "10-20 mm", "True", "oracle"), ("case_a", "<10 mm", "False", "oracle"),
                   ("case_b", ">20 mm", "True", "oracle")]
    assert float(lesions[0]["lesion_dice"]) == pytest.approx(2 * 90 / (108 + 90))
    # the CSV keeps 6 significant digits
    assert float(lesions[0]["diameter_mm"]) == pytest.approx(math.hypot(12, 12), rel=1e-5)
    cases = list(csv.DictReader((tmp_path / "eval" / "lesion_cases.csv").open()))
    assert [(r["case"], r["tp"], r["fn"], r["fp"]) for r in cases] == [("case_a", "1", "1", "1"),
                                                                       ("case_b", "1", "0", "0")]
    summary = {r["size_bin"]: r for r in csv.DictReader((tmp_path / "eval" / "lesion_summary.csv").open())}
    assert float(summary["all"]["sensitivity"]) == pytest.approx(2 / 3)
    assert float(summary["all"]["fp_per_case"]) == pytest.approx(0.5)
    assert float(summary["<10 mm"]["sensitivity"]) == 0.0 and summary["<10 mm"]["fp"] == "1"
    m = engine.state.metrics
    assert m["lesion_sensitivity"] == pytest.approx(2 / 3) and m["lesion_fp_per_case"] == pytest.approx(0.5)
    # every epoch starts afresh (rows carried over would repeat case_b and be refused)
    again = Engine(lambda e, batch: batch)
    writer.attach(again)
    again.run(outs[1:], max_epochs=2)
    assert len(list(csv.DictReader((tmp_path / "eval" / "lesions.csv").open()))) == 1


# ------------------------------------------------------------------------ automatic mode


@pytest.fixture(scope="module")
def head():
    """An untrained linear prompt-free head for liver (1) and tumour (2) on a tiny SAM2 encoder."""
    from monai_sam.networks import PromptFreeSamSegmenter, build_sam2_model

    torch.manual_seed(0)
    sam2 = build_sam2_model("sam2.1_hiera_t", image_size=128)
    return PromptFreeSamSegmenter(sam2, "linear", [LIVER, TUMOR], label_names={1: "liver", 2: "liver_tumor"})


def test_auto_prompts_seed_one_object_per_predicted_lesion(head):
    from monai_sam.inferers.lesion_auto_prompt import LesionAutoPrompter

    predicted = _liver_with_tumours().astype(np.int64)  # what the head "predicts": 3 lesions + a speck
    prompter = LesionAutoPrompter(head, lesion_label=TUMOR, lesion_name="liver_tumor", intensity=None)
    objects = prompter.prompts_from_label(predicted, "case", spacing=(1.0, 1.0, 1.0))
    assert [o.object_id for o in objects] == [1, 100, 101, 102, 103]
    assert [o.name for o in objects] == ["liver", "liver_tumor_1", "liver_tumor_2", "liver_tumor_3",
                                         "liver_tumor_4"]
    comps, _ = ndimage.label(predicted == TUMOR, structure=np.ones((3, 3, 3)))
    for o in objects[1:]:
        (sp,) = o.slices
        lesion = comps == o.object_id - 99
        assert sp.kind == "mask" and np.array_equal(sp.mask, lesion[..., sp.slice_index])
        assert lesion[..., sp.slice_index].sum() == lesion.sum(axis=(0, 1)).max()  # its largest slice
    # the liver prompt is the organ's own (the tumours are not part of it)
    assert not (objects[0].slices[0].mask & (predicted[..., objects[0].key_slices[0]] == TUMOR)).any()
    # stray voxels are not lesions; a cap keeps the largest, numbered from 100 again; boxes on request
    big = LesionAutoPrompter(head, lesion_label=TUMOR, intensity=None, prompt="box", min_lesion_volume_mm3=20,
                             max_lesions=2).prompts_from_label(predicted, "case", spacing=(1.0, 1.0, 1.0))
    assert [o.object_id for o in big] == [1, 100, 101] and all(o.slices[0].kind == "box" for o in big)
    assert [int(o.slices[0].box[2] - o.slices[0].box[0]) for o in big[1:]] == [5, 10]  # 6 and 11 columns
    with pytest.raises(ValueError, match="lesion_label 3"):
        LesionAutoPrompter(head, lesion_label=3)


def test_auto_prompter_runs_the_head_on_a_volume(head, phantom_three_lesions):
    """The whole contract on an image as load_volume gives it (untrained head: any number of lesions)."""
    from monai_sam.inferers.lesion_auto_prompt import LesionAutoPrompter
    from monai_sam.prompts import validate_prompts

    ph, _ = phantom_three_lesions
    image = MetaTensor(torch.as_tensor(ph.image[None]), affine=torch.as_tensor(ph.affine),
                       meta={"filename_or_obj": "phantom.nii.gz"})
    prompter = LesionAutoPrompter(head, lesion_label=TUMOR, intensity="liver", image_size=128,
                                  candidate_stride=2, min_area=1)
    predicted = prompter.predict(image)
    objects = prompter(image)
    assert predicted.shape == ph.label.shape and not predicted[..., 1::2].any()  # every 2nd slice only
    n = len(lesion_instances(predicted[..., ::2], TUMOR, (4.3, 4.3, 16.0))[1])
    assert sum(o.object_id >= 100 for o in objects) == n
    assert all(o.key_slices[0] % 2 == 0 for o in objects)
    if objects:
        validate_prompts(objects, ph.label.shape[:2], ph.label.shape[2], "auto")
