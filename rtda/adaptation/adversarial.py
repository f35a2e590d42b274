"""AdaptSegNet (Tsai et al., CVPR 2018): adversarial alignment of the segmentation *output space*.

A fully-convolutional discriminator D (:class:`rtda.models.discriminator.FCDiscriminator`) learns to tell
the softmax maps of source images from those of target images; the segmenter learns to fool it on the
target. Per iteration, as in the official ``train_gta2cityscapes_multi.py``:

(a) segmenter, D frozen: ``L_seg(source) + sum_l lambda_l * GAN(D_l(softmax(P_l(target))), source)``
    (cross-entropy on the source with the network's deep-supervision heads, then the adversarial loss of
    each adapted level l against the *source* label, one backward pass each as in the official code);
(b) each D_l on detached maps: ``GAN(D_l(softmax(P_l(source))), source) / 2 + GAN(D_l(softmax(P_l(target))), target) / 2``.

Labels: source 0, target 1. ``gan``: ``vanilla`` (binary cross-entropy on logits) or ``ls`` (LS-GAN:
mean squared error on the raw logits, the official ``--gan LS``). The authors' defaults: D Adam lr 1e-4,
betas (0.9, 0.99), poly decay over the same iterations as the segmenter (power 0.9); single level
lambda_adv 0.001; multi-level (a network exposing ``adaptation_levels``: DeepLabV2 ``multi_level=true``)
lambda_adv 0.001 on the main output and 0.0002 on each extra level, with the layer3 head also supervised
at 0.1 (the network's ``aux_weights``), one discriminator per level.

Differences on purpose: the segmenter and the discriminators step one after the other in the same
iteration (the official code steps all after both phases; the discriminators' phase uses outputs
computed before the segmenter's step either way, so the updates are identical); logits reach the
discriminator at the network's output size, which in rtda is the input size (the official code upsamples
with ``align_corners=True`` first, the same resolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.adaptation.gan_losses import SOURCE_LABEL, TARGET_LABEL, gan_loss
from rtda.adaptation.segmentation import SegmentationModule
from rtda.models.discriminator import FCDiscriminator
from rtda.models.outputs import adaptation_levels, as_outputs
from rtda.run.errors import ConfigValueError


class AdversarialModule(SegmentationModule):
    """Output-space adversarial adaptation (AdaptSegNet), single- or multi-level.

    Args:
        lambda_adv: weight of the adversarial loss on the main output.
        lambda_adv_levels: weight on each extra adaptation level of the network (multi-level).
        gan: ``vanilla`` | ``ls``.
        d_lr, d_betas: the discriminators' Adam (poly-decayed like the segmenter).
        ndf: width of the discriminators' first convolution.
        Other arguments: :class:`SegmentationModule`.
    """

    uses_target_images = True
    learning_rate_options = ("d_lr",)
    # phase (a) leaves D without gradients and phase (b) the segmenter: DDP must not wait for them
    strategy_options = {"find_unused_parameters": True}

    def __init__(self, net: nn.Module, optimizer=None, lambda_adv: float = 0.001, lambda_adv_levels: float = 0.0002,
                 gan: str = "vanilla", d_lr: float = 1e-4, d_betas: tuple[float, float] = (0.9, 0.99), ndf: int = 64,
                 **kwargs):
        if gan not in ("vanilla", "ls"):
            raise ConfigValueError(f"adaptation.gan={gan!r}: expected vanilla or ls")
        super().__init__(net, optimizer, **kwargs)
        self.automatic_optimization = False

    def configure_models(self) -> None:
        """One discriminator per adapted level, in the order of ``adaptation_levels(net)``."""
        self.discriminators = nn.ModuleDict({
            level: FCDiscriminator(self.hparams.num_classes, ndf=self.hparams.ndf) for level in adaptation_levels(self.net)
        })
        if self.hparams.channels_last:
            self.discriminators.to(memory_format=torch.channels_last)

    def configure_extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(d.parameters(), lr=self.hparams.d_lr, betas=tuple(self.hparams.d_betas))
                for d in self.discriminators.values()]

    def level_weight(self, level: str) -> float:
        return self.hparams.lambda_adv if level == "out" else self.hparams.lambda_adv_levels

    def discriminator_input(self, logits: torch.Tensor) -> torch.Tensor:
        """What D sees of a prediction: AdaptSegNet aligns the softmax maps."""
        return F.softmax(logits, dim=1)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        source, target = batch["source"], batch["target"]
        opt_seg, *opt_ds = self.optimizers()
        for opt in (opt_seg, *opt_ds):
            opt.zero_grad()
        gan = self.hparams.gan

        # (a) the segmenter: supervised on the source, fooling every D on the target; D gets no gradient
        with self.toggled_optimizer(opt_seg):
            src = as_outputs(self.net(source["image"]))
            loss_seg, parts = self.segmentation_loss(src, source["label"])
            self.manual_backward(loss_seg)
            trg = as_outputs(self.forward_target(target["image"]))
            for level, logits in trg.level_logits().items():
                parts[f"loss_adv/{level}"] = gan_loss(self.discriminators[level](self.discriminator_input(logits)),
                                                      SOURCE_LABEL, gan)
            loss_adv = sum(self.level_weight(level) * parts[f"loss_adv/{level}"] for level in self.discriminators)
            self.manual_backward(loss_adv)
        self.step_optimizer(opt_seg)

        # (b) each discriminator on detached maps: source labelled 0, target 1, each loss halved
        src_levels, trg_levels = src.level_logits(), trg.level_logits()
        for (level, disc), opt in zip(self.discriminators.items(), opt_ds):
            with self.toggled_optimizer(opt):
                d_src = gan_loss(disc(self.discriminator_input(src_levels[level].detach())), SOURCE_LABEL, gan) / 2
                self.manual_backward(d_src)
                d_trg = gan_loss(disc(self.discriminator_input(trg_levels[level].detach())), TARGET_LABEL, gan) / 2
                self.manual_backward(d_trg)
            self.step_optimizer(opt)
            parts[f"loss_d/{level}"] = d_src + d_trg

        losses = {k: v.detach() for k, v in parts.items()}
        losses["loss"] = (loss_seg + loss_adv).detach()
        return losses
