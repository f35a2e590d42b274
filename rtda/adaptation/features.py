"""Feature distance to a frozen ImageNet copy (DAFormer's thing-class regularisation): the layer tap,
the thing-class mask at the feature resolution, the masked distance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtda.data.labels import IGNORE_INDEX
from rtda.run.errors import ConfigValueError

#: DAFormer's ``imnet_feature_dist_classes``: traffic light, traffic sign, person, rider, car, truck, bus,
#: train, motorcycle, bicycle (train ids 6, 7, 11-18)
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


# -- DAFormer's ImageNet feature distance --------------------------------------------------------------------------
def downscale_label_ratio(label: torch.Tensor, size: Sequence[int], min_ratio: float, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """DAFormer's ``downscale_label_ratio``: an ``N×H×W`` label pooled to ``size``; each cell takes its majority
    class when that class covers at least ``min_ratio`` of the cell, else ``ignore_index``. (Adaptive pooling:
    the same as DAFormer's ``avg_pool2d(kernel=scale)`` when the sides divide.)"""
    lab = label.clone().long()
    lab[lab == ignore_index] = num_classes
    onehot = F.one_hot(lab, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.adaptive_avg_pool2d(onehot, tuple(size)).max(dim=1)
    out[out == num_classes] = ignore_index
    out[ratio < min_ratio] = ignore_index
    return out


def masked_feature_distance(student: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the (masked) feature pixels of ``||f_s − f_ref||_2`` across channels; 0 when the mask is empty
    (DAFormer's mean of nothing would be NaN)."""
    dist = torch.norm(student.float() - reference.float(), dim=1, p=2)
    if mask is not None:
        dist = dist[mask]
    return dist.mean() if dist.numel() else student.sum() * 0.0


class _StopForward(Exception):
    pass


class FeatureTap:
    """Captures the output of one named submodule of a network during its forward pass; with
    ``stop=True`` the forward ends right there (the frozen reference needs its backbone only)."""

    def __init__(self, net: nn.Module, name: str, stop: bool = False):
        modules = dict(net.named_modules())
        if name not in modules:
            raise ConfigValueError(f"adaptation.fdist_layer={name!r}: {type(net).__name__} has no such submodule")
        self.features: torch.Tensor | None = None
        self.stop = stop
        self.handle = modules[name].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.features = output
        if self.stop:
            raise _StopForward

    def run(self, net: nn.Module, image: torch.Tensor) -> torch.Tensor:
        try:
            net(image)
        except _StopForward:
            pass
        return self.features


def default_feature_layer(net: nn.Module) -> str:
    """The network's own ``feature_layer`` (the submodule whose output is its last backbone stage, e.g. the MiT
    encoder's last stage for DAFormer's feature distance), else the last submodule named ``layer4`` (the ResNet
    backbones of BiSeNet and DeepLabV2)."""
    declared = getattr(net, "feature_layer", None)
    if declared:
        return declared
    names = [n for n, _ in net.named_modules() if n.split(".")[-1] == "layer4"]
    if not names:
        raise ConfigValueError(f"adaptation.fdist_layer: {type(net).__name__} has no 'layer4' and no feature_layer; "
                               "name the feature module")
    return names[-1]
