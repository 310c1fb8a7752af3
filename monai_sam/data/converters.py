"""Converters: public dataset layouts -> Decathlon-style folders.

Each converter reads a downloaded dataset in its public layout and writes, into ``out_dir``::

    imagesTr/<case>.nii.gz    labelsTr/<case>.nii.gz    (PNG for 2D datasets)
    imagesTs/<case>...        labelsTs/<case>...        (when the dataset has test cases)
    dataset.json              MSD-style: labels {"0": "background", ...}, modality,
                              numTraining, training [{"image", "label"}], test

The source folder is never modified: NIfTI files are symlinked (``link=True``) or copied;
files that need re-encoding (REFUGE masks) are written anew. ``dataset.json`` is written last
and atomically (temporary file + ``os.replace``), so a folder with a ``dataset.json`` is a
complete conversion. A layout that is not recognised raises :class:`LayoutError` naming the
folder and what was looked for. The layouts are described in ``docs/data_formats.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ACDC_LABELS",
    "BTCV_LABELS",
    "CONVERTERS",
    "LITS_LABELS",
    "LayoutError",
    "REFUGE_LABELS",
    "convert_acdc",
    "convert_btcv",
    "convert_lits",
    "convert_msd",
    "convert_refuge",
    "refuge_grey_to_labels",
]

#: Synapse multi-atlas abdomen (BTCV) label ids, as in the released label volumes.
BTCV_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_vein_splenic_vein",
    11: "pancreas",
    12: "adrenal_gland_right",
    13: "adrenal_gland_left",
}

#: ACDC label ids, as in the released ``*_gt.nii.gz`` volumes.
ACDC_LABELS: dict[int, str] = {0: "background", 1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}

#: REFUGE labels as written by :func:`convert_refuge`: disjoint classes; the optic disc of the
#: REFUGE evaluation is labels {1, 2}, the optic cup is label 2.
REFUGE_LABELS: dict[int, str] = {0: "background", 1: "optic_disc_rim", 2: "optic_cup"}

#: LiTS (Liver Tumor Segmentation challenge) label ids, as in its ``segmentation-N.nii`` files;
#: the same classes as MSD Task03_Liver (which is LiTS) after :func:`convert_msd`.
LITS_LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "liver_tumor"}

#: MSD tasks whose label names we normalise beyond snake_case (folder name pattern -> labels).
_MSD_LABEL_OVERRIDES: dict[str, dict[int, str]] = {
    r"Task0?3_Liver": {0: "background", 1: "liver", 2: "liver_tumor"},
}

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class LayoutError(ValueError):
    """The source folder is not in the layout a converter expects."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _is_junk(name: str) -> bool:
    """Hidden files and macOS resource forks (``._liver_0.nii.gz``, ``.DS_Store``)."""
    return name.startswith(".")


