"""Build SAM2 / SAM2.1 / SAM models at the official sizes and load official checkpoints safely.

The models are built by ``sam2``'s own builder and packaged hydra configs
(``configs/sam2.1/sam2.1_hiera_t.yaml``...) and by ``segment_anything``'s registry; only the
checkpoint loading is ours, because the upstream loaders unpickle arbitrary objects
(SAM v1) or fail without saying why (SAM2). Here a checkpoint is read with
``torch.load(..., weights_only=True)``, loaded strictly, and a checkpoint of another size
fails with a message naming the size asked for and the size the file looks like.

Sizes (the official names): ``sam2.1_hiera_t|s|b+|l``, ``sam2_hiera_t|s|b+|l`` and
``sam_vit_b|l|h`` (``vit_b|l|h`` accepted). SAM2 runs at any ``image_size`` divisible by 32
(1024 is what the official weights were trained at); SAM v1's registry fixes 1024 px.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "ModelSpec",
    "SAM2_MODEL_SIZES",
    "SAM_MODEL_SIZES",
    "MODEL_SIZES",
    "canonical_model_size",
    "sam2_hydra_overrides",
    "build_sam2_model",
    "build_sam2_video_predictor_model",
    "build_sam_model",
    "build_model",
    "read_state_dict",
    "checkpoint_model_size",
    "load_checkpoint",
    "freeze",
    "freeze_image_encoder",
    "count_parameters",
]

logger = logging.getLogger(__name__)

RANDOM_INIT_WARNING = "random init / demo: no checkpoint given, outputs are not meaningful"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded onto the model that was asked for."""


@dataclass(frozen=True)
class ModelSpec:
    """One official model size: where its config and weights live."""

    name: str
    family: str  # "sam2" (SAM2 and SAM2.1) or "sam"
    config: str  # hydra config name inside the sam2 package, or the segment_anything registry key
    checkpoint_file: str
    url: str
    md5: str | None = None  # published checksum where one exists (SAM v1 file names carry it)


_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2"
_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything"
_HIERA = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}

SAM2_MODEL_SIZES: dict[str, ModelSpec] = {}
for _short, _long in _HIERA.items():
    SAM2_MODEL_SIZES[f"sam2.1_hiera_{_short}"] = ModelSpec(
        f"sam2.1_hiera_{_short}",
        "sam2",
        f"configs/sam2.1/sam2.1_hiera_{_short}.yaml",
        f"sam2.1_hiera_{_long}.pt",
        f"{_SAM2_URL}/092824/sam2.1_hiera_{_long}.pt",
    )
for _short, _long in _HIERA.items():
    SAM2_MODEL_SIZES[f"sam2_hiera_{_short}"] = ModelSpec(
        f"sam2_hiera_{_short}",
        "sam2",
        f"configs/sam2/sam2_hiera_{_short}.yaml",
        f"sam2_hiera_{_long}.pt",
        f"{_SAM2_URL}/072824/sam2_hiera_{_long}.pt",
    )

SAM_MODEL_SIZES: dict[str, ModelSpec] = {
    "sam_vit_b": ModelSpec(
        "sam_vit_b",
        "sam",
        "vit_b",
        "sam_vit_b_01ec64.pth",
        f"{_SAM_URL}/sam_vit_b_01ec64.pth",
        "01ec64d29a2fca3f0661936605ae66f8",
    ),
    "sam_vit_l": ModelSpec(
        "sam_vit_l",
        "sam",
        "vit_l",
        "sam_vit_l_0b3195.pth",
        f"{_SAM_URL}/sam_vit_l_0b3195.pth",
        "0b3195507c641ddb6910d2bb5adee89c",
    ),
    "sam_vit_h": ModelSpec(
        "sam_vit_h",
        "sam",
        "vit_h",
        "sam_vit_h_4b8939.pth",
        f"{_SAM_URL}/sam_vit_h_4b8939.pth",
        "4b8939a88964f0f4ff5f5b2642c598a6",
    ),
}
MODEL_SIZES: dict[str, ModelSpec] = {**SAM2_MODEL_SIZES, **SAM_MODEL_SIZES}

# (trunk embed dim, number of Hiera blocks) -> size letter; (ViT embed dim) -> SAM v1 size
_HIERA_SIGNATURES = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}
_VIT_SIGNATURES = {768: "sam_vit_b", 1024: "sam_vit_l", 1280: "sam_vit_h"}


def canonical_model_size(name: str) -> str:
    """The official name for ``name`` (``vit_b`` -> ``sam_vit_b``); error listing the sizes."""
    key = str(name).strip().lower()
    if key in ("vit_b", "vit_l", "vit_h"):
        key = f"sam_{key}"
    if key not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}; sizes are {', '.join(MODEL_SIZES)}")
    return key


