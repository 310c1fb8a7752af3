"""Inferers: memory propagation through a volume (promptable SAM2); prompt-free slice-wise
inference and automatic prompts from a prompt-free head."""

from .auto_prompt import AutoPromptd, AutoPrompter
from .memory_propagation import (
    LabelAccumulator,
    MemoryPropagationInferer,
    SliceScores,
    logits_to_label,
    propagate_to_label,
)
from .slice_inference import PromptFreeSliceInferer

__all__ = [
    "MemoryPropagationInferer",
    "LabelAccumulator",
    "SliceScores",
    "logits_to_label",
    "propagate_to_label",
    "PromptFreeSliceInferer",
    "AutoPrompter",
    "AutoPromptd",
]
