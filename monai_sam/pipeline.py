"""Segment many cases in one call: the batch behind ``monai-sam segment``.

A *case* is one volume: a NIfTI file, the usable series of one DICOM study found under a
folder tree, or a study pulled from a PACS through DICOMweb. For each case the pipeline
loads it, gets its prompts (a prompt file, or a bundle's automatic prompter), runs
`monai_sam.segment.segment_volume`, and writes ``<case>_seg.nii.gz`` (plus ``<case>_seg.dcm``,
a DICOM-SEG referencing the source series, with ``dicom_seg=True``), the per-case figures
(``<case>_seg_statistics.csv``: volume, slice range and mean intensity per object;
``<case>_seg_slice_scores.csv``: SAM2's object score and predicted IoU per slice;
``<case>_seg_preview.png``) and ``<case>_seg.json`` (what was done, with which model, prompts
and source, and the same figures) last.

Why it is built this way:

* **Resumable**: a case whose record and outputs exist is skipped, so an interrupted run
  over an archive is simply started again.
* **Atomic**: a case's files are written into a hidden staging folder and renamed into place
  only once all of them (and the PACS store, if any) succeeded; a failed case leaves nothing.
* **One failure is one case**: errors are caught per case, logged with the case and the
  message (which names the file or study and what is wrong), listed in the summary, and the
  exit status is non-zero; the other cases still run.
* **Scales out**: under ``torchrun --nproc_per_node=N`` every process takes the cases
  ``rank, rank + N, ...`` of the sorted list (``RANK`` / ``WORLD_SIZE`` from the environment)
  and its own GPU (``LOCAL_RANK``); no process group is needed.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_sam.bundle import SegmentationModel
from monai_sam.demo import DEMO_TEXT

__all__ = [
    "Case",
    "PipelineError",
    "discover_cases",
    "rank_and_world",
    "resolve_device",
    "run_pipeline",
    "OutputNaming",
    "output_stem",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
RECORD_FORMAT = "monai-sam segment record v1"


class PipelineError(RuntimeError):
    """A problem that stops the whole run before any case (bad options, model, output folder)."""


@dataclasses.dataclass
class Case:
    """One volume to segment.

    Attributes:
        name: file-name stem of its outputs (unique in the run).
        kind: ``"nifti"``, ``"dicom"`` or ``"dicomweb"``.
        source: what the user would recognise: the file / folder, or ``URL study UID``.
        path: the NIfTI file or the folder holding the DICOM series (None for DICOMweb).
        series_uid: the chosen SeriesInstanceUID (DICOM).
        study_uid: StudyInstanceUID (DICOM, DICOMweb).
        error: a problem found while discovering it (e.g. two usable series): the case fails
            with this message when its turn comes, without stopping the others.
    """

    name: str
    kind: str
    source: str
    path: Path | None = None
    series_uid: str | None = None
    study_uid: str | None = None
    error: str | None = None


# ----------------------------------------------------------------------------- ranks


def rank_and_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""

    def env(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value != "" else default
        except ValueError as err:
            raise PipelineError(f"environment variable {name}={value!r} is not an integer") from err

    world = env("WORLD_SIZE", 1)
    rank = env("RANK", 0)
    local = env("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise PipelineError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return rank, world, local


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU (``cuda:LOCAL_RANK`` under torchrun) or the CPU; else as given.

    Raises:
        PipelineError: ``device`` is not a device name, or names a CUDA device this machine lacks.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError as err:
        raise PipelineError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PipelineError(f"device {device!r}: this machine has no usable CUDA GPU (use cpu or auto)")
        if dev.index is not None and dev.index >= count:
            raise PipelineError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif dev.type not in ("cpu", "mps"):
        raise PipelineError(f"device {device!r}: only cpu and cuda devices are supported")
    return dev


# ----------------------------------------------------------------------------- discovery


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def _is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def discover_cases(
    input_path: str | os.PathLike,
    modalities: Sequence[str] = ("CT", "MR"),
    min_slices: int = 8,
    series_uid: str | None = None,
) -> list[Case]:
    """The cases under ``input_path``, sorted by name.

    * a NIfTI (or NRRD/MHA) file: one case;
    * a DICOM file: its series (the other files of its folder tree are ignored);
    * a folder: every NIfTI file in it (not recursive), and every DICOM study in its tree;
      per study, the one series a model for ``modalities`` can use (`pick_image_series`), or
      the series ``series_uid``. A study with no usable series, or several, becomes a case
      that fails with a message listing its series.

    Unreadable DICOM files (truncated, corrupt) spoil the case whose folder holds them; one
    lying elsewhere is reported as a case of its own that fails.

    Raises:
        FileNotFoundError: ``input_path`` does not exist.
        PipelineError: nothing to segment was found.
    """
    from monai_sam.data.loading import is_dicom_path
    from monai_sam.io.dicom_series import DicomSeriesError, find_series, pick_image_series, series_folder

    root = Path(input_path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"input not found: {root}")
    cases: list[Case] = []
    if root.is_file():
        if _is_image_file(root) or not is_dicom_path(root):
            from monai_sam.segment import case_name

            return [Case(name=case_name(root), kind="nifti", source=str(root), path=root)]
        if series_uid is None:  # one file of a series stands for that series
            from monai_sam.io.dicom_series import read_header

            series_uid = str(read_header(root)[0].get("SeriesInstanceUID", "")) or None
        root = root.parent
    else:
        from monai_sam.segment import case_name

        for f in sorted(root.iterdir()):
            if f.is_file() and _is_image_file(f):
                cases.append(Case(name=case_name(f), kind="nifti", source=str(f), path=f))

    unreadable: list[tuple[Path, str]] = []
    found = find_series(root, unreadable=unreadable)
    studies: dict[str, list] = {}
    for s in found:
        studies.setdefault(s.study_uid, []).append(s)
    dicom_cases: list[Case] = []
    for study_uid, members in studies.items():
        folder = Path(os.path.commonpath([str(series_folder(s)) for s in members]))
        case = Case(name="", kind="dicom", source=str(folder), path=folder, study_uid=study_uid)
        where = f"DICOM study {study_uid} in {folder}"
        try:
            if series_uid is not None:
                chosen = [s for s in members if s.series_uid == series_uid]
                if not chosen:
                    raise DicomSeriesError(f"{where}: no series {series_uid}")
                picked = chosen[0]
            else:
                picked = pick_image_series(members, modalities, min_slices, where=where)
            case.path = series_folder(picked)
            case.series_uid = picked.series_uid
            case.source = f"{case.path} (series {picked.series_uid})"
        except DicomSeriesError as err:
            case.error = str(err)
        dicom_cases.append(case)
    if series_uid is not None:
        # the other studies of the tree are not what was asked for
        dicom_cases = [c for c in dicom_cases if c.series_uid == series_uid] or dicom_cases[:1]
    for path, message in unreadable:
        owner = [c for c in dicom_cases if c.path is not None and _inside(path, c.path)]
        if owner:
            for c in owner:
                c.error = c.error or message
        elif series_uid is None:
            dicom_cases.append(Case(name="", kind="dicom", source=str(path), path=path.parent, error=message))
        else:  # not part of the one series asked for
            logger.warning("ignoring an unreadable file outside series %s: %s", series_uid, message)

    # names: the series folder relative to the input folder; the study UID's hash on a clash
    for c in dicom_cases:
        rel = Path(c.path).relative_to(root) if c.path is not None and _inside(c.path, root) else Path()
        c.name = _safe("_".join(rel.parts) if rel.parts else root.name)
    _deduplicate(cases + dicom_cases)
    cases.extend(dicom_cases)
    if not cases:
        raise PipelineError(f"{root}: no NIfTI file and no DICOM file found")
    return sorted(cases, key=lambda c: c.name)


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _deduplicate(cases: list[Case]) -> None:
    seen: dict[str, int] = {}
    for c in cases:
        seen[c.name] = seen.get(c.name, 0) + 1
    for c in cases:
        if seen[c.name] > 1:
            key = c.study_uid or c.source
            c.name = f"{c.name}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def dicomweb_cases(url: str, study_uids: Sequence[str]) -> list[Case]:
    """One case per study UID on a DICOMweb server (fetched when its turn comes)."""
    return [
        Case(name=_safe(f"study_{uid}"), kind="dicomweb", source=f"{url} study {uid}", study_uid=uid)
        for uid in dict.fromkeys(study_uids)
    ]


# ----------------------------------------------------------------------------- one case


@dataclasses.dataclass(frozen=True)
class OutputNaming:
    """How a case's files are named, known before any model is built (a resumed run skips cases
    by their record without loading a model).

    ``main``: the first output's name (a bundle's ``outputs``: ``seg``, or ``seg_auto`` for a
    prompt-free bundle); ``prompt_free``: the model needs no prompts, so its names carry no
    ``_auto_prompts``.
    """

    main: str = "seg"
    prompt_free: bool = False

    def stem(self, case: Case, auto: bool, name: str | None = None) -> str:
        """``<case>_seg`` for prompt files, ``<case>_seg_auto_prompts`` for a bundle's automatic
        prompts, ``<case>_seg_auto`` for a prompt-free bundle; another ``name`` for a bundle's
        further outputs (``<case>_objects``...)."""
        suffix = "_auto_prompts" if auto and not self.prompt_free else ""
        return f"{case.name}_{name or self.main}{suffix}"


def output_stem(case: Case, auto: bool, naming: OutputNaming | None = None) -> str:
    """The stem of a case's main output and record (see `OutputNaming`)."""
    return (naming or OutputNaming()).stem(case, auto)


