"""Frozen-encoder training of SAM2's light parts on slice sequences, on MONAI's SupervisedTrainer.

The image encoder never trains (no gradients, eval mode, not in the optimizer, not in our
checkpoints), so its output for a slice is computed once and read from the `FeatureCache`
afterwards. What trains is chosen by name (mask decoder, memory attention, memory encoder,
object pointers, optionally the prompt encoder), each with its own learning rate, as
Medical-SAM2 does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceFocalLoss
from monai.utils import CommonKeys, convert_to_tensor
from torch import Tensor, nn

from monai_sam.engines.feature_cache import FeatureCache
from monai_sam.networks.sam2_volume import Sam2VolumeSegmenter, frames_from_sam_input
from monai_sam.prompts import ObjectPrompts

__all__ = [
    "TRAINABLE_PARTS",
    "FrozenEncoderTrainer",
    "SequenceSegmentationLoss",
    "collate_as_list",
    "freeze_for_training",
    "plain_tensor",
    "trainable_param_groups",
]

logger = logging.getLogger(__name__)

#: SAM2Base sub-modules / parameters that make up each trainable part.
TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    "mask_decoder": ("sam_mask_decoder",),
    "prompt_encoder": ("sam_prompt_encoder",),
    "memory_attention": ("memory_attention",),
    "memory_encoder": ("memory_encoder", "mask_downsample", "maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc"),
    "object_pointers": ("obj_ptr_proj", "obj_ptr_tpos_proj", "no_obj_ptr", "no_obj_embed_spatial"),
}


def _part_of(name: str) -> str | None:
    for part, prefixes in TRAINABLE_PARTS.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return part
    return None


def freeze_for_training(model: nn.Module, trainable: Sequence[str]) -> dict[str, list[nn.Parameter]]:
    """Set ``requires_grad`` so that only the named parts train; return their parameters by part.

    The image encoder is never trainable here: that is what makes its features cacheable.
    """
    unknown = set(trainable) - set(TRAINABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}; choose from {sorted(TRAINABLE_PARTS)}")
    groups: dict[str, list[nn.Parameter]] = {p: [] for p in trainable}
    for name, param in model.named_parameters():
        part = _part_of(name)
        train = part in groups
        param.requires_grad_(train)
        if train:
            groups[part].append(param)
    model.image_encoder.eval()
    return groups


def trainable_param_groups(
    model: nn.Module, learning_rates: Mapping[str, float], weight_decay: float = 0.01
) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per trainable part with its own learning rate."""
    groups = freeze_for_training(model, list(learning_rates))
    out = [
        {"params": params, "lr": float(learning_rates[part]), "weight_decay": weight_decay, "name": part}
        for part, params in groups.items()
        if params
    ]
    if not out:
        raise ValueError(f"no parameter matches the trainable parts {list(learning_rates)}")
    logger.info(
        "trainable: %s",
        ", ".join(f"{g['name']} ({sum(p.numel() for p in g['params']) / 1e6:.2f}M, lr {g['lr']:g})" for g in out),
    )
    return out


def plain_tensor(x: Any) -> Tensor:
    """A plain ``torch.Tensor`` (no MetaTensor): metadata tracking on every op of SAM2's many
    small steps costs more than the maths."""
    return convert_to_tensor(x, track_meta=False)


def collate_as_list(batch: list[dict]) -> list[dict]:
    """Keep a batch as a list of samples: prompts and sequences differ per sample."""
    return list(batch)


class SequenceSegmentationLoss(nn.Module):
    """Dice + focal loss per object over a slice sequence (logits ``(N, T, H, W)``)."""

    def __init__(self, lambda_dice: float = 1.0, lambda_focal: float = 20.0, gamma: float = 2.0) -> None:
        super().__init__()
        # SAM's own weighting of focal vs dice is 20:1; Dice keeps small organs visible
        self.loss = DiceFocalLoss(sigmoid=True, lambda_dice=lambda_dice, lambda_focal=lambda_focal, gamma=gamma)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # objects as the batch, slices as depth: Dice over the whole object sequence
        return self.loss(logits[:, None], target[:, None].to(logits.dtype))


