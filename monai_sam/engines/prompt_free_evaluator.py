"""Whole-volume evaluation of a prompt-free head, and the few-shot data helpers its bundles use.

`PromptFreeVolumeEvaluator` segments each validation volume automatically (no prompt) with
`monai_sam.inferers.PromptFreeSliceInferer` and scores the 3D result, with the same outputs as
`PromptedVolumeEvaluator` so that MONAI's metric handlers and `ClassMetricsWriter` read both.
Training samples single slices (``RandCropByLabelClassesd`` with ``spatial_size=(-1, -1, 1)``
gives a list of slices per volume), which `collate_slices` flattens into one list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.networks.utils import one_hot
from monai.utils import CommonKeys

from monai_sam.engines.evaluator import PRED_LABEL
from monai_sam.engines.feature_cache import FeatureCache
from monai_sam.engines.trainer import plain_tensor
from monai_sam.inferers.slice_inference import PromptFreeSliceInferer
from monai_sam.networks.prompt_free import PromptFreeSamSegmenter

__all__ = ["PromptFreeVolumeEvaluator", "collate_slices", "few_shot_datalist"]

logger = logging.getLogger(__name__)


def collate_slices(batch: Sequence[Any]) -> list[dict]:
    """A batch as one flat list of samples: lists of slices per volume are concatenated."""
    out: list[dict] = []
    for item in batch:
        out.extend(item if isinstance(item, list | tuple) else [item])
    return out


def few_shot_datalist(datalist: Sequence[dict], num_labeled: int | str = "all") -> list[dict]:
    """The first ``num_labeled`` cases of a (deterministically split) training list, or all of them.

    The few-shot budget of the paper: 1, 2, 4... labeled volumes. Asking for more cases than
    there are is an error (a silently smaller budget would make the comparison wrong).
    """
    cases = list(datalist)
    if isinstance(num_labeled, str):
        if num_labeled.strip().lower() == "all":
            return cases
        if not num_labeled.strip().isdigit():
            raise ValueError(f"num_labeled_volumes must be a positive integer or 'all', got {num_labeled!r}")
        num_labeled = int(num_labeled)
    n = int(num_labeled)
    if n < 1:
        raise ValueError(f"num_labeled_volumes must be at least 1, got {num_labeled}")
    if n > len(cases):
        raise ValueError(
            f"num_labeled_volumes={n} but the training split holds only {len(cases)} labeled volume(s)"
        )
    return cases[:n]


class PromptFreeVolumeEvaluator(SupervisedEvaluator):
    """Segments each volume slice by slice with a prompt-free head and scores it in 3D.

    Batch items (``collate_as_list``, one volume per batch) hold ``image`` ``(1, H, W, T)`` in
    ``[0, 1]`` (after the CT window / MR scaling, at the volume's own grid: the inferer resizes
    slices to the model input) and ``label`` ``(1, H, W, T)``. The output has one-hot ``pred`` /
    ``label`` ``(1, C, H, W, T)`` over background + the network's classes (for MONAI's metric
    handlers), the label map of object ids under ``PRED_LABEL`` and the truth as ``label_map``.

    Args:
        device: where the network runs.
        val_data_loader: the validation volumes.
        network: a `PromptFreeSamSegmenter`.
        feature_cache: cache of the frozen encoder's outputs (validation slices repeat every epoch).
        inferer: the slice inferer; default: whole slices resized to the model input, with the cache.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network: PromptFreeSamSegmenter,
        feature_cache: FeatureCache | None = None,
        inferer: PromptFreeSliceInferer | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        inferer = inferer or PromptFreeSliceInferer(feature_cache=feature_cache)
        if not isinstance(inferer, PromptFreeSliceInferer):
            raise TypeError(f"inferer must be a PromptFreeSliceInferer, got {type(inferer).__name__}")
        if inferer.output != "label":
            raise ValueError(f"the evaluator's inferer must output labels, not {inferer.output!r}")
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            **kwargs,
        )

    def _iteration(self, engine, batchdata: list[dict]) -> dict[str, Any]:  # type: ignore[override]
        if len(batchdata) != 1:
            raise ValueError(f"evaluate one volume per batch (batch_size 1), got {len(batchdata)}")
        item = batchdata[0]
        seg: PromptFreeSamSegmenter = getattr(self.network, "module", self.network)
        image, label = item[CommonKeys.IMAGE], item[CommonKeys.LABEL]
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(
                f"image {tuple(image.shape)} and label {tuple(label.shape)} of "
                f"{getattr(label, 'meta', {}).get('filename_or_obj', 'a case')} are on different grids"
            )
        pred = plain_tensor(
            self.inferer(plain_tensor(image).to(self.state.device), seg)
        ).cpu()  # (1, H, W, T)
        truth = torch.as_tensor(plain_tensor(label)).round().long()
        n = seg.num_classes
        engine.state.output = {
            CommonKeys.IMAGE: image,
            CommonKeys.LABEL: one_hot(seg.classes_from_label(truth)[None], n),
            CommonKeys.PRED: one_hot(seg.classes_from_label(pred.long())[None], n),
            PRED_LABEL: pred,
            "label_map": label,
            "overlay_image": plain_tensor(image)[0].cpu().numpy(),
            "meta": getattr(label, "meta", {}),
        }
        return engine.state.output
