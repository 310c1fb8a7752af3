"""Inferers: memory propagation through a volume (promptable SAM2)."""

from .memory_propagation import MemoryPropagationInferer, logits_to_label

__all__ = ["MemoryPropagationInferer", "logits_to_label"]