def _nifti_split(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return None


def _short_list(items: Sequence[Any], limit: int = 10) -> str:
    shown = [str(i) for i in items[:limit]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" ... and {more} more" if more > 0 else "")


def _prepare(src_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source dataset folder not found: {src}")
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"out_dir {out} is the source folder; converters never write into the source")
    out.mkdir(parents=True, exist_ok=True)
    return src, out


def _place_training_pairs(
    images: dict, labels: dict, name: Callable[[Any], str], out: Path, link: bool
) -> list[dict]:
    """Place each case's image and label as ``imagesTr/<name>`` / ``labelsTr/<name>``; return the entries."""
    training = []
    for case_id in sorted(images):
        ext = _nifti_split(images[case_id].name)[1].lower()  # type: ignore[index]
        lext = _nifti_split(labels[case_id].name)[1].lower()  # type: ignore[index]
        stem = name(case_id)
        _place(images[case_id], out / "imagesTr" / f"{stem}{ext}", link)
        _place(labels[case_id], out / "labelsTr" / f"{stem}{lext}", link)
        training.append({"image": f"./imagesTr/{stem}{ext}", "label": f"./labelsTr/{stem}{lext}"})
    return training


def _place_test_images(images: dict, name: Callable[[Any], str], out: Path, link: bool) -> list[str]:
    """Place unlabeled test images as ``imagesTs/<name>``; their datalist paths."""
    test = []
    for case_id, path in sorted(images.items()):
        ext = _nifti_split(path.name)[1].lower()  # type: ignore[index]
        _place(path, out / "imagesTs" / f"{name(case_id)}{ext}", link)
        test.append(f"./imagesTs/{name(case_id)}{ext}")
    return test


def _place(src_file: Path, dst: Path, link: bool) -> None:
    """Symlink (absolute target) or copy ``src_file`` to ``dst``, replacing an older ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink():
        dst.unlink()
    elif dst.exists():
        if dst.resolve() == src_file.resolve():
            raise ValueError(f"refusing to replace {dst}: it is the source file itself")
        dst.unlink()
    if link:
        try:
            os.symlink(src_file.resolve(), dst)
            return
        except OSError as e:  # e.g. file systems without symlinks
            logger.warning("cannot symlink %s -> %s (%s); copying instead", dst, src_file, e)
    shutil.copy2(src_file, dst)


def _labels_json(labels: Mapping[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in sorted(labels.items())}


def _write_dataset_json(out_dir: Path, content: dict[str, Any]) -> Path:
    """Write ``out_dir/dataset.json`` atomically; return its path."""
    target = out_dir / "dataset.json"
    fd, tmp = tempfile.mkstemp(prefix=".dataset.", suffix=".json.tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=4)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def _dataset_json(
    *,
    name: str,
    description: str,
    reference: str,
    licence: str,
    tensor_image_size: str,
    modality: Mapping[str, str],
    labels: Mapping[int, str],
    training: list[dict[str, Any]],
    test: list[Any],
    source: Path,
    converter: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    content: dict[str, Any] = {
        "name": name,
        "description": description,
        "reference": reference,
        "licence": licence,
        "tensorImageSize": tensor_image_size,
        "modality": dict(modality),
        "labels": _labels_json(labels),
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        "source": str(source.resolve()),
        "converter": f"monai_sam.data.converters.{converter}",
    }
    if extra:
        content.update(extra)
    return content


def _test_list(entries: list[dict[str, Any]]) -> list[Any]:
    """MSD-style strings when no test case has a label, else dicts for all (never mixed:
    MONAI's ``load_decathlon_datalist`` decides from the first item)."""
    if any("label" in e for e in entries):
        return entries
    return [e["image"] for e in entries]


def _unpaired_error(what: str, folder: Path, images: Sequence[str], labels: Sequence[str]) -> ValueError:
    parts = []
    if images:
        parts.append(f"image(s) without a label: {_short_list(sorted(images))}")
    if labels:
        parts.append(f"label(s) without an image: {_short_list(sorted(labels))}")
    return ValueError(f"{what} in {folder}: " + "; ".join(parts))


# --------------------------------------------------------------------------------------------
# BTCV (Synapse multi-atlas abdomen)
# --------------------------------------------------------------------------------------------

_BTCV_IMAGE = re.compile(r"^img(?P<id>\d+)\.nii(\.gz)?$", re.IGNORECASE)
_BTCV_LABEL = re.compile(r"^label(?P<id>\d+)\.nii(\.gz)?$", re.IGNORECASE)


def _find_btcv(src: Path) -> tuple[Path, Path, Path | None]:
    looked: list[str] = []
    for prefix in ("", "RawData", "Abdomen/RawData", "Abdomen"):
        base = src / prefix if prefix else src
        img, lbl, test = base / "Training" / "img", base / "Training" / "label", base / "Testing" / "img"
        looked.append(f"{img.relative_to(src)}/ + {lbl.relative_to(src)}/")
        if img.is_dir() and lbl.is_dir():
            return img, lbl, test if test.is_dir() else None
    img, lbl = src / "img", src / "label"
    looked.append("img/ + label/")
    if img.is_dir() and lbl.is_dir():
        return img, lbl, None
    raise LayoutError(
        f"{src} is not a BTCV (Synapse multi-atlas abdomen) folder: looked for "
        f"{'; '.join(looked)} holding img0001.nii.gz / label0001.nii.gz"
    )


def _btcv_index(folder: Path, pattern: re.Pattern[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if _is_junk(p.name) or not p.is_file():
            continue
        m = pattern.match(p.name)
        if m:
            found[m.group("id")] = p
        elif _nifti_split(p.name):
            logger.warning("BTCV: ignoring %s (expected %s)", p, pattern.pattern)
    return found


def convert_btcv(src_dir: str | Path, out_dir: str | Path, *, link: bool = True) -> Path:
    """Convert BTCV (Synapse multi-atlas abdomen CT, 13 organs) to a Decathlon-style folder.

    Expected input (as distributed, with or without a top ``Abdomen/`` folder)::

        RawData/Training/img/img0001.nii.gz   RawData/Training/label/label0001.nii.gz
        RawData/Testing/img/img0061.nii.gz                        (optional, no labels)

    or the flattened ``img/`` + ``label/`` at the top of ``src_dir``. Case ``img0001`` becomes
    ``imagesTr/img0001.nii.gz`` + ``labelsTr/img0001.nii.gz``; label ids are kept
    (:data:`BTCV_LABELS`).

    Args:
        src_dir: the downloaded dataset folder (not modified).
        out_dir: where the Decathlon-style folder is written.
        link: symlink the NIfTI files (True) or copy them.

    Returns:
        the path of the written ``dataset.json``.
    """
    src, out = _prepare(src_dir, out_dir)
    img_dir, lbl_dir, test_dir = _find_btcv(src)
    images = _btcv_index(img_dir, _BTCV_IMAGE)
    labels = _btcv_index(lbl_dir, _BTCV_LABEL)
    if not images:
        raise LayoutError(f"{img_dir}: no BTCV images (expected names like img0001.nii.gz)")
    if set(images) != set(labels):
        raise _unpaired_error(
            "BTCV", img_dir.parent,
            [images[i].name for i in set(images) - set(labels)],
            [labels[i].name for i in set(labels) - set(images)],
        )
    training = _place_training_pairs(images, labels, lambda case_id: f"img{case_id}", out, link)
    test_images = _btcv_index(test_dir, _BTCV_IMAGE) if test_dir is not None else {}
    test = _place_test_images(test_images, lambda case_id: f"img{case_id}", out, link)
    content = _dataset_json(
        name="BTCV",
        description="Multi-atlas labeling beyond the cranial vault: abdomen CT, 13 organs",
        reference="https://www.synapse.org/#!Synapse:syn3193805",
        licence="see the Synapse terms of use (CC BY 4.0 for the abdomen challenge data)",
        tensor_image_size="3D",
        modality={"0": "CT"},
        labels=BTCV_LABELS,
        training=training,
        test=test,
        source=src,
        converter="convert_btcv",
    )
    path = _write_dataset_json(out, content)
    logger.info("BTCV: %d training, %d test case(s) -> %s", len(training), len(test), path)
    return path


# --------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon
# --------------------------------------------------------------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")


def _find_msd_task(src: Path) -> Path:
    if (src / "dataset.json").is_file():
        return src
    tasks = sorted(
        d for d in src.iterdir()
        if d.is_dir() and d.name.startswith("Task") and (d / "dataset.json").is_file()
    )
    if len(tasks) == 1:
        return tasks[0]
    found = f"task folders {[t.name for t in tasks]} (pass one)" if tasks else "neither"
    raise LayoutError(
        f"{src} is not an MSD task folder: expected TaskXX_Name/ holding dataset.json, imagesTr/, "
        f"labelsTr/ (imagesTs/ optional), or a folder holding exactly one such task; found {found}"
    )


def _msd_relative(task: Path, rel: str, json_path: Path) -> Path:
    """Normalised relative path of a dataset.json entry; it must stay inside the task folder."""
    norm = Path(os.path.normpath(rel))
    if norm.is_absolute() or norm.parts[:1] == ("..",):
        raise ValueError(f"{json_path}: entry {rel!r} points outside the task folder {task}")
    return norm


def _nifti_channels(path: Path) -> int:
    import nibabel as nib

    shape = nib.load(str(path)).shape  # header only, no voxel data read
    return int(shape[3]) if len(shape) >= 4 else 1


def convert_msd(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    link: bool = True,
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Validate and normalise a Medical Segmentation Decathlon task.

    Expected input: ``TaskXX_Name/`` with ``dataset.json``, ``imagesTr/``, ``labelsTr/`` and
    optionally ``imagesTs/`` (or a folder holding exactly one such task). The macOS ``._*``
    files of the MSD archives are skipped. The files named in the source ``dataset.json`` are
    linked or copied under the same relative paths; missing ones raise FileNotFoundError.

    Normalisation: label names in snake_case (``"non-enhancing tumor"`` ->
    ``"non_enhancing_tumor"``); Task03_Liver labels become 1 ``liver``, 2 ``liver_tumor``;
    ``modality`` and ``tensorImageSize`` are kept (multi-modal 4D BrainTumour/Prostate images
    are kept as they are) or, when absent, derived from the first image's header;
    ``numTraining``/``numTest`` are recounted. The original names are kept under
    ``source_labels``.

    Args:
        src_dir: the task folder (not modified).
        out_dir: where the normalised folder is written.
        link: symlink the NIfTI files (True) or copy them.
        label_names: ``{id: name}`` to use instead of the (normalised) source names.

    Returns:
        the path of the written ``dataset.json``.
    """
    src, out = _prepare(src_dir, out_dir)
    task = _find_msd_task(src)
    json_path = task / "dataset.json"
    if not (task / "imagesTr").is_dir():
        raise LayoutError(f"{task}: no imagesTr/ folder beside dataset.json (MSD task layout expected)")
    with open(json_path, encoding="utf-8") as f:
        meta = json.load(f)
    entries = meta.get("training")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{json_path}: expected a non-empty 'training' list, found {entries!r}")

    missing: list[str] = []
    training: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{json_path}: training entry {entry!r} lacks 'image' or 'label'")
        rel_img = _msd_relative(task, entry["image"], json_path)
        rel_lbl = _msd_relative(task, entry["label"], json_path)
        for rel in (rel_img, rel_lbl):
            if not (task / rel).is_file():
                missing.append(str(rel))
        training.append({**entry, "image": f"./{rel_img.as_posix()}", "label": f"./{rel_lbl.as_posix()}"})
    test_rel: list[Path] = []
    for item in meta.get("test", []) or []:
        rel = _msd_relative(task, item["image"] if isinstance(item, dict) else item, json_path)
        if not (task / rel).is_file():
            missing.append(str(rel))
        test_rel.append(rel)
    if missing:
        raise FileNotFoundError(
            f"{json_path} references {len(missing)} missing file(s): {_short_list(missing)}"
        )

    listed = {Path(e["image"]).name for e in training} | {p.name for p in test_rel}
    for folder in ("imagesTr", "imagesTs"):
        if (task / folder).is_dir():
            extra = sorted(
                p.name for p in (task / folder).iterdir()
                if not _is_junk(p.name) and _nifti_split(p.name) and p.name not in listed
            )
            if extra:
                logger.warning("MSD: %d file(s) in %s not listed in dataset.json, skipped: %s",
                               len(extra), task / folder, _short_list(extra))

    for entry in training:
        for key in ("image", "label"):
            _place(task / entry[key], out / entry[key], link)
    test = []
    for rel in test_rel:
        _place(task / rel, out / rel, link)
        test.append(f"./{rel.as_posix()}")

    # Labels: {"0": "background", ...} with snake_case names, or a known/explicit override.
    source_labels = meta.get("labels")
    if label_names is not None:
        labels = dict(label_names)
    else:
        labels = None
        for pattern, names in _MSD_LABEL_OVERRIDES.items():
            if re.fullmatch(pattern, task.name, flags=re.IGNORECASE):
                labels = dict(names)
        if labels is None:
            if not isinstance(source_labels, dict) or not source_labels:
                raise ValueError(f"{json_path}: no 'labels' object; pass label_names")
            try:
                labels = {int(k): _snake(v) for k, v in source_labels.items()}
            except ValueError as e:
                raise ValueError(
                    f"{json_path}: label ids must be integers, found {list(source_labels)}"
                ) from e
        labels.setdefault(0, "background")

    modality = meta.get("modality")
    size = meta.get("tensorImageSize")
    if not modality or not size:
        channels = _nifti_channels(task / training[0]["image"])
        modality = modality or {str(c): "unknown" for c in range(channels)}
        size = size or ("4D" if channels > 1 else "3D")
    modality = {str(k): str(v) for k, v in dict(modality).items()}

    content = _dataset_json(
        name=str(meta.get("name", task.name)),
        description=str(meta.get("description", "")),
        reference=str(meta.get("reference", "http://medicaldecathlon.com/")),
        licence=str(meta.get("licence", meta.get("license", "CC-BY-SA 4.0"))),
        tensor_image_size=str(size),
        modality=modality,
        labels=labels,
        training=training,
        test=test,
        source=task,
        converter="convert_msd",
        extra={"source_labels": source_labels, "task": task.name},
    )
    if "release" in meta:
        content["release"] = meta["release"]
    path = _write_dataset_json(out, content)
    logger.info("MSD %s: %d training, %d test case(s) -> %s", task.name, len(training), len(test), path)
    return path


# --------------------------------------------------------------------------------------------
# LiTS (Liver Tumor Segmentation challenge)
# --------------------------------------------------------------------------------------------

_LITS_IMAGE = re.compile(r"^volume-(?P<id>\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_LABEL = re.compile(r"^segmentation-(?P<id>\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_TEST = re.compile(r"^test-volume-(?P<id>\d+)\.nii(\.gz)?$", re.IGNORECASE)


def _lits_index(src: Path, pattern: re.Pattern[str], what: str) -> dict[int, Path]:
    """Files matching ``pattern`` anywhere under ``src`` (the batches are sub-folders), by case id."""
    found: dict[int, Path] = {}
    for p in sorted(src.rglob("*")):
        if _is_junk(p.name) or any(_is_junk(part) for part in p.relative_to(src).parts) or not p.is_file():
            continue
        m = pattern.match(p.name)
        if not m:
            continue
        case_id = int(m.group("id"))
        if case_id in found:
            raise ValueError(f"LiTS: {what} {case_id} found twice under {src}: {found[case_id]} and {p}")
        found[case_id] = p
    return found


def convert_lits(src_dir: str | Path, out_dir: str | Path, *, link: bool = True) -> Path:
    """Convert LiTS (liver and liver tumours in CT) to a Decathlon-style folder.

    Expected input, as distributed (the training batches may be sub-folders, at any depth)::

        Training Batch 1/volume-0.nii  Training Batch 1/segmentation-0.nii   ... (.nii or .nii.gz)
        Training Batch 2/volume-28.nii Training Batch 2/segmentation-28.nii  ...
        Test-Data/test-volume-0.nii                                          (optional, no labels)

    Case ``volume-7`` becomes ``imagesTr/lits_007.nii`` + ``labelsTr/lits_007.nii``
    (``imagesTs/lits_test_007.nii`` for test volumes); label ids are kept (:data:`LITS_LABELS`:
    1 liver, 2 liver_tumor, as MSD Task03_Liver). macOS ``._*`` files are skipped.

    Args:
        src_dir: the downloaded dataset folder (not modified).
        out_dir: where the Decathlon-style folder is written.
        link: symlink the NIfTI files (True) or copy them.

    Returns:
        the path of the written ``dataset.json``.

    Raises:
        LayoutError: no ``volume-N.nii`` under ``src_dir``.
        ValueError: a volume without its segmentation (or the reverse), or a case id twice.
    """
    src, out = _prepare(src_dir, out_dir)
    images = _lits_index(src, _LITS_IMAGE, "volume")
    labels = _lits_index(src, _LITS_LABEL, "segmentation")
    if not images:
        raise LayoutError(
            f"{src} is not a LiTS folder: no volume-<N>.nii(.gz) found in it or its sub-folders "
            "(expected 'Training Batch 1/volume-0.nii' + 'segmentation-0.nii')"
        )
    if set(images) != set(labels):
        raise _unpaired_error(
            "LiTS", src,
            [images[i].name for i in set(images) - set(labels)],
            [labels[i].name for i in set(labels) - set(images)],
        )
    training = _place_training_pairs(images, labels, lambda case_id: f"lits_{case_id:03d}", out, link)
    test = _place_test_images(
        _lits_index(src, _LITS_TEST, "test volume"), lambda case_id: f"lits_test_{case_id:03d}", out, link
    )
    content = _dataset_json(
        name="LiTS",
        description="Liver Tumor Segmentation challenge: abdominal CT, liver and liver tumours",
        reference="https://competitions.codalab.org/competitions/17094",
        licence="CC BY-NC-SA 4.0 (see the LiTS terms of use)",
        tensor_image_size="3D",
        modality={"0": "CT"},
        labels=LITS_LABELS,
        training=training,
        test=test,
        source=src,
        converter="convert_lits",
    )
    path = _write_dataset_json(out, content)
    logger.info("LiTS: %d training, %d test case(s) -> %s", len(training), len(test), path)
    return path


# --------------------------------------------------------------------------------------------
# ACDC (cardiac cine MRI, ED/ES frames)
# --------------------------------------------------------------------------------------------

_ACDC_PATIENT = re.compile(r"^patient\d+$", re.IGNORECASE)
_ACDC_FRAME = re.compile(r"^(?P<case>patient\d+_frame(?P<frame>\d+))(?P<gt>_gt)?\.nii(\.gz)?$", re.IGNORECASE)


def _find_acdc(src: Path) -> tuple[Path | None, Path | None]:
    looked = []
    for prefix in ("", "database", "ACDC/database", "ACDC"):
        base = src / prefix if prefix else src
        train, test = base / "training", base / "testing"
        looked.append(f"{prefix + '/' if prefix else ''}{{training,testing}}/patientXXX/")
        if any(d.is_dir() and any(_ACDC_PATIENT.match(p.name) for p in d.iterdir()) for d in (train, test)):
            return (train if train.is_dir() else None), (test if test.is_dir() else None)
    raise LayoutError(
        f"{src} is not an ACDC folder: looked for {'; '.join(looked)} holding "
        "patient001_frame01.nii.gz + patient001_frame01_gt.nii.gz (+ Info.cfg)"
    )


def _read_info_cfg(path: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    if not path.is_file():
        return info
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def _acdc_cases(split_dir: Path, need_labels: bool) -> list[dict[str, Any]]:
    """One record per ED/ES frame: case, image, label (or None), patient, phase, group."""
    cases: list[dict[str, Any]] = []
    for patient in sorted(p for p in split_dir.iterdir() if p.is_dir() and _ACDC_PATIENT.match(p.name)):
        info = _read_info_cfg(patient / "Info.cfg")
        frames: dict[str, dict[str, Any]] = {}
        for f in sorted(patient.iterdir()):
            if _is_junk(f.name) or not f.is_file():
                continue
            m = _ACDC_FRAME.match(f.name)
            if not m:
                continue  # patientXXX_4d.nii.gz (the whole cine), Info.cfg, MANDATORY_CITATION.md
            rec = frames.setdefault(m.group("case"), {"frame": int(m.group("frame"))})
            rec["label" if m.group("gt") else "image"] = f
        no_image = sorted(c for c, r in frames.items() if "image" not in r)
        no_label = sorted(c for c, r in frames.items() if "label" not in r) if need_labels else []
        if no_image or no_label:
            raise _unpaired_error(
                "ACDC", patient, [f"{c}.nii.gz" for c in no_label], [f"{c}_gt.nii.gz" for c in no_image]
            )
        if not frames:
            logger.warning("ACDC: no patientXXX_frameYY.nii.gz in %s", patient)
        for case, rec in sorted(frames.items()):
            phase = None
            for key in ("ED", "ES"):
                if key in info and info[key].isdigit() and int(info[key]) == rec["frame"]:
                    phase = key
            cases.append({
                "case": case,
                "image": rec["image"],
                "label": rec.get("label"),
                "patient": patient.name,
                "phase": phase,
                "group": info.get("Group"),
            })
    return cases


def convert_acdc(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    link: bool = True,
    include_test: bool = True,
) -> Path:
    """Convert ACDC (cardiac cine MRI) to a Decathlon-style folder, one case per ED/ES frame.

    Expected input (optionally under ``database/``)::

        training/patient001/patient001_frame01.nii.gz     patient001_frame01_gt.nii.gz
                           /patient001_frame12.nii.gz     patient001_frame12_gt.nii.gz
                           /patient001_4d.nii.gz          (ignored)   Info.cfg (ED, ES, Group)
        testing/patient101/...                            (same; labels optional)

    Training frames go to ``imagesTr``/``labelsTr``; testing frames to ``imagesTs`` (and
    ``labelsTs`` with their ``*_gt``; ``test`` entries are then dicts with ``image`` and
    ``label``, else MSD-style strings). Entries also carry ``patient``, ``phase`` (``ED``/``ES``
    from Info.cfg) and ``group`` (diagnosis). Label ids are kept (:data:`ACDC_LABELS`).

    Returns:
        the path of the written ``dataset.json``.
    """
    src, out = _prepare(src_dir, out_dir)
    train_dir, test_dir = _find_acdc(src)
    if train_dir is None:
        raise LayoutError(f"{src}: found testing/ but no training/ folder of patientXXX/ (ACDC layout)")

    def entry(rec: dict[str, Any], img_folder: str, lbl_folder: str) -> dict[str, Any]:
        ext = _nifti_split(rec["image"].name)[1].lower()  # type: ignore[index]
        e: dict[str, Any] = {"image": f"./{img_folder}/{rec['case']}{ext}"}
        _place(rec["image"], out / e["image"], link)
        if rec["label"] is not None:
            lext = _nifti_split(rec["label"].name)[1].lower()  # type: ignore[index]
            e["label"] = f"./{lbl_folder}/{rec['case']}{lext}"
            _place(rec["label"], out / e["label"], link)
        for key in ("patient", "phase", "group"):
            if rec[key] is not None:
                e[key] = rec[key]
        return e

    training = [entry(r, "imagesTr", "labelsTr") for r in _acdc_cases(train_dir, need_labels=True)]
    if not training:
        raise LayoutError(f"{train_dir}: no patientXXX_frameYY.nii.gz frames found (ACDC layout)")
    test: list[Any] = []
    if include_test and test_dir is not None:
        cases = _acdc_cases(test_dir, need_labels=False)
        test = _test_list([entry(r, "imagesTs", "labelsTs") for r in cases])
    content = _dataset_json(
        name="ACDC",
        description="Automated Cardiac Diagnosis Challenge: cine MRI, end-diastolic and end-systolic frames",
        reference="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
        licence="see the ACDC terms of use (research, citation required)",
        tensor_image_size="3D",
        modality={"0": "MRI"},
        labels=ACDC_LABELS,
        training=training,
        test=test,
        source=src,
        converter="convert_acdc",
    )
    path = _write_dataset_json(out, content)
    logger.info("ACDC: %d training, %d test frame(s) -> %s", len(training), len(test), path)
    return path


# --------------------------------------------------------------------------------------------
# REFUGE (2D colour fundus, optic disc and cup)
# --------------------------------------------------------------------------------------------


def refuge_grey_to_labels(mask: np.ndarray) -> np.ndarray:
    """REFUGE grey-level mask (0 cup, 128 disc rim, 255 background) -> labels 2 / 1 / 0.

    Grey levels are assigned to the nearest of 0, 128, 255 (thresholds 64 and 192).
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    labels = np.zeros(mask.shape, dtype=np.uint8)
    labels[mask < 192] = 1
    labels[mask < 64] = 2
    return labels


def _open_grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _save_rgb_png(src_image: Path, dst: Path) -> tuple[int, int]:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src_image) as im:
        rgb = im.convert("RGB")
        rgb.save(dst, format="PNG")
        return rgb.size[1], rgb.size[0]  # (rows, columns)


def _save_label_png(labels: np.ndarray, dst: Path) -> None:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(dst, format="PNG")


def _raster_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not _is_junk(p.name) and p.suffix.lower() in _RASTER_SUFFIXES
    )


# Layout A, the official challenge archives.
_REFUGE_A_TRAIN = ("Training400", "REFUGE-Training400")
_REFUGE_A_TEST = ("Validation400", "REFUGE-Validation400", "Test400", "REFUGE-Test400")
# Layout B, the Medical-SAM2 / Hugging Face mirror.
_REFUGE_B_TRAIN = "Training-400"
_REFUGE_B_TEST = "Test-400"


def _refuge_a_masks(base: Path) -> dict[str, Path]:
    """All ``Disc_Cup_Masks`` files under ``base``, keyed by file stem (g0001, n0001, V0001)."""
    masks: dict[str, Path] = {}
    for folder in sorted(p for p in base.rglob("Disc_Cup_Masks") if p.is_dir()):
        for p in _raster_files(folder):
            masks.setdefault(p.stem, p)
    return masks


def _refuge_a_cases(image_dir: Path, masks: Mapping[str, Path]) -> list[dict[str, Any]]:
    cases = []
    for img in _raster_files(image_dir):
        glaucoma = {"glaucoma": 1, "non-glaucoma": 0}.get(img.parent.name.lower())
        cases.append({"case": img.stem, "image": img, "mask": masks.get(img.stem), "glaucoma": glaucoma})
    return cases


def _refuge_b_cases(split_dir: Path) -> list[dict[str, Any]]:
    cases = []
    for case_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not _is_junk(p.name)):
        name = case_dir.name
        files = {p.name: p for p in case_dir.iterdir() if p.is_file() and not _is_junk(p.name)}
        image = None
        variant = ""
        for candidate, var in ((f"{name}.jpg", ""), (f"{name}.png", ""), (f"{name}_cropped.jpg", "_cropped")):
            if candidate in files:
                image, variant = files[candidate], var
                break
        if image is None:
            raise LayoutError(
                f"REFUGE: {case_dir} holds no {name}.jpg / {name}.png / {name}_cropped.jpg "
                f"(Medical-SAM2 mirror layout); found {_short_list(sorted(files))}"
            )
        raters = re.compile(
            rf"^{re.escape(name)}_seg_(?P<kind>cup|disc)_\d+{re.escape(variant)}\.(png|jpg|jpeg|bmp)$",
            re.IGNORECASE,
        )
        cup, disc = [], []
        for fname, p in sorted(files.items()):
            m = raters.match(fname)
            if m:
                (cup if m.group("kind").lower() == "cup" else disc).append(p)
        cases.append({"case": name, "image": image, "cup": cup, "disc": disc})
    return cases


def _majority(paths: Sequence[Path]) -> np.ndarray:
    """Majority vote of binary rater masks (white = structure, grey >= 128)."""
    votes = np.stack([_open_grey(p) >= 128 for p in paths]).astype(np.float32)
    return votes.mean(axis=0) >= 0.5


def _refuge_labels(case: dict[str, Any], layout: str) -> np.ndarray | None:
    if layout == "A":
        if case["mask"] is None:
            return None
        return refuge_grey_to_labels(_open_grey(case["mask"]))
    if not case["cup"] and not case["disc"]:
        return None
    if not case["cup"] or not case["disc"]:
        raise ValueError(
            f"REFUGE: case {case['case']} ({case['image'].parent}) has "
            f"{len(case['cup'])} cup and {len(case['disc'])} disc rater mask(s); both are needed"
        )
    disc, cup = _majority(case["disc"]), _majority(case["cup"])
    if disc.shape != cup.shape:
        raise ValueError(f"REFUGE: case {case['case']}: disc masks {disc.shape} vs cup masks {cup.shape}")
    labels = np.zeros(disc.shape, dtype=np.uint8)
    labels[disc] = 1
    labels[cup] = 2
    return labels


def _find_refuge(src: Path) -> tuple[str, Path, list[Path], list[Path]]:
    """(layout, base, training image dirs, test image dirs)."""
    looked: list[str] = []
    for base in (src, src / "REFUGE"):
        rel = "" if base == src else "REFUGE/"
        train_a = [base / n for n in _REFUGE_A_TRAIN if (base / n).is_dir()]
        looked.append(f"{rel}Training400/ (+ Annotation-Training400/Disc_Cup_Masks/)")
        if train_a:
            test_a = [base / n for n in _REFUGE_A_TEST if (base / n).is_dir()]
            return "A", base, train_a, test_a
        looked.append(
            f"{rel}{_REFUGE_B_TRAIN}/<case>/<case>.jpg (+ <case>_seg_cup_N.png, <case>_seg_disc_N.png)"
        )
        if (base / _REFUGE_B_TRAIN).is_dir():
            test_b = [base / _REFUGE_B_TEST] if (base / _REFUGE_B_TEST).is_dir() else []
            return "B", base, [base / _REFUGE_B_TRAIN], test_b
    raise LayoutError(f"{src} is not a REFUGE folder: looked for {'; '.join(looked)}")


def convert_refuge(src_dir: str | Path, out_dir: str | Path, *, link: bool = True) -> Path:
    """Convert REFUGE (colour fundus photographs, optic disc and cup) to a Decathlon-style folder.

    Two layouts are recognised (optionally under a ``REFUGE/`` folder):

    A. the official archives::

           Training400/{Glaucoma,Non-Glaucoma}/g0001.jpg
           Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/g0001.bmp
           Validation400/ or Test400/ (optional, to imagesTs; masks from any Disc_Cup_Masks/)

       masks are grey levels: 0 cup, 128 disc rim, 255 background.
    B. the Medical-SAM2 / Hugging Face mirror::

           Training-400/<case>/<case>.jpg  <case>_seg_cup_1.png ... <case>_seg_disc_1.png ...
           Test-400/<case>/...             (to imagesTs, with labels)

       binary masks from several raters (white = structure), fused by majority vote.

    Output: ``imagesTr/<case>.png`` (RGB) and ``labelsTr/<case>.png`` (uint8, disjoint classes
    :data:`REFUGE_LABELS`: 0 background, 1 optic disc rim = disc minus cup, 2 optic cup; the
    optic disc is labels {1, 2}). Entries of layout A carry ``glaucoma`` (1/0).

    Args:
        src_dir: the downloaded dataset folder (not modified).
        out_dir: where the Decathlon-style folder is written.
        link: ignored: images and masks are always re-encoded as PNG (kept for a uniform
            converter signature).

    Returns:
        the path of the written ``dataset.json``.
    """
    del link  # everything is re-encoded
    src, out = _prepare(src_dir, out_dir)
    layout, base, train_dirs, test_dirs = _find_refuge(src)
    masks = _refuge_a_masks(base) if layout == "A" else {}

    def cases_of(folder: Path) -> list[dict[str, Any]]:
        return _refuge_a_cases(folder, masks) if layout == "A" else _refuge_b_cases(folder)

    def write(case: dict[str, Any], img_folder: str, lbl_folder: str, need_label: bool) -> dict[str, Any]:
        labels = _refuge_labels(case, layout)
        if labels is None and need_label:
            raise ValueError(
                f"REFUGE: training image {case['image']} has no mask ("
                + ("expected <name>.bmp under a Disc_Cup_Masks/ folder of " + str(base) if layout == "A"
                   else "expected <case>_seg_cup_N.png and <case>_seg_disc_N.png beside it") + ")"
            )
        e: dict[str, Any] = {"image": f"./{img_folder}/{case['case']}.png"}
        shape = _save_rgb_png(case["image"], out / e["image"])
        if labels is not None:
            if labels.shape != shape:
                raise ValueError(
                    f"REFUGE: case {case['case']}: image {case['image']} is {shape} (rows, columns) "
                    f"but its mask is {labels.shape}"
                )
            e["label"] = f"./{lbl_folder}/{case['case']}.png"
            _save_label_png(labels, out / e["label"])
        if case.get("glaucoma") is not None:
            e["glaucoma"] = case["glaucoma"]
        return e

    training = [write(c, "imagesTr", "labelsTr", True) for d in train_dirs for c in cases_of(d)]
    if not training:
        raise LayoutError(f"REFUGE: no images found in {[str(d) for d in train_dirs]}")
    test = _test_list([write(c, "imagesTs", "labelsTs", False) for d in test_dirs for c in cases_of(d)])
    content = _dataset_json(
        name="REFUGE",
        description="Retinal fundus glaucoma challenge: optic disc and cup segmentation "
        "(label 1 = disc rim, 2 = cup; optic disc = labels 1 and 2)",
        reference="https://refuge.grand-challenge.org/",
        licence="see the REFUGE terms of use",
        tensor_image_size="2D",
        modality={"0": "RGB"},
        labels=REFUGE_LABELS,
        training=training,
        test=test,
        source=src,
        converter="convert_refuge",
        extra={"regions": {"optic_disc": [1, 2], "optic_cup": [2]}, "layout": layout},
    )
    path = _write_dataset_json(out, content)
    logger.info(
        "REFUGE (layout %s): %d training, %d test image(s) -> %s", layout, len(training), len(test), path
    )
    return path


#: Converter by dataset name, e.g. ``CONVERTERS["btcv"](src, out)``.
CONVERTERS: dict[str, Callable[..., Path]] = {
    "btcv": convert_btcv,
    "msd": convert_msd,
    "acdc": convert_acdc,
    "refuge": convert_refuge,
    "lits": convert_lits,
}
