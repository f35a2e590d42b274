"""The adversarial losses: the output-space discriminator's (AdaptSegNet, AdvEnt: BCE, or LS-GAN) and
CycleGAN's least-squares loss, with the domain labels of the official code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtda.run.errors import ConfigValueError

SOURCE_LABEL = 0.0


TARGET_LABEL = 1.0


def gan_loss(logits: torch.Tensor, label: float, gan: str = "vanilla") -> torch.Tensor:
    """The GAN objective on discriminator logits against a constant domain label (0 source, 1 target)."""
    target = torch.full_like(logits, label)
    if gan == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    if gan == "ls":
        return F.mse_loss(logits, target)
    raise ConfigValueError(f"adaptation.gan={gan!r}: expected vanilla or ls")


def ls_gan_loss(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """LS-GAN (Mao et al., 2017), the authors' ``gan_mode='lsgan'``: mean squared error of the raw scores to 1
    (real) or 0 (fake)."""
    return F.mse_loss(scores, torch.full_like(scores, 1.0 if real else 0.0))
