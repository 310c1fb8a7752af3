"""The MONAI Label app: clicks -> prompts on the right voxels, feature reuse, tasks, training, server.

The phantom is stored flipped in x and z (LAI, not RAS), as a file a client could send: a click
is a voxel index of that stored array and must land on the same organ in the RAS array the
network sees. Random weights make the masks meaningless, so the app is checked against the
library call with the same weights and prompts (`segment_volume`) instead of against anatomy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.data import MetaTensor
from monai.transforms import Orientation

from helpers_dicom_pipeline import checkpoint_digest, weights_digest

from monai_sam.data.phantom import LIVER, SPLEEN, make_phantom
from monai_sam.engines import read_model_record
from monai_sam.engines.checkpoint import trained_weights
from monai_sam.label.feature_store import VolumeFeatures, VolumeFeatureStore
from monai_sam.label.prompting import VoxelMap, parse_request
from monai_sam.label.server import slicer_roi
from monai_sam.networks import build_sam2_model
from monai_sam.prompts import ObjectPrompts, PromptError, SlicePrompt
from monai_sam.segment import segment_volume

REPO = Path(__file__).resolve().parents[1]
CT_BUNDLE = REPO / "bundles" / "sam2_ct_abdominal_organs"
S = 128  # model input size
SHAPE = (48, 48, 10)
LABELS = {"liver": 1, "spleen": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spinning against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_lai_phantom(root: Path, name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT phantom stored with x and z reversed; returns (stored label, stored affine)."""
    ph = make_phantom("ct", seed=seed, shape=SHAPE, spacing=(4.3, 4.3, 12.0))
    nx, _, nz = ph.label.shape
    reindex = np.array([[-1, 0, 0, nx - 1], [0, 1, 0, 0], [0, 0, -1, nz - 1], [0, 0, 0, 1]], float)
    affine = ph.affine @ reindex
    image = np.ascontiguousarray(ph.image[::-1, :, ::-1]).astype(np.int16)
    label = np.ascontiguousarray(ph.label[::-1, :, ::-1]).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(root / f"{name}.nii.gz"))
    return label, affine


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two phantom studies (LAI) in a MONAI Label folder datastore, with final labels."""
    root = tmp_path_factory.mktemp("studies")
    labels = {}
    for n, seed in (("ct_a", 3), ("ct_b", 4)):
        labels[n], affine = _write_lai_phantom(root, n, seed)
        final = root / "labels" / "final"
        final.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(labels[n], affine), str(final / f"{n}.nii.gz"))
    return root, labels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """SAM2.1 hiera-t weights at 128 px in the official file format, seeded apart from the
    bundles' default initialisation (seed 0): a path that ignored the file would not serve them."""
    torch.manual_seed(1234)
    model = build_sam2_model("sam2.1_hiera_t", image_size=S)
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def _conf(checkpoint: Path, **extra) -> dict[str, str]:
    return {
        "bundle": "none",
        "checkpoint": str(checkpoint),
        "image_size": str(S),
        "labels": "liver,spleen",
        "window": "abdomen",
        "encoder_batch_size": "8",
        **{k: str(v) for k, v in extra.items()},
    }


def _organ_voxel(label: np.ndarray, organ: int, k: int | None = None) -> list[int]:
    """A voxel well inside ``organ``: the most central one of slice ``k`` (default: its largest)."""
    k = int(np.argmax((label == organ).sum(axis=(0, 1)))) if k is None else k
    ii, jj = np.nonzero(label[..., k] == organ)
    c = int(np.argmin((ii - ii.mean()) ** 2 + (jj - jj.mean()) ** 2))
    return [int(ii[c]), int(jj[c]), k]


def _other_slice_voxel(label: np.ndarray, organ: int, k: int) -> list[int]:
    """An ``organ`` voxel on the slice farthest from ``k`` that shows at least 10 of its voxels."""
    counts = (label == organ).sum(axis=(0, 1))
    k2 = max((z for z in range(label.shape[2]) if counts[z] >= 10), key=lambda z: abs(z - k))
    assert k2 != k
    return _organ_voxel(label, organ, k2)


def _library_label(image: Path, checkpoint: Path, objects: list[ObjectPrompts]) -> np.ndarray:
    """The same segmentation through the library's one call (same weights, same prompts)."""
    out = segment_volume(
        image,
        objects,
        checkpoint=str(checkpoint),
        image_size=S,
        window="abdomen",
        device="cpu",
        encoder_batch_size=8,
    )
    return out.numpy()[0].astype(np.int32)


