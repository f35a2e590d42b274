"""Pseudo-labels of the target domain: the rules self-training methods share, and the command that writes them.

:func:`fda_pseudo_labels` is FDA's rule (``getSudoLabel_multi.py``): each pixel takes the argmax of the
ensemble's softmax; per class, over *all* images, the threshold is the confidence found at position
``round(0.66·n)`` of that class's ascending-sorted confidences (pixels predicted as the class), capped at
0.9; a pixel below its class's threshold becomes 255 (ignored). ``round`` is numpy's (half to even), as
the script's ``np.round``; where that position is ``n`` (a class with one pixel) the script fails with an
IndexError, and here the largest confidence is taken. An absent class has threshold 0 (nothing to reject).

Thresholds over a whole split must not hold every softmax in memory (Cityscapes train: 2,975 maps of
19×512×1024 floats, 117 GB). :class:`StreamingThresholds` finds the *exact* same per-class order statistic
in two passes over the predictions, with memory independent of the split's size: pass 1 counts every
class's confidences in a histogram keyed by the top 16 bits of their float32 representation (for positive
floats that order is the numbers' order, so the bin holding the wanted rank is known exactly); pass 2 keeps
only the confidences in that one bin per class (a few in a thousand), sorts them and reads the rank. Both
passes must see the same predictions: the labeller runs the network in evaluation mode with deterministic
kernels.
:func:`write_pseudo_label_tree` runs the network twice and writes each label in pass 2, holding back only the
pixels of those bins until the thresholds are known.

The tree it writes is a Cityscapes label tree (``OUT/gtFine/{split}/CITY/CITY_…_gtFine_labelTrainIds.png``,
at each image's own resolution: the labels are computed at the network's input size, as the authors do,
and upsampled nearest) that the Cityscapes reader reads with ``label_root=OUT`` — images are not copied.
"""

from __future__ import annotations

import numpy as np
import torch

from rtda.data.labels import IGNORE_INDEX
from rtda.run.errors import ConfigValueError

_BINS = 1 << 16  # histogram bins per class: the top 16 bits of a float32


def quantile_position(count: int, quantile: float) -> int:
    """``np.round(count · quantile)`` (half to even), kept inside the sorted array."""
    return min(int(np.round(count * quantile)), count - 1)


def class_thresholds(confidence: torch.Tensor, label: torch.Tensor, num_classes: int, quantile: float = 0.66,
                     cap: float = 0.9) -> torch.Tensor:
    """Per-class thresholds (float64, length C) of FDA's rule for in-memory confidence/argmax maps."""
    thresholds = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        values = confidence[label == c]
        if values.numel():
            thresholds[c] = float(values.sort().values[quantile_position(values.numel(), quantile)])
    return thresholds.clamp(max=cap)


