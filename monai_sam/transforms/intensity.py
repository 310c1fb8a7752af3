"""Intensity presets: CT windows in Hounsfield units and MR percentile scaling, both to ``[0, 1]``.

SAM/SAM2 were trained on natural images whose pixels live in ``[0, 1]`` before ImageNet
normalisation (`monai_sam.transforms.SamInput`). CT keeps its physical unit (HU), so a fixed
window picks the tissue contrast the radiologist would look at; MR has no unit, so robust
percentiles of each volume define the range instead. Both only wrap MONAI's
``ScaleIntensityRange`` / ``ScaleIntensityRangePercentiles`` with ``clip=True``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles, Transform
from monai.transforms.utils_pytorch_numpy_unification import concatenate, percentile

__all__ = [
    "CT_WINDOWS",
    "ct_window_range",
    "CTWindow",
    "CTWindowd",
    "MRPercentileScale",
    "MRPercentileScaled",
]

#: CT window presets as ``(width, level)`` in Hounsfield units. Values are the usual reading
#: windows (Radiopaedia "Windowing (CT)"); ``liver`` is the narrow W150/L30 liver window that
#: separates parenchyma from hypodense lesions (the wider abdomen window also shows the liver).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 40.0),
    "liver": (150.0, 30.0),
    "soft_tissue": (350.0, 50.0),
    "mediastinum": (350.0, 50.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "subdural": (215.0, 75.0),
    "stroke": (40.0, 40.0),
}


def ct_window_range(
    preset: str | None = None, width: float | None = None, level: float | None = None
) -> tuple[float, float]:
    """``(min_hu, max_hu) = (L - W/2, L + W/2)`` of a preset or of an explicit width/level.

    Give either ``preset`` or both ``width`` and ``level``; neither means ``"abdomen"``.
    """
    if width is not None or level is not None:
        if preset is not None:
            raise ValueError(f"give either a CT window preset ({preset!r}) or width/level, not both")
        if width is None or level is None:
            raise ValueError(f"a CT window needs both width and level (HU), got width={width}, level={level}")
    else:
        name = "abdomen" if preset is None else str(preset).lower()
        if name not in CT_WINDOWS:
            raise ValueError(f"unknown CT window preset {preset!r}; presets are {sorted(CT_WINDOWS)}")
        width, level = CT_WINDOWS[name]
    if width <= 0:
        raise ValueError(f"CT window width must be positive (HU), got {width}")
    return float(level) - float(width) / 2.0, float(level) + float(width) / 2.0


class CTWindow(Transform):
    """Clip CT intensities (HU) to a window and map it linearly to ``[0, 1]``.

    Args:
        preset: a key of `CT_WINDOWS` (``"abdomen"``, ``"liver"``, ``"bone"``...). Default
            (``None`` and no width/level) is ``"abdomen"``.
        width: window width in HU (with ``level``, instead of a preset).
        level: window centre in HU.
        dtype: output dtype.

    ``L - W/2`` HU maps to 0, ``L + W/2`` HU to 1, values outside are clipped.
    """

    backend = ScaleIntensityRange.backend

    def __init__(
        self,
        preset: str | None = None,
        width: float | None = None,
        level: float | None = None,
        dtype: DtypeLike = np.float32,
    ) -> None:
        self.hu_min, self.hu_max = ct_window_range(preset, width, level)
        self.scaler = ScaleIntensityRange(
            a_min=self.hu_min, a_max=self.hu_max, b_min=0.0, b_max=1.0, clip=True, dtype=dtype
        )

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        return self.scaler(img)


class CTWindowd(MapTransform):
    """Dict version of `CTWindow`: same window on every key (images only, never labels)."""

    backend = CTWindow.backend

    def __init__(
        self,
        keys: KeysCollection,
        preset: str | None = None,
        width: float | None = None,
        level: float | None = None,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = CTWindow(preset=preset, width=width, level=level, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


class MRPercentileScale(Transform):
    """Map the ``[lower, upper]`` percentiles of one MR volume to ``[0, 1]``, clipping outside.

    Args:
        lower: lower percentile in ``[0, 100]`` (default 0.5).
        upper: upper percentile in ``[0, 100]`` (default 99.5).
        nonzero: compute the percentiles over non-zero voxels only and leave zero voxels at 0;
            for skull-stripped or masked volumes whose zero background would otherwise pull the
            lower percentile down to 0.
        channel_wise: percentiles per channel (multi-sequence input) instead of over all channels.
        dtype: output dtype.

    Percentiles rather than min/max, because a few bright voxels (vessels, fat, artefacts)
    would otherwise squash the tissue contrast.
    """

    backend = ScaleIntensityRangePercentiles.backend

    def __init__(
        self,
        lower: float = 0.5,
        upper: float = 99.5,
        nonzero: bool = False,
        channel_wise: bool = False,
        dtype: DtypeLike = np.float32,
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(
                f"MR percentiles need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}"
            )
        self.lower, self.upper = float(lower), float(upper)
        self.nonzero = nonzero
        self.channel_wise = channel_wise
        self.dtype = dtype
        self.scaler = ScaleIntensityRangePercentiles(
            lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=channel_wise, dtype=dtype
        )

    def _scale_nonzero(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        foreground = img != 0
        values = img[foreground]
        if values.shape[0] > 0:
            a_min, a_max = (float(percentile(values, q)) for q in (self.lower, self.upper))
        else:  # all background: nothing to scale, keep zeros
            a_min, a_max = 0.0, 1.0
        out = ScaleIntensityRange(a_min, a_max, 0.0, 1.0, clip=True, dtype=self.dtype)(img)
        out[~foreground] = 0
        return out

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if not self.nonzero:
            return self.scaler(img)
        if not self.channel_wise:
            return self._scale_nonzero(img)
        return concatenate([self._scale_nonzero(img[c : c + 1]) for c in range(img.shape[0])], axis=0)


class MRPercentileScaled(MapTransform):
    """Dict version of `MRPercentileScale` (one scaling per volume and key)."""

    backend = MRPercentileScale.backend

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        nonzero: bool = False,
        channel_wise: bool = False,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = MRPercentileScale(lower, upper, nonzero=nonzero, channel_wise=channel_wise, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d
