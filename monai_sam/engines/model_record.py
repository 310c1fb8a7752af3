"""What a trained bundle's frozen encoder was, written next to its ``model.pt``.

A bundle stores only the trained parts; they are valid over one frozen encoder: one model size,
one input size, one official checkpoint file, one intensity step. Training writes
``models/model_record.json`` with those settings and the label map it was trained with, so
that every door to the model (``monai.bundle run inference|evaluating``, ``monai-sam segment
--bundle``, MONAI Label) builds the same encoder without extra options, and refuses another
encoder file with a message that says which setting differs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from monai_sam.engines.checkpoint import CheckpointMismatchError
from monai_sam.utils import atomic_path, file_sha256

__all__ = [
    "MODEL_RECORD_NAME",
    "EncoderMismatchError",
    "ModelRecord",
    "ModelRecordWriter",
    "check_encoder",
    "read_model_record",
    "recorded",
]

logger = logging.getLogger(__name__)

MODEL_RECORD_NAME = "model_record.json"
RECORD_FORMAT = "monai-sam model record v1"


class EncoderMismatchError(CheckpointMismatchError):
    """The encoder asked for is not the one the trained parts were fitted on."""


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """The frozen encoder and labels of a trained bundle.

    Attributes:
        model_size: official size name (``sam2.1_hiera_t``...).
        image_size: encoder input side in pixels.
        checkpoint: file name of the official checkpoint (None: random init, a demo).
        checkpoint_sha256: its SHA-256 (None with no checkpoint).
        preprocessing: the intensity settings the encoder saw (``{"window": "abdomen"}``...).
        label_names: ``{id: name}`` the trained parts predict.
        frozen_identity: hash of the frozen weights (`TrainableCheckpoint.frozen_identity`).
        inference: how the trained parts must run, e.g. ``{"multimask_fallback": False}``
            (`monai_sam.networks.Sam2VolumeSegmenter`); empty in records written before it.
    """

    model_size: str
    image_size: int
    checkpoint: str | None
    checkpoint_sha256: str | None
    preprocessing: dict[str, Any]
    label_names: dict[int, str]
    frozen_identity: str
    inference: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["label_names"] = {str(k): v for k, v in self.label_names.items()}
        return {"format": RECORD_FORMAT, **data}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelRecord:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable model record ({err})") from err
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError(f"{path}: not a monai-sam model record (format {data.get('format')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{path}: model record without {missing}")
        values = {k: data[k] for k in fields if k in data}
        values["label_names"] = {int(k): str(v) for k, v in dict(data["label_names"]).items()}
        values["image_size"] = int(values["image_size"])
        return cls(**values)

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def read_model_record(ckpt_dir: str | os.PathLike) -> ModelRecord | None:
    """The record in a bundle's ``models`` folder; None when training has not written one."""
    path = Path(ckpt_dir) / MODEL_RECORD_NAME
    return ModelRecord.from_file(path) if path.is_file() else None


def recorded(record: ModelRecord | None, key: str, default: Any) -> Any:
    """``record.<key>`` (``"preprocessing.window"`` reaches into a dict), or ``default`` without
    a record or that entry: lets a config take a trained setting."""
    if record is None:
        return default
    head, _, rest = key.partition(".")
    value = getattr(record, head)
    return value.get(rest, default) if rest else value


def check_encoder(
    record: ModelRecord | None,
    checkpoint: str | os.PathLike | None,
    model_size: str,
    image_size: int,
    where: str = "bundle",
) -> None:
    """Raise `EncoderMismatchError` naming each setting that differs from what ``record`` says.

    Checked before any network is built: the official file by its SHA-256 (a renamed copy is
    the same weights; a different file of the same name is not).
    """
    if record is None:
        return
    problems = []
    if str(model_size) != record.model_size:
        problems.append(f"model size {model_size} (trained with {record.model_size})")
    if int(image_size) != record.image_size:
        problems.append(f"image size {int(image_size)} px (trained at {record.image_size} px)")
    trained_on = (
        f"{record.checkpoint} (SHA-256 {record.checkpoint_sha256[:12]}...)"
        if record.checkpoint and record.checkpoint_sha256
        else "random init (a demo)"
    )
    if checkpoint is None and record.checkpoint_sha256:
        problems.append(f"weights: no checkpoint given, but the encoder was {trained_on}")
    elif checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{where}: checkpoint {checkpoint} does not exist")
        sha = file_sha256(checkpoint)
        if sha != record.checkpoint_sha256:
            problems.append(f"weights: {checkpoint} (SHA-256 {sha[:12]}...), but the encoder was {trained_on}")
    if problems:
        raise EncoderMismatchError(
            f"{where}: its trained parts do not fit the encoder asked for: " + "; ".join(problems)
        )


class ModelRecordWriter:
    """Writes the `ModelRecord` beside the trained weights when training starts.

    The frozen encoder does not change during training, so one write at the start keeps the
    record true for every ``model.pt`` that run saves (only rank 0 writes under DDP).

    Args:
        ckpt_dir: the bundle's ``models`` folder.
        model_size, image_size, checkpoint: the encoder (``checkpoint`` None: random init).
        preprocessing: the intensity settings, e.g. ``{"window": "abdomen"}``.
        label_names: ``{id: name}`` trained.
        trainable_checkpoint: gives ``frozen_identity``.
        inference: the settings inference must run the trained parts with (`ModelRecord`).
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        model_size: str,
        image_size: int,
        checkpoint: str | os.PathLike | None,
        preprocessing: Mapping[str, Any],
        label_names: Mapping[int, str],
        trainable_checkpoint: Any,
        inference: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(ckpt_dir) / MODEL_RECORD_NAME
        self.model_size, self.image_size, self.checkpoint = str(model_size), int(image_size), checkpoint
        self.preprocessing = dict(preprocessing)
        self.label_names = {int(k): str(v) for k, v in dict(label_names).items()}
        self.trainable_checkpoint = trainable_checkpoint
        self.inference = dict(inference or {})

    def record(self) -> ModelRecord:
        return ModelRecord(
            model_size=self.model_size,
            image_size=self.image_size,
            checkpoint=Path(self.checkpoint).name if self.checkpoint else None,
            checkpoint_sha256=file_sha256(self.checkpoint) if self.checkpoint else None,
            preprocessing=json.loads(json.dumps(self.preprocessing, default=str)),
            label_names=self.label_names,
            frozen_identity=self.trainable_checkpoint.frozen_identity,
            inference=json.loads(json.dumps(self.inference, default=str)),
        )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        self.record().write(self.path)
        logger.info("model record: %s", self.path)
