"""SAM2's slice memory over a CT/MR volume: a prompt on key slices, masks on every slice.

The axial slices of a volume are the frames of a video. `Sam2VolumeSegmenter` wraps a
``sam2`` ``SAM2Base`` and runs its frame step (``_track_step`` + ``_encode_memory_in_output``,
the two halves of ``track_step`` that sam2's own trainer composes) over the slices:

- prompted slices (box, clicks or mask per object) are *conditioning* frames, segmented
  without memory and written to the memory bank first;
- the other slices read the memory, propagating forward from the earliest key slice to the
  last slice and then backward from it to the first one, which is what
  ``SAM2VideoPredictor.propagate_in_video`` does (``reverse=False`` then ``reverse=True``), so
  results match the predictor fed the same frames (see tests/test_oracle_video_predictor.py).

Why not the predictor itself: it keeps every frame at the model size in memory, encodes one
frame at a time and tracks one object at a time. Here slices are encoded in chunks
(``encoder_batch_size``) in propagation order and only the current chunk's features are kept,
objects sharing key slices are tracked as one batch, memories older than the memory window
are dropped, and nothing touches the disk. The encoder's raw outputs (`encode`) are kept apart
from the decoder's trainable high-resolution projections (`prepare_features`), so a frozen
encoder's outputs can be cached without freezing ``conv_s0``/``conv_s1``.

Shapes: frames ``(T, 3, S, S)`` preprocessed by `monai_sam.transforms.SamInput` (``S`` =
``model.image_size``); prompts are `monai_sam.prompts.ObjectPrompts` in the original slice
grid ``(H, W)``; logits come back as ``(N_objects, T, H, W)`` (or another ``output_size``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_sam.networks.host_memory import trim_host_memory
from monai_sam.prompts import ObjectPrompts, PromptError, SlicePrompt, validate_prompts

__all__ = [
    "NO_OBJ_SCORE",
    "SliceSink",
    "ScoreSink",
    "FrameSource",
    "TensorFrames",
    "VolumeFrames",
    "PreparedFeatures",
    "Sam2VolumeSegmenter",
]

logger = logging.getLogger(__name__)

#: logit SAM2 gives an object on a slice where it predicts the object absent (sam2's value)
NO_OBJ_SCORE = -1024.0

Direction = Literal["both", "forward", "backward"]

#: ``sink(rows, slice_index, logits)``: one slice's logits ``(len(rows), H, W)`` for the objects at ``rows``
SliceSink = Callable[[list[int], int, Tensor], None]

#: ``scores(rows, slice_index, object_score_logits, iou_predictions)``: SAM2's confidence on one
#: slice for the objects at ``rows``, two float32 CPU tensors ``(len(rows),)``. The object score
#: logit says whether the object is on the slice (<= 0: absent, its mask is then empty); the
#: predicted IoU is the mask decoder's estimate of its mask's quality.
ScoreSink = Callable[[list[int], int, Tensor, Tensor], None]


@runtime_checkable
class FrameSource(Protocol):
    """Preprocessed frames on demand: ``source([k0, k1, ...])`` -> ``(n, 3, S, S)`` tensor."""

    def __len__(self) -> int: ...

    def __call__(self, indices: Sequence[int]) -> Tensor: ...


class TensorFrames:
    """Frames already preprocessed and held in memory, ``(T, 3, S, S)``."""

    def __init__(self, frames: Tensor) -> None:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (T, 3, S, S), got {tuple(frames.shape)}")
        self.frames = frames

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __call__(self, indices: Sequence[int]) -> Tensor:
        return self.frames[list(indices)]


class VolumeFrames:
    """Slices of a ``(C, H, W, T)`` volume preprocessed chunk by chunk (bounded memory).

    ``preprocess`` maps a ``(C, H, W, n)`` slab to ``(3, S, S, n)``, e.g.
    ``monai_sam.transforms.SamInput(image_size)``; it is applied to the requested slices only,
    so a 1024-px copy of the whole volume never exists. Because `SamInput` resizes in-plane
    only, a slab gives exactly the slices the whole volume would.
    """

    def __init__(self, volume: Tensor, preprocess: Callable[[Tensor], Tensor]) -> None:
        if volume.ndim != 4:
            raise ValueError(f"volume must be channel first (C, H, W, T), got {tuple(volume.shape)}")
        # metadata tracking is not needed slice by slice (the caller keeps the geometry)
        self.volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        self.preprocess = preprocess

    @property
    def original_size(self) -> tuple[int, int]:
        return int(self.volume.shape[1]), int(self.volume.shape[2])

    def __len__(self) -> int:
        return int(self.volume.shape[-1])

    def __call__(self, indices: Sequence[int]) -> Tensor:
        slab = self.volume[..., list(indices)]
        out = torch.as_tensor(self.preprocess(slab))
        if isinstance(out, torch.Tensor) and hasattr(out, "as_tensor"):
            out = out.as_tensor()  # MetaTensor -> Tensor: no metadata tracking inside the network
        return out.permute(3, 0, 1, 2).contiguous()


def _as_frame_source(frames: Tensor | FrameSource) -> FrameSource:
    if isinstance(frames, torch.Tensor):
        return TensorFrames(frames.as_tensor() if hasattr(frames, "as_tensor") else frames)
    if isinstance(frames, FrameSource):
        return frames
    raise TypeError(f"frames must be a (T, 3, S, S) tensor or a FrameSource, got {type(frames).__name__}")


@dataclass
class _Cohort:
    """Objects that share their key slices: tracked together as one batch."""

    rows: list[int]  # positions of the objects in the prompt list (= output rows)
    key_slices: list[int]
    start: int
    output_dict: dict[str, dict[int, dict[str, Any]]] = field(
        default_factory=lambda: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    )
    maskmem_pos_enc: list[Tensor] | None = None


@dataclass
class _Propagation:
    """One propagation's state: the objects grouped in cohorts, the features, the settings."""

    prompts: list[ObjectPrompts]
    cohorts: list[_Cohort]
    stream: _FeatureStream
    num_frames: int
    original_size: tuple[int, int]
    direction: str
    differentiable: bool
    can_prune: bool  # drop spatial memories no later slice reads (inference, stride 1)


