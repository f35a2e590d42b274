"""The fully-convolutional discriminator of AdaptSegNet (Tsai et al., CVPR 2018), also used by ADVENT.

Five 4x4 convolutions with stride 2 and padding 1 (C -> 64 -> 128 -> 256 -> 512 -> 1), LeakyReLU 0.2
between them, no normalisation, PyTorch's default initialisation, as ``FCDiscriminator`` in the official
code. It returns one logit per cell of a 1/32-resolution grid (no sigmoid: the GAN loss takes logits),
a patch-level "source or target?" decision on the class-probability (AdaptSegNet) or weighted
self-information (ADVENT) maps. 2,781,121 parameters for 19 classes.
"""

from __future__ import annotations

import torch
from torch import nn


class FCDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 19, ndf: int = 64, negative_slope: float = 0.2):
        super().__init__()
        widths = [in_channels, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(negative_slope, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
