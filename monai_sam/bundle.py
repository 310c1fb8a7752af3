"""One model behind every door: a bundle (or a bare official checkpoint) parsed once.

The CLI (``monai-sam segment``), the batch pipeline and the MONAI Label app all ask this module
for a `SegmentationModel`; a bundle's own ``inference.yaml`` runs the same objects. A bundle is
read from its configs, not re-derived in Python: ``network`` with ``trainable_checkpoint``
loaded from ``models/model.pt``, the frozen encoder its training recorded
(``models/model_record.json``: model size, image size, checkpoint SHA-256, window, labels), its
``window``, ``label_names``, ``auto_prompter`` and its post-processing (``outputs`` and
``postprocessing_steps`` of inference.yaml: e.g. the liver bundle's lesion merge into a class
map beside the object map).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BundleError",
    "SegmentationModel",
    "bundle_parser",
    "bundle_trained_model",
    "output_naming",
    "load_bundle_model",
    "load_checkpoint_model",
    "require_bundle_weights",
]

logger = logging.getLogger(__name__)

#: the label map a model without a bundle writes: batch key -> output name
DEFAULT_OUTPUTS: dict[str, str] = {"pred": "seg"}


class BundleError(RuntimeError):
    """A bundle that cannot serve: missing configs or keys, no trained weights, another encoder."""


@dataclasses.dataclass
class SegmentationModel:
    """What a case needs from a model: the network, how to feed it, and what to write.

    ``outputs`` maps batch keys to output names (``{"pred": "seg"}``: ``<case>_seg.nii.gz``);
    ``postprocessing_steps`` are the bundle's own dict transforms that make the other keys from
    ``"pred"`` (the object-id map on the input's grid). The first output is the main one
    (DICOM-SEG, statistics, preview).
    """

    network: Any  # Sam2VolumeSegmenter
    window: str | None
    label_names: dict[int, str]
    name: str
    version: str
    checkpoint_sha256: str
    modalities: tuple[str, ...] = ("CT", "MR")
    auto_prompter: Callable | None = None
    parameters: dict[str, str] = dataclasses.field(default_factory=dict)
    demo: bool = False  # random weights (`monai_sam.demo`): every output says so
    outputs: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_OUTPUTS))
    postprocessing_steps: tuple[Callable, ...] = ()
    # a prompt-free bundle's inference on a loaded RAS volume -> label on the same grid
    automatic: Callable | None = None

    def postprocess(self, label: Any) -> dict[str, Any]:
        """``{output name: map}`` from the object-id map ``label`` (``(1, X, Y, Z)``, input grid)."""
        d: dict[str, Any] = {"pred": label}
        for step in self.postprocessing_steps:
            d = dict(step(d))
        return {name: d[key] for key, name in self.outputs.items()}



def _sha256_or(path: str | os.PathLike | None) -> str:
    from monai_sam.utils import file_sha256

    return file_sha256(path) if path else "random init / demo"


def load_checkpoint_model(
    checkpoint: str | os.PathLike | None,
    model_size: str = "sam2.1_hiera_t",
    image_size: int = 1024,
    window: str | None = "auto",
    device: str | torch.device = "cpu",
    precision: str = "auto",
    encoder_batch_size: int = 8,
    demo: bool = False,
) -> SegmentationModel:
    """An official SAM2 checkpoint used as is, without a bundle.

    Without ``checkpoint`` the weights are random: refused unless ``demo`` (`monai_sam.demo`).
    """
    from monai_sam.demo import require_weights
    from monai_sam.networks import Sam2VolumeSegmenter, build_sam2_model
    from monai_sam.segment import _autocast_dtype

    is_demo = require_weights(checkpoint, demo, "monai-sam segment")
    dev = torch.device(device)
    model = build_sam2_model(model_size, checkpoint, image_size=image_size, device=dev)
    network = Sam2VolumeSegmenter(
        model, encoder_batch_size=encoder_batch_size, autocast_dtype=_autocast_dtype(precision, dev)
    )
    network.eval()
    return SegmentationModel(
        network=network,
        window=window,
        label_names={},
        name=str(model_size),
        version="official" if checkpoint else "random init / demo",
        checkpoint_sha256=_sha256_or(checkpoint),
        parameters={"image_size": str(image_size), "window": str(window)},
        demo=is_demo,
    )


def bundle_parser(bundle_dir: str | os.PathLike, need_auto: bool = False):
    """A ``ConfigParser`` over the bundle's train.yaml (if any) and inference.yaml, rooted at ``bundle_dir``.

    Raises:
        BundleError: no inference.yaml, a key the pipeline needs is missing, or ``need_auto``
            and no ``auto_prompter`` (checked without building anything).
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    configs = bundle_dir / "configs"
    if not (configs / "inference.yaml").is_file():
        raise BundleError(f"bundle {bundle_dir}: no configs/inference.yaml (is it a MONAI bundle folder?)")
    files = [f for f in (configs / "train.yaml", configs / "inference.yaml") if f.is_file()]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    if (configs / "metadata.json").is_file():
        parser.read_meta(str(configs / "metadata.json"))
    parser["bundle_root"] = str(bundle_dir)
    for key in ("network", "trainable_checkpoint", "image_size"):
        if parser.get(key) is None:
            raise BundleError(
                f"bundle {bundle_dir}: its configs ({', '.join(f.name for f in files)}) define no '{key}'"
            )
    if need_auto and parser.get("auto_prompter") is None and not parser.get("prompt_free"):
        raise BundleError(
            f"bundle {bundle_dir} has no automatic mode: its inference.yaml defines no 'auto_prompter' "
            "(use --prompts with prompt files instead)"
        )
    return parser


def bundle_trained_model(parser, bundle_dir: str | os.PathLike) -> Path:
    """The bundle's ``trained_model`` file (default ``models/model.pt``); raise if it is missing."""
    bundle_dir = Path(bundle_dir)
    trained = Path(parser.get_parsed_content("trained_model")) if parser.get("trained_model") else None
    trained = trained or bundle_dir / "models" / "model.pt"
    if not trained.is_file():
        raise BundleError(
            f"bundle {bundle_dir} has no trained weights at {trained}: train it first "
            f"(python -m monai.bundle run training --config_file {bundle_dir / 'configs' / 'train.yaml'}) "
            "or copy its model.pt there"
        )
    return trained


def require_bundle_weights(parser, bundle_dir: str | os.PathLike, demo: bool) -> bool:
    """Raise if the bundle has no trained weights, or (unless ``demo``) its frozen encoder has
    no checkpoint; True for a demo. Trained weights first: ``--demo`` cannot stand in for them."""
    from monai_sam.demo import require_weights

    bundle_trained_model(parser, bundle_dir)
    base = parser.get_parsed_content("checkpoint") if parser.get("checkpoint") else None
    return require_weights(base, demo, f"bundle {bundle_dir}")


def load_bundle_model(
    bundle_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    need_auto: bool = False,
    demo: bool = False,
) -> SegmentationModel:
    """The trained network of a bundle, parsed from its configs (no ``monai.bundle run``).

    Reads ``configs/train.yaml`` (if present) and ``configs/inference.yaml`` with
    ``bundle_root`` set to ``bundle_dir``; takes ``network``, ``trainable_checkpoint`` (loaded
    from ``trained_model``, by default ``models/model.pt``), ``image_size``, ``window``,
    ``label_names``, ``outputs`` and ``postprocessing_steps``, and ``auto_prompter`` when
    present. The model size, image size and window come from the bundle's model record
    (``models/model_record.json``) through its inference.yaml; the labels too. ``checkpoint``
    overrides the bundle's ``checkpoint`` (the official weights of the frozen encoder the bundle
    was trained on) and must be that file (checked by SHA-256 against the record).

    A bundle without trained weights is an error: a user who names a bundle expects its
    trained model, and the bundle's own inference refuses the same way. A bundle whose frozen
    encoder has no official checkpoint runs random weights: refused unless ``demo``.

    Raises:
        BundleError: missing configs or keys, no trained weights, weights from another
            encoder, or ``need_auto`` and no ``auto_prompter``; the message names the bundle.
    """
    import monai

    from monai_sam.engines import CheckpointMismatchError, check_encoder

    bundle_dir = Path(bundle_dir)
    parser = bundle_parser(bundle_dir, need_auto=need_auto)
    if checkpoint is not None:
        parser["checkpoint"] = str(checkpoint)
    is_demo = require_bundle_weights(parser, bundle_dir, demo)
    parser["device"] = f"$torch.device('{torch.device(device)}')"
    trained = bundle_trained_model(parser, bundle_dir)
    record = _parsed(parser, "model_record", None)
    base = parser.get_parsed_content("checkpoint") if parser.get("checkpoint") else None
    try:
        check_encoder(
            record, base, parser.get_parsed_content("model_size"), parser.get_parsed_content("image_size"),
            where=f"bundle {bundle_dir}",
        )
    except CheckpointMismatchError as err:
        raise BundleError(str(err)) from err
    if parser.get("seed") is not None:
        # the bundle's workflows seed before building: a random-init (demo) encoder is then the
        # same one the trained parts were stamped with
        monai.utils.set_determinism(seed=parser.get_parsed_content("seed"))
    network = parser.get_parsed_content("network")
    prompt_free = bool(parser.get("prompt_free"))
    if not prompt_free:
        _require_volume_network(network, bundle_dir)
    trainable = parser.get_parsed_content("trainable_checkpoint")
    try:
        trainable.load_file(trained)
    except CheckpointMismatchError as err:
        hint = "" if checkpoint else " (pass the base encoder's official weights with --checkpoint)"
        raise BundleError(f"bundle {bundle_dir}: {err}{hint}") from err
    network = network.to(torch.device(device))
    network.eval()
    meta = parser.get("_meta_") or {}
    # the labels the trained parts predict (the record's), else the configs'
    label_names = record.label_names if record is not None else _parsed(parser, "label_names", {})
    window = _parsed(parser, "window", "auto")
    modality = (
        meta.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("modality")
        if isinstance(meta, dict)
        else None
    )
    # built only when asked for: an automatic prompter has its own network and weights
    auto = parser.get_parsed_content("auto_prompter") if need_auto and not prompt_free else None
    logger.info(
        "bundle %s: trained parts from %s, frozen encoder from %s",
        bundle_dir,
        trained,
        base or "random init / demo",
    )
    return SegmentationModel(
        network=network,
        window=window,
        label_names={int(k): str(v) for k, v in dict(label_names).items() if int(k) != 0},
        name=bundle_dir.resolve().name,
        version=str(meta.get("version", "unknown")) if isinstance(meta, dict) else "unknown",
        checkpoint_sha256=_sha256_or(trained),
        modalities=(str(modality).upper(),) if modality else ("CT", "MR"),
        auto_prompter=auto,
        parameters={
            "image_size": str(parser.get_parsed_content("image_size")),
            "window": str(window),
            "base_checkpoint_sha256": _sha256_or(base),
        },
        demo=is_demo,
        outputs=dict(_parsed(parser, "outputs", DEFAULT_OUTPUTS)),
        postprocessing_steps=tuple(_parsed(parser, "postprocessing_steps", ())),
        automatic=BundleInference(parser, network) if prompt_free else None,
    )


class BundleInference:
    """A prompt-free bundle's own inference on one loaded volume: its ``preprocessing`` steps
    (without the loader: the caller has loaded and checked the volume), ``inferer`` and
    ``network``. The label comes back on the volume's (RAS) grid."""

    def __init__(self, parser, network: Any) -> None:
        from monai.transforms import LoadImaged

        from monai_sam.data.loading import LoadVolumed

        steps = parser.get_parsed_content("preprocessing")
        steps = getattr(steps, "transforms", steps)
        self.steps = [t for t in steps if not isinstance(t, (LoadVolumed, LoadImaged))]
        self.inferer = parser.get_parsed_content("inferer")
        self.network = network

    def __call__(self, volume: Any) -> Any:
        d: dict[str, Any] = {"image": volume}
        for step in self.steps:
            d = dict(step(d))
        device = next(self.network.parameters()).device
        with torch.inference_mode():
            label = self.inferer(d["image"].to(device), self.network)
        return label.cpu()


def output_naming(parser) -> Any:
    """`monai_sam.pipeline.OutputNaming` of a bundle, from its configs without building anything:
    the first of its ``outputs`` names the main file; a ``prompt_free`` bundle's names carry no
    ``_auto_prompts``."""
    from monai_sam.pipeline import OutputNaming

    outputs = parser.get("outputs") or DEFAULT_OUTPUTS
    main = str(next(iter(dict(outputs).values())))
    return OutputNaming(main=main, prompt_free=bool(parser.get("prompt_free")))


def _require_volume_network(network: Any, bundle_dir: Path) -> None:
    """These doors propagate prompts through CT/MR volumes: a promptable SAM2 memory network."""
    from monai_sam.networks import Sam2VolumeSegmenter
    from monai_sam.networks.sam_image import Sam2ImageSegmenter

    if not isinstance(network, Sam2VolumeSegmenter) or isinstance(network, Sam2ImageSegmenter):
        raise BundleError(
            f"bundle {bundle_dir}: its network is a {type(network).__name__}, not a promptable SAM2 "
            "volume network (Sam2VolumeSegmenter); run it with its own inference: python -m monai.bundle "
            f"run inference --config_file {bundle_dir / 'configs' / 'inference.yaml'}"
        )


def _parsed(parser, key: str, default: Any) -> Any:
    return parser.get_parsed_content(key) if parser.get(key) is not None else default
