"""Frozen-encoder trainer: only the chosen parts train, and the feature cache changes nothing."""

import numpy as np
import pytest
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader

from monai_sam.data import make_phantom
from monai_sam.engines.feature_cache import FeatureCache, encoder_identity
from monai_sam.engines.trainer import (
    FrozenEncoderTrainer,
    SequenceSegmentationLoss,
    collate_as_list,
    freeze_for_training,
    trainable_param_groups,
)
from monai_sam.networks import Sam2VolumeSegmenter, build_sam2_model, frames_from_sam_input
from monai_sam.prompts import ObjectPrompts, SlicePrompt
from monai_sam.transforms import CTWindow, SamInput, box_from_mask

SIZE = 128


def _samples(n=2, t=4):
    """Short phantom sequences at 128 px with a box on the first slice of each organ."""
    out = []
    for seed in range(n):
        ph = make_phantom("ct", seed, shape=(64, 64, 24), spacing=(3.2, 3.2, 6.7))
        z0 = 8
        img = CTWindow("abdomen")(torch.as_tensor(ph.image[None, :, :, z0 : z0 + t]))
        lab = torch.as_tensor(ph.label[None, :, :, z0 : z0 + t].astype(np.int64))
        prompts = []
        for obj in (1, 2):
            mask = lab[0, :, :, 0].numpy() == obj
            if mask.any():
                prompts.append(ObjectPrompts(obj, slices=[SlicePrompt(0, box=box_from_mask(mask))]))
        out.append({"image": SamInput(SIZE)(img), "label": lab, "prompts": prompts})
    return out


def _segmenter():
    torch.manual_seed(0)
    return Sam2VolumeSegmenter(build_sam2_model("sam2.1_hiera_t", image_size=SIZE, mode="train"),
                               memory_dtype=None)


def _train(cache_dir=None, epochs=2):
    torch.manual_seed(0)
    seg = _segmenter()
    groups = trainable_param_groups(seg.model, {"mask_decoder": 1e-4, "memory_attention": 5e-5})
    opt = torch.optim.AdamW(groups)
    cache = None
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, encoder_identity("sam2.1_hiera_t", seg.model.image_encoder, SIZE))
    losses = []
    trainer = FrozenEncoderTrainer("cpu", epochs, DataLoader(_samples(), batch_size=2, collate_fn=collate_as_list),
                                   seg, opt, feature_cache=cache)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    trainer.run()
    return seg, losses, cache


def test_only_chosen_parts_train():
    seg = _segmenter()
    groups = freeze_for_training(seg.model, ["mask_decoder"])
    trainable = {n for n, p in seg.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("sam_mask_decoder.") for n in trainable)
    assert not any(p.requires_grad for p in seg.model.image_encoder.parameters())
    assert sum(p.numel() for p in groups["mask_decoder"]) == sum(
        p.numel() for p in seg.model.sam_mask_decoder.parameters())
    with pytest.raises(ValueError, match="unknown trainable part"):
        freeze_for_training(seg.model, ["image_encoder"])


def test_training_changes_decoder_not_encoder_and_cache_gives_same_losses(tmp_path):
    ref = _segmenter()
    seg, losses_off, _ = _train(None)
    assert all(np.isfinite(losses_off)) and len(losses_off) == 2
    enc_ref, enc = ref.model.image_encoder.state_dict(), seg.model.image_encoder.state_dict()
    assert all(torch.equal(enc_ref[k], enc[k]) for k in enc_ref), "the frozen encoder must not change"
    dec_ref, dec = ref.model.sam_mask_decoder.state_dict(), seg.model.sam_mask_decoder.state_dict()
    assert any(not torch.equal(dec_ref[k], dec[k]) for k in dec_ref), "the mask decoder must train"
    assert not seg.model.image_encoder.training

    _, losses_on, cache = _train(tmp_path / "cache")
    assert cache.stats.misses == 8 and cache.stats.hits == 8  # epoch 1 fills, epoch 2 reads
    np.testing.assert_allclose(losses_on, losses_off, atol=1e-5)