class _AbsenceStop:
    """Ends a pass of propagation for the objects SAM2 has called absent ``k`` slices in a row.

    SAM2's object score logit says whether the object is on a slice; past the end of an organ
    the video predictor keeps going and can pick up a neighbour far from the key slice. Counts
    are per object and per pass, and restart on each key slice (a prompt says the object is there).
    """

    def __init__(self, k: int | None) -> None:
        if k is not None and int(k) < 1:
            raise ValueError(f"stop_after_absent must be >= 1 or None, got {k!r}")
        self.k = None if k is None else int(k)
        self._runs: dict[int, Tensor] = {}

    def reset(self, cohort: _Cohort) -> None:
        self._runs[id(cohort)] = torch.zeros(len(cohort.rows), dtype=torch.long)

    def update(self, cohort: _Cohort, object_score_logits: Tensor) -> None:
        if self.k is None:
            return
        absent = object_score_logits.detach().reshape(-1).cpu() <= 0
        run = self._runs.get(id(cohort), torch.zeros(len(cohort.rows), dtype=torch.long))
        ended = run >= self.k  # an ended pass stays ended, whatever comes after
        self._runs[id(cohort)] = torch.where(ended | absent, run + 1, torch.zeros_like(run))

    def stopped(self, cohort: _Cohort) -> Tensor:
        """``(len(rows),)`` bool: the objects whose pass has ended (their slices are not labelled)."""
        run = self._runs.get(id(cohort))
        if self.k is None or run is None:
            return torch.zeros(len(cohort.rows), dtype=torch.bool)
        return run >= self.k


class PreparedFeatures(dict):
    """Every slice's features with the decoder's projections applied (`Sam2VolumeSegmenter.encode_volume`).

    ``{"backbone_fpn": [...], "vision_pos_enc": [...]}`` with ``T`` rows per level;
    ``propagate(features=...)`` uses them as they are (plain `encode` outputs, e.g. a frozen
    encoder's cache, get ``prepare_features`` applied first). Kept by an interactive app: the
    highest level is 8x smaller than the raw encoder output, and a new prompt costs no encoder run.
    """


class _FeatureStream:
    """Per-slice features for the frame step, encoded in chunks in the order they are needed.

    Only the last chunk is kept, so memory is bounded by ``batch_size`` slices of features
    whatever the number of slices. With ``raw_features`` (a cache of `encode` outputs for all
    slices) the encoder is not run at all.
    """

    def __init__(
        self,
        seg: Sam2VolumeSegmenter,
        frames: FrameSource | None,
        raw_features,
        num_frames: int,
        batch_size: int,
        keep_all: bool,
    ) -> None:
        self.seg, self.frames, self.raw = seg, frames, raw_features
        self.num_frames, self.batch_size, self.keep_all = num_frames, max(1, int(batch_size)), keep_all
        self.cache: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self.encoded = 0  # how many slices went through the encoder (for tests and logs)

    def _fill(self, indices: list[int]) -> None:
        prepared = None
        if self.raw is not None:
            dev = self.seg.device  # a cache may live on the CPU (or on disk, memory-mapped)
            raw = {
                k: [x[indices].to(dev, non_blocking=True).float() for x in v]
                for k, v in self.raw.items()
                if k in ("backbone_fpn", "vision_pos_enc")
            }
            if isinstance(self.raw, PreparedFeatures):
                prepared = raw
        else:
            if self.seg.release_host_memory and self.seg.device.type == "cpu":
                trim_host_memory()  # the last chunk's freed activations (see host_memory)
            images = self.frames(indices).to(self.seg.device, non_blocking=True).float()
            with self.seg._autocast():
                raw = self.seg.encode(images)
            self.encoded += len(indices)
        if prepared is None:
            with self.seg._autocast():
                prepared = self.seg.prepare_features(raw)
        if not self.keep_all:
            self.cache.clear()
        for n, k in enumerate(indices):
            self.cache[k] = (
                [x[n : n + 1] for x in prepared["backbone_fpn"]],
                [x[n : n + 1] for x in prepared["vision_pos_enc"]],
            )

    def get(self, frame_idx: int, step: int, batch: int):
        """``(vision_feats, vision_pos_embeds, feat_sizes)`` of one slice expanded to ``batch``."""
        if frame_idx not in self.cache:
            if self.keep_all:
                chunk = list(range(self.num_frames))
            else:
                chunk = [frame_idx + step * n for n in range(self.batch_size)]
                chunk = [k for k in chunk if 0 <= k < self.num_frames]
            self._fill(chunk)
        fpn, pos = self.cache[frame_idx]
        backbone_out = {
            "backbone_fpn": [x.expand(batch, -1, -1, -1) for x in fpn],
            "vision_pos_enc": [x.expand(batch, -1, -1, -1) for x in pos],
        }
        _, feats, pos_embeds, sizes = self.seg.model._prepare_backbone_features(backbone_out)
        return feats, pos_embeds, sizes


def _sam2_ext_available() -> bool:
    try:
        import sam2._C  # noqa: F401
    except ImportError:
        return False
    return True


