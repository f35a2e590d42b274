"""PIDNet-S (Xu, Xiong & Bhattacharyya, "PIDNet: A Real-time Semantic Segmentation Network Inspired by PID
Controllers", CVPR 2023), as in the official code github.com/XuJiacong/PIDNet (``models/pidnet.py``,
``models/model_utils.py``, ``utils/criterion.py``, ``utils/utils.py`` FullModel, ``datasets/base_dataset.py``).

Exactly as official (m=2, n=3, planes=32, ppm_planes=96, head_planes=128, hence PAPPM and Light-Bag):

* three branches at 1/8: P (``layer3_``/``layer4_``/``layer5_``, fused with the I branch by the two
  pixel-attention-guided modules ``pag3``/``pag4``), I (``layer3``..``layer5`` down to 1/64, then PAPPM) and
  D (``layer3_d``/``layer4_d``/``layer5_d`` plus ``diff3``/``diff4`` from the I branch); the Light-Bag ``dfm``
  fuses them, ``final_layer`` predicts at 1/8. Module names are the official ones, so state-dict keys are the
  official keys. The eval path has 7,625,715 parameters for 19 classes (the paper's 7.6 M);
* training heads: ``seghead_p`` on the P branch after ``pag3`` (aux ``p``, weight 0.4) and ``seghead_d`` on
  the D branch after ``diff4`` (1 channel, ``extra["boundary"]``). The official forward hands those heads the
  ReLU'd features (its in-place ReLUs act on the tensors it kept for them): reproduced. In eval mode neither
  head is computed;
* losses (``loss_terms``), as FullModel + OhemCrossEntropy + BondaryLoss: ``loss_seg`` OHEM CE on the main
  output (1.0); ``loss_aux/p`` (0.4) *plain* CE (the official ``functions = [ce] * (len - 1) + [ohem]`` gives
  OHEM to the last, main output only), whose per-pixel losses the official loop averages over all pixels,
  ignored ones counting 0 (reproduced); ``loss_boundary`` class-balanced BCE of the boundary logits against the
  edge target (20); ``loss_bas`` OHEM CE of the main output on the pixels where sigmoid(boundary) > 0.8,
  the rest ignored (1.0). OHEM is HRNet's (:func:`rtda.models.losses.ohem_cross_entropy`, 0.9 / 131072);
* initialisation: Kaiming-normal (fan-out) convolutions, BatchNorm 1 / 0.

Edge target: the official dataset runs ``cv2.Canny(label, 0.1, 0.2)`` on the full-resolution uint8 label,
zeroes a 6-pixel frame, dilates with a 4x4 kernel, then scales and crops the edge with the label.
:func:`boundary_target` reproduces Canny (3x3 Sobel with replicated border, L1 magnitude, OpenCV's
non-maximum suppression; the thresholds floor to 0, so hysteresis keeps every survivor), the frame and the
dilation with torch ops on the label's device, bit for bit with cv2 on the same label. It runs on the label
the loss gets, i.e. after rtda's augmentation: edges are ``edge_size`` pixels wide at the crop's scale (the
official width scales with the random resize) and the frame lies at the crop's border.

Deliberate differences: the outputs are upsampled to the input size inside the model with
``align_corners=False`` (the official FullModel and evaluation upsample with ``MODEL.ALIGN_CORNERS=True``);
the 1/8 size is that of the features (the official ``H // 8`` breaks on sizes not divisible by 8); the
official Cityscapes class weights of the CE are an option (``class_weights``), off by default (they are
Cityscapes' class frequencies, not the source domain's); OHEM's ``min_kept`` counts over the batch rtda
gives the loss (officially per GPU: 6 images per replica under DataParallel).

Pretrained: ``pretrained=/path/to/PIDNet_S_ImageNet.pth.tar`` (the authors' ImageNet file, official names)
initialises the parts the ImageNet model has (I and P branches and the two PagFMs, :data:`IMAGENET_PARTS`;
that model is the ``PIDNet_S_Imgnet`` code the author posted in XuJiacong/PIDNet issue #24); its classifier
(``down5``, ``last_layer``, ``linear``) is dropped, and the D branch, PAPPM, Bag and heads
(:data:`SEGMENTATION_ONLY`) stay at their initialisation. A full official checkpoint (FullModel's keys,
``model.``-prefixed, as the official ``k[6:]``; or unprefixed) loads the whole network; its
``sem_loss.``/``bd_loss.`` entries (OHEM's class weights) are dropped. Both are strict: one
PretrainedWeightsError names the file and example keys on both sides. mmsegmentation's converted files
(other names) are not supported: their layout could not be established from a file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.models.frozen_bn import freeze_batchnorm
from rtda.models.losses import LossTerms, ohem_cross_entropy, pixel_cross_entropy
from rtda.models.outputs import SegmentationOutputs
from rtda.models.pretrained import PretrainedWeightsError, file_state_dict, key_mismatches
from rtda.run.errors import ConfigValueError

IMAGENET_FILE = "PIDNet_S_ImageNet.pth.tar"
IMAGENET_URL = "https://drive.google.com/file/d/1hIBp_8maRr60-B3PF0NVtaA6TYBvO4y-/view?usp=sharing"
#: top-level modules the official ImageNet model (``PIDNet_S_Imgnet``, issue #24) shares with this network
IMAGENET_PARTS = ("conv1", "layer1", "layer2", "layer3", "layer4", "layer5", "layer3_", "layer4_", "layer5_",
                  "compression3", "compression4", "pag3", "pag4")
#: top-level modules of the ImageNet model's classifier, not built here (dropped when loading)
IMAGENET_CLASSIFIER = ("down5", "last_layer", "linear")
#: top-level modules only the segmentation network has (left at their initialisation by the ImageNet file)
SEGMENTATION_ONLY = ("layer3_d", "layer4_d", "layer5_d", "diff3", "diff4", "spp", "dfm",
                     "seghead_p", "seghead_d", "final_layer")
#: entries of an official training checkpoint (FullModel) that are its losses', not the network's
CHECKPOINT_LOSSES = ("sem_loss.", "bd_loss.")
#: the official Cityscapes CE class weights (``datasets/cityscapes.py``), for ``class_weights="cityscapes"``
CITYSCAPES_CLASS_WEIGHTS = (0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
                            0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _conv_bn(cin: int, cout: int, kernel_size: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(cout))


def _bn_relu_conv(cin: int, cout: int, kernel_size: int = 1, groups: int = 1, pool: nn.Module | None = None):
    layers = [] if pool is None else [pool]
    layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
               nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, relu_out: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu_out = relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(out) if self.relu_out else out


class Bottleneck(nn.Module):
    expansion = 2

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, relu_out: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 2)
        self.downsample = downsample
        self.relu_out = relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + (x if self.downsample is None else self.downsample(x))
        return F.relu(out) if self.relu_out else out


def _downsample(block, cin: int, planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == planes * block.expansion:
        return None
    return nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                         nn.BatchNorm2d(planes * block.expansion))


def _make_layer(block, cin: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """The official ``_make_layer``: the first block with its block type's default output ReLU (a BasicBlock
    has one, a Bottleneck not), the following ones with it, except the last."""
    layers = [block(cin, planes, stride, _downsample(block, cin, planes, stride), relu_out=block is BasicBlock)]
    for i in range(1, blocks):
        layers.append(block(planes * block.expansion, planes, relu_out=i < blocks - 1))
    return nn.Sequential(*layers)


def _single_block(block, cin: int, planes: int) -> nn.Module:
    return block(cin, planes, 1, _downsample(block, cin, planes, 1), relu_out=False)


class SegmentHead(nn.Module):
    """BN-ReLU-3x3 conv-BN-ReLU-1x1 conv (with bias): the official ``segmenthead``."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class PAPPM(nn.Module):
    """Parallel aggregation pyramid pooling: four pooled scales added to the 1x1 branch, one grouped 3x3 conv."""

    def __init__(self, cin: int, branch: int, cout: int):
        super().__init__()
        self.scale1 = _bn_relu_conv(cin, branch, pool=nn.AvgPool2d(5, 2, 2))
        self.scale2 = _bn_relu_conv(cin, branch, pool=nn.AvgPool2d(9, 4, 4))
        self.scale3 = _bn_relu_conv(cin, branch, pool=nn.AvgPool2d(17, 8, 8))
        self.scale4 = _bn_relu_conv(cin, branch, pool=nn.AdaptiveAvgPool2d((1, 1)))
        self.scale0 = _bn_relu_conv(cin, branch)
        self.scale_process = _bn_relu_conv(branch * 4, branch * 4, 3, groups=4)
        self.compression = _bn_relu_conv(branch * 5, cout)
        self.shortcut = _bn_relu_conv(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        base = self.scale0(x)
        scales = [_up(s(x), size) + base for s in (self.scale1, self.scale2, self.scale3, self.scale4)]
        return self.compression(torch.cat([base, self.scale_process(torch.cat(scales, 1))], 1)) + self.shortcut(x)


class PagFM(nn.Module):
    """Pixel-attention-guided fusion: x + sigma * (y - x), sigma = sigmoid(<f_x(x), up(f_y(y))>)."""

    def __init__(self, channels: int, mid: int):
        super().__init__()
        self.f_x = _conv_bn(channels, mid)
        self.f_y = _conv_bn(channels, mid)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        sim = torch.sigmoid((self.f_x(x) * _up(self.f_y(y), size)).sum(dim=1, keepdim=True))
        return (1 - sim) * x + sim * _up(y, size)


class LightBag(nn.Module):
    """Light boundary-attention-guided fusion of P, I with the D branch's sigmoid as the attention."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_p = _conv_bn(cin, cout)
        self.conv_i = _conv_bn(cin, cout)

    def forward(self, p: torch.Tensor, i: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        att = torch.sigmoid(d)
        return self.conv_p((1 - att) * i + p) + self.conv_i(i + att * p)


# --- the boundary ground truth (the official dataset's cv2 edge, on the label's device) ---------------------

_TG22 = 13573  # OpenCV's Canny: round(tan(22.5 deg) * 2**15)
_SHIFT = 15


def canny_on_labels(label: torch.Tensor) -> torch.Tensor:
    """``cv2.Canny(label, 0.1, 0.2) > 0`` for an integer label map N×H×W (values 0..255): 3x3 Sobel with a
    replicated border, L1 magnitude, OpenCV's non-maximum suppression in four sectors. Both thresholds
    floor to 0, so every suppression survivor with a non-zero gradient is a strong edge (no hysteresis)."""
    img = F.pad(label.unsqueeze(1).float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    rows = img[:, :-2], img[:, 1:-1], img[:, 2:]
    dx = sum(w * (r[..., 2:] - r[..., :-2]) for w, r in zip((1, 2, 1), rows))
    cols = img[..., :-2], img[..., 1:-1], img[..., 2:]
    dy = sum(w * (c[:, 2:] - c[:, :-2]) for w, c in zip((1, 2, 1), cols))
    dx, dy = dx.long(), dy.long()  # exact: |d| <= 4 * 255
    mag = dx.abs() + dy.abs()
    pad = F.pad(mag, (1, 1, 1, 1))  # zero magnitude outside the image, as OpenCV's buffers
    h, w = mag.shape[-2:]

    def at(oy: int, ox: torch.Tensor | int) -> torch.Tensor:
        return pad[:, 1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ax, ay = dx.abs(), dy.abs() << _SHIFT
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg22x + (ax << (_SHIFT + 1)))
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # OpenCV: s = (xs ^ ys) < 0 ? -1 : 1
    keep = horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep |= diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1))
    keep |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1))
    return keep & (mag > 0)


def boundary_target(label: torch.Tensor, edge_size: int = 4, edge_pad: int = 6) -> torch.Tensor:
    """The official edge ground truth of a label batch N×H×W: Canny, ``edge_pad`` border pixels zeroed,
    dilated with an ``edge_size``² kernel (OpenCV's centre anchor); float 0/1, N×H×W, on the label's device."""
    edge = canny_on_labels(label).float()
    if edge_pad > 0:
        frame = torch.zeros_like(edge)
        frame[:, edge_pad:-edge_pad, edge_pad:-edge_pad] = 1
        edge = edge * frame
    if edge_size > 1:
        before = edge_size // 2  # cv2.dilate's anchor: offsets -k//2 .. k - 1 - k//2
        edge = F.max_pool2d(F.pad(edge.unsqueeze(1), (before, edge_size - 1 - before) * 2), edge_size, stride=1)[:, 0]
    return edge


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The official class-balanced BCE: edge pixels weighted by the non-edge share and vice versa, averaged
    over all pixels; ``weight`` (N×H×W or broadcastable) multiplies each pixel's term."""
    logits = logits.float()
    edges = target == 1
    positives = edges.sum()
    total = positives + (target == 0).sum()
    balance = torch.where(edges, (total - positives) / total, positives / total).to(logits.dtype)
    if weight is not None:
        balance = balance * weight
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), balance)


