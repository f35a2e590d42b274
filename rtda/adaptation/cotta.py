"""CoTTA: continual test-time domain adaptation (Wang, Fink, Van Gool, Dai, CVPR 2022).

Three parts, as ``cifar/cotta.py`` of github.com/qinenergy/cotta (``CoTTA.forward_and_adapt``) and its
Cityscapes→ACDC segmentation release (SegFormer on mmseg, linked from the repository's README, not in the git tree):

* **a mean teacher**: the teacher is an EMA of the student, ``update_ema_variables``: ``θ' ← α θ' + (1 − α) θ``
  over the parameters (not the buffers) after every step, ``α = 0.999`` (``OPTIM.MT: 0.999``);
* **augmentation-averaged pseudo-labels**: the teacher predicts the frame at several scales and flipped; in the
  segmentation release, the scales of SegFormer's multi-scale test (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0) × flip,
  14 passes, their softmax averaged. Per pixel, where the *anchor* (the frozen source model) is confident — its
  maximum probability at scale 1 above ``confidence`` (0.69 in the segmentation release) — the teacher's plain
  scale-1 prediction is kept, elsewhere the augmentation average (the CIFAR code makes this choice per batch on the
  anchor's mean confidence, ``AP: 0.92``, with 32 random augmentations). The student learns the resulting hard
  pseudo-label by cross-entropy on the scale-1 frame; the prediction reported is the pseudo-label's;
* **stochastic restoration**: after each step every element of every trainable ``weight``/``bias`` goes back to
  its source value with probability ``p = 0.01`` (``OPTIM.RST: 0.01``).

The student updates every parameter (``configure_model``: all ``requires_grad``; BatchNorm on batch statistics).
Optimizer: Adam, betas (0.9, 0.999), lr 6e-5 / 8 (the segmentation release scales SegFormer's 6e-5 down by 8 for
batch-1 online updates; the CIFAR configs use 1e-3). The segmentation release's values are quoted from its code as
published with the paper; that archive is not on GitHub and could not be re-read here.

Where we differ: the networks are rtda's (BiSeNet, SegFormer, …); ``scales`` can be shortened (each scale is a
forward pass of the teacher: the paper's 14 passes per frame are far from real time on a CPU); BatchNorm layers fed
one value per channel use their running statistics (:func:`rtda.adaptation.online.use_batch_statistics`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from rtda.adaptation.online import OnlineAdapter, logits_at, probabilities, use_batch_statistics
from rtda.adaptation.tent import build_optimizer
from rtda.run.errors import ConfigValueError

SEGFORMER_TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


@torch.no_grad()
def update_ema_variables(ema_model: nn.Module, model: nn.Module, alpha: float) -> None:
    """CoTTA's ``update_ema_variables``: the parameters only (buffers stay the teacher's)."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.data.mul_(alpha).add_(param.data, alpha=1.0 - alpha)


@torch.no_grad()
def stochastic_restore(model: nn.Module, source_state: dict, p: float, generator: torch.Generator | None = None) -> int:
    """Each element of each trainable ``weight``/``bias`` back to ``source_state``'s with probability ``p``;
    returns the number of elements restored."""
    restored = 0
    for nm, m in model.named_modules():
        for npp, param in m.named_parameters(recurse=False):
            if npp in ("weight", "bias") and param.requires_grad:
                key = f"{nm}.{npp}" if nm else npp
                mask = torch.rand(param.shape, generator=generator, device="cpu").lt(p).to(param.device)
                source = source_state[key].to(param.device, param.dtype)
                param.data.copy_(torch.where(mask, source, param.data))
                restored += int(mask.sum())
    return restored


@torch.no_grad()
def augmentation_average(net: nn.Module, x: torch.Tensor, scales=SEGFORMER_TTA_SCALES, flip: bool = True) -> torch.Tensor:
    """Mean softmax of ``net`` over ``scales`` × (flip), each brought back to ``x``'s size (mmseg's aug_test)."""
    size = tuple(x.shape[-2:])
    total, n = None, 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=float(s), mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            inp = xs.flip(-1) if flipped else xs
            probs = probabilities(net, inp)
            if flipped:
                probs = probs.flip(-1)
            if tuple(probs.shape[-2:]) != size:
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            n += 1
    return total / n


class CoTTA(OnlineAdapter):
    """``adapt=cotta`` (see the module docstring)."""

    name = "cotta"

    def __init__(self, net: nn.Module, lr: float = 6e-5 / 8, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 ema_alpha: float = 0.999, restore_p: float = 0.01, confidence: float = 0.69,
                 scales=SEGFORMER_TTA_SCALES, flip: bool = True, seed: int = 0):
        if not 0.0 <= ema_alpha <= 1.0 or not 0.0 <= restore_p <= 1.0 or not 0.0 <= confidence <= 1.0:
            raise ConfigValueError(f"adapt: expected ema_alpha, restore_p and confidence in [0, 1]; got {ema_alpha}, "
                                   f"{restore_p}, {confidence} (CoTTA: 0.999, 0.01, 0.69)")
        if not scales or any(float(s) <= 0 for s in scales):
            raise ConfigValueError(f"adapt.scales={list(scales)}: expected positive scale factors (CoTTA: {list(SEGFORMER_TTA_SCALES)})")
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.ema_alpha, self.restore_p, self.confidence = float(ema_alpha), float(restore_p), float(confidence)
        self.scales, self.flip = tuple(float(s) for s in scales), bool(flip)
        self.generator = torch.Generator().manual_seed(int(seed))
        super().__init__(net)

    def configure(self) -> None:
        super().configure()
        use_batch_statistics(self.net, update_running=False)
        self.net.requires_grad_(True)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, "adam", self.lr, self.betas, weight_decay=self.weight_decay)
        self.teacher = copy.deepcopy(self.net).requires_grad_(False)
        self.anchor = copy.deepcopy(self.net).requires_grad_(False)

    def parameters_adapted(self) -> list[nn.Parameter]:
        return self.params

    @torch.no_grad()
    def pseudo_label(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the teacher's probabilities, anchor-confident pixels from its scale-1 pass and the rest from the
        augmentation average; their argmax, the pseudo-label)."""
        anchor_conf = probabilities(self.anchor, x).max(dim=1, keepdim=True).values
        plain = probabilities(self.teacher, x)
        averaged = augmentation_average(self.teacher, x, self.scales, self.flip)
        probs = torch.where(anchor_conf > self.confidence, plain, averaged)
        return probs, probs.argmax(dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.pseudo_label(x)[0]

    @torch.enable_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        probs, target = self.pseudo_label(x)
        loss = F.cross_entropy(logits_at(self.net, x), target)
        if not torch.isfinite(loss):
            return probs, {"updated": False, "loss": float(loss), "skipped": "non-finite"}
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema_variables(self.teacher, self.net, self.ema_alpha)
        if self.restore_p > 0:
            stochastic_restore(self.net, self.source_state, self.restore_p, self.generator)
        self.updates += 1
        return probs, {"updated": True, "loss": float(loss.detach()), "skipped": None}