def _ras_prompt(click: list[int], shape=SHAPE) -> tuple[int, list[float]]:
    """Where a stored (LAI) click is on the RAS grid, computed by hand: (slice, SAM point x=j, y=i)."""
    i, j, k = click
    return shape[2] - 1 - k, [float(j), float(shape[0] - 1 - i)]


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "axes,flips", [((0, 1, 2), ()), ((0, 1, 2), (0, 2)), ((1, 0, 2), (1,)), ((2, 0, 1), (0, 1, 2))]
)
def test_voxel_map_follows_monai_orientation(axes, flips):
    """Clicks map and labels come back exactly as MONAI's Orientation moves the voxels."""
    rng = np.random.default_rng(0)
    shape = (5, 6, 7)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([1.5, 2.0, 3.0])[:, list(axes)]
    for a in flips:
        affine[:3, a] *= -1
    stored = MetaTensor(torch.as_tensor(rng.random((1, *shape))), affine=torch.as_tensor(affine))
    ras = Orientation(axcodes="RAS", labels=None)(stored)
    vmap = VoxelMap.from_affines(affine, ras.affine.numpy(), shape)
    assert vmap.ras_shape == tuple(ras.shape[1:])
    for idx in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        r = vmap.to_ras(np.array([idx]))[0].astype(int)
        assert ras[0][tuple(r)] == stored[0][idx]
    back = vmap.ras_to_stored_array(ras.numpy())
    np.testing.assert_array_equal(back, stored.numpy())


def test_resampled_images_are_refused():
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    with pytest.raises(ValueError, match="not an axis permutation"):
        VoxelMap.from_affines(rot, np.eye(4), (4, 4, 4), "scan.nii.gz")


def test_a_click_on_an_organ_voxel_lands_on_that_organ(studies, checkpoint):
    """Clicks of MONAI Label (stored voxel [x, y, z]) -> SAM points on that organ in the RAS slice."""
    from monai_sam.label.engine import LabelModelSettings, Sam2LabelEngine

    root, labels = studies
    label = labels["ct_a"]
    engine = Sam2LabelEngine(LabelModelSettings(checkpoint=str(checkpoint), image_size=S))
    stored, ras = engine.load_image(root / "ct_a.nii.gz")
    ras_label = Orientation(axcodes="RAS", labels=None)(
        MetaTensor(torch.as_tensor(label)[None], affine=stored.affine)
    )[0].numpy()
    vmap = engine._geometry(stored, ras, "ct_a").vmap
    liver, spleen = _organ_voxel(label, LIVER), _organ_voxel(label, SPLEEN)
    assert label[tuple(liver)] == LIVER and label[tuple(spleen)] == SPLEEN
    # DeepEdit style: clicks per label name, a background click shared by both objects
    background = [int(v) for v in np.argwhere(label == 0)[0]]
    parsed = parse_request({"liver": [liver], "spleen": [spleen], "background": [background]}, vmap, LABELS)
    assert [o.object_id for o in parsed.objects] == [LIVER, SPLEEN]
    for obj, click, organ in ((parsed.objects[0], liver, LIVER), (parsed.objects[1], spleen, SPLEEN)):
        clicks = [
            (p.slice_index, pt, lab)
            for p in obj.slices
            for pt, lab in zip(p.points, p.point_labels, strict=True)
        ]
        positive = [(k, pt) for k, pt, lab in clicks if lab == 1]
        assert len(positive) == 1
        k, (x, y) = positive[0]
        assert ras_label[int(y), int(x), k] == organ  # SAM point: x = column j, y = row i
        assert (k, [x, y]) == _ras_prompt(click)
        negatives = [pt for _, pt, lab in clicks if lab == 0]
        assert (
            len(negatives) == 1
            and ras_label[int(negatives[0][1]), int(negatives[0][0]), _ras_prompt(background)[0]] == 0
        )
    # Slicer/OHIF deepgrow style: foreground/background for the selected label
    parsed = parse_request({"foreground": [spleen], "background": [], "label": "spleen"}, vmap, LABELS)
    assert [(o.object_id, o.name) for o in parsed.objects] == [(SPLEEN, "spleen")]


def _liver_roi(root: Path, label: np.ndarray) -> tuple[list[int], tuple]:
    img = nib.load(str(root / "ct_a.nii.gz"))
    ii, jj, kk = np.nonzero(label == LIVER)
    lo, hi = np.array([ii.min(), jj.min(), kk.min()]), np.array([ii.max(), jj.max(), kk.max()])
    return slicer_roi(img.affine, lo, hi), (ii, jj, kk)


