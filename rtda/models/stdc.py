"""STDC-Seg (Fan et al., "Rethinking BiSeNet For Real-time Semantic Segmentation", CVPR 2021).

Official code: https://github.com/MichaelFan01/STDC-Seg (``nets/stdcnet.py``, ``models/model_stages.py``,
``loss/detail_loss.py``, ``loss/loss.py``, ``train.py``). STDC1-Seg is the STDCNet813 backbone, STDC2-Seg
STDCNet1446. Exactly as official:

* backbone: STDCNet of ``CatBottleneck`` blocks (4 convs each, short-term dense concatenation), no
  ImageNet classifier (``conv_last``/``gap``/``fc``/``bn``/``linear`` not built, ``use_conv_last=False``);
* context path (BiSeNet-style): global average of the 1/32 features through a 1x1 ConvBNReLU, added to
  the ARM of the 1/32 features; nearest upsampling, 3x3 ConvBNReLU, added to the ARM of the 1/16
  features; nearest upsampling to 1/8, 3x3 ConvBNReLU. The FFM fuses the backbone's 1/8 features (256)
  with that context (128) into 256 channels; the main head ``conv_out`` (3x3 ConvBNReLU + 1x1);
* training heads of the official ``train.py`` configuration (``use_boundary_8=True``): ``conv_out16``
  and ``conv_out32`` (here ``aux`` ``context16``/``context32``, weight 1 each as ``train.py`` sums them)
  and the detail head ``conv_out_sp8`` on the 1/8 backbone features (``extra["detail"]``, at 1/8);
  none of them is computed in evaluation mode;
* losses (:meth:`STDCSeg.loss_terms`): STDC's ``OhemCELoss`` (:func:`stdc_ohem_cross_entropy`: the
  pixels whose loss exceeds -log(0.7), or the n_min largest losses if fewer, n_min = N*H*W // 16) on
  the main and both auxiliary outputs, and the ``DetailAggregateLoss`` (:func:`detail_loss`):
  Laplacian boundaries of the label at strides 1, 2, 4 fused with weights (0.6, 0.3, 0.1), BCE + dice;
* initialisation: kaiming (fan_out) in the backbone, kaiming (a=1) in the head, BN 1/0;
* ``backbone_parameters()`` is the official ``get_params`` base-LR group: the whole context path
  (STDCNet, ARMs, ``conv_avg``, ``conv_head16/32``); the FFM and the output heads get ``head_lr_mult``
  = 10 (``optimizer_loss.py``: ``lr_mul`` groups at lr x 10).

Deliberate differences:

* logits are upsampled to the input size with ``align_corners=False`` (official: True), as every rtda
  network; the detail logits are upsampled inside :func:`detail_loss` with ``align_corners=True`` as
  official;
* the detail fuse kernel (0.6, 0.3, 0.1) is a constant. Officially it is an ``nn.Parameter`` in the
  optimizer, but the thresholding that follows overwrites every value, so its loss gradient is exactly
  zero and only SGD's weight decay (5e-4, momentum 0.9, base LR schedule) moves it: simulated, it shrinks
  to 0.21x by iteration 60k, so pixels on a stride-2 but no stride-1 boundary stop being targets after
  iteration ~28.8k (0.3x < 0.1), or ~41.4k when also on a stride-4 one (0.4x < 0.1); from then on the
  targets are the stride-1 boundaries only. rtda keeps the weights the authors set;
* BatchNorm is ``nn.BatchNorm2d`` (official head: synchronised InPlace-ABN without activation, the same
  function; ``trainer=ddp`` syncs it); the official optimizer's no-weight-decay groups (biases, BN)
  are the optimizer config's business, not the network's.

Pretrained: the official ImageNet files ``STDCNet813M_73.91.tar`` / ``STDCNet1446_76.47.tar``
(``{"state_dict": {"features.*", "x2.*"...}}``: the ``x2``..``x32`` stage aliases of the same tensors
are checked and folded, the classifier keys dropped), or mmsegmentation's converted
``stdc1_20220308-5368626c.pth`` / ``stdc2_20220308-7dbd9127.pth`` (``stages.*`` keys, as written by
mmseg's ``tools/model_converters/stdc2mmseg.py`` for its ``STDCNet``: ``layers``/``downsample``; an earlier
converter's ``avg_pool`` and ``final_conv`` names are accepted, and the ``x8.0.<i>.layers`` aliases the released
converter carries over). Loading is strict for the backbone.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from rtda.data.labels import IGNORE_INDEX
from rtda.models.frozen_bn import freeze_batchnorm
from rtda.models.losses import LossTerms
from rtda.models.outputs import SegmentationOutputs
from rtda.models.pretrained import PretrainedWeightsError, file_state_dict
from rtda.run.errors import ConfigValueError

#: backbone name -> (blocks per stage at 1/8, 1/16, 1/32; official ImageNet file; mmseg converted file)
ARCHS = {
    "STDCNet813": ((2, 2, 2), "STDCNet813M_73.91.tar", "stdc1_20220308-5368626c.pth"),
    "STDCNet1446": ((4, 5, 3), "STDCNet1446_76.47.tar", "stdc2_20220308-7dbd9127.pth"),
}
OFFICIAL_URL = "https://github.com/MichaelFan01/STDC-Seg (README: Google Drive / BaiduYun links)"
MMSEG_URL = "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/stdc/"
#: ImageNet-classifier entries of the official file (``use_conv_last=False`` does not build them)
CLASSIFIER_PREFIXES = ("conv_last.", "fc.", "bn.", "linear.")
#: mmseg's name for ``conv_last`` (kept by early versions of its converter)
MMSEG_CLASSIFIER_PREFIXES = ("final_conv.",)
#: mmseg STDCModule names -> official CatBottleneck names (``avg_pool``: an earlier version of mmseg's converter)
_MMSEG_RENAMES = (("layers.", "conv_list."), ("downsample.conv.", "avd_layer.0."), ("downsample.bn.", "avd_layer.1."),
                  ("avg_pool.conv.", "avd_layer.0."), ("avg_pool.bn.", "avd_layer.1."))

# Laplacian kernel and pyramid fuse weights of the official DetailAggregateLoss
_LAPLACIAN = (-1.0, -1.0, -1.0, -1.0, 8.0, -1.0, -1.0, -1.0, -1.0)
_FUSE = (0.6, 0.3, 0.1)


# -- backbone ------------------------------------------------------------------------------------
class ConvX(nn.Module):
    """Conv (no bias) - BN - ReLU; the official ``ConvX`` (and ``ConvBNReLU`` of the head)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class CatBottleneck(nn.Module):
    """STDC module: a 1x1 conv to out/2, then 3x3 convs halving the width (the last keeps it), all
    outputs concatenated; with stride 2 a depthwise 3x3 (``avd_layer``) after the first conv and an
    average pool on its skip."""

    def __init__(self, cin: int, cout: int, block_num: int = 4, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride == 2:
            half = cout // 2
            self.avd_layer = nn.Sequential(nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False), nn.BatchNorm2d(half))
            self.skip = nn.AvgPool2d(3, 2, 1)
        widths = [cout // 2] + [cout // 2 ** (i + 1) for i in range(1, block_num - 1)] + [cout // 2 ** (block_num - 1)]
        self.conv_list = nn.ModuleList([ConvX(cin, widths[0], kernel_size=1)])
        for i in range(1, block_num):
            self.conv_list.append(ConvX(widths[i - 1], widths[i]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv_list[0](x)
        out = self.avd_layer(first) if self.stride == 2 else first
        outs = []
        for conv in self.conv_list[1:]:
            out = conv(out)
            outs.append(out)
        return torch.cat([self.skip(first) if self.stride == 2 else first, *outs], dim=1)


class STDCNet(nn.Module):
    """STDCNet813 / STDCNet1446 without the ImageNet classifier; returns the 1/8, 1/16, 1/32 features."""

    def __init__(self, layers=(2, 2, 2), base: int = 64, block_num: int = 4):
        super().__init__()
        features = [ConvX(3, base // 2, 3, 2), ConvX(base // 2, base, 3, 2)]
        for i, n in enumerate(layers):
            for j in range(n):
                cin = base if (i == 0 and j == 0) else base * 2 ** (i + 1) if j == 0 else base * 2 ** (i + 2)
                features.append(CatBottleneck(cin, base * 2 ** (i + 2), block_num, 2 if j == 0 else 1))
        self.features = nn.Sequential(*features)
        self.stage_ends = tuple(2 + sum(layers[: k + 1]) for k in range(3))  # features[:end] gives 1/8, 1/16, 1/32
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        e8, e16, e32 = self.stage_ends
        f8 = self.features[:e8](x)
        f16 = self.features[e8:e16](f8)
        return f8, f16, self.features[e16:e32](f16)

    def alias_names(self) -> dict[str, str]:
        """The official file also saves each stage as ``x2``..``x32``: ``nn.Sequential(features[a:b])``, the
        same modules under their ``features`` index, wrapped once more (``x8.0.3.`` is ``features.3.``).
        Alias prefix -> ``features`` prefix."""
        e8, e16, e32 = self.stage_ends
        spans = {"x2": (0, 1), "x4": (1, 2), "x8": (2, e8), "x16": (e8, e16), "x32": (e16, e32)}
        return {f"{name}.0.{k}.": f"features.{k}." for name, (start, stop) in spans.items() for k in range(start, stop)}


# -- head ----------------------------------------------------------------------------------------
class AttentionRefinement(nn.Module):
    """3x3 ConvBNReLU, then x * sigmoid(BN(conv1x1(global average)))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvX(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))


class ContextPath(nn.Module):
    """STDCNet + ARMs + global context; returns (1/8 backbone features, context at 1/8, context at 1/16)."""

    def __init__(self, layers):
        super().__init__()
        self.backbone = STDCNet(layers)
        self.arm16 = AttentionRefinement(512, 128)
        self.arm32 = AttentionRefinement(1024, 128)
        self.conv_head32 = ConvX(128, 128)
        self.conv_head16 = ConvX(128, 128)
        self.conv_avg = ConvX(1024, 128, kernel_size=1)

    def forward(self, x: torch.Tensor):
        f8, f16, f32 = self.backbone(x)
        tail = self.conv_avg(f32.mean(dim=(2, 3), keepdim=True))  # official: nearest-upsampled, i.e. broadcast
        up32 = self.conv_head32(F.interpolate(self.arm32(f32) + tail, size=f16.shape[-2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, size=f8.shape[-2:], mode="nearest"))
        return f8, up16, up32


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvX(cin, cout, kernel_size=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat((spatial, context), dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat + feat * atten


class OutputHead(nn.Module):
    """3x3 ConvBNReLU to ``mid`` channels, then a 1x1 conv without bias (official ``BiSeNetOutput``)."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.conv = ConvX(cin, mid)
        self.conv_out = nn.Conv2d(mid, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


# -- losses --------------------------------------------------------------------------------------
def stdc_ohem_cross_entropy(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None,
                            ignore_index: int = IGNORE_INDEX, thresh: float = 0.7, n_min: int | None = None) -> torch.Tensor:
    """STDC's (and BiSeNet's) ``OhemCELoss``: the per-pixel losses sorted over the whole batch (ignored
    pixels count as 0); if the ``n_min``-th largest exceeds -log(``thresh``) the mean of all losses above
    it, else the mean of the ``n_min`` largest (ignored zeros included, as official). ``n_min`` defaults to
    N*H*W // 16 (official: ``n_img_per_gpu * crop_h * crop_w // 16``). Unlike
    :func:`rtda.models.losses.ohem_cross_entropy` (HRNet's) the threshold is on the loss. With ``weight``
    the pixels are chosen by their loss and their weighted losses averaged."""
    losses = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none").flatten()
    if n_min is None:
        n_min = label.numel() // 16
    n_min = min(max(1, int(n_min)), losses.numel() - 1)
    ordered, order = torch.sort(losses, descending=True)
    values = ordered.detach()
    limit = float(-torch.log(torch.tensor(thresh, dtype=torch.float32)))  # the official float32 threshold
    count = int((values > limit).sum()) if bool(values[n_min] > limit) else n_min
    kept = ordered[:count]  # sorted: the losses above the limit come first
    if weight is not None:
        kept = kept * torch.broadcast_to(weight, label.shape).flatten()[order[:count]]
    return kept.mean()


def detail_targets(label: torch.Tensor) -> torch.Tensor:
    """The official detail ground truth (N×1×H×W, 0/1) from the label (N×H×W, ignore value included, as
    official): Laplacian responses at strides 1, 2, 4 (clamped at 0, > 0.1, nearest-upsampled), fused
    0.6/0.3/0.1 and thresholded at 0.1. (The fuse is an elementwise sum in float32, never TF32; in exact
    arithmetic a stride-4-only boundary gives 0.1, which is not > 0.1, as in the official fp32 conv.)"""
    with torch.autocast(device_type=label.device.type, enabled=False):
        x = label.unsqueeze(1).float()
        kernel = torch.tensor(_LAPLACIAN, dtype=torch.float32, device=label.device).view(1, 1, 3, 3)
        levels = []
        for stride in (1, 2, 4):
            edge = F.conv2d(x, kernel, stride=stride, padding=1).clamp(min=0)
            if stride > 1:
                edge = F.interpolate(edge, size=x.shape[-2:], mode="nearest")
            levels.append((edge > 0.1).float())
        fused = _FUSE[0] * levels[0] + _FUSE[1] * levels[1] + _FUSE[2] * levels[2]
        return (fused > 0.1).float()


def detail_loss(detail_logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``DetailAggregateLoss``: (BCE, dice) of the detail logits (upsampled bilinearly with
    ``align_corners=True`` to the label size) against :func:`detail_targets`. ``weight`` multiplies the
    per-pixel BCE; the dice loss is per image and ignores it."""
    target = detail_targets(label)
    logits = detail_logits.float()
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=True)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is not None:
        bce = bce * torch.broadcast_to(weight, label.shape).unsqueeze(1)
    prob, tgt = torch.sigmoid(logits).flatten(1), target.flatten(1)
    dice = 1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)
    return bce.mean(), dice.mean()


# -- network -------------------------------------------------------------------------------------
class STDCSeg(nn.Module):
    """STDC-Seg. ``forward`` returns logits at the input size; in training mode
    :class:`SegmentationOutputs` with ``aux`` ``context16``/``context32`` and ``extra["detail"]`` (1/8).

    Args:
        backbone: ``STDCNet813`` (STDC1-Seg) or ``STDCNet1446`` (STDC2-Seg).
        aux_weights: loss weight of each auxiliary head (official: 1 each); a head left out is neither
            built nor supervised (unless in ``adaptation_levels``).
        detail_weight: coefficient of the two detail-loss terms (official 1); 0 drops the detail head.
        ohem_thresh / ohem_n_min: OhemCELoss's score threshold (0.7) and minimum kept pixels (null:
            N*H*W // 16 of the batch, the official formula).
    """

    AUX_HEADS = ("context16", "context32")
    head_lr_mult = 10.0

    def __init__(self, num_classes: int = 19, backbone: str = "STDCNet813", pretrained: bool | str = False,
                 aux_weights: dict[str, float] | None = None, adaptation_levels: tuple[str, ...] = (),
                 freeze_bn: bool = False, detail_weight: float = 1.0, ohem_thresh: float = 0.7,
                 ohem_n_min: int | None = None):
        super().__init__()
        if backbone not in ARCHS:
            raise ConfigValueError(f"model.backbone={backbone!r}: expected one of {sorted(ARCHS)}")
        aux_weights = dict.fromkeys(self.AUX_HEADS, 1.0) if aux_weights is None else dict(aux_weights)
        unknown = (set(aux_weights) | set(adaptation_levels)) - set(self.AUX_HEADS)
        if unknown:
            raise ConfigValueError(f"STDCSeg has no auxiliary head {sorted(unknown)}: its heads are {list(self.AUX_HEADS)}")
        self.backbone_name = backbone
        self.aux_weights = aux_weights
        self.adaptation_levels = tuple(adaptation_levels)
        self.detail_weight = float(detail_weight)
        self.ohem_thresh = float(ohem_thresh)
        self.ohem_n_min = ohem_n_min
        heads = set(aux_weights) | set(adaptation_levels)
        self.cp = ContextPath(ARCHS[backbone][0])
        self.ffm = FeatureFusion(256 + 128, 256)
        self.conv_out = OutputHead(256, 256, num_classes)
        self.conv_out16 = OutputHead(128, 64, num_classes) if "context16" in heads else None
        self.conv_out32 = OutputHead(128, 64, num_classes) if "context32" in heads else None
        self.conv_out_sp8 = OutputHead(256, 64, 1) if self.detail_weight else None
        for name, m in self.named_modules():
            if name.startswith("cp.backbone"):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        #: what initialised the backbone (a file), None for a random initialisation
        self.pretrained_weights: str | None = None
        if pretrained:
            if pretrained is True or str(pretrained).lower() in ("true", "imagenet"):
                _, official, mmseg = ARCHS[backbone]
                raise PretrainedWeightsError(
                    f"{backbone} has no torchvision weights: download the official ImageNet file {official} "
                    f"({OFFICIAL_URL}) or mmsegmentation's {mmseg} ({MMSEG_URL}{mmseg}) and pass "
                    f"model.pretrained=/path/to/FILE")
            self.load_backbone(file_state_dict(pretrained), str(pretrained))
            self.pretrained_weights = str(pretrained)
        self.freeze_bn = bool(freeze_bn)
        if freeze_bn:
            freeze_batchnorm(self)

    # -- weights ---------------------------------------------------------------------------------
    def backbone_state_from(self, state: dict, source: str) -> dict:
        """The file's entries under the backbone's own names (official or mmseg layout; the ``x2``..``x32``
        aliases folded, the classifier entries dropped). Raises one :class:`PretrainedWeightsError` on any
        missing or unexpected key."""
        net = self.cp.backbone
        own = net.state_dict()
        mmseg = any(k.startswith("stages.") for k in state)
        aliases = net.alias_names()
        stage_start = {2: 2, 3: net.stage_ends[0], 4: net.stage_ends[1]}
        mapped, source_key, unexpected = {}, {}, []
        for key, value in state.items():
            if key.startswith(MMSEG_CLASSIFIER_PREFIXES if mmseg else CLASSIFIER_PREFIXES):
                continue
            name = key
            prefix = next((a for a in aliases if key.startswith(a)), None)
            if prefix is not None:
                name = aliases[prefix] + key[len(prefix):]
            elif mmseg:
                m = re.fullmatch(r"stages\.([01])\.(.*)|stages\.([234])\.(\d+)\.(.*)", key)
                if m is None:
                    unexpected.append(key)
                    continue
                name = f"features.{m[1]}.{m[2]}" if m[1] else f"features.{stage_start[int(m[3])] + int(m[4])}.{m[5]}"
            if mmseg:
                for theirs, ours in _MMSEG_RENAMES:
                    name = name.replace(theirs, ours, 1)
            if name not in own or own[name].shape != value.shape:
                unexpected.append(key)
            elif name in mapped and not torch.equal(mapped[name], value):
                raise PretrainedWeightsError(f"{source}: {key} and {source_key[name]} are the same backbone tensor "
                                             f"({name}) but differ")
            else:
                mapped[name], source_key[name] = value, key
        missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            layout = "mmsegmentation" if mmseg else "official"
            raise PretrainedWeightsError(
                f"{source} does not fit the {self.backbone_name} backbone ({layout} layout): "
                f"{len(missing)} network keys missing from the file, e.g. {missing[:3]}; "
                f"{len(unexpected)} unexpected file keys, e.g. {unexpected[:3]}. "
                f"File keys e.g. {list(state)[:3]}; network keys e.g. {list(own)[:3]}")
        for k in own:
            if k.endswith("num_batches_tracked") and k not in mapped:
                mapped[k] = own[k]
        return mapped

    def load_backbone(self, state: dict, source: str) -> None:
        self.cp.backbone.load_state_dict(self.backbone_state_from(state, source))

    def backbone_parameters(self):
        """The official base-LR group (``get_params``): the context path, STDCNet with the ARMs and
        context convs; the FFM and output heads train at ``head_lr_mult`` x."""
        return self.cp.parameters()

    # -- forward and losses ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        f8, cp8, cp16 = self.cp(x)
        out = F.interpolate(self.conv_out(self.ffm(f8, cp8)), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return out
        heads = {}
        for name, head, feat in (("context16", self.conv_out16, cp8), ("context32", self.conv_out32, cp16)):
            if head is not None:
                heads[name] = F.interpolate(head(feat), size=size, mode="bilinear", align_corners=False)
        extra = {"detail": self.conv_out_sp8(f8)} if self.conv_out_sp8 is not None else {}
        return SegmentationOutputs(out, aux={k: heads[k] for k in self.aux_weights},
                                   levels={k: heads[k] for k in self.adaptation_levels}, extra=extra)

    def loss_terms(self, outputs: SegmentationOutputs, label: torch.Tensor, weight: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX) -> LossTerms:
        """``loss_seg`` and ``loss_aux/<head>`` (OhemCELoss), ``loss_detail/bce`` and ``loss_detail/dice``
        (``detail_weight`` each; the dice term ignores ``weight``), summed as the official ``train.py``."""
        def ohem(logits):
            return stdc_ohem_cross_entropy(logits, label, weight, ignore_index, self.ohem_thresh, self.ohem_n_min)

        terms: LossTerms = {"loss_seg": (ohem(outputs.out), 1.0)}
        for name, logits in outputs.aux.items():
            terms[f"loss_aux/{name}"] = (ohem(logits), float(self.aux_weights[name]))
        if "detail" in outputs.extra:
            bce, dice = detail_loss(outputs.extra["detail"], label, weight)
            terms["loss_detail/bce"] = (bce, self.detail_weight)
            terms["loss_detail/dice"] = (dice, self.detail_weight)
        return terms
