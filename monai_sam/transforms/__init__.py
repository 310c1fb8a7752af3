"""MONAI dict transforms for SAM/SAM2 on CT and MRI: intensity presets, SAM input, slices, prompts."""

from .intensity import CT_WINDOWS, CTWindow, CTWindowd, MRPercentileScale, MRPercentileScaled, ct_window_range
from .lesions import (
    FIRST_LESION_ID,
    LesionInstancesd,
    LesionPromptsd,
    MergeLesionsd,
    RandLesionPromptsd,
    lesion_instances,
    merge_lesions,
)
from .prompts import (
    PROMPT_MODES,
    LoadPromptFiled,
    PromptFromLabelBase,
    PromptFromLabeld,
    RandPromptFromLabeld,
    box_from_mask,
    clicks_from_mask,
)
from .regions import (
    CropAroundRegiond,
    LoadPhotoPromptFiled,
    RandRegionPromptd,
    RegionPromptd,
    load_photo_prompt_file,
)
from .sam_input import IMAGENET_MEAN, IMAGENET_STD, SAM_ORIGINAL_SIZE_KEY, SamInput, SamInputd
from .slices import SampleSliceSequenced, present_labels, source_name

__all__ = [
    "CropAroundRegiond",
    "LoadPhotoPromptFiled",
    "RandRegionPromptd",
    "RegionPromptd",
    "load_photo_prompt_file",
    "FIRST_LESION_ID",
    "LesionInstancesd",
    "LesionPromptsd",
    "RandLesionPromptsd",
    "MergeLesionsd",
    "lesion_instances",
    "merge_lesions",
    "LoadPromptFiled",
    "CT_WINDOWS",
    "ct_window_range",
    "CTWindow",
    "CTWindowd",
    "MRPercentileScale",
    "MRPercentileScaled",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAM_ORIGINAL_SIZE_KEY",
    "SamInput",
    "SamInputd",
    "SampleSliceSequenced",
    "present_labels",
    "source_name",
    "PROMPT_MODES",
    "box_from_mask",
    "clicks_from_mask",
    "PromptFromLabelBase",
    "RandPromptFromLabeld",
    "PromptFromLabeld",
]
