"""Unit tests of monai_sam.transforms on tiny tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from monai_sam.prompts import validate_prompts
from monai_sam.transforms import (
    CT_WINDOWS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAM_ORIGINAL_SIZE_KEY,
    CTWindow,
    CTWindowd,
    MRPercentileScale,
    MRPercentileScaled,
    PromptFromLabeld,
    RandPromptFromLabeld,
    SamInput,
    SamInputd,
    SampleSliceSequenced,
    box_from_mask,
    clicks_from_mask,
)

# ---------------------------------------------------------------- intensity


def test_ct_window_presets():
    assert CT_WINDOWS["abdomen"] == (400, 40)
    assert CT_WINDOWS["bone"] == (1800, 400)
    assert CT_WINDOWS["lung"] == (1500, -600)
    assert CT_WINDOWS["brain"] == (80, 40)
    assert CT_WINDOWS["mediastinum"] == (350, 50)
    for width, _level in CT_WINDOWS.values():
        assert width > 0


def test_ct_window_abdomen_values_and_clipping():
    hu = torch.tensor([-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0]).reshape(1, 6, 1, 1)
    out = CTWindow("abdomen")(hu).reshape(-1)
    np.testing.assert_allclose(out.numpy(), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)
    # explicit width/level equals the preset; default is abdomen
    np.testing.assert_allclose(CTWindow(width=400, level=40)(hu), CTWindow()(hu))


def test_ct_window_dict_keeps_meta_and_other_keys():
    img = MetaTensor(torch.full((1, 2, 2, 2), -600.0), meta={"filename_or_obj": "ct.nii.gz"})
    lab = torch.ones(1, 2, 2, 2)
    out = CTWindowd("image", preset="lung")({"image": img, "label": lab})
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "ct.nii.gz"
    np.testing.assert_allclose(out["image"].numpy(), 0.5)
    assert out["label"] is lab


def test_ct_window_errors():
    with pytest.raises(ValueError, match="abdomen"):  # lists the presets
        CTWindow("kidney")
    with pytest.raises(ValueError, match="both"):
        CTWindow(width=400)
    with pytest.raises(ValueError, match="not both"):
        CTWindow("bone", width=400, level=40)


def test_mr_percentile_scale_range():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.normal(500, 100, size=(1, 8, 8, 8)).astype(np.float32))
    img[0, 0, 0, 0] = 1e5  # an outlier does not squash the rest
    out = MRPercentileScale(lower=1, upper=99)(img)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert 0.3 < float(out.median()) < 0.7
    d = MRPercentileScaled("image", lower=1, upper=99)({"image": img})
    torch.testing.assert_close(d["image"], out)


def test_mr_percentile_nonzero_keeps_background():
    img = torch.zeros(1, 6, 6, 6)
    img[:, 1:5, 1:5, 1:5] = torch.linspace(100, 200, 64).reshape(1, 4, 4, 4)
    out = MRPercentileScale(0, 100, nonzero=True)(img)
    assert float(out[:, 1:5, 1:5, 1:5].min()) == 0.0 and float(out.max()) == 1.0
    assert float(out[:, 0].abs().max()) == 0.0
    # without nonzero the background is the minimum and the tissue sits above 0
    assert float(MRPercentileScale(0, 100)(img)[:, 1:5, 1:5, 1:5].min()) > 0.4


# ---------------------------------------------------------------- SAM input


def test_sam_input_shape_normalisation_and_meta():
    img = MetaTensor(torch.full((1, 10, 6, 4), 0.7), meta={"filename_or_obj": "x.nii"})
    out = SamInputd("image", image_size=16)({"image": img})["image"]
    assert tuple(out.shape) == (3, 16, 16, 4)
    expected = [(0.7 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    np.testing.assert_allclose(out.mean(dim=(1, 2, 3)).numpy(), expected, rtol=1e-5)
    assert tuple(out.meta[SAM_ORIGINAL_SIZE_KEY]) == (10, 6)
    assert out.meta["filename_or_obj"] == "x.nii"


def test_sam_input_rgb_and_2d():
    rgb = torch.rand(3, 7, 5)
    out = SamInput(image_size=12)(rgb)
    assert tuple(out.shape) == (3, 12, 12)
    assert tuple(out.meta[SAM_ORIGINAL_SIZE_KEY]) == (7, 5)
    grey2d = SamInput(image_size=12)(np.zeros((1, 9, 9), np.float32))
    assert tuple(grey2d.shape) == (3, 12, 12)
    with pytest.raises(ValueError, match="shape"):
        SamInput(image_size=12)(torch.zeros(2, 5, 5, 3))


def test_sam_input_bilinear_per_slice():
    # frames are resized independently: a constant frame stays constant, frame axis untouched
    img = torch.zeros(1, 4, 4, 3)
    img[..., 1] = 1.0
    img[0, :2, :, 2] = 1.0  # top half of frame 2
    out = SamInput(image_size=8, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert float(out[..., 0].abs().max()) == 0.0
    np.testing.assert_allclose(out[..., 1].numpy(), 1.0, atol=1e-6)
    assert float(out[0, 0, 0, 2]) == 1.0 and float(out[0, -1, 0, 2]) == 0.0
    assert 0.0 < float(out[0, 3, 0, 2]) < 1.0  # bilinear, not nearest


def test_sam_input_inverse_restores_in_plane_size():
    img = MetaTensor(torch.rand(1, 10, 6, 4))
    pipeline = Compose([SamInputd("image", image_size=16)])
    out = pipeline({"image": img, "label": torch.zeros(1, 10, 6, 4)})
    assert tuple(out["image"].shape) == (3, 16, 16, 4)
    assert tuple(out["label"].shape) == (1, 10, 6, 4)  # labels are not resized
    # Invertd: a prediction at model size goes back to the slice size, using the image's record
    pred = MetaTensor(torch.rand(2, 16, 16, 4))
    inv = Invertd("pred", transform=pipeline, orig_keys="image", nearest_interp=False)({**out, "pred": pred})
    assert tuple(inv["pred"].shape) == (2, 10, 6, 4)
    back = pipeline.inverse(out)
    assert tuple(back["image"].shape) == (3, 10, 6, 4)
    assert SAM_ORIGINAL_SIZE_KEY not in back["image"].meta


# ---------------------------------------------------------------- slice sequences


def _volume(depth: int = 12, name: str = "case_007.nii.gz"):
    label = torch.zeros(1, 8, 10, depth)
    label[0, 2:5, 3:7, 3:5] = 1  # object 1 on slices 3-4
    label[0, 5:7, 1:4, 8:10] = 2  # object 2 on slices 8-9
    image = torch.arange(depth, dtype=torch.float32).expand(1, 8, 10, depth).clone()  # value = slice index
    meta = {"filename_or_obj": name}
    return {"image": MetaTensor(image, meta=dict(meta)), "label": MetaTensor(label, meta=dict(meta))}


def test_sample_slice_sequence_contains_object():
    t = SampleSliceSequenced(("image", "label"), num_slices=4, label_ids=[1])
    for seed in range(8):
        out = t.set_random_state(seed)(_volume())
        assert out["image"].shape[-1] == 4 and out["label"].shape[-1] == 4
        assert out["object_id"] == 1
        start = out["slice_start"]
        assert 0 <= start <= 12 - 4
        assert (out["label"] == 1).any()
        np.testing.assert_array_equal(out["image"][0, 0, 0].numpy(), np.arange(start, start + 4))
        assert out["image"].meta["slice_start"] == start and out["label"].meta["object_id"] == 1
        # the affine moves with the crop: the first kept slice is at z = start (identity affine)
        assert float(out["image"].affine[2, 3]) == start


def test_sample_slice_sequence_reproducible_and_random():
    def draws(seed: int) -> list[tuple[int, int]]:
        t = SampleSliceSequenced(("image", "label"), num_slices=3).set_random_state(seed)
        return [(o["object_id"], o["slice_start"]) for o in (t(_volume()) for _ in range(10))]

    assert draws(3) == draws(3)
    assert len(set(draws(3))) > 1
    assert {obj for obj, _ in draws(5)} == {1, 2}


def test_sample_slice_sequence_inverse_pads_back():
    t = SampleSliceSequenced(("image", "label"), num_slices=4).set_random_state(0)
    out = t(_volume())
    back = t.inverse(out)
    assert tuple(back["label"].shape) == (1, 8, 10, 12)
    s = out["slice_start"]
    np.testing.assert_array_equal(back["image"][0, 0, 0, s : s + 4].numpy(), np.arange(s, s + 4))


def test_sample_slice_sequence_errors():
    with pytest.raises(ValueError, match=r"case_007\.nii\.gz.*\[3, 4\]"):
        SampleSliceSequenced(("image", "label"), num_slices=4, label_ids=[3, 4])(_volume())
    with pytest.raises(ValueError, match="fewer than"):
        SampleSliceSequenced(("image", "label"), num_slices=20)(_volume())
    out = SampleSliceSequenced(("image", "label"), num_slices=20, allow_short=True)(_volume())
    assert out["image"].shape[-1] == 12 and out["slice_start"] == 0


# ---------------------------------------------------------------- 2D prompt helpers


def _rect_mask() -> np.ndarray:
    mask = np.zeros((20, 30), bool)  # H=20 rows, W=30 columns
    mask[3:8, 10:25] = True  # rows 3..7, cols 10..24
    return mask


def test_box_from_mask_exact_xy_convention():
    np.testing.assert_array_equal(box_from_mask(_rect_mask()), [10, 3, 24, 7])
    # a one-pixel-wide object still gives a box of positive area
    line = np.zeros((5, 5), bool)
    line[1:4, 4] = True
    x0, y0, x1, y1 = box_from_mask(line)
    assert x1 > x0 and (y0, y1) == (1, 3) and 0 <= x0 and x1 <= 4
    with pytest.raises(ValueError, match="empty"):
        box_from_mask(np.zeros((4, 4), bool))


def test_box_jitter_bounded_inside_non_empty():
    rng = np.random.RandomState(0)
    exact = box_from_mask(_rect_mask())
    boxes = np.stack([box_from_mask(_rect_mask(), jitter=4, rng=rng) for _ in range(200)])
    assert np.abs(boxes - exact).max() <= 4 + 1e-5
    assert np.abs(boxes - exact).max() > 1  # really jittered
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 29).all() and (boxes[:, 3] <= 19).all()
    # huge jitter on a tiny object: still inside and of positive area
    tiny = np.zeros((6, 6), bool)
    tiny[2:4, 2:4] = True
    big = np.stack([box_from_mask(tiny, jitter=50, rng=rng) for _ in range(200)])
    assert (big[:, 2] > big[:, 0]).all() and (big[:, 3] > big[:, 1]).all()
    assert big.min() >= 0 and big.max() <= 5


def test_clicks_from_mask():
    mask = _rect_mask()
    pts, labels = clicks_from_mask(mask, num_positive=3, num_negative=4, rng=np.random.RandomState(1))
    assert pts.shape == (7, 2) and labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    x, y = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert mask[y[:3], x[:3]].all()  # (x, y) = (col, row)
    assert not mask[y[3:], x[3:]].any()
    assert (x[3:] >= 0).all() and (x[3:] <= 29).all() and (y[3:] <= 19).all()
    # deterministic centre click without rng: centre of rows 3..7 / cols 10..24
    pts, labels = clicks_from_mask(mask)
    np.testing.assert_array_equal(pts, [[17, 5]])
    assert labels.tolist() == [1]
    with pytest.raises(ValueError, match="empty"):
        clicks_from_mask(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="whole slice"):
        clicks_from_mask(np.ones((4, 4), bool), num_negative=1)


# ---------------------------------------------------------------- prompts from labels


def _slice_shape_and_depth(d) -> tuple[tuple[int, int], int]:
    return tuple(d["label"].shape[1:3]), d["label"].shape[-1]


def test_rand_prompt_from_label_all_objects_validate():
    d = _volume()
    t = RandPromptFromLabeld(num_key_slices=2, num_negative=1, label_names={1: "liver"})
    out = t.set_random_state(0)(d)
    objects = out["prompts"]
    assert [o.object_id for o in objects] == [1, 2] and objects[0].name == "liver"
    validate_prompts(objects, *_slice_shape_and_depth(d), source="test")
    label = d["label"][0].numpy()
    for obj in objects:
        assert len(obj.slices) == 2
        for p in obj.slices:
            assert (label[..., p.slice_index] == obj.object_id).any()


def test_rand_prompt_modes_and_reproducibility():
    d = _volume()
    out = RandPromptFromLabeld(mode_probs={"mask": 1}, num_key_slices=2)(d)
    label = d["label"][0].numpy()
    for obj in out["prompts"]:
        for p in obj.slices:
            assert p.kind == "mask"
            np.testing.assert_array_equal(p.mask, label[..., p.slice_index] == obj.object_id)
    out = RandPromptFromLabeld(mode_probs={"box": 1}, box_jitter=0)(d)
    np.testing.assert_array_equal(out["prompts"][0].slices[0].box, [3, 2, 6, 4])
    t = RandPromptFromLabeld(mode_probs={"box": 1, "clicks": 1, "mask": 1}, object_ids=[1], num_key_slices=2)
    kinds = set()
    for _ in range(20):
        kinds |= {p.kind for p in t(d)["prompts"][0].slices}
    assert kinds == {"box", "clicks", "mask"}

    def draw(seed):
        o = RandPromptFromLabeld(object_ids=[1]).set_random_state(seed)(d)["prompts"][0].slices[0]
        return o.slice_index, o.kind, None if o.box is None else o.box.tolist()

    assert draw(7) == draw(7)


def test_prompts_after_slice_sequence_use_sampled_object_and_relative_slices():
    pipeline = Compose(
        [SampleSliceSequenced(("image", "label"), num_slices=4, label_ids=[2]), RandPromptFromLabeld()]
    )
    pipeline.set_random_state(1)
    out = pipeline(_volume())
    assert [o.object_id for o in out["prompts"]] == [2]
    validate_prompts(out["prompts"], *_slice_shape_and_depth(out))
    k = out["prompts"][0].slices[0].slice_index
    assert (out["label"][0, ..., k] == 2).any() and k < 4


def test_prompt_from_label_deterministic_and_errors():
    d = _volume()
    d["label"][0, 2:3, 3:5, 5] = 1  # object 1 now on slices 3, 4 (largest) and 5 (small)
    out = PromptFromLabeld(object_ids=[1], mode="box+clicks")(d)
    p = out["prompts"][0].slices[0]
    assert p.slice_index in (3, 4) and p.kind == "box+clicks"
    np.testing.assert_array_equal(p.box, [3, 2, 6, 4])
    assert PromptFromLabeld(object_ids=[1], key_slices="middle")(d)["prompts"][0].key_slices == [4]
    assert PromptFromLabeld(object_ids=[1], key_slices=5)(d)["prompts"][0].key_slices == [5]
    with pytest.raises(ValueError, match=r"case_007\.nii\.gz.*object 3"):
        RandPromptFromLabeld(object_ids=[3])(d)
    with pytest.raises(ValueError, match="not on key slice"):
        PromptFromLabeld(object_ids=[1], key_slices=0)(d)
    with pytest.raises(ValueError, match="single mode"):
        RandPromptFromLabeld(mode_probs={"box": 1, "mask": 1}, key_slices="middle", deterministic=True)
    with pytest.raises(ValueError, match="empty label"):
        RandPromptFromLabeld()({"label": torch.zeros(1, 4, 4, 3)})


def test_shared_key_slices_prompt_all_objects_on_the_same_slices():
    """One set of key slices for every object: they form one cohort for the memory network."""
    from monai_sam.transforms import RandPromptFromLabeld

    label = np.zeros((1, 16, 16, 6), np.int64)
    label[0, 2:6, 2:6, 0:4] = 1  # object 1 on slices 0-3
    label[0, 8:12, 8:12, 2:6] = 2  # object 2 on slices 2-5
    label[0, 12:14, 2:4, 5] = 3  # object 3 only on slice 5
    t = RandPromptFromLabeld(key_slices="largest", num_key_slices=1, mode_probs={"box": 1}, shared_key_slices=True)
    out = t({"label": label})["prompts"]
    keys = {o.object_id: o.key_slices for o in out}
    # slices 2 and 3 hold two objects (the most); "largest" takes the first of them
    assert keys == {1: [2], 2: [2]}, keys
    label[0, 8:10, 8:12, 2] = 0  # object 2 now only half there on slice 2: slice 3 shows both fully
    keys = {o.object_id: o.key_slices for o in t({"label": label})["prompts"]}
    assert keys == {1: [3], 2: [3]}, keys
    t = RandPromptFromLabeld(key_slices="random", num_key_slices=2, mode_probs={"box": 1}, shared_key_slices=True)
    t.set_random_state(3)
    for _ in range(5):
        out = t({"label": label})["prompts"]
        slices = {k for o in out for k in o.key_slices}
        assert len(slices) <= 2
        for o in out:
            assert all(label[0, :, :, k][label[0, :, :, k] == o.object_id].size for k in o.key_slices)


def test_label_ids_and_max_objects_choose_which_objects_are_prompted():
    """Training prompts a random few of the wanted organs in view, never an unwanted label."""
    from monai_sam.transforms import RandPromptFromLabeld

    label = np.zeros((1, 16, 16, 4), np.int64)
    for i in range(1, 6):
        label[0, 3 * i - 2 : 3 * i, 2:6, :] = i
    t = RandPromptFromLabeld(label_ids=[1, 2, 3, 4], max_objects=2, mode_probs={"box": 1})
    t.set_random_state(0)
    seen = set()
    for _ in range(30):
        ids = [o.object_id for o in t({"label": label})["prompts"]]
        assert len(ids) == 2 and len(set(ids)) == 2 and set(ids) <= {1, 2, 3, 4}, ids
        seen |= set(ids)
    assert seen == {1, 2, 3, 4}
    assert len(RandPromptFromLabeld(mode_probs={"box": 1})({"label": label})["prompts"]) == 5
    with pytest.raises(ValueError, match=r"no label of \[7\]"):
        RandPromptFromLabeld(label_ids=[7])({"label": label})
    with pytest.raises(ValueError, match="max_objects"):
        RandPromptFromLabeld(max_objects=0)
