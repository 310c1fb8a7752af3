"""From a ``[0, 1]`` slice stack to what the SAM/SAM2 image encoder expects.

The encoders were trained on RGB images resized to a square (1024 px for SAM and SAM2) and
normalised with the ImageNet mean/std. A grey slice is therefore replicated to three channels,
resized in-plane (the frame axis, i.e. the axial slices, is left alone) and normalised.

SAM v1 writes its normalisation on 0-255 pixels, ``pixel_mean = (123.675, 116.28, 103.53)`` and
``pixel_std = (58.395, 57.12, 57.375)``; divided by 255 these are exactly the ImageNet values
on ``[0, 1]`` used here (and by SAM2), so one transform serves both.

Labels are not passed through this transform: they stay at the original slice size and the
model wrapper resizes its logits back to it (the original size is kept in the image's
metadata, ``"sam_original_size"``, and in MONAI's ``applied_operations`` so that ``Invertd``
restores the in-plane size of anything that went through the resize).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import (
    InvertibleTransform,
    MapTransform,
    NormalizeIntensity,
    RepeatChannel,
    Resize,
    Transform,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SAM_ORIGINAL_SIZE_KEY", "SamInput", "SamInputd"]

#: ImageNet per-channel mean and std for RGB images in ``[0, 1]`` (SAM2's normalisation).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Meta key holding the in-plane size ``(H, W)`` before resizing.
SAM_ORIGINAL_SIZE_KEY = "sam_original_size"


class SamInput(InvertibleTransform, Transform):
    """Replicate to RGB, resize in-plane to ``image_size`` squared, normalise with ImageNet stats.

    Args:
        image_size: side ``S`` of the square encoder input in pixels (1024 for the official
            SAM/SAM2 checkpoints; smaller for tests or fine-tuned low-resolution models).
        mean: per-channel mean of ``[0, 1]`` RGB input, 3 values.
        std: per-channel standard deviation of ``[0, 1]`` RGB input, 3 values.
        mode: interpolation of the in-plane resize (``"bilinear"`` as SAM2's own transforms;
            ``"nearest"`` or ``"area"`` also accepted). A 3D stack is resized with the
            matching 3D mode and an unchanged frame axis, which is the same per-slice resize.

    Input: ``(1, H, W, T)`` or ``(3, H, W, T)`` slice stack, or a single slice ``(1|3, H, W)``,
    with intensities in ``[0, 1]`` (after `CTWindow` / `MRPercentileScale`).
    Output: ``(3, S, S, T)`` (resp. ``(3, S, S)``) float tensor. ``inverse`` undoes the resize
    (back to ``(3, H, W[, T])``); the channel replication and normalisation are not undone.
    """

    backend = Resize.backend

    def __init__(
        self,
        image_size: int = 1024,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        mode: str = "bilinear",
    ) -> None:
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
        if mode not in ("bilinear", "nearest", "area", "nearest-exact"):
            raise ValueError(f"mode must be 'bilinear', 'nearest', 'nearest-exact' or 'area', got {mode!r}")
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        s = self.image_size
        # one resizer per dimensionality: torch needs 'trilinear' for a 3D grid; with the frame
        # axis kept (-1 = unchanged size, scale 1) trilinear is exactly bilinear per slice
        self.resize_2d = Resize(spatial_size=(s, s), mode=mode)
        self.resize_3d = Resize(spatial_size=(s, s, -1), mode="trilinear" if mode == "bilinear" else mode)
        self.to_rgb = RepeatChannel(repeats=3)
        self.normalize = NormalizeIntensity(subtrahend=self.mean, divisor=self.std, channel_wise=True)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        if img.ndim not in (3, 4) or img.shape[0] not in (1, 3):
            raise ValueError(
                "SamInput expects a channel-first slice stack (1|3, H, W, T) or slice (1|3, H, W), "
                f"got shape {tuple(img.shape)}"
            )
        original_size = tuple(int(v) for v in img.shape[1:3])
        resizer = self.resize_3d if img.ndim == 4 else self.resize_2d
        # resize the grey channel before replicating it: 3x less interpolation
        out = resizer(img.float() if isinstance(img, torch.Tensor) else img.astype("float32"))
        if out.shape[0] == 1:
            out = self.to_rgb(out)
        out = self.normalize(out)
        if isinstance(out, MetaTensor):
            out.meta[SAM_ORIGINAL_SIZE_KEY] = original_size
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Resize back to the original in-plane size (recorded by MONAI's ``Resize``)."""
        resizer = self.resize_3d if data.ndim == 4 else self.resize_2d
        out = resizer.inverse(data)
        if isinstance(out, MetaTensor):
            out.meta.pop(SAM_ORIGINAL_SIZE_KEY, None)
        return out


class SamInputd(InvertibleTransform, MapTransform):
    """Dict version of `SamInput` for image keys (labels stay at their original size).

    Args:
        keys: image keys to convert.
        image_size, mean, std, mode: see `SamInput`.
        allow_missing_keys: don't raise if a key is absent.
    """

    backend = SamInput.backend

    def __init__(
        self,
        keys: KeysCollection,
        image_size: int = 1024,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        mode: str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = SamInput(image_size=image_size, mean=mean, std=std, mode=mode)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter.inverse(d[key])
        return d
