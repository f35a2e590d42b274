"""The input normalisation every network expects, applied on the device after the batch transfer.

Kept apart from :mod:`rtda.data.transforms` so that inference, benchmarking and the method core never import
albumentations (the GPU machines and a user's deployment need not have it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: the statistics the torchvision ImageNet backbones were trained with (RGB, 0-1 scale)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``N×3×H×W`` (or ``3×H×W``) images on the 0–255 scale (uint8 or float) -> float32 ``(x / 255 - mean) / std``,
    on the images' device, in their memory format."""
    shape = (3, 1, 1) if image.ndim == 3 else (1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=image.device).view(shape) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=image.device).view(shape) * 255.0
    return (image.float() - mean_t) / std_t
