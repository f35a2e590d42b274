"""DAFormer (Hoyer, Dai & Van Gool, "DAFormer: Improving Network Architectures and Training Strategies for
Domain-Adaptive Semantic Segmentation", CVPR 2022), the network, as in the official code github.com/lhoyer/DAFormer
(``mmseg/models/decode_heads/daformer_head.py``, ``sep_aspp_head.py``, ``aspp_head.py``, ``decode_head.py``,
``configs/_base_/models/daformer_sepaspp_mitb5.py`` on ``daformer_conv1_mitb5.py``).

Exactly as official (the DAFormer of the paper's Tab. 7, context-aware feature fusion):

* encoder: MiT-B5 (:mod:`rtda.models.mix_transformer`, drop-path 0.1);
* ``DAFormerHead``: ``embed_layers["0".."3"]``, a Linear (``MLP``, no norm, no activation) per stage to 256
  channels, each upsampled to 1/4 (bilinear, align_corners=False) and concatenated in stage order (c1, c2, c3,
  c4: unlike SegFormer's reversed order); ``fuse_layer`` = ``ASPPWrapper`` with ``sep=True``, dilations
  (1, 6, 12, 18), ``pool=False`` (no image pooling branch, no context layer): ``aspp_modules[0]`` a 1x1
  ConvModule, ``aspp_modules[1..3]`` depth-wise separable ConvModules (3x3 depth-wise with the dilation, BN,
  ReLU, then 1x1 point-wise, BN, ReLU), concatenated (4 x 256) into ``bottleneck`` (3x3 ConvModule to 256); then
  mmseg's ``cls_seg``: Dropout2d(0.1) and ``conv_seg`` (1x1, with bias). BatchNorm (official ``BN``,
  ``requires_grad=True``), ReLU;
* initialisation: ConvModules Kaiming-normal (fan-out, ReLU), BatchNorm 1 / 0 (mmcv); ``conv_seg`` normal(0,
  0.01), bias 0 (mmseg's BaseDecodeHead init_cfg); the Linear embeddings PyTorch's default;
* module names are the official ones (``backbone.*``, ``decode_head.embed_layers.*``, ``decode_head.fuse_layer.*``,
  ``decode_head.conv_seg``), so an official mmsegmentation checkpoint's keys are the state-dict keys.

Interface, weights, optimiser rules (head LR x10, no decay on ``norm``/``pos_block`` names) and loss (mmseg's CE
averaged over all pixels) as :class:`rtda.models.segformer.MiTSegmenter`. The DAFormer training strategies (rare
class sampling, thing-class ImageNet feature distance on ``feature_layer`` = ``backbone.stage4``, LR warm-up)
belong to the adaptation method, not the network.
"""

from __future__ import annotations

import torch
from torch import nn

from rtda.models.segformer import MLP, ConvModule, MiTSegmenter, upsample


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv's DepthwiseSeparableConvModule with BN and ReLU in both parts: ``depthwise_conv`` then
    ``pointwise_conv``."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, kernel_size, padding=padding, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class ASPPWrapper(nn.Module):
    """DAFormer's fusion with ``sep=True, pool=False``: parallel ASPP branches (dilation 1: a 1x1 ConvModule;
    others: separable 3x3), concatenated, then a 3x3 ConvModule ``bottleneck``."""

    def __init__(self, in_channels: int, channels: int, dilations=(1, 6, 12, 18)):
        super().__init__()
        self.dilations = tuple(dilations)
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, channels, 1) if d == 1 else
            DepthwiseSeparableConvModule(in_channels, channels, 3, padding=d, dilation=d) for d in self.dilations)
        self.bottleneck = ConvModule(len(self.dilations) * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
    """MLP embeddings of the four stages, separable-ASPP fusion, Dropout2d, ``conv_seg``; logits at 1/4."""

    def __init__(self, in_channels, num_classes: int, embed_dim: int = 256, channels: int = 256,
                 dilations=(1, 6, 12, 18), dropout_ratio: float = 0.1):
        super().__init__()
        # registered first, as mmseg's BaseDecodeHead does: the official state-dict order
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.embed_layers = nn.ModuleDict({str(i): MLP(c, embed_dim) for i, c in enumerate(in_channels)})
        self.fuse_layer = ASPPWrapper(embed_dim * len(in_channels), channels, dilations)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        embedded = [layer(f) for layer, f in zip(self.embed_layers.values(), feats)]
        embedded = [e if e.shape[-2:] == size else upsample(e, size) for e in embedded]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(embedded, dim=1))))


class DAFormer(MiTSegmenter):
    """DAFormer: MiT (B5) encoder + DAFormerHead. ``forward`` returns logits at the input size (training:
    :class:`SegmentationOutputs` with the main output only).

    Args:
        variant: MiT variant (official ``"b5"``).
        pretrained: false, or a file: ``mit_b5.pth`` / HF ``nvidia/mit-b5`` weights (encoder) or an official
            mmsegmentation checkpoint of this network (whole network). ``true`` says what to download.
        aux_weights, adaptation_levels: no auxiliary heads: ``{}``/None and ``()`` only.
        freeze_bn: the head's BatchNorm frozen (:class:`FrozenBatchNorm2d`).
        embed_dim: width of the stage embeddings and of the fusion (official 256).
        dilations: the ASPP dilations (official (1, 6, 12, 18)).
        checkpointing: activation checkpointing of the encoder's blocks in training.
        drop_path_rate: the encoder's stochastic depth (official 0.1).
        dropout_ratio: Dropout2d before ``conv_seg`` (official 0.1).
    """

    NAME = "DAFormer"

    def __init__(self, num_classes: int = 19, variant: str = "b5", pretrained: bool | str = False,
                 aux_weights: dict[str, float] | None = None, adaptation_levels: tuple[str, ...] = (),
                 freeze_bn: bool = False, embed_dim: int = 256, dilations=(1, 6, 12, 18),
                 checkpointing: bool = False, drop_path_rate: float = 0.1, dropout_ratio: float = 0.1):
        dilations = tuple(int(d) for d in dilations)
        super().__init__(variant, num_classes, pretrained, aux_weights, adaptation_levels, freeze_bn, checkpointing,
                         drop_path_rate, lambda dims: DAFormerHead(dims, num_classes, embed_dim, embed_dim,
                                                                   dilations, dropout_ratio))
