"""TENT: fully test-time adaptation by entropy minimisation (Wang, Shelhamer, Liu, Olshausen, Darrell, ICLR 2021).

As ``tent.py`` and ``conf.py`` / ``cfgs/tent.yaml`` of github.com/DequanWang/tent:

* ``configure_model``: gradients off everywhere, then on for the normalisation layers' affine parameters only
  (``collect_params``: ``weight`` = scale, ``bias`` = shift of every BatchNorm2d); BatchNorm normalises with the
  test batch's statistics (``track_running_stats = False``), never the running ones;
* ``forward_and_adapt``: one forward, ``loss = softmax_entropy(outputs).mean(0)`` (here the mean over the batch
  and the pixels: the segmentation analogue), backward, ``optimizer.step()``; the prediction returned is that
  same forward's (made before the update);
* the optimizer: ``OPTIM.METHOD: Adam``, ``LR: 1e-3``, ``BETA: 0.9`` (β₂ 0.999), ``WD: 0``, ``STEPS: 1``,
  ``MODEL.EPISODIC: False`` (the repository's defaults and its CIFAR-10-C config). The paper's ImageNet runs use
  SGD with momentum 0.9 at lr 0.00025 for batch 64; its segmentation experiment (GTA→Cityscapes, Sec. 4.3) is
  not in the repository. We take the repository's Adam 1e-3 (configurable: ``adapt.lr``, ``adapt.optimizer=sgd``).

Where we differ, on purpose: (1) LayerNorm and GroupNorm affine parameters are adapted too (``norm_types``), as the
paper suggests for other normalisations, so transformer segmenters (SegFormer) adapt; (2) the rest of the network
stays in evaluation mode (tent calls ``model.train()``, which would also switch dropout on: none of tent's
CIFAR/ImageNet networks has active dropout, our SegFormer heads do); (3) the running statistics stay in the state
dict (unused) instead of being set to ``None``, so that a reset restores the exact source state; (4) a BatchNorm
fed one value per channel uses its running statistics (:func:`rtda.adaptation.online.use_batch_statistics`).
"""

from __future__ import annotations

import torch
from torch import nn

from rtda.adaptation.online import (
    OnlineAdapter,
    logits_at,
    norm_affine_parameters,
    softmax_entropy,
    use_batch_statistics,
)
from rtda.run.errors import ConfigValueError


def build_optimizer(params, optimizer: str, lr: float, betas=(0.9, 0.999), momentum: float = 0.9,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """tent's ``setup_optimizer``: Adam(lr, betas=(BETA, 0.999), wd) or SGD(lr, momentum, dampening 0, nesterov)."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=0.0, weight_decay=weight_decay,
                               nesterov=momentum > 0)
    raise ConfigValueError(f"adapt.optimizer={optimizer!r}: expected adam or sgd")


class Tent(OnlineAdapter):
    """``adapt=tent`` (see the module docstring)."""

    name = "tent"

    def __init__(self, net: nn.Module, optimizer: str = "adam", lr: float = 1e-3, betas=(0.9, 0.999),
                 momentum: float = 0.9, weight_decay: float = 0.0, steps: int = 1, episodic: bool = False,
                 norm_types=("batch", "layer", "group")):
        if steps < 1:
            raise ConfigValueError(f"adapt.steps={steps}: tent requires >= 1 step(s) to forward and update")
        if lr <= 0:
            raise ConfigValueError(f"adapt.lr={lr}: expected a learning rate > 0 (tent: 1e-3)")
        self.optimizer_name, self.lr, self.betas, self.momentum = optimizer, float(lr), tuple(betas), float(momentum)
        self.weight_decay, self.steps, self.episodic, self.norm_types = float(weight_decay), int(steps), bool(episodic), tuple(norm_types)
        super().__init__(net)

    def configure(self) -> None:
        super().configure()
        use_batch_statistics(self.net, update_running=False)
        self.params = [p for _, p in norm_affine_parameters(self.net, self.norm_types)]
        if not self.params:
            raise ConfigValueError(f"adapt=tent: the network has no {'/'.join(self.norm_types)} normalisation "
                                   "layer with affine parameters to adapt (adapt.norm_types)")
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = build_optimizer(self.params, self.optimizer_name, self.lr, self.betas, self.momentum,
                                         self.weight_decay)

    def parameters_adapted(self) -> list[nn.Parameter]:
        return self.params

    @torch.enable_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.episodic:
            self.reset()
        for _ in range(self.steps):
            logits = logits_at(self.net, x)
            loss = softmax_entropy(logits).mean()
            if not torch.isfinite(loss):  # no step on a non-finite loss: the collapse guard resets
                return logits.detach().softmax(1), {"updated": False, "loss": float(loss), "skipped": "non-finite"}
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
        return logits.detach().softmax(1), {"updated": True, "loss": float(loss.detach()), "skipped": None}
