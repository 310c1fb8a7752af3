"""Builders: official sizes through sam2's configs / segment_anything's registry, safe strict loading."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from monai_sam.networks import (
    MODEL_SIZES,
    CheckpointError,
    build_model,
    build_sam2_model,
    build_sam_model,
    canonical_model_size,
    checkpoint_model_size,
    count_parameters,
    freeze_image_encoder,
    load_checkpoint,
    read_state_dict,
    sam2_hydra_overrides,
)
from monai_sam.networks.builders import RANDOM_INIT_WARNING, _compose_guard

SAM2_SIZES = [n for n, s in MODEL_SIZES.items() if s.family == "sam2"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_sam2_model("sam2.1_hiera_t", image_size=128)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": tiny.state_dict()}, path)  # the official layout
    return path


def test_every_official_size_resolves_with_the_requested_image_size():
    """All 8 SAM2 sizes compose from sam2's packaged configs; size-dependent keys follow image_size."""
    from hydra import compose

    _compose_guard()
    expected_dims = {
        "t": (96, [1, 2, 7, 2]),
        "s": (96, [1, 2, 11, 2]),
        "b+": (112, None),
        "l": (144, [2, 6, 36, 4]),
    }
    for name in SAM2_SIZES:
        cfg = compose(config_name=MODEL_SIZES[name].config, overrides=sam2_hydra_overrides(512))
        assert cfg.model.image_size == 512, name
        assert list(cfg.model.memory_attention.layer.self_attention.feat_sizes) == [32, 32], name
        assert list(cfg.model.memory_attention.layer.cross_attention.feat_sizes) == [32, 32], name
        dim, stages = expected_dims[name.rsplit("_", 1)[1]]
        assert cfg.model.image_encoder.trunk.embed_dim == dim, name
        if stages is not None:
            assert list(cfg.model.image_encoder.trunk.stages) == stages, name
        assert ("no_obj_embed_spatial" in cfg.model) == name.startswith("sam2.1"), name


@pytest.mark.parametrize("image_size", [256, 512])
def test_image_size_reaches_prompt_encoder_and_rope(image_size):
    from sam2.modeling.position_encoding import compute_axial_cis

    model = build_sam2_model("sam2.1_hiera_t", image_size=image_size)
    feat = image_size // 16
    assert model.image_size == image_size
    assert model.sam_prompt_encoder.image_embedding_size == (feat, feat)
    assert model.sam_prompt_encoder.mask_input_size == (4 * feat, 4 * feat)
    attn = model.memory_attention.layers[0].cross_attn_image
    expected = compute_axial_cis(
        dim=attn.internal_dim // attn.num_heads, end_x=feat, end_y=feat, theta=10000.0
    )
    assert attn.freqs_cis.shape == expected.shape == (feat * feat, expected.shape[1])
    assert torch.allclose(attn.freqs_cis.cpu(), expected)
    with torch.no_grad():
        out = model.image_encoder(torch.zeros(1, 3, image_size, image_size))
    assert out["vision_features"].shape[-2:] == (feat, feat)
    # the memory attention runs at that size and keeps the right frequencies
    x = torch.randn(feat * feat, 1, 256)
    mem = torch.randn(2 * feat * feat, 1, 64)
    with torch.no_grad():
        model.memory_attention(curr=[x], curr_pos=[x], memory=mem, memory_pos=mem, num_obj_ptr_tokens=0)
    assert torch.allclose(attn.freqs_cis.cpu(), expected)


def test_bad_names_and_sizes():
    with pytest.raises(ValueError, match="unknown model size 'sam2_hiera_xl'.*sam2.1_hiera_t"):
        build_sam2_model("sam2_hiera_xl")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sam2_model("sam2.1_hiera_t", image_size=200)
    with pytest.raises(ValueError, match="SAM v1 model"):
        build_sam2_model("sam_vit_b")
    with pytest.raises(ValueError, match="1024 px only"):
        build_model("vit_b", image_size=512)
    assert canonical_model_size("vit_h") == "sam_vit_h"


def test_random_init_is_said_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="monai_sam"):
        build_sam2_model("sam2_hiera_t", image_size=128)
    assert any(RANDOM_INIT_WARNING in r.message and r.levelno == logging.WARNING for r in caplog.records)


def test_official_checkpoint_round_trip(tiny, tiny_ckpt, caplog):
    with caplog.at_level(logging.WARNING, logger="monai_sam"):
        other = build_sam2_model("sam2.1_hiera_t", checkpoint=tiny_ckpt, image_size=128)
    assert not any(RANDOM_INIT_WARNING in r.message for r in caplog.records)
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), other.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert checkpoint_model_size(read_state_dict(tiny_ckpt)) == "sam2.1_hiera_t"


