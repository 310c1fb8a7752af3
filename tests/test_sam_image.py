"""2D SAM / SAM2 on fundus photographs: oracles against the official predictors, the recipe's freezing,
region prompts and targets, the crop around the disc, the loss."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.utils.data import DataLoader

from monai_sam.data.fundus import make_fundus
from monai_sam.engines.feature_cache import FeatureCache, encoder_identity
from monai_sam.engines.mask_loss import MaskPredictionLoss, mask_iou
from monai_sam.engines.trainer import FrozenEncoderTrainer, collate_as_list, trainable_param_groups
from monai_sam.networks import build_sam2_model
from monai_sam.networks.sam_image import (
    Sam2ImageSegmenter,
    SamImageSegmenter,
    build_image_model,
    build_image_segmenter,
    frames_from_image,
    image_object_targets,
)
from monai_sam.prompts import ObjectPrompts, PromptError, SlicePrompt
from monai_sam.transforms import SamInput
from monai_sam.transforms.regions import CropAroundRegiond, RandRegionPromptd, RegionPromptd

S = 128  # model input side
REGIONS = {1: [1, 2], 2: [2]}  # optic disc = rim + cup, optic cup


def tiny_sam(image_size: int = S) -> nn.Module:
    """A small randomly initialised SAM v1 from segment_anything's own modules (the official
    sizes are built by `build_sam_model`; vit_b at 1024 px is too slow for a unit test on CPU)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    emb = image_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=32,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=[1],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32,
            image_embedding_size=(emb, emb),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer_dim=32,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
        ),
    ).eval()


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return tiny_sam()


@pytest.fixture(scope="module")
def sam2():
    torch.manual_seed(0)
    model = build_sam2_model("sam2.1_hiera_t", image_size=S)
    # random weights may call the object absent (SAM2's video path then blanks the mask, the image
    # predictor does not): make it present so that the two paths are comparable
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(10.0)
    return model


def _photo(seed: int = 3, size: int = S) -> tuple[np.ndarray, np.ndarray]:
    f = make_fundus(seed, size)
    return f.image, f.label


def _sample(seed: int, size: int = 160, image_size: int = S) -> dict:
    """A training item as the bundle makes it: image (3, S, S), label (1, H, W), region prompts and masks."""
    image, label = _photo(seed, size)
    d = {
        "image": torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
        "label": torch.from_numpy(label)[None],
    }
    d = CropAroundRegiond(["image", "label"], region=[1, 2], scale=2.5)(d)
    d["image"] = SamInput(image_size)(d["image"])
    prompter = RandRegionPromptd(regions=REGIONS, mode_probs={"box": 0.5, "clicks": 0.5}, num_negative=1)
    prompter.set_random_state(seed)
    return prompter(d)


# ---------------------------------------------------------------------------------- oracles


def test_sam_image_segmenter_matches_segment_anything_predictor(sam):
    """Same weights, image and prompts as SamPredictor: the same logits (square image: no resize/pad)."""
    from segment_anything import SamPredictor

    image, label = _photo()
    ii, jj = np.nonzero(label > 0)
    box = np.array([jj.min(), ii.min(), jj.max(), ii.max()], np.float32)
    click = np.array([[jj.mean(), ii.mean()]], np.float32)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    ref_box, _, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
    ref_clk, _, _ = predictor.predict(
        point_coords=click, point_labels=np.array([1]), multimask_output=False, return_logits=True
    )

    seg = SamImageSegmenter(sam)
    frames = frames_from_image(SamInput(S)(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0))
    prompts = [
        ObjectPrompts(1, slices=[SlicePrompt(0, box=box)]),
        ObjectPrompts(2, slices=[SlicePrompt(0, points=click, point_labels=[1])]),
    ]
    logits = seg.predict(frames, prompts, original_size=(S, S))
    assert logits.shape == (2, S, S)
    torch.testing.assert_close(logits[0], torch.from_numpy(ref_box[0]), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], torch.from_numpy(ref_clk[0]), atol=2e-4, rtol=1e-4)


