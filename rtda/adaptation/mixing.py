"""Batch-level image operations of the self-training methods, on the device: ClassMix masks and mixing
(DACS), colour jitter and Gaussian blur (DACS's strong augmentation), block masks (MIC)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: where ClassMix draws the classes it pastes from: each label's own classes (DACS) or the whole batch's (DAFormer/MIC)
CLASSMIX_POOLS = ("image", "batch")


def class_mix_masks(labels: torch.Tensor, generator: torch.Generator | None = None, pool: str = "image") -> torch.Tensor:
    """ClassMix masks of an ``N×H×W`` source label batch: ``N×H×W`` bool, True on the pixels of ``ceil(n/2)``
    classes drawn without replacement, for each image, among ``n`` distinct values (the ignore value included,
    as the authors' ``torch.unique``): those of the image's own label with ``pool="image"`` (DACS's
    ``trainUDA.py``: always half of the image's classes), those of the whole batch with ``pool="batch"``
    (DAFormer/MIC's ``get_class_masks``, which call ``torch.unique(labels)`` on the batch: an image may then paste
    none or all of its own classes)."""
    if pool not in CLASSMIX_POOLS:
        raise ValueError(f"ClassMix pool {pool!r}: expected one of {CLASSMIX_POOLS}")
    masks = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    batch_classes = torch.unique(labels) if pool == "batch" else None
    for i, label in enumerate(labels):
        classes = batch_classes if batch_classes is not None else torch.unique(label)
        n = classes.numel()
        chosen = classes[torch.randperm(n, generator=generator)[: (n + n % 2) // 2].to(classes.device)]
        masks[i] = torch.isin(label, chosen)
    return masks


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` where ``mask`` (N×H×W), ``target`` elsewhere; images (N×C×H×W) or label/weight maps (N×H×W)."""
    if source.ndim == 4:
        mask = mask[:, None]
    return torch.where(mask, source, target)


# -- DACS's strong augmentation (on the 0-255 images, on the device) --------------------------------------------
def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.unbind(dim=1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(dim=1)
    k = lambda n: (n + h * 6.0) % 6.0  # noqa: E731
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4.0 - k(n)), 0.0, 1.0)  # noqa: E731
    return torch.stack([f(5.0), f(3.0), f(1.0)], dim=1)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Colour jitter of ``N×3×H×W`` images in [0, 1], one factor of each kind per image: brightness
    ``+U(−s, s)``, contrast ``×U(1−s, 1+s)``, saturation ``×U(1−s, 1+s)`` (blend with the grey image), hue
    rotated by ``U(−s, s)`` of a turn; clipped to [0, 1] after each step."""
    n, dev = images.shape[0], images.device
    u = lambda: (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1).to(dev)  # noqa: E731 - U(-1, 1) per image
    s = float(strength)
    x = (images + s * u()).clamp(0, 1)
    x = (x * (1 + s * u())).clamp(0, 1)
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (grey + (x - grey) * (1 + s * u())).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.cat([(hsv[:, 0:1] + s * u()) % 1.0, hsv[:, 1:]], dim=1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def blur_kernel_size(side: int) -> int:
    """``trainUDA``'s kernel: ``floor(ceil(0.1·side) − 0.5 + ceil(0.1·side) % 2)``, an odd number ≈ 10 % of the side."""
    c = math.ceil(0.1 * side)
    return max(int(math.floor(c - 0.5 + c % 2)), 1)


def _gaussian_kernel1d(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """torchvision's 1-D Gaussian: ``exp(-x²/2σ²)`` on ``size`` points centred on 0, normalised to sum 1."""
    x = torch.linspace(-(size // 2), size // 2, size, dtype=torch.float32, device=like.device)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(like.dtype)


def gaussian_blur(images: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Each image of ``N×C×H×W`` blurred with its own σ (reflect padding), kernel from :func:`blur_kernel_size`.

    The same blur as torchvision's ``gaussian_blur`` (the authors' kornia/torchvision 2-D kernel, the outer product
    of two 1-D ones), run as two 1-D passes: reflect padding acts on each axis on its own, so the result is equal
    up to float rounding, at ``kx + ky`` instead of ``kx · ky`` multiply-adds a pixel (~10x faster at 512x1024,
    where the kernel is 51x103)."""
    ky, kx = blur_kernel_size(images.shape[-2]), blur_kernel_size(images.shape[-1])
    c, out = images.shape[1], []
    for i, s in enumerate(sigma):
        x = images[i:i + 1]
        gx = _gaussian_kernel1d(kx, float(s), x).view(1, 1, 1, kx).expand(c, 1, 1, kx)
        gy = _gaussian_kernel1d(ky, float(s), x).view(1, 1, ky, 1).expand(c, 1, ky, 1)
        x = F.conv2d(F.pad(x, [kx // 2, kx // 2, 0, 0], mode="reflect"), gx, groups=c)
        out.append(F.conv2d(F.pad(x, [0, 0, ky // 2, ky // 2], mode="reflect"), gy, groups=c))
    return torch.cat(out)


def strong_augment(images: torch.Tensor, jitter_strength: float = 0.25, jitter_p: float = 0.2, blur: bool = True,
                   generator: torch.Generator | None = None, blur_sigma: str = "image") -> torch.Tensor:
    """DACS's strong augmentation of ``N×3×H×W`` 0–255 images (float result, 0–255): colour jitter when a
    draw u ~ U(0, 1) exceeds ``jitter_p``, Gaussian blur when another exceeds 0.5 — one draw of each per call
    (per iteration), as the authors' ``strong_parameters`` — with σ ~ U(0.15, 1.15) drawn per image
    (``blur_sigma="image"``: DACS and DAFormer transform the mixed images one by one) or once for the batch
    (``"batch"``: MIC's masked branch transforms the target batch in one call)."""
    x = images.float() / 255.0
    if jitter_strength > 0 and float(torch.rand(1, generator=generator)) > jitter_p:
        x = color_jitter(x, jitter_strength, generator)
    if blur and float(torch.rand(1, generator=generator)) > 0.5:
        draws = x.shape[0] if blur_sigma == "image" else 1
        sigma = (0.15 + torch.rand(draws, generator=generator)).expand(x.shape[0])
        x = gaussian_blur(x, sigma.tolist())
    return x * 255.0


# -- MIC ----------------------------------------------------------------------------------------------------------
def block_mask(shape: Sequence[int], block_size: int, ratio: float, device=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """MIC's ``BlockMaskGenerator``: an ``N×1×H×W`` float mask, 0 on masked blocks. A grid of
    ``round(H/b) × round(W/b)`` blocks, each kept when u ~ U(0, 1) exceeds ``ratio``, resized (nearest) to H×W."""
    n, _, h, w = shape
    grid = torch.rand(n, 1, max(round(h / block_size), 1), max(round(w / block_size), 1), generator=generator)
    return F.interpolate((grid > ratio).float(), size=(h, w), mode="nearest").to(device)