def test_checkpoint_of_another_size_names_both(tiny_ckpt):
    with pytest.raises(CheckpointError, match=r"built as sam2.1_hiera_s.*looks like sam2.1_hiera_t"):
        build_sam2_model("sam2.1_hiera_s", checkpoint=tiny_ckpt, image_size=128)
    with pytest.raises(CheckpointError, match=r"built as sam2_hiera_t.*looks like sam2.1_hiera_t"):
        build_sam2_model("sam2_hiera_t", checkpoint=tiny_ckpt, image_size=128)


def test_missing_or_mismatched_keys_are_reported(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd.pop("sam_mask_decoder.conv_s0.weight")
    path = tmp_path / "broken.pt"
    torch.save({"model": sd}, path)
    model = build_sam2_model("sam2.1_hiera_t", image_size=128)
    with pytest.raises(CheckpointError, match=r"broken.pt: does not fit sam2.1_hiera_t.*conv_s0"):
        load_checkpoint(model, path, "sam2.1_hiera_t")


def test_unsafe_or_unreadable_files_are_refused(tmp_path):
    pickled = tmp_path / "pickle.pt"
    torch.save({"model": argparse.Namespace(code="arbitrary objects need a full unpickle")}, pickled)
    with pytest.raises(CheckpointError, match="pickle.pt: cannot be read as a weights-only"):
        read_state_dict(pickled)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        read_state_dict(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    opt = tmp_path / "optimizer.pt"
    torch.save({"step": torch.tensor(3)}, opt)
    with pytest.raises(
        CheckpointError, match=r"optimizer.pt: .*built as sam2.1_hiera_t.*looks like an unknown model"
    ):
        build_sam2_model("sam2.1_hiera_t", checkpoint=opt, image_size=128)


def test_sam_v1_bare_and_wrapped_state_dicts(tmp_path, tiny_ckpt):
    """SAM v1 files are a bare state dict; {"model": ...} is accepted too. 1024 px (registry)."""
    torch.manual_seed(0)
    sam = build_sam_model("vit_b")
    assert sam.image_encoder.img_size == 1024
    bare, wrapped = tmp_path / "sam_vit_b_01ec64.pth", tmp_path / "wrapped.pth"
    torch.save(sam.state_dict(), bare)
    torch.save({"model": sam.state_dict()}, wrapped)
    again = build_sam_model("sam_vit_b", checkpoint=bare)
    assert torch.equal(
        again.mask_decoder.iou_prediction_head.layers[0].weight,
        sam.mask_decoder.iou_prediction_head.layers[0].weight,
    )
    with torch.no_grad():
        again.mask_decoder.iou_prediction_head.layers[0].weight.zero_()
    load_checkpoint(again, wrapped, "vit_b")
    assert torch.equal(
        again.mask_decoder.iou_prediction_head.layers[0].weight,
        sam.mask_decoder.iou_prediction_head.layers[0].weight,
    )
    with pytest.raises(CheckpointError, match=r"built as sam_vit_b.*looks like sam2.1_hiera_t"):
        build_sam_model("vit_b", checkpoint=tiny_ckpt)
    # the signature of the other SAM v1 sizes (built models would take ~3 GB: shapes suffice)
    for dim, name in ((1024, "sam_vit_l"), (1280, "sam_vit_h")):
        assert (
            checkpoint_model_size({"image_encoder.patch_embed.proj.weight": torch.zeros(dim, 3, 16, 16)})
            == name
        )


def test_freeze_image_encoder_keeps_decoder_projections_trainable():
    model = freeze_image_encoder(build_sam2_model("sam2.1_hiera_t", image_size=128))
    assert all(not p.requires_grad for p in model.image_encoder.parameters())
    assert model.sam_mask_decoder.conv_s0.weight.requires_grad
    assert model.memory_attention.layers[0].self_attn.q_proj.weight.requires_grad
    assert 0 < count_parameters(model, trainable_only=True) < count_parameters(model)


def test_memory_attention_dropout_reaches_every_layer_and_attention(tiny):
    def dropouts(model):
        attn = model.memory_attention
        return ([m.p for m in attn.modules() if isinstance(m, torch.nn.Dropout)]
                + [m.dropout_p for m in attn.modules() if hasattr(m, "dropout_p")])

    assert set(dropouts(tiny)) == {0.1}  # sam2's config
    quiet = build_sam2_model("sam2.1_hiera_t", image_size=128, mode="train", memory_attention_dropout=0.0)
    assert len(dropouts(quiet)) == len(dropouts(tiny)) and set(dropouts(quiet)) == {0.0}
