"""Per-case figures (issue: safe, checkable outputs): SAM2's per-slice scores reach the user,
per-object volume / extent / intensity are right, gaps inside an object are flagged, and the
preview shows the patient's right on the left."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch

from monai_sam.evaluation.case_statistics import case_statistics, write_slice_scores_csv, write_statistics_csv
from monai_sam.evaluation.overlays import radiological_view, save_preview
from monai_sam.inferers import MemoryPropagationInferer, SliceScores
from monai_sam.networks import NO_OBJ_SCORE, Sam2VolumeSegmenter, build_sam2_model, frames_from_sam_input
from monai_sam.prompts import ObjectPrompts, SlicePrompt
from monai_sam.transforms import SamInput

S, H, W, T = 128, 64, 64, 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sam2_model("sam2.1_hiera_t", image_size=S)


def _with_heads(model, object_score: float, iou_logit: float):
    """A copy whose object-score and IoU heads give constants: what reaches the sink is then known."""
    m = copy.deepcopy(model)
    decoder = m.sam_mask_decoder
    with torch.no_grad():
        for head, value in ((decoder.pred_obj_score_head, object_score), (decoder.iou_prediction_head, iou_logit)):
            last = head.layers[-1]
            last.weight.zero_()
            last.bias.fill_(value)
    return m


def _volume() -> torch.Tensor:
    yy, xx = np.mgrid[:H, :W]
    vol = np.full((1, H, W, T), 0.1, np.float32)
    for t in range(T):
        vol[0, ..., t] += 0.8 * (((yy - 30) ** 2 + (xx - 28 - t) ** 2) < 12**2)
    return torch.from_numpy(vol)


PROMPTS = [
    ObjectPrompts(1, "a", [SlicePrompt(1, box=[14, 16, 44, 44])]),
    ObjectPrompts(2, "b", [SlicePrompt(4, box=[20, 20, 50, 46])]),
]


@pytest.mark.parametrize("object_score", [3.0, -3.0])
def test_scores_of_every_slice_reach_the_collector(model, object_score):
    seg = Sam2VolumeSegmenter(_with_heads(model, object_score, 0.4))
    scores = SliceScores()
    label = MemoryPropagationInferer(preprocess=SamInput(S))(_volume(), seg, PROMPTS, slice_scores=scores)
    for oid in (1, 2):
        got = scores.for_object(oid)
        assert sorted(got) == list(range(T)), "both directions: every slice of every object"
        for score, iou in got.values():
            assert score == pytest.approx(object_score, abs=1e-3)
            assert iou == pytest.approx(1 / (1 + math.exp(-0.4)), abs=1e-3)  # sigmoid IoU head
    # "absent" is what the masks say too: no voxel of either object with a negative score
    assert bool((label > 0).any()) == (object_score > 0)


def test_scores_sink_agrees_with_the_logits(model):
    """Slices SAM2 calls absent have NO_OBJ_SCORE logits; present ones do not (random heads)."""
    seg = Sam2VolumeSegmenter(model)
    seen: dict[tuple[int, int], float] = {}
    logits = seg.propagate(
        frames_from_sam_input(SamInput(S)(_volume())),
        PROMPTS,
        (H, W),
        scores=lambda rows, k, s, i: seen.update({(r, k): float(v) for r, v in zip(rows, s.tolist())}),
    )
    assert sorted(seen) == [(r, k) for r in range(2) for k in range(T)]
    for (r, k), score in seen.items():
        absent = bool((logits[r, k] <= NO_OBJ_SCORE + 1).all())
        assert absent == (score <= 0), (r, k, score)


class _Scores(SliceScores):
    def __init__(self, values: dict[int, dict[int, tuple[float, float]]]):
        super().__init__()
        self.values = values


def _case():
    """Spacing 0.8 x 0.8 x 2.5 mm; object 1 on slices 2-7 with slice 4 missing; object 2 absent."""
    label = np.zeros((10, 12, 10), np.int16)
    label[2:6, 3:8, 2:8] = 1  # 4 x 5 voxels per slice
    label[..., 4] = 0
    image = np.full(label.shape, -50.0, np.float32)
    image[label == 1] = 60.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-4.0, -4.8, -100.0]
    scores = {
        1: {k: (4.0 if k != 4 else -2.5, 0.8 if k != 4 else 0.1) for k in range(10)}
        | {0: (-1.0, 0.2), 9: (-6.0, 0.05)},  # absent outside the range: not a gap
        2: {k: (-3.0, 0.3) for k in range(10)},
    }
    return label, image, affine, _Scores(scores)


def test_case_statistics_per_object():
    label, image, affine, scores = _case()
    stats = case_statistics(label, image, affine, {1: "liver", 2: "spleen"}, scores, "HU")
    liver, spleen = stats["objects"]
    assert liver["voxels"] == 5 * 20
    assert liver["volume_ml"] == pytest.approx(100 * 0.8 * 0.8 * 2.5 / 1000)
    assert (liver["first_slice"], liver["last_slice"]) == (2, 7)
    assert (liver["first_z_mm"], liver["last_z_mm"]) == (-95.0, -82.5)
    assert liver["mean_intensity"] == 60.0 and liver["intensity_unit"] == "HU"
    assert liver["check_slices"] == [4], "the gap inside the range, not the absent ends 0 and 9"
    assert liver["min_predicted_iou"] == 0.8  # over the slices that have the mask
    by_slice = {s["slice"]: s for s in liver["slices"]}
    assert sorted(by_slice) == list(range(10))
    assert by_slice[4] == {
        "slice": 4, "z_mm": -90.0, "voxels": 0, "object_score": -2.5, "predicted_iou": 0.1, "check": True
    }
    assert by_slice[3]["voxels"] == 20 and not by_slice[3]["check"]
    # prompted but absent: reported, with no range and nothing to check
    assert spleen["voxels"] == 0 and spleen["first_slice"] is None and spleen["check_slices"] == []
    assert spleen["mean_intensity"] is None


def test_statistics_csvs(tmp_path):
    label, image, affine, scores = _case()
    stats = case_statistics(label, image, affine, {1: "liver", 2: "spleen"}, scores, "HU")
    with open(write_statistics_csv(stats, tmp_path / "s.csv")) as fp:
        rows = list(csv.DictReader(fp))
    assert [r["name"] for r in rows] == ["liver", "spleen"]
    assert rows[0]["voxels"] == "100" and rows[0]["check_slices"] == "4" and rows[0]["first_slice"] == "2"
    with open(write_slice_scores_csv(stats, tmp_path / "z.csv")) as fp:
        slices = list(csv.DictReader(fp))
    assert len(slices) == 20
    flagged = [(r["name"], r["slice"]) for r in slices if r["check"] == "1"]
    assert flagged == [("liver", "4")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "z.csv"]  # no temporary left


def test_label_and_image_must_share_a_grid():
    with pytest.raises(ValueError, match="one .X, Y, Z. grid"):
        case_statistics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), np.eye(4), {1: "x"})


def test_preview_is_radiological():
    """A blob at the patient's right (high RAS x), anterior (high y), superior (high z)."""
    image = np.zeros((20, 16, 12), np.float32)
    label = np.zeros_like(image, dtype=np.int16)
    label[15:19, 12:15, 8:11] = 1
    _, axial = radiological_view(image, label, "axial", 9)
    rows, cols = np.nonzero(axial)
    assert cols.max() < axial.shape[1] / 2, "patient's right on the screen's left"
    assert rows.max() < axial.shape[0] / 2, "anterior at the top"
    _, coronal = radiological_view(image, label, "coronal", 13)
    rows, cols = np.nonzero(coronal)
    assert coronal.shape == (12, 20)
    assert cols.max() < coronal.shape[1] / 2 and rows.max() < coronal.shape[0] / 2, "right on the left, superior up"
    with pytest.raises(ValueError, match="plane"):
        radiological_view(image, label, "sagittal", 0)


def test_preview_png_written_atomically(tmp_path):
    from PIL import Image

    label, image, _, _ = _case()
    path = save_preview(image, label, tmp_path / "p.png", {1: "liver"}, (0.8, 0.8, 2.5), (-100, 100), "case")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]  # axial panels + one coronal, side by side
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