def _check_image_size(image_size: int) -> int:
    s = int(image_size)
    # the Hiera trunk downsamples by 32 and the memory attention needs a square stride-16 map
    if s < 64 or s % 32:
        raise ValueError(f"image_size must be a multiple of 32 and at least 64 px, got {image_size}")
    return s


def sam2_hydra_overrides(image_size: int = 1024, video_postprocessing: bool = True) -> list[str]:
    """Hydra overrides that set SAM2's input size (and what depends on it).

    ``image_size`` drives the prompt encoder, the mask decoder and the memory encoder inside
    ``SAM2Base``; the memory attention's rotary encoding is built for ``feat_sizes`` (64x64 =
    1024/16 in the configs) and would only be recomputed lazily on the first call, so it is set
    here to ``image_size / 16`` as well. ``video_postprocessing`` adds the settings
    ``build_sam2_video_predictor`` uses (binarised prompted masks in the memory), so that the
    propagation matches SAM2's video predictor.
    """
    s = _check_image_size(image_size)
    feat = s // 16
    overrides = [
        f"++model.image_size={s}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
    ]
    if video_postprocessing:
        overrides.append("++model.binarize_mask_from_pts_for_mem_enc=true")
    return overrides


def _compose_guard():
    """Make sure hydra knows sam2's config module (another library may have re-initialised it)."""
    import sam2  # noqa: F401  (initialises hydra with sam2's configs on first import)
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if gh.is_initialized():
        try:
            if gh.config_loader().repository.config_exists("configs/sam2.1/sam2.1_hiera_t.yaml"):
                return
        except Exception as err:  # hydra internals differ between versions; fall back to re-init
            logger.debug("could not query hydra's config repository: %s", err)
        logger.warning("hydra was initialised by another library without sam2's configs; re-initialising it")
        gh.clear()
    initialize_config_module("sam2", version_base="1.2")


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _build_sam2(
    builder,
    model_size: str,
    checkpoint,
    image_size,
    device,
    mode,
    video_postprocessing,
    extra_overrides: Sequence[str],
) -> nn.Module:
    name = canonical_model_size(model_size)
    spec = MODEL_SIZES[name]
    if spec.family != "sam2":
        raise ValueError(f"{name} is a SAM v1 model; use build_sam_model")
    _compose_guard()
    overrides = sam2_hydra_overrides(image_size, video_postprocessing) + list(extra_overrides)
    # ckpt_path=None: sam2's loader is replaced by our safe, strict one below
    model = builder(spec.config, ckpt_path=None, device="cpu", mode=mode, hydra_overrides_extra=overrides)
    load_checkpoint(model, checkpoint, name)
    return model.to(_resolve_device(device))


def build_sam2_model(
    model_size: str = "sam2.1_hiera_t",
    checkpoint: str | os.PathLike | None = None,
    image_size: int = 1024,
    device: str | torch.device = "cpu",
    mode: str = "eval",
    video_postprocessing: bool = True,
    extra_overrides: Sequence[str] = (),
    memory_attention_dropout: float | None = None,
):
    """A ``SAM2Base`` built by ``sam2.build_sam.build_sam2`` from its packaged config.

    Args:
        model_size: ``sam2.1_hiera_t|s|b+|l`` or ``sam2_hiera_t|s|b+|l``.
        checkpoint: official ``.pt`` file (``{"model": state_dict}``); None = random weights
            (logged as a WARNING: outputs are then not meaningful).
        image_size: side of the square encoder input in pixels (multiple of 32).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        mode: ``"eval"`` or ``"train"`` (as in sam2's builder).
        video_postprocessing: use the video predictor's settings (see `sam2_hydra_overrides`).
        extra_overrides: more hydra overrides, e.g. ``["++model.num_maskmem=5"]``.
        memory_attention_dropout: every dropout of the memory attention (its layers' and their
            attentions'); None keeps the config's (0.1). Only training reads it: 0 suits a random
            memory, which has nothing learnt to regularise (and dropout is 30 % of its step on CPU).
    """
    from sam2.build_sam import build_sam2

    if memory_attention_dropout is not None:
        extra_overrides = [*extra_overrides] + [
            f"++model.memory_attention.layer.{part}dropout={float(memory_attention_dropout)}"
            for part in ("", "self_attention.", "cross_attention.")
        ]
    return _build_sam2(
        build_sam2, model_size, checkpoint, image_size, device, mode, video_postprocessing, extra_overrides
    )


