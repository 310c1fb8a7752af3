"""Lesion-level evaluation on hand-made masks: misses, false positives, splits, merges, sizes."""

import csv
import math

import numpy as np
import pytest
import torch

from monai_sam.evaluation.lesions import (
    label_lesions,
    match_lesions,
    size_bin,
    summarize_lesions,
    write_lesion_cases_csv,
    write_lesion_summary_csv,
    write_lesions_csv,
)


def _mask(shape, *boxes, value=1):
    a = np.zeros(shape, np.uint8)
    for lo, hi in boxes:
        a[tuple(slice(lo_, hi_) for lo_, hi_ in zip(lo, hi))] = value
    return a


SHAPE = (40, 16, 8)


def test_missed_lesion_and_false_positive():
    truth = _mask(SHAPE, ((2, 2, 2), (8, 8, 6)), ((20, 2, 2), (24, 6, 6)))
    pred = _mask(SHAPE, ((2, 2, 2), (8, 8, 6)), ((30, 10, 2), (34, 14, 4)))  # lesion 2 missed, FP far away
    m = match_lesions(pred, truth, (1.0, 1.0, 1.0), case="c1")
    s = m.summary
    assert (s.num_true, s.num_pred, s.tp, s.fn, s.fp) == (2, 2, 1, 1, 1)
    assert s.sensitivity == pytest.approx(0.5)
    assert s.fp_ids == (2,)  # components are numbered in raster order: the FP comes second
    # whole-tumour voxel Dice: |p| = 144 + 32, |t| = 144 + 64, shared 144
    assert s.voxel_dice == pytest.approx(2 * 144 / (176 + 208))
    hit, miss = m.rows
    assert hit.detected and hit.lesion_dice == pytest.approx(1.0) and hit.pred_ids == (1,)
    assert not miss.detected and miss.lesion_dice == 0.0 and miss.pred_ids == ()


def test_split_lesion_is_one_true_positive_and_no_false_positive():
    truth = _mask(SHAPE, ((2, 2, 2), (12, 6, 6)))  # 10 x 4 x 4 = 160 voxels
    half = _mask(SHAPE, ((2, 2, 2), (6, 6, 6)))  # 64 voxels: IoU 0.4 alone
    pred = half + _mask(SHAPE, ((8, 2, 2), (12, 6, 6)))  # two parts with a gap of 2 columns
    one_part = match_lesions(half, truth, (1, 1, 1), threshold=0.5)
    assert one_part.summary.tp == 0  # 64 / 160 = 0.4 < 0.5
    assert match_lesions(half, truth, (1, 1, 1), threshold=0.4).summary.tp == 1  # inclusive threshold
    m = match_lesions(pred, truth, (1, 1, 1), threshold=0.5)
    s = m.summary
    assert (s.num_true, s.num_pred, s.tp, s.fn, s.fp) == (1, 2, 1, 0, 0)
    (row,) = m.rows
    assert row.detected and row.pred_ids == (1, 2)
    assert row.lesion_iou == pytest.approx(128 / 160)  # the parts together: 0.8 >= 0.5
    assert row.lesion_dice == pytest.approx(2 * 128 / (160 + 128))


def test_merged_prediction_matches_both_lesions_on_their_own_share():
    t1, t2 = ((2, 2, 2), (6, 6, 6)), ((10, 2, 2), (14, 6, 6))  # 4 columns each, gap x = 6..9
    truth = _mask(SHAPE, t1, t2)
    pred = _mask(SHAPE, ((2, 2, 2), (14, 6, 6)))  # one blob over both and the gap
    m = match_lesions(pred, truth, (0.7, 0.7, 2.5))
    s = m.summary
    assert (s.num_true, s.num_pred, s.tp, s.fn, s.fp) == (2, 1, 2, 0, 0)
    for row in m.rows:
        assert row.detected and row.pred_ids == (1,)
        # the blob is cut at the mid-plane: each lesion gets its 4 columns + 2 of the gap.
        # Dice 2*4/(4+6) = 0.8 (against the whole blob it would be 2*4/(4+12) = 0.5)
        assert row.lesion_dice == pytest.approx(0.8)
        assert row.lesion_iou == pytest.approx(4 / 6)


def test_a_poor_share_of_a_merged_blob_is_a_miss_and_the_blob_no_false_positive():
    big, small = ((2, 2, 2), (12, 12, 6)), ((20, 2, 2), (24, 6, 6))  # 400 and 64 voxels
    truth = _mask(SHAPE, big, small)
    # the blob covers the big lesion, and a 1-voxel-thin arm reaches 4 of the small one's voxels
    pred = _mask(SHAPE, big, ((2, 2, 2), (21, 3, 6)))
    m = match_lesions(pred, truth, (1, 1, 1))
    big_row, small_row = m.rows
    assert big_row.detected and not small_row.detected
    assert m.summary.fp == 0  # the blob is the big lesion's TP, not a FP
    # the small lesion's share: the arm at x = 16..20 (nearer to x=20 than to x=11), 4 slices
    assert small_row.lesion_iou == pytest.approx(4 / (64 + 20 - 4))
    assert big_row.lesion_iou == pytest.approx(400 / (400 + 16))  # its share: itself + x = 12..15


