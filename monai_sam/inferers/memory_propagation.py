"""A MONAI ``Inferer`` that segments a volume from prompts with SAM2's slice memory.

Bundle configs and engines call inferers as ``inferer(inputs, network, *args, **kwargs)``;
this one takes the image volume and the prompts and returns a label volume, so a SAM2 bundle
reads like any other MONAI bundle (``_target_: monai_sam.inferers.MemoryPropagationInferer``).

Two ways in:

- ``preprocess=None`` (bundle pipelines): ``inputs`` is already `SamInput`'s output,
  ``(3, S, S, T)``; the label comes back at that ``S x S`` size, so ``Invertd`` restores the
  original in-plane size with the rest of the pipeline. Prompts are in the original slice
  grid, whose size is read from the image metadata (``"sam_original_size"``).
- ``preprocess=SamInput(S)`` (memory-bounded): ``inputs`` is the ``[0, 1]`` volume
  ``(1, H, W, T)`` at its own size; slices are preprocessed chunk by chunk inside the network
  and the label comes back at ``H x W`` directly (the logits are resized, not the label).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import Tensor

from monai_sam.networks.sam2_volume import (
    NO_OBJ_SCORE,
    Sam2VolumeSegmenter,
    VolumeFrames,
    frames_from_sam_input,
)
from monai_sam.prompts import ObjectPrompts

__all__ = ["LabelAccumulator", "MemoryPropagationInferer", "SliceScores", "logits_to_label", "propagate_to_label"]

logger = logging.getLogger(__name__)

_ORIGINAL_SIZE_KEY = "sam_original_size"  # monai_sam.transforms.SAM_ORIGINAL_SIZE_KEY


def logits_to_label(logits: Tensor, object_ids: Sequence[int], threshold: float = 0.0) -> Tensor:
    """``(N, ...)`` per-object logits -> label map of object ids (0 = background).

    A voxel takes the id of the object with the highest logit among those above ``threshold``,
    so overlapping objects are decided by confidence rather than by their order in the list.
    """
    if logits.shape[0] != len(object_ids):
        raise ValueError(f"{logits.shape[0]} logit maps for {len(object_ids)} object ids")
    ids = torch.as_tensor(list(object_ids), dtype=torch.float32, device=logits.device)
    best, idx = logits.max(dim=0)
    return torch.where(best > threshold, ids[idx], torch.zeros((), device=logits.device))


class LabelAccumulator:
    """`logits_to_label` computed slice by slice, as `Sam2VolumeSegmenter.propagate` delivers them.

    Pass it as ``propagate(..., sink=acc)``: it keeps only the best logit so far (in ``dtype``)
    and the winning object's id per voxel, so a 10-organ 512 x 512 x 600 CT needs 6 bytes per
    voxel instead of the 20 of its float16 per-object logits (and the temporaries of an argmax
    over them). The label is the same as `logits_to_label` of the collected logits, except that
    two objects with exactly equal logits are decided by arrival order instead of list order.

    Args:
        object_ids: the id of each prompt row (``[p.object_id for p in prompts]``).
        num_slices: ``T``; the in-plane size is that of the first slice delivered.
        threshold: logit a voxel must exceed to belong to an object.
        dtype: dtype the running best logit is kept in (that of the delivered logits).
    """

    def __init__(
        self, object_ids: Sequence[int], num_slices: int, threshold: float = 0.0, dtype: torch.dtype = torch.float16
    ) -> None:
        self.ids = torch.as_tensor(list(object_ids), dtype=torch.int32)
        self.num_slices, self.threshold, self.dtype = int(num_slices), float(threshold), dtype
        self.best: Tensor | None = None  # (H, W, T), channel-last like the image
        self.winner: Tensor | None = None

    def __call__(self, rows: list[int], slice_index: int, logits: Tensor) -> None:
        """Merge one slice's logits ``(len(rows), H, W)`` for the objects at ``rows``."""
        if self.best is None:
            shape, device = (*logits.shape[-2:], self.num_slices), logits.device
            self.best = torch.full(shape, self.threshold, dtype=self.dtype, device=device)
            self.winner = torch.zeros(shape, dtype=torch.int32, device=device)
            self.ids = self.ids.to(device)
        top, idx = logits.to(self.dtype).max(dim=0)
        best = self.best[..., slice_index]
        wins = top > best
        self.best[..., slice_index] = torch.where(wins, top, best)
        self.winner[..., slice_index] = torch.where(wins, self.ids[rows][idx], self.winner[..., slice_index])

    def label(self) -> Tensor:
        """Object ids ``(H, W, T)`` as float32 (0 = background), as `logits_to_label` gives them."""
        if self.winner is None:
            raise RuntimeError("no slice was delivered: nothing was propagated")
        return self.winner.float()


