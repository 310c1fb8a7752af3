"""Datalists: lists of ``{"image": path, "label": path}`` dicts, as MONAI datasets take them.

- :func:`datalist_from_decathlon` reads a Decathlon-style ``dataset.json`` (MONAI's
  :func:`monai.data.load_decathlon_datalist` underneath), makes every path absolute and checks
  that the files exist.
- :func:`datalist_from_folders` pairs an image folder with a label folder by case name
  (MSD-style identical names, nnU-Net-style ``case_0000.nii.gz`` image vs ``case.nii.gz`` label,
  DICOM series folders as images).
- :func:`split_datalist` makes a deterministic train/validation split.
- :func:`label_names_from_decathlon` and :func:`load_label_map` give ``{label id: name}``.

The on-disk layout is described in ``docs/data_formats.md``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai_sam.resources import resource

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_IMAGE_SUFFIXES",
    "datalist_from_decathlon",
    "datalist_from_folders",
    "label_map_dir",
    "label_names_from_decathlon",
    "list_label_maps",
    "load_label_map",
    "split_datalist",
]

#: File endings recognised as images (checked case-insensitively, longest first).
DEFAULT_IMAGE_SUFFIXES: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".mha",
    ".mhd",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
)

#: Keys of a datalist entry that hold file paths that must exist.
_PATH_KEYS = ("image", "label")

#: nnU-Net channel tag at the end of an image name: ``case_0000`` is channel 0 of ``case``.
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

_MAX_NAMES_IN_ERROR = 10


def _is_junk(name: str) -> bool:
    """Hidden files and macOS resource forks (``._foo.nii.gz``, ``.DS_Store``)."""
    return name.startswith(".")


def _short_list(items: Sequence[Any]) -> str:
    shown = [str(i) for i in items[:_MAX_NAMES_IN_ERROR]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" ... and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------------------------
# Decathlon dataset.json
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset json not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, found {type(content).__name__}")
    return content


def _paths_of(entry: Mapping[str, Any]) -> list[str]:
    """The file paths of one datalist entry (``image`` may be a list of channel files)."""
    paths: list[str] = []
    for key in _PATH_KEYS:
        value = entry.get(key)
        if isinstance(value, (str, os.PathLike)):
            paths.append(os.fspath(value))
        elif isinstance(value, (list, tuple)):
            paths.extend(os.fspath(v) for v in value)
    return paths


def _absolute(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        return os.path.abspath(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return [_absolute(v) for v in value]
    return value


def datalist_from_decathlon(
    dataset_json: str | Path,
    section: str = "training",
    base_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Read one section of a Decathlon-style ``dataset.json`` as a list of dicts.

    Args:
        dataset_json: path of the ``dataset.json`` file.
        section: the list to read: ``"training"``, ``"validation"``, ``"test"``... Test entries
            that are plain strings (MSD style) become ``{"image": path}``.
        base_dir: folder the relative paths are relative to; default: the json's folder.

    Returns:
        one dict per case; ``image``/``label`` paths are absolute (``image`` may be a list of
        channel files); other keys are passed through.

    Raises:
        FileNotFoundError: the json is missing, or it names files that do not exist (the
            message names the json and the missing files).
        ValueError: the json has no such section.
    """
    from monai.data import load_decathlon_datalist

    dataset_json = Path(dataset_json)
    content = _read_json(dataset_json)
    if section not in content:
        lists = sorted(k for k, v in content.items() if isinstance(v, list))
        raise ValueError(
            f"{dataset_json}: no section {section!r}; sections holding lists: {lists or 'none'}"
        )
    items = content[section]
    if not isinstance(items, list):
        raise ValueError(f"{dataset_json}: section {section!r} is a {type(items).__name__}, expected a list")
    if not items:
        return []
    kinds = {isinstance(i, dict) for i in items}
    if len(kinds) > 1 or (True not in kinds and section != "test"):
        raise ValueError(
            f"{dataset_json}: section {section!r} must be a list of {{'image': ..., 'label': ...}} objects "
            "(or, for 'test' only, a list of image paths), not a mix"
        )
    base = Path(base_dir) if base_dir is not None else dataset_json.parent
    # MONAI joins relative paths onto base_dir; an absolute base gives absolute paths.
    entries = load_decathlon_datalist(
        os.fspath(dataset_json),
        is_segmentation=True,
        data_list_key=section,
        base_dir=os.path.abspath(base),
    )
    datalist: list[dict[str, Any]] = []
    missing: list[str] = []
    for entry in entries:
        entry = dict(entry)
        for key in _PATH_KEYS:
            if key in entry:
                entry[key] = _absolute(entry[key])
        missing.extend(p for p in _paths_of(entry) if not os.path.exists(p))
        datalist.append(entry)
    if missing:
        raise FileNotFoundError(
            f"{dataset_json} (section {section!r}, base dir {os.path.abspath(base)}) references "
            f"{len(missing)} missing file(s): {_short_list(missing)}"
        )
    logger.debug("%s: %d %s case(s)", dataset_json, len(datalist), section)
    return datalist


