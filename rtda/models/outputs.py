"""Named outputs of a segmentation network, so that losses and methods never guess from tuple positions.

In evaluation mode every rtda network returns one tensor: the logits at the input size. In training
mode it may return :class:`SegmentationOutputs`:

* ``out``: the main logits (what evaluation scores);
* ``aux``: deep-supervision heads by name (BiSeNet's ``context16``/``context32``, DeepLabV2's ``layer3``),
  each weighted in the segmentation loss by the network's ``aux_weights[name]``;
* ``levels``: extra output spaces an adaptation method may align besides ``out``, by name (DeepLabV2's
  ``layer3`` classifier in AdaptSegNet/ADVENT multi-level; BiSeNet's auxiliary heads, on request). The
  network lists their names up front in ``adaptation_levels`` so a method can build one discriminator
  per level before the first forward pass.

* ``extra``: other training outputs the network's own losses read (PIDNet's boundary head, STDC's detail
  head), by name; methods leave them alone.

A logits tensor may belong to both ``aux`` and ``levels`` (DeepLabV2's layer3 head is both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SegmentationOutputs:
    out: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    levels: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def level_logits(self) -> dict[str, torch.Tensor]:
        """Every adaptation level, the main output first under the name ``"out"``."""
        return {"out": self.out, **self.levels}


def as_outputs(result) -> SegmentationOutputs:
    """A network's forward result as :class:`SegmentationOutputs` (a plain tensor has no aux, no levels)."""
    if isinstance(result, SegmentationOutputs):
        return result
    if isinstance(result, torch.Tensor):
        return SegmentationOutputs(result)
    raise TypeError(f"a segmentation network must return a Tensor or SegmentationOutputs, not {type(result).__name__}")


def main_logits(result) -> torch.Tensor:
    """The main logits of any forward result (evaluation-mode tensor or training-mode outputs)."""
    return as_outputs(result).out


def adaptation_levels(net: nn.Module) -> tuple[str, ...]:
    """Names of the output spaces a method adapts: ``"out"`` then the network's extra levels."""
    return ("out", *getattr(net, "adaptation_levels", ()))
