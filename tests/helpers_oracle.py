"""The reference for the propagation: sam2's own ``SAM2VideoPredictor`` on the same prompts.

Only tests and benchmarks use it (``scripts/benchmark_*.py`` add ``tests/`` to the path); it
stands in for the predictor's frame loader to feed it the same preprocessed frames as tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from monai_sam.networks.sam2_volume import NO_OBJ_SCORE, Direction
from monai_sam.prompts import ObjectPrompts

__all__ = ["video_predictor_logits"]


def video_predictor_logits(
    predictor: nn.Module,
    prompts: Sequence[ObjectPrompts],
    original_size: tuple[int, int],
    frames: Tensor | None = None,
    video_path: str | None = None,
    direction: Direction = "both",
    start: Literal["object", "earliest"] = "object",
) -> Tensor:
    """The same segmentation by ``sam2``'s own ``SAM2VideoPredictor``: the reference.

    Either ``frames`` ``(T, 3, S, S)`` (fed to ``init_state`` as a tensor, standing in for
    ``load_video_frames``) or ``video_path`` (a JPEG folder, as MONAI Label does). Prompts are
    added with ``add_new_points_or_box`` / ``add_new_mask`` in slice order, then
    ``propagate_in_video`` runs forward and/or with ``reverse=True``. ``start="object"`` runs one
    predictor session per group of objects sharing key slices (each starts at its own earliest
    key slice), ``"earliest"`` one session with all objects. Returns ``(N, T, H, W)`` logits.
    """
    import sam2.sam2_video_predictor as svp

    h, w = int(original_size[0]), int(original_size[1])
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, obj in enumerate(prompts):
        key = tuple(obj.key_slices) if start == "object" else ()
        groups.setdefault(key, []).append(row)
    logits: Tensor | None = None
    for rows in groups.values():
        if video_path is None:
            if frames is None:
                raise ValueError("give frames or video_path")
            original_loader = svp.load_video_frames
            svp.load_video_frames = lambda **kw: (frames.to(kw["compute_device"]).float(), h, w)
            try:
                state = predictor.init_state(video_path="<in-memory frames>")
            finally:
                svp.load_video_frames = original_loader
        else:
            state = predictor.init_state(video_path=str(video_path))
        num_frames = int(state["num_frames"])
        if logits is None:
            logits = torch.full((len(prompts), num_frames, h, w), NO_OBJ_SCORE)
        for row in rows:
            obj = prompts[row]
            for sp in sorted(obj.slices, key=lambda p: p.slice_index):
                if sp.mask is not None:
                    predictor.add_new_mask(state, sp.slice_index, obj.object_id, torch.as_tensor(sp.mask))
                else:
                    predictor.add_new_points_or_box(
                        state,
                        sp.slice_index,
                        obj.object_id,
                        points=None if sp.points is None else sp.points,
                        labels=None if sp.points is None else sp.point_labels,
                        box=sp.box,
                    )
        passes = [
            r
            for r, on in (
                (False, direction in ("both", "forward")),
                (True, direction in ("both", "backward")),
            )
            if on
        ]
        for reverse in passes:
            for f, obj_ids, masks in predictor.propagate_in_video(state, reverse=reverse):
                by_id = {oid: n for n, oid in enumerate(obj_ids)}
                for row in rows:
                    logits[row, f] = masks[by_id[prompts[row].object_id], 0].float().cpu()
        predictor.reset_state(state)
    return logits
