"""Sam2VolumeSegmenter and MemoryPropagationInferer: feature split, chunking, training path, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_sam.inferers import LabelAccumulator, MemoryPropagationInferer, logits_to_label, propagate_to_label
from monai_sam.networks import (
    NO_OBJ_SCORE,
    Sam2VolumeSegmenter,
    VolumeFrames,
    build_sam2_model,
    freeze_image_encoder,
)
from monai_sam.networks.sam2_volume import frames_from_sam_input
from monai_sam.prompts import ObjectPrompts, PromptError, SlicePrompt
from monai_sam.transforms import SamInput

S, H, W, T = 128, 80, 72, 5  # non-square original slices: x (columns) and y (rows) cannot be swapped silently


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sam2_model("sam2.1_hiera_t", image_size=S)


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    """(1, H, W, T) in [0, 1]: a bright disc drifting across slices."""
    yy, xx = np.mgrid[:H, :W]
    vol = np.full((1, H, W, T), 0.1, np.float32)
    for t in range(T):
        vol[0, ..., t] += 0.8 * (((yy - 30 - 2 * t) ** 2 + (xx - 25 - t) ** 2) < 15**2)
    return torch.from_numpy(vol)


@pytest.fixture(scope="module")
def frames(volume) -> torch.Tensor:
    return frames_from_sam_input(SamInput(S)(volume)).contiguous()


@pytest.fixture(scope="module")
def reference(model, volume, frames) -> torch.Tensor:
    """Logits of both objects, slices encoded one at a time (the baseline the variants must match)."""
    seg = Sam2VolumeSegmenter(model, encoder_batch_size=1)
    logits = seg.propagate(frames, _prompts(volume), (H, W))
    assert seg.last_encoded_slices <= T + 3  # each slice encoded about once, not once per object
    return logits


def _prompts(volume) -> list[ObjectPrompts]:
    return [
        ObjectPrompts(1, "box", [SlicePrompt(2, box=[10, 15, 40, 45])]),
        ObjectPrompts(2, "mask", [SlicePrompt(3, mask=volume[0, ..., 3].numpy() > 0.5)]),
    ]


def test_raw_encoder_outputs_are_separate_from_the_trainable_projections(model, frames):
    seg = Sam2VolumeSegmenter(model)
    x = frames[:2]
    with torch.no_grad():
        raw = seg.encode(x)
        prepared = seg.prepare_features(raw)
        reference = model.forward_image(x)
    for a, b in zip(prepared["backbone_fpn"], reference["backbone_fpn"], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # raw outputs are the image encoder's own (256 channels at every level), not projected
    assert [f.shape[1] for f in raw["backbone_fpn"]] == [256, 256, 256]
    assert [f.shape[1] for f in prepared["backbone_fpn"]] == [32, 64, 256]
    # changing conv_s0 (trainable, decoder side) changes prepared, never raw features
    other = build_sam2_model("sam2.1_hiera_t", image_size=S)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.sam_mask_decoder.conv_s0.weight.mul_(2.0)
        seg2 = Sam2VolumeSegmenter(other)
        raw2 = seg2.encode(x)
        assert torch.equal(raw2["backbone_fpn"][0], raw["backbone_fpn"][0])
        assert not torch.allclose(seg2.prepare_features(raw2)["backbone_fpn"][0], prepared["backbone_fpn"][0])


def test_chunking_cached_features_and_lazy_preprocessing_give_the_same_logits(
    model, volume, frames, reference
):
    prompts = _prompts(volume)
    ref = reference
    assert ref.shape == (2, T, H, W)
    chunked = Sam2VolumeSegmenter(model, encoder_batch_size=4).propagate(frames, prompts, (H, W))
    assert torch.allclose(chunked, ref, atol=1e-4)
    # objects sharing a key slice are tracked as one batch; one at a time gives the same logits
    shared = [
        ObjectPrompts(1, "box", [SlicePrompt(2, box=[10, 15, 40, 45])]),
        ObjectPrompts(2, "clicks", [SlicePrompt(2, points=[[30, 35]])]),
    ]
    batched = Sam2VolumeSegmenter(model, object_batch_size=None).propagate(frames, shared, (H, W))
    single = Sam2VolumeSegmenter(model, object_batch_size=1).propagate(frames, shared, (H, W))
    assert torch.allclose(batched, single, atol=1e-4)
    assert torch.allclose(batched[0], ref[0], atol=1e-4)
    with torch.no_grad():
        cache = Sam2VolumeSegmenter(model).encode(frames)
    cached = Sam2VolumeSegmenter(model).propagate(None, prompts, (H, W), features=cache)
    assert torch.allclose(cached, ref, atol=1e-4)
    assert not torch.allclose(cached[0], cached[1], atol=1e-2)  # the two objects really differ
    lazy = Sam2VolumeSegmenter(model, encoder_batch_size=4).propagate(
        VolumeFrames(volume, SamInput(S)), prompts
    )
    assert torch.allclose(lazy, ref, atol=1e-4)
    # the mask-prompted key slice reproduces the mask (SAM2 uses a given mask as the output)
    mask = torch.from_numpy(prompts[1].slices[0].mask)
    pred = ref[1, 3] > 0
    assert (pred & mask).sum() / (pred | mask).sum() > 0.9


def test_output_size_and_directions(model, volume, frames):
    prompts = _prompts(volume)[:1]
    seg = Sam2VolumeSegmenter(model)
    both = seg.propagate(frames, prompts, (H, W), output_size=(S, S))
    assert both.shape == (1, T, S, S)
    fwd = seg.propagate(frames, prompts, (H, W), direction="forward")
    assert (fwd[0, :2] == NO_OBJ_SCORE).all() and (fwd[0, 2:] > NO_OBJ_SCORE).any()
    bwd = seg.propagate(frames, prompts, (H, W), direction="backward")
    assert (bwd[0, 3:] == NO_OBJ_SCORE).all()
    with pytest.raises(ValueError, match="direction"):
        seg.propagate(frames, prompts, (H, W), direction="sideways")


def test_training_path_has_gradients_and_matches_inference_in_eval(model, volume, frames, reference):
    prompts = _prompts(volume)
    seg = Sam2VolumeSegmenter(model, memory_dtype=None)  # float32 memory, as the training path keeps
    with torch.no_grad():
        cache = seg.encode(frames)  # a frozen encoder's cache
    model.eval()
    with torch.no_grad():
        out = seg(None, prompts, (H, W), features=cache)
    assert out["logits"].shape == (2, T, H, W) and out["object_score_logits"].shape == (2, T)
    # float32 memory vs the reference's bf16 memory (as the video predictor stores it): close
    assert (out["logits"] - reference).abs().max() < 5e-2
    assert ((out["logits"] > 0) == (reference > 0)).float().mean() > 0.99

    trainee = build_sam2_model("sam2.1_hiera_t", image_size=S, mode="train")
    trainee.load_state_dict(model.state_dict())
    freeze_image_encoder(trainee).train()
    seg_t = Sam2VolumeSegmenter(trainee)
    out = seg_t(frames, prompts, (H, W), output_size=(32, 32))
    assert out["logits"].shape == (2, T, 32, 32) and out["logits"].requires_grad
    target = torch.zeros_like(out["logits"])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"].clamp(-20, 20), target)
    loss.backward()
    assert trainee.sam_mask_decoder.conv_s0.weight.grad is not None  # decoder-side projection trains
    assert (
        trainee.memory_attention.layers[0].cross_attn_image.q_proj.weight.grad.abs().sum() > 0
    )  # memory path
    assert trainee.memory_encoder.out_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in trainee.image_encoder.parameters())


@pytest.mark.parametrize(
    "bad, message",
    [
        ([ObjectPrompts(1, "liver", [SlicePrompt(1, box=[100, 10, 120, 30])])], "outside the 72x80"),
        ([ObjectPrompts(1, "liver", [SlicePrompt(1, points=[[10, 95]])])], "outside the 72x80"),
        (
            [ObjectPrompts(1, "liver", [SlicePrompt(T, box=[10, 10, 30, 30])])],
            f"key slice {T} is out of range",
        ),
        ([], "no object has a prompt"),
        ([ObjectPrompts(1, "liver", [])], "liver.*no prompted slice"),
        ([ObjectPrompts(1, "liver", [SlicePrompt(1, box=[10, 10, 10, 30])])], "zero or negative area"),
        (
            [ObjectPrompts(1, "liver", [SlicePrompt(1, mask=np.ones((W, H), bool))])],
            r"mask prompt has shape \(72, 80\)",
        ),
    ],
)
def test_bad_prompts_are_clear_errors(model, frames, bad, message):
    with pytest.raises(PromptError, match=message):
        Sam2VolumeSegmenter(model).propagate(frames, bad, (H, W))


def test_frames_of_the_wrong_size_are_refused(model, volume):
    wrong = frames_from_sam_input(SamInput(S // 2)(volume))
    with pytest.raises(ValueError, match=f"SamInput\\(image_size={S}\\)"):
        Sam2VolumeSegmenter(model).propagate(wrong, _prompts(volume)[:1], (H, W))


def test_logits_to_label_takes_the_most_confident_object():
    logits = torch.tensor([[2.0, 3.0, -1.0, NO_OBJ_SCORE], [5.0, 1.0, -2.0, 0.5]])
    assert logits_to_label(logits, [4, 7]).tolist() == [7.0, 4.0, 0.0, 7.0]
    assert logits_to_label(logits, [4, 7], threshold=2.5).tolist() == [7.0, 4.0, 0.0, 0.0]


def test_inferer_both_input_modes(model, volume, frames, reference):
    prompts = _prompts(volume)
    seg = Sam2VolumeSegmenter(model)
    expected = logits_to_label(reference.permute(0, 2, 3, 1), [1, 2])

    # memory-bounded mode: [0, 1] volume at its own size, SamInput applied per chunk
    image = MetaTensor(volume.clone(), meta={"filename_or_obj": "case.nii.gz"})
    label, probs = MemoryPropagationInferer(preprocess=SamInput(S), return_probabilities=True)(
        image, seg, prompts
    )
    assert isinstance(label, MetaTensor) and label.shape == (1, H, W, T) and probs.shape == (2, H, W, T)
    assert label.meta["filename_or_obj"] == "case.nii.gz"
    ref_probs = torch.sigmoid(reference).masked_fill(reference <= NO_OBJ_SCORE, 0).permute(0, 2, 3, 1)
    assert torch.allclose(probs, ref_probs, atol=1e-4)
    # random weights leave many logits near 0 or near a tie: labels agree up to those pixels
    assert (label.as_tensor()[0] == expected).float().mean() > 0.99
    assert set(torch.unique(label).tolist()) <= {0.0, 1.0, 2.0}

    # bundle mode: inputs already through SamInput (3, S, S, T); label at S x S; original size from meta
    sam_input = SamInput(S)(MetaTensor(volume.clone()))
    batched = sam_input[None]
    label_s, probs = MemoryPropagationInferer(return_probabilities=True)(batched, model, prompts)
    assert label_s.shape == (1, 1, S, S, T) and probs.shape == (1, 2, S, S, T)
    assert 0.0 <= float(probs.min()) and float(probs.max()) <= 1.0
    # the same logits as the original-size run, only resized to S x S (prompts scaled from H x W)
    at_s = seg.propagate(frames, prompts, (H, W), output_size=(S, S)).permute(0, 2, 3, 1)
    assert (label_s[0, 0].as_tensor() == logits_to_label(at_s, [1, 2])).float().mean() > 0.99
    assert torch.allclose(probs[0], torch.sigmoid(at_s).masked_fill(at_s <= NO_OBJ_SCORE, 0), atol=1e-4)

    with pytest.raises(PromptError, match="no prompts"):
        MemoryPropagationInferer()(batched, seg)
    with pytest.raises(ValueError, match="one volume at a time"):
        MemoryPropagationInferer()(torch.cat([batched, batched]), seg, prompts)


def test_a_sink_gets_every_slice_once_and_the_running_argmax_is_the_label(model, volume, frames, reference):
    """Streaming slices to a sink gives the collected logits; LabelAccumulator their argmax."""
    prompts = _prompts(volume)  # two objects with different key slices: two cohorts, two starts
    seg = Sam2VolumeSegmenter(model, encoder_batch_size=1)
    got = torch.full_like(reference, float("nan"))
    calls: list[tuple[int, int]] = []

    def sink(rows: list[int], f: int, logits: torch.Tensor) -> None:
        assert logits.shape == (len(rows), H, W)
        calls.extend((r, f) for r in rows)
        got[rows, f] = logits

    assert seg.propagate(frames, prompts, (H, W), sink=sink) is None
    assert sorted(calls) == [(r, f) for r in range(2) for f in range(T)]  # each once, key slices too
    assert torch.equal(got, reference)

    # one direction: the slices the pass does not reach are not delivered
    calls.clear()
    seg.propagate(frames, prompts, (H, W), direction="forward", sink=sink)
    assert sorted(calls) == [(0, f) for f in range(2, T)] + [(1, f) for f in range(3, T)]

    acc = LabelAccumulator([4, 9], T, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="no slice"):
        acc.label()
    seg.propagate(frames, prompts, (H, W), sink=acc)
    expected = logits_to_label(reference.permute(0, 2, 3, 1), [4, 9])
    assert torch.equal(acc.label(), expected) and {4.0, 9.0} <= set(expected.unique().tolist())
    cut = float(reference.median())
    relabeled = [ObjectPrompts(i, p.name, p.slices) for i, p in zip([4, 9], prompts, strict=True)]
    high = propagate_to_label(seg, frames, relabeled, cut, torch.float32, original_size=(H, W))
    assert torch.equal(high, logits_to_label(reference.permute(0, 2, 3, 1), [4, 9], cut))
    # from cached encoder outputs instead of frames: the same label
    with torch.no_grad():
        raw = seg.encode(frames)
    cached = propagate_to_label(seg, None, relabeled, cut, torch.float32, features=raw, original_size=(H, W))
    assert (cached == high).float().mean() > 0.999

    # the inferer's label (running argmax) is the argmax of the logits it would otherwise collect
    inferer = MemoryPropagationInferer(logits_dtype=torch.float32)
    label = inferer(SamInput(S)(MetaTensor(volume.clone())), seg, prompts)
    at_s = seg.propagate(frames, prompts, (H, W), output_size=(S, S)).permute(0, 2, 3, 1)
    assert torch.equal(label.as_tensor()[0], logits_to_label(at_s, [1, 2]))


def test_freed_host_memory_is_handed_back_once_per_encoder_chunk(model, volume, frames, monkeypatch):
    import platform

    import monai_sam.networks.sam2_volume as sam2_volume
    from monai_sam.networks.host_memory import trim_host_memory

    assert trim_host_memory() is (platform.libc_ver()[0] == "glibc")  # nothing to do elsewhere
    calls = []
    monkeypatch.setattr(sam2_volume, "trim_host_memory", lambda: calls.append(1) or True)
    prompts = _prompts(volume)[:1]
    Sam2VolumeSegmenter(model, encoder_batch_size=2).propagate(frames, prompts, (H, W))
    chunks = len(calls)
    assert chunks >= 3  # 5 slices, 2 per chunk, forward and backward from slice 2
    calls.clear()
    Sam2VolumeSegmenter(model, encoder_batch_size=2, release_host_memory=False).propagate(frames, prompts, (H, W))
    assert calls == []


def test_a_single_frame_encodes_no_memory_that_nothing_reads(model, frames):
    """Image mode (T = 1) trains the decoder only: SAM2's memory encoder is not run for it."""
    trainee = build_sam2_model("sam2.1_hiera_t", image_size=S, mode="train")
    trainee.load_state_dict(model.state_dict())
    freeze_image_encoder(trainee).train()
    calls = []
    hook = trainee.memory_encoder.register_forward_hook(lambda *_: calls.append(1))
    seg = Sam2VolumeSegmenter(trainee)
    prompts = [ObjectPrompts(1, "box", [SlicePrompt(0, box=[10, 15, 40, 45])])]
    try:
        out = seg(frames[2:3], prompts, (H, W))
        assert out["logits"].shape == (1, 1, H, W) and not calls
        out["logits"].clamp(-20, 20).mean().backward()
        assert trainee.sam_mask_decoder.conv_s0.weight.grad is not None
        seg(frames[2:4], prompts, (H, W))  # two frames: the second reads the first's memory
        assert calls
        trainee.eval()
        with torch.no_grad():
            single = seg.propagate(frames[2:3], prompts, (H, W))
        assert single.shape == (1, 1, H, W) and len(calls) == 2  # inference: only the 2-frame call's
    finally:
        hook.remove()
