"""Entropies of the class probabilities, minimised on the target by MinEnt/AdvEnt (Vu et al., CVPR 2019)
and FDA (its Charbonnier-penalised variant)."""

from __future__ import annotations

import math

import torch


def charbonnier_entropy(logits: torch.Tensor, eta: float = 2.0) -> torch.Tensor:
    """FDA's robust entropy: ``ent = −Σ_c p·log p / ln C`` per pixel, ``mean((ent² + 1e-8)^η)``.

    On the logits as given (their resolution); η > 0.5 down-weights the uncertain pixels' share relative to
    plain entropy. The authors divide by 2.9444 (ln 19, written out); ln C here."""
    logits = logits.float()
    num_classes = logits.shape[1]
    ent = -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1) / math.log(num_classes)
    return ((ent ** 2 + 1e-8) ** eta).mean()


def self_information(prob: torch.Tensor) -> torch.Tensor:
    """Weighted self-information ``-p * log2(p + 1e-30) / log2(C)`` of an N x C x H x W probability map."""
    return -prob * torch.log2(prob + 1e-30) / math.log2(prob.shape[1])


def entropy_loss(prob: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of an N x C x H x W probability map, averaged over its N*H*W pixels (a scalar)."""
    n, _, h, w = prob.shape
    return self_information(prob).sum() / (n * h * w)