def test_roi_becomes_a_box_on_its_middle_slice_and_bounds_the_output(studies):
    root, labels = studies
    label = labels["ct_a"]
    img = nib.load(str(root / "ct_a.nii.gz"))
    ras_affine = img.affine @ np.array(
        [[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1]]
    )
    vmap = VoxelMap.from_affines(img.affine, ras_affine, SHAPE)
    roi, (ii, jj, kk) = _liver_roi(root, label)
    # the image is stored flipped in i and k (LAI): Slicer's "min" corner has the larger i and k
    assert roi == [int(ii.max()), int(ii.min()), int(jj.min()), int(jj.max()), int(kk.max()), int(kk.min())]
    parsed = parse_request({"roi": roi, "label": "liver"}, vmap, LABELS)
    (obj,) = parsed.objects
    (sp,) = obj.slices
    ras_k = [SHAPE[2] - 1 - int(kk.max()), SHAPE[2] - 1 - int(kk.min())]
    assert sp.slice_index == round(sum(ras_k) / 2) and sp.points is None
    # box (x0, y0, x1, y1) = (j_min, i_min, j_max, i_max) of the RAS slice; RAS i = nx - 1 - stored i
    assert sp.box.tolist() == [jj.min(), SHAPE[0] - 1 - ii.max(), jj.max(), SHAPE[0] - 1 - ii.min()]
    assert parsed.bound.lo == (SHAPE[0] - 1 - ii.max(), jj.min(), ras_k[0])
    assert parsed.bound.hi == (SHAPE[0] - 1 - ii.min(), jj.max(), ras_k[1])
    # the box lands on the liver: it holds the liver on its slice, and little else
    ras = Orientation(axcodes="RAS", labels=None)(MetaTensor(label[None], affine=torch.as_tensor(img.affine)))
    liver = ras[0, ..., sp.slice_index].numpy() == LIVER
    x0, y0, x1, y1 = (int(v) for v in sp.box)
    inside = liver[y0 : y1 + 1, x0 : x1 + 1].sum()
    assert inside == liver.sum() > 0
    # the same ROI with each pair in the other order (another client, an unflipped axis) is the same box
    swapped = [roi[1], roi[0], roi[3], roi[2], roi[5], roi[4]]
    again = parse_request({"roi": swapped, "label": "liver"}, vmap, LABELS).objects[0].slices[0]
    assert again.slice_index == sp.slice_index and again.box.tolist() == sp.box.tolist()


@pytest.mark.parametrize(
    "request_,match",
    [
        ({"foreground": [[60, 2, 3]]}, "outside the image"),
        ({"foreground": [[1, 2]]}, r"\[x, y, z\]"),
        ({"foreground": [[1, 2, 3]], "label": "pancreas"}, "unknown label 'pancreas'"),
        ({"background": [[1, 2, 3]]}, "nothing to segment"),
        ({"roi": [1, 2, 3]}, "roi must be"),
        ({"roi": [5, 5, 2, 9, 1, 2]}, "thinner than one voxel"),
        ({"liver": [[4, 4, 4]], "spleen": [[5, 5, 5]], "roi": [1, 1, 9, 9, 1, 3]}, "one object"),
    ],
)
def test_bad_requests_raise_errors_naming_the_image_and_the_problem(request_, match):
    vmap = VoxelMap.from_affines(np.eye(4), np.eye(4), SHAPE)
    with pytest.raises(PromptError, match=match) as err:
        parse_request(request_, vmap, LABELS, where="case_7.nii.gz")
    assert "case_7.nii.gz" in str(err.value)


# ----------------------------------------------------------------------------- feature store


def _entry(mb: float, slices: int = 2) -> VolumeFeatures:
    n = int(mb * 2**20 / 4 / slices)
    return VolumeFeatures([torch.zeros(slices, n, 1, 1)], [torch.zeros(1, 1, 1, 1)])


def test_feature_store_evicts_by_count_size_and_age():
    store = VolumeFeatureStore(max_bytes=int(3.5 * 2**20), max_entries=3, max_age_s=60)
    for key in "abc":
        store.get_or_compute(key, lambda: _entry(1.0))
    assert len(store) == 3 and store.stats.misses == 3
    _, hit = store.get_or_compute("a", lambda: pytest.fail("'a' is cached"))
    assert hit and store.stats.hits == 1
    store.get_or_compute("d", lambda: _entry(1.0))  # 4 entries > 3: the least recently used ('b') goes
    assert "b" not in store and "a" in store and store.stats.evictions == 1
    store.get_or_compute("e", lambda: _entry(2.0))  # bytes: 3 MB + 2 MB > 3.5 MB -> two more go
    assert store.nbytes <= store.max_bytes and "e" in store
    store.get_or_compute("huge", lambda: _entry(5.0))  # larger than the budget: served, not kept
    assert "huge" not in store and store.stats.too_large == 1
    now = time.monotonic()
    store.expire(now + 61)  # unused for longer than max_age_s
    assert len(store) == 0
    assert store.info()["encoded_slices"] == 2 * 6  # six images computed, 2 slices each


def test_feature_store_computes_an_image_once_under_concurrent_requests():
    store = VolumeFeatureStore()
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return _entry(0.1)

    with ThreadPoolExecutor(6) as pool:
        hits = [f.result()[1] for f in [pool.submit(store.get_or_compute, "img", slow) for _ in range(6)]]
    assert len(calls) == 1 and sorted(hits) == [False] + [True] * 5


# ----------------------------------------------------------------------------- tasks in process


