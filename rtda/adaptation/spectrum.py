"""The Fourier-domain operations of FDA (Yang & Soatto, CVPR 2020): the low-frequency amplitude swap, and the
source batch brought to the target batch's size before it (FDA swaps spectra of equal sizes)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rtda.run.errors import ConfigValueError


def fda_window(height: int, width: int, beta: float) -> int:
    """``b = floor(min(H, W)·β)``: the side of the low-frequency window whose amplitude is swapped."""
    return int(np.floor(min(height, width) * beta))


def fda_source_to_target(src: torch.Tensor, trg: torch.Tensor, beta: float) -> torch.Tensor:
    """Source images with the target images' low-frequency amplitude: batched ``N×C×H×W``, 0–255 scale.

    Amplitude of rows ``[0:b]`` and ``[H−b:H]`` of the one-sided spectrum's columns ``[0:b]`` from ``trg``,
    everything else (all phases, the other amplitudes) from ``src``; computed in float32 whatever the input
    type (an FFT is not safe in half precision). Pairs are matched by batch index; shapes must be equal.
    """
    if src.shape != trg.shape or src.ndim != 4:
        raise ValueError(f"fda_source_to_target needs two N×C×H×W batches of one shape, got {tuple(src.shape)} "
                         f"and {tuple(trg.shape)}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigValueError(f"FDA beta={beta}: expected a fraction in [0, 1] (the authors use 0.01, 0.05, 0.09)")
    height, width = src.shape[-2:]
    b = fda_window(height, width, beta)
    with torch.autocast(device_type=src.device.type, enabled=False):
        spectrum = torch.fft.rfft2(src.float().contiguous())
        fft_trg = torch.fft.rfft2(trg.float().contiguous())
        columns = min(b, spectrum.shape[-1])
        for rows in (slice(0, b), slice(height - b, height)):  # only the window changes: target amplitude, source phase
            window = spectrum[..., rows, :columns]
            spectrum[..., rows, :columns] = torch.polar(fft_trg[..., rows, :columns].abs(), window.angle())
        return torch.fft.irfft2(spectrum, s=(height, width))


def match_size(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A source batch brought to the target batch's size: a random crop of each sample where it is at least
    that large in both sides (the authors' random 1024×512 crop of the 1280×720 GTA5 image), otherwise
    resized (bilinear image, nearest label)."""
    height, width = size
    if tuple(image.shape[-2:]) == (height, width):
        return image, label
    if image.shape[-2] >= height and image.shape[-1] >= width:
        tops = torch.randint(0, image.shape[-2] - height + 1, (image.shape[0],)).tolist()
        lefts = torch.randint(0, image.shape[-1] - width + 1, (image.shape[0],)).tolist()
        image = torch.stack([im[:, t:t + height, x:x + width] for im, t, x in zip(image, tops, lefts)])
        label = torch.stack([lb[t:t + height, x:x + width] for lb, t, x in zip(label, tops, lefts)])
        return image, label
    resized = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)
    image = resized.round().clamp(0, 255).to(image.dtype) if not image.is_floating_point() else resized
    label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].to(label.dtype)
    return image, label
