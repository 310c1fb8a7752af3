"""Prompt files: voxel (as stored) and world coordinates reach the right voxels of the RAS volume."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_sam.data.loading import load_volume
from monai_sam.io.prompt_file import ImageGeometry, PromptFileError, load_prompt_file, write_prompt_file
from monai_sam.prompts import ObjectPrompts, SlicePrompt

SHAPE = (20, 24, 10)  # stored (i, j, k)
# stored axes: i runs anterior->posterior, j right->left... permuted and flipped against RAS:
# voxel (i, j, k) -> world: x = -1.5 j + 30, y = -0.8 i + 10, z = 2.5 k - 7
AFFINE = np.array([[0.0, -1.5, 0.0, 30.0], [-0.8, 0.0, 0.0, 10.0], [0.0, 0.0, 2.5, -7.0], [0, 0, 0, 1]])
MARK_A, MARK_B = (5, 7, 4), (12, 15, 4)  # stored voxel indices of two markers on stored slice 4


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    arr = np.zeros(SHAPE, np.float32)
    arr[MARK_A] = 100.0
    arr[MARK_B] = 200.0
    path = tmp_path_factory.mktemp("img") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))
    return path


@pytest.fixture(scope="module")
def image(image_path):
    return load_volume(image_path)


def _ras_index(image, value) -> tuple[int, int, int]:
    idx = torch.nonzero(image[0] == value)
    assert len(idx) == 1
    return tuple(int(v) for v in idx[0])


def _write(tmp_path, doc, name="prompts.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _world(ijk) -> list[float]:
    return (AFFINE[:3, :3] @ np.asarray(ijk, float) + AFFINE[:3, 3]).tolist()


def test_voxel_indices_as_stored_reach_the_marked_voxels(tmp_path, image):
    assert tuple(image.shape[1:]) != SHAPE  # the RAS array really is re-oriented
    doc = {
        "version": 1,
        "coordinates": "voxel",
        "objects": [
            {
                "id": 3,
                "name": "kidney",
                "slices": [
                    {"box": [list(MARK_A), list(MARK_B)], "points": [list(MARK_A)], "point_labels": [1]},
                ],
            }
        ],
    }
    (obj,) = load_prompt_file(_write(tmp_path, doc), image)
    ia, ja, ka = _ras_index(image, 100.0)
    ib, jb, kb = _ras_index(image, 200.0)
    assert ka == kb
    (p,) = obj.slices
    assert (obj.object_id, obj.name, p.slice_index) == (3, "kidney", ka)
    # SAM convention on the RAS slice: x = column j, y = row i; the box spans both markers
    np.testing.assert_allclose(p.points, [[ja, ia]], atol=1e-6)
    np.testing.assert_allclose(p.box, [min(ja, jb), min(ia, ib), max(ja, jb), max(ia, ib)], atol=1e-6)
    assert image[0, int(p.points[0, 1]), int(p.points[0, 0]), p.slice_index] == 100.0


@pytest.mark.parametrize("frame", ["RAS", "LPS"])
def test_world_coordinates_in_ras_or_lps(tmp_path, image, frame):
    world_a, world_b = _world(MARK_A), _world(MARK_B)
    if frame == "LPS":  # DICOM's patient frame: x and y negated
        world_a = [-world_a[0], -world_a[1], world_a[2]]
        world_b = [-world_b[0], -world_b[1], world_b[2]]
    doc = {
        "version": 1,
        "coordinates": "world",
        "world_frame": frame,
        "objects": [{"id": 1, "slices": [{"points": [world_a, world_b], "point_labels": [1, 0]}]}],
    }
    (obj,) = load_prompt_file(_write(tmp_path, doc), image)
    ia, ja, ka = _ras_index(image, 100.0)
    ib, jb, _ = _ras_index(image, 200.0)
    np.testing.assert_allclose(obj.slices[0].points, [[ja, ia], [jb, ib]], atol=1e-6)
    assert obj.slices[0].slice_index == ka and obj.slices[0].point_labels.tolist() == [1, 0]


@pytest.mark.parametrize("coordinates", ["voxel", "world"])
def test_writer_round_trip_with_masks(tmp_path, image, coordinates):
    x, y, z = image.shape[1:]
    mask = np.zeros((x, y), bool)
    mask[3:9, 4:12] = True
    objects = [
        ObjectPrompts(
            1,
            "liver",
            [
                SlicePrompt(2, box=[4, 3, 15, 11]),
                SlicePrompt(6, points=[[5, 6], [9, 2]], point_labels=[1, 0]),
            ],
        ),
        ObjectPrompts(
            2, "spleen", [SlicePrompt(4, mask=mask), SlicePrompt(7, box=[1, 2, 5, 6], points=[[3, 4]])]
        ),
    ]
    path = write_prompt_file(
        tmp_path / "case.json", objects, image, coordinates=coordinates, world_frame="LPS"
    )
    doc = json.loads(path.read_text())
    assert doc["coordinates"] == coordinates and (coordinates == "voxel") == ("world_frame" not in doc)
    assert (tmp_path / "case_object2_mask.nii.gz").exists()
    again = load_prompt_file(path, image)
    assert [(o.object_id, o.name, o.key_slices) for o in again] == [
        (1, "liver", [2, 6]),
        (2, "spleen", [4, 7]),
    ]
    for a, b in zip(objects, again, strict=True):
        for p, q in zip(a.slices, b.slices, strict=True):
            assert p.kind == q.kind
            for field in ("box", "points", "point_labels"):
                u, v = getattr(p, field), getattr(q, field)
                assert (u is None) == (v is None)
                if u is not None:
                    np.testing.assert_allclose(u, v, atol=1e-3)
            if p.mask is not None:
                np.testing.assert_array_equal(p.mask, q.mask)


def test_geometry_from_plain_affines_matches_the_image(image):
    geo = ImageGeometry.of(image)
    ijk = geo.to_network(np.array([MARK_A]), "voxel")
    assert tuple(np.rint(ijk[0]).astype(int)) == _ras_index(image, 100.0)
    np.testing.assert_allclose(geo.from_network(ijk, "voxel"), [MARK_A], atol=1e-6)


def _doc(slices, coordinates="voxel", **extra):
    return {
        "version": 1,
        "coordinates": coordinates,
        "objects": [{"id": 1, "name": "liver", "slices": slices}],
        **extra,
    }


@pytest.mark.parametrize(
    "doc, message",
    [
        (_doc([{"points": [[2, 3, 4]]}], coordinates="pixels"), '"coordinates" must be "voxel" or "world"'),
        ({"version": 1, "coordinates": "voxel", "objects": []}, "no object has a prompt"),
        (_doc([{"points": [[2, 3, 4], [2, 3, 5]]}]), "one axial slice"),
        (_doc([{"points": [[2, 3, 40]]}]), "key slice .* out of range"),
        (_doc([{"points": [[2, 300, 4]]}]), "object 1 \\(liver\\).*outside"),
        (_doc([{"box": [[2, 3, 4], [2, 9, 4]]}]), "zero or negative area"),
        (_doc([{"box": [[2, 3, 4]]}]), "two opposite corners"),
        (_doc([{"points": [[2, 3]]}]), "coordinate triples"),
        (_doc([{"points": [[2, 3, 4]], "point_labels": [2]}]), "point_labels"),
        (_doc([{"points": [[2, 3, 4]], "colour": "red"}]), "unknown key.*colour"),
        (_doc([{}]), "needs a box, points or a mask"),
        (_doc([{"mask": "nowhere.nii.gz"}]), "mask file not found"),
        (_doc([{"points": [[2, 3, 4]]}], world_frame="XYZ"), "world_frame"),
        (_doc([{"points": [[2, 3, 4]]}], version=7), "version 7 is not supported"),
    ],
)
def test_bad_prompt_files_name_the_file_and_object(tmp_path, image, doc, message):
    path = _write(tmp_path, doc, "bad_prompts.json")
    with pytest.raises(PromptFileError, match=message) as info:
        load_prompt_file(path, image)
    assert "bad_prompts.json" in str(info.value)


def test_unreadable_files_and_masks_on_another_grid(tmp_path, image):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(PromptFileError, match="broken.json: not valid JSON"):
        load_prompt_file(bad, image)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_prompt_file(tmp_path / "missing.json", image)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), str(tmp_path / "small_mask.nii.gz"))
    path = _write(tmp_path, _doc([{"mask": "small_mask.nii.gz"}]))
    with pytest.raises(PromptFileError, match="object 1 \\(liver\\).*not on the image's grid"):
        load_prompt_file(path, image)


def test_load_prompt_file_transforms_volume_and_photo(tmp_path, image):
    from monai_sam.transforms import LoadPromptFiled
    from monai_sam.transforms.regions import LoadPhotoPromptFiled

    doc = {"version": 1, "coordinates": "voxel", "objects": [{"id": 1, "slices": [{"points": [list(MARK_A)]}]}]}
    path = _write(tmp_path, doc)
    (obj,) = LoadPromptFiled()({"image": image, "prompt_file": str(path)})["prompts"]
    (ref,) = load_prompt_file(path, image)
    assert (obj.object_id, obj.slices[0].slice_index) == (ref.object_id, ref.slices[0].slice_index)
    np.testing.assert_array_equal(obj.slices[0].points, ref.slices[0].points)
    with pytest.raises(KeyError, match="no prompt file under 'prompt_file'"):
        LoadPromptFiled()({"image": image})
    assert "prompts" not in LoadPromptFiled(allow_missing_keys=True)({"image": image})

    # a photograph (rows vertical): [x, y, 0] = column x, row y of the picture
    photo = torch.zeros(3, 40, 60)
    doc = {"version": 1, "coordinates": "voxel", "objects": [{"id": 2, "slices": [{"points": [[50, 30, 0]]}]}]}
    (obj,) = LoadPhotoPromptFiled()({"image": photo, "prompt_file": str(_write(tmp_path, doc, "photo.json"))})["prompts"]
    np.testing.assert_allclose(obj.slices[0].points, [[50, 30]])
    doc["objects"][0]["slices"][0]["points"] = [[30, 50, 0]]  # row 50 of a 40-row picture
    with pytest.raises(PromptFileError):
        LoadPhotoPromptFiled()({"image": photo, "prompt_file": str(_write(tmp_path, doc, "outside.json"))})