@pytest.fixture(scope="module")
def app(studies, checkpoint, tmp_path_factory):
    from monai_sam.label.main import MonaiSamLabelApp

    root, _ = studies
    return MonaiSamLabelApp(str(tmp_path_factory.mktemp("app")), str(root), _conf(checkpoint))


def _infer(app, params: dict) -> tuple[np.ndarray, dict]:
    res = app.infer({"model": "monai_sam_interactive", "image": "ct_a", **params})
    out = np.asarray(nib.load(res["file"]).dataobj).astype(np.int32)
    os.unlink(res["file"])
    return out, res["params"]


def test_interactive_task_equals_the_library_call_and_reuses_features(app, studies, checkpoint):
    root, labels = studies
    label = labels["ct_a"]
    infos = app.info()["models"]
    assert set(infos) == {"monai_sam_interactive"}, "no automatic task without an auto_prompter"
    assert not {"sam_2d", "sam_3d"} & set(infos)
    liver = _organ_voxel(label, LIVER)
    first, params = _infer(app, {"foreground": [liver], "label": "liver"})
    assert params["feature_cache"] == "miss" and params["label_names"] == {"liver": LIVER}
    k, point = _ras_prompt(liver)
    expected = _library_label(
        root / "ct_a.nii.gz", checkpoint, [ObjectPrompts(LIVER, "liver", [SlicePrompt(k, points=[point])])]
    )
    np.testing.assert_array_equal(first, expected)
    assert first.shape == SHAPE and set(np.unique(first)) <= {0, LIVER}
    # the official file's weights are served, not the default initialisation
    assert weights_digest(app.engine.model().network.model.state_dict()) == checkpoint_digest(checkpoint)
    encoded = app.engine.store.stats.encoded_slices
    assert encoded == SHAPE[2]

    # a second click on another slice: one more conditioning frame, no re-encoding
    other = _other_slice_voxel(label, LIVER, liver[2])
    second, params = _infer(app, {"foreground": [liver, other], "background": [], "label": "liver"})
    assert params["feature_cache"] == "hit"
    assert sorted(params["prompts"][str(LIVER)]["conditioning_slices"]) == sorted(
        str(_ras_prompt(c)[0]) for c in (liver, other)
    )
    assert app.engine.store.stats.encoded_slices == encoded and app.engine.store.stats.hits == 1
    k2, point2 = _ras_prompt(other)
    expected = _library_label(
        root / "ct_a.nii.gz",
        checkpoint,
        [ObjectPrompts(LIVER, "liver", [SlicePrompt(k, points=[point]), SlicePrompt(k2, points=[point2])])],
    )
    np.testing.assert_array_equal(second, expected)
    cache = app.info()["models"]["monai_sam_interactive"]["feature_cache"]
    assert cache["hits"] == 1 and cache["misses"] == 1 and cache["entries"] == 1


def test_labels_are_saved_to_the_folder_datastore(app, studies):
    root, labels = studies
    res = app.infer(
        {
            "model": "monai_sam_interactive",
            "image": "ct_a",
            "foreground": [_organ_voxel(labels["ct_a"], SPLEEN)],
            "label": "spleen",
            "save_label": True,
            "label_tag": "original",
        }
    )
    saved = Path(app.datastore().get_label_uri(res["label"], "original"))
    assert saved.is_file() and saved.parent == root / "labels" / "original"
    img = nib.load(str(saved))
    np.testing.assert_allclose(img.affine, nib.load(str(root / "ct_a.nii.gz")).affine, atol=1e-4)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, SPLEEN}


def test_roi_request_is_bounded_by_the_roi(app, studies):
    root, labels = studies
    roi, (ii, jj, kk) = _liver_roi(root, labels["ct_a"])  # as 3D Slicer sends it
    out, params = _infer(app, {"roi": roi, "label": "liver"})
    assert params["feature_cache"] == "hit"
    inside = np.zeros(SHAPE, bool)
    inside[ii.min() : ii.max() + 1, jj.min() : jj.max() + 1, kk.min() : kk.max() + 1] = True
    assert not out[~inside].any()


def test_a_malformed_request_is_a_client_error_naming_the_problem(app):
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as err:
        app.infer({"model": "monai_sam_interactive", "image": "ct_a", "roi": [1, 2, 3], "label": "liver"})
    assert err.value.status_code == 422 and "roi must be" in err.value.detail


def test_random_weights_only_with_conf_demo_and_then_every_result_says_so(tmp_path):
    from monai_sam.demo import DEMO_TEXT, DemoWeightsError
    from monai_sam.label.main import MonaiSamLabelApp

    studies = tmp_path / "studies"
    _write_lai_phantom(studies, "ct_c", seed=5)
    conf = {"bundle": "none", "image_size": str(S), "labels": "liver,spleen", "window": "abdomen"}
    with pytest.raises(DemoWeightsError, match="--conf demo true"):
        MonaiSamLabelApp(str(tmp_path / "app"), str(studies), conf)
    app = MonaiSamLabelApp(str(tmp_path / "app"), str(studies), {**conf, "demo": "true"})
    assert app.info()["monai_sam"]["demo"] == DEMO_TEXT
    res = app.infer({"model": "monai_sam_interactive", "image": "ct_c", "foreground": [[20, 20, 5]]})
    assert "demo" in Path(res["file"]).name and res["params"]["demo"] == DEMO_TEXT
    os.unlink(res["file"])


