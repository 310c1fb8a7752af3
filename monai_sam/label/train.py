"""The app's train task: the bundle's own train workflow on the labels saved in the datastore.

MONAI Label's `BundleTrainTask` already runs a bundle's ``train.yaml`` with the datastore's
labeled images as ``train#dataset#data`` / ``validate#dataset#data``; this subclass only adapts
it to monai-sam bundles:

- the bundle's ``initialize`` step runs (it seeds the random-init demo encoder, so trained
  parts keep loading onto the same frozen weights);
- "pretrained" fine-tunes from ``models/model.pt`` through the bundle's ``trainable_checkpoint``
  (our checkpoints hold only the trained parts; MONAI Label's default loader expects a whole
  network) and starts at epoch 0 instead of resuming an older run's epoch counter;
- ``epochs`` (the learning-rate schedule) follows the requested ``max_epochs``;
- the frozen encoder is the one the app serves (``checkpoint``, ``model_size``, ``image_size``
  of ``--conf``, else the bundle's), so the new trained parts load onto it;
- with a single labeled image, validation runs on it too (logged), instead of failing.

The new ``models/model.pt`` is what the infer tasks load next (they watch the file).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import monai.bundle
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask

__all__ = ["Sam2BundleTrainTask"]

logger = logging.getLogger(__name__)


class Sam2BundleTrainTask(BundleTrainTask):
    """Train task of a monai-sam bundle folder (``configs/train.yaml``, ``metadata.json``)."""

    def __init__(self, bundle: str | os.PathLike, conf: dict[str, str] | None = None) -> None:
        self._request: dict[str, Any] = {}
        self._app_conf = dict(conf or {})
        super().__init__(str(Path(bundle).resolve()), conf or {})
        if not self.valid:
            raise ValueError(f"bundle {bundle}: no configs/train.yaml to train with")

    def config(self) -> dict[str, Any]:
        options = super().config()
        epochs = self.bundle_config.get("epochs")
        if isinstance(epochs, int):
            options["max_epochs"] = epochs
        options.pop("tracking", None)  # no experiment tracking wired into our bundles
        return options

    def _fetch_datalist(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, str]]:
        datalist = super()._fetch_datalist(request, datastore)
        if not datalist:
            raise ValueError(
                f"no labeled image in the datastore {datastore.name()}: save at least one final label "
                "(Slicer/OHIF 'Submit Label') before training"
            )
        return datalist

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, val = super()._partition_datalist(datalist, request, shuffle)
        if val is not None and not val:
            logger.warning("only %d labeled image(s): validating on the training image(s)", len(train))
            val = list(train)
        return train, val

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers) -> None:
        """Nothing here: `_update_overrides` loads our trainable-parts checkpoint instead."""

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        request = self._request
        max_epochs = int(request.get("max_epochs", overrides.get("train#trainer#max_epochs", 1)))
        overrides["epochs"] = max_epochs
        # the frozen encoder the app serves (its checkpoint, size and input size): the trained
        # parts must fit it, or the infer tasks would refuse the new model.pt
        from monai_sam.label.config import settings_from_conf

        served = settings_from_conf({**self._app_conf, "bundle": self.bundle_path})
        overrides.update(model_size=served.model_size, image_size=int(served.image_size))
        if served.checkpoint:
            overrides["checkpoint"] = str(served.checkpoint)
        models = Path(self.bundle_path) / "models"
        name = request.get("model_filename", "model.pt")
        name = name if isinstance(name, str) else name[0]
        start = models / name
        handlers: list[dict[str, Any]] = [
            {  # every epoch, atomically: what a crashed run could be restarted from
                "_target_": "CheckpointSaver",
                "save_dir": "@ckpt_dir",
                "save_dict": "@train#state",
                "save_interval": 1,
                "n_saved": 1,
            },
            "@train#model_record",  # the frozen encoder the app serves, for the reload after training
        ]
        if request.get("pretrained", True) and start.is_file():
            logger.info("fine-tuning from %s", start)
            handlers.insert(
                0,
                {
                    "_target_": "CheckpointLoader",
                    "load_path": str(start),
                    "load_dict": {"model": "@trainable_checkpoint"},
                    "map_location": "cpu",
                },
            )
        else:
            logger.info("training the bundle's trainable parts from their initial weights")
        overrides["train#checkpoint_handlers"] = handlers
        return overrides

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        self._request = dict(request)
        return super().__call__(request, datastore)

    def run_single_gpu(self, request: dict[str, Any], overrides: dict[str, Any]) -> None:
        configs = Path(self.bundle_path) / "configs"
        logging_file = configs / "logging.conf"
        monai.bundle.run(
            run_id="training",
            init_id="initialize",
            final_id=None,
            meta_file=self.bundle_metadata_path,
            config_file=self.bundle_config_path,
            logging_file=str(logging_file) if logging_file.is_file() else None,
            **overrides,
        )
