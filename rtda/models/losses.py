"""The losses a network trains with, whatever method trains it.

A network's supervised loss is a set of named **terms**, each a (value, coefficient) pair: the total is
``Σ coefficient · value`` and each value is logged as ``train/<name>``. By default the terms are
cross-entropy on the main output (``loss_seg``, 1) and on each deep-supervision head (``loss_aux/<head>``,
``net.aux_weights[head]``). A network that trains with more (PIDNet's OHEM, boundary and boundary-aware
losses, STDC's detail loss) defines ``loss_terms(outputs, label, weight=None, ignore_index=255)`` returning
its own terms; every method calls :func:`loss_terms`, so adversarial, FDA or DACS training of such a network
still applies its losses. ``weight`` is an optional per-pixel weight (DACS's pseudo-label confidence on a
mixed batch): each term multiplies its per-pixel losses by it, ``mean(loss · w)`` over all pixels, as DACS's
``CrossEntropyLoss2dPixelWiseWeighted``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.data.labels import IGNORE_INDEX
from rtda.models.outputs import SegmentationOutputs, as_outputs
from rtda.run.errors import ConfigValueError

#: name -> (value, coefficient)
LossTerms = dict[str, tuple[torch.Tensor, float]]


def pixel_cross_entropy(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels; with ``weight`` (N×H×W or broadcastable),
    ``mean(CE · w)`` over all pixels, ignored ones counting 0 (DACS)."""
    if weight is None:
        return F.cross_entropy(logits, label, ignore_index=ignore_index)
    ce = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none")
    return (ce * weight).mean()


def ohem_cross_entropy(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX, thresh: float = 0.9, min_kept: int = 131072) -> torch.Tensor:
    """Online hard example mining cross-entropy (HRNet's ``OhemCrossEntropy``, used by PIDNet and DDRNet):
    of the labelled pixels, those whose probability of the true class is below ``max(thresh, p_k)`` are
    averaged, ``p_k`` the ``min_kept``-th smallest such probability (so at least ``min_kept`` pixels are
    kept). The official code keeps ``min_kept`` (131072) per GPU replica (6 of the 12 1024×1024 crops under
    DataParallel); here per batch of the process. A small crop keeps all its pixels below the threshold. With ``weight`` the kept pixels' losses are weighted, averaged over
    the kept pixels."""
    losses = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none").flatten()
    valid = label.flatten() != ignore_index
    if not bool(valid.any()):
        return losses.sum() * 0.0  # nothing labelled: no gradient, the graph kept (fp32: no fp16 overflow)
    with torch.no_grad():
        true_prob = logits.detach().float().softmax(dim=1).gather(
            1, label.masked_fill(label == ignore_index, 0).unsqueeze(1))
        true_prob = true_prob.flatten()[valid]
        kth = true_prob.kthvalue(min(max(1, min_kept), true_prob.numel() - 1) + 1).values  # the sorted[min_kept]
        kept = true_prob < torch.clamp(kth, min=thresh)
    losses = losses[valid]
    if weight is not None:
        losses = losses * torch.broadcast_to(weight, label.shape).flatten()[valid]
    if not bool(kept.any()):  # every pixel already confident beyond the threshold
        return losses.sum() * 0.0
    return losses[kept].mean()


def default_loss_terms(net: nn.Module, outputs: SegmentationOutputs, label: torch.Tensor,
                       weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> LossTerms:
    """Cross-entropy on the main output (1) and on each auxiliary head (``net.aux_weights[head]``)."""
    weights = getattr(net, "aux_weights", {})
    terms: LossTerms = {"loss_seg": (pixel_cross_entropy(outputs.out, label, weight, ignore_index), 1.0)}
    for name, logits in outputs.aux.items():
        if name not in weights:
            raise ConfigValueError(f"{type(net).__name__} returned auxiliary head {name!r} but no aux_weights[{name!r}]")
        terms[f"loss_aux/{name}"] = (pixel_cross_entropy(logits, label, weight, ignore_index), float(weights[name]))
    return terms


def loss_terms(net: nn.Module, outputs, label: torch.Tensor, weight: torch.Tensor | None = None,
               ignore_index: int = IGNORE_INDEX) -> LossTerms:
    """The network's own ``loss_terms`` when it has them, else :func:`default_loss_terms`."""
    outputs = as_outputs(outputs)
    own = getattr(net, "loss_terms", None)
    if own is not None:
        return own(outputs, label, weight=weight, ignore_index=ignore_index)
    return default_loss_terms(net, outputs, label, weight, ignore_index)


def total_loss(terms: LossTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ coefficient · value`` and the values by name (what a method logs)."""
    total = None
    for value, coefficient in terms.values():
        part = coefficient * value if coefficient != 1.0 else value
        total = part if total is None else total + part
    return total, {name: value for name, (value, _) in terms.items()}