class PIDNet(nn.Module):
    """PIDNet-S. ``forward`` returns logits at the input size; in training mode :class:`SegmentationOutputs`
    with the P-branch head under ``aux["p"]`` (when in ``aux_weights``) and the boundary logits (1 channel,
    input size) under ``extra["boundary"]``.

    Args:
        aux_weights: loss weight of the P-branch head (official 0.4); ``{}`` leaves it unsupervised.
        adaptation_levels: ``["p"]`` also exposes the P-branch head as an output space.
        freeze_bn: BatchNorm statistics and affine terms frozen (:class:`FrozenBatchNorm2d`).
        ohem_thresh, ohem_min_kept: OHEM of ``loss_seg`` and ``loss_bas`` (official 0.9, 131072).
        class_weights: CE class weights (a list, ``"cityscapes"`` for the official ones, or None).
        boundary_weight, bas_weight, bas_threshold: the boundary BCE's coefficient (20), the boundary-aware
            CE's (1) and its sigmoid threshold (0.8).
        edge_size, edge_pad: the edge target's dilation kernel (4) and zeroed border (6 pixels).
    """

    AUX_HEADS = ("p",)
    head_lr_mult = 1.0  # the official recipe: one learning rate for all parameters

    def __init__(self, num_classes: int = 19, pretrained: bool | str = False, aux_weights: dict[str, float] | None = None,
                 adaptation_levels: tuple[str, ...] = (), freeze_bn: bool = False, ohem_thresh: float = 0.9,
                 ohem_min_kept: int = 131072, class_weights=None, boundary_weight: float = 20.0,
                 bas_weight: float = 1.0, bas_threshold: float = 0.8, edge_size: int = 4, edge_pad: int = 6):
        super().__init__()
        aux_weights = {"p": 0.4} if aux_weights is None else dict(aux_weights)
        adaptation_levels = tuple(adaptation_levels)
        unknown = (set(aux_weights) | set(adaptation_levels)) - set(self.AUX_HEADS)
        if unknown:
            raise ConfigValueError(f"PIDNet has no auxiliary head {sorted(unknown)}: its heads are {list(self.AUX_HEADS)}")
        self.aux_weights = aux_weights
        self.adaptation_levels = adaptation_levels
        self.ohem_thresh, self.ohem_min_kept = float(ohem_thresh), int(ohem_min_kept)
        self.boundary_weight, self.bas_weight, self.bas_threshold = float(boundary_weight), float(bas_weight), float(bas_threshold)
        self.edge_size, self.edge_pad = int(edge_size), int(edge_pad)
        if isinstance(class_weights, str):
            if class_weights != "cityscapes":
                raise ConfigValueError(f"model.class_weights={class_weights!r}: expected a list, cityscapes or null")
            class_weights = CITYSCAPES_CLASS_WEIGHTS
        if class_weights is not None and len(class_weights) != num_classes:
            raise ConfigValueError(f"model.class_weights has {len(class_weights)} values for {num_classes} classes")
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor([float(w) for w in class_weights]), persistent=False)

        planes, head_planes, ppm_planes = 32, 128, 96
        # I branch
        self.conv1 = nn.Sequential(nn.Conv2d(3, planes, 3, 2, 1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                                   nn.Conv2d(planes, planes, 3, 2, 1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True))
        self.layer1 = _make_layer(BasicBlock, planes, planes, 2)
        self.layer2 = _make_layer(BasicBlock, planes, planes * 2, 2, stride=2)
        self.layer3 = _make_layer(BasicBlock, planes * 2, planes * 4, 3, stride=2)
        self.layer4 = _make_layer(BasicBlock, planes * 4, planes * 8, 3, stride=2)
        self.layer5 = _make_layer(Bottleneck, planes * 8, planes * 8, 2, stride=2)
        # P branch
        self.compression3 = _conv_bn(planes * 4, planes * 2)
        self.compression4 = _conv_bn(planes * 8, planes * 2)
        self.pag3 = PagFM(planes * 2, planes)
        self.pag4 = PagFM(planes * 2, planes)
        self.layer3_ = _make_layer(BasicBlock, planes * 2, planes * 2, 2)
        self.layer4_ = _make_layer(BasicBlock, planes * 2, planes * 2, 2)
        self.layer5_ = _make_layer(Bottleneck, planes * 2, planes * 2, 1)
        # D branch
        self.layer3_d = _single_block(BasicBlock, planes * 2, planes)
        self.layer4_d = _make_layer(Bottleneck, planes, planes, 1)
        self.diff3 = _conv_bn(planes * 4, planes, 3)
        self.diff4 = _conv_bn(planes * 8, planes * 2, 3)
        self.spp = PAPPM(planes * 16, ppm_planes, planes * 4)
        self.dfm = LightBag(planes * 4, planes * 4)
        self.layer5_d = _make_layer(Bottleneck, planes * 2, planes * 2, 1)
        # heads
        # built only when supervised or adapted: an unused head breaks DDP (parameters without a gradient)
        self.seghead_p = SegmentHead(planes * 2, head_planes, num_classes) if set(aux_weights) | set(adaptation_levels) else None
        self.seghead_d = SegmentHead(planes * 2, planes, 1)
        self.final_layer = SegmentHead(planes * 4, head_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        #: what initialised the network (a file), None for a random initialisation
        self.pretrained_weights: str | None = None
        if pretrained:
            if pretrained is True or str(pretrained).lower() in ("true", "imagenet"):
                raise PretrainedWeightsError(
                    f"PIDNet has no weights registry: download the official ImageNet file {IMAGENET_FILE} "
                    f"({IMAGENET_URL}, or the Google Drive folder linked in github.com/XuJiacong/PIDNet's README) "
                    f"and pass model.pretrained=/path/to/{IMAGENET_FILE}")
            self.load_official(file_state_dict(pretrained), str(pretrained))
            self.pretrained_weights = str(pretrained)
        self.freeze_bn = bool(freeze_bn)
        if freeze_bn:
            freeze_batchnorm(self)

    # --- weights ------------------------------------------------------------------------------------------

    def load_official(self, state: dict, source: str) -> str:
        """Load an official file strictly: the ImageNet model's weights (returns ``"imagenet"``) or a whole
        segmentation network, FullModel ``model.``-prefixed or not (returns ``"full"``)."""
        if any(k.startswith("model.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith(CHECKPOINT_LOSSES)}
        tops = {k.split(".", 1)[0] for k in state}
        layout = "full" if tops & set(SEGMENTATION_ONLY) else "imagenet"
        own = self.state_dict()
        if layout == "full":
            expected = set(own)
            dropped = {k for k in state if k.startswith("seghead_p.") and self.seghead_p is None}
        else:
            expected = {k for k in own if k.split(".", 1)[0] in IMAGENET_PARTS}
            dropped = {k for k in state if k.split(".", 1)[0] in IMAGENET_CLASSIFIER}
        problems = key_mismatches(own, state, expected, dropped)
        if problems:
            what = "an official PIDNet-S checkpoint" if layout == "full" else f"the official ImageNet file {IMAGENET_FILE}"
            raise PretrainedWeightsError(
                f"{source} does not fit PIDNet-S as {what} (official names): {'; '.join(problems)}. "
                f"File keys e.g. {sorted(state)[:3]}; network keys e.g. {sorted(expected)[:3]}"
                + (f"; the file's classifier {list(IMAGENET_CLASSIFIER)} is dropped and {list(SEGMENTATION_ONLY)}"
                   f" stay initialised" if layout == "imagenet" else ""))
        self.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
        return layout

    def backbone_parameters(self):
        """The parameters the ImageNet file initialises (:data:`IMAGENET_PARTS`)."""
        return (p for name in IMAGENET_PARTS for p in getattr(self, name).parameters())

    # --- forward --------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        x = F.relu(self.layer1(self.conv1(x)))
        x = F.relu(self.layer2(x))
        p = self.layer3_(x)
        d = self.layer3_d(x)
        x = F.relu(self.layer3(x))
        p = self.pag3(p, self.compression3(x))
        eighth = p.shape[-2:]
        d = d + _up(self.diff3(x), eighth)
        p = F.relu(p)  # officially in place: seghead_p gets the ReLU'd P features
        p_head = p
        x = F.relu(self.layer4(x))
        p = self.pag4(self.layer4_(p), self.compression4(x))
        d = self.layer4_d(F.relu(d))
        d = F.relu(d + _up(self.diff4(x), eighth))  # likewise for seghead_d
        d_head = d
        p = self.layer5_(F.relu(p))
        d = self.layer5_d(d)
        i = _up(self.spp(self.layer5(x)), eighth)
        out = _up(self.final_layer(self.dfm(p, i, d)), size)
        if not self.training:
            return out
        heads = {}
        if set(self.aux_weights) | set(self.adaptation_levels):
            heads["p"] = _up(self.seghead_p(p_head), size)
        boundary = _up(self.seghead_d(d_head), size)
        return SegmentationOutputs(out, aux={k: heads[k] for k in self.aux_weights},
                                   levels={k: heads[k] for k in self.adaptation_levels},
                                   extra={"boundary": boundary})

    # --- losses ---------------------------------------------------------------------------------------------

    def loss_terms(self, outputs: SegmentationOutputs, label: torch.Tensor, weight: torch.Tensor | None = None,
                   ignore_index: int = 255) -> LossTerms:
        """``loss_seg`` (OHEM, 1), ``loss_aux/p`` (CE over all pixels, 0.4), ``loss_boundary`` (balanced BCE,
        20) and ``loss_bas`` (OHEM where sigmoid(boundary) > 0.8, 1); each per-pixel term times ``weight``."""
        size = label.shape[-2:]

        def fit(t: torch.Tensor) -> torch.Tensor:
            return t if t.shape[-2:] == size else _up(t, size)

        pixel_weight = weight
        if self.class_weights is not None:
            cw = self.class_weights.to(label.device)[label.masked_fill(label == ignore_index, 0)]
            pixel_weight = cw if weight is None else cw * weight
        out = fit(outputs.out)
        ohem = {"ignore_index": ignore_index, "thresh": self.ohem_thresh, "min_kept": self.ohem_min_kept}
        terms: LossTerms = {"loss_seg": (ohem_cross_entropy(out, label, pixel_weight, **ohem), 1.0)}
        # the official plain CE returns per-pixel losses that its loop averages over all pixels (ignored: 0)
        ce_weight = pixel_weight if pixel_weight is not None else out.new_ones((), dtype=torch.float32)
        for name, logits in outputs.aux.items():
            terms[f"loss_aux/{name}"] = (pixel_cross_entropy(fit(logits), label, ce_weight, ignore_index),
                                         float(self.aux_weights[name]))
        if "boundary" in outputs.extra:
            boundary = fit(outputs.extra["boundary"])[:, 0]
            target = boundary_target(label, self.edge_size, self.edge_pad)
            terms["loss_boundary"] = (weighted_bce(boundary, target, weight), self.boundary_weight)
            with torch.no_grad():
                bas_label = torch.where(torch.sigmoid(boundary.float()) > self.bas_threshold, label, ignore_index)
            terms["loss_bas"] = (ohem_cross_entropy(out, bas_label, pixel_weight, **ohem), self.bas_weight)
        return terms
