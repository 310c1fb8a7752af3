"""Segment a volume from prompts in one call: the library function behind ``monai-sam segment``.

``segment_volume(image, prompts, checkpoint=...)`` runs the whole path of docs/DESIGN.md for
promptable inference: load (NIfTI or a DICOM series, RAS) -> intensity (CT window or MR
percentiles to ``[0, 1]``) -> SAM input scaling, a chunk of slices at a time -> SAM2 memory
propagation from the prompted key slices -> label map back in the input's own orientation and
affine. `segment_to_file` also writes it as NIfTI, atomically.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from monai_sam.prompts import ObjectPrompts

__all__ = ["segment_volume", "segment_to_file", "intensity_transform", "write_label", "case_name"]

logger = logging.getLogger(__name__)


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def intensity_transform(window: str | None, image: MetaTensor | None = None) -> Callable | None:
    """The intensity step for ``window`` (the one place a name becomes a transform: the CLI, the
    pipeline, MONAI Label and the automatic prompters all use it).

    ``"auto"``: the abdomen CT window for CT (DICOM modality CT, or a NIfTI whose minimum is
    below -200, i.e. Hounsfield units), MR percentile scaling otherwise (needs ``image``). A CT
    preset name (``"abdomen"``, ``"liver"``, ``"bone"``... see `monai_sam.transforms.CT_WINDOWS`),
    ``"mr"`` (or ``"mr_percentiles"``) for MR percentiles, or None for an image already in
    ``[0, 1]`` (returns None).
    """
    from monai_sam.transforms import CT_WINDOWS, CTWindow, MRPercentileScale

    if window is None or str(window).lower() == "none":
        if image is None:
            return None
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            logger.warning(
                "window=None but intensities span [%.1f, %.1f], not [0, 1]: SAM will see them clipped", lo, hi
            )
        return None
    name = str(window).strip().lower()
    if name == "auto" and image is None:
        raise ValueError("window='auto' chooses from the image: give the image too")
    if name == "auto":
        modality = str(image.meta.get("modality", "")).upper()
        if modality == "CT" or (modality != "MR" and float(image.min()) < -200.0):
            name = "abdomen"
        else:
            name = "mr"
        logger.info("intensity: %s (window='auto', modality %s)", name, modality or "unknown")
    if name in ("mr", "mr_percentiles"):
        return MRPercentileScale()
    if name in CT_WINDOWS:
        return CTWindow(preset=name)
    raise ValueError(
        f"unknown intensity (window) {window!r}; use 'auto', 'mr', None or a CT preset: "
        f"{sorted(CT_WINDOWS)}"
    )


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    p = precision.lower()
    if p == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    table = {
        "float32": None,
        "fp32": None,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if p not in table:
        raise ValueError(f"precision must be 'auto', 'float32', 'bfloat16' or 'float16', got {precision!r}")
    if table[p] is torch.float16 and device.type != "cuda":
        raise ValueError("float16 autocast needs a CUDA device; use bfloat16 or float32 on CPU")
    return table[p]


def to_input_geometry(label: torch.Tensor, image: MetaTensor) -> MetaTensor:
    """A ``(1, X, Y, Z)`` label on ``image``'s RAS grid -> the input file's orientation and affine."""
    from monai.transforms import Orientation
    from nibabel.orientations import aff2axcodes

    original = _np(image.meta.get("original_affine", image.affine)).astype(np.float64)
    ras = MetaTensor(
        label, affine=image.affine, meta={"filename_or_obj": image.meta.get("filename_or_obj", "")}
    )
    out = Orientation(axcodes="".join(aff2axcodes(original)), labels=None)(ras)
    if not np.allclose(_np(out.affine), original, atol=1e-3):
        raise RuntimeError(
            f"{image.meta.get('filename_or_obj', 'image')}: could not restore the input orientation "
            f"(affine {np.round(_np(out.affine), 3).tolist()} vs original {np.round(original, 3).tolist()})"
        )
    out.meta["original_affine"] = original
    return out


def segment_volume(
    image: str | os.PathLike | MetaTensor,
    prompts: str | os.PathLike | Sequence[ObjectPrompts],
    checkpoint: str | os.PathLike | None = None,
    model_size: str = "sam2.1_hiera_t",
    image_size: int = 1024,
    window: str | None = "auto",
    device: str | torch.device = "auto",
    precision: str = "auto",
    encoder_batch_size: int = 8,
    network: Any | None = None,
    progress: bool = False,
    demo: bool = False,
    slice_scores: Any | None = None,
) -> MetaTensor:
    """Segment objects in a CT/MR volume from prompts on one or more key slices.

    Args:
        image: a NIfTI file, a DICOM series folder, or a volume already loaded by
            `monai_sam.data.loading.load_volume` (channel-first RAS MetaTensor).
        prompts: a prompt file (docs/prompt_file.md) or `ObjectPrompts` on the RAS array.
        checkpoint: official SAM2/SAM2.1 ``.pt`` of ``model_size``; None = random weights,
            refused unless ``demo`` (the output is then a demo, not a segmentation).
        model_size: ``sam2.1_hiera_t|s|b+|l`` or ``sam2_hiera_t|s|b+|l``.
        image_size: SAM2 input size in pixels (1024 for the official weights).
        window: intensity step, see `intensity_transform` (``"auto"``: CT window or MR percentiles).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"auto"`` (bf16 autocast on CUDA, float32 on CPU), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.
        encoder_batch_size: slices per image-encoder call (memory vs speed).
        network: a ready `Sam2VolumeSegmenter` to reuse (then checkpoint/model_size/image_size
            are not used).
        progress: tqdm bars over slices.
        demo: allow random weights (no ``checkpoint`` and no ``network``).
        slice_scores: a `monai_sam.inferers.SliceScores` to fill with SAM2's object score and
            predicted IoU per object and axial slice of the RAS volume.

    Returns:
        The label map ``(1, X, Y, Z)`` (object ids, 0 background) as a MetaTensor in the input
        file's orientation, with its affine (``meta["affine"]``) equal to the input's.
    """
    from monai_sam.bundle import load_checkpoint_model
    from monai_sam.data.loading import load_volume
    from monai_sam.demo import require_weights
    from monai_sam.inferers import MemoryPropagationInferer
    from monai_sam.io.prompt_file import load_prompt_file
    from monai_sam.transforms import SamInput

    if network is None:
        require_weights(checkpoint, demo, "segment_volume", option="demo=True")
    volume = image if isinstance(image, MetaTensor) else load_volume(image)
    objects = (
        list(prompts) if not isinstance(prompts, (str, os.PathLike)) else load_prompt_file(prompts, volume)
    )
    if network is None:  # the CLI's model for a bare checkpoint: one recipe
        dev = _device(device)
        network = load_checkpoint_model(
            checkpoint, model_size, image_size, window, dev, precision, encoder_batch_size, demo=demo
        ).network
    scale = intensity_transform(window, volume)
    scaled = scale(volume) if scale is not None else volume
    scaled = scaled.as_tensor() if isinstance(scaled, MetaTensor) else torch.as_tensor(scaled)
    inferer = MemoryPropagationInferer(preprocess=SamInput(network.image_size), progress=progress)
    label = inferer(scaled.float(), network, objects, slice_scores=slice_scores)
    out = to_input_geometry(label, volume)
    found = sorted(int(v) for v in torch.unique(out).tolist() if v != 0)
    logger.info("segmented %d object(s); present in the output: %s", len(objects), found)
    return out


def case_name(path: str | os.PathLike) -> str:
    """``/data/ct_001.nii.gz`` -> ``ct_001``; a DICOM folder -> its name."""
    name = Path(path).name
    return (
        re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd|\.dcm)$", "", name, flags=re.IGNORECASE)
        or "volume"
    )


def write_label(label: MetaTensor, path: str | os.PathLike, description: str | None = None) -> Path:
    """Write a ``(1, X, Y, Z)`` label as NIfTI with its affine: temp file + ``os.replace``.

    ``description`` goes to the header's ``descrip`` field (80 characters), what viewers show
    as the file's description (a demo result says so there).
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = _np(label)[0]
    top = int(arr.max()) if arr.size else 0
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
    affine = _np(label.affine).astype(np.float64)
    img = nib.Nifti1Image(np.rint(arr).astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:80]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def segment_to_file(image: str | os.PathLike, prompts, output_dir: str | os.PathLike, **kwargs) -> Path:
    """`segment_volume` then write ``<output_dir>/<case>_seg.nii.gz``; returns the path."""
    label = segment_volume(image, prompts, **kwargs)
    out = write_label(label, Path(output_dir) / f"{case_name(image)}_seg.nii.gz")
    logger.info("wrote %s", out)
    return out
