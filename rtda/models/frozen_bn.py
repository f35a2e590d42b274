"""BatchNorm with frozen statistics and affine parameters, that no SyncBatchNorm conversion can thaw.

DeepLabV2 is trained with its BatchNorm frozen (batch size 1 in the official code). Keeping
``nn.BatchNorm2d`` layers in eval mode is not enough: ``trainer=ddp`` (``sync_batchnorm: true``) runs
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which replaces every ``_BatchNorm`` with a
``SyncBatchNorm`` that the next ``.train()`` puts back in training mode, so statistics start moving.
:class:`FrozenBatchNorm2d` is not a ``_BatchNorm``: conversion skips it, and it always normalises with
its stored statistics, in training and evaluation mode alike.

Unlike ``torchvision.ops.FrozenBatchNorm2d`` the affine terms stay ``nn.Parameter`` s (with
``requires_grad=False``) and ``num_batches_tracked`` is kept, so parameter counts and state-dict keys are
those of ``nn.BatchNorm2d`` (the official 43.9 M of DeepLabV2; earlier checkpoints load unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before num_batches_tracked existed (the official DeepLab init) load all the same
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batchnorm(module: nn.Module) -> None:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a :class:`FrozenBatchNorm2d` holding its statistics and
    affine terms (the same state-dict keys): a network's ``freeze_bn=true``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
