"""The model behind the app's infer tasks: weights, encoder features per image, propagation.

One `Sam2LabelEngine` is shared by the interactive and the automatic task of an app, so both
reuse the same encoder features of an image. Work on the model is serialised by a lock (a
MONAI Label server may run requests in threads); the feature store has its own lock, so
``/info`` never waits for a segmentation.

Weights, in this order (see `LabelModelSettings`):

1. a bundle with trained weights (``<bundle>/models/model.pt``): the bundle's own network with
   its trained parts over the frozen encoder (`monai_sam.bundle.load_bundle_model`), reloaded
   when training writes a new ``model.pt``;
2. otherwise an official SAM2 checkpoint (``checkpoint``) used as is;
3. otherwise random weights: a demo, and every log says so.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from monai_sam.demo import DEMO_TEXT
from monai_sam.label.feature_store import VolumeFeatures, VolumeFeatureStore
from monai_sam.label.prompting import ParsedRequest, VoxelMap
from monai_sam.networks.sam2_volume import VolumeFrames
from monai_sam.prompts import ObjectPrompts, PromptError

__all__ = ["LabelModelSettings", "ImageGeometry", "Sam2LabelEngine", "image_key"]

logger = logging.getLogger(__name__)

DEMO_WARNING = "random init / demo: no trained bundle weights and no checkpoint; the masks are not meaningful"


@dataclass
class LabelModelSettings:
    """Where the weights come from and how the app runs them (``--conf`` keys of the app)."""

    bundle: Path | None = None  # a bundle folder (configs/, models/)
    checkpoint: str | None = None  # official SAM2 .pt (the bundle's frozen encoder, or used alone)
    model_size: str = "sam2.1_hiera_t"
    image_size: int = 1024
    window: str | None = "auto"
    label_names: dict[int, str] = field(default_factory=lambda: {1: "object"})
    device: str = "auto"
    encoder_batch_size: int = 4
    feature_dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bf16 under CUDA autocast)
    cache_bytes: int = 8 << 30
    cache_entries: int = 4
    cache_age_s: float = 1800.0
    has_auto_prompter: bool = False
    demo: bool = False  # random encoder weights allowed (``--conf demo true``); results then say so

    @property
    def trained_model(self) -> Path | None:
        if self.bundle is None:
            return None
        path = self.bundle / "models" / "model.pt"
        return path if path.is_file() else None

    @property
    def labels(self) -> dict[str, int]:
        """MONAI Label's form: ``{name: id}`` without background."""
        return {name: int(i) for i, name in sorted(self.label_names.items()) if int(i) != 0}


@dataclass(frozen=True)
class ImageGeometry:
    """What is needed to map clicks and write labels for one image (no voxels)."""

    vmap: VoxelMap
    stored_affine: np.ndarray
    slice_size: tuple[int, int]  # (H, W) of a RAS axial slice
    num_slices: int
    source: str


