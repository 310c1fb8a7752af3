"""Random weights only on request, and then said in every output.

A SAM2 network without an official checkpoint is randomly initialised: its masks look like
segmentations but mean nothing. A hospital pipeline must never write them into a results
folder or a PACS by accident, so every door (``monai-sam segment``, the batch pipeline, each
bundle's ``inference.yaml``) calls `require_weights` before it builds a model, and a run the
user marked as a demo labels its outputs with `DEMO_TEXT` / `DEMO_SUFFIX`.
"""

from __future__ import annotations

import os

__all__ = ["DEMO_TEXT", "DEMO_SUFFIX", "DEMO_CONTENT_LABEL", "DemoWeightsError", "require_weights", "demo_suffix"]

#: said by every demo output (record, NIfTI description, DICOM-SEG series description)
DEMO_TEXT = "DEMO random weights, not a segmentation"
#: appended to the file-name stem of a bundle's demo outputs
DEMO_SUFFIX = "_demo"
#: DICOM-SEG ContentLabel (CS, at most 16 upper-case characters) of a demo result
DEMO_CONTENT_LABEL = "MONAI_SAM_DEMO"


class DemoWeightsError(RuntimeError):
    """Random weights were about to be used without the user asking for a demo."""


def require_weights(checkpoint: str | os.PathLike | None, demo: bool, where: str, option: str = "--demo") -> bool:
    """True if the run uses random weights (a demo); raise unless the user asked for that.

    Args:
        checkpoint: the official SAM / SAM2 checkpoint the frozen encoder comes from (None: none).
        demo: the user's permission to run random weights.
        where: what is run, for the message (``"monai-sam segment"``, a bundle folder...).
        option: how the user gives that permission at this door (``--demo``, ``demo: true``).

    Raises:
        DemoWeightsError: no checkpoint and ``demo`` is false.
    """
    if checkpoint not in (None, ""):
        return False
    if not demo:
        raise DemoWeightsError(
            f"{where}: no checkpoint, so the model would run on random weights and its masks would mean "
            f"nothing. Give the official SAM2 checkpoint (e.g. --checkpoint sam2.1_hiera_tiny.pt, see "
            f"scripts/download_checkpoints.py), or {option} to run a demo whose outputs say so"
        )
    return True


def demo_suffix(checkpoint: str | os.PathLike | None) -> str:
    """`DEMO_SUFFIX` when there is no checkpoint (outputs of random weights), else ``""``."""
    return DEMO_SUFFIX if checkpoint in (None, "") else ""
