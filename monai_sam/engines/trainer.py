"""Frozen-encoder training of SAM / SAM2's light parts, on MONAI's SupervisedTrainer.

The image encoder never trains (no gradients, eval mode, not in the optimizer, not in our
checkpoints), so its output for a slice is computed once and read from the `FeatureCache`
afterwards. What trains is chosen by name (mask decoder, memory attention, memory encoder,
object pointers, a prompt-free head, optionally the prompt encoder), each with its own
learning rate, as Medical-SAM2 does.

Any network with the small `FrozenEncoderNetwork` interface trains here: the slice-memory
`Sam2VolumeSegmenter`, SAM's 2D image mode, the prompt-free heads. The trainer owns the
encoder / cache / optimizer loop; the network says what a sample means.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceFocalLoss
from monai.utils import CommonKeys, convert_to_tensor
from torch import Tensor, nn
from torch.nn import functional as F

from monai_sam.engines.feature_cache import FeatureCache
from monai_sam.networks.sam2_volume import frames_from_sam_input

__all__ = [
    "TRAINABLE_PARTS",
    "FrozenEncoderNetwork",
    "FrozenEncoderTrainer",
    "encoder_features",
    "SequenceSegmentationLoss",
    "collate_as_list",
    "freeze_for_training",
    "plain_tensor",
    "trainable_param_groups",
]

logger = logging.getLogger(__name__)

#: Parameter-name prefixes of each trainable part: SAM2Base's modules, segment_anything's
#: ``Sam`` (``mask_decoder``, ``prompt_encoder``) and the prompt-free heads (``head``).
TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    "mask_decoder": ("sam_mask_decoder", "mask_decoder"),
    "prompt_encoder": ("sam_prompt_encoder", "prompt_encoder"),
    "memory_attention": ("memory_attention",),
    "memory_encoder": ("memory_encoder", "mask_downsample", "maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc"),
    "object_pointers": ("obj_ptr_proj", "obj_ptr_tpos_proj", "no_obj_ptr", "no_obj_embed_spatial"),
    "head": ("head",),
}


@runtime_checkable
class FrozenEncoderNetwork(Protocol):
    """What `FrozenEncoderTrainer` needs of a network (see the module docstring).

    ``encode`` gives the frozen encoder's raw, batched outputs for ``(n, 3, S, S)`` frames;
    ``split_encoded`` / ``join_encoded`` turn them into one dict of CPU tensors per frame (the
    cache's unit) and back; ``training_inputs(item)`` gives ``forward``'s keyword arguments and
    the loss target for one sample; ``forward(None, features=..., **kwargs)`` the output that
    the loss function takes.
    """

    encoder_batch_size: int

    def encode(self, frames: Tensor) -> Mapping[str, Any]: ...

    def split_encoded(self, raw: Mapping[str, Any]) -> list[dict[str, Tensor]]: ...

    def join_encoded(self, per_frame: Sequence[Mapping[str, Tensor]], device: Any = None) -> Mapping[str, Any]: ...

    def training_inputs(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]: ...


def encoder_features(
    network: FrozenEncoderNetwork, frames: Tensor, device: torch.device | str, cache: FeatureCache | None = None
) -> Mapping[str, Any]:
    """Raw encoder outputs for ``(T, 3, S, S)`` frames, read from ``cache`` when it has them."""
    with torch.no_grad():
        if cache is None:
            return network.encode(frames.to(device))
        per_frame = cache.get_or_compute(
            frames.cpu(), lambda x: network.split_encoded(network.encode(x.to(device))), network.encoder_batch_size
        )
        return network.join_encoded(per_frame, device)


def _image_encoder(model: nn.Module) -> nn.Module | None:
    """The frozen encoder of a network, a SAM/SAM2 model or a wrapper around one (``.model``)."""
    for m in (model, getattr(model, "model", None)):
        encoder = getattr(m, "image_encoder", None)
        if isinstance(encoder, nn.Module):
            return encoder
    return None


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
    encoder = _image_encoder(model)
    if encoder is not None:
        encoder.eval()
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
    """SAM2's training loss per object over a slice sequence.

    Mask: focal (x20) + Dice on the logits ``(N, T, H, W)``, Dice over each object's whole
    sequence so small organs stay visible; IoU: L1 between the IoU SAM2 predicts for its mask
    and the mask's actual IoU, on slices that show the object; object score: BCE on whether
    the object is on the slice. The weights are SAM2's own (20 : 1 : 1 : 1). A bare logits
    tensor (no IoU / object-score outputs) gets the mask terms only.
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_focal: float = 20.0,
        lambda_iou: float = 1.0,
        lambda_object: float = 1.0,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.mask_loss = DiceFocalLoss(sigmoid=True, lambda_dice=lambda_dice, lambda_focal=lambda_focal, gamma=gamma)
        self.lambda_iou = float(lambda_iou)
        self.lambda_object = float(lambda_object)

    def forward(self, output: Mapping[str, Tensor] | Tensor, target: Tensor) -> Tensor:
        out = output if isinstance(output, Mapping) else {"logits": output}
        logits = out["logits"].float()
        target = target.to(logits.dtype)
        # objects as the batch, slices as depth
        loss = self.mask_loss(logits[:, None], target[:, None])
        present = target.flatten(2).amax(-1)  # (N, T): the object is on the slice
        if self.lambda_iou and "iou_predictions" in out:
            with torch.no_grad():
                pred = logits > 0
                inter = (pred & (target > 0)).flatten(2).sum(-1).float()
                union = (pred | (target > 0)).flatten(2).sum(-1).float()
                actual = inter / union.clamp(min=1)
            err = (out["iou_predictions"].float() - actual).abs() * present
            loss = loss + self.lambda_iou * err.sum() / present.sum().clamp(min=1)
        if self.lambda_object and "object_score_logits" in out:
            loss = loss + self.lambda_object * F.binary_cross_entropy_with_logits(
                out["object_score_logits"].float(), present
            )
        return loss


class FrozenEncoderTrainer(SupervisedTrainer):
    """`SupervisedTrainer` whose iteration reads a frozen encoder's features through a cache.

    Each batch item (``collate_as_list``) holds ``image``: `SamInputd` output ``(3, S, S, T)``
    (a slice sequence) or ``(3, S, S)`` (a 2D image), and whatever the network's
    ``training_inputs`` reads (labels, prompts). Encoder features come from ``feature_cache``
    when given (computed on the first visit); the loss is averaged over the batch's items.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[[Any, Tensor], Tensor] | None = None,
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
        if not isinstance(self.segmenter, FrozenEncoderNetwork):
            raise TypeError(
                f"{type(self.segmenter).__name__} lacks the FrozenEncoderNetwork interface "
                "(encoder_batch_size, encode, split_encoded, join_encoded, training_inputs)"
            )
        self.feature_cache = feature_cache

    @property
    def segmenter(self) -> nn.Module:
        """The network, unwrapped from DistributedDataParallel when wrapped."""
        return getattr(self.network, "module", self.network)

    def encoder_features(self, frames: Tensor) -> Mapping[str, Any]:
        """Raw encoder outputs for ``(T, 3, S, S)`` frames, through the cache when there is one."""
        return encoder_features(self.segmenter, frames, self.state.device, self.feature_cache)

    def _iteration(self, engine, batchdata: list[dict]) -> dict[str, Any]:  # type: ignore[override]
        seg = self.segmenter
        seg.train()
        encoder = _image_encoder(seg)
        if encoder is not None:
            encoder.eval()
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        total = torch.zeros((), device=self.state.device)
        for item in batchdata:
            frames = frames_from_sam_input(plain_tensor(item[CommonKeys.IMAGE]))
            features = self.encoder_features(frames)
            kwargs, target = seg.training_inputs({k: _plain(v) for k, v in item.items()})
            with torch.autocast(self.state.device.type, enabled=self.amp):
                # through self.network so that DDP synchronises the gradients
                out = self.network(None, features=features, **kwargs)
                loss = self.loss_function(out, target.to(self.state.device))
            total = total + loss / len(batchdata)
        if self.amp and self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()
        # MONAI's convention for a decollated batch (a list of per-sample dicts, the loss in each),
        # so that model-zoo handler settings (`from_engine(['loss'], first=True)`, `--tracking
        # mlflow`) read it unchanged
        engine.state.output = [{CommonKeys.LOSS: total.detach()}]
        return engine.state.output


def _plain(value: Any) -> Any:
    return plain_tensor(value) if isinstance(value, torch.Tensor) else value
