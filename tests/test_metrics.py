"""Metrics on hand-made volumes: known Dice, HD95 in mm with anisotropic spacing, exclusions."""

import csv
import math

import numpy as np
import pytest

from monai_sam.evaluation.metrics import score_case, summarize, write_scores_csv, write_summary_csv

NAMES = {1: "liver", 2: "spleen", 3: "kidney_right"}


def _cube(shape, lo, hi, value=1):
    a = np.zeros(shape, np.uint8)
    a[tuple(slice(l, h) for l, h in zip(lo, hi))] = value
    return a


def test_dice_and_hd95_in_mm_with_anisotropic_spacing():
    truth = _cube((20, 20, 10), (5, 5, 2), (15, 15, 8))
    pred = _cube((20, 20, 10), (5, 5, 4), (15, 15, 8))  # two slices short at the bottom
    scores = {s.name: s for s in score_case(pred, truth, (1.0, 1.0, 3.0), {1: "liver"})}
    liver = scores["liver"]
    inter, n_t, n_p = 10 * 10 * 4, 10 * 10 * 6, 10 * 10 * 4
    assert liver.dice == pytest.approx(2 * inter / (n_t + n_p))
    # the farthest truth surface voxel is 2 slices * 3 mm from the prediction; HD95 is in mm
    assert 3.0 <= liver.hd95_mm <= 6.0
    # same voxels with isotropic 1 mm spacing give a smaller distance: spacing is used
    iso = score_case(pred, truth, (1.0, 1.0, 1.0), {1: "liver"})[0]
    assert iso.hd95_mm < liver.hd95_mm
    assert 0 < liver.surface_dice < 1


def test_absent_in_both_is_excluded_and_missed_class_is_penalised():
    truth = _cube((16, 16, 8), (2, 2, 2), (8, 8, 6), 1)
    pred = truth.copy()
    truth[10:14, 10:14, 2:6] = 3  # kidney in truth only
    scores = {s.name: s for s in score_case(pred, truth, (1, 1, 1), NAMES, case="c0")}
    assert scores["liver"].dice == pytest.approx(1.0)
    assert scores["liver"].hd95_mm == pytest.approx(0.0)
    assert math.isnan(scores["spleen"].dice), "absent in both: excluded, not 1"
    assert scores["kidney_right"].dice == 0.0
    assert scores["kidney_right"].hd95_mm == pytest.approx(math.sqrt(16**2 + 16**2 + 8**2))
    summary = summarize(list(scores.values()))
    mean = [r for r in summary if r["label"] == "mean"][0]
    assert mean["dice"] == pytest.approx(0.5)  # (1 + 0) / 2, spleen excluded
    spleen = [r for r in summary if r["name"] == "spleen"][0]
    assert spleen["cases"] == 0


def test_prompt_sources_are_summarised_apart(tmp_path):
    truth = _cube((12, 12, 6), (2, 2, 1), (8, 8, 5))
    good = score_case(truth, truth, (1, 1, 1), {1: "liver"}, case="a", prompt_source="oracle")
    bad = score_case(np.zeros_like(truth), truth, (1, 1, 1), {1: "liver"}, case="a", prompt_source="auto")
    summary = summarize(good + bad)
    by_source = {(r["prompt_source"], r["label"]): r for r in summary}
    assert by_source[("oracle", "mean")]["dice"] == pytest.approx(1.0)
    assert by_source[("auto", "mean")]["dice"] == pytest.approx(0.0)
    per_case = write_scores_csv(good + bad, tmp_path / "scores.csv")
    table = write_summary_csv(summary, tmp_path / "summary.csv")
    rows = list(csv.DictReader(per_case.open()))
    assert [r["prompt_source"] for r in rows] == ["oracle", "auto"]
    assert len(list(csv.DictReader(table.open()))) == 4


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        score_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), NAMES, case="x")


def test_overlay_png_is_written_on_representative_slices(tmp_path):
    from PIL import Image

    from monai_sam.evaluation.overlays import representative_slices, save_overlay

    truth = _cube((32, 32, 20), (8, 8, 5), (20, 24, 15))
    pred = _cube((32, 32, 20), (9, 8, 6), (20, 22, 15))
    slices = representative_slices(truth, pred)
    assert len(slices) == 3 and all(5 <= k < 15 for k in slices)
    assert representative_slices(np.zeros_like(truth), pred) == representative_slices(pred)
    img = np.random.default_rng(0).normal(size=truth.shape)
    out = save_overlay(img, truth, pred, tmp_path / "case.png", {1: "liver"}, title="case")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] * 2  # three panels side by side
        arr = np.asarray(im.convert("RGB")).astype(int)
    # contours are drawn in colour on a grey image
    assert (np.abs(arr[..., 0] - arr[..., 1]) > 40).any()