class SliceScores:
    """SAM2's own confidence per object and slice, collected during propagation.

    Give one to `MemoryPropagationInferer` (``slice_scores=``) or `segment_volume`: each
    propagated slice adds, per object, the object score logit (> 0: SAM2 sees the object on the
    slice; <= 0: absent, and its mask there is empty) and the mask decoder's predicted IoU.
    Slices a propagation never reached have no entry.
    """

    def __init__(self) -> None:
        self.values: dict[int, dict[int, tuple[float, float]]] = {}

    def add(self, object_ids: Sequence[int], slice_index: int, object_scores: Tensor, ious: Tensor) -> None:
        """Record one slice for ``object_ids`` (a repeated slice overwrites: same values)."""
        for oid, score, iou in zip(object_ids, object_scores.tolist(), ious.tolist()):
            self.values.setdefault(int(oid), {})[int(slice_index)] = (float(score), float(iou))

    def for_object(self, object_id: int) -> dict[int, tuple[float, float]]:
        """``{slice: (object_score_logit, predicted_iou)}`` for one object, by slice."""
        return dict(sorted(self.values.get(int(object_id), {}).items()))

    def sink(self, prompts: Sequence[ObjectPrompts]):
        """The network's `ScoreSink` for these prompts: prompt rows -> object ids."""
        ids = [int(p.object_id) for p in prompts]
        return lambda rows, k, scores, ious: self.add([ids[r] for r in rows], k, scores, ious)


def propagate_to_label(
    seg: Sam2VolumeSegmenter,
    frames: Any,
    prompts: Sequence[ObjectPrompts],
    threshold: float = 0.0,
    logits_dtype: torch.dtype = torch.float16,
    features: Any = None,
    **kwargs: Any,
) -> Tensor:
    """``logits_to_label(seg.propagate(...))`` ``(H, W, T)`` without every object's logits in memory.

    ``frames`` / ``features`` and ``kwargs`` (``original_size``, ``output_size``, ``direction``,
    ``progress``...) go to `Sam2VolumeSegmenter.propagate`; ``logits_dtype`` is the precision
    objects are compared in.
    """
    if features is not None:
        num_slices = int(features["backbone_fpn"][0].shape[0])
    else:
        num_slices = len(frames)
    acc = LabelAccumulator([p.object_id for p in prompts], num_slices, threshold, logits_dtype)
    seg.propagate(frames, list(prompts), features=features, output_dtype=logits_dtype, sink=acc, **kwargs)
    return acc.label()


