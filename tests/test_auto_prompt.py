"""Automatic prompts: a prompt-free head's prediction on key slices seeds SAM2's memory propagation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss

from monai_sam.data import make_phantom
from monai_sam.engines.checkpoint import trained_weights
from monai_sam.inferers import AutoPromptd, AutoPrompter, MemoryPropagationInferer
from monai_sam.networks import PromptFreeSamSegmenter, Sam2VolumeSegmenter, build_sam2_model
from monai_sam.prompts import ObjectPrompts, PromptError, validate_prompts
from monai_sam.segment import intensity_transform
from monai_sam.transforms import SamInput, box_from_mask

SIZE = 128
ORGANS = [1, 2, 3, 4, 5]  # phantom CT: liver, spleen, kidneys, aorta


@pytest.fixture(scope="module")
def sam2():
    torch.manual_seed(0)
    return build_sam2_model("sam2.1_hiera_t", image_size=SIZE)


@pytest.fixture(scope="module")
def phantom():
    ph = make_phantom("ct", 0, shape=(64, 64, 16), spacing=(3.2, 3.2, 10.0))
    label = ph.label.astype(np.int64)
    label[label == 6] = 1  # tumours count as liver
    image = MetaTensor(
        torch.as_tensor(ph.image[None], dtype=torch.float32),
        affine=torch.as_tensor(ph.affine),
        meta={"filename_or_obj": "phantom_ct_000.nii.gz"},
    )
    return image, label


@pytest.fixture(scope="module")
def trained_head(sam2, phantom):
    """A linear head trained for a few seconds on the phantom's cached features (enough to find organs)."""
    image, label = phantom
    torch.manual_seed(0)
    seg = PromptFreeSamSegmenter(sam2, "linear", ORGANS, label_names={1: "liver", 2: "spleen"})
    frames = SamInput(SIZE)(intensity_transform("abdomen")(image)).as_tensor().permute(3, 0, 1, 2)
    feats = seg.encode(frames)
    kwargs, target = seg.training_inputs({"label": torch.as_tensor(label[None])})
    opt = torch.optim.AdamW(seg.head.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randperm(frames.shape[0], generator=gen)[:8]
        loss = loss_fn(seg(None, features={k: v[idx] for k, v in feats.items()}, **kwargs), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return seg.eval()


def test_prompts_come_from_the_key_slices_of_the_predicted_label(sam2):
    seg = PromptFreeSamSegmenter(sam2, "linear", [1, 2, 3], label_names={1: "rv", 2: "myo", 3: "lv"})
    label = np.zeros((30, 30, 6), dtype=np.int64)
    label[5:15, 5:12, 1:4] = 1
    label[5:20, 5:20, 2] = 1  # class 1 is largest on slice 2
    label[25:27, 25:27, 0:6] = 1  # a small separate blob: not the largest component, ignored
    label[20:28, 2:9, 3:5] = 2  # class 2 on slices 3-4, equal areas: the lower index wins
    label[0:2, 0:2, 5] = 3  # 4 pixels of class 3: below min_area, "not found"
    prompter = AutoPrompter(seg, None, prompt="mask", min_area=5)
    objects = prompter.prompts_from_label(label)
    assert [o.object_id for o in objects] == [1, 2] and [o.name for o in objects] == ["rv", "myo"]
    assert objects[0].key_slices == [2] and objects[1].key_slices == [3]
    expected = label[..., 2] == 1
    expected[25:27, 25:27] = False  # the stray blob is not part of the prompt
    assert np.array_equal(objects[0].slices[0].mask, expected)
    validate_prompts(objects, (30, 30), 6)
    boxes = AutoPrompter(seg, None, prompt="box", min_area=5).prompts_from_label(label)
    assert np.array_equal(boxes[1].slices[0].box, box_from_mask(label[..., 3] == 2))
    middle = AutoPrompter(seg, None, key_slices="middle", num_key_slices=2, min_area=5).prompts_from_label(
        label
    )
    assert middle[0].key_slices == [1, 3]  # evenly spaced through slices 1-3
    with pytest.raises(ValueError, match="not classes of the head"):
        AutoPrompter(seg, None, object_ids=[4])
    with pytest.raises(ValueError, match="image_size 1024 differs"):
        AutoPrompter(seg, None, image_size=1024)


@pytest.mark.slow
def test_auto_prompts_seed_memory_propagation_end_to_end(sam2, phantom, trained_head, caplog):
    image, label = phantom
    prompter = AutoPrompter(trained_head, "abdomen", image_size=SIZE, prompt="mask")
    with caplog.at_level("WARNING"):
        objects = prompter(image)
    assert "random (demo only)" in caplog.text, "an untrained-checkpoint prompter says so"
    assert objects and all(isinstance(o, ObjectPrompts) for o in objects)
    validate_prompts(objects, label.shape[:2], label.shape[2])
    liver = next(o for o in objects if o.object_id == 1)
    assert liver.name == "liver"
    k = liver.key_slices[0]
    truth = label[..., k] == 1
    mask = liver.slices[0].mask
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.6, f"the liver prompt should overlap the liver (Dice {dice:.2f})"
    # the memory network carries the automatic prompts through the volume (two organs: CPU time)
    two = AutoPrompter(trained_head, "abdomen", object_ids=[1, 2], prompt="box")(image)
    assert [o.object_id for o in two] == [o.object_id for o in objects if o.object_id in (1, 2)]
    volume = intensity_transform("abdomen")(image)
    seg = MemoryPropagationInferer(preprocess=SamInput(SIZE))(volume, Sam2VolumeSegmenter(sam2), two)
    assert seg.shape == (1, *label.shape)
    assert set(np.unique(seg.numpy()).tolist()) <= {0, 1, 2}
    # key slices chosen among every other slice only (long volumes): the others are not predicted
    sparse = AutoPrompter(trained_head, "abdomen", candidate_stride=2).predict(image)
    assert not sparse[..., 1::2].any() and (sparse[..., ::2] == 1).any()
    # the dict transform for bundle pipelines
    d = AutoPromptd(prompter)({"image": image})
    assert [o.object_id for o in d["prompts"]] == [o.object_id for o in objects]


def test_auto_promptd_explains_when_nothing_is_found(phantom):
    image, _ = phantom
    with pytest.raises(PromptError, match="phantom_ct_000.nii.gz: automatic prompting found none"):
        AutoPromptd(lambda img: [])({"image": image})
    assert AutoPromptd(lambda img: [], require_objects=False)({"image": image})["prompts"] == []


def test_missing_head_checkpoint_is_named(sam2, phantom, tmp_path):
    seg = PromptFreeSamSegmenter(sam2, "linear", [1])
    prompter = AutoPrompter(
        seg, "abdomen", checkpoint=tmp_path / "models" / "model.pt", model_name="sam2.1_hiera_t"
    )
    with pytest.raises(FileNotFoundError, match="models/model.pt does not exist"):
        prompter(phantom[0])
    from monai_sam.transforms import CTWindow, MRPercentileScale

    assert isinstance(intensity_transform("mr"), MRPercentileScale)
    assert isinstance(intensity_transform("liver"), CTWindow)
    with pytest.raises(ValueError, match="unknown intensity"):
        AutoPrompter(seg, "brain_mr")


@pytest.mark.slow
def test_ct_bundle_runs_fully_automatically(tmp_path):
    """train_autoprompt_head.yaml trains the head; inference.yaml --prompt_source auto prompts with it."""
    import os
    from pathlib import Path

    import nibabel as nib
    from monai.bundle import ConfigWorkflow

    configs = Path(__file__).resolve().parents[1] / "bundles" / "sam2_ct_abdominal_organs" / "configs"
    train = [str(configs / "train.yaml"), str(configs / "train_autoprompt_head.yaml")]
    infer = [str(configs / "train.yaml"), str(configs / "inference.yaml")]
    root, data = tmp_path / "bundle", tmp_path / "data"
    tiny = {
        "bundle_root": str(root),
        "demo": True,
        "dataset_dir": str(data),
        "num_phantoms": 3,
        "phantom_shape": [48, 48, 16],
        "phantom_spacing": [4.3, 4.3, 10.0],
        "image_size": SIZE,
        "epochs": 2,
        "val_interval": 2,
        "autoprompt_head": "linear",
        "learning_rates": {"head": 1e-2},
    }
    wf = ConfigWorkflow(config_file=train, workflow_type="train", **tiny)
    wf.initialize()
    assert wf.check_properties() in (None, []), wf.check_properties()
    wf.run()
    head = root / "models" / "autoprompt_head" / "model.pt"
    state = torch.load(head, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state["trainable"] == ["head"] and all(k.startswith("head.") for k in trained_weights(state))

    single = tmp_path / "single"
    single.mkdir()
    os.symlink(data / "imagesTr" / "phantom_ct_000.nii.gz", single / "phantom_ct_000.nii.gz")
    wf = ConfigWorkflow(
        config_file=infer,
        workflow_type="infer",
        **tiny,
        prompt_source="auto",
        input_dir=str(single),
        inference_output_dir=str(tmp_path / "pred"),
    )
    wf.initialize()
    assert wf.check_properties() in (None, []), wf.check_properties()
    prompter = wf.parser.get_parsed_content("auto_prompter")
    assert isinstance(prompter, AutoPrompter) and prompter.checkpoint == str(head)
    # the memory network's trained parts: this test trains none, so its untrained parts are saved
    # (stamped with the same frozen encoder) where inference loads them
    ckpt = wf.parser.get_parsed_content("trainable_checkpoint")
    torch.save({"model": ckpt.state_dict()}, root / "models" / "model.pt")
    wf.run()
    outs = list((tmp_path / "pred").glob("*.nii.gz"))
    assert [p.name for p in outs] == ["phantom_ct_000_seg_auto_prompts_demo.nii.gz"], (
        "auto prompts are named apart"
    )
    ref = nib.load(data / "imagesTr" / "phantom_ct_000.nii.gz")
    pred = nib.load(outs[0])
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
