"""Segmentation metrics from a confusion matrix accumulated on the device and summed across processes.

Follows the Cityscapes benchmark (``cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py``):
IoU_c = TP / (TP + FP + FN) over all pixels of the split (not averaged per image), pixels whose ground
truth is ``ignore_index`` do not count, a class absent from both ground truth and prediction has IoU NaN
and is left out of the mean.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class SegmentationMetrics(Metric):
    """``update(preds, target)`` with preds as logits/probabilities (N, C, H, W) or labels (N, H, W).

    ``compute()`` returns ``{"mIoU": float, "IoU": (C,) tensor, "acc": float, "mAcc": float,
    "confmat": (C, C) tensor}`` (rows = ground truth, columns = prediction).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} differs from target shape {tuple(target.shape)}")
        target = target.reshape(-1).long()
        preds = preds.reshape(-1).long()
        valid = target != self.ignore_index
        index = target[valid] * self.num_classes + preds[valid]
        counts = torch.bincount(index, minlength=self.num_classes**2)  # its length also flags bad targets
        if counts.numel() != self.num_classes**2:
            raise ValueError(f"target holds values outside 0..{self.num_classes - 1} and {self.ignore_index}")
        self.confmat += counts.reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict:
        cm = self.confmat.double()
        tp = cm.diag()
        gt = cm.sum(dim=1)
        pred = cm.sum(dim=0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        recall = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = cm.sum()
        return {
            "mIoU": float(torch.nanmean(iou)) if bool((union > 0).any()) else float("nan"),
            "IoU": iou.float(),
            "acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mAcc": float(torch.nanmean(recall)) if bool((gt > 0).any()) else float("nan"),
            "confmat": self.confmat.clone(),
        }


def subset_miou(iou: torch.Tensor, class_names, subset) -> float:
    """The mean of the per-class IoU over the classes named in ``subset`` (NaN classes left out, as in
    :meth:`SegmentationMetrics.compute`): the benchmark's mIoU16 / mIoU13, not a 19/16 rescaling of mIoU19."""
    names = list(class_names)
    missing = [n for n in subset if n not in names]
    if missing:
        raise ValueError(f"classes {missing} are not among the network's classes {names}")
    values = torch.as_tensor(iou, dtype=torch.float64)[[names.index(n) for n in subset]]
    return float(torch.nanmean(values)) if bool((~values.isnan()).any()) else float("nan")


def subset_scores(iou: torch.Tensor, class_names, headline, reported=()) -> dict:
    """``{"mIoU": mean over headline, "mIoU<n>": mean over each reported subset of n classes}``."""
    out = {"mIoU": subset_miou(iou, class_names, headline)}
    for subset in reported:
        out[f"mIoU{len(subset)}"] = subset_miou(iou, class_names, subset)
    return out
