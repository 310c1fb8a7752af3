"""Propagation that stops where the object ends (`Sam2VolumeSegmenter(stop_after_absent=K)`).

SAM2's object score is what the early stop reads; a random model's scores say nothing, so these
tests script them per slice (the frame step runs for real, then its score and mask are set as a
trained model would give them on a volume where the object spans slices 3-7): absent on 8-9,
then "present" again on 10-11, the over-propagation onto a neighbour the option is for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_sam.inferers import MemoryPropagationInferer
from monai_sam.networks import NO_OBJ_SCORE, Sam2VolumeSegmenter, build_sam2_model
from monai_sam.networks.sam2_volume import frames_from_sam_input
from monai_sam.prompts import ObjectPrompts, SlicePrompt
from monai_sam.transforms import SamInput

S, H, W, T = 128, 64, 64, 12
ORGAN = range(3, 8)  # the object's true slices
NEIGHBOUR = range(10, 12)  # where a model that keeps going picks up something else


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    torch.manual_seed(0)
    return frames_from_sam_input(SamInput(S)(torch.rand(1, H, W, T)))


def scripted(seg: Sam2VolumeSegmenter, present_on: dict[int, set[int]]) -> list[int]:
    """Script the object score (and mask) of each object row per slice; returns the slices stepped."""
    real = seg._step
    stepped: list[int] = []

    def step(frame_idx, is_cond, *args, **kwargs):
        out = real(frame_idx, is_cond, *args, **kwargs)
        if is_cond:
            return out
        stepped.append(int(frame_idx))
        rows = out["pred_masks"].shape[0]
        here = torch.tensor([frame_idx in present_on[r] for r in range(rows)])
        out["object_score_logits"] = torch.where(here, 5.0, -5.0).reshape(rows, 1)
        masks = torch.full_like(out["pred_masks"], NO_OBJ_SCORE)
        masks[here, :, 8:24, 8:24] = 10.0  # SAM2 empties the mask of an absent object
        out["pred_masks"] = masks
        return out

    seg._step = step
    return stepped


def labelled_slices(logits: torch.Tensor, row: int = 0) -> list[int]:
    return [int(t) for t in torch.nonzero((logits[row] > 0).flatten(1).any(1)).flatten()]


def box(k: int = 5) -> SlicePrompt:
    return SlicePrompt(k, box=[10, 10, 40, 40])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sam2_model("sam2.1_hiera_t", image_size=S)


def test_without_the_option_propagation_runs_to_both_ends(model, frames):
    seg = Sam2VolumeSegmenter(model)
    stepped = scripted(seg, {0: set(ORGAN) | set(NEIGHBOUR)})
    logits = seg.propagate(frames, [ObjectPrompts(1, "organ", [box()])], (H, W))
    assert sorted(stepped) == [f for f in range(T) if f != 5]
    assert labelled_slices(logits) == [*ORGAN, *NEIGHBOUR]  # what the video predictor does
    assert seg.last_frame_steps == T - 1


@pytest.mark.parametrize("k", [1, 2])
def test_a_pass_ends_after_k_absent_slices_and_nothing_beyond_is_labelled(model, frames, k):
    seg = Sam2VolumeSegmenter(model, stop_after_absent=k)
    stepped = scripted(seg, {0: set(ORGAN) | set(NEIGHBOUR)})
    logits = seg.propagate(frames, [ObjectPrompts(1, "organ", [box()])], (H, W))
    forward = list(range(6, 8 + k))  # the organ's slices, then k absent ones
    backward = list(range(4, 3 - k - 1, -1))
    assert stepped == forward + backward
    assert seg.last_frame_steps == len(forward) + len(backward)
    assert labelled_slices(logits) == list(ORGAN)  # the neighbour on 10-11 is never reached
    assert (logits[0, 8 + k :] == NO_OBJ_SCORE).all()


def test_a_later_key_slice_restarts_the_pass(model, frames):
    seg = Sam2VolumeSegmenter(model, stop_after_absent=2)
    stepped = scripted(seg, {0: set(ORGAN) | set(NEIGHBOUR)})
    prompts = [ObjectPrompts(1, "organ", [box(5), box(10)])]
    logits = seg.propagate(frames, prompts, (H, W))
    assert 11 in stepped  # after the key slice on 10 the object is followed again
    assert 10 in labelled_slices(logits) or (logits[0, 10] > NO_OBJ_SCORE).any()
    assert 11 in labelled_slices(logits)


def test_one_stopped_object_is_blanked_while_its_batch_goes_on(model, frames):
    prompts = [ObjectPrompts(1, "ends", [box()]), ObjectPrompts(2, "long", [box()])]
    present = {0: set(ORGAN) | set(NEIGHBOUR), 1: set(range(T))}
    free = Sam2VolumeSegmenter(model, object_batch_size=None)
    scripted(free, present)
    reference = free.propagate(frames, prompts, (H, W))
    seg = Sam2VolumeSegmenter(model, object_batch_size=None, stop_after_absent=2)
    stepped = scripted(seg, present)
    logits = seg.propagate(frames, prompts, (H, W))
    assert sorted(stepped) == [f for f in range(T) if f != 5]  # the long object keeps the batch going
    assert labelled_slices(logits, 0) == list(ORGAN)
    assert labelled_slices(reference, 0) == [*ORGAN, *NEIGHBOUR]
    assert torch.equal(logits[1], reference[1])  # the other object's answer is unchanged


def test_the_option_reaches_the_network_through_the_inferer_and_a_call_overrides_it(model, frames):
    volume = torch.rand(1, H, W, T)
    seg = Sam2VolumeSegmenter(model)
    stepped = scripted(seg, {0: set(ORGAN) | set(NEIGHBOUR)})
    label = MemoryPropagationInferer(preprocess=SamInput(S), stop_after_absent=2)(
        volume, seg, [ObjectPrompts(1, "organ", [box()])]
    )
    assert seg.last_frame_steps == len(stepped) == 8
    assert np.flatnonzero(label[0].numpy().any(axis=(0, 1))).tolist() == list(ORGAN)
    stepped.clear()
    seg.stop_after_absent = 1
    seg.propagate(frames, [ObjectPrompts(1, "organ", [box()])], (H, W), stop_after_absent=None)
    assert len(stepped) == T - 1  # the call's None wins over the network's setting


def test_training_ignores_the_option_and_bad_values_are_refused(model, frames):
    with pytest.raises(ValueError, match="stop_after_absent"):
        Sam2VolumeSegmenter(model, stop_after_absent=0)
    seg = Sam2VolumeSegmenter(model, stop_after_absent=1)
    with pytest.raises(ValueError, match="stop_after_absent"):
        seg.propagate(frames, [ObjectPrompts(1, "organ", [box()])], (H, W), stop_after_absent=-3)
    stepped = scripted(seg, {0: set(ORGAN)})
    out = seg(frames, [ObjectPrompts(1, "organ", [box()])], (H, W))
    assert sorted(stepped) == [f for f in range(T) if f != 5]  # the loss sees every slice
    assert out["logits"].shape == (1, T, H, W)
