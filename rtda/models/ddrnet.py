"""DDRNet-23-slim (Hong et al., "Deep Dual-resolution Networks for Real-time and Accurate Semantic
Segmentation of Road Scenes", arXiv 2101.06085), as in the official code github.com/ydhongHIT/DDRNet
(``segmentation/DDRNet_23_slim.py``).

Exactly as official:

* stem: two stride-2 3x3 conv-BN-ReLU (the convolutions *with* bias), ``layer1`` and ``layer2`` of
  BasicBlocks (1/8); there the network splits into a high-resolution branch that stays at 1/8
  (``layer3_``, ``layer4_``, then one Bottleneck ``layer5_``) and a low-resolution branch (``layer3`` 1/16,
  ``layer4`` 1/32, Bottleneck ``layer5`` 1/64, then DAPPM ``spp``);
* two bilateral fusions, after stages 3 and 4: high -> low by strided 3x3 convs (``down3``, ``down4``),
  low -> high by a 1x1 conv-BN (``compression3``, ``compression4``) upsampled bilinearly; every branch input
  goes through a ReLU and the last block of each layer has none, as the official blocks;
* DAPPM: average pools 5/2, 9/4, 17/8 and global, each BN-ReLU-1x1, added hierarchically to the previous
  scale and refined by BN-ReLU-3x3, concatenated, compressed by BN-ReLU-1x1, plus a BN-ReLU-1x1 shortcut;
* main head ``final_layer`` (BN-ReLU-3x3 conv 64, BN-ReLU-1x1 conv with bias) on the sum of the two branches
  at 1/8; the auxiliary head (official ``seghead_extra``, ``augment=True``), the same head on the
  high-resolution branch right after the stage-3 fusion, is rtda's aux head ``high_res`` (loss weight 0.4,
  the paper's alpha). It is built only when ``aux_weights`` or ``adaptation_levels`` name it and is not
  computed in eval mode;
* initialisation: Kaiming-normal (fan_out) convolutions, BN weight 1 bias 0; module names and state-dict
  keys are the official ones (the official model's state dict loads with ``load_state_dict`` as it is;
  ``pretrained=`` takes the ImageNet file).

Loss (:meth:`DDRNet.loss_terms`): HRNet's OHEM cross-entropy (thresh 0.9, min_kept 131072) on the main
output, weight 1, and on the auxiliary head, weight 0.4. The official repository has no training code (the
authors trained with HRNet-Semantic-Segmentation pytorch-v1.1, whose OHEM loss takes one output only, so
their two-output version is unpublished). OHEM on both follows the paper's ``L = L_n + 0.4 L_a`` with OHEM
as a training trick, and mmsegmentation's port, which reproduces the paper (77.8 mIoU); HRNet-OCR's and
PIDNet's later criterion (plain CE on all outputs but the last) is ``aux_ohem=False``.

Pretrained: ``DDRNet23s_imagenet.pth`` (the official ImageNet classifier's plain state dict, keys as
``classification/DDRNet_23_slim.py``) initialises everything but ``spp`` and the heads; its classifier
(``down5``, ``last_layer``, ``linear``) is dropped. mmsegmentation's converted file is not accepted: its
layout is not published with a converter for its current backbone, and that port drops the stem
convolutions' biases.

Deliberate difference: the low->high upsamplings and DAPPM's output go to the high-resolution branch's
size rather than ``(H // 8, W // 8)``: the same for inputs divisible by 8, and inputs that are not (GTA5's
1914x1052) run instead of failing. Logits are upsampled to the input size inside ``forward``
(bilinear, ``align_corners=False`` as the authors evaluate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.models.frozen_bn import freeze_batchnorm
from rtda.models.losses import LossTerms, ohem_cross_entropy, pixel_cross_entropy
from rtda.models.outputs import SegmentationOutputs
from rtda.models.pretrained import PretrainedWeightsError, file_state_dict
from rtda.run.errors import ConfigValueError

IMAGENET_FILE = "DDRNet23s_imagenet.pth"
IMAGENET_URL = "https://drive.google.com/file/d/1mg5tMX7TJ9ZVcAiGSB4PEihPtrJyalB4/view"
#: keys of the ImageNet file that only its classifier uses (dropped when loading)
CLASSIFIER_PREFIXES = ("down5.", "last_layer.", "linear.")
#: modules of the segmentation network the ImageNet file does not have
SEGMENTATION_PREFIXES = ("spp.", "final_layer.", "seghead_extra.")


def _interp(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _conv_bn(cin: int, cout: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size, stride, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(cout)]


def _bn_relu_conv(cin: int, cout: int, kernel_size: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))
        out = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(out, inplace=True) if self.relu else out


class Bottleneck(nn.Module):
    expansion = 2

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, relu: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 2)
        self.downsample = downsample
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out)) + (x if self.downsample is None else self.downsample(x))
        return F.relu(out, inplace=True) if self.relu else out


def _layer(block, cin: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """Residual blocks as the official ``_make_layer``: the last block of a layer ends without ReLU (a
    one-block layer keeps its block's default: BasicBlock with, Bottleneck without)."""
    cout = planes * block.expansion
    downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
    if blocks == 1:
        return nn.Sequential(block(cin, planes, stride, downsample))
    layers = [block(cin, planes, stride, downsample)]
    layers += [block(cout, planes, relu=i < blocks - 1) for i in range(1, blocks)]
    return nn.Sequential(*layers)


class DAPPM(nn.Module):
    """Deep Aggregation Pyramid Pooling Module (the paper's Fig. 5)."""

    def __init__(self, cin: int, branch: int, cout: int):
        super().__init__()
        pools = [nn.AvgPool2d(5, 2, 2), nn.AvgPool2d(9, 4, 4), nn.AvgPool2d(17, 8, 8), nn.AdaptiveAvgPool2d((1, 1))]
        self.scale0 = _bn_relu_conv(cin, branch)
        for i, pool in enumerate(pools, 1):
            setattr(self, f"scale{i}", nn.Sequential(pool, *_bn_relu_conv(cin, branch)))
            setattr(self, f"process{i}", _bn_relu_conv(branch, branch, 3))
        self.compression = _bn_relu_conv(branch * 5, cout)
        self.shortcut = _bn_relu_conv(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        scales = [self.scale0(x)]
        for i in range(1, 5):
            pooled = _interp(getattr(self, f"scale{i}")(x), size)
            scales.append(getattr(self, f"process{i}")(pooled + scales[-1]))
        return self.compression(torch.cat(scales, dim=1)) + self.shortcut(x)


class SegHead(nn.Module):
    """BN-ReLU-3x3 conv, BN-ReLU-1x1 conv to class scores (the official ``segmenthead``)."""

    def __init__(self, cin: int, mid: int, num_classes: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(x)))


class DDRNet(nn.Module):
    """DDRNet-23-slim (``planes=32, head_planes=64``; DDRNet-23 is ``planes=64, head_planes=128``).

    ``forward`` returns logits at the input size; in training mode :class:`SegmentationOutputs` with the
    auxiliary head ``high_res`` under ``aux`` (if in ``aux_weights``) and ``levels`` (if in
    ``adaptation_levels``).

    Args:
        pretrained: false, or a path to the official ``DDRNet23s_imagenet.pth``.
        aux_weights: loss weight of the auxiliary head by name (official: ``{high_res: 0.4}``; ``{}``: none).
        adaptation_levels: auxiliary heads also exposed as output spaces to adapt.
        freeze_bn: BatchNorm replaced by :class:`FrozenBatchNorm2d` (the official code trains it).
        ohem_thresh, ohem_min_kept: HRNet's OHEM (official 0.9, 131072 per GPU replica).
        aux_ohem: OHEM on the auxiliary head too (true, mmsegmentation's port) or plain cross-entropy.
    """

    AUX_HEADS = ("high_res",)
    head_lr_mult = 1.0  # the official recipe (HRNet's) trains every parameter at one learning rate

    def __init__(self, num_classes: int = 19, pretrained: bool | str = False, aux_weights: dict[str, float] | None = None,
                 adaptation_levels: tuple[str, ...] = (), freeze_bn: bool = False, planes: int = 32, spp_planes: int = 128,
                 head_planes: int = 64, ohem_thresh: float = 0.9, ohem_min_kept: int = 131072, aux_ohem: bool = True):
        super().__init__()
        if aux_weights is None:
            aux_weights = {"high_res": 0.4}
        if not hasattr(aux_weights, "keys"):
            raise ConfigValueError(f"model.aux_weights={aux_weights!r}: expected a mapping head -> weight, e.g. {{high_res: 0.4}}")
        aux_weights = {str(k): float(v) for k, v in aux_weights.items()}
        unknown = (set(aux_weights) | set(adaptation_levels)) - set(self.AUX_HEADS)
        if unknown:
            raise ConfigValueError(f"DDRNet has no auxiliary head {sorted(unknown)}: its heads are {list(self.AUX_HEADS)}")
        self.aux_weights = aux_weights
        self.adaptation_levels = tuple(adaptation_levels)
        self.ohem_thresh, self.ohem_min_kept, self.aux_ohem = float(ohem_thresh), int(ohem_min_kept), bool(aux_ohem)
        high = planes * 2
        self.conv1 = nn.Sequential(nn.Conv2d(3, planes, 3, 2, 1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                                   nn.Conv2d(planes, planes, 3, 2, 1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True))
        self.layer1 = _layer(BasicBlock, planes, planes, 2)
        self.layer2 = _layer(BasicBlock, planes, planes * 2, 2, stride=2)
        self.layer3 = _layer(BasicBlock, planes * 2, planes * 4, 2, stride=2)
        self.layer4 = _layer(BasicBlock, planes * 4, planes * 8, 2, stride=2)
        self.compression3 = nn.Sequential(*_conv_bn(planes * 4, high, 1))
        self.compression4 = nn.Sequential(*_conv_bn(planes * 8, high, 1))
        self.down3 = nn.Sequential(*_conv_bn(high, planes * 4, 3, 2))
        self.down4 = nn.Sequential(*_conv_bn(high, planes * 4, 3, 2), nn.ReLU(inplace=True),
                                   *_conv_bn(planes * 4, planes * 8, 3, 2))
        self.layer3_ = _layer(BasicBlock, planes * 2, high, 2)
        self.layer4_ = _layer(BasicBlock, high, high, 2)
        self.layer5_ = _layer(Bottleneck, high, high, 1)
        self.layer5 = _layer(Bottleneck, planes * 8, planes * 8, 1, stride=2)
        self.spp = DAPPM(planes * 16, spp_planes, planes * 4)
        self.final_layer = SegHead(planes * 4, head_planes, num_classes)
        needs_aux = "high_res" in self.aux_weights or "high_res" in self.adaptation_levels
        self.seghead_extra = SegHead(high, head_planes, num_classes) if needs_aux else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.freeze_bn = bool(freeze_bn)
        #: what initialised the network (a file), None for a random initialisation
        self.pretrained_weights: str | None = None
        if pretrained:
            if pretrained is True or str(pretrained).lower() in ("true", "imagenet"):
                raise PretrainedWeightsError(
                    f"DDRNet-23-slim has no torchvision weights: download {IMAGENET_FILE} (the official ImageNet "
                    f"model, {IMAGENET_URL}, linked from https://github.com/ydhongHIT/DDRNet) and pass "
                    f"model.pretrained=/path/to/{IMAGENET_FILE}")
            self.load_imagenet(file_state_dict(pretrained), str(pretrained))
            self.pretrained_weights = str(pretrained)
        if self.freeze_bn:
            freeze_batchnorm(self)

    def load_imagenet(self, state: dict, source: str) -> list[str]:
        """Load the official ImageNet state dict strictly onto every module but ``spp`` and the heads; returns
        the dropped classifier keys. Any other missing, unexpected or misshapen key: one error."""
        dropped = [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]
        given = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(SEGMENTATION_PREFIXES)}
        # num_batches_tracked is optional (files saved without it load; the counter is not a weight)
        missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in given if k not in own]
        misshapen = [f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in given
                     if k in own and given[k].shape != own[k].shape]
        if missing or unexpected or misshapen:
            parts = [f"{len(missing)} network tensors not in the file, e.g. {missing[:3]}" if missing else "",
                     f"{len(unexpected)} file tensors the network does not have, e.g. {unexpected[:3]}" if unexpected else "",
                     f"{len(misshapen)} of another shape, e.g. {misshapen[:3]}" if misshapen else ""]
            raise PretrainedWeightsError(
                f"{source} does not fit DDRNet (expected the official {IMAGENET_FILE}, keys as "
                f"classification/DDRNet_23_slim.py): {'; '.join(p for p in parts if p)}. "
                f"File keys e.g. {list(state)[:3]}; network keys e.g. {list(own)[:3]}")
        self.load_state_dict(given, strict=False)
        return dropped

    def backbone_parameters(self):
        """What the ImageNet file initialises (everything but DAPPM and the heads)."""
        return (p for name, p in self.named_parameters() if not name.startswith(SEGMENTATION_PREFIXES))

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        x = self.layer1(self.conv1(x))
        x = F.relu(self.layer2(F.relu(x)))
        low = self.layer3(x)
        high = self.layer3_(x)
        at = high.shape[-2:]  # 1/8 (official: (H // 8, W // 8), the same for sizes divisible by 8)
        low, high = low + self.down3(F.relu(high)), high + _interp(self.compression3(F.relu(low)), at)
        stage3 = high
        low = self.layer4(F.relu(low))
        high = self.layer4_(F.relu(high))
        low, high = low + self.down4(F.relu(high)), high + _interp(self.compression4(F.relu(low)), at)
        high = self.layer5_(F.relu(high))
        low = _interp(self.spp(self.layer5(F.relu(low))), at)
        out = _interp(self.final_layer(low + high), size)
        if not self.training or self.seghead_extra is None:
            return out if not self.training else SegmentationOutputs(out)
        heads = {"high_res": _interp(self.seghead_extra(stage3), size)}
        return SegmentationOutputs(out, aux={k: heads[k] for k in self.aux_weights},
                                   levels={k: heads[k] for k in self.adaptation_levels})

    def loss_terms(self, outputs: SegmentationOutputs, label: torch.Tensor, weight: torch.Tensor | None = None,
                   ignore_index: int = 255) -> LossTerms:
        """OHEM cross-entropy on the main output (1) and on the auxiliary head (``aux_weights``, 0.4);
        ``weight`` multiplies every per-pixel loss."""
        ohem = dict(thresh=self.ohem_thresh, min_kept=self.ohem_min_kept)
        terms: LossTerms = {"loss_seg": (ohem_cross_entropy(outputs.out, label, weight, ignore_index, **ohem), 1.0)}
        for name, logits in outputs.aux.items():
            if self.aux_ohem:
                value = ohem_cross_entropy(logits, label, weight, ignore_index, **ohem)
            else:
                # HRNet-OCR's / PIDNet's criterion: per-pixel CE averaged over all pixels, ignored ones as 0
                value = pixel_cross_entropy(logits, label, torch.ones_like(label, dtype=torch.float32) if weight is None
                                            else weight, ignore_index)
            terms[f"loss_aux/{name}"] = (value, self.aux_weights[name])
        return terms