def _record_path(output_dir: Path, stem: str) -> Path:
    return output_dir / f"{stem}.json"


def _is_done(output_dir: Path, stem: str, dicom_seg: bool) -> bool:
    record = _record_path(output_dir, stem)
    if not record.is_file():
        return False
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    outputs = [output_dir / name for name in data.get("outputs", [])]
    wanted = {f"{stem}.nii.gz"} | ({f"{stem}.dcm"} if dicom_seg else set())
    return (
        data.get("format") == RECORD_FORMAT
        and data.get("status") == "done"
        and wanted <= set(data.get("outputs", []))
        and all(p.is_file() for p in outputs)
    )


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fp:
            json.dump(data, fp, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prompts_for(
    case: Case, prompts: Path | None, auto: bool, model: SegmentationModel | None, volume
) -> tuple[list, str]:
    """(objects, prompt source) for one case."""
    from monai_sam.io.prompt_file import load_prompt_file
    from monai_sam.prompts import PromptError

    if auto:
        objects = list(model.auto_prompter(volume))
        if not objects:
            raise PromptError(f"case {case.name}: the automatic prompter of {model.name} found no object")
        return objects, "automatic"
    assert prompts is not None
    path = prompts / f"{case.name}.json" if prompts.is_dir() else prompts
    if not path.is_file():
        raise FileNotFoundError(
            f"case {case.name}: no prompt file {path} (a folder of prompt files holds <case>.json)"
        )
    return list(load_prompt_file(path, volume)), "user"


def _segment_names(objects: Sequence, model: SegmentationModel) -> dict[int, str]:
    names = {}
    for obj in objects:
        oid = int(obj.object_id)
        names[oid] = obj.name or model.label_names.get(oid) or f"object {oid}"
    return dict(sorted(names.items()))


def _process(
    case: Case,
    get_model: Callable[[], SegmentationModel],
    modalities: tuple[str, ...],
    output_dir: Path,
    staging: Path,
    prompts: Path | None,
    auto: bool,
    dicom_seg: bool,
    progress: bool,
    dicomweb: Any | None,
    store: bool,
    min_slices: int,
    store_demo: bool = False,
    naming: OutputNaming | None = None,
) -> dict:
    """Segment one case into ``staging``; returns its record (outputs not yet moved into place).

    The model is asked for only once the input is loaded and checked, so that bad inputs fail
    fast, and a run whose cases all fail early never loads a model.
    """
    from monai_sam.data.loading import load_volume
    from monai_sam.inferers import SliceScores
    from monai_sam.io.dicom_seg import AlgorithmInfo, refuse_without_uids, write_dicom_seg
    from monai_sam.io.dicom_series import check_series, find_series, pick_image_series, select_series
    from monai_sam.segment import segment_volume, to_input_geometry, write_label

    if case.error:
        raise ValueError(case.error)
    naming = naming or OutputNaming()
    stem = naming.stem(case, auto)
    path, series_uid = case.path, case.series_uid
    if case.kind == "dicomweb":
        path, _ = dicomweb.fetch_study(case.study_uid, staging / "download", modalities)
        where = f"study {case.study_uid} from {dicomweb.url}"
        series_uid = pick_image_series(find_series(path), modalities, min_slices, where=where).series_uid
    series = None
    if case.kind in ("dicom", "dicomweb"):
        series = check_series(select_series(path, series_uid=series_uid))
        if dicom_seg:
            refuse_without_uids(series, output_dir / f"{stem}.dcm")  # before any model is built
        if series.modality.upper() not in modalities:
            raise ValueError(
                f"{case.source}: modality {series.modality or 'missing'}, but the model segments "
                f"{'/'.join(modalities)} volumes"
            )
    elif dicom_seg:
        raise ValueError(
            f"{case.source}: --dicom-seg needs a DICOM input (a {case.kind} file has no source series)"
        )
    volume = load_volume(path, series_uid=series_uid)
    if not auto:
        objects, source = _prompts_for(case, prompts, auto, None, volume)
    model = get_model()
    scores = SliceScores()
    if model.automatic is not None:  # a prompt-free bundle: its own steps, inferer and network
        objects, source = [], "none"
        label = to_input_geometry(model.automatic(volume), volume)
        names = {k: v for k, v in model.label_names.items() if k != 0}
    else:
        if auto:
            objects, source = _prompts_for(case, prompts, auto, model, volume)
        label = segment_volume(
            volume, objects, network=model.network, window=model.window, progress=progress,
            slice_scores=scores,
        )
        names = _segment_names(objects, model)
    how = "prompt-free" if source == "none" else f"{source} prompts"
    description = DEMO_TEXT if model.demo else f"monai-sam {model.name} ({how})"
    # the bundle's own post-processing (e.g. lesion objects -> tumour class); the first map is
    # the main one, written as <stem>.nii.gz, the others as <case>_<name>[_auto_prompts].nii.gz
    maps = model.postprocess(label)
    main_key = next(iter(model.outputs))
    main = maps[model.outputs[main_key]]
    # a class map (made by a post-processing step) is named by the model's labels, not the objects
    main_names = names if main_key == "pred" else {k: v for k, v in model.label_names.items() if k != 0}
    outputs = []
    for name, value in maps.items():
        file = f"{stem if value is main else naming.stem(case, auto, name)}.nii.gz"
        outputs.append(write_label(value, staging / file, description=description).name)
    seg_info: dict[str, Any] = {}
    if dicom_seg:
        algorithm = AlgorithmInfo(
            model.name, model.version, model.checkpoint_sha256, source, model.parameters, demo=model.demo
        )
        ds = write_dicom_seg(main, series, staging / f"{stem}.dcm", main_names, algorithm)
        outputs.append(f"{stem}.dcm")
        seg_info = {
            "seg_series_uid": str(ds.SeriesInstanceUID),
            "seg_sop_instance_uid": str(ds.SOPInstanceUID),
        }
        if case.kind == "dicomweb" and store and model.demo and not store_demo:
            logger.warning(
                "case %s: the SEG is a demo (random weights): not stored to %s (--store-demo to store it)",
                case.name, dicomweb.url,
            )
            seg_info["not_stored"] = "demo (random weights); --store-demo stores it"
        elif case.kind == "dicomweb" and store:
            dicomweb.store(staging / f"{stem}.dcm")
            seg_info["stored_to"] = dicomweb.url
    statistics, figures = _case_figures(label, volume, names, scores, model, staging, stem)
    outputs += figures
    found = sorted(int(v) for v in torch.unique(label).tolist() if v != 0)
    return {
        "format": RECORD_FORMAT,
        "status": "done",
        **({"demo": True, "warning": DEMO_TEXT} if model.demo else {"demo": False}),
        "case": case.name,
        "source": case.source,
        "study_uid": case.study_uid or (series.study_uid if series else None),
        "series_uid": series.series_uid if series else None,
        "prompts": source,
        "objects": {str(k): v for k, v in names.items()},
        "present_in_output": found,
        "model": model.name,
        "model_version": model.version,
        "checkpoint_sha256": model.checkpoint_sha256,
        "outputs": outputs,
        **seg_info,
        "statistics": statistics,
    }


def _case_figures(
    label, volume, names: dict[int, str], scores, model: SegmentationModel, staging: Path, stem: str
) -> tuple[dict, list[str]]:
    """Per-object figures (record + CSVs) and a preview PNG of one case, on its RAS grid.

    Returns the statistics and the names of the files written into ``staging``.
    """
    from monai.transforms import Orientation

    from monai_sam.evaluation.case_statistics import (
        case_statistics,
        write_slice_scores_csv,
        write_statistics_csv,
    )
    from monai_sam.evaluation.overlays import save_preview
    from monai_sam.segment import intensity_transform
    from monai_sam.transforms import CTWindow

    ras = Orientation(axcodes="RAS")(label)  # back on the volume's grid: slices = SAM2's frames
    if not np.allclose(np.asarray(ras.affine), np.asarray(volume.affine), atol=1e-3):
        raise RuntimeError(f"{volume.meta.get('filename_or_obj')}: the label is not on the volume's grid")
    ras_label = np.asarray(ras[0])
    image = np.asarray(volume[0], dtype=np.float32)
    # the intensity step SAM2 was fed (built, not applied again): a CT window means HU, and the
    # preview shows that same window; otherwise (MR) the preview's percentiles
    scale = intensity_transform(model.window, volume)
    window = (scale.hu_min, scale.hu_max) if isinstance(scale, CTWindow) else None
    stats = case_statistics(
        ras_label, image, np.asarray(volume.affine), names, scores, "HU" if window else "signal"
    )
    write_statistics_csv(stats, staging / f"{stem}_statistics.csv")
    write_slice_scores_csv(stats, staging / f"{stem}_slice_scores.csv")
    title = f"{stem} ({DEMO_TEXT})" if model.demo else stem
    spacing = [float(v) for v in np.asarray(volume.meta["spacing"]).reshape(-1)[:3]]
    save_preview(image, ras_label, staging / f"{stem}_preview.png", names, spacing, window, title)
    return stats, [f"{stem}_statistics.csv", f"{stem}_slice_scores.csv", f"{stem}_preview.png"]


def _commit(staging: Path, output_dir: Path, record: dict, stem: str) -> None:
    """Move the staged outputs into place, then write the record (the 'done' mark) last."""
    moved: list[Path] = []
    try:
        for name in record["outputs"]:
            target = output_dir / name
            os.replace(staging / name, target)
            moved.append(target)
        _write_json(_record_path(output_dir, stem), record)
    except BaseException:
        for p in moved:
            p.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- the run


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PipelineError(
            f"cannot write to output folder {output_dir}: {err.strerror or err} (check its permissions)"
        ) from err


def run_pipeline(
    cases: Sequence[Case],
    model_factory: Callable[[], SegmentationModel],
    output_dir: str | os.PathLike,
    prompts: str | os.PathLike | None = None,
    auto: bool = False,
    dicom_seg: bool = False,
    overwrite: bool = False,
    dicomweb: Any | None = None,
    store: bool = True,
    min_slices: int = 8,
    modalities: Sequence[str] = ("CT", "MR"),
    rank: int | None = None,
    world_size: int | None = None,
    store_demo: bool = False,
    naming: OutputNaming | None = None,
) -> dict:
    """Segment this process's share of ``cases``; returns (and writes) the summary.

    Args:
        cases: all cases of the run (every process gets the same list; see module doc).
        model_factory: builds the model, called once, and only if a case needs it (a resumed
            run with nothing left to do loads no model).
        output_dir: where ``<case>_seg.*``, ``<case>_seg.json`` and the summary go.
        prompts: a prompt file (one case) or a folder of ``<case>.json``; None with ``auto``.
        auto: prompts from the model's ``auto_prompter``; outputs are named ``*_seg_auto_prompts``.
        dicom_seg: also write a DICOM-SEG per DICOM case.
        overwrite: redo cases already done.
        dicomweb: a `monai_sam.io.dicomweb.DicomWebSource` for ``"dicomweb"`` cases.
        store: store each SEG back through DICOMweb (STOW-RS).
        store_demo: store it even when the model is a demo (random weights); without it a
            demo SEG never reaches the PACS.
        min_slices: fewest slices of a usable series (DICOMweb studies; see `discover_cases`).
        modalities: the image modalities the model segments (a bundle's metadata says which).
        rank, world_size: default to `rank_and_world`.
        naming: how outputs are named (`OutputNaming`; a bundle's: `monai_sam.bundle.output_naming`).

    Returns:
        The summary: counts and one entry per case of this process (status done / skipped /
        failed, error, seconds, outputs). Written to ``summary.json`` (``summary_rank<r>.json``
        with several processes).

    Raises:
        PipelineError: bad arguments or an unwritable output folder (before any case runs).
    """
    from tqdm import tqdm

    if auto == (prompts is not None):
        raise PipelineError(
            "give either prompts (a prompt file or a folder of <case>.json) or auto, not both"
        )
    prompts = Path(prompts) if prompts is not None else None
    if prompts is not None and not prompts.exists():
        raise PipelineError(f"prompts not found: {prompts}")
    if prompts is not None and prompts.is_file() and len(cases) > 1:
        raise PipelineError(
            f"{prompts} is one prompt file but the input holds {len(cases)} cases "
            f"({', '.join(c.name for c in cases[:5])}{'...' if len(cases) > 5 else ''}); give a folder of "
            "<case>.json prompt files instead"
        )
    if rank is None or world_size is None:
        rank, world_size, _ = rank_and_world()
    output_dir = Path(output_dir)
    _check_writable(output_dir)
    mine = list(cases)[rank::world_size]
    tag = f"rank {rank}/{world_size}: " if world_size > 1 else ""
    logger.info("%s%d case(s) of %d to segment into %s", tag, len(mine), len(cases), output_dir)

    model: SegmentationModel | None = None

    def get_model() -> SegmentationModel:
        nonlocal model
        if model is None:
            try:
                model = model_factory()
            except PipelineError:
                raise
            except Exception as err:  # the model is shared: no case can run without it
                raise PipelineError(f"cannot build the model: {type(err).__name__}: {err}") from err
        return model

    modalities = tuple(m.upper() for m in modalities)
    entries: list[dict] = []
    started = time.time()
    bar = tqdm(mine, desc=f"{tag}segment", unit="case", disable=len(mine) < 2)
    for case in bar:
        stem = output_stem(case, auto, naming)
        entry: dict[str, Any] = {"case": case.name, "source": case.source}
        if not overwrite and _is_done(output_dir, stem, dicom_seg):
            entry.update(status="skipped", record=str(_record_path(output_dir, stem)))
            logger.info(
                "%scase %s: skipped (already done: %s)", tag, case.name, _record_path(output_dir, stem)
            )
            entries.append(entry)
            continue
        t0 = time.time()
        for stale in output_dir.glob(f".{stem}.staging-*"):
            # left by a run that was killed; this case belongs to this process only, so nobody uses it
            logger.info("%scase %s: removing %s left by an interrupted run", tag, case.name, stale)
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{stem}.staging-", dir=output_dir))
        try:
            record = _process(
                case,
                get_model,
                modalities,
                output_dir,
                staging,
                prompts,
                auto,
                dicom_seg,
                progress=len(mine) == 1,
                dicomweb=dicomweb,
                store=store,
                min_slices=min_slices,
                store_demo=store_demo,
                naming=naming,
            )
            record["seconds"] = round(time.time() - t0, 2)
            record["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
            _commit(staging, output_dir, record, stem)
            entry.update(
                status="done", seconds=record["seconds"], outputs=record["outputs"], prompts=record["prompts"]
            )
            logger.info(
                "%scase %s: done in %.1f s (%d object(s), %s prompts; present: %s) -> %s",
                tag,
                case.name,
                record["seconds"],
                len(record["objects"]),
                record["prompts"],
                record["present_in_output"],
                ", ".join(str(output_dir / o) for o in record["outputs"]),
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except PipelineError:
            raise  # the model cannot be built: every case would fail the same way
        except Exception as err:  # one case's failure must not stop the others
            message = str(err) or type(err).__name__
            entry.update(
                status="failed",
                error=message,
                error_type=type(err).__name__,
                seconds=round(time.time() - t0, 2),
            )
            logger.error("%scase %s FAILED: %s", tag, case.name, message)
            logger.debug("case %s traceback", case.name, exc_info=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        entries.append(entry)

    counts = {s: sum(e["status"] == s for e in entries) for s in ("done", "skipped", "failed")}
    summary = {
        "rank": rank,
        "world_size": world_size,
        "cases": entries,
        "counts": counts,
        "seconds": round(time.time() - started, 2),
        "output_dir": str(output_dir),
    }
    name = "summary.json" if world_size == 1 else f"summary_rank{rank}.json"
    _write_json(output_dir / name, summary)
    logger.info(
        "%ssummary: %d case(s): %d done, %d skipped (already done), %d failed (%s)",
        tag,
        len(entries),
        counts["done"],
        counts["skipped"],
        counts["failed"],
        output_dir / name,
    )
    for e in entries:
        if e["status"] == "failed":
            logger.error("%s  failed: %s: %s", tag, e["case"], e["error"])
    return summary
