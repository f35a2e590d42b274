"""SegFormer (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
NeurIPS 2021), as in the official code github.com/NVlabs/SegFormer (``mmseg/models/backbones/mix_transformer.py``,
``mmseg/models/decode_heads/segformer_head.py``, ``decode_head.py``, ``local_configs/segformer/B0|B1/*.city.160k.py``).

Exactly as official: the MiT encoder (:mod:`rtda.models.mix_transformer`) and the all-MLP decoder
``SegFormerHead``: each stage map goes through its Linear ``linear_c1``..``linear_c4`` to ``embed_dim`` (256 for
B0/B1), is upsampled to 1/4 (bilinear, align_corners=False), the four are concatenated in the official order
(c4, c3, c2, c1), fused by ``linear_fuse`` (1x1 conv without bias, BatchNorm, ReLU: mmcv's ConvModule, whose
``conv``/``bn`` names are kept), Dropout2d(0.1) and ``linear_pred`` (1x1 conv with bias) give the logits at 1/4,
upsampled to the input size (bilinear, align_corners=False, as the official segmentor and loss). Module names
are the official ones (``backbone.*``, ``decode_head.*``), so the state-dict keys are those of an official
mmsegmentation checkpoint. The official head also builds ``conv_seg`` (mmseg's BaseDecodeHead), which SegFormer
never uses: not built here (its keys are dropped when loading an official checkpoint). Initialisation as official:
MiT's own; ``linear_fuse`` Kaiming-normal (fan-out, ReLU), BatchNorm 1 / 0 (mmcv ConvModule); ``linear_c*``
and ``linear_pred`` PyTorch's defaults. No auxiliary heads.

Loss (:meth:`MiTSegmenter.loss_terms`): mmseg v0.x's CrossEntropyLoss, as the official code uses it: per-pixel
CE (ignored pixels 0) averaged over *all* pixels, not over the labelled ones; ``weight`` multiplies it (DAFormer's
pseudo-label weight, the same reduction).

Optimiser (official ``paramwise_cfg``): ``head_lr_mult`` 10 on ``decode_head``; weight decay 0 on the parameters
whose name contains ``norm`` or ``pos_block`` (mmcv's custom_keys: the longest matching key wins, ``head``
before ``norm``) — MiT's LayerNorms; no MiT parameter is named ``pos_block`` in this code (a leftover key of
the config), and the head's BatchNorm (``bn``) keeps its decay. :meth:`MiTSegmenter.no_weight_decay_names` lists
them; the optimiser takes them by default (``adaptation.no_decay_keys=null``).

Pretrained: ``pretrained=/path/to/mit_bX.pth`` (official ImageNet file) or the Hugging Face ``nvidia/mit-bX``
``model.safetensors``/``pytorch_model.bin`` initialises the encoder (:func:`load_mit_weights`); an official
mmsegmentation checkpoint of the whole network (``state_dict`` with ``backbone.*`` and ``decode_head.*``, e.g.
``segformer.b0.1024x1024.city.160k.pth``; a DAFormer UDA checkpoint's student ``model.*``, as DAFormer's
``tools/test.py`` evaluates it, its ``ema_model.*``/``imnet_model.*`` dropped) loads the whole network. Both strict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.models.frozen_bn import freeze_batchnorm
from rtda.models.losses import LossTerms, pixel_cross_entropy
from rtda.models.mix_transformer import (
    MixVisionTransformer,
    load_mit_weights,
    memory_format_of,
    pretrained_hint,
)
from rtda.models.outputs import SegmentationOutputs
from rtda.models.pretrained import PretrainedWeightsError, file_state_dict, key_mismatches
from rtda.run.errors import ConfigValueError


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """mmcv's ConvModule with BatchNorm and ReLU: ``conv`` (no bias), ``bn``, ``activate``; Kaiming-normal
    (fan-out, ReLU) init, BatchNorm 1 / 0 (mmcv's ``init_weights``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class MLP(nn.Module):
    """Linear embedding of a stage map: N×C×H×W -> N×E×H×W (the official ``MLP``, a Linear on the tokens)."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)


class SegFormerHead(nn.Module):
    """The all-MLP decoder (official names); returns logits at the first (1/4) stage's size."""

    def __init__(self, in_channels, num_classes: int, embed_dim: int = 256, dropout_ratio: float = 0.1):
        super().__init__()
        c1, c2, c3, c4 = in_channels
        self.linear_c4 = MLP(c4, embed_dim)
        self.linear_c3 = MLP(c3, embed_dim)
        self.linear_c2 = MLP(c2, embed_dim)
        self.linear_c1 = MLP(c1, embed_dim)
        self.linear_fuse = ConvModule(embed_dim * 4, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        c1, c2, c3, c4 = feats
        size = c1.shape[-2:]
        fused = torch.cat([upsample(self.linear_c4(c4), size), upsample(self.linear_c3(c3), size),
                           upsample(self.linear_c2(c2), size), self.linear_c1(c1)], dim=1)
        return self.linear_pred(self.dropout(self.linear_fuse(fused)))


class MiTSegmenter(nn.Module):
    """A MiT encoder (``backbone``) and a decode head (``decode_head``) predicting at 1/4: the common part of
    :class:`SegFormer` and DAFormer (interface, weights, optimiser rules, loss)."""

    AUX_HEADS: tuple[str, ...] = ()
    head_lr_mult = 10.0  # official paramwise_cfg custom_keys: head lr_mult 10
    #: the submodule whose output is the last encoder stage (DAFormer's ImageNet feature distance)
    feature_layer = "backbone.stage4"
    #: the official optimizer paramwise_cfg custom_keys (SegFormer's Cityscapes and DAFormer's GTA5 configs)
    PARAMWISE_CUSTOM_KEYS = {"head": {"lr_mult": 10.0}, "pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}}
    #: keys of an official mmsegmentation checkpoint that the network does not build (dropped when loading)
    UNUSED_CHECKPOINT_KEYS: tuple[str, ...] = ()
    NAME = "MiT segmenter"

    def __init__(self, variant: str, num_classes: int, pretrained: bool | str, aux_weights, adaptation_levels,
                 freeze_bn: bool, checkpointing: bool, drop_path_rate: float, head):
        super().__init__()
        aux_weights = {} if aux_weights is None else dict(aux_weights)
        adaptation_levels = tuple(adaptation_levels or ())
        if aux_weights or adaptation_levels:
            raise ConfigValueError(
                f"{self.NAME} has no auxiliary heads (model.aux_weights must be {{}} or null, "
                f"model.adaptation_levels []): got {sorted(set(aux_weights) | set(adaptation_levels))}")
        self.aux_weights: dict[str, float] = {}
        self.adaptation_levels: tuple[str, ...] = ()
        self.num_classes = int(num_classes)
        self.backbone = MixVisionTransformer(variant, drop_path_rate=drop_path_rate, checkpointing=checkpointing)
        self.variant = self.backbone.variant
        self.decode_head = head(self.backbone.embed_dims)  # head(stage widths) -> the decode head
        #: what initialised the network (a file), None for a random initialisation
        self.pretrained_weights: str | None = None
        if pretrained:
            if pretrained is True or str(pretrained).lower() in ("true", "imagenet"):
                raise PretrainedWeightsError(pretrained_hint(self.variant))
            self.load_pretrained(str(pretrained))
            self.pretrained_weights = str(pretrained)
        self.freeze_bn = bool(freeze_bn)
        if freeze_bn:
            freeze_batchnorm(self)

    # --- weights ------------------------------------------------------------------------------------------

    def load_pretrained(self, path: str) -> str:
        """An ImageNet MiT file (NVlabs or Hugging Face layout: the encoder; returns ``"nvlabs"``/``"hf"``) or an
        official mmsegmentation checkpoint of the whole network (returns ``"full"``), strictly."""
        state = file_state_dict(path)
        if any(k.startswith("model.backbone.") for k in state):
            # a DAFormer UDA checkpoint (model.*, ema_model.*, imnet_model.*): the student, as DAFormer's tools/test.py
            state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if any(k.startswith("backbone.") for k in state) and any(k.startswith("decode_head.") for k in state):
            self._load_full(state, path)
            return "full"
        return load_mit_weights(self.backbone, path, state)

    def _load_full(self, state: dict, source: str) -> None:
        own = self.state_dict()
        expected = set(own)
        dropped = {k for k in state if k.startswith(self.UNUSED_CHECKPOINT_KEYS)} if self.UNUSED_CHECKPOINT_KEYS else set()
        problems = key_mismatches(own, state, expected, dropped, " (another variant or number of classes?)")
        if problems:
            raise PretrainedWeightsError(
                f"{source} does not fit {self.NAME}-{self.variant.upper()} ({self.num_classes} classes) as an official "
                f"mmsegmentation checkpoint: {'; '.join(problems)}. File keys e.g. {sorted(state)[:3]}; network keys "
                f"e.g. {sorted(expected)[:3]}" + (f"; {list(self.UNUSED_CHECKPOINT_KEYS)} are dropped"
                                                   if self.UNUSED_CHECKPOINT_KEYS else ""))
        self.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)

    # --- optimiser ------------------------------------------------------------------------------------------

    def backbone_parameters(self):
        """The ImageNet-pretrained encoder (the rest trains at ``head_lr_mult`` times the learning rate)."""
        return self.backbone.parameters()

    @classmethod
    def paramwise_rule(cls, name: str) -> dict[str, float]:
        """The official rule for a parameter name (mmcv's DefaultOptimizerConstructor custom_keys: the first of
        the keys sorted by length, longest first, that the name contains): ``{"lr_mult", "decay_mult"}``."""
        for key in sorted(sorted(cls.PARAMWISE_CUSTOM_KEYS), key=len, reverse=True):
            if key in name:
                rule = cls.PARAMWISE_CUSTOM_KEYS[key]
                return {"lr_mult": rule.get("lr_mult", 1.0), "decay_mult": rule.get("decay_mult", 1.0)}
        return {"lr_mult": 1.0, "decay_mult": 1.0}

    def no_weight_decay_names(self) -> list[str]:
        """Parameter names the official recipe trains without weight decay (decay_mult 0): MiT's LayerNorms."""
        return [n for n, _ in self.named_parameters() if self.paramwise_rule(n)["decay_mult"] == 0.0]

    # --- forward / loss -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor):
        # the official logits come out with channels-last strides (the heads' token reshapes): made contiguous
        # in the input's memory format here, same values
        out = upsample(self.decode_head(self.backbone(x)), x.shape[-2:]).contiguous(memory_format=memory_format_of(x))
        if not self.training:
            return out
        return SegmentationOutputs(out)

    def loss_terms(self, outputs: SegmentationOutputs, label: torch.Tensor, weight: torch.Tensor | None = None,
                   ignore_index: int = 255) -> LossTerms:
        """``loss_seg`` (1): CE averaged over all pixels, ignored ones counting 0 (mmseg v0.x's CrossEntropyLoss,
        the official reduction), times ``weight`` when given."""
        out = outputs.out if outputs.out.shape[-2:] == label.shape[-2:] else upsample(outputs.out, label.shape[-2:])
        w = weight if weight is not None else out.new_ones((), dtype=torch.float32)
        return {"loss_seg": (pixel_cross_entropy(out, label, w, ignore_index), 1.0)}


class SegFormer(MiTSegmenter):
    """SegFormer-B0 … B5: MiT encoder + all-MLP decoder. ``forward`` returns logits at the input size (training:
    :class:`SegmentationOutputs` with the main output only).

    Args:
        variant: MiT variant ``"b0"`` … ``"b5"``.
        pretrained: false, or a file: ``mit_bX.pth`` / HF ``nvidia/mit-bX`` weights (encoder) or an official
            mmsegmentation SegFormer checkpoint (whole network). ``true`` says what to download.
        aux_weights, adaptation_levels: SegFormer has no auxiliary heads: ``{}``/None and ``()`` only.
        freeze_bn: the head's BatchNorm frozen (:class:`FrozenBatchNorm2d`).
        embed_dim: decoder width (official 256 for B0/B1, 768 for B2–B5).
        checkpointing: activation checkpointing of the encoder's blocks in training.
        drop_path_rate: the encoder's stochastic depth (official 0.1).
        dropout_ratio: Dropout2d before ``linear_pred`` (official 0.1).
    """

    UNUSED_CHECKPOINT_KEYS = ("decode_head.conv_seg.",)
    NAME = "SegFormer"

    def __init__(self, num_classes: int = 19, variant: str = "b0", pretrained: bool | str = False,
                 aux_weights: dict[str, float] | None = None, adaptation_levels: tuple[str, ...] = (),
                 freeze_bn: bool = False, embed_dim: int = 256, checkpointing: bool = False,
                 drop_path_rate: float = 0.1, dropout_ratio: float = 0.1):
        super().__init__(variant, num_classes, pretrained, aux_weights, adaptation_levels, freeze_bn, checkpointing,
                         drop_path_rate, lambda dims: SegFormerHead(dims, num_classes, embed_dim, dropout_ratio))