def build_sam2_video_predictor_model(
    model_size: str = "sam2.1_hiera_t",
    checkpoint: str | os.PathLike | None = None,
    image_size: int = 1024,
    device: str | torch.device = "cpu",
    extra_overrides: Sequence[str] = (),
):
    """``sam2``'s own ``SAM2VideoPredictor`` (the reference for oracle tests and benchmarks)."""
    from sam2.build_sam import build_sam2_video_predictor

    return _build_sam2(
        build_sam2_video_predictor, model_size, checkpoint, image_size, device, "eval", False, extra_overrides
    )


def build_sam_model(
    model_size: str = "sam_vit_b",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
):
    """A SAM v1 ``Sam`` from ``segment_anything.sam_model_registry`` (1024 px, fixed there).

    Official SAM v1 files are a bare state dict; ``{"model": state_dict}`` is accepted too.
    """
    from segment_anything import sam_model_registry

    name = canonical_model_size(model_size)
    spec = MODEL_SIZES[name]
    if spec.family != "sam":
        raise ValueError(f"{name} is a SAM2 model; use build_sam2_model")
    model = sam_model_registry[spec.config](checkpoint=None)
    load_checkpoint(model, checkpoint, name)
    return model.to(_resolve_device(device))


def build_model(model_size: str, checkpoint=None, image_size: int = 1024, device="cpu", **kwargs):
    """Dispatch on the family of ``model_size`` (SAM v1 ignores ``image_size``: it is 1024)."""
    name = canonical_model_size(model_size)
    if MODEL_SIZES[name].family == "sam":
        if int(image_size) != 1024:
            raise ValueError(
                f"{name}: segment_anything's registry builds SAM v1 at 1024 px only, got {image_size}"
            )
        return build_sam_model(name, checkpoint, device)
    return build_sam2_model(name, checkpoint, image_size, device, **kwargs)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``): ``{"model": sd}`` or a bare ``sd``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{p}: cannot be read as a weights-only torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{p}: expected a state dict of tensors (or {{'model': state_dict}}), found {keys}"
        )
    return dict(obj)


def checkpoint_model_size(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which official size a state dict looks like, from key and shape signatures.

    SAM2: the Hiera trunk's embed dim and number of blocks give the size; the SAM2.1-only
    ``no_obj_embed_spatial`` parameter tells 2.1 from 2. SAM v1: the ViT embed dim.
    Returns a description (``"an unknown model"`` style) when nothing matches.
    """
    w = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if w is not None:
        blocks = {
            int(m.group(1))
            for k in state_dict
            if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))
        }
        version = "sam2.1" if "no_obj_embed_spatial" in state_dict else "sam2"
        size = _HIERA_SIGNATURES.get((int(w.shape[0]), len(blocks)))
        if size is None:
            return f"a {version} Hiera of unknown size (embed dim {int(w.shape[0])}, {len(blocks)} blocks)"
        return f"{version}_hiera_{size}"
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is not None:
        return _VIT_SIGNATURES.get(
            int(w.shape[0]), f"a SAM ViT of unknown size (embed dim {int(w.shape[0])})"
        )
    return f"an unknown model (first keys: {list(state_dict)[:3]})"


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | None, model_size: str) -> nn.Module:
    """Load ``checkpoint`` strictly onto ``model`` (built as ``model_size``); None = random init."""
    name = canonical_model_size(model_size)
    if checkpoint is None:
        logger.warning("%s (model %s)", RANDOM_INIT_WARNING, name)
        return model
    state_dict = read_state_dict(checkpoint)
    found = checkpoint_model_size(state_dict)
    if found != name:
        hint = f"build it with model_size={found!r} or use" if found in MODEL_SIZES else "use"
        raise CheckpointError(
            f"{checkpoint}: the model was built as {name} but the checkpoint looks like {found}; "
            f"{hint} a {name} checkpoint"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:600]
        raise CheckpointError(
            f"{checkpoint}: does not fit {name} (checkpoint looks like {found}): {detail}"
        ) from err
    logger.info("loaded %s weights from %s", name, checkpoint)
    return model


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def freeze_image_encoder(model: nn.Module) -> nn.Module:
    """Freeze the image encoder (SAM2 and SAM v1 both call it ``image_encoder``).

    The mask decoder's ``conv_s0``/``conv_s1`` (SAM2's high-resolution projections) stay
    trainable: they belong to the decoder, not to the encoder whose outputs are cached.
    """
    if not hasattr(model, "image_encoder"):
        raise TypeError(f"{type(model).__name__} has no image_encoder to freeze")
    freeze(model.image_encoder)
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
