"""BiSeNet V1 (Yu et al., ECCV 2018) with a ResNet context path, as in the course template.

* spatial path: three stride-2 conv-BN-ReLU blocks (64, 128, 256 channels) -> 1/8 resolution;
* context path: torchvision ResNet-18 (or -101); ``layer3`` (1/16) and ``layer4`` (1/32) each go
  through an attention refinement module (ARM); the ``layer4`` branch is multiplied by its global
  average (the "tail"), both are upsampled to 1/8 and concatenated;
* feature fusion module (FFM): concat(spatial, context) -> 3x3 conv-BN-ReLU -> channel attention,
  added back; then x8 bilinear upsampling and a final 1x1 conv;
* two auxiliary 1x1 heads on the two context features (``context16``, ``context32``), used only in
  training (loss weight 1 each); ``adaptation_levels`` may expose either as an output space for
  multi-level adaptation (rtda's option: AdaptSegNet's multi-level recipe is for DeepLabV2).

As in the course template (and ooooverflow/BiSeNet it derives from), the FFM's conv already outputs
``num_classes`` channels rather than the paper's 256; this keeps parameter and FLOP counts comparable
with the numbers students and papers of this setup report (~51 GFLOPs at 512x1024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from rtda.models.outputs import SegmentationOutputs
from rtda.models.pretrained import PretrainedWeightsError, file_state_dict, load_matching, registry_state_dict
from rtda.run.errors import ConfigValueError

_BACKBONES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, 256, 512),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1, 1024, 2048),
}


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 2):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SpatialPath(nn.Sequential):
    def __init__(self):
        super().__init__(ConvBNReLU(3, 64), ConvBNReLU(64, 128), ConvBNReLU(128, 256))


class AttentionRefinement(nn.Module):
    """Channel attention from global context: x * sigmoid(BN(conv1x1(avgpool(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.bn(self.conv(F.adaptive_avg_pool2d(x, 1))))
        return x * w


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = ConvBNReLU(cin, cout, stride=1)
        self.conv1 = nn.Conv2d(cout, cout, 1)
        self.conv2 = nn.Conv2d(cout, cout, 1)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feature = self.block(torch.cat((spatial, context), dim=1))
        w = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feature, 1)))))
        return feature + feature * w


class ContextPath(nn.Module):
    """A torchvision ResNet cut after ``layer4``: returns (1/16 features, 1/32 features, global tail)."""

    def __init__(self, backbone: str):
        super().__init__()
        net = _BACKBONES[backbone][0](weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor):
        x = self.layer2(self.layer1(self.stem(x)))
        f16 = self.layer3(x)
        f32 = self.layer4(f16)
        return f16, f32, f32.mean(dim=(2, 3), keepdim=True)

    def load_imagenet(self, state: dict, source: str) -> None:
        # torchvision names conv1/bn1 at the top level; here they sit in ``stem`` (indices 0 and 1)
        renamed = {k.replace("conv1.", "stem.0.", 1) if k.startswith("conv1.") else
                   k.replace("bn1.", "stem.1.", 1) if k.startswith("bn1.") else k: v for k, v in state.items()}
        missing = load_matching(self, renamed, source, prefixes=("", "context_path.", "backbone."))
        if missing:
            raise PretrainedWeightsError(f"{source}: {len(missing)} backbone tensors were not in the file, e.g. {missing[:3]}")


class BiSeNet(nn.Module):
    """BiSeNet V1. ``forward`` returns logits at the input size; in training mode it returns
    :class:`SegmentationOutputs` with the two auxiliary heads under ``aux`` (``context16``, ``context32``).

    Args:
        aux_weights: loss weight of each auxiliary head by name (the paper's alpha = 1); a head left out is
            not supervised.
        adaptation_levels: auxiliary heads also exposed as output spaces to adapt (default none).
    """

    AUX_HEADS = ("context16", "context32")

    def __init__(self, num_classes: int = 19, backbone: str = "resnet18", pretrained: bool | str = False,
                 aux_weights: dict[str, float] | None = None, adaptation_levels: tuple[str, ...] = ()):
        super().__init__()
        if backbone not in _BACKBONES:
            raise ConfigValueError(f"model.backbone={backbone!r}: expected one of {sorted(_BACKBONES)}")
        if aux_weights is None:
            aux_weights = dict.fromkeys(self.AUX_HEADS, 1.0)
        elif not hasattr(aux_weights, "keys"):  # a list in head order, as checkpoints before named outputs saved it
            aux_weights = dict(zip(self.AUX_HEADS, aux_weights))
        aux_weights = dict(aux_weights)
        unknown = (set(aux_weights) | set(adaptation_levels)) - set(self.AUX_HEADS)
        if unknown:
            raise ConfigValueError(f"BiSeNet has no auxiliary head {sorted(unknown)}: its heads are {list(self.AUX_HEADS)}")
        c16, c32 = _BACKBONES[backbone][2:]
        self.spatial_path = SpatialPath()
        self.context_path = ContextPath(backbone)
        self.arm16 = AttentionRefinement(c16)
        self.arm32 = AttentionRefinement(c32)
        self.aux16 = nn.Conv2d(c16, num_classes, 1)
        self.aux32 = nn.Conv2d(c32, num_classes, 1)
        self.ffm = FeatureFusion(256 + c16 + c32, num_classes)
        self.classifier = nn.Conv2d(num_classes, num_classes, 1)
        self.aux_weights = aux_weights
        self.adaptation_levels = tuple(adaptation_levels)
        self._init_head()
        #: what initialised the backbone (a weights name or file), None for a random initialisation
        self.pretrained_weights: str | None = None
        if pretrained:
            weights = _BACKBONES[backbone][1]
            if pretrained is True or str(pretrained).lower() in ("true", "imagenet"):
                self.context_path.load_imagenet(registry_state_dict(weights), str(weights))
                self.pretrained_weights = str(weights)
            else:
                self.context_path.load_imagenet(file_state_dict(pretrained), str(pretrained))
                self.pretrained_weights = str(pretrained)

    def _init_head(self) -> None:
        for name, m in self.named_modules():
            if name.startswith("context_path"):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def backbone_parameters(self):
        """The pretrained part (for a learning-rate multiplier on the rest)."""
        return self.context_path.parameters()

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        spatial = self.spatial_path(x)
        f16, f32, tail = self.context_path(x)
        c16 = F.interpolate(self.arm16(f16), size=spatial.shape[-2:], mode="bilinear", align_corners=False)
        c32 = F.interpolate(self.arm32(f32) * tail, size=spatial.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.ffm(spatial, torch.cat((c16, c32), dim=1))
        out = self.classifier(F.interpolate(fused, size=size, mode="bilinear", align_corners=False))
        if not self.training:
            return out
        heads = {"context16": F.interpolate(self.aux16(c16), size=size, mode="bilinear", align_corners=False),
                 "context32": F.interpolate(self.aux32(c32), size=size, mode="bilinear", align_corners=False)}
        return SegmentationOutputs(out, aux={k: heads[k] for k in self.aux_weights},
                                   levels={k: heads[k] for k in self.adaptation_levels})
