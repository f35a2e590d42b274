"""DeepLabV2 with a ResNet-101 backbone, as in the official AdaptSegNet / ADVENT / FDA code.

* ResNet-101 with ``layer3`` and ``layer4`` dilated (2 and 4) instead of strided: output stride 8;
  the stem's max-pool uses ``ceil_mode=True`` as in the Caffe model;
* the ASPP classifier *sums* four 3x3 convolutions with dilations 6, 12, 18, 24 (with bias,
  weights ~ N(0, 0.01)), without the image-pooling branch of DeepLabV3, as the paper and ADVENT / FDA.
  (AdaptSegNet's ``deeplab_multi.py`` returns inside its loop, so the model behind its 41.4 / 42.4 sums
  only the dilation-6 and -12 branches: a bug its authors acknowledged; rtda does not reproduce it);
* BatchNorm (``freeze_bn``): the official code freezes the affine terms only and trains in ``train()``
  mode, so at batch size 1 each image is normalised with its own statistics and every source *and
  target* forward moves the running statistics that evaluation uses: ``freeze_bn=affine`` reproduces
  that. rtda's default ``freeze_bn=true`` freezes the statistics too (:class:`FrozenBatchNorm2d`, which no
  SyncBatchNorm conversion can thaw): the usual practice for a pretrained DeepLab at small batch
  (mmsegmentation's), independent of how many target images pass and of DDP. ``false``: plain BatchNorm.
  The classifier gets 10x the backbone's learning rate (``head_lr_mult``);
* ``multi_level=True`` adds the second classifier on ``layer3`` that AdaptSegNet's / ADVENT's multi-level
  variant uses: a deep-supervision head weighted 0.1 in the segmentation loss (``aux_weights``) and an
  adaptation level (``adaptation_levels``), both named ``layer3``.

Single-level for 19 classes has 43,901,068 parameters, as in the official code.

Initialisation: ``pretrained=true`` loads torchvision's ImageNet ResNet-101; a file path loads either
torchvision-style weights or the official DeepLab (MS-COCO) init ``DeepLab_resnet_pretrained_init-f81d91e8.pth``
that the papers start from (its 21/91-class classifier is skipped when the shapes differ, as the official
scripts do). The Caffe-derived DeepLab weights (recognised by their ``Scale.`` / ``layer5.`` names) put
the stride in each block's first 1x1 convolution and expect BGR images in 0-255 minus the Caffe mean
(104.01, 116.67, 122.68) without scaling: ``stride_in_1x1`` and ``input_style`` (null: follow the weights)
make the network convert rtda's ImageNet-normalised RGB input itself, on the device, so data pipelines,
rtda-eval and rtda-bench stay the same for every network. Both resolved values are saved with the run
(``rebuild_kwargs``), so a checkpoint is rebuilt exactly without the weights file.

Deliberate difference: logits are upsampled to the input size inside ``forward`` with
``align_corners=False`` (the official training loop upsamples outside with ``align_corners=True``), so
every rtda network has the same interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet101_Weights

from rtda.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from rtda.models.frozen_bn import FrozenBatchNorm2d
from rtda.models.outputs import SegmentationOutputs
from rtda.models.pretrained import PretrainedWeightsError, file_state_dict, load_matching, registry_state_dict
from rtda.run.errors import ConfigValueError

#: the per-channel mean (B, G, R, 0-255) the Caffe DeepLab weights were trained with (official loaders' IMG_MEAN)
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None,
                 stride_in_1x1: bool = False, norm_layer: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ASPPClassifier(nn.Module):
    """Sum of parallel dilated 3x3 convolutions straight to class scores (DeepLabV2's ASPP)."""

    def __init__(self, in_channels: int, num_classes: int, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLabV2-ResNet101. ``forward`` returns logits at the input size; with ``multi_level`` it returns
    :class:`SegmentationOutputs` in training mode (``out`` from ``layer4``; ``layer3``'s classifier as an
    auxiliary head and as an adaptation level)."""

    head_lr_mult = 10.0

    def __init__(self, num_classes: int = 19, pretrained: bool | str = False, multi_level: bool = False,
                 layers=(3, 4, 23, 3), stride_in_1x1: bool | None = None, aux_weights: dict[str, float] | None = None,
                 freeze_bn: bool | str = True, input_style: str | None = None):
        super().__init__()
        if freeze_bn not in (True, False, "affine"):
            raise ConfigValueError(f"model.freeze_bn={freeze_bn!r}: expected true, affine or false")
        if input_style not in (None, "imagenet", "caffe"):
            raise ConfigValueError(f"model.input_style={input_style!r}: expected imagenet, caffe or null")
        self.norm_layer = FrozenBatchNorm2d if freeze_bn is True else nn.BatchNorm2d
        from_file = bool(pretrained) and not (pretrained is True or str(pretrained).lower() in ("true", "imagenet"))
        state = file_state_dict(pretrained) if from_file else None
        caffe = state is not None and any(k.startswith(("Scale.", "layer5.")) for k in state)
        self.stride_in_1x1 = caffe if stride_in_1x1 is None else bool(stride_in_1x1)
        self.input_style = input_style or ("caffe" if caffe else "imagenet")
        # ImageNet-normalised RGB -> BGR 0-255 minus the Caffe mean: x_bgr * scale + shift
        mean, std = torch.tensor(IMAGENET_MEAN).flip(0), torch.tensor(IMAGENET_STD).flip(0)
        self.register_buffer("caffe_scale", (std * 255).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("caffe_shift", (mean * 255 - torch.tensor(CAFFE_MEAN_BGR)).view(1, 3, 1, 1),
                             persistent=False)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = self.norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        self.classifier = ASPPClassifier(2048, num_classes)
        self.aux_classifier = ASPPClassifier(1024, num_classes) if multi_level else None
        if aux_weights is None:
            aux_weights = {"layer3": 0.1}
        elif not hasattr(aux_weights, "keys"):  # a list, as checkpoints before named outputs saved it
            aux_weights = dict(zip(("layer3",), aux_weights))
        self.aux_weights = dict(aux_weights) if multi_level else {}
        self.adaptation_levels = ("layer3",) if multi_level else ()
        self.freeze_bn = freeze_bn
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in self._classifier_convs():
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if freeze_bn == "affine":  # the official code: batch statistics in training, affine terms fixed
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)
        #: what initialised the backbone (a weights name or file), None for a random initialisation
        self.pretrained_weights: str | None = None
        if pretrained:
            if from_file:
                self.load_backbone(state, str(pretrained))
                self.pretrained_weights = str(pretrained)
            else:
                self.load_backbone(registry_state_dict(ResNet101_Weights.IMAGENET1K_V1), str(ResNet101_Weights.IMAGENET1K_V1))
                self.pretrained_weights = str(ResNet101_Weights.IMAGENET1K_V1)

    def _classifier_convs(self) -> set:
        heads = [self.classifier] + ([self.aux_classifier] if self.aux_classifier is not None else [])
        return {m for h in heads for m in h.modules()}

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4 or dilation in (2, 4):
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       self.norm_layer(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample, self.stride_in_1x1, self.norm_layer)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, 1, dilation, None, self.stride_in_1x1, self.norm_layer)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def load_backbone(self, state: dict, source: str) -> None:
        """Load ResNet weights (torchvision or official DeepLab names); the official single-level
        classifier ``layer5`` loads into ``classifier`` when its shape fits (same number of classes)."""
        renamed = {("classifier." + k[len("layer5."):] if k.startswith("layer5.") else k): v for k, v in state.items()}
        missing = load_matching(self, renamed, source, prefixes=("", "backbone.", "Scale."))
        backbone_missing = [k for k in missing if not k.startswith(("classifier.", "aux_classifier."))]
        if backbone_missing:
            raise PretrainedWeightsError(f"{source}: {len(backbone_missing)} backbone tensors were not in the file, e.g. {backbone_missing[:3]}")

    def backbone_parameters(self):
        heads = {id(p) for p in self.classifier.parameters()}
        if self.aux_classifier is not None:
            heads |= {id(p) for p in self.aux_classifier.parameters()}
        return (p for p in self.parameters() if id(p) not in heads)

    @property
    def rebuild_kwargs(self) -> dict:
        """What the weights decided (``null`` in the config), saved with the run to rebuild it without them."""
        return {"stride_in_1x1": self.stride_in_1x1, "input_style": self.input_style}

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        if self.input_style == "caffe":
            x = x.flip(1) * self.caffe_scale + self.caffe_shift
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        f3 = self.layer3(x)
        f4 = self.layer4(f3)
        out = F.interpolate(self.classifier(f4), size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_classifier is not None:
            aux = F.interpolate(self.aux_classifier(f3), size=size, mode="bilinear", align_corners=False)
            return SegmentationOutputs(out, aux={k: aux for k in self.aux_weights}, levels={"layer3": aux})
        return out
