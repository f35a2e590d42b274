"""Numpy rendering of images and labels: Cityscapes colours, overlays, panels, resizing. Shared by training
(the samples a run saves), evaluation (predictions written as PNGs) and the figures of :mod:`rtda.analysis`."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from rtda.data.labels import TRAIN_ID_PALETTE
from rtda.data.normalization import IMAGENET_MEAN, IMAGENET_STD


def colorize(train_ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """HxW train ids -> HxWx3 uint8 in the Cityscapes colours (ignore = black)."""
    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    return TRAIN_ID_PALETTE[np.asarray(train_ids).clip(0, 255).astype(np.uint8)]


def denormalize(image: torch.Tensor) -> np.ndarray:
    """3xHxW ImageNet-normalised tensor (or a uint8 one, as the data loaders deliver) -> HxWx3 uint8."""
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).cpu().numpy()
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    rgb = (image.float() * std + mean).clamp(0, 1).mul(255).byte()
    return rgb.permute(1, 2, 0).cpu().numpy()


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """3xHxW image on the 0-255 scale (uint8 or float, e.g. FDA's unclipped output) -> HxWx3 uint8."""
    return image.detach().float().clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image * (1 - alpha) + colorize(train_ids) * alpha).astype(np.uint8)


def fit_to(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``a`` (HxW or HxWx3) at ``shape`` by nearest-neighbour sampling (labels stay labels)."""
    if a.shape[:2] == shape:
        return a
    rows = np.linspace(0, a.shape[0] - 1, shape[0]).round().astype(int)
    cols = np.linspace(0, a.shape[1] - 1, shape[1]).round().astype(int)
    return a[rows][:, cols]


def prediction_panel(image: torch.Tensor, label: torch.Tensor | None, pred: torch.Tensor) -> np.ndarray:
    """One row: input image | ground truth | prediction, all at the prediction's resolution."""
    pred_rgb = colorize(pred)
    shape = pred_rgb.shape[:2]
    parts = [fit_to(denormalize(image), shape)]
    if label is not None:
        parts.append(fit_to(colorize(label), shape))
    parts.append(pred_rgb)
    return np.concatenate(parts, axis=1)


def save_rgb(rgb: np.ndarray, path) -> None:
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H×W×3 uint8 → ``size`` (H, W), bilinear as the training transform resizes (albumentations' ``Resize``:
    OpenCV ``INTER_LINEAR``), so a copy translated at the training size holds what training would have seen."""
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def spread_index(k: int, n: int, length: int) -> int:
    """The k-th of n indices spread evenly over a dataset of ``length`` samples."""
    return int(round(k * (length - 1) / max(n - 1, 1))) if n > 1 else 0