def test_sequence_loss_trains_the_iou_head_and_the_object_score():
    """SAM2's loss: IoU prediction (L1 to the mask's real IoU) and object score (BCE) take part."""
    seg = _segmenter()
    freeze_for_training(seg.model, ["mask_decoder"])
    seg.train()
    item = _samples(1)[0]
    kwargs, target = seg.training_inputs(item)
    h, w = item["label"].shape[1:3]
    assert target.shape == (len(item["prompts"]), 4, h, w)
    out = seg(None, features=seg.encode(frames_from_sam_input(item["image"])), **kwargs)
    assert out["iou_predictions"].shape == out["object_score_logits"].shape == target.shape[:2]
    loss_fn = SequenceSegmentationLoss()
    full = loss_fn(out, target)
    mask_only = SequenceSegmentationLoss(lambda_iou=0, lambda_object=0)(out, target)
    assert float(full.detach()) > float(mask_only.detach())
    full.backward()
    iou_head = seg.model.sam_mask_decoder.iou_prediction_head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in iou_head.parameters())
    # a perfect prediction with a confident object score and the right IoU costs only the Dice/focal floor
    perfect = {"logits": target * 40 - 20, "iou_predictions": (target.flatten(2).amax(-1)),
               "object_score_logits": target.flatten(2).amax(-1) * 40 - 20}
    assert float(loss_fn(perfect, target)) < 1e-3


class _ToyFrozenNet(torch.nn.Module):
    """The smallest network with the trainer's interface: a frozen conv 'encoder' and a 1x1 head."""

    encoder_batch_size = 4

    def __init__(self):
        super().__init__()
        self.image_encoder = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 1, 1)

    def encode(self, frames):
        return {"emb": self.image_encoder(frames)}

    def split_encoded(self, raw):
        return [{"emb": e.cpu()} for e in raw["emb"]]

    def join_encoded(self, per_frame, device=None):
        return {"emb": torch.stack([f["emb"] for f in per_frame]).to(device or "cpu")}

    def training_inputs(self, item):
        return {}, (torch.as_tensor(item["label"])[0].permute(2, 0, 1)[:, None] > 0).float()

    def forward(self, frames, features=None):
        return self.head((features or self.encode(frames))["emb"])


def test_trainer_trains_any_network_with_the_interface(tmp_path):
    """The trainer is not tied to SAM2: a prompt-free style network trains through the same cache."""
    torch.manual_seed(0)
    net = _ToyFrozenNet()
    groups = trainable_param_groups(net, {"head": 1e-2})
    assert not any(p.requires_grad for p in net.image_encoder.parameters())
    data = [{"image": torch.rand(3, 16, 16, 4), "label": (torch.rand(1, 16, 16, 4) > 0.5).long()} for _ in range(2)]
    cache = FeatureCache(tmp_path, encoder_identity("toy", net.image_encoder, 16))
    enc_before = {k: v.clone() for k, v in net.image_encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    trainer = FrozenEncoderTrainer("cpu", 2, DataLoader(data, batch_size=2, collate_fn=collate_as_list), net,
                                   torch.optim.AdamW(groups), loss_function=torch.nn.BCEWithLogitsLoss(),
                                   feature_cache=cache)
    trainer.run()
    assert cache.stats.misses == 8 and cache.stats.hits == 8
    assert all(torch.equal(enc_before[k], v) for k, v in net.image_encoder.state_dict().items())
    assert any(not torch.equal(head_before[k], v) for k, v in net.head.state_dict().items())


def test_trainer_refuses_a_network_without_the_interface():
    with pytest.raises(TypeError, match="FrozenEncoderNetwork interface"):
        FrozenEncoderTrainer("cpu", 1, DataLoader([]), torch.nn.Linear(2, 2),
                             torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