class Sam2VolumeSegmenter(nn.Module):
    """Promptable volume segmentation with SAM2's memory over axial slices.

    Args:
        model: a ``sam2.modeling.sam2_base.SAM2Base`` (see `monai_sam.networks.build_sam2_model`).
        encoder_batch_size: slices per image-encoder call; the features of one chunk are all
            that is kept, which bounds memory (about 16 MB per slice at 1024 px in float32).
        memory_dtype: dtype the memory features are stored in during inference (``bfloat16``
            as ``SAM2VideoPredictor`` does; ``None`` keeps float32).
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` to run under autocast (CUDA;
            on CPU only ``bfloat16`` is supported by torch); None runs in float32.
        fill_hole_area: fill background holes up to this many low-res pixels in the masks, as
            the video predictor does (8 there); needs sam2's CUDA extension and a CUDA tensor,
            otherwise skipped, as in the predictor.
        start: ``"object"``: each group of objects propagates from its own earliest key slice;
            ``"earliest"``: all objects from the earliest key slice of any object, which is
            what one ``SAM2VideoPredictor`` session with all objects does.
        object_batch_size: most objects tracked in one batch; ``"auto"``: all objects that
            share key slices on CUDA (where batching fills the GPU) and on CPU up to 256 px,
            one at a time on CPU above (measured on 2 idle cores, 5 objects: batched 20% faster
            at 256 px, 9% slower at 512 px, where the work is compute-bound and the batch's
            activations are larger). Slices are encoded once whatever the value. None: always
            all.
        release_host_memory: on a CPU, hand the heap memory freed by the last chunk back to
            the OS before encoding the next (`monai_sam.networks.host_memory`): without it the
            resident memory of a long volume creeps up by a few MB per slice.
        multimask_fallback: SAM2's dynamic multimask fallback (the mask decoder's
            ``dynamic_multimask_via_stability``): outside training, a single-mask answer (a box,
            or several clicks) whose stability score is low is replaced by the best of the
            decoder's three multimask outputs. True is SAM2's behaviour, what official weights
            were made for (and what ``SAM2VideoPredictor`` does). Box-prompted training teaches
            the single-mask output only, so a model trained here runs with False: its bundle
            records it (`monai_sam.engines.ModelRecord` ``inference``) and every door reads it.
            None leaves the model's own setting (sam2's builder turns the fallback on).
        stop_after_absent: end a direction of propagation for an object after this many
            consecutive slices on which SAM2's object score says the object is absent; slices
            beyond are never labelled (nor computed, once every object of a batch has stopped).
            None (default) propagates to the volume's ends, as ``SAM2VideoPredictor`` does.
            Key slices restart the count. `propagate` can override it per call.
    """

    def __init__(
        self,
        model: nn.Module,
        encoder_batch_size: int = 8,
        memory_dtype: torch.dtype | None = torch.bfloat16,
        autocast_dtype: torch.dtype | None = None,
        fill_hole_area: int = 8,
        start: Literal["object", "earliest"] = "object",
        object_batch_size: int | Literal["auto"] | None = "auto",
        release_host_memory: bool = True,
        multimask_fallback: bool | None = None,
        stop_after_absent: int | None = None,
    ) -> None:
        super().__init__()
        for attr in (
            "image_encoder",
            "_track_step",
            "_encode_memory_in_output",
            "_prepare_backbone_features",
        ):
            if not hasattr(model, attr):
                raise TypeError(f"model must be a sam2 SAM2Base (missing {attr}), got {type(model).__name__}")
        if start not in ("object", "earliest"):
            raise ValueError(f"start must be 'object' or 'earliest', got {start!r}")
        if int(encoder_batch_size) < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {encoder_batch_size}")
        if object_batch_size not in (None, "auto") and int(object_batch_size) < 1:
            raise ValueError(f"object_batch_size must be >= 1, 'auto' or None, got {object_batch_size!r}")
        self.object_batch_size = (
            object_batch_size if object_batch_size in (None, "auto") else int(object_batch_size)
        )
        self.model = model
        self.encoder_batch_size = int(encoder_batch_size)
        self.memory_dtype = memory_dtype
        self.autocast_dtype = autocast_dtype
        self.fill_hole_area = int(fill_hole_area)
        self.start = start
        self.release_host_memory = bool(release_host_memory)
        if multimask_fallback is not None:
            model.sam_mask_decoder.dynamic_multimask_via_stability = bool(multimask_fallback)
        self.stop_after_absent = _AbsenceStop(stop_after_absent).k
        self._has_ext = _sam2_ext_available()
        self.last_encoded_slices = 0
        self.last_frame_steps = 0  # memory-conditioned slice steps of the last propagation

    # ------------------------------------------------------------------ basics
    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @property
    def multimask_fallback(self) -> bool:
        """Whether an unstable single mask is swapped for a multimask output outside training."""
        return bool(self.model.sam_mask_decoder.dynamic_multimask_via_stability)

    @property
    def image_encoder(self) -> nn.Module:
        """The (frozen) image encoder, whose raw outputs `encode` returns."""
        return self.model.image_encoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        if self.autocast_dtype is not None and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ features
    def encode(self, frames: Tensor) -> dict[str, list[Tensor]]:
        """Raw image-encoder outputs of ``(n, 3, S, S)`` frames: what a frozen encoder's cache holds.

        This is ``model.image_encoder`` only, *before* ``SAM2Base.forward_image`` applies the
        mask decoder's trainable ``conv_s0``/``conv_s1``; `prepare_features` does that part.
        """
        out = self.model.image_encoder(frames)
        return {"backbone_fpn": list(out["backbone_fpn"]), "vision_pos_enc": list(out["vision_pos_enc"])}

    def prepare_features(self, raw: Mapping[str, Sequence[Tensor]]) -> dict[str, list[Tensor]]:
        """Apply the decoder's high-res projections to raw encoder outputs, as ``forward_image`` does."""
        fpn = list(raw["backbone_fpn"])
        if self.model.use_high_res_features_in_sam:
            fpn[0] = self.model.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = self.model.sam_mask_decoder.conv_s1(fpn[1])
        return {"backbone_fpn": fpn, "vision_pos_enc": list(raw["vision_pos_enc"])}

    @torch.inference_mode()
    def encode_volume(
        self,
        frames: Tensor | FrameSource,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> PreparedFeatures:
        """Encode every slice once (``encoder_batch_size`` at a time) for later `propagate` calls.

        Returns `PreparedFeatures` in ``dtype`` on ``device``; the position encodings, equal for
        every slice, are one slice broadcast to ``T`` (no copy).
        """
        from tqdm import tqdm

        source = _as_frame_source(frames)
        levels: list[list[Tensor]] = []
        pos: list[Tensor] = []
        starts = range(0, len(source), self.encoder_batch_size)
        for start in tqdm(starts, desc="encode", unit="chunk", disable=not progress):
            idx = list(range(start, min(start + self.encoder_batch_size, len(source))))
            with self._autocast():
                prepared = self.prepare_features(self.encode(source(idx).to(self.device).float()))
            if not levels:
                levels = [[] for _ in prepared["backbone_fpn"]]
                pos = [p[:1].to(device, dtype) for p in prepared["vision_pos_enc"]]
            for level, f in zip(levels, prepared["backbone_fpn"], strict=True):
                level.append(f.to(device, dtype))
        num = len(source)
        return PreparedFeatures(
            backbone_fpn=[torch.cat(level) for level in levels],
            vision_pos_enc=[p.expand(num, -1, -1, -1) for p in pos],
        )

    # ------------------------------------------------------------------ prompts
    def _model_prompt(
        self, p: SlicePrompt, original_size: tuple[int, int]
    ) -> tuple[dict | None, Tensor | None]:
        """A slice prompt in the model's input frame, as the video predictor scales it."""
        h, w = original_size
        s = self.image_size
        dev = self.device
        if p.mask is not None:  # a mask wins over a box/clicks on the same slice (SlicePrompt.kind)
            m = torch.as_tensor(p.mask, dtype=torch.float32, device=dev)[None, None]
            if (h, w) != (s, s):
                m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
                m = (m >= 0.5).float()
            return None, m
        coords, labels = [], []
        if p.box is not None:
            coords.append(torch.as_tensor(p.box, dtype=torch.float32).reshape(2, 2))
            labels.append(torch.tensor([2, 3], dtype=torch.int32))
        if p.points is not None:
            coords.append(torch.as_tensor(p.points, dtype=torch.float32).reshape(-1, 2))
            labels.append(torch.as_tensor(p.point_labels, dtype=torch.int32).reshape(-1))
        xy = torch.cat(coords)[None] / torch.tensor([w, h], dtype=torch.float32) * s
        return {"point_coords": xy.to(dev), "point_labels": torch.cat(labels)[None].to(dev)}, None

    # ------------------------------------------------------------------ frame step
    def _step(
        self,
        frame_idx: int,
        is_cond: bool,
        feats: list[Tensor],
        pos: list[Tensor],
        sizes: list[tuple[int, int]],
        memory: dict,
        num_frames: int,
        reverse: bool = False,
        point_inputs: dict | None = None,
        mask_inputs: Tensor | None = None,
        run_mem_encoder: bool = True,
    ) -> dict[str, Any]:
        """One frame of SAM2 tracking: ``track_step``'s two halves, keeping the object scores."""
        m = self.model
        current_out, sam_outputs, _, _ = m._track_step(
            frame_idx=frame_idx,
            is_init_cond_frame=is_cond,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            point_inputs=point_inputs,
            mask_inputs=mask_inputs,
            output_dict=memory,
            num_frames=num_frames,
            track_in_reverse=reverse,
            prev_sam_mask_logits=None,
        )
        _, _, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs
        current_out["pred_masks"] = low_res_masks
        # the IoU SAM2 predicts for the mask it chose (the best of several with multimask output)
        current_out["iou_pred"] = ious.max(dim=1).values if ious.shape[1] > 1 else ious[:, 0]
        current_out["pred_masks_high_res"] = high_res_masks
        current_out["obj_ptr"] = obj_ptr
        current_out["object_score_logits"] = object_score_logits
        m._encode_memory_in_output(
            feats, sizes, point_inputs, run_mem_encoder, high_res_masks, object_score_logits, current_out
        )
        return current_out

    def _readable(self, output_dict: dict, frame_idx: int, reverse: bool) -> dict:
        """The memory bank with the memories a slice can read back in float32.

        They are stored in ``memory_dtype`` (bf16) like the video predictor does; sam2 then
        concatenates them with the float32 object pointers, which promotes them exactly to
        float32. With no pointer to concatenate (a slice tracked before its object's first key
        slice) the bf16 memory would reach float32 weights and fail (the predictor fails there
        on CPU), so the window is converted here: the same values, without the failure.
        """
        if self.memory_dtype is None or self.memory_dtype == torch.float32:
            return output_dict

        def as_float(out: dict) -> dict:
            m = out.get("maskmem_features")
            return out if m is None or m.dtype == torch.float32 else {**out, "maskmem_features": m.float()}

        non_cond = dict(output_dict["non_cond_frame_outputs"])
        if int(self.model.memory_temporal_stride_for_eval) == 1:
            n = int(self.model.num_maskmem)
            window = range(frame_idx + 1, frame_idx + n) if reverse else range(frame_idx - n + 1, frame_idx)
        else:
            window = list(non_cond)
        for t in window:
            if t in non_cond:
                non_cond[t] = as_float(non_cond[t])
        cond = {t: as_float(o) for t, o in output_dict["cond_frame_outputs"].items()}
        return {"cond_frame_outputs": cond, "non_cond_frame_outputs": non_cond}

    def _fill_holes(self, masks: Tensor) -> Tensor:
        if self.fill_hole_area > 0 and self._has_ext and masks.is_cuda:
            from sam2.utils.misc import fill_holes_in_mask_scores

            return fill_holes_in_mask_scores(masks, self.fill_hole_area)
        return masks

    def _compact(self, out: dict[str, Any], cohort: _Cohort, differentiable: bool) -> dict[str, Any]:
        """What the memory bank needs of one frame (the predictor keeps the same, in bf16)."""
        feats = out["maskmem_features"]
        if not differentiable and feats is not None and self.memory_dtype is not None:
            feats = feats.to(self.memory_dtype)
        pos = out["maskmem_pos_enc"]
        if pos is not None and not differentiable:
            if cohort.maskmem_pos_enc is None:  # the same for every frame: keep one copy
                cohort.maskmem_pos_enc = pos
            pos = cohort.maskmem_pos_enc
        return {
            "maskmem_features": feats,
            "maskmem_pos_enc": pos,
            "pred_masks": self._fill_holes(out["pred_masks"]) if not differentiable else out["pred_masks"],
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
            "iou_pred": out["iou_pred"],
        }

    def _cond_step(
        self,
        k: int,
        members: list[tuple[int, dict | None, Tensor | None]],
        stream: _FeatureStream,
        num_frames: int,
        differentiable: bool,
        needs_memory: bool,
    ) -> dict[str, Any]:
        """One SAM step on key slice ``k`` for objects whose prompts have the same form."""
        batch = len(members)
        point_inputs = mask_inputs = None
        if members[0][2] is not None:
            mask_inputs = torch.cat([m[2] for m in members])
        else:
            point_inputs = {
                "point_coords": torch.cat([m[1]["point_coords"] for m in members]),
                "point_labels": torch.cat([m[1]["point_labels"] for m in members]),
            }
        feats, pos, sizes = stream.get(k, +1, batch)
        with self._autocast():
            out = self._step(
                k,
                True,
                feats,
                pos,
                sizes,
                memory={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                num_frames=num_frames,
                point_inputs=point_inputs,
                mask_inputs=mask_inputs,
                run_mem_encoder=differentiable and self.model.training and needs_memory,
            )
            if out["maskmem_features"] is None and needs_memory:
                # as SAM2VideoPredictor.propagate_in_video_preflight: memory from the
                # (hole-filled) low-res mask upsampled, binarised as a user-given input
                out["pred_masks"] = self._fill_holes(out["pred_masks"])
                hi = F.interpolate(
                    out["pred_masks"], size=(self.image_size,) * 2, mode="bilinear", align_corners=False
                )
                out["maskmem_features"], out["maskmem_pos_enc"] = self.model._encode_new_memory(
                    current_vision_feats=feats,
                    feat_sizes=sizes,
                    pred_masks_high_res=hi,
                    object_score_logits=out["object_score_logits"],
                    is_mask_from_pts=True,
                )
        return out

    # ------------------------------------------------------------------ the propagation
    def _cohorts(self, prompts: list[ObjectPrompts], start: str) -> list[_Cohort]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, obj in enumerate(prompts):
            groups.setdefault(tuple(obj.key_slices), []).append(row)
        earliest = min(k[0] for k in groups)
        size = self.object_batch_size
        if size == "auto":
            size = None if self.device.type == "cuda" or self.image_size <= 256 else 1
        cohorts = []
        for keys, rows in groups.items():
            for n in range(0, len(rows), size or len(rows)):
                chunk = rows[n : n + size] if size else rows
                cohorts.append(_Cohort(chunk, list(keys), earliest if start == "earliest" else keys[0]))
        return cohorts

    def _check_inputs(
        self, source: FrameSource | None, features, prompts, original_size
    ) -> tuple[int, tuple[int, int]]:
        if features is not None:
            num_frames = int(features["backbone_fpn"][0].shape[0])
        elif source is not None:
            num_frames = len(source)
        else:
            raise ValueError("give the frames (or cached encoder features) to segment")
        if num_frames < 1:
            raise ValueError("the volume has no slices")
        if original_size is None:
            original_size = getattr(source, "original_size", None) or (self.image_size, self.image_size)
        original_size = (int(original_size[0]), int(original_size[1]))
        if isinstance(prompts, ObjectPrompts):
            prompts = [prompts]
        validate_prompts(list(prompts or []), original_size, num_frames)
        if source is not None and features is None:
            probe = source([0])
            if probe.ndim != 4 or tuple(probe.shape[1:]) != (3, self.image_size, self.image_size):
                raise ValueError(
                    f"frames are {tuple(probe.shape[1:])} per slice but the model expects "
                    f"(3, {self.image_size}, "
                    f"{self.image_size}); preprocess them with SamInput(image_size={self.image_size})"
                )
        return num_frames, original_size

    def _setup(
        self,
        source,
        features,
        prompts,
        original_size,
        direction: str,
        start: str | None,
        differentiable: bool,
    ) -> _Propagation:
        """Check the inputs and group the objects: everything a propagation needs before its first step."""
        if direction not in ("both", "forward", "backward"):
            raise ValueError(f"direction must be 'both', 'forward' or 'backward', got {direction!r}")
        start = start or self.start
        if start not in ("object", "earliest"):
            raise ValueError(f"start must be 'object' or 'earliest', got {start!r}")
        num_frames, original_size = self._check_inputs(source, features, prompts, original_size)
        prompts = [prompts] if isinstance(prompts, ObjectPrompts) else list(prompts)
        stream = _FeatureStream(
            self, source, features, num_frames, self.encoder_batch_size, keep_all=differentiable
        )
        return _Propagation(
            prompts=prompts,
            cohorts=self._cohorts(prompts, start),
            stream=stream,
            num_frames=num_frames,
            original_size=original_size,
            direction=direction,
            differentiable=differentiable,
            can_prune=not differentiable and int(self.model.memory_temporal_stride_for_eval) == 1,
        )

    def _condition(self, run: _Propagation) -> None:
        """The key slices first: a cohort's objects whose prompts have the same form (a mask, or
        the same number of points) in one batch, then their memory, kept in the cohort's row order."""
        needs_memory = run.num_frames > 1  # a single frame's memory is never read: not encoded
        for k in sorted({k for c in run.cohorts for k in c.key_slices}):
            for cohort in (c for c in run.cohorts if k in c.key_slices):
                groups: dict[tuple, list[tuple[int, dict | None, Tensor | None]]] = {}
                for pos_in_cohort, row in enumerate(cohort.rows):
                    sp = next(p for p in run.prompts[row].slices if p.slice_index == k)
                    point_inputs, mask_inputs = self._model_prompt(sp, run.original_size)
                    form = (
                        ("mask",)
                        if mask_inputs is not None
                        else ("points", point_inputs["point_labels"].shape[1])
                    )
                    groups.setdefault(form, []).append((pos_in_cohort, point_inputs, mask_inputs))
                order: list[int] = []
                outs = []
                for members in groups.values():
                    order += [m[0] for m in members]
                    outs.append(
                        self._cond_step(
                            k, members, run.stream, run.num_frames, run.differentiable, needs_memory
                        )
                    )
                merged = {key: _stack_objects([o[key] for o in outs]) for key in _MEMORY_KEYS}
                if order != sorted(order):
                    merged = _take_objects(merged, torch.argsort(torch.tensor(order)))
                cohort.output_dict["cond_frame_outputs"][k] = self._compact(
                    merged, cohort, run.differentiable
                )

    def _track(self, run: _Propagation, cohort: _Cohort, f: int, step: int) -> dict[str, Any]:
        """One memory-conditioned slice of a cohort, stored in its memory bank."""
        reverse = step < 0
        feats, pos, sizes = run.stream.get(f, step, len(cohort.rows))
        with self._autocast():
            memory = (
                cohort.output_dict if run.differentiable else self._readable(cohort.output_dict, f, reverse)
            )
            out = self._step(f, False, feats, pos, sizes, memory, run.num_frames, reverse)
        compact = self._compact(out, cohort, run.differentiable)
        cohort.output_dict["non_cond_frame_outputs"][f] = compact
        if run.can_prune:
            self._prune(cohort, f, step, int(self.model.num_maskmem), run.direction)
        return compact

    def _frames(
        self, run: _Propagation, progress: bool = False, stop_after_absent: int | None = None
    ) -> Iterator[tuple[_Cohort, int, dict[str, Any]]]:
        """``(cohort, slice, outputs)`` in propagation order: forward from each cohort's start slice
        to the end, then backward to the first slice, as ``SAM2VideoPredictor`` runs.

        A key slice comes up each time a pass reaches it (its conditioning outputs). With
        ``stop_after_absent`` (inference only) an object whose pass has ended comes up with an
        empty mask, and a cohort whose objects have all ended is not tracked further in that pass.
        """
        passes = [(+1, "forward"), (-1, "backward")]
        passes = [(step, name) for step, name in passes if run.direction in ("both", name)]
        steps = 0
        for step, name in passes:
            stop = _AbsenceStop(None if run.differentiable else stop_after_absent)
            if step > 0:
                order = range(min(c.start for c in run.cohorts), run.num_frames)
            else:
                order = range(max(c.start for c in run.cohorts), -1, -1)
            for f in _progress(order, progress, f"propagate {name}"):
                for cohort in run.cohorts:
                    if (step > 0 and f < cohort.start) or (step < 0 and f > cohort.start):
                        continue
                    cond = cohort.output_dict["cond_frame_outputs"]
                    if f in cond:
                        stop.reset(cohort)
                        yield cohort, f, cond[f]
                        continue
                    ended = stop.stopped(cohort)
                    if bool(ended.all()):
                        continue
                    out = self._track(run, cohort, f, step)
                    steps += 1
                    stop.update(cohort, out["object_score_logits"])
                    yield cohort, f, _blanked(out, ended)
        self.last_encoded_slices = run.stream.encoded
        self.last_frame_steps = steps

    @staticmethod
    def _collect(
        frames: Iterator[tuple[_Cohort, int, dict[str, Any]]],
        run: _Propagation,
        out_hw: tuple[int, int],
        output_device: str | torch.device,
        output_dtype: torch.dtype,
        sink: SliceSink | None,
        scores: ScoreSink | None,
    ) -> Tensor | None:
        """Inference: each object's slice once, to ``sink`` or into ``(N, T, H, W)`` logits."""
        logits = None
        if sink is None:
            shape = (len(run.prompts), run.num_frames, *out_hw)
            logits = torch.full(shape, NO_OBJ_SCORE, dtype=output_dtype, device=output_device)
        # a slice can come up in both passes (a key slice; with start="earliest" also the slices
        # between the start and a later key slice): the collected logits keep the last answer,
        # as the video predictor's do; a sink gets each slice once, the first time
        delivered: set[tuple[int, int]] = set()
        for cohort, f, out in frames:
            if scores is not None:
                score = out["object_score_logits"].detach().float().reshape(-1).cpu()
                scores(cohort.rows, f, score, out["iou_pred"].detach().float().reshape(-1).cpu())
            if sink is not None:
                if (id(cohort), f) in delivered:
                    continue
                delivered.add((id(cohort), f))
            up = out["pred_masks"].float()
            if tuple(up.shape[-2:]) != out_hw:
                up = F.interpolate(up, size=out_hw, mode="bilinear", align_corners=False)
            up = up[:, 0].to(output_device, output_dtype)
            if sink is not None:
                sink(cohort.rows, f, up)
            else:
                logits[cohort.rows, f] = up
        return logits

    def _assemble(
        self,
        frames: Iterator[tuple[_Cohort, int, dict[str, Any]]],
        run: _Propagation,
        out_hw: tuple[int, int],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Training: ``(N, T, h, w)`` logits, object scores and IoUs, keeping the autograd graph."""
        results = {(id(cohort), f): out for cohort, f, out in frames}
        low_hw = next(iter(results.values()))["pred_masks"].shape[-2:]
        fill = torch.full((1, *low_hw), NO_OBJ_SCORE, device=self.device)
        n_obj, num_frames = len(run.prompts), run.num_frames
        rows: list[list[Tensor]] = [[fill] * num_frames for _ in range(n_obj)]
        no_score = torch.full((), NO_OBJ_SCORE, device=self.device)
        no_iou = torch.zeros((), device=self.device)
        obj_scores: list[list[Tensor]] = [[no_score] * num_frames for _ in range(n_obj)]
        iou_preds: list[list[Tensor]] = [[no_iou] * num_frames for _ in range(n_obj)]
        for cohort in run.cohorts:
            for f in range(num_frames):
                out = results.get((id(cohort), f))
                if out is None:
                    continue
                for n, row in enumerate(cohort.rows):
                    rows[row][f] = out["pred_masks"][n]
                    obj_scores[row][f] = out["object_score_logits"][n].reshape(())
                    iou_preds[row][f] = out["iou_pred"][n].reshape(())
        stacked = torch.stack([torch.cat(r) for r in rows]).float()  # (N, T, h, w)
        if tuple(stacked.shape[-2:]) != out_hw:
            stacked = F.interpolate(stacked, size=out_hw, mode="bilinear", align_corners=False)
        extras = {
            "object_score_logits": torch.stack([torch.stack(s) for s in obj_scores]).float(),
            "iou_predictions": torch.stack([torch.stack(s) for s in iou_preds]).float(),
        }
        return stacked, extras

    @staticmethod
    def _prune(cohort: _Cohort, f: int, step: int, num_maskmem: int, direction: str) -> None:
        """Drop spatial memories no later slice can attend to (object pointers are kept: tiny)."""
        non_cond = cohort.output_dict["non_cond_frame_outputs"]
        old = f - step * (num_maskmem - 1)
        if old not in non_cond:
            return
        # the backward pass re-reads the first (num_maskmem - 1) slices after the start slice
        if step > 0 and direction == "both" and old <= cohort.start + num_maskmem - 1:
            return
        non_cond[old] = {**non_cond[old], "maskmem_features": None, "pred_masks": None}

    # ------------------------------------------------------------------ public entry points
    @torch.inference_mode()
    def propagate(
        self,
        frames: Tensor | FrameSource | None,
        prompts: Sequence[ObjectPrompts] | ObjectPrompts,
        original_size: tuple[int, int] | None = None,
        output_size: tuple[int, int] | None = None,
        direction: Direction = "both",
        start: Literal["object", "earliest"] | None = None,
        features: Mapping[str, Sequence[Tensor]] | None = None,
        output_device: str | torch.device = "cpu",
        progress: bool = False,
        output_dtype: torch.dtype = torch.float32,
        sink: SliceSink | None = None,
        scores: ScoreSink | None = None,
        stop_after_absent: int | None | Literal["default"] = "default",
    ) -> Tensor | None:
        """Inference: logits ``(N_objects, T, H, W)`` for every object on every slice.

        Args:
            frames: ``(T, 3, S, S)`` preprocessed slices, or a `FrameSource` (e.g.
                `VolumeFrames`) that preprocesses them on demand.
            prompts: one `ObjectPrompts` per object, in the original slice grid.
            original_size: ``(H, W)`` of the slices the prompts were drawn on (defaults to the
                source's ``original_size``, else ``(S, S)``).
            output_size: size of the returned logits (default ``original_size``).
            direction: ``"both"`` (forward then backward, the default), or only one pass;
                slices a pass does not reach keep ``NO_OBJ_SCORE``.
            start: overrides the constructor's ``start``.
            features: cached `encode` outputs for all T slices, instead of ``frames``.
            output_device: where the logits are collected (CPU by default: GPU memory stays
                bounded by the model and one chunk of slices).
            output_dtype: dtype of the collected logits; ``torch.float16`` halves the largest
                buffer of a long volume and keeps every logit's sign.
            progress: show tqdm bars.
            sink: instead of collecting ``(N, T, H, W)`` logits, hand each slice's logits to
                ``sink(rows, slice_index, logits)`` as soon as they are computed (``rows``: the
                objects' positions in ``prompts``, ``logits``: ``(len(rows), H, W)`` in
                ``output_dtype`` on ``output_device``) and return None. Each object's slice is
                delivered once; slices a pass does not reach are not delivered. A consumer that
                keeps only what it needs (e.g. `monai_sam.inferers.LabelAccumulator`'s running
                argmax) never holds the per-object logits of the whole volume.
            scores: also hand each slice's object score logits and predicted IoUs to
                ``scores(rows, slice_index, object_scores, ious)`` (`ScoreSink`); a key slice
                may be delivered once per pass, with the same values.
            stop_after_absent: end a pass for an object after this many consecutive slices
                called absent (see the constructor); ``"default"``: the segmenter's setting.
        Raises:
            PromptError: a prompt that does not fit the volume (outside, out of range, empty...).
        """
        source = _as_frame_source(frames) if frames is not None else None
        stop_after = _AbsenceStop(
            self.stop_after_absent if stop_after_absent == "default" else stop_after_absent
        ).k
        was_training = self.model.training
        self.model.eval()
        try:
            run = self._setup(
                source, features, prompts, original_size, direction, start, differentiable=False
            )
            self._condition(run)
            out_hw = tuple(int(v) for v in (output_size or run.original_size))
            frames = self._frames(run, progress, stop_after)
            return self._collect(frames, run, out_hw, output_device, output_dtype, sink, scores)
        finally:
            self.model.train(was_training)

    def forward(
        self,
        frames: Tensor | FrameSource | None,
        prompts: Sequence[ObjectPrompts] | ObjectPrompts,
        original_size: tuple[int, int] | None = None,
        output_size: tuple[int, int] | None = None,
        direction: Direction = "both",
        start: Literal["object", "earliest"] | None = None,
        features: Mapping[str, Sequence[Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """Training path: the same propagation with gradients, all slices' features kept.

        In ``train()`` mode the prompted slices write their memory directly from the predicted
        high-res masks, as sam2's ``SAM2Train`` does. Returns ``{"logits": (N, T, h, w),
        "object_score_logits": (N, T)}`` with ``(h, w)`` = ``output_size`` or the original size.
        """
        source = _as_frame_source(frames) if frames is not None else None
        run = self._setup(source, features, prompts, original_size, direction, start, differentiable=True)
        self._condition(run)
        out_hw = tuple(int(v) for v in (output_size or run.original_size))
        logits, extras = self._assemble(self._frames(run), run, out_hw)
        return {"logits": logits, **extras}

    # ------------------------------------------------------------------ the trainer's protocol
    def split_encoded(self, raw: Mapping[str, Sequence[Tensor]]) -> list[dict[str, Tensor]]:
        """Batched `encode` outputs -> one dict of CPU tensors per slice (the feature cache's unit).

        Position encodings are left out: they depend only on the feature shape.
        """
        fpn = raw["backbone_fpn"]
        return [{f"fpn{i}": level[n].cpu() for i, level in enumerate(fpn)} for n in range(fpn[0].shape[0])]

    def join_encoded(
        self, per_slice: Sequence[Mapping[str, Tensor]], device: torch.device | str | None = None
    ) -> dict[str, list[Tensor]]:
        """The inverse of `split_encoded`: what `forward` / `propagate` take as ``features``."""
        levels = len([k for k in per_slice[0] if k.startswith("fpn")])
        fpn = [
            torch.stack([s[f"fpn{i}"] for s in per_slice]).to(device or self.device) for i in range(levels)
        ]
        pos_enc = self.model.image_encoder.neck.position_encoding
        return {"backbone_fpn": fpn, "vision_pos_enc": [pos_enc(level).to(level.dtype) for level in fpn]}

    def training_inputs(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
        """``forward`` keyword arguments and binary targets ``(N, T, H, W)`` for one training sample.

        ``item`` holds ``prompts`` (``list[ObjectPrompts]``) and ``label`` ``(1, H, W, T)``.
        """
        label = torch.as_tensor(item["label"])
        label = label[0] if label.ndim == 4 else label
        prompts = list(item["prompts"])
        target = torch.stack([(label == o.object_id).permute(2, 0, 1) for o in prompts]).float()
        return {"prompts": prompts, "original_size": tuple(int(v) for v in label.shape[:2])}, target


def _blanked(out: dict[str, Any], ended: Tensor) -> dict[str, Any]:
    """``out`` with the masks of the objects whose pass has ended emptied (a copy; memory keeps its own)."""
    if not bool(ended.any()):
        return out
    masks = out["pred_masks"].clone()
    masks[ended.to(masks.device)] = NO_OBJ_SCORE
    return {**out, "pred_masks": masks}


def _stack_objects(values: list[Any]) -> Any:
    """One object's outputs per list item -> the batch: tensors (or lists of tensors, as
    ``maskmem_pos_enc``) concatenated on the object axis; None stays None (no memory encoded)."""
    if values[0] is None:
        return None
    if isinstance(values[0], list):
        return [torch.cat(level) for level in zip(*values, strict=True)]
    return torch.cat(values)


#: what a key slice keeps of its step for the memory bank (see `Sam2VolumeSegmenter._compact`)
_MEMORY_KEYS = (
    "maskmem_features",
    "maskmem_pos_enc",
    "pred_masks",
    "obj_ptr",
    "object_score_logits",
    "iou_pred",
)


def _take_objects(values: dict[str, Any], index: Tensor) -> dict[str, Any]:
    """``values`` (as `_stack_objects` gives them) with the object axis reordered by ``index``."""

    def take(v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, list):
            return [take(x) for x in v]
        return v.index_select(0, index.to(v.device))

    return {key: take(v) for key, v in values.items()}


def _progress(order: range, enabled: bool, desc: str) -> Iterator[int]:
    if not enabled:
        return iter(order)
    from tqdm.auto import tqdm

    return iter(tqdm(order, desc=desc, leave=False))


def frames_from_sam_input(image: Tensor) -> Tensor:
    """``(3, S, S, T)`` (`SamInput` output, batch dim allowed) -> ``(T, 3, S, S)`` frames.

    A 2D ``(3, S, S)`` image is one frame.
    """
    if image.ndim == 3 and image.shape[0] == 3:
        return image[None]
    if image.ndim == 5:
        if image.shape[0] != 1:
            raise ValueError(f"one volume at a time, got a batch of {image.shape[0]}")
        image = image[0]
    if image.ndim != 4 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, S, S, T) SamInput volume, got {tuple(image.shape)}")
    return image.permute(3, 0, 1, 2)


__all__ += ["frames_from_sam_input", "PromptError"]
