"""ADVENT (Vu et al., CVPR 2019): entropy minimisation on the target, directly (MinEnt) or adversarially (AdvEnt).

With ``P`` the softmax map over ``C`` classes, the *weighted self-information* map is
``I = -P * log2(P + 1e-30) / log2(C)`` (N x C x H x W, each pixel's channels sum to its entropy
normalised to [0, 1]) and the entropy loss is its sum over classes averaged over the N*H*W pixels —
``prob_2_entropy`` and ``entropy_loss`` of the official code.

* MinEnt: ``L_seg(source) + sum_l lambda_l * entropy_loss(P_l(target))`` (lambda 0.001 on the main
  output, 0.0002 on each extra level), one optimizer. rtda backpropagates the sum once; the official
  code calls backward on the two terms in turn — the same gradients.
* AdvEnt: AdaptSegNet's training (:mod:`rtda.adaptation.adversarial`) with the discriminators fed the
  self-information maps ``I`` instead of the softmax maps (lambda_adv 0.001 main, 0.0002 extra levels,
  D Adam 1e-4, betas (0.9, 0.99), poly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtda.adaptation.adversarial import AdversarialModule
from rtda.adaptation.entropy import entropy_loss, self_information
from rtda.adaptation.segmentation import SegmentationModule
from rtda.models.outputs import as_outputs

__all__ = ["AdvEntModule", "MinEntModule", "entropy_loss", "self_information"]  # the last two: contract names


class MinEntModule(SegmentationModule):
    """Direct entropy minimisation on the target (ADVENT's MinEnt).

    Args:
        lambda_ent: weight of the target entropy of the main output.
        lambda_ent_levels: weight on each extra adaptation level of the network (multi-level).
    """

    uses_target_images = True

    def __init__(self, net, optimizer=None, lambda_ent: float = 0.001, lambda_ent_levels: float = 0.0002, **kwargs):
        super().__init__(net, optimizer, **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        source, target = batch["source"], batch["target"]
        loss_seg, parts = self.segmentation_loss(self.net(source["image"]), source["label"])
        trg = as_outputs(self.forward_target(target["image"]))
        loss = loss_seg
        for level, logits in trg.level_logits().items():
            parts[f"loss_ent/{level}"] = entropy_loss(F.softmax(logits.float(), dim=1))
            weight = self.hparams.lambda_ent if level == "out" else self.hparams.lambda_ent_levels
            loss = loss + weight * parts[f"loss_ent/{level}"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


class AdvEntModule(AdversarialModule):
    """Adversarial entropy minimisation (ADVENT's AdvEnt): D sees weighted self-information maps."""

    def discriminator_input(self, logits: torch.Tensor) -> torch.Tensor:
        return self_information(F.softmax(logits.float(), dim=1))
