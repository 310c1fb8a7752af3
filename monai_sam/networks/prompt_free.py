"""Prompt-free heads on a frozen SAM / SAM2 encoder: every class of a slice in one pass.

Hu, Xu, Shi, "How to Efficiently Adapt Large Segmentation Model (SAM) to Medical Images"
(arXiv:2306.13731): freeze the encoder, train a light head that needs no prompt. Three heads:

- `AutoSamHead`: SAM's / SAM2's own mask decoder with the prompt tokens removed. Its output
  tokens are repeated per class, with one hypernetwork MLP per class, so one pass gives all
  classes. It is the upstream ``MaskDecoder`` module itself (``predict_masks`` called with an
  empty set of prompt tokens), rebuilt with one mask token per class and initialised from the
  pretrained decoder: class ``c`` starts from the pretrained mask token and hypernetwork
  ``c % 4`` (SAM's four output tokens), everything else (two-way transformer, upscaling,
  SAM2's high-resolution projections) is copied as is. The "no mask" dense embedding of the
  prompt encoder (and SAM2's ``no_mem_embed``, what its image predictor adds to a single
  image's features) are kept as trainable offsets of the image embedding, so at the start the
  decoder sees exactly what it saw in pre-training without a prompt.
- `ConvHead`: a small CNN decoder, four x2 transposed-convolution stages from the stride-16
  embedding back to the input resolution.
- `LinearHead`: a per-pixel linear classifier (1x1 convolution) on the stride-16 embedding,
  upsampled bilinearly.

`PromptFreeSamSegmenter` holds the frozen ``image_encoder`` and one ``head`` (parameter names
``head.*``: the ``"head"`` trainable part of `monai_sam.engines.TRAINABLE_PARTS`) and implements
the frozen-encoder trainer's protocol (``encode`` / ``split_encoded`` / ``join_encoded`` /
``training_inputs``), so `monai_sam.engines.FrozenEncoderTrainer` trains it with the
`monai_sam.engines.FeatureCache`. Its output is ``(n, num_classes, H, W)`` logits for a
softmax over background and the ``object_ids``; the loss is cross-entropy + Dice (MONAI's
``DiceCELoss(to_onehot_y=True, softmax=True)``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_sam.networks.builders import build_model, canonical_model_size, freeze

__all__ = [
    "HEADS",
    "AutoSamHead",
    "ConvHead",
    "LinearHead",
    "PromptFreeSamSegmenter",
    "build_prompt_free_segmenter",
]

logger = logging.getLogger(__name__)

#: Head names accepted by `PromptFreeSamSegmenter` and the bundles' ``head`` option.
HEADS = ("autosam", "conv", "linear")

#: Channels of the encoder embedding the heads read (SAM's neck and SAM2's FPN neck: 256).
EMBED_DIM = 256


def _family(model: nn.Module) -> str:
    """``"sam2"`` for a sam2 ``SAM2Base``, ``"sam"`` for a segment_anything ``Sam``."""
    if hasattr(model, "sam_mask_decoder") and hasattr(model, "image_encoder"):
        return "sam2"
    if (
        hasattr(model, "mask_decoder")
        and hasattr(model, "prompt_encoder")
        and hasattr(model, "image_encoder")
    ):
        return "sam"
    raise TypeError(
        f"expected a sam2 SAM2Base or a segment_anything Sam (built by monai_sam.networks.build_model), "
        f"got {type(model).__name__}"
    )


class AutoSamHead(nn.Module):
    """SAM's mask decoder without prompt tokens, one output token and hypernetwork MLP per class.

    Args:
        mask_decoder: the pretrained decoder (``SAM2Base.sam_mask_decoder`` or ``Sam.mask_decoder``);
            it is deep-copied, the model it came from is left untouched.
        prompt_encoder: the model's prompt encoder, for its positional encoding of the embedding
            grid (``pe_layer``) and its "no mask" dense embedding (both copied).
        num_classes: output channels, background included.
        no_mem_embed: SAM2's ``no_mem_embed`` ``(1, 1, C)`` when the model adds it to a single
            image's features (``directly_add_no_mem_embed``); None for SAM.

    Features: ``"embedding"`` ``(n, 256, S/16, S/16)`` and, for SAM2 decoders that use them,
    ``"high_res_0"`` / ``"high_res_1"`` (the stride-4 and stride-8 FPN levels, before the
    decoder's own ``conv_s0`` / ``conv_s1``). Output: logits ``(n, num_classes, S/4, S/4)``.
    """

    def __init__(
        self,
        mask_decoder: nn.Module,
        prompt_encoder: nn.Module,
        num_classes: int,
        no_mem_embed: Tensor | None = None,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}")
        self.num_classes = int(num_classes)
        # sam2's decoder has repeat_image / high-res arguments, segment_anything's does not
        self.sam2_decoder = hasattr(mask_decoder, "use_high_res_features")
        self.decoder = copy.deepcopy(mask_decoder)
        pretrained_tokens = mask_decoder.mask_tokens.weight.detach()
        n_pre = pretrained_tokens.shape[0]
        dim = pretrained_tokens.shape[1]
        self.decoder.num_mask_tokens = self.num_classes
        self.decoder.mask_tokens = nn.Embedding(self.num_classes, dim)
        with torch.no_grad():
            self.decoder.mask_tokens.weight.copy_(pretrained_tokens[torch.arange(self.num_classes) % n_pre])
        self.decoder.output_hypernetworks_mlps = nn.ModuleList(
            copy.deepcopy(mask_decoder.output_hypernetworks_mlps[c % n_pre]) for c in range(self.num_classes)
        )
        self.pe_layer = copy.deepcopy(prompt_encoder.pe_layer)
        self.no_mask_embed = copy.deepcopy(prompt_encoder.no_mask_embed)
        self.no_mem_embed = None if no_mem_embed is None else nn.Parameter(no_mem_embed.detach().clone())
        self.use_high_res = bool(self.sam2_decoder and getattr(mask_decoder, "use_high_res_features", False))

    @classmethod
    def from_model(cls, model: nn.Module, num_classes: int) -> AutoSamHead:
        """The head initialised from a built SAM / SAM2 model's decoder (pretrained if it was loaded)."""
        if _family(model) == "sam2":
            no_mem = model.no_mem_embed if getattr(model, "directly_add_no_mem_embed", False) else None
            return cls(model.sam_mask_decoder, model.sam_prompt_encoder, num_classes, no_mem)
        return cls(model.mask_decoder, model.prompt_encoder, num_classes)

    @property
    def feature_keys(self) -> tuple[str, ...]:
        return ("embedding", "high_res_0", "high_res_1") if self.use_high_res else ("embedding",)

    @property
    def output_stride(self) -> int:
        return 4

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        src = features["embedding"]
        n, c, h, w = src.shape
        if self.no_mem_embed is not None:
            src = src + self.no_mem_embed.reshape(1, c, 1, 1)
        dense = self.no_mask_embed.weight.reshape(1, c, 1, 1).expand(n, c, h, w)
        image_pe = self.pe_layer((h, w)).unsqueeze(0).to(src.dtype)
        no_prompt = src.new_zeros((n, 0, c))  # the prompt tokens, removed
        if self.sam2_decoder:
            high_res = None
            if self.use_high_res:
                high_res = [
                    self.decoder.conv_s0(features["high_res_0"]),
                    self.decoder.conv_s1(features["high_res_1"]),
                ]
            masks = self.decoder.predict_masks(
                image_embeddings=src,
                image_pe=image_pe,
                sparse_prompt_embeddings=no_prompt,
                dense_prompt_embeddings=dense,
                repeat_image=False,
                high_res_features=high_res,
            )[0]
            return masks
        # segment_anything repeats one image per prompt batch: one image at a time
        return torch.cat(
            [
                self.decoder.predict_masks(
                    image_embeddings=src[i : i + 1],
                    image_pe=image_pe,
                    sparse_prompt_embeddings=no_prompt[i : i + 1],
                    dense_prompt_embeddings=dense[i : i + 1],
                )[0]
                for i in range(n)
            ]
        )


class ConvHead(nn.Module):
    """A small CNN decoder: x2 transposed-convolution stages from the embedding to full resolution.

    Args:
        num_classes: output channels, background included.
        in_channels: channels of the encoder embedding (256 for SAM and SAM2).
        channels: output channels of each x2 stage; four stages bring the stride-16 embedding
            back to the input resolution ``S``.
        norm: MONAI norm of each stage (group norm: batches of a few slices are too small for
            batch norm).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = EMBED_DIM,
        channels: Sequence[int] = (128, 64, 32, 16),
        norm: Any = ("group", {"num_groups": 8}),
    ) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, UpSample

        if int(num_classes) < 1 or not channels:
            raise ValueError(f"need num_classes >= 1 and at least one stage, got {num_classes}, {channels}")
        self.num_classes = int(num_classes)
        stages: list[nn.Module] = []
        c_in = int(in_channels)
        for c_out in channels:
            c_out = int(c_out)
            stages.append(
                nn.Sequential(
                    UpSample(2, c_in, c_out, scale_factor=2, mode="deconv"),
                    Convolution(2, c_out, c_out, kernel_size=3, act="GELU", norm=norm),
                )
            )
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(c_in, self.num_classes, kernel_size=1)
        self._stride = max(1, 16 // 2 ** len(stages))

    @property
    def feature_keys(self) -> tuple[str, ...]:
        return ("embedding",)

    @property
    def output_stride(self) -> int:
        return self._stride

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.classifier(self.stages(features["embedding"]))


class LinearHead(nn.Module):
    """A per-pixel linear classifier on the stride-16 embedding (the linear probe of the paper).

    Args:
        num_classes: output channels, background included.
        in_channels: channels of the encoder embedding (256 for SAM and SAM2).
    """

    def __init__(self, num_classes: int, in_channels: int = EMBED_DIM) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}")
        self.num_classes = int(num_classes)
        self.classifier = nn.Conv2d(int(in_channels), self.num_classes, kernel_size=1)

    @property
    def feature_keys(self) -> tuple[str, ...]:
        return ("embedding",)

    @property
    def output_stride(self) -> int:
        return 16

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.classifier(features["embedding"])


class PromptFreeSamSegmenter(nn.Module):
    """A frozen SAM / SAM2 image encoder and one prompt-free head: multi-class logits per slice.

    Args:
        model: a SAM2 ``SAM2Base`` or SAM ``Sam`` (`monai_sam.networks.build_model`); only its
            ``image_encoder`` is kept (frozen, eval mode) plus what the head copies from it.
        head: ``"autosam"``, ``"conv"``, ``"linear"`` (see `HEADS`) or a head module with
            ``feature_keys``, ``num_classes`` and ``forward(features) -> logits``.
        object_ids: the label values of the classes, in output-channel order after background:
            channel ``k + 1`` is ``object_ids[k]``. Other label values count as background.
        label_names: optional ``{id: name}`` (for prompts and reports).
        encoder_batch_size: slices per image-encoder call (bounds memory).
        head_kwargs: extra arguments of the head's constructor (e.g. ``channels`` of `ConvHead`).

    ``forward(frames, features=..., output_size=...)``: frames ``(n, 3, S, S)`` (`SamInput`
    output) or cached ``features`` -> logits ``(n, 1 + len(object_ids), H, W)``, resized
    bilinearly from the head's own resolution to ``output_size`` (default ``S x S``).
    """

    def __init__(
        self,
        model: nn.Module,
        head: str | nn.Module = "autosam",
        object_ids: Sequence[int] = (1, 2, 3),
        label_names: Mapping[int, str] | None = None,
        encoder_batch_size: int = 8,
        head_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.family = _family(model)
        ids = [int(i) for i in object_ids]
        if not ids or len(set(ids)) != len(ids) or any(i <= 0 for i in ids):
            raise ValueError(f"object_ids must be distinct positive label values, got {list(object_ids)}")
        if int(encoder_batch_size) < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {encoder_batch_size}")
        self.object_ids = ids
        self.label_names = {int(k): str(v) for k, v in (label_names or {}).items()}
        self.num_classes = len(ids) + 1
        self.encoder_batch_size = int(encoder_batch_size)
        self.image_encoder = freeze(model.image_encoder).eval()
        if self.family == "sam2":
            self._image_size = int(model.image_size)
        else:
            self._image_size = int(model.image_encoder.img_size)
        kwargs = dict(head_kwargs or {})
        if isinstance(head, str):
            name = head.strip().lower()
            if name == "autosam":
                self.head = AutoSamHead.from_model(model, self.num_classes)
            elif name == "conv":
                self.head = ConvHead(self.num_classes, **kwargs)
            elif name == "linear":
                self.head = LinearHead(self.num_classes, **kwargs)
            else:
                raise ValueError(f"unknown head {head!r}; heads are {', '.join(HEADS)}")
            self.head_name = name
        elif isinstance(head, nn.Module):
            if getattr(head, "num_classes", self.num_classes) != self.num_classes:
                raise ValueError(
                    f"head has {head.num_classes} output classes, object_ids {ids} need {self.num_classes}"
                )
            self.head = head
            self.head_name = type(head).__name__
        else:
            raise TypeError(f"head must be one of {HEADS} or an nn.Module, got {type(head).__name__}")
        lookup = torch.zeros(max(ids) + 1, dtype=torch.long)
        lookup[torch.as_tensor(ids)] = torch.arange(1, len(ids) + 1)
        self.register_buffer("_class_of_label", lookup, persistent=False)
        self.register_buffer(
            "_label_of_class", torch.as_tensor([0, *ids], dtype=torch.long), persistent=False
        )

    # ------------------------------------------------------------------ basics
    @property
    def image_size(self) -> int:
        """Side ``S`` of the square encoder input in pixels."""
        return self._image_size

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def feature_keys(self) -> tuple[str, ...]:
        """The encoder outputs the head reads (only these are encoded and cached)."""
        return tuple(self.head.feature_keys)

    @property
    def cached_features(self) -> str:
        """What one feature-cache entry holds; put it in the cache identity (entries differ per head)."""
        return f"prompt-free {self.family}: {','.join(self.feature_keys)}"

    def train(self, mode: bool = True) -> PromptFreeSamSegmenter:
        super().train(mode)
        self.image_encoder.eval()  # frozen: never in training mode (dropout, drop path)
        return self

    # ------------------------------------------------------------------ labels <-> classes
    def classes_from_label(self, label: Tensor) -> Tensor:
        """Label values -> class indices (0 background; values not in ``object_ids`` too)."""
        lab = torch.as_tensor(label).long().clamp(min=0)
        lookup = self._class_of_label.to(lab.device)
        inside = lab < lookup.numel()
        return torch.where(inside, lookup[lab.clamp(max=lookup.numel() - 1)], torch.zeros_like(lab))

    def label_from_classes(self, classes: Tensor) -> Tensor:
        """Class indices -> label values (the ``object_ids``, 0 background)."""
        idx = torch.as_tensor(classes).long()
        return self._label_of_class.to(idx.device)[idx]

    # ------------------------------------------------------------------ the trainer's protocol
    @torch.no_grad()
    def encode(self, frames: Tensor) -> dict[str, Tensor]:
        """Raw frozen-encoder outputs the head needs, for ``(n, 3, S, S)`` frames.

        SAM2: the FPN levels of ``image_encoder(x)["backbone_fpn"]`` (stride 16 = ``embedding``,
        4 and 8 = ``high_res_0/1``), before any decoder projection; SAM: the ``(n, 256, 64, 64)``
        embedding. Encoded ``encoder_batch_size`` slices at a time.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (n, 3, S, S) SamInput slices, got {tuple(frames.shape)}")
        if tuple(frames.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"frames are {tuple(frames.shape[-2:])} px, "
                f"the encoder takes {self.image_size} x {self.image_size}"
            )
        keys = self.feature_keys
        chunks: dict[str, list[Tensor]] = {k: [] for k in keys}
        dev = next(self.image_encoder.parameters()).device
        for start in range(0, frames.shape[0], self.encoder_batch_size):
            x = frames[start : start + self.encoder_batch_size].to(dev).float()
            if self.family == "sam2":
                fpn = self.image_encoder(x)["backbone_fpn"]
                out = {"embedding": fpn[-1], "high_res_0": fpn[0], "high_res_1": fpn[1]}
            else:
                out = {"embedding": self.image_encoder(x)}
            for k in keys:
                chunks[k].append(out[k])
        return {k: torch.cat(v) for k, v in chunks.items()}

    def split_encoded(self, raw: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """Batched `encode` outputs -> one dict of CPU tensors per slice (the feature cache's unit)."""
        n = next(iter(raw.values())).shape[0]
        return [{k: v[i].detach().cpu() for k, v in raw.items()} for i in range(n)]

    def join_encoded(
        self, per_frame: Sequence[Mapping[str, Tensor]], device: torch.device | str | None = None
    ) -> dict[str, Tensor]:
        """The inverse of `split_encoded`; raises naming the missing keys for a foreign cache entry."""
        if not per_frame:
            raise ValueError("no encoded slices to join")
        missing = [k for k in self.feature_keys if k not in per_frame[0]]
        if missing:
            raise KeyError(
                f"cached features lack {missing} (found {sorted(per_frame[0])}): the cache identity must "
                f"include {self.cached_features!r}"
            )
        dev = device or self.device
        return {k: torch.stack([f[k] for f in per_frame]).to(dev).float() for k in self.feature_keys}

    def training_inputs(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
        """``forward`` keyword arguments and class-index targets ``(T, 1, H, W)`` for one sample.

        ``item["label"]`` is the label map at its own grid, ``(1, H, W, T)`` for ``T`` slices or
        ``(1, H, W)`` for one; the logits are resized to ``(H, W)``.
        """
        if "label" not in item:
            raise KeyError(f"a training sample needs a 'label' (keys: {sorted(map(str, item))})")
        label = torch.as_tensor(item["label"])
        if label.ndim == 3:
            label = label[..., None]
        if label.ndim != 4 or label.shape[0] != 1:
            raise ValueError(f"label must be (1, H, W, T) or (1, H, W), got {tuple(label.shape)}")
        target = self.classes_from_label(label.round()).permute(3, 0, 1, 2)  # (T, 1, H, W)
        return {"output_size": (int(label.shape[1]), int(label.shape[2]))}, target

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        frames: Tensor | None = None,
        *,
        features: Mapping[str, Tensor] | None = None,
        output_size: Sequence[int] | None = None,
    ) -> Tensor:
        """Logits ``(n, num_classes, H, W)`` from frames ``(n, 3, S, S)`` or cached ``features``."""
        if features is None:
            if frames is None:
                raise ValueError("give frames or features")
            features = self.encode(frames)
        dev = self.device
        feats = {k: features[k].to(dev) for k in self.feature_keys}
        logits = self.head(feats)
        size = tuple(int(v) for v in (output_size or (self.image_size, self.image_size)))
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def build_prompt_free_segmenter(
    model_size: str = "sam2.1_hiera_t",
    checkpoint: str | None = None,
    image_size: int = 1024,
    head: str = "autosam",
    object_ids: Sequence[int] = (1, 2, 3),
    label_names: Mapping[int, str] | None = None,
    device: str | torch.device = "cpu",
    encoder_batch_size: int = 8,
    head_kwargs: Mapping[str, Any] | None = None,
) -> PromptFreeSamSegmenter:
    """`PromptFreeSamSegmenter` on an official size (``sam2.1_hiera_t|s|b+|l``, ``sam_vit_b|l|h``...).

    ``checkpoint`` is the official file: the encoder and, for ``head="autosam"``, the decoder
    the head starts from come from it (None: random init / demo, logged by the builder).
    """
    name = canonical_model_size(model_size)
    model = build_model(name, checkpoint, image_size, device)
    seg = PromptFreeSamSegmenter(
        model, head, object_ids, label_names, encoder_batch_size=encoder_batch_size, head_kwargs=head_kwargs
    )
    return seg.to(device)
