"""Prompt-free heads (AutoSAM, CNN, linear) on a frozen SAM2 / SAM encoder, their training and slice inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from monai_sam.engines.checkpoint import trained_weights
from monai_sam.inferers import PromptFreeSliceInferer
from monai_sam.networks import (
    HEADS,
    PromptFreeSamSegmenter,
    build_prompt_free_segmenter,
    build_sam2_model,
)
from monai_sam.transforms import SamInput

SIZE = 128


@pytest.fixture(scope="module")
def sam2():
    torch.manual_seed(0)
    return build_sam2_model("sam2.1_hiera_t", image_size=SIZE)


@pytest.fixture(scope="module")
def frames():
    torch.manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE)


@pytest.fixture(scope="module")
def raw(sam2, frames):
    """Encoder outputs of two frames, with every level any head reads."""
    return PromptFreeSamSegmenter(sam2, "autosam", [1]).encode(frames)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("object_ids", [[1], [3, 1, 7]])
def test_every_head_gives_all_classes_in_one_pass(sam2, raw, head, object_ids):
    seg = PromptFreeSamSegmenter(sam2, head, object_ids)
    assert seg.num_classes == len(object_ids) + 1
    feats = {k: raw[k] for k in seg.feature_keys}
    out = seg(None, features=feats, output_size=(100, 90))
    assert out.shape == (2, len(object_ids) + 1, 100, 90)
    assert torch.isfinite(out).all()
    native = seg.head(feats)  # the head's own resolution: stride 4 (AutoSAM), 1 (CNN), 16 (linear)
    assert native.shape[-1] == SIZE // seg.head.output_stride
    assert seg(None, features=feats).shape[-2:] == (SIZE, SIZE)  # default: the model input size


def test_encoder_is_frozen_and_features_round_trip_through_the_cache_format(sam2, frames, raw):
    seg = PromptFreeSamSegmenter(sam2, "autosam", [1, 2])
    assert not any(p.requires_grad for p in seg.image_encoder.parameters())
    assert all(p.requires_grad for p in seg.head.parameters())
    assert seg.feature_keys == (
        "embedding",
        "high_res_0",
        "high_res_1",
    )  # SAM2's decoder uses high-res levels
    assert raw["embedding"].shape == (2, 256, SIZE // 16, SIZE // 16)
    assert raw["high_res_0"].shape == (2, 256, SIZE // 4, SIZE // 4)
    per_frame = seg.split_encoded(raw)
    assert len(per_frame) == 2 and per_frame[0]["embedding"].device.type == "cpu"
    joined = seg.join_encoded(per_frame, "cpu")
    assert all(torch.equal(joined[k], raw[k]) for k in seg.feature_keys)
    seg.train()
    assert not seg.image_encoder.training, "the frozen encoder stays in eval mode"
    seg.eval()
    torch.testing.assert_close(seg(frames), seg(None, features=joined), rtol=1e-4, atol=1e-4)
    # linear / CNN heads read (and cache) the stride-16 embedding only
    lin = PromptFreeSamSegmenter(sam2, "linear", [1, 2])
    assert lin.feature_keys == ("embedding",) and set(lin.encode(frames)) == {"embedding"}
    assert lin.cached_features != seg.cached_features, "cache identities must tell the heads apart"
    with pytest.raises(KeyError, match="cache identity"):
        seg.join_encoded(lin.split_encoded(lin.encode(frames[:1])))


def test_autosam_head_starts_from_the_decoder_of_an_official_format_checkpoint(sam2, tmp_path):
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sam2.state_dict()}, path)  # the official layout
    torch.manual_seed(12345)  # another random init: what matches must come from the file
    seg = build_prompt_free_segmenter(
        "sam2.1_hiera_t", checkpoint=str(path), image_size=SIZE, head="autosam", object_ids=[1, 2, 3, 4, 5]
    )
    sd = torch.load(path, weights_only=True)["model"]
    head = seg.head.state_dict()
    copied = [
        k
        for k in sd
        if k.startswith("sam_mask_decoder.")
        and "mask_tokens" not in k
        and "output_hypernetworks_mlps" not in k
    ]
    assert copied
    for k in copied:  # transformer, upscaling, conv_s0/s1, IoU / object-score heads: as in the file
        assert torch.equal(head["decoder." + k[len("sam_mask_decoder.") :]], sd[k]), k
    tokens = sd["sam_mask_decoder.mask_tokens.weight"]
    assert head["decoder.mask_tokens.weight"].shape == (6, 256)  # background + 5 classes
    for c in range(6):  # class c starts from SAM's output token and hypernetwork MLP c % 4
        assert torch.equal(head["decoder.mask_tokens.weight"][c], tokens[c % 4])
        assert torch.equal(
            head[f"decoder.output_hypernetworks_mlps.{c}.layers.0.weight"],
            sd[f"sam_mask_decoder.output_hypernetworks_mlps.{c % 4}.layers.0.weight"],
        )
    assert torch.equal(head["no_mask_embed.weight"], sd["sam_prompt_encoder.no_mask_embed.weight"])
    assert torch.equal(
        head["pe_layer.positional_encoding_gaussian_matrix"],
        sd["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )
    assert torch.equal(head["no_mem_embed"], sd["no_mem_embed"])
    enc = seg.image_encoder.state_dict()
    assert all(torch.equal(v, sd["image_encoder." + k]) for k, v in enc.items())
    # without a checkpoint the decoder is random: the same comparison fails
    torch.manual_seed(12345)
    rand = build_prompt_free_segmenter("sam2.1_hiera_t", image_size=SIZE, head="autosam", object_ids=[1])
    assert not torch.equal(rand.head.no_mask_embed.weight, sd["sam_prompt_encoder.no_mask_embed.weight"])


def test_autosam_head_on_sam_v1_decoder():
    from monai_sam.networks import build_sam_model

    torch.manual_seed(0)
    sam = build_sam_model("sam_vit_b")
    seg = PromptFreeSamSegmenter(sam, "autosam", [1, 2, 3])
    assert seg.image_size == 1024 and seg.feature_keys == ("embedding",)
    assert torch.equal(seg.head.decoder.mask_tokens.weight[3], sam.mask_decoder.mask_tokens.weight[3])
    assert torch.equal(
        seg.head.decoder.transformer.layers[0].self_attn.q_proj.weight,
        sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight,
    )
    assert seg.head.no_mem_embed is None
    feats = {"embedding": torch.randn(3, 256, 64, 64)}
    out = seg(None, features=feats, output_size=(216, 256))
    assert out.shape == (3, 4, 216, 256)
    # per image: batching images gives the same logits as one at a time
    torch.testing.assert_close(
        out[1:2],
        seg(None, features={"embedding": feats["embedding"][1:2]}, output_size=(216, 256)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_training_inputs_map_label_values_to_classes(sam2):
    seg = PromptFreeSamSegmenter(sam2, "linear", [5, 2])
    label = torch.tensor([[0, 2, 5], [6, 5, 2]], dtype=torch.float32)[None, :, :, None].repeat(1, 1, 1, 3)
    kwargs, target = seg.training_inputs({"label": label})
    assert kwargs == {"output_size": (2, 3)}
    assert target.shape == (3, 1, 2, 3) and target.dtype == torch.long
    assert target[0, 0].tolist() == [[0, 2, 1], [0, 1, 2]]  # 5 -> class 1, 2 -> class 2, 6 -> background
    assert seg.label_from_classes(target[0, 0]).tolist() == [[0, 2, 5], [0, 5, 2]]
    _, one = seg.training_inputs({"label": label[..., 0]})  # one 2D slice
    assert one.shape == (1, 1, 2, 3)
    with pytest.raises(KeyError, match="label"):
        seg.training_inputs({"image": label})


def test_bad_arguments_are_explained(sam2):
    with pytest.raises(ValueError, match="unknown head 'unet'"):
        PromptFreeSamSegmenter(sam2, "unet", [1])
    with pytest.raises(ValueError, match="distinct positive"):
        PromptFreeSamSegmenter(sam2, "linear", [1, 1])
    with pytest.raises(TypeError, match="SAM2Base"):
        PromptFreeSamSegmenter(torch.nn.Linear(2, 2), "linear", [1])
    seg = PromptFreeSamSegmenter(sam2, "linear", [1])
    with pytest.raises(ValueError, match="encoder takes 128 x 128"):
        seg.encode(torch.zeros(1, 3, 64, 64))


def _slices(n=2):
    """Single-slice samples as the bundles' training pipeline gives them: image (3, S, S, 1), label (1, H, W, 1)."""
    from monai_sam.data import make_phantom
    from monai_sam.transforms import MRPercentileScale

    ph = make_phantom("cardiac-mr", 0, shape=(48, 48, 6), spacing=(6.0, 6.0, 8.0))
    img = MRPercentileScale()(torch.as_tensor(ph.image[None], dtype=torch.float32))
    lab = torch.as_tensor(ph.label[None].astype(np.int64))
    ks = np.argsort(-(ph.label > 0).sum(axis=(0, 1)))[:n]
    return [{"image": SamInput(SIZE)(img[..., [k]]), "label": lab[..., [k]]} for k in ks]