def apply_thresholds(confidence: torch.Tensor, label: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``label`` with every pixel whose confidence is below its class's threshold set to 255."""
    label = label.clone()
    per_pixel = thresholds.to(confidence.device, torch.float64)[label.clamp(max=len(thresholds) - 1)]
    label[confidence.double() < per_pixel] = IGNORE_INDEX
    return label


def fda_pseudo_labels(probs: torch.Tensor, quantile: float = 0.66, cap: float = 0.9) -> torch.Tensor:
    """FDA's pseudo-labels of an in-memory ``N×C×H×W`` softmax: ``N×H×W`` long, 255 = rejected."""
    confidence, label = probs.max(dim=1)
    thresholds = class_thresholds(confidence, label, probs.shape[1], quantile, cap)
    return apply_thresholds(confidence, label, thresholds).long()


def _high_bits(confidence: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each (positive) float32: a monotone key (bigger value, bigger or equal key)."""
    return confidence.float().contiguous().view(torch.int32) >> 16


class StreamingThresholds:
    """Exactly :func:`class_thresholds` over a stream of maps, in two passes and bounded memory.

        st = StreamingThresholds(19)
        for conf, label in predictions(): st.count(conf, label)      # pass 1
        st.locate()
        for conf, label in predictions(): st.collect(conf, label)    # pass 2
        thresholds = st.thresholds()
    """

    def __init__(self, num_classes: int, quantile: float = 0.66, cap: float = 0.9):
        if not 0.0 <= quantile <= 1.0:
            raise ConfigValueError(f"pseudo-label quantile={quantile}: expected a fraction in [0, 1] (FDA: 0.66)")
        self.num_classes, self.quantile, self.cap = num_classes, quantile, cap
        self.histogram = torch.zeros(num_classes * _BINS, dtype=torch.int64)
        self.bin: list[int | None] = []  # per class: the histogram bin holding the wanted rank (None: not needed)
        self.rank_in_bin: list[int] = []
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]

    def count(self, confidence: torch.Tensor, label: torch.Tensor) -> None:
        """Pass 1: add maps (any shape; confidence in (0, 1]) to the per-class histograms."""
        keys = label.long().flatten() * _BINS + _high_bits(confidence).long().flatten()
        self.histogram += torch.bincount(keys.cpu(), minlength=self.num_classes * _BINS)

    @property
    def counts(self) -> torch.Tensor:
        return self.histogram.view(self.num_classes, _BINS).sum(dim=1)

    def locate(self) -> None:
        """Between the passes: for each class, the bin and the rank inside it of the wanted order statistic.
        A bin whose every value is at least ``cap`` needs no second look (the threshold is the cap)."""
        hist = self.histogram.view(self.num_classes, _BINS)
        self.bin, self.rank_in_bin = [], []
        for c in range(self.num_classes):
            n = int(hist[c].sum())
            if n == 0:
                self.bin.append(None)
                self.rank_in_bin.append(0)
                continue
            k = quantile_position(n, self.quantile)
            cumulative = hist[c].cumsum(0)
            b = int(torch.searchsorted(cumulative, torch.tensor(k), right=True))
            lowest = torch.tensor([b << 16], dtype=torch.int32).view(torch.float32).item()
            self.bin.append(None if lowest >= self.cap else b)
            self.rank_in_bin.append(k - (int(cumulative[b - 1]) if b > 0 else 0))

    def undecided(self, confidence: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Pixels whose confidence lies in their class's located bin: only the exact threshold decides them."""
        bins = torch.tensor([-1 if b is None else b for b in self.bin], device=label.device)
        return _high_bits(confidence) == bins[label.long()]

    def collect(self, confidence: torch.Tensor, label: torch.Tensor, undecided: torch.Tensor | None = None) -> None:
        """Pass 2: keep the confidences of the located bins."""
        undecided = self.undecided(confidence, label) if undecided is None else undecided
        values, classes = confidence[undecided].float().cpu(), label[undecided].long().cpu()
        for c in classes.unique().tolist():
            self.values[c].append(values[classes == c])

    def thresholds(self) -> torch.Tensor:
        out = torch.zeros(self.num_classes, dtype=torch.float64)
        for c, b in enumerate(self.bin):
            if self.counts[c] == 0:
                continue
            if b is None:
                out[c] = self.cap
                continue
            values = torch.cat(self.values[c]).sort().values if self.values[c] else torch.empty(0)
            if values.numel() == 0:  # pass 2 saw other predictions than pass 1 (a non-deterministic kernel)
                out[c] = torch.tensor([b << 16], dtype=torch.int32).view(torch.float32).item()
                continue
            out[c] = float(values[min(self.rank_in_bin[c], values.numel() - 1)])
        return out.clamp(max=self.cap)

    def decided(self, confidence: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Pass 2 labels: pixels below their class's bin rejected (255), above it kept; the undecided ones
        keep their class until :meth:`thresholds` settles them."""
        bins = torch.tensor([_BINS if b is None else b for b in self.bin], device=label.device)
        below = _high_bits(confidence) < bins[label.long()]
        # a class whose threshold is the cap: compare with the cap itself
        capped = torch.tensor([b is None for b in self.bin], device=label.device)[label.long()]
        below = torch.where(capped, confidence.double() < self.cap, below)
        out = label.clone()
        out[below] = IGNORE_INDEX
        return out


# -- self-training with a teacher (DACS, DAFormer, MIC) -------------------------------------------------------
#: DACS's confidence threshold (``trainUDA.py``: ``max_probs.ge(0.968)``), kept by DAFormer and MIC
DACS_THRESHOLD = 0.968
WEIGHTINGS = ("share", "pixel", "none")


def dacs_pseudo_labels(probs: torch.Tensor, threshold: float = DACS_THRESHOLD,
                       weighting: str = "share") -> tuple[torch.Tensor, torch.Tensor]:
    """DACS's pseudo-labels of a teacher's ``N×C×H×W`` softmax: ``(labels N×H×W long, weights N×H×W float)``.

    Every pixel takes the argmax class (none is rejected); the weights say how much each pixel's loss counts:

    * ``share`` (DACS's ``pixel_weight: threshold_uniform``, the default of the authors' config, and DAFormer's
      rule): one number for the whole batch, the share of its pixels whose top probability is at least
      ``threshold`` — a confident teacher weighs its pseudo-labels fully, an unsure one (early in training)
      barely;
    * ``pixel`` (DACS's ``threshold``): 1 where the top probability is at least ``threshold``, else 0;
    * ``none`` (DACS's ``pixel_weight: false``): 1 everywhere.
    """
    if weighting not in WEIGHTINGS:
        raise ConfigValueError(f"adaptation.weighting={weighting!r}: expected one of {list(WEIGHTINGS)}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigValueError(f"adaptation.pseudo_threshold={threshold}: expected a probability in [0, 1] (DACS: 0.968)")
    confidence, labels = probs.detach().max(dim=1)
    confident = confidence.ge(threshold)
    if weighting == "share":
        weights = confident.float().mean().expand_as(confidence).clone()
    elif weighting == "pixel":
        weights = confident.float()
    else:
        weights = torch.ones_like(confidence, dtype=torch.float32)
    return labels.long(), weights