def test_first_and_last_strategies_and_the_next_sample_encoded_before_its_first_click(tmp_path, checkpoint):
    from monai_sam.label.main import MonaiSamLabelApp

    studies = tmp_path / "studies"
    for n, seed in (("ct_c", 5), ("ct_d", 6), ("ct_e", 7)):
        _write_lai_phantom(studies, n, seed)
    app = MonaiSamLabelApp(str(tmp_path / "app"), str(studies), _conf(checkpoint))
    assert {"random", "first", "last"} <= set(app.info()["strategies"])
    assert app.next_sample({"strategy": "last"})["id"] == "ct_e"
    sample = app.next_sample({"strategy": "first"})
    assert sample["id"] == "ct_c"
    store = app.engine.store
    deadline = time.monotonic() + 120
    while store.info()["misses"] < 2 and time.monotonic() < deadline:  # both samples, in the background
        time.sleep(0.2)
    while store.info()["entries"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.info()["encoded_slices"] == 2 * SHAPE[2]
    res = app.infer({"model": "monai_sam_interactive", "image": "ct_c", "foreground": [[20, 20, 5]]})
    os.unlink(res["file"])
    assert res["params"]["feature_cache"] == "hit", "the first click found the image encoded"
    assert store.info()["encoded_slices"] == 2 * SHAPE[2]


KEEP = "keep the bundle's own"


def _bundle_copy(tmp: Path, auto_prompter: str | None = None, **train_overrides) -> Path:
    """The CT bundle's configs in a temp folder (its models/ and caches stay there).

    ``auto_prompter``: the inference.yaml value to set, None to leave the bundle without
    automatic mode whatever the CT bundle's own configs say, or `KEEP`.
    """
    dst = tmp / "bundle"
    shutil.copytree(CT_BUNDLE / "configs", dst / "configs")
    train = dst / "configs" / "train.yaml"
    doc = yaml.safe_load(train.read_text())
    doc.update(train_overrides)
    train.write_text(yaml.safe_dump(doc, sort_keys=False))
    infer = dst / "configs" / "inference.yaml"
    doc = yaml.safe_load(infer.read_text())
    if auto_prompter != KEEP:
        doc.pop("auto_prompter", None)
    if auto_prompter not in (None, KEEP):
        doc["auto_prompter"] = auto_prompter
    infer.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def test_automatic_task_only_when_the_bundle_has_an_auto_prompter(tmp_path, studies, checkpoint):
    from monai_sam.label.main import MonaiSamLabelApp

    root, labels = studies
    bundle = _bundle_copy(tmp_path / "plain", image_size=S)
    plain = MonaiSamLabelApp(
        str(tmp_path / "app1"), str(root), {"bundle": str(bundle), "checkpoint": str(checkpoint)}
    )
    assert "monai_sam_auto" not in plain.info()["models"]
    assert list(plain.info()["labels"])[:2] == ["liver", "spleen"]  # the bundle's label map

    # a bundle whose inference.yaml defines auto_prompter (here: a fixed box, as a head would give)
    k, box = 4, [10.0, 12.0, 30.0, 34.0]
    prompter = (
        "$lambda image: [monai_sam.prompts.ObjectPrompts(1, 'liver', "
        f"[monai_sam.prompts.SlicePrompt({k}, box={box})])]"
    )
    bundle = _bundle_copy(tmp_path / "auto", auto_prompter=prompter, image_size=S)
    auto = MonaiSamLabelApp(
        str(tmp_path / "app2"), str(root), {"bundle": str(bundle), "checkpoint": str(checkpoint)}
    )
    assert auto.info()["models"]["monai_sam_auto"]["type"] == "segmentation"
    # the CT bundle's own prompter needs its prompt-free head: not offered before that is trained
    untrained = _bundle_copy(tmp_path / "untrained", auto_prompter=KEEP, image_size=S)
    app3 = MonaiSamLabelApp(
        str(tmp_path / "app3"), str(root), {"bundle": str(untrained), "checkpoint": str(checkpoint)}
    )
    assert "monai_sam_auto" not in app3.info()["models"]
    res = auto.infer({"model": "monai_sam_auto", "image": "ct_b"})
    out = np.asarray(nib.load(res["file"]).dataobj).astype(np.int32)
    assert res["params"]["prompt_source"] == "auto" and res["params"]["prompts"]["1"][
        "conditioning_slices"
    ] == {str(k): "box"}
    expected = _library_label(
        root / "ct_b.nii.gz", checkpoint, [ObjectPrompts(1, "liver", [SlicePrompt(k, box=box)])]
    )
    np.testing.assert_array_equal(out, expected)


@pytest.mark.slow
def test_automatic_task_with_the_ct_bundles_prompt_free_head(tmp_path, studies, checkpoint):
    """The CT bundle's own auto_prompter (prompt-free head) behind monai_sam_auto, sharing the encoder."""
    from monai.bundle import ConfigParser

    from monai_sam.bundle import load_bundle_model
    from monai_sam.data.loading import load_volume
    from monai_sam.label.main import MonaiSamLabelApp

    root, _ = studies
    bundle = _bundle_copy(tmp_path, auto_prompter=KEEP, image_size=S)
    configs = bundle / "configs"
    if not (configs / "train_autoprompt_head.yaml").is_file():
        pytest.skip("the CT bundle has no prompt-free head config (train_autoprompt_head.yaml)")
    # untrained parts saved the way training saves them (stamped with the frozen encoder, the
    # model record beside them)
    for files, target in (
        (["train.yaml"], bundle / "models" / "model.pt"),
        (["train.yaml", "train_autoprompt_head.yaml"], bundle / "models" / "autoprompt_head" / "model.pt"),
    ):
        parser = ConfigParser()
        parser.read_config([str(configs / f) for f in files])
        parser.update(
            {"bundle_root": str(bundle), "checkpoint": str(checkpoint), "device": "$torch.device('cpu')"}
        )
        torch.manual_seed(1)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": parser.get_parsed_content("trainable_checkpoint").state_dict()}, target)
        parser.get_parsed_content("train#model_record")(None)

    app = MonaiSamLabelApp(
        str(tmp_path / "app"), str(root), {"bundle": str(bundle), "checkpoint": str(checkpoint)}
    )
    assert app.info()["models"]["monai_sam_auto"]["type"] == "segmentation"
    res = app.infer({"model": "monai_sam_auto", "image": "ct_b"})
    out = np.asarray(nib.load(res["file"]).dataobj).astype(np.int32)
    assert res["params"]["prompt_source"] == "auto" and res["params"]["prompts"]
    served = app.engine.model()
    assert served.auto_prompter.segmenter.image_encoder is served.network.model.image_encoder, "one encoder"

    # the library path with the same bundle: its prompter's prompts, then segment_volume
    lib = load_bundle_model(bundle, checkpoint=str(checkpoint), device="cpu", need_auto=True)
    image = root / "ct_b.nii.gz"
    prompts = lib.auto_prompter(load_volume(image))
    assert sorted(str(o.object_id) for o in prompts) == sorted(res["params"]["prompts"])
    expected = segment_volume(image, prompts, network=lib.network, window=lib.window, device="cpu")
    np.testing.assert_array_equal(out, expected.numpy()[0].astype(np.int32))


@pytest.mark.slow
def test_train_task_runs_the_bundle_workflow_on_the_datastore_labels(tmp_path, studies, checkpoint):
    """Final labels in the datastore -> the bundle's train workflow -> models/model.pt -> served."""
    from monai_sam.label.main import MonaiSamLabelApp

    root, _ = studies
    bundle = _bundle_copy(tmp_path, image_size=S, num_slices=4, batch_size=2, val_interval=1)
    app = MonaiSamLabelApp(
        str(tmp_path / "app"), str(root), {"bundle": str(bundle), "checkpoint": str(checkpoint)}
    )
    assert set(app.info()["trainers"]) == {"bundle"}
    assert len(app.datastore().datalist()) == 2
    app.train({"model": "bundle", "max_epochs": 1, "val_split": 0.5, "device": "cpu", "pretrained": True})
    model_pt = bundle / "models" / "model.pt"
    assert model_pt.is_file(), "validation saved the best model"
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state["format"].startswith("monai-sam trainable parts") and trained_weights(state)
    assert list((bundle / "models").glob("checkpoint_epoch=1.pt"))
    # the infer task now serves the trained parts over the same frozen encoder: the official file's
    res = app.infer(
        {"model": "monai_sam_interactive", "image": "ct_b", "foreground": [[20, 20, 5]], "label": "liver"}
    )
    os.unlink(res["file"])
    assert "trained parts" in app.info()["monai_sam"]["weights"]["source"]
    served = app.engine.model().network
    assert weights_digest(served.model.state_dict()) == checkpoint_digest(checkpoint)
    best = torch.load(model_pt, map_location="cpu", weights_only=True)
    best = best.get("model", best)
    served_state = served.model.state_dict()  # trained_weights names tensors as the model does
    trained = trained_weights(best)
    assert trained and all(torch.equal(served_state[n], t) for n, t in trained.items()), "the new parts serve"
    # before training the official file ran as SAM2 runs it; the trained parts run as they were trained
    assert served.multimask_fallback is False
    assert read_model_record(bundle / "models").checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    # a second round fine-tunes from that model.pt (pretrained) instead of starting over
    before = model_pt.stat().st_mtime_ns
    app.train({"model": "bundle", "max_epochs": 1, "val_split": 0.5, "device": "cpu", "pretrained": True})
    assert model_pt.stat().st_mtime_ns > before


# ----------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def server(studies, checkpoint, tmp_path_factory):
    """``monailabel start_server --app monai_sam/label`` on a free loopback port; killed afterwards."""
    from monai_sam.label.server import running_server

    root, _ = studies
    tmp = tmp_path_factory.mktemp("server")
    bundle = _bundle_copy(tmp, image_size=S)
    conf = {**_conf(checkpoint), "bundle": str(bundle)}
    conf.pop("labels")  # the bundle's label map
    try:
        with running_server(root, conf, tmp) as (url, _):
            yield url, bundle
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.mark.slow
def test_real_server_with_monai_label_client(server, studies, checkpoint):
    from monailabel.client import MONAILabelClient

    url, _ = server
    root, labels = studies
    client = MONAILabelClient(url, tmpdir=str(root.parent / "client"))
    info = client.info()
    assert "monai_sam_interactive" in info["models"] and "monai_sam_auto" not in info["models"]
    assert list(info["labels"])[:2] == ["liver", "spleen"]
    assert set(info["trainers"]) == {"bundle"}
    assert {"random", "first", "last"} <= set(info["strategies"])

    def cache() -> dict:
        return client.info()["models"]["monai_sam_interactive"]["feature_cache"]

    liver = _organ_voxel(labels["ct_a"], LIVER)
    out_file, params = client.infer(
        "monai_sam_interactive", "ct_a", {"foreground": [liver], "label": "liver"}
    )
    got = np.asarray(nib.load(out_file).dataobj).astype(np.int32)
    k, point = _ras_prompt(liver)
    expected = _library_label(
        root / "ct_a.nii.gz", checkpoint, [ObjectPrompts(LIVER, "liver", [SlicePrompt(k, points=[point])])]
    )
    np.testing.assert_array_equal(got, expected)
    first = cache()
    assert first["misses"] == 1 and first["encoded_slices"] == SHAPE[2]

    # the second click on the same image is served from the kept features
    other = _other_slice_voxel(labels["ct_a"], LIVER, liver[2])
    _, params = client.infer(
        "monai_sam_interactive", "ct_a", {"foreground": [liver, other], "label": "liver"}
    )
    assert params["feature_cache"] == "hit"
    second = cache()
    assert second["hits"] == first["hits"] + 1 and second["encoded_slices"] == first["encoded_slices"]

    # 8 concurrent requests on two images, both organs: clicks, boxes drawn in 3D Slicer (its ROI
    # order) and one malformed request; every good one gets its mask, the bad one a clear 4xx
    import requests

    def slicer_box(image: str, organ: int) -> list[int]:
        ii, jj, kk = np.nonzero(labels[image] == organ)
        k = int(np.argmax((labels[image] == organ).sum(axis=(0, 1))))  # a box on one slice
        lo, hi = np.array([ii.min(), jj.min(), k]), np.array([ii.max(), jj.max(), k])
        return slicer_roi(nib.load(str(root / f"{image}.nii.gz")).affine, lo, hi)

    jobs = [
        ("ct_a" if n % 2 else "ct_b", LIVER if n % 4 < 2 else SPLEEN, "roi" if n in (2, 7) else "click")
        for n in range(8)
    ]
    jobs[5] = ("ct_a", LIVER, "malformed")

    def one(job):
        image, organ, kind = job
        name = "liver" if organ == LIVER else "spleen"
        if kind == "malformed":
            r = requests.post(
                f"{url}/infer/monai_sam_interactive?image={image}&output=json",
                data={"params": json.dumps({"roi": [3, 4, 5, 6, 7], "label": name})},
                timeout=300,
            )
            return r.status_code, r.json().get("detail", "")
        click = {"foreground": [_organ_voxel(labels[image], organ)]}
        prompt = {"roi": slicer_box(image, organ)} if kind == "roi" else click
        path, res = MONAILabelClient(url, tmpdir=str(root.parent / f"client_{threading.get_ident()}")).infer(
            "monai_sam_interactive", image, {**prompt, "label": name}
        )
        arr = np.asarray(nib.load(path).dataobj)
        return arr.shape, set(np.unique(arr).tolist()) <= {0, organ}, res["latencies"]["total"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs))
    bad = results.pop(5)
    assert bad[0] == 422 and "roi must be" in bad[1], bad
    assert all(shape == SHAPE and ok for shape, ok, _ in results)
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200, "the server stays up"
    final = cache()
    assert final["misses"] == 2, "ct_b encoded once, ct_a not again"
    assert final["hits"] == second["hits"] + 7  # the malformed request read ct_a's kept features too
    assert json.loads(json.dumps(final))["encoded_slices"] == 2 * SHAPE[2]
    assert final["bytes"] <= final["max_bytes"] and final["entries"] <= final["max_entries"]