def test_sam2_image_mode_is_the_volume_segmenter_on_one_slice_and_matches_sam2_image_predictor(sam2):
    """A one-slice volume's conditioning frame gets no_mem_embed, exactly as SAM2ImagePredictor."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image, label = _photo()
    ii, jj = np.nonzero(label > 0)
    box = np.array([jj.min(), ii.min(), jj.max(), ii.max()], np.float32)
    click = np.array([[jj.mean(), ii.mean()]], np.float32)
    predictor = SAM2ImagePredictor(sam2)
    predictor._bb_feat_sizes = [
        (S // 4, S // 4),
        (S // 8, S // 8),
        (S // 16, S // 16),
    ]  # hard-coded for 1024 px
    predictor.set_image(image)
    ref_box, _, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
    # one click is ambiguous: both paths ask for three masks and keep the best predicted IoU
    masks, ious, _ = predictor.predict(
        point_coords=click, point_labels=np.array([1]), multimask_output=True, return_logits=True
    )
    ref_clk = masks[int(np.argmax(ious))]

    seg = build_image_segmenter(sam2)
    assert isinstance(seg, Sam2ImageSegmenter)
    frames = frames_from_image(SamInput(S)(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0))
    prompts = [
        ObjectPrompts(1, slices=[SlicePrompt(0, box=box)]),
        ObjectPrompts(2, slices=[SlicePrompt(0, points=click, point_labels=[1])]),
    ]
    logits = seg.predict(frames, prompts, original_size=(S, S))
    torch.testing.assert_close(logits[0], torch.from_numpy(ref_box[0]).float(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(logits[1], torch.from_numpy(ref_clk).float(), atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------- interface


def test_sam_encode_split_join_and_forward_shapes(sam):
    seg = SamImageSegmenter(sam)
    item = _sample(0)
    frames = frames_from_image(item["image"])
    with torch.no_grad():
        raw = seg.encode(frames)
    per = seg.split_encoded(raw)
    assert len(per) == 1 and per[0]["image_embeddings"].shape == (32, S // 16, S // 16)
    joined = seg.join_encoded(per, "cpu")
    torch.testing.assert_close(joined["image_embeddings"], raw["image_embeddings"])
    kwargs, target = seg.training_inputs(item)
    assert target.shape == (2, 1, S // 4, S // 4) and seg.low_res_size == S // 4
    out = seg(None, features=joined, **kwargs)
    assert out["logits"].shape == (2, 1, S // 4, S // 4) and out["iou_predictions"].shape == (2, 1)
    # from frames or from cached features: the same logits
    torch.testing.assert_close(seg(frames, **kwargs)["logits"], out["logits"])
    with pytest.raises(ValueError, match=r"frames must be \(n, 3, 128, 128\)"):
        seg.encode(torch.zeros(1, 3, 64, 64))


def test_sam_rejects_mask_prompts_and_bad_prompts(sam):
    seg = SamImageSegmenter(sam)
    frames = torch.zeros(1, 3, S, S)
    mask = np.zeros((S, S), bool)
    mask[10:20, 10:20] = True
    with pytest.raises(PromptError, match="SAM v1.*box and click"):
        seg.predict(frames, [ObjectPrompts(1, slices=[SlicePrompt(0, mask=mask)])], (S, S))
    with pytest.raises(PromptError, match="outside"):
        seg.predict(frames, [ObjectPrompts(1, slices=[SlicePrompt(0, box=[200, 10, 300, 20])])], (S, S))
    with pytest.raises(TypeError, match="segment_anything Sam or a sam2 SAM2Base"):
        build_image_segmenter(nn.Linear(2, 2))


def test_family_and_size_must_agree():
    with pytest.raises(ValueError, match="sam2.1_hiera_t is a sam2 model but model_family is sam"):
        build_image_model("sam", "sam2.1_hiera_t")
    with pytest.raises(ValueError, match="model_family must be 'sam' or 'sam2'"):
        build_image_model("medsam", "sam_vit_b")


def test_targets_are_the_nested_regions_on_the_low_res_grid():
    item = _sample(1)
    masks = item["object_masks"]
    label = item["label"][0]
    assert masks.shape == (2, *label.shape)
    assert torch.equal(masks[0].bool(), label > 0) and torch.equal(masks[1].bool(), label == 2)
    assert [o.object_id for o in item["prompts"]] == [1, 2]
    assert [o.name for o in item["prompts"]] == ["", ""]  # no names given to the prompter
    target, hw = image_object_targets(item, 32)
    assert hw == tuple(label.shape) and target.shape == (2, 1, 32, 32)
    assert 0.0 <= float(target.min()) and float(target.max()) <= 1.0
    # the cup lies inside the disc, and the area is kept by the area-weighted resize
    assert bool((target[1] <= target[0] + 1e-6).all())
    for k in range(2):
        frac = float(masks[k].float().mean())
        assert abs(float(target[k].mean()) - frac) < 0.01
    # without object_masks: label == object id (disjoint labels)
    del item["object_masks"]
    target2, _ = image_object_targets(item, 32)
    assert float(target2[0].sum()) < float(target[0].sum())  # label 1 alone is the rim, not the disc


# ---------------------------------------------------------------------------------- region transforms


def test_region_prompts_box_clicks_and_errors():
    image, label = _photo(5, 160)
    d = {"label": torch.from_numpy(label)[None]}
    out = RegionPromptd(regions=REGIONS, region_names={1: "optic_disc", 2: "optic_cup"}, mode="box")(d)
    disc, cup = out["prompts"]
    ii, jj = np.nonzero(label > 0)
    np.testing.assert_array_equal(disc.slices[0].box, [jj.min(), ii.min(), jj.max(), ii.max()])
    ii, jj = np.nonzero(label == 2)
    np.testing.assert_array_equal(cup.slices[0].box, [jj.min(), ii.min(), jj.max(), ii.max()])
    assert (disc.name, cup.name) == ("optic_disc", "optic_cup") and disc.slices[0].slice_index == 0
    clicks = RegionPromptd(regions=REGIONS, mode="clicks")(d)["prompts"]
    x, y = clicks[1].slices[0].points[0].astype(int)
    assert label[y, x] == 2, "the oracle click on the cup lies in the cup (x = column, y = row)"
    # random prompts are reproducible with the transform's seed
    a = RandRegionPromptd(regions=REGIONS, box_jitter=5).set_random_state(7)(d)["prompts"]
    b = RandRegionPromptd(regions=REGIONS, box_jitter=5).set_random_state(7)(d)["prompts"]
    np.testing.assert_array_equal(a[0].slices[0].box, b[0].slices[0].box)
    no_cup = {"label": torch.from_numpy(np.where(label == 2, 1, label))[None]}
    with pytest.raises(ValueError, match="region 2 .* is absent"):
        RegionPromptd(regions=REGIONS)(no_cup)


def test_crop_around_the_disc_from_label_or_prompts_and_back():
    image, label = _photo(2, 256)
    d = {"image": torch.from_numpy(image).permute(2, 0, 1), "label": torch.from_numpy(label)[None]}
    crop = CropAroundRegiond(["image", "label"], region=[1, 2], scale=2.5, min_size=16)
    out = crop(d)
    r0, c0, r1, c1 = out["roi"]
    ii, jj = np.nonzero(label > 0)
    extent = max(ii.max() - ii.min() + 1, jj.max() - jj.min() + 1)
    assert abs((r1 - r0) - round(2.5 * extent)) <= 1 and out["roi_source_shape"] == [256, 256]
    assert out["label"].shape == (1, r1 - r0, c1 - c0) and int((out["label"] > 0).sum()) == len(ii)
    np.testing.assert_array_equal(np.asarray(out["image"]), image.transpose(2, 0, 1)[:, r0:r1, c0:c1])
    # the same window from the disc's box prompt (inference), prompts moved into the window
    box = np.array([jj.min(), ii.min(), jj.max(), ii.max()], np.float32)
    p = {"image": d["image"], "prompts": [ObjectPrompts(1, slices=[SlicePrompt(0, box=box)])]}
    outp = CropAroundRegiond(["image", "label"], scale=2.5, min_size=16, allow_missing_keys=True)(p)
    assert outp["roi"] == out["roi"] and outp["image"].shape == out["image"].shape
    np.testing.assert_array_equal(outp["prompts"][0].slices[0].box, box - [c0, r0, c0, r0])
    # inverse: back to the photograph's size, zeros outside the window
    back = crop.inverse(out)
    assert back["label"].shape == (1, 256, 256) and torch.equal(
        torch.as_tensor(back["label"]).cpu(), torch.from_numpy(label)[None]
    )
    assert CropAroundRegiond(["image"], scale=None)(p)["roi"] == [0, 0, 256, 256]
    with pytest.raises(ValueError, match="no pixel with label"):
        crop({"image": d["image"], "label": torch.zeros(1, 256, 256, dtype=torch.uint8)})


# ---------------------------------------------------------------------------------- recipe and loss


def _fit(net, backbone, learning_rates, loss, tmp_path, epochs=1):
    items = [_sample(seed) for seed in range(2)]
    cache = FeatureCache(tmp_path / "cache", encoder_identity("tiny", net.image_encoder, S))
    opt = torch.optim.AdamW(trainable_param_groups(backbone, learning_rates, weight_decay=0.01))
    trainer = FrozenEncoderTrainer(
        "cpu",
        epochs,
        DataLoader(items, batch_size=2, collate_fn=collate_as_list),
        net,
        opt,
        loss_function=loss,
        feature_cache=cache,
    )
    losses = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"]))
    )
    trainer.run()
    return losses, cache


def _changed(before: dict, model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("lambda_iou", [1.0, 0.0])
def test_sam_recipe_trains_the_mask_decoder_only(tmp_path, lambda_iou):
    """Image and prompt encoders frozen, mask decoder trained; its IoU head only with the IoU term."""
    torch.manual_seed(0)
    sam = tiny_sam()
    net = SamImageSegmenter(sam)
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    losses, cache = _fit(
        net, sam, {"mask_decoder": 1e-3}, MaskPredictionLoss(lambda_iou=lambda_iou), tmp_path
    )
    assert all(np.isfinite(losses)) and cache.stats.misses == 2
    grads = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith("mask_decoder.") for n in grads)
    changed = _changed(before, sam)
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.")) for k in changed)
    decoder = {k for k in changed if k.startswith("mask_decoder.")}
    iou_head = {k for k in decoder if k.startswith("mask_decoder.iou_prediction_head.")}
    assert decoder - iou_head, "the mask decoder trained"
    if lambda_iou > 0:
        assert iou_head, "the IoU head trains with the IoU term"
    else:
        assert not iou_head and all(p.grad is None for p in sam.mask_decoder.iou_prediction_head.parameters())


def test_sam2_recipe_trains_the_mask_decoder_only_through_the_cache(sam2, tmp_path):
    model = build_sam2_model("sam2.1_hiera_t", image_size=S)
    model.load_state_dict(sam2.state_dict())
    net = Sam2ImageSegmenter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses, cache = _fit(net, model, {"mask_decoder": 1e-3}, MaskPredictionLoss(), tmp_path, epochs=2)
    assert all(np.isfinite(losses)) and len(losses) == 2
    assert cache.stats.misses == 2 and cache.stats.hits == 2, (
        "epoch 2 reads the encoder's features from the cache"
    )
    changed = _changed(before, model)
    assert changed and all(k.startswith("sam_mask_decoder.") for k in changed)
    kwargs, target = net.training_inputs(_sample(0))
    assert kwargs["output_size"] == (S // 4, S // 4) and target.shape == (2, 1, S // 4, S // 4)


def test_mask_prediction_loss_terms():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1.0
    good = (target * 2 - 1) * 20.0  # confident and right
    bad = -good
    loss = MaskPredictionLoss(lambda_iou=0.0)
    assert float(loss(good, target)) < 0.05 < float(loss(bad, target))
    assert torch.equal(mask_iou(good, target), torch.ones(2, 1)) and torch.equal(
        mask_iou(bad, target), torch.zeros(2, 1)
    )
    # the IoU term: MSE between the predicted and the actual IoU (1 here)
    out = {"logits": good, "iou_predictions": torch.full((2, 1), 0.5)}
    delta = float(MaskPredictionLoss(lambda_iou=1.0)(out, target) - loss(good, target))
    assert delta == pytest.approx(0.25, abs=1e-5)
    # SAM2's object score: BCE towards "present"
    scored = {"logits": good, "object_score_logits": torch.full((2, 1), -2.0)}
    delta = float(MaskPredictionLoss(lambda_iou=0.0)(scored, target) - loss(good, target))
    assert delta == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(2.0))), abs=1e-5)
    assert float(MaskPredictionLoss(lambda_object=0.0)(scored, target)) == pytest.approx(
        float(loss(good, target))
    )
    with pytest.raises(ValueError, match="differ in shape"):
        loss(good, target[:, :, :4])
    with pytest.raises(ValueError, match=">= 0"):
        MaskPredictionLoss(lambda_dice=-1)