class MemoryPropagationInferer(Inferer):
    """Image volume + prompts -> label volume, through `Sam2VolumeSegmenter.propagate`.

    Args:
        preprocess: None if ``inputs`` went through `SamInput` already; otherwise a callable
            mapping a ``(C, H, W, n)`` slab in ``[0, 1]`` to ``(3, S, S, n)`` (e.g.
            ``SamInput(S)``), applied a chunk of slices at a time.
        threshold: logit above which a voxel belongs to an object (0 = probability 0.5).
        return_probabilities: also return per-object probabilities ``(N, H, W, T)``.
        direction: ``"both"`` (default), ``"forward"`` or ``"backward"`` from the key slices.
        progress: tqdm bars over slices.
        logits_dtype: dtype the logits are compared in (``float16`` by default: a logit's sign
            never changes in that rounding, and ties between objects closer than ~0.1% are
            decided either way). Without ``return_probabilities`` only the best logit per voxel
            is kept (`LabelAccumulator`); with it, every object's logits in this dtype.
        stop_after_absent: end a direction of propagation for an object after this many
            consecutive slices SAM2 calls absent (`Sam2VolumeSegmenter`); ``"default"``: the
            network's own setting.

    ``slice_scores=`` (a `SliceScores`) in the call collects SAM2's object score and predicted
    IoU per object and slice.

    Call: ``inferer(inputs, network, prompts)`` with ``inputs`` ``(C, H, W, T)`` or
    ``(1, C, H, W, T)``, ``network`` a `Sam2VolumeSegmenter` (a bare ``SAM2Base`` is wrapped with
    default settings) and ``prompts`` a list of `ObjectPrompts` in the original slice grid.
    Returns the label ``(1, H, W, T)`` (``(1, 1, H, W, T)`` for batched input), float32 object
    ids, a MetaTensor carrying the input's metadata when the input is one; with
    ``return_probabilities`` a tuple ``(label, probabilities)``.
    """

    def __init__(
        self,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        threshold: float = 0.0,
        return_probabilities: bool = False,
        direction: str = "both",
        progress: bool = False,
        logits_dtype: torch.dtype = torch.float16,
        stop_after_absent: int | None | str = "default",
    ) -> None:
        super().__init__()
        self.stop_after_absent = stop_after_absent
        self.logits_dtype = logits_dtype
        self.preprocess = preprocess
        self.threshold = float(threshold)
        self.return_probabilities = bool(return_probabilities)
        self.direction = direction
        self.progress = bool(progress)

    @staticmethod
    def _network(network: Any) -> Sam2VolumeSegmenter:
        if isinstance(network, Sam2VolumeSegmenter):
            return network
        if hasattr(network, "_track_step"):
            return Sam2VolumeSegmenter(network)
        raise TypeError(
            f"network must be a Sam2VolumeSegmenter or a sam2 SAM2Base, got {type(network).__name__}"
        )

    def __call__(  # type: ignore[override]
        self,
        inputs: Tensor,
        network: Any,
        prompts: Sequence[ObjectPrompts] | ObjectPrompts | None = None,
        *args: Any,
        original_size: tuple[int, int] | None = None,
        slice_scores: SliceScores | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if prompts is None:
            prompts = kwargs.pop("prompts", None)
        if prompts is None:
            from monai_sam.prompts import PromptError

            raise PromptError(
                "MemoryPropagationInferer: no prompts given; give at least one box, click or mask"
            )
        if isinstance(prompts, ObjectPrompts):
            prompts = [prompts]
        seg = self._network(network)
        batched = inputs.ndim == 5
        x = inputs
        if batched:
            if inputs.shape[0] != 1:
                raise ValueError(f"one volume at a time: got a batch of {inputs.shape[0]}")
            x = inputs[0]
        if x.ndim != 4:
            raise ValueError(f"inputs must be (C, H, W, T) or (1, C, H, W, T), got {tuple(inputs.shape)}")
        plain = x.as_tensor() if isinstance(x, MetaTensor) else x

        if self.preprocess is not None:
            source = VolumeFrames(plain, self.preprocess)
            original = source.original_size
            out_size = original
        else:
            source = frames_from_sam_input(plain)
            meta_size = x.meta.get(_ORIGINAL_SIZE_KEY) if isinstance(x, MetaTensor) else None
            original = tuple(int(v) for v in (original_size or meta_size or plain.shape[1:3]))
            out_size = tuple(int(v) for v in plain.shape[1:3])

        run = dict(
            original_size=original,
            output_size=out_size,
            direction=self.direction,
            progress=self.progress,
            stop_after_absent=self.stop_after_absent,
        )
        if slice_scores is not None:
            run["scores"] = slice_scores.sink(prompts)
        if self.return_probabilities:  # every object's logits are needed: collect them all
            logits = seg.propagate(source, list(prompts), output_dtype=self.logits_dtype, **run)
            logits = logits.permute(0, 2, 3, 1)  # (N, H, W, T): channel-first like the image
            label = logits_to_label(logits, [p.object_id for p in prompts], self.threshold)[None]
        else:  # only the label: a running argmax, no (N, T, H, W) buffer
            label = propagate_to_label(seg, source, prompts, self.threshold, self.logits_dtype, **run)[None]
        if batched:
            label = label[None]
        if isinstance(inputs, MetaTensor):
            label = MetaTensor(
                label, meta=dict(inputs.meta), applied_operations=list(inputs.applied_operations)
            )
        if not self.return_probabilities:
            return label
        logits = logits.float()
        probs = torch.sigmoid(logits).masked_fill(logits <= NO_OBJ_SCORE, 0.0)
        return label, probs[None] if batched else probs
