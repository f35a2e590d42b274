"""CycleGAN's networks (Zhu et al., ICCV 2017), the authors' architecture (``models/networks.py`` of
junyanz/pytorch-CycleGAN-and-pix2pix) with their defaults: ``--norm instance --init_type normal --init_gain 0.02
--no_dropout``.

- :class:`ResnetGenerator`: ``c7s1-ngf, d2·ngf, d4·ngf, n_blocks × R4·ngf, u2·ngf, u·ngf, c7s1-3`` + tanh —
  reflection padding (3 around the 7×7 convolutions, 1 inside each residual block), two stride-2 3×3
  convolutions down, two transposed 3×3 convolutions (``output_padding=1``) up, instance norm after every
  convolution but the last, ReLU. **n_blocks**: the authors use 9 residual blocks for 256×256 and larger
  training images (``resnet_9blocks``, their default) and 6 for 128×128 ones (``resnet_6blocks``); rtda
  takes it from the config (``adaptation.n_blocks``), 9 by default, 6 in the demo experiments, whose
  training crops are 64×128.
- :class:`PatchDiscriminator`: the 70×70 PatchGAN (``NLayerDiscriminator``, ``n_layers=3``): 4×4
  convolutions ``C64 (no norm) - C128 - C256`` with stride 2, ``C512`` with stride 1, then a 1-channel 4×4
  convolution (stride 1), LeakyReLU 0.2; each output scores one 70×70 input patch (a 256×256 image gives
  30×30 scores). Raw scores: the LS-GAN loss takes them as they are (no sigmoid).
- Instance norm as in the authors' current code: ``affine=False, track_running_stats=False`` (the image's
  own statistics in training and inference alike; no parameters, no buffers). Since instance norm has no
  shift, the convolutions before it keep their bias (``use_bias`` is true for instance norm).
- :func:`init_weights`: every convolution's weight ~ N(0, 0.02), biases 0 (``init_type='normal'``).

Parameter counts (3 → 3 channels, ngf = ndf = 64): generator 11,378,179 with 9 blocks, 7,837,699 with 6;
PatchGAN 2,764,737 — the authors' networks built from their definition (``tests/test_cyclegan.py``).

Input sizes: with two stride-2 convolutions down and two ×2 transposed convolutions up the generator returns
its input's size when both sides are multiples of 4; :func:`translate_image` reflect-pads any other size up
to one and crops the result back (GTA5's 1914×1052 → 1916×1052 → 1914×1052).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    """``x + [reflect-pad 1, conv 3×3, IN, ReLU, reflect-pad 1, conv 3×3, IN](x)`` (no dropout: the authors'
    CycleGAN default ``--no_dropout``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), instance_norm(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), instance_norm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """Images in [-1, 1] → images in [-1, 1] of the same size (sides multiples of 4).

    Args:
        in_channels, out_channels: 3 and 3 for RGB → RGB.
        ngf: width of the first convolution (64); the residual blocks run at 4·ngf, at 1/4 of the resolution.
        n_blocks: residual blocks (9: the authors' ``resnet_9blocks``; 6: ``resnet_6blocks`` for ≤128 px crops).
        init_gain: standard deviation of the N(0, σ) weight initialisation (0.02).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9,
                 init_gain: float = 0.02):
        super().__init__()
        if n_blocks < 0 or ngf < 1:
            raise ValueError(f"ResnetGenerator: n_blocks={n_blocks}, ngf={ngf}: expected n_blocks >= 0 and ngf >= 1")
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=True), instance_norm(ngf),
                                   nn.ReLU(True)]
        for mult in (1, 2):  # two stride-2 downsamplings: ngf → 2·ngf → 4·ngf
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True),
                       instance_norm(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):  # two ×2 transposed convolutions: 4·ngf → 2·ngf → ngf
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
                       instance_norm(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_weights(self, init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """The PatchGAN: one raw realness score per (70×70 with ``n_layers=3``) input patch.

    Args:
        in_channels: 3 for RGB images.
        ndf: width of the first convolution (64); doubled per layer, at most 8·ndf.
        n_layers: stride-2 layers (3: the 70×70 PatchGAN, the authors' ``--netD basic``).
        init_gain: as for :class:`ResnetGenerator`.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, init_gain: float = 0.02):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last widening convolution keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=True), instance_norm(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)
        init_weights(self, init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> None:
    """The authors' ``init_type='normal'``: convolution (and transposed convolution) weights ~ N(0, gain),
    biases 0. Instance norm without affine parameters has nothing to initialise."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """0–255 images (uint8 or float) → float32 in [-1, 1], the generators' input (the authors' Normalize(0.5, 0.5))."""
    return image.float() / 127.5 - 1.0


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → uint8 0–255 (rounded, clipped): how the authors save a generated image."""
    return ((image.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def translate_image(generator: nn.Module, image: torch.Tensor, multiple: int = 4) -> torch.Tensor:
    """``N×3×H×W`` 0–255 images → the generator's translations, uint8, same size: inputs are reflect-padded on
    the bottom/right to sides that are multiples of ``multiple`` (the generator's total stride) and the
    output is cropped back."""
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    x = to_unit_range(image)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return to_uint8(generator(x)[..., :height, :width])
