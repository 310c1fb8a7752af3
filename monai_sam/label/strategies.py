"""Next-sample strategies MONAI Label lacks: ``last`` beside its ``first`` and ``random``."""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

__all__ = ["Last"]

logger = logging.getLogger(__name__)


class Last(Strategy):
    """The unlabeled image whose id sorts last (MONAI Label's ``First`` takes the first)."""

    def __init__(self) -> None:
        super().__init__("Get Last Sample")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        logger.info("Last: selected image %s", images[-1])
        return {"id": images[-1]}