@pytest.mark.slow
def test_real_server_refuses_random_weights_unless_told_demo(studies, tmp_path):
    from monai_sam.label.server import running_server

    root, _ = studies
    conf = {"bundle": "none", "image_size": str(S), "labels": "liver,spleen", "window": "abdomen"}
    with pytest.raises(RuntimeError, match="--conf demo true"):
        with running_server(root, conf, tmp_path / "refused", timeout_s=90):
            pass
    with running_server(root, {**conf, "demo": "true"}, tmp_path / "demo", timeout_s=90) as (url, _):
        import requests

        info = requests.get(f"{url}/info/", timeout=30).json()
        assert "DEMO" in info["monai_sam"]["demo"]


# ----------------------------------------------------------------------------- DICOMweb (Orthanc)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """An Orthanc with the DICOMweb plugin on a free loopback port (own config); stopped afterwards."""
    from helpers_dicom_pipeline import run_orthanc

    yield from run_orthanc(tmp_path_factory.mktemp("orthanc"), name="MONAI_SAM_LABEL_TEST")


@pytest.mark.slow
def test_dicomweb_studies_are_segmented_and_final_labels_go_back_as_dicom_seg(
    orthanc, checkpoint, tmp_path, monkeypatch
):
    import pydicom
    import requests
    from helpers_dicom_pipeline import phantom_series
    from monailabel.config import settings

    from monai_sam.data.loading import load_volume
    from monai_sam.io.dicom import check_series, select_series
    from monai_sam.io.dicom_seg import read_dicom_seg
    from monai_sam.label.dicomweb import SegDICOMWebDatastore
    from monai_sam.label.main import MonaiSamLabelApp

    ph = phantom_series(tmp_path / "ct", seed=5)
    for f in sorted((tmp_path / "ct").iterdir()):
        assert requests.post(f"{orthanc}/instances", data=f.read_bytes(), timeout=30).ok
    first = pydicom.dcmread(next((tmp_path / "ct").iterdir()), stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "cache"))

    app = MonaiSamLabelApp(str(tmp_path / "app"), f"{orthanc}/dicom-web", _conf(checkpoint))
    store = app.datastore()
    assert isinstance(store, SegDICOMWebDatastore) and store.list_images() == [series_uid]
    assert not (tmp_path / "app" / "bin").exists(), "no dcmqi download"

    # the series as MONAI Label serves it (WADO-RS, converted to NIfTI): click on its liver
    nifti = nib.load(store.get_image_uri(series_uid))
    vmap = VoxelMap.from_affines(nifti.affine, ph.affine, nifti.shape)
    liver = vmap.ras_to_stored_array((ph.label == LIVER).astype(np.uint8))
    res = app.infer(
        {
            "model": "monai_sam_interactive",
            "image": series_uid,
            "foreground": [_organ_voxel(liver, 1)],
            "label": "liver",
        }
    )
    out = nib.load(res["file"])
    assert out.shape == nifti.shape and np.allclose(out.affine, nifti.affine, atol=1e-4)
    assert res["params"]["prompts"][str(LIVER)]["name"] == "liver"

    # the annotator submits the final label: a SEG of the series lands in Orthanc
    final = tmp_path / "final.nii.gz"
    nib.save(nib.Nifti1Image(liver, nifti.affine), str(final))
    store.save_label(series_uid, str(final), "final", {})
    found = requests.post(
        f"{orthanc}/tools/find",
        json={"Level": "Series", "Expand": True, "Query": {"StudyInstanceUID": study_uid}},
        timeout=30,
    ).json()
    segs = [s["ID"] for s in found if s["MainDicomTags"].get("Modality") == "SEG"]
    assert len(segs) == 1
    (instance,) = requests.get(f"{orthanc}/series/{segs[0]}/instances", timeout=30).json()
    seg_file = tmp_path / "seg.dcm"
    seg_file.write_bytes(requests.get(f"{orthanc}/instances/{instance['ID']}/file", timeout=30).content)
    seg = pydicom.dcmread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    back, names = read_dicom_seg(
        seg_file, check_series(select_series(tmp_path / "ct")), load_volume(tmp_path / "ct")
    )
    assert names == {1: "liver"}
    np.testing.assert_array_equal(back[0].numpy() > 0, ph.label == LIVER)
    # training reads it back the way MONAI Label does (SEG from the server -> NIfTI)
    (item,) = store.datalist()
    trained_on = nib.load(item["label"])
    on_grid = VoxelMap.from_affines(trained_on.affine, nifti.affine, trained_on.shape)
    np.testing.assert_array_equal(on_grid.ras_to_stored_array(liver) > 0, np.asarray(trained_on.dataobj) > 0)