def test_threshold_criteria_and_false_positive_overlap():
    truth = _mask(SHAPE, ((2, 2, 2), (12, 6, 6)))  # 10 columns
    pred = _mask(SHAPE, ((11, 2, 2), (20, 6, 6)))  # 9 columns, 1 shared
    iou, dice = 1 / 18, 2 / 19
    m = match_lesions(pred, truth, (1, 1, 1))  # IoU 0.056 < 0.1: missed
    (row,) = m.rows
    assert not row.detected and row.lesion_iou == pytest.approx(iou) and row.lesion_dice == pytest.approx(dice)
    assert m.summary.fp == 0  # touches the truth: not a false positive by default
    assert match_lesions(pred, truth, (1, 1, 1), fp_overlap=0.2).summary.fp == 1  # 1/9 of it in tumour
    assert match_lesions(pred, truth, (1, 1, 1), criterion="dice").rows[0].detected  # 0.105 >= 0.1
    assert match_lesions(pred, truth, (1, 1, 1), criterion="overlap").rows[0].detected
    # a partial but good overlap
    good = match_lesions(_mask(SHAPE, ((4, 2, 2), (14, 6, 6))), truth, (1, 1, 1)).rows[0]
    assert good.detected and good.lesion_dice == pytest.approx(0.8)
    with pytest.raises(ValueError, match="criterion"):
        match_lesions(pred, truth, (1, 1, 1), criterion="hausdorff")


def test_size_bins_use_the_longest_axial_diameter_in_mm():
    # a bar 12 voxels along x, 1 along y, 8 slices along z (40 mm tall at 5 mm)
    bar = _mask((20, 20, 12), ((4, 4, 2), (16, 5, 10)))
    expected = {0.8: "<10 mm", 1.5: "10-20 mm", 2.0: ">20 mm"}
    for sx, bin_name in expected.items():
        _, (les,) = label_lesions(bar, (sx, 0.8, 5.0))
        assert les.max_axial_diameter_mm == pytest.approx(math.hypot(12 * sx, 0.8))  # outer corners
        assert les.size_bin == bin_name
    # the 40 mm extent along z does not count: RECIST measures in the axial plane
    _, (les,) = label_lesions(bar, (0.8, 0.8, 5.0))
    assert les.max_axial_diameter_mm < 10
    assert les.volume_mm3 == pytest.approx(96 * 0.8 * 0.8 * 5.0)
    assert les.equivalent_diameter_mm == pytest.approx((6 * les.volume_mm3 / math.pi) ** (1 / 3))
    # anisotropic in-plane spacing: the same bar turned along y is longer in mm
    bar_y = np.ascontiguousarray(bar.transpose(1, 0, 2))
    _, (along_x,) = label_lesions(bar, (0.8, 2.0, 1.0))
    _, (along_y,) = label_lesions(bar_y, (0.8, 2.0, 1.0))
    assert along_x.size_bin == "<10 mm" and along_y.size_bin == ">20 mm"
    # the per-lesion rows carry the same bin
    row = match_lesions(bar, bar, (1.5, 0.8, 5.0)).rows[0]
    assert row.size_bin == "10-20 mm" and row.diameter_mm == pytest.approx(math.hypot(18, 0.8))
    assert [size_bin(d) for d in (9.99, 10.0, 20.0, 20.01)] == ["<10 mm", "10-20 mm", "10-20 mm", ">20 mm"]


def test_largest_axial_slice_is_the_one_reported():
    cone = _mask((20, 20, 6), ((5, 5, 1), (9, 9, 2)), ((3, 3, 2), (15, 6, 3)), ((5, 5, 3), (7, 7, 5)))
    _, (les,) = label_lesions(cone, (1, 1, 1))
    assert les.axial_slice == 2
    assert les.max_axial_diameter_mm == pytest.approx(math.hypot(12, 3))


def _three_cases():
    shape = (40, 16, 8)
    small, large = ((2, 2, 2), (6, 6, 6)), ((10, 2, 2), (35, 6, 6))  # 5.7 mm and 25.3 mm across
    a = match_lesions(_mask(shape, small), _mask(shape, small, large), (1, 1, 1), case="a")
    b = match_lesions(_mask(shape, ((2, 2, 2), (5, 5, 5))), np.zeros(shape), (1, 1, 1), case="b")
    c = match_lesions(np.zeros(shape), np.zeros(shape), (1, 1, 1), case="c")
    return [a, b, c]