def label_names_from_decathlon(dataset_json: str | Path) -> dict[int, str]:
    """``{label id: name}`` from the ``labels`` of a ``dataset.json``.

    Accepts the MSD form (``{"0": "background", "1": "liver"}``) and the nnU-Net v2 form
    (``{"background": 0, "liver": 1}``).
    """
    dataset_json = Path(dataset_json)
    content = _read_json(dataset_json)
    labels = content.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(
            f"{dataset_json}: expected a 'labels' object such as "
            f"{{\"0\": \"background\", \"1\": \"liver\"}}, found {labels!r}"
        )
    names: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(key, str) and key.lstrip("-").isdigit():
            names[int(key)] = str(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            names[value] = str(key)  # nnU-Net v2: name -> id
        else:
            raise ValueError(
                f"{dataset_json}: label entry {key!r}: {value!r} is neither 'id': 'name' (MSD) "
                "nor 'name': id (nnU-Net v2); region-based (list) labels are not supported"
            )
    return dict(sorted(names.items()))


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def _split_suffix(name: str, suffixes: Sequence[str]) -> tuple[str, str] | None:
    """``("case", ".nii.gz")`` for ``case.nii.gz``; ``None`` when no suffix matches."""
    lower = name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if suffix and lower.endswith(suffix.lower()) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return None


def _folder_has_files(folder: Path) -> bool:
    return any(p.is_file() and not _is_junk(p.name) for p in folder.rglob("*"))


def _scan_images(images_dir: Path, suffixes: Sequence[str]) -> list[tuple[str, Path]]:
    """``(name stem, path)`` of the image files and series folders of ``images_dir``."""
    found: list[tuple[str, Path]] = []
    for path in sorted(images_dir.iterdir()):
        if _is_junk(path.name):
            continue
        if path.is_dir():
            # A sub-folder holding files is one image: a DICOM series (or any series ITK reads).
            if _folder_has_files(path):
                found.append((path.name, path))
            continue
        split = _split_suffix(path.name, suffixes)
        if split is None:
            logger.debug("skipping %s: not an image (suffixes %s)", path, list(suffixes))
            continue
        found.append((split[0], path))
    return found


def _label_candidates(
    image_name: str,
    stem: str,
    label_suffixes: Sequence[str],
    label_suffix_map: Mapping[str, str | Sequence[str]] | None,
) -> list[tuple[str, bool]]:
    """Label file names to look for, best first, each with "is an nnU-Net channel match"."""
    candidates: list[tuple[str, bool]] = []
    if label_suffix_map:
        for image_end, label_ends in label_suffix_map.items():
            if image_name.lower().endswith(image_end.lower()):
                ends = [label_ends] if isinstance(label_ends, str) else list(label_ends)
                candidates.extend((image_name[: -len(image_end)] + e, False) for e in ends)
    candidates.extend((stem + s, False) for s in label_suffixes)
    m = _NNUNET_CHANNEL.match(stem)
    if m:
        candidates.extend((m.group("case") + s, True) for s in label_suffixes)
    return candidates


def datalist_from_folders(
    images_dir: str | Path,
    labels_dir: str | Path | None = None,
    image_suffixes: Sequence[str] = DEFAULT_IMAGE_SUFFIXES,
    label_suffix_map: Mapping[str, str | Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Pair the images of ``images_dir`` with the labels of ``labels_dir`` by case name.

    Images are the files of ``images_dir`` ending in one of ``image_suffixes``, and its
    sub-folders that hold files (a DICOM series folder is one image). Hidden files and macOS
    ``._*`` files are skipped. For an image ``<stem><suffix>`` the label is looked for as:

    1. the names given by ``label_suffix_map`` (``{image ending: label ending(s)}``, e.g.
       ``{".nii.gz": "_gt.nii.gz"}`` for ACDC-style names, ``{".jpg": ".bmp"}`` for REFUGE),
    2. ``<stem><any image suffix>`` (MSD style: identical names; ``case.jpg`` + ``case.png``),
    3. nnU-Net style: ``case_0000.nii.gz`` pairs with ``case.nii.gz``. Several channel files
       of one case (``case_0000``, ``case_0001``) become one entry whose ``image`` is the list
       of channel files in channel order (MONAI's ``LoadImaged`` stacks them as channels).

    Without ``labels_dir`` every image is its own case (no channel grouping).

    Returns:
        ``[{"image": path, "label": path}, ...]`` sorted by case, absolute paths as strings
        (``{"image": path}`` only, without labels).

    Raises:
        FileNotFoundError: a folder is missing or holds no images.
        ValueError: with labels, some image has no label or some label no image (the message
            names them), or one label matches several images that are not channels of a case.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    images = _scan_images(images_dir, image_suffixes)
    if not images:
        raise FileNotFoundError(
            f"no images in {images_dir}: looked for files ending in {list(image_suffixes)} "
            "and for sub-folders holding a series"
        )
    if labels_dir is None:
        return [{"image": os.path.abspath(p)} for _, p in images]

    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"labels folder not found: {labels_dir}")
    label_suffixes = list(image_suffixes)
    for ends in (label_suffix_map or {}).values():
        label_suffixes.extend([ends] if isinstance(ends, str) else ends)
    labels = {
        p.name: p
        for p in sorted(labels_dir.iterdir())
        if p.is_file() and not _is_junk(p.name) and _split_suffix(p.name, label_suffixes) is not None
    }

    # label name -> [(channel index or None, image path)]
    by_label: dict[str, list[tuple[int | None, Path]]] = {}
    unpaired_images: list[str] = []
    for stem, path in images:
        for candidate, is_channel in _label_candidates(path.name, stem, image_suffixes, label_suffix_map):
            if candidate in labels:
                m = _NNUNET_CHANNEL.match(stem)
                channel = int(m.group("channel")) if (is_channel and m) else None
                by_label.setdefault(candidate, []).append((channel, path))
                break
        else:
            unpaired_images.append(path.name)
    unpaired_labels = sorted(set(labels) - set(by_label))
    if unpaired_images or unpaired_labels:
        parts = []
        if unpaired_images:
            parts.append(f"{len(unpaired_images)} image(s) in {images_dir} without a label: "
                         f"{_short_list(unpaired_images)}")
        if unpaired_labels:
            parts.append(f"{len(unpaired_labels)} label(s) in {labels_dir} without an image: "
                         f"{_short_list(unpaired_labels)}")
        raise ValueError(
            "; ".join(parts)
            + ". Expected identical names (case.nii.gz), nnU-Net names (case_0000.nii.gz -> "
            "case.nii.gz) or names given by label_suffix_map"
        )

    datalist: list[dict[str, Any]] = []
    for label_name in sorted(by_label):
        matches = by_label[label_name]
        if len(matches) == 1:
            image: Any = os.path.abspath(matches[0][1])
        else:
            channels = [c for c, _ in matches]
            if None in channels or len(set(channels)) != len(channels):
                raise ValueError(
                    f"label {labels_dir / label_name} matches several images that are not nnU-Net "
                    f"channels of one case: {[p.name for _, p in matches]}"
                )
            image = [os.path.abspath(p) for _, p in sorted(matches, key=lambda m: m[0])]
        datalist.append({"image": image, "label": os.path.abspath(labels[label_name])})
    return datalist


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def split_datalist(
    datalist: Sequence[dict[str, Any]],
    val_fraction: float = 0.2,
    num_val: int | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/validation split.

    Args:
        datalist: the cases.
        val_fraction: share of cases for validation (rounded), used when ``num_val`` is None.
        num_val: exact number of validation cases (``1 <= num_val < len`` when len >= 2).
        seed: the same seed and datalist give the same split.

    Returns:
        ``(train, val)``, each in the datalist's original order. With two or more cases each
        part holds at least one; a single case goes to train.
    """
    n = len(datalist)
    if num_val is None:
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        k = round(n * val_fraction)
        k = min(max(k, 1), n - 1) if n >= 2 else 0
    else:
        if n >= 2 and not 1 <= num_val <= n - 1:
            raise ValueError(f"num_val must be between 1 and {n - 1} for {n} cases, got {num_val}")
        k = num_val if n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:k])
    train = [d for i, d in enumerate(datalist) if i not in val_idx]
    val = [d for i, d in enumerate(datalist) if i in val_idx]
    return train, val


# --------------------------------------------------------------------------------------------
# Label maps (monai_sam/resources/label_maps/*.yaml, package data)
# --------------------------------------------------------------------------------------------


def label_map_dir() -> Traversable:
    """``monai_sam/resources/label_maps``, read through `importlib.resources` (any install)."""
    return resource("label_maps")


def list_label_maps() -> list[str]:
    """Names of the label maps shipped in ``monai_sam/resources/label_maps``."""
    folder = label_map_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_label_map(name_or_path: str | Path) -> dict[int, str]:
    """``{label id: name}`` from a label-map YAML (``labels: {0: background, 1: liver}``).

    Args:
        name_or_path: a map name (``"btcv"`` -> ``monai_sam/resources/label_maps/btcv.yaml``,
            shipped with the package) or a path to a YAML file.
    """
    import yaml

    candidate = Path(name_or_path)
    path: Path | Traversable
    if candidate.suffix.lower() in (".yaml", ".yml") or candidate.is_file():
        path = candidate
        if not path.is_file():
            raise FileNotFoundError(f"label map file not found: {path}")
    else:
        path = label_map_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown label map {str(name_or_path)!r}: no {path}; available: "
                f"{list_label_maps() or 'none'} (or pass a path to a YAML file)"
            )
    with path.open(encoding="utf-8") as f:
        content = yaml.safe_load(f)
    labels = content.get("labels") if isinstance(content, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: expected a 'labels:' mapping of id -> name, found {labels!r}")
    out: dict[int, str] = {}
    for key, value in labels.items():
        try:
            label_id = int(key)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: label id {key!r} is not an integer") from e
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: label {label_id} has no name (found {value!r})")
        out[label_id] = value
    names = list(out.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: label names used twice: {duplicates}")
    return dict(sorted(out.items()))