def test_frozen_encoder_trainer_trains_only_the_head_with_the_feature_cache(sam2, tmp_path):
    from ignite.engine import Events

    from monai_sam.engines import (
        FeatureCache,
        FrozenEncoderTrainer,
        TrainableCheckpoint,
        encoder_identity,
        trainable_param_groups,
    )
    from monai_sam.engines.prompt_free_evaluator import collate_slices

    torch.manual_seed(0)
    seg = PromptFreeSamSegmenter(sam2, "conv", [1, 2, 3])
    groups = trainable_param_groups(seg, {"head": 1e-3})
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in seg.head.parameters()
    )
    enc_before = {k: v.clone() for k, v in seg.image_encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in seg.head.state_dict().items()}
    cache = FeatureCache(
        tmp_path / "cache",
        encoder_identity("sam2.1_hiera_t", seg.image_encoder, SIZE, {"features": seg.cached_features}),
    )
    losses = []
    loader = DataLoader([_slices()], batch_size=1, collate_fn=collate_slices)
    trainer = FrozenEncoderTrainer(
        "cpu",
        2,
        loader,
        seg,
        torch.optim.AdamW(groups),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        feature_cache=cache,
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"]))
    )
    trainer.run()
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert cache.stats.misses == 2 and cache.stats.hits == 2, "epoch 2 reads both slices from the cache"
    assert all(torch.equal(enc_before[k], v) for k, v in seg.image_encoder.state_dict().items())
    assert any(not torch.equal(head_before[k], v) for k, v in seg.head.state_dict().items())
    # our checkpoint: the head only, refused by another encoder
    ckpt = TrainableCheckpoint(seg, "sam2.1_hiera_t", ["head"])
    state = ckpt.state_dict()
    assert trained_weights(state) and all(k.startswith("head.") for k in trained_weights(state))
    torch.manual_seed(99)
    other = PromptFreeSamSegmenter(build_sam2_model("sam2.1_hiera_t", image_size=SIZE), "conv", [1, 2, 3])
    from monai_sam.engines import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError):
        TrainableCheckpoint(other, "sam2.1_hiera_t", ["head"]).load_state_dict(state)


