"""Our checkpoints: the trained parts only, stamped with the identity of the frozen parts.

A frozen encoder is hundreds of MB that the user already has (the official file), so our
checkpoints keep only what training changed. Loading them onto other frozen weights would
silently produce garbage, so the identity of the frozen weights is stored and checked.

Format v2 (``"monai-sam trainable parts v2"``): the trained tensors are top-level entries named
as in the bundle's ``network_def`` (e.g. ``model.sam_mask_decoder...`` for a
`Sam2VolumeSegmenter`), beside the metadata (``model_name``, ``trainable``,
``base_checkpoint``, ``frozen_identity``). MONAI's ``CheckpointLoader(load_dict={"model":
network_def}, strict=False)`` therefore loads a bundle's ``model.pt`` into the network (the
frozen encoder comes from the official file; strict loading would ask for it too) without the
identity check; `TrainableCheckpoint.load_state_dict` does the check. v1 files (tensors under
``"weights"``, model names) still load.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_sam.engines.feature_cache import encoder_identity
from monai_sam.engines.trainer import TRAINABLE_PARTS, _part_of
from monai_sam.networks.sam2_volume import Sam2VolumeSegmenter

__all__ = [
    "CheckpointMismatchError",
    "TrainableCheckpoint",
    "latest_checkpoint",
    "load_trained_parts",
    "trained_weights",
]

FORMAT_V1 = "monai-sam trainable parts v1"
FORMAT_V2 = "monai-sam trainable parts v2"
_METADATA = ("format", "model_name", "trainable", "base_checkpoint", "frozen_identity", "weights_prefix")

logger = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint trained on other frozen weights (another encoder, size or checkpoint)."""


class TrainableCheckpoint:
    """``state_dict`` / ``load_state_dict`` of a model's trained parts, for MONAI's checkpoint handlers.

    Args:
        model: a ``SAM2Base`` (a `Sam2VolumeSegmenter` is unwrapped to it), SAM's ``Sam`` or a
            prompt-free segmenter: parameter names decide the parts (`TRAINABLE_PARTS`).
        model_name: the official size name, stored for the error messages.
        trainable: the trained parts (keys of `TRAINABLE_PARTS`).
        base_checkpoint: the official file the frozen parts came from (None: random init).
        network: the module whose parameter names the file uses (the bundle's ``network_def``,
            which holds ``model``); None: ``model`` itself.
    """

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        trainable: Sequence[str],
        base_checkpoint: str | None = None,
        network: nn.Module | None = None,
    ) -> None:
        # the SAM2Base inside a Sam2VolumeSegmenter (parameter names as in the official file)
        if network is None and isinstance(model, Sam2VolumeSegmenter):
            network = model
        self.model = model.model if isinstance(model, Sam2VolumeSegmenter) else model
        self.network = network if network is not None else self.model
        self.model_name = model_name
        self.trainable = list(trainable)
        unknown = set(self.trainable) - set(TRAINABLE_PARTS)
        if unknown:
            raise ValueError(f"unknown trainable part(s) {sorted(unknown)}")
        self.base_checkpoint = str(base_checkpoint) if base_checkpoint else None
        self._identity: str | None = None

    @property
    def frozen_identity(self) -> str:
        """Hash of every frozen weight (computed once: frozen weights do not change)."""
        if self._identity is None:
            frozen = nn.ParameterDict(
                {n.replace(".", "/"): p for n, p in self.model.named_parameters() if not self._is_trained(n)}
            )
            self._identity = encoder_identity(self.model_name, frozen, int(getattr(self.model, "image_size", 0)))
        return self._identity

    def _is_trained(self, name: str) -> bool:
        return _part_of(name) in self.trainable

    def load_file(self, path: str | Path) -> None:
        """Load one of our checkpoint files (``{"model": ...}`` as ignite saves several objects,
        or the bare state), safely (``weights_only``); errors name the file."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and "frozen_identity" not in state:
            state = state["model"]
        try:
            self.load_state_dict(state)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"{path}: {err}") from None

    def _network_names(self) -> dict[str, str]:
        """Model tensor name -> the name the same tensor has in ``network``."""
        if self.network is self.model:
            return {n: n for n in self.model.state_dict()}
        where = {id(t): n for n, t in self.network.state_dict(keep_vars=True).items()}
        names = {n: where.get(id(t)) for n, t in self.model.state_dict(keep_vars=True).items()}
        missing = [n for n, w in names.items() if w is None and self._is_trained(n)]
        if missing:
            raise ValueError(f"the network does not hold the model's trained tensors {missing[:3]}")
        return {n: w for n, w in names.items() if w is not None}

    def state_dict(self) -> dict[str, Any]:
        names = self._network_names()
        weights = {
            names[k]: v.detach().cpu() for k, v in self.model.state_dict().items() if self._is_trained(k)
        }
        trained = [k for k in names if self._is_trained(k)]
        prefixes = {names[k][: len(names[k]) - len(k)] for k in trained if names[k].endswith(k)}
        return {
            "format": FORMAT_V2,
            "model_name": self.model_name,
            "trainable": self.trainable,
            "base_checkpoint": self.base_checkpoint or "random init / demo",
            "frozen_identity": self.frozen_identity,
            # what the network adds to the model's names ("model."): lets the bare model load it
            "weights_prefix": prefixes.pop() if len(prefixes) == 1 else "",
            **weights,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        if not isinstance(state, dict) or "frozen_identity" not in state:
            raise CheckpointMismatchError("not a monai-sam checkpoint (no 'frozen_identity')")
        if state.get("model_name") != self.model_name or state["frozen_identity"] != self.frozen_identity:
            raise CheckpointMismatchError(
                f"checkpoint was trained on {state.get('model_name')} with frozen weights from "
                f"{state.get('base_checkpoint')} (identity {str(state['frozen_identity'])[:12]}), but this model is "
                f"{self.model_name} with frozen weights from {self.base_checkpoint or 'random init / demo'} "
                f"(identity {self.frozen_identity[:12]}); load it onto the encoder it was trained with"
            )
        if state.get("format") == FORMAT_V1:
            weights = dict(state["weights"])
        else:
            to_model = {w: n for n, w in self._network_names().items()}
            prefix = str(state.get("weights_prefix", ""))
            weights = {
                to_model.get(k, k.removeprefix(prefix) if k not in to_model else k): v
                for k, v in state.items()
                if k not in _METADATA
            }
        result = self.model.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if self._is_trained(k)]
        if strict and (missing or result.unexpected_keys):
            raise CheckpointMismatchError(
                f"checkpoint does not match the trained parts {self.trainable}: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )


def trained_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained tensors of one of our checkpoints (either format), named as in the model
    (the official file's names: ``sam_mask_decoder...``), without the network's prefix."""
    if state.get("format") == FORMAT_V1:
        return dict(state["weights"])
    prefix = str(state.get("weights_prefix", ""))
    return {k.removeprefix(prefix): v for k, v in state.items() if k not in _METADATA}


def latest_checkpoint(directory: str | Path, pattern: str = "*.pt") -> Path | None:
    """The most recently written checkpoint in ``directory`` (None when there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    files = [p for p in directory.glob(pattern) if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


def load_trained_parts(model: nn.Module, path: str | Path, model_name: str, trainable: Sequence[str],
                       base_checkpoint: str | None = None) -> None:
    """Load a training checkpoint (ours: ``{"model": {...}}`` or the bare dict) onto ``model``."""
    TrainableCheckpoint(model, model_name, trainable, base_checkpoint).load_file(path)
    logger.info("loaded trained parts %s from %s", list(trainable), path)