def test_case_without_lesions_has_nan_sensitivity_excluded_from_means():
    a, b, c = _three_cases()
    assert a.summary.sensitivity == pytest.approx(0.5)
    assert math.isnan(b.summary.sensitivity) and math.isnan(c.summary.sensitivity)
    assert b.summary.fp == 1 and b.summary.voxel_dice == 0.0
    assert math.isnan(c.summary.voxel_dice)
    rows = [r for m in (a, b, c) for r in m.rows]
    table = {r["size_bin"]: r for r in summarize_lesions(rows, [m.summary for m in (a, b, c)])}
    overall = table["all"]
    assert overall["cases"] == 3 and overall["lesions"] == 2 and overall["detected"] == 1
    assert overall["case_sensitivity"] == pytest.approx(0.5)  # not (0.5 + 1 + 1) / 3, not 0.5 / 3
    assert overall["sensitivity"] == pytest.approx(0.5)
    assert overall["lesion_dice"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert overall["fp_per_case"] == pytest.approx(1 / 3)
    # voxel Dice: case a 2*64/(64+464), case b 0, case c excluded
    assert overall["voxel_dice"] == pytest.approx((2 * 64 / (64 + 464) + 0.0) / 2)
    assert table["<10 mm"]["sensitivity"] == 1.0 and table[">20 mm"]["sensitivity"] == 0.0
    assert table["10-20 mm"]["lesions"] == 0 and math.isnan(table["10-20 mm"]["sensitivity"])
    assert table["<10 mm"]["fp"] == 1 and table[">20 mm"]["fp"] == 0  # the FP is 4.2 mm across


def test_csv_files_hold_the_expected_rows(tmp_path):
    matches = _three_cases()
    rows = [r for m in matches for r in m.rows]
    cases = [m.summary for m in matches]
    per_lesion = write_lesions_csv(rows, tmp_path / "out" / "lesions.csv")
    per_case = write_lesion_cases_csv(cases, tmp_path / "out" / "cases.csv")
    table = write_lesion_summary_csv(summarize_lesions(rows, cases), tmp_path / "out" / "summary.csv")
    got = list(csv.DictReader(per_lesion.open()))
    assert [(r["case"], r["lesion_id"], r["size_bin"], r["detected"], r["pred_ids"]) for r in got] == [
        ("a", "1", "<10 mm", "True", "1"),
        ("a", "2", ">20 mm", "False", ""),
    ]
    assert float(got[0]["lesion_dice"]) == pytest.approx(1.0)
    got = list(csv.DictReader(per_case.open()))
    assert [(r["case"], r["tp"], r["fn"], r["fp"], r["sensitivity"]) for r in got] == [
        ("a", "1", "1", "0", "0.5"),
        ("b", "0", "0", "1", "nan"),
        ("c", "0", "0", "0", "nan"),
    ]
    got = list(csv.DictReader(table.open()))
    assert [r["size_bin"] for r in got] == ["all", "<10 mm", "10-20 mm", ">20 mm"]
    assert got[0]["voxel_dice"] != "" and got[1]["voxel_dice"] == ""
    assert not list(tmp_path.glob("out/*.tmp"))


def test_summary_refuses_rows_without_their_case():
    a, b, _ = _three_cases()
    with pytest.raises(ValueError, match="no case summary"):
        summarize_lesions(a.rows, [b.summary])


def test_connectivity_min_volume_and_consecutive_ids():
    corner = _mask((10, 10, 10), ((1, 1, 1), (3, 3, 3)), ((3, 3, 3), (5, 5, 5)))  # touch at a corner
    assert len(label_lesions(corner, (1, 1, 1))[1]) == 1  # 26-connectivity by default
    assert len(label_lesions(corner, (1, 1, 1), connectivity=18)[1]) == 2
    assert len(label_lesions(corner, (1, 1, 1), connectivity=6)[1]) == 2
    speck = _mask((10, 10, 10), ((0, 0, 0), (1, 1, 1)), ((4, 4, 4), (7, 7, 7)))
    labels, lesions = label_lesions(speck, (1, 1, 2), min_volume_mm3=3)  # the speck is 2 mm3
    assert [les.id for les in lesions] == [1] and labels.max() == 1 and labels[0, 0, 0] == 0
    assert lesions[0].bbox == ((4, 7), (4, 7), (4, 7)) and lesions[0].voxels == 27


def test_centroid_in_world_mm_from_the_affine_and_label_selection():
    from monai.data import MetaTensor

    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    liver_map = _mask((12, 12, 6), ((1, 1, 1), (11, 11, 5)))
    liver_map[2:6, 3:5, 2:4] = 2  # a tumour inside the liver
    _, (les,) = label_lesions(liver_map, (0.8, 0.8, 5.0), affine=affine, label=2)
    assert les.centroid_voxel == pytest.approx((3.5, 3.5, 2.5))
    assert les.centroid_mm == pytest.approx((0.8 * 3.5 - 10, 0.8 * 3.5 + 20, 5 * 2.5 + 30))
    meta = MetaTensor(torch.as_tensor(liver_map)[None], affine=torch.as_tensor(affine))
    _, (from_meta,) = label_lesions(meta, (0.8, 0.8, 5.0), label=2)
    assert from_meta.centroid_mm == pytest.approx(les.centroid_mm)
    with pytest.raises(ValueError, match="does not match spacing"):
        label_lesions(liver_map, (1.0, 1.0, 1.0), affine=affine, label=2)
    with pytest.raises(ValueError, match="shape"):
        match_lesions(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