def test_slice_inferer_resize_mode_matches_the_network_on_each_slice(sam2):
    torch.manual_seed(0)
    seg = PromptFreeSamSegmenter(sam2, "linear", [4, 2]).eval()
    vol = torch.rand(1, 40, 36, 3)
    meta = MetaTensor(
        vol, affine=torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0])), meta={"filename_or_obj": "v.nii.gz"}
    )
    label, probs = PromptFreeSliceInferer(output="both", sw_batch_size=2)(meta, seg)
    assert label.shape == (1, 40, 36, 3) and probs.shape == (3, 40, 36, 3)
    assert isinstance(label, MetaTensor) and label.meta["filename_or_obj"] == "v.nii.gz"
    assert torch.allclose(label.affine, meta.affine)
    assert set(np.unique(label.numpy()).tolist()) <= {0, 2, 4}
    torch.testing.assert_close(probs.sum(0).as_tensor(), torch.ones(40, 36, 3), rtol=1e-5, atol=1e-5)
    k = 1  # the same slice through SamInput and the network directly
    frames = SamInput(SIZE)(vol[..., [k]]).permute(3, 0, 1, 2)
    with torch.no_grad():
        direct = torch.softmax(seg(frames, output_size=(40, 36)), 1)[0]
    torch.testing.assert_close(probs[..., k].as_tensor(), direct, rtol=1e-4, atol=1e-4)
    batched = PromptFreeSliceInferer()(vol[None], seg)
    assert batched.shape == (1, 1, 40, 36, 3) and torch.equal(batched[0], label.as_tensor())


def test_slice_inferer_window_mode_blends_native_resolution_windows(sam2):
    torch.manual_seed(0)
    seg = PromptFreeSamSegmenter(sam2, "linear", [1]).eval()
    # two windows side by side without overlap: each half is exactly one native-resolution window
    vol = torch.rand(1, 128, 256, 1)
    probs = PromptFreeSliceInferer(mode="window", overlap=0.0, output="probabilities")(vol, seg)
    assert probs.shape == (2, 128, 256, 1)
    for j0 in (0, 128):
        frames = SamInput(SIZE)(vol[:, :, j0 : j0 + 128]).permute(3, 0, 1, 2)
        with torch.no_grad():
            window = torch.softmax(seg(frames), 1)[0]
        torch.testing.assert_close(probs[:, :, j0 : j0 + 128, 0], window, rtol=1e-4, atol=1e-4)
    # larger than the input in both directions, overlapping windows: blended probabilities
    big = torch.rand(1, 160, 140, 1)
    probs = PromptFreeSliceInferer(mode="window", overlap=0.25, output="probabilities")(big, seg)
    assert probs.shape == (2, 160, 140, 1)
    torch.testing.assert_close(probs.sum(0), torch.ones(160, 140, 1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="mode must be"):
        PromptFreeSliceInferer(mode="tiles")
    with pytest.raises(TypeError, match="PromptFreeSamSegmenter"):
        PromptFreeSliceInferer()(big, torch.nn.Identity())
