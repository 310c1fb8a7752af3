"""Automatic volume segmentation with a prompt-free head, slice by slice (MONAI's ``SliceInferer``).

A `monai_sam.networks.PromptFreeSamSegmenter` sees one axial slice at a time. This inferer
runs it over every slice of a ``[0, 1]`` volume (after the CT window / MR scaling) with
MONAI's ``SliceInferer`` (a ``SlidingWindowInferer`` over 2D windows of the axial slices):

- ``mode="resize"`` (what the bundles train with): each whole slice is one window, resized to
  the encoder's ``S x S`` by `monai_sam.transforms.SamInput` (the training transform) and the
  class probabilities resized back to the slice;
- ``mode="window"``: ``S x S`` windows at the slice's own resolution, overlapping by
  ``overlap`` and blended with Gaussian weights, for slices larger than the model input
  (train on ``S x S`` patches for this; smaller slices are padded).

Probabilities (softmax over background and the classes) are what is blended; the label is
their argmax, written as the network's ``object_ids``. The output is on the input's grid with
the input's metadata, so ``Invertd`` brings it back to the file's orientation.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SliceInferer
from monai.utils import convert_to_tensor
from torch import Tensor, nn

from monai_sam.networks.prompt_free import PromptFreeSamSegmenter
from monai_sam.transforms.sam_input import SamInput

__all__ = ["PromptFreeSliceInferer"]

logger = logging.getLogger(__name__)

Output = Literal["label", "probabilities", "both"]


def _segmenter(network: Any) -> PromptFreeSamSegmenter:
    net = getattr(network, "module", network)  # DistributedDataParallel
    if not isinstance(net, PromptFreeSamSegmenter):
        raise TypeError(f"network must be a PromptFreeSamSegmenter, got {type(net).__name__}")
    return net


class PromptFreeSliceInferer(Inferer):
    """``[0, 1]`` volume ``(C, H, W, T)`` -> label ``(1, H, W, T)`` of object ids (and/or probabilities).

    Args:
        mode: ``"resize"`` (whole slice resized to the model input) or ``"window"`` (``S x S``
            windows at native resolution, Gaussian-blended); see the module docstring.
        sw_batch_size: slices (windows) per network call.
        overlap: window overlap in ``"window"`` mode (fraction of ``S``).
        blend_mode: ``"gaussian"`` or ``"constant"`` weighting of overlapping windows.
        output: ``"label"``, ``"probabilities"`` (``(num_classes, H, W, T)``) or ``"both"`` (a tuple).
        feature_cache: a `monai_sam.engines.FeatureCache` for the frozen encoder's outputs
            (validation slices come back every epoch); None encodes every time.
        progress: tqdm bar over windows.
        sw_device, device: where windows run and where the output is assembled (MONAI's
            sliding-window arguments; default: the input's device).

    Call: ``inferer(inputs, network)`` with ``inputs`` ``(C, H, W, T)`` or ``(B, C, H, W, T)``
    (``C`` = 1 grey channel, or 3) and ``network`` a `PromptFreeSamSegmenter`. Batched input
    gives batched output. Runs without gradients.
    """

    def __init__(
        self,
        mode: Literal["resize", "window"] = "resize",
        sw_batch_size: int = 8,
        overlap: float = 0.25,
        blend_mode: str = "gaussian",
        output: Output = "label",
        feature_cache: Any = None,
        progress: bool = False,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("resize", "window"):
            raise ValueError(f"mode must be 'resize' or 'window', got {mode!r}")
        if output not in ("label", "probabilities", "both"):
            raise ValueError(f"output must be 'label', 'probabilities' or 'both', got {output!r}")
        if int(sw_batch_size) < 1 or not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"need sw_batch_size >= 1 and 0 <= overlap < 1, got {sw_batch_size}, {overlap}")
        self.mode = mode
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.blend_mode = blend_mode
        self.output = output
        self.feature_cache = feature_cache
        self.progress = bool(progress)
        self.sw_device = sw_device
        self.device = device

    def _predict_windows(self, seg: PromptFreeSamSegmenter, to_sam: SamInput):
        """The 2D network SliceInferer calls: ``(b, C, h, w)`` windows -> probabilities ``(b, K, h, w)``."""
        from monai_sam.engines.trainer import encoder_features  # engines import the inferers package

        def predict(windows: Tensor) -> Tensor:
            size = tuple(int(v) for v in windows.shape[-2:])
            # (b, C, h, w) -> (C, h, w, b): the same SamInput call as training on a slice stack
            frames = to_sam(convert_to_tensor(windows, track_meta=False).permute(1, 2, 3, 0))
            frames = convert_to_tensor(frames, track_meta=False).permute(3, 0, 1, 2).contiguous()
            features = encoder_features(seg, frames, seg.device, self.feature_cache)
            logits = seg(None, features=features, output_size=size)
            return torch.softmax(logits.float(), dim=1).to(windows.device)

        return predict

    def __call__(  # type: ignore[override]
        self, inputs: Tensor, network: nn.Module, *args: Any, **kwargs: Any
    ) -> Tensor | tuple[Tensor, Tensor]:
        seg = _segmenter(network)
        batched = inputs.ndim == 5
        x = inputs if batched else inputs[None]
        if x.ndim != 5 or x.shape[1] not in (1, 3):
            raise ValueError(
                "inputs must be a (C, H, W, T) or (B, C, H, W, T) volume with 1 or 3 channels, "
                f"got {tuple(inputs.shape)}"
            )
        plain = convert_to_tensor(x, track_meta=False).float()
        s = seg.image_size
        roi = tuple(int(v) for v in plain.shape[2:4]) if self.mode == "resize" else (s, s)
        sliding = SliceInferer(
            spatial_dim=2,
            roi_size=roi,
            sw_batch_size=self.sw_batch_size,
            overlap=0.0 if self.mode == "resize" else self.overlap,
            mode=self.blend_mode,
            progress=self.progress,
            sw_device=self.sw_device,
            device=self.device,
        )
        was_training = seg.training
        seg.eval()
        try:
            with torch.no_grad():
                probs = sliding(plain, self._predict_windows(seg, SamInput(s)))
        finally:
            seg.train(was_training)
        probs = probs.float()
        label = seg.label_from_classes(probs.argmax(dim=1, keepdim=True)).float()
        if not batched:
            label, probs = label[0], probs[0]
        if isinstance(inputs, MetaTensor):
            # the input's geometry and applied operations (batched or not), for Invertd
            label = MetaTensor(label).copy_meta_from(inputs)
            probs = MetaTensor(probs).copy_meta_from(inputs)
        if self.output == "label":
            return label
        if self.output == "probabilities":
            return probs
        return label, probs
