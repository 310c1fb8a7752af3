"""The interaction protocol (box + corrective clicks): click placement, prompts, AUC, the session."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy.integrate import cumulative_trapezoid

from monai_sam.evaluation.interaction import (
    Click,
    Sam2InteractiveSession,
    box_prompt,
    interaction_auc,
    interaction_prompts,
    mask_scores,
    next_click,
    run_interaction_benchmark,
    simulate_interactions,
    summarize_interactions,
)
from monai_sam.prompts import SlicePrompt

H, W, T = 40, 48, 10


def blank() -> np.ndarray:
    return np.zeros((H, W, T), bool)


def test_a_missed_region_gets_a_positive_click_at_its_centre_on_its_largest_slice():
    truth = blank()
    truth[10:21, 5:30, 2:6] = True  # rows 10-20, columns 5-29
    pred = truth.copy()
    pred[..., 4] = False  # slice 4 missed entirely: 275 voxels
    pred[10:21, 5:20, 5] = False  # slice 5 partly: 165 voxels, joined to slice 4's error in 3D
    pred[30:33, 40:43, 8] = True  # a small false positive elsewhere
    click = next_click(pred, truth)
    assert click == Click(slice_index=4, x=17, y=15, positive=True)


def test_a_false_region_gets_a_negative_click_and_the_largest_component_is_taken_in_3d():
    truth = blank()
    truth[5:15, 5:15, 3:7] = True
    pred = truth.copy()
    pred[25:29, 30:34, 1:5] = True  # false, 4 slices of 4x4 = 64 voxels
    pred[5:15, 5:11, 8] = True  # false, one slice of 10x6 = 60 voxels (larger on its slice)
    click = next_click(pred, truth)
    assert click is not None and not click.positive
    assert 1 <= click.slice_index <= 4 and 30 <= click.x <= 33 and 25 <= click.y <= 28
    assert next_click(truth, truth) is None


def test_the_click_lies_inside_its_region_even_at_the_image_border():
    truth = blank()
    truth[0:6, 0:30, 5] = True  # touches the top border: the border counts as an edge
    click = next_click(blank(), truth)
    assert click is not None and click.positive and truth[click.y, click.x, click.slice_index]
    assert click.y in (2, 3)  # not row 0, which an unpadded distance map would pick


def test_the_box_sits_on_the_middle_or_the_largest_slice():
    truth = blank()
    truth[10:12, 10:12, 2] = True
    truth[5:30, 8:40, 3] = True  # the largest slice
    truth[10:14, 12:20, 6] = True
    truth[10:13, 10:13, 8] = True  # slice range 2-8: middle 5 is empty, 6 is nearest... as is 4
    middle = box_prompt(truth, "middle")
    assert middle.slice_index in (3, 6)
    largest = box_prompt(truth, "largest")
    assert largest.slice_index == 3
    assert largest.box.tolist() == [8.0, 5.0, 39.0, 29.0]
    with pytest.raises(ValueError, match="absent"):
        box_prompt(blank())


def test_clicks_join_the_box_on_its_slice_and_make_their_own_key_slices_elsewhere():
    box = SlicePrompt(4, box=np.array([1, 2, 20, 30], np.float32))
    clicks = [Click(4, 5, 6, True), Click(7, 8, 9, False), Click(4, 10, 11, False)]
    obj = interaction_prompts(box, clicks, object_id=3, name="liver")
    assert obj.key_slices == [4, 7]
    on_box = obj.slices[0]
    assert on_box.kind == "box+clicks"
    assert on_box.points.tolist() == [[5, 6], [10, 11]] and on_box.point_labels.tolist() == [1, 0]
    assert obj.slices[1].kind == "clicks" and obj.slices[1].point_labels.tolist() == [0]


def test_auc_is_the_challenges_trapezoid_over_the_clicks():
    values = [0.5, 0.6, 0.7, 0.8, 0.9]
    assert interaction_auc(values) == pytest.approx(2.8)
    assert interaction_auc(values) == pytest.approx(cumulative_trapezoid(values, np.arange(5))[-1])
    with pytest.raises(ValueError, match="at least 2"):
        interaction_auc([0.4])


def test_scores_of_empty_and_equal_masks():
    truth = blank()
    truth[10:20, 10:20, 3:6] = True
    assert mask_scores(truth, truth, (1.0, 1.0, 2.0)) == (pytest.approx(1.0), pytest.approx(1.0))
    assert mask_scores(blank(), truth, (1.0, 1.0, 2.0)) == (0.0, 0.0)
    shifted = np.roll(truth, 5, axis=0)
    dice, nsd = mask_scores(shifted, truth, (1.0, 1.0, 2.0))
    assert dice == pytest.approx(0.5) and 0 < nsd < 1


def test_the_protocol_clicks_where_a_model_fails_and_the_scores_follow():
    truth = blank()
    truth[8:30, 8:40, 1:10] = True  # slices 1-9: the box on 5, the model sees 4-6

    def segment(prompts):  # a "model" that finds the object only within 1 slice of a prompt
        pred = blank()
        for k in prompts.key_slices:
            lo, hi = max(k - 1, 0), min(k + 2, T)
            pred[..., lo:hi] |= truth[..., lo:hi]
        return pred

    steps = simulate_interactions(segment, truth, (1.0, 1.0, 2.0), 1, "organ", "case0", "toy", num_clicks=5)
    assert [s.interaction for s in steps] == [0, 1, 2, 3, 4, 5]
    assert steps[0].prompt == "box" and steps[0].slice_index == 5
    assert all(s.prompt == "positive click" for s in steps[1:3])
    dice = [s.dice for s in steps]
    assert dice[0] == pytest.approx(0.5) and dice == sorted(dice)
    assert dice[-1] == pytest.approx(1.0)
    done = [s for s in steps if s.prompt == "none"]
    assert done and all(
        s.seconds == 0.0 and s.dice == pytest.approx(1.0) for s in done
    )  # nothing left to fix
    (row,) = summarize_interactions(steps)
    assert row["dice_final"] == pytest.approx(1.0) and row["dice_box"] == pytest.approx(0.5)
    assert row["dsc_auc"] == pytest.approx(interaction_auc(dice[1:]))
    assert row["interactions"] == 6 - len(done)


@pytest.fixture(scope="module")
def network():
    from monai_sam.networks import Sam2VolumeSegmenter, build_sam2_model

    torch.manual_seed(0)
    return Sam2VolumeSegmenter(build_sam2_model("sam2.1_hiera_t", image_size=128)).eval()


def test_the_session_encodes_once_and_each_interaction_only_propagates(network, monkeypatch):
    calls = []
    real = network.encode
    monkeypatch.setattr(network, "encode", lambda frames: calls.append(len(frames)) or real(frames))
    session = Sam2InteractiveSession(network, torch.rand(1, H, W, T))
    encoded = sum(calls)
    truth = blank()
    truth[10:25, 10:30, 3:7] = True
    steps = simulate_interactions(session, truth, (1.0, 1.0, 2.0), num_clicks=2)
    assert encoded == T and sum(calls) == T  # the clicks ran no encoder
    assert len(steps) == 3 and all(0.0 <= s.dice <= 1.0 for s in steps)


def test_the_benchmark_writes_steps_summary_and_plot_for_every_organ(network, tmp_path):
    from monai_sam.data import datalist_from_decathlon
    from monai_sam.data.phantom import ensure_phantom_dataset

    dataset = ensure_phantom_dataset(tmp_path / "data", "ct", num_cases=1, shape=(64, 64, 12))
    datalist = datalist_from_decathlon(dataset)[:1]
    names = {1: "liver", 2: "spleen", 5: "aorta"}  # no spleen in so small a phantom: skipped
    steps = run_interaction_benchmark(
        network, datalist, names, tmp_path / "eval", window="abdomen", num_clicks=2, stop_after_absent=None
    )
    with open(tmp_path / "eval" / "interaction_steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(steps) == 2 * 3
    assert {r["name"] for r in rows} == {"liver", "aorta"}
    with open(tmp_path / "eval" / "interaction_summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2 and {"dsc_auc", "nsd_auc", "dice_final", "seconds_per_interaction"} <= set(
        summary[0]
    )
    assert (tmp_path / "eval" / "interaction_curves.png").stat().st_size > 1000
