"""Engines: the frozen-encoder trainer, the prompted volume evaluator, the feature cache, handlers."""

from monai_sam.engines.checkpoint import (
    CheckpointMismatchError,
    TrainableCheckpoint,
    latest_checkpoint,
    load_trained_parts,
)
from monai_sam.engines.evaluator import PRED_LABEL, PromptedVolumeEvaluator
from monai_sam.engines.feature_cache import FeatureCache, encoder_identity, tensor_content_hash
from monai_sam.engines.handlers import ClassMetricsWriter, ResumeFromLatest
from monai_sam.engines.image_evaluator import DiscCupMetricsWriter, LabelPngWriter, PromptedImageEvaluator
from monai_sam.engines.mask_loss import MaskPredictionLoss
from monai_sam.engines.model_record import (
    EncoderMismatchError,
    ModelRecord,
    ModelRecordWriter,
    check_encoder,
    read_model_record,
    recorded,
)
from monai_sam.engines.prompt_free_evaluator import PromptFreeVolumeEvaluator, collate_slices, few_shot_datalist
from monai_sam.engines.trainer import (
    TRAINABLE_PARTS,
    FrozenEncoderNetwork,
    FrozenEncoderTrainer,
    SequenceSegmentationLoss,
    collate_as_list,
    encoder_features,
    freeze_for_training,
    trainable_param_groups,
)

__all__ = [
    "PRED_LABEL",
    "TRAINABLE_PARTS",
    "CheckpointMismatchError",
    "ClassMetricsWriter",
    "DiscCupMetricsWriter",
    "EncoderMismatchError",
    "LabelPngWriter",
    "MaskPredictionLoss",
    "ModelRecord",
    "ModelRecordWriter",
    "PromptedImageEvaluator",
    "FeatureCache",
    "FrozenEncoderNetwork",
    "FrozenEncoderTrainer",
    "PromptedVolumeEvaluator",
    "PromptFreeVolumeEvaluator",
    "ResumeFromLatest",
    "SequenceSegmentationLoss",
    "TrainableCheckpoint",
    "check_encoder",
    "collate_as_list",
    "collate_slices",
    "few_shot_datalist",
    "encoder_identity",
    "encoder_features",
    "freeze_for_training",
    "latest_checkpoint",
    "load_trained_parts",
    "read_model_record",
    "recorded",
    "tensor_content_hash",
    "trainable_param_groups",
]
