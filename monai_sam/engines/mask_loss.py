"""The 2D fine-tuning loss of the seed recipe: BCE + Dice on SAM's low-resolution masks, plus IoU-head MSE.

SAM's mask decoder also predicts the IoU of each mask it outputs (its "IoU head"); SAM trains it
with the mean squared error against the IoU the mask actually has. Keeping that term lets a
fine-tuned model still say how good a mask is; weighting it 0 leaves the IoU head untouched
(no gradient reaches it, so the optimizer skips it).

SAM2 also scores whether the object is there at all and, when it says no, replaces the mask by
a constant -1024 (no gradient reaches the mask then, and the BCE term jumps). A prompted region
of a photograph is always there, so with ``"object_score_logits"`` in the output a BCE term
towards "present" teaches the score back (SAM2's own loss has the same term).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn

__all__ = ["MaskPredictionLoss", "mask_iou"]


def mask_iou(logits: Tensor, target: Tensor, threshold: float = 0.0) -> Tensor:
    """IoU ``(N, C)`` of the thresholded logits with the target (``>= 0.5``); 1 when both are empty."""
    pred = logits > threshold
    truth = target >= 0.5
    inter = (pred & truth).flatten(2).sum(-1).float()
    union = (pred | truth).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class MaskPredictionLoss(nn.Module):
    """BCE + Dice on the low-resolution masks, MSE of the IoU head, BCE of the object score (SAM2).

    Args:
        lambda_bce, lambda_dice: weights of the binary cross-entropy and Dice terms (MONAI's
            `DiceCELoss` with a sigmoid: one channel per object, Dice per object).
        lambda_iou: weight of the IoU-head term; it applies when the network's output has
            ``"iou_predictions"`` (both 2D segmenters give them).
        lambda_object: weight of the object-score term; it applies when the output has
            ``"object_score_logits"`` (SAM2); every prompted object is present.

    ``lambda_bce * BCE + lambda_dice * Dice + lambda_iou * MSE(iou_predictions, IoU) +
    lambda_object * BCE(object_score_logits, present)``.

    Call with the network's output ``{"logits": (N, 1, h, w), ["iou_predictions": (N, 1)],
    ["object_score_logits": (N, 1)]}`` (or the logits tensor itself) and the target
    ``(N, 1, h, w)`` in ``[0, 1]`` (soft targets at boundary pixels are fine).
    """

    def __init__(
        self,
        lambda_bce: float = 1.0,
        lambda_dice: float = 1.0,
        lambda_iou: float = 1.0,
        lambda_object: float = 1.0,
    ) -> None:
        super().__init__()
        if min(lambda_bce, lambda_dice, lambda_iou, lambda_object) < 0:
            raise ValueError(
                f"loss weights must be >= 0, got bce={lambda_bce}, dice={lambda_dice}, iou={lambda_iou}, "
                f"object={lambda_object}"
            )
        self.mask_loss = DiceCELoss(sigmoid=True, lambda_dice=float(lambda_dice), lambda_ce=float(lambda_bce))
        self.lambda_iou = float(lambda_iou)
        self.lambda_object = float(lambda_object)

    def forward(self, output: Mapping[str, Tensor] | Tensor, target: Tensor) -> Tensor:
        logits = output if isinstance(output, Tensor) else output["logits"]
        logits = logits.float()
        target = target.to(logits.device, logits.dtype)
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        loss = self.mask_loss(logits, target)
        iou_pred = None if isinstance(output, Tensor) else output.get("iou_predictions")
        if self.lambda_iou > 0 and iou_pred is not None:
            actual = mask_iou(logits.detach(), target)
            loss = loss + self.lambda_iou * F.mse_loss(iou_pred.float().reshape(actual.shape), actual)
        score = None if isinstance(output, Tensor) else output.get("object_score_logits")
        if self.lambda_object > 0 and score is not None:
            score = score.float()
            loss = loss + self.lambda_object * F.binary_cross_entropy_with_logits(
                score, torch.ones_like(score)
            )
        return loss