def image_key(path: str | os.PathLike) -> tuple:
    """Identity of an image file or DICOM folder: its path and its files' sizes and times."""
    p = Path(path).resolve()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        sig = tuple((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        return (str(p), sig)
    st = p.stat()
    return (str(p), st.st_size, st.st_mtime_ns)


def _dtype(name: str, autocast: torch.dtype | None) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if autocast is not None else torch.float32
    if name not in table:
        raise ValueError(f"feature_dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


class Sam2LabelEngine:
    """Loads the model lazily, keeps per-image features, segments from parsed requests."""

    def __init__(self, settings: LabelModelSettings) -> None:
        self.settings = settings
        self.store = VolumeFeatureStore(settings.cache_bytes, settings.cache_entries, settings.cache_age_s)
        self._model_lock = threading.RLock()
        self._model: Any = None  # monai_sam.bundle.SegmentationModel
        self._weights_stamp: tuple | None = None
        self._auto: Callable | None = None
        self.weights_info: dict[str, Any] = {"loaded": False}

    # ------------------------------------------------------------------ weights
    def _stamp(self) -> tuple | None:
        path = self.settings.trained_model
        return (str(path), path.stat().st_mtime_ns) if path else None

    def _load(self) -> None:
        from monai_sam.bundle import load_bundle_model, load_checkpoint_model
        from monai_sam.pipeline import resolve_device

        s = self.settings
        device = resolve_device(s.device)
        stamp = self._stamp()
        if stamp is not None:
            model = None
            if s.has_auto_prompter:  # built with the network: they share the frozen encoder
                try:
                    model = load_bundle_model(
                        s.bundle, checkpoint=s.checkpoint, device=device, need_auto=True, demo=True
                    )
                except Exception as err:  # a broken prompter must not take the interactive task down
                    logger.error(
                        "bundle %s: its auto_prompter could not be built (%s); automatic task unavailable",
                        s.bundle,
                        err,
                    )
            if model is None:
                # random encoder weights got past the app only with --conf demo true (MonaiSamLabelApp)
                model = load_bundle_model(
                    s.bundle, checkpoint=s.checkpoint, device=device, need_auto=False, demo=True
                )
            source = f"bundle {s.bundle} (trained parts {stamp[0]})"
        else:
            if s.checkpoint is None:
                logger.warning(DEMO_WARNING)
            model = load_checkpoint_model(
                s.checkpoint,
                s.model_size,
                s.image_size,
                s.window,
                device,
                "auto",
                s.encoder_batch_size,
                demo=True,
            )
            source = f"official checkpoint {s.checkpoint}" if s.checkpoint else "random init / demo"
        self._auto = None  # rebuilt over the new weights when asked for
        net = model.network
        net.encoder_batch_size = int(s.encoder_batch_size)
        self._model = model
        self._weights_stamp = stamp
        self.store.clear()  # features include the decoder's trained projections: new weights, new features
        self.weights_info = {
            "loaded": True,
            "source": source,
            "model": model.name,
            "version": model.version,
            "image_size": int(net.image_size),
            "window": model.window if model.window is not None else s.window,
            "device": str(net.device),
        }
        logger.info("MONAI Label engine: weights from %s on %s", source, net.device)

    def model(self) -> Any:
        """The loaded `SegmentationModel`, (re)loaded when the bundle's trained weights change."""
        with self._model_lock:
            if self._model is None or self._stamp() != self._weights_stamp:
                self._load()
            return self._model

    def auto_prompter(self) -> Callable:
        """The bundle's ``auto_prompter`` (trained with the bundle's weights when it has them)."""
        from monai_sam.bundle import bundle_parser

        model = self.model()
        if model.auto_prompter is not None:
            return model.auto_prompter
        with self._model_lock:
            if self._auto is None:
                bundle = self.settings.bundle
                parser = bundle_parser(bundle) if bundle is not None else None
                if parser is None or parser.get("auto_prompter") is None:
                    raise PromptError(
                        f"bundle {bundle} has no automatic mode (no 'auto_prompter' in inference.yaml)"
                    )
                # no trained bundle weights: the prompter is built over the same base weights
                if self.settings.checkpoint:
                    parser["checkpoint"] = self.settings.checkpoint
                parser["device"] = f"$torch.device('{model.network.device}')"
                self._auto = parser.get_parsed_content("auto_prompter")
            return self._auto

    @property
    def window(self) -> str | None:
        m = self.model()
        return m.window if m.window is not None else self.settings.window

    # ------------------------------------------------------------------ images and features
    def load_image(self, path: str | os.PathLike) -> tuple[MetaTensor, MetaTensor]:
        """``(stored, ras)``: the volume as MONAI Label's clients index it, and reoriented to RAS."""
        from monai.transforms import Orientation

        from monai_sam.data.loading import LoadVolume

        stored = LoadVolume()(path)
        ras = Orientation(axcodes="RAS", labels=None)(stored)
        return stored, ras

    def _geometry(self, stored: MetaTensor, ras: MetaTensor, source: str) -> ImageGeometry:
        vmap = VoxelMap.from_affines(
            np.asarray(stored.affine, np.float64),
            np.asarray(ras.affine, np.float64),
            stored.shape[1:],
            source,
        )
        return ImageGeometry(
            vmap=vmap,
            stored_affine=np.asarray(stored.affine, np.float64),
            slice_size=(int(ras.shape[1]), int(ras.shape[2])),
            num_slices=int(ras.shape[3]),
            source=source,
        )

    def _encode(self, ras: MetaTensor, geometry: ImageGeometry) -> VolumeFeatures:
        from monai_sam.segment import intensity_transform
        from monai_sam.transforms import SamInput

        model = self.model()
        net = model.network
        scale = intensity_transform(self.window, ras)
        scaled = scale(ras) if scale is not None else ras
        scaled = scaled.as_tensor() if isinstance(scaled, MetaTensor) else torch.as_tensor(scaled)
        frames = VolumeFrames(scaled.float(), SamInput(net.image_size))
        dtype = _dtype(self.settings.feature_dtype, net.autocast_dtype)
        t0 = time.perf_counter()
        encoded = net.encode_volume(frames, dtype=dtype)
        features = VolumeFeatures(
            list(encoded["backbone_fpn"]), [p[:1] for p in encoded["vision_pos_enc"]], geometry=geometry
        )
        logger.info(
            "encoded %d slices of %s in %.1f s (%.0f MB of features, %s)",
            features.num_slices,
            geometry.source,
            time.perf_counter() - t0,
            features.nbytes / 2**20,
            dtype,
        )
        return features

    def features(self, path: str | os.PathLike) -> tuple[VolumeFeatures, bool, MetaTensor | None]:
        """``(features, cache hit, RAS volume if it was loaded)`` for an image."""
        self.model()  # (re)load weights first: a reload clears the store
        loaded: dict[str, MetaTensor] = {}

        def compute() -> VolumeFeatures:
            stored, ras = self.load_image(path)
            loaded["ras"] = ras
            geometry = self._geometry(stored, ras, str(path))
            with self._model_lock:
                return self._encode(ras, geometry)

        key: Hashable = (image_key(path), self._weights_stamp, str(self.window))
        entry, hit = self.store.get_or_compute(key, compute)
        return entry, hit, loaded.get("ras")

    # ------------------------------------------------------------------ segmentation
    def propagate(self, entry: VolumeFeatures, objects: Sequence[ObjectPrompts]) -> np.ndarray:
        """Object-id label map ``(X, Y, Z)`` on the RAS grid from prompts on the RAS grid."""
        from monai_sam.inferers import propagate_to_label

        geometry: ImageGeometry = entry.geometry
        with self._model_lock, torch.inference_mode():
            label = propagate_to_label(
                self.model().network,
                None,
                objects,
                features=entry.as_network_features(),
                original_size=geometry.slice_size,
            )
        return label.numpy().astype(np.int32)

    def segment(
        self,
        path: str | os.PathLike,
        prompts: Callable[[ImageGeometry, MetaTensor | None], ParsedRequest],
    ) -> tuple[str, dict[str, Any]]:
        """Segment ``path``; ``prompts(geometry, ras_volume_or_None)`` makes the prompts.

        Returns the label file (NIfTI on the stored grid, with the image's affine) and the
        result JSON (label names, what was prompted, whether the features came from the cache).
        """
        from monai_sam.segment import write_label

        t0 = time.perf_counter()
        entry, hit, ras = self.features(path)
        t1 = time.perf_counter()
        parsed = prompts(entry.geometry, ras)
        if not parsed.objects:
            raise PromptError(f"{path}: no object to segment")
        label = self.propagate(entry, parsed.objects)
        if parsed.bound is not None:
            label[~parsed.bound.mask(label.shape)] = 0
        t2 = time.perf_counter()
        geometry: ImageGeometry = entry.geometry
        stored = geometry.vmap.ras_to_stored_array(label)
        prefix = "monai_sam_label_demo_" if self.is_demo else "monai_sam_label_"
        fd, out = tempfile.mkstemp(suffix=".nii.gz", prefix=prefix)
        os.close(fd)
        write_label(
            MetaTensor(torch.as_tensor(stored)[None], affine=torch.as_tensor(geometry.stored_affine)), out
        )
        t3 = time.perf_counter()
        present = sorted(int(v) for v in np.unique(stored) if v != 0)
        result = {
            "label_names": {o.name: int(o.object_id) for o in parsed.objects},
            "prompts": parsed.summary(),
            "objects_found": present,
            "feature_cache": "hit" if hit else "miss",
            "weights": self.weights_info.get("source"),
            **({"demo": DEMO_TEXT} if self.is_demo else {}),
            "latencies": {
                "pre": round(t1 - t0, 3),
                "infer": round(t2 - t1, 3),
                "invert": 0,
                "post": 0,
                "write": round(t3 - t2, 3),
                "total": round(t3 - t0, 3),
                "transform": None,
            },
        }
        logger.info(
            "%s: %d object(s) in %.2f s (features %s, %.2f s; propagation %.2f s)",
            path,
            len(parsed.objects),
            t3 - t0,
            "cached" if hit else "encoded",
            t1 - t0,
            t2 - t1,
        )
        return out, result

    @property
    def is_demo(self) -> bool:
        """Random encoder weights: no official checkpoint under the served model."""
        return self.settings.checkpoint is None

    def prefetch(self, path: str | os.PathLike) -> threading.Thread:
        """Start encoding ``path`` in the background (the image a client is about to annotate).

        A click arriving meanwhile waits for this work instead of repeating it (the store computes
        an image once); the store's size and count caps evict the least recently used images.
        """

        def run() -> None:
            logger.info("%s: encoding in the background for the first click", path)
            try:
                _, hit, _ = self.features(path)
                if hit:
                    logger.info("%s: features already kept", path)
            except Exception as err:  # the next infer request reports it to the client
                logger.warning("%s: background encoding failed: %s", path, err)

        worker = threading.Thread(target=run, name=f"prefetch {Path(str(path)).name}", daemon=True)
        worker.start()
        return worker

    def info(self) -> dict[str, Any]:
        return {
            "feature_cache": self.store.info(),
            "weights": dict(self.weights_info),
            **({"demo": DEMO_TEXT} if self.is_demo else {}),
        }
