"""Whole-volume evaluation of the memory network from prompts, on MONAI's SupervisedEvaluator."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.networks.utils import one_hot
from monai.utils import CommonKeys

from monai_sam.engines.feature_cache import FeatureCache
from monai_sam.engines.trainer import encoder_features, plain_tensor
from monai_sam.inferers.memory_propagation import propagate_to_label
from monai_sam.networks.sam2_volume import Sam2VolumeSegmenter, frames_from_sam_input

__all__ = ["PromptedVolumeEvaluator", "PRED_LABEL", "prepare_volume_with_prompts"]

PRED_LABEL = "pred_label"  # the integer label map, beside the one-hot "pred" the metric handlers read


class PromptedVolumeEvaluator(SupervisedEvaluator):
    """Propagates each volume's prompts through all its slices and scores the 3D result.

    Batch items (``collate_as_list``) hold ``image`` ``(3, S, S, T)`` (`SamInputd`), ``label``
    ``(1, H, W, T)`` at the volume's own grid and ``prompts`` in that grid. The output has
    one-hot ``pred`` / ``label`` ``(1, C, H, W, T)`` over ``num_classes`` for MONAI's metric
    handlers and the integer map under ``PRED_LABEL``.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network: Sam2VolumeSegmenter,
        num_classes: int,
        feature_cache: FeatureCache | None = None,
        threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(device=torch.device(device), val_data_loader=val_data_loader, network=network, **kwargs)
        self.num_classes = int(num_classes)
        self.feature_cache = feature_cache
        self.threshold = float(threshold)

    def _iteration(self, engine, batchdata: list[dict]) -> dict[str, Any]:  # type: ignore[override]
        if len(batchdata) != 1:
            raise ValueError(f"evaluate one volume per batch (batch_size 1), got {len(batchdata)}")
        item = batchdata[0]
        seg: Sam2VolumeSegmenter = self.network
        seg.eval()
        image, label, prompts = item[CommonKeys.IMAGE], item[CommonKeys.LABEL], item["prompts"]
        frames = frames_from_sam_input(plain_tensor(image))
        hw = tuple(int(v) for v in label.shape[-3:-1])
        features = None
        if self.feature_cache is not None:
            features = encoder_features(seg, frames, self.state.device, self.feature_cache)
        pred = propagate_to_label(seg, None if features is not None else frames, prompts, self.threshold,
                                  torch.float32, features=features, original_size=hw, output_size=hw)
        pred = pred[None].to(label.device)  # (1, H, W, T)
        engine.state.output = {
            CommonKeys.IMAGE: image,
            CommonKeys.LABEL: one_hot(torch.as_tensor(label)[None].long(), self.num_classes),
            CommonKeys.PRED: one_hot(pred[None].long(), self.num_classes),
            PRED_LABEL: pred,
            "label_map": label,
            "meta": getattr(label, "meta", {}),
        }
        return engine.state.output


def prepare_volume_with_prompts(batchdata: list[dict], device=None, non_blocking: bool = False, **_: Any):
    """`SupervisedEvaluator` ``prepare_batch`` for one volume and its prompts (``collate_as_list``).

    Returns ``(image, None, (), {"prompts": ...})`` so that MONAI's evaluator calls
    ``inferer(image, network, prompts=...)``; the image keeps its metadata for ``Invertd``.
    """
    if len(batchdata) != 1:
        raise ValueError(f"segment one volume per batch (batch_size 1), got {len(batchdata)}")
    item = batchdata[0]
    return item[CommonKeys.IMAGE], item.get(CommonKeys.LABEL), (), {"prompts": item["prompts"]}
