"""Colourised predictions and side-by-side panels (image | ground truth | prediction)."""

from __future__ import annotations

import numpy as np
import torch

from rtda.data.labels import TRAIN_ID_PALETTE


def colorize(train_ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """HxW train ids -> HxWx3 uint8 in the Cityscapes colours (ignore = black)."""
    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    return TRAIN_ID_PALETTE[np.asarray(train_ids).clip(0, 255).astype(np.uint8)]


def denormalize(image: torch.Tensor) -> np.ndarray:
    """3xHxW ImageNet-normalised tensor (or a uint8 one, as the data loaders deliver) -> HxWx3 uint8."""
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).cpu().numpy()
    from rtda.data.normalization import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    rgb = (image.float() * std + mean).clamp(0, 1).mul(255).byte()
    return rgb.permute(1, 2, 0).cpu().numpy()


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """3xHxW image on the 0-255 scale (uint8 or float, e.g. FDA's unclipped output) -> HxWx3 uint8."""
    return image.detach().float().clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image * (1 - alpha) + colorize(train_ids) * alpha).astype(np.uint8)


def _fit(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if a.shape[:2] == shape:
        return a
    rows = np.linspace(0, a.shape[0] - 1, shape[0]).round().astype(int)
    cols = np.linspace(0, a.shape[1] - 1, shape[1]).round().astype(int)
    return a[rows][:, cols]


def prediction_panel(image: torch.Tensor, label: torch.Tensor | None, pred: torch.Tensor) -> np.ndarray:
    """One row: input image | ground truth | prediction, all at the prediction's resolution."""
    pred_rgb = colorize(pred)
    shape = pred_rgb.shape[:2]
    parts = [_fit(denormalize(image), shape)]
    if label is not None:
        parts.append(_fit(colorize(label), shape))
    parts.append(pred_rgb)
    return np.concatenate(parts, axis=1)


def save_rgb(rgb: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgb)).save(path)


def plot_confusion_matrix(confmat: torch.Tensor, class_names, path) -> None:
    """Row-normalised confusion matrix (rows: ground truth) as a PNG, with per-class recall on the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confmat.double()
    norm = (cm / cm.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.45 * n + 2, 0.45 * n + 1.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    for i in range(n):
        if cm[i].sum() > 0:
            ax.text(i, i, f"{100 * norm[i, i]:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if norm[i, i] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