def object_targets(label: Tensor, prompts: Sequence[ObjectPrompts]) -> Tensor:
    """Binary targets ``(N, T, H, W)`` from a label sequence ``(1, H, W, T)`` for each prompted object."""
    lab = label[0] if label.ndim == 4 else label
    return torch.stack([(lab == o.object_id).permute(2, 0, 1) for o in prompts]).float()


class FrozenEncoderTrainer(SupervisedTrainer):
    """`SupervisedTrainer` whose iteration runs SAM2's memory over a slice sequence per sample.

    Each batch item holds ``image`` ``(3, S, S, T)`` (`SamInputd` output), ``label``
    ``(1, H, W, T)`` and ``prompts`` (``list[ObjectPrompts]`` in the label's pixel grid).
    Encoder features come from ``feature_cache`` when given (computed on the first visit).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        network: Sam2VolumeSegmenter,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[[Tensor, Tensor], Tensor] | None = None,
        feature_cache: FeatureCache | None = None,
        amp: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)  # batches are lists of samples already
        super().__init__(
            device=torch.device(device),
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function or SequenceSegmentationLoss(),
            amp=amp,
            **kwargs,
        )
        self.feature_cache = feature_cache

    @property
    def segmenter(self) -> Sam2VolumeSegmenter:
        """The `Sam2VolumeSegmenter`, unwrapped from DistributedDataParallel when wrapped."""
        return getattr(self.network, "module", self.network)

    def encoder_features(self, frames: Tensor) -> dict[str, list[Tensor]]:
        """Raw encoder outputs for ``(T, 3, S, S)`` frames, through the cache when there is one."""
        seg = self.segmenter
        with torch.no_grad():
            if self.feature_cache is None:
                return seg.encode(frames.to(self.state.device))
            per_slice = self.feature_cache.get_or_compute(
                frames.cpu(), lambda x: _split_slices(seg.encode(x.to(self.state.device))), seg.encoder_batch_size
            )
            return _stack_slices(per_slice, seg, self.state.device)

    def _iteration(self, engine, batchdata: list[dict]) -> dict[str, Any]:  # type: ignore[override]
        seg = self.segmenter
        seg.train()
        seg.model.image_encoder.eval()
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        total = torch.zeros((), device=self.state.device)
        for item in batchdata:
            frames = frames_from_sam_input(plain_tensor(item[CommonKeys.IMAGE]))
            label = plain_tensor(item[CommonKeys.LABEL]).to(self.state.device)
            prompts = item["prompts"]
            features = self.encoder_features(frames)
            with torch.autocast(self.state.device.type, enabled=self.amp):
                # through self.network so that DDP synchronises the gradients
                out = self.network(None, prompts, original_size=tuple(label.shape[-3:-1]), features=features)
                loss = self.loss_function(out["logits"].float(), object_targets(label, prompts))
            total = total + loss / len(batchdata)
        if self.amp and self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()
        engine.state.output = {CommonKeys.LOSS: total.detach()}
        return engine.state.output


def _split_slices(raw: Mapping[str, Sequence[Tensor]]) -> list[dict[str, Tensor]]:
    """Batched encoder outputs -> one dict per slice (the cache's unit); positions are recomputed."""
    fpn = raw["backbone_fpn"]
    return [{f"fpn{i}": level[n].cpu() for i, level in enumerate(fpn)} for n in range(fpn[0].shape[0])]


def _stack_slices(per_slice: Sequence[Mapping[str, Tensor]], seg: Sam2VolumeSegmenter, device) -> dict:
    levels = len([k for k in per_slice[0] if k.startswith("fpn")])
    fpn = [torch.stack([s[f"fpn{i}"] for s in per_slice]).to(device) for i in range(levels)]
    # sine position encodings depend only on the feature shape: recomputed, not cached
    pos_enc = seg.model.image_encoder.neck.position_encoding
    pos = [pos_enc(level).to(level.dtype) for level in fpn]
    return {"backbone_fpn": fpn, "vision_pos_enc": pos}
