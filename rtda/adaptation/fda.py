"""FDA (Yang & Soatto, CVPR 2020): Fourier domain adaptation — a source image in a target image's style by
swapping the low-frequency amplitude spectrum, a robust entropy penalty on the target, and self-training on
the pseudo-labels of a multi-band ensemble.

**The spectrum swap** (:func:`fda_source_to_target`) is the function of the authors' *training* code
(``utils.FDA_source_to_target``), not their numpy demo (``FDA_source_to_target_np``, a centred
(2b+1)×(2b+1) window of the shifted spectrum: another transform). With ``b = floor(min(H, W)·β)`` the
authors take each channel's full 2-D spectrum, replace the source amplitude by the target's in the four b×b
corners of the *unshifted* spectrum — row and column frequencies 0…b−1 and −b…−1 — keep the source phase,
and invert with ``torch.irfft(onesided=False)``, which reads only the first W//2+1 columns (it assumes a
Hermitian spectrum), so the two right-hand corners never reach the image. The same transform with the
modern API: ``rfft2`` (columns 0…W//2) → target amplitude in rows ``[0:b]`` and ``[H−b:H]`` of columns
``[0:b]`` → ``irfft2(s=(H, W))`` (tested against the full-spectrum steps). One pair is neither source nor
target: column 0 of a real image's spectrum is Hermitian, its row H−b is in the window but the conjugate
partner row b is not, and both inverses keep their average. β = 0.01 on 512×1024 is b = 5: the mean colour and the slowest
illumination gradients. Images are on the 0–255 scale and not clipped afterwards (as the authors train);
normalisation follows, on the device.

**Training** (``train.py``): each iteration stylises the source batch with the target batch — both the
target's training size: the authors resize GTA5 to 1280×720 and random-crop 1024×512, the Cityscapes size —
cross-entropy on the stylised source, plus ``λ_ent · Charbonnier entropy`` of the target predictions once
``switch_to_entropy`` iterations have passed (λ_ent 0.005, η 2.0; the script's default switch is 50,000 of a
150,000-iteration schedule stopped at 100,000; its README runs ``--switch2entropy=0``). The authors pass the
target batch through the network (in training mode: BatchNorm sees it) every iteration; before the switch
its loss is multiplied by zero, so here that pass runs without a graph: same statistics, no wasted backward.

**Self-training** (``SStrain.py``, :class:`FDASelfTrainingModule`): a fresh network trained on the stylised
source plus the pseudo-labelled target (written by ``rtda-eval ckpt_path=[β=0.01, 0.05, 0.09 runs]
pseudo_labels.out=…``, :mod:`rtda.adaptation.pseudo_labels`): CE on both plus ``λ_ent`` × the robust entropy
of the pseudo-labelled images, from the first iteration — ``SStrain.py`` keeps that term
(``loss_seg_src + loss_seg_psu + entW·loss_ent_psu``); ``adaptation.lambda_ent=0`` drops it. Where the
authors draw the style images and the pseudo-labelled images from two target loaders, one target batch
serves both here (both are random target training images).
"""

from __future__ import annotations

import numpy as np
import torch

from rtda.adaptation.entropy import charbonnier_entropy
from rtda.adaptation.segmentation import SegmentationModule
from rtda.adaptation.spectrum import fda_source_to_target, match_size
from rtda.data.render import to_rgb
from rtda.models.outputs import main_logits
from rtda.run.errors import ConfigValueError

__all__ = ["FDAModule", "FDASelfTrainingModule", "charbonnier_entropy", "fda_source_to_target"]  # the last two: contract names


class FDAModule(SegmentationModule):
    """FDA with one β: CE on source images in the target's style + the target's robust entropy.

    Args:
        beta: size of the swapped low-frequency window as a fraction of the shorter side (0.01, 0.05 or 0.09
            in the paper; one network per β, ensembled by ``rtda-eval ckpt_path=[…]``).
        lambda_ent: weight of :func:`charbonnier_entropy` on the target (0.005).
        eta: the robust-entropy exponent η (2.0).
        switch_to_entropy: the entropy term joins after this many iterations (the authors' ``i >
            switch2entropy``, 0-based: 50,000 of their 150,000).
        num_style_samples: source | target | stylised rows saved to ``<run>/fda_samples.png`` at the first
            iteration (and W&B when it logs), 0 for none.
    """

    uses_target_images = True
    picture_options = (*SegmentationModule.picture_options, "num_style_samples")

    def __init__(self, *args, beta: float = 0.01, lambda_ent: float = 0.005, eta: float = 2.0,
                 switch_to_entropy: int = 50000, num_style_samples: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= beta <= 1.0:
            raise ConfigValueError(f"adaptation.beta={beta}: expected a fraction in [0, 1] (the authors use 0.01, 0.05, 0.09)")

    def transform_training_batch(self, batch: dict) -> dict:
        """The source batch at the target batch's size, in the target batch's style (0–255, on the device)."""
        source, target = dict(batch["source"]), batch["target"]
        raw = source["image"]
        image, label = match_size(raw, source["label"], tuple(target["image"].shape[-2:]))
        source["image"] = fda_source_to_target(image, target["image"], self.hparams.beta)
        source["label"] = label
        first_batch = self._trainer is not None and self.trainer.training and self.iteration == 0  # counted after transfer
        if self.hparams.num_style_samples and first_batch:
            self.save_style_samples(image, target["image"], source["image"])
        return {**batch, "source": source}

    def entropy_on(self) -> bool:
        return self.iteration - 1 > self.hparams.switch_to_entropy  # iteration counts from 1, the authors' i from 0

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        source, target = batch["source"], batch["target"]
        loss_seg, parts = self.segmentation_loss(self.net(source["image"]), source["label"])
        losses = {"loss": loss_seg, **parts}
        if self.entropy_on() and self.hparams.lambda_ent > 0:
            loss_ent = charbonnier_entropy(main_logits(self.forward_target(target["image"])), self.hparams.eta)
            losses["loss_ent_trg"] = loss_ent
            losses["loss"] = loss_seg + self.hparams.lambda_ent * loss_ent
        else:
            with torch.no_grad():  # the authors' target pass before the switch: BatchNorm statistics only
                self.forward_target(target["image"])
        return losses

    def save_style_samples(self, source: torch.Tensor, target: torch.Tensor, stylised: torch.Tensor) -> None:
        """``source | target style | stylised`` rows as ``<run>/fda_samples.png`` (and W&B), for the notebooks."""
        n = min(self.hparams.num_style_samples, source.shape[0])
        rows = [np.concatenate([to_rgb(source[i]), to_rgb(target[i]), to_rgb(stylised[i])], axis=1) for i in range(n)]
        self.save_training_samples("fda_samples", rows,
                                   f"source | target | source in the target's style (beta={self.hparams.beta})")

class FDASelfTrainingModule(FDAModule):
    """FDA's self-training round (``SStrain.py``): stylised source + pseudo-labelled target, CE on both,
    plus ``lambda_ent`` × the robust entropy of the target from the first iteration (the script's terms).

    The target dataset must carry labels: ``data.target.label_root=<folder written by rtda-eval
    pseudo_labels.out=…>``."""

    uses_target_labels = True

    def __init__(self, *args, switch_to_entropy: int = -1, **kwargs):
        super().__init__(*args, switch_to_entropy=switch_to_entropy, **kwargs)

    _NO_LABELS = ("adaptation=fda_ssl trains on pseudo-labels of the target: set data.target.label_root=<the "
                  "folder written by rtda-eval ckpt_path=[…] pseudo_labels.out=…>")

    def on_fit_start(self) -> None:
        """Stop before the first iteration when the target set carries no labels."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "dataset"):
            if getattr(datamodule.dataset("target"), "label_paths", ()) is None:
                raise ConfigValueError(self._NO_LABELS)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        source, target = batch["source"], batch["target"]
        if "label" not in target:
            raise ConfigValueError(self._NO_LABELS)
        loss_src, parts = self.segmentation_loss(self.net(source["image"]), source["label"])
        trg_out = self.forward_target(target["image"])
        loss_trg, trg_parts = self.segmentation_loss(trg_out, target["label"])
        losses = {"loss": loss_src + loss_trg, **parts, **{f"{k}_trg": v for k, v in trg_parts.items()}}
        if self.entropy_on() and self.hparams.lambda_ent > 0:
            losses["loss_ent_trg"] = charbonnier_entropy(main_logits(trg_out), self.hparams.eta)
            losses["loss"] = losses["loss"] + self.hparams.lambda_ent * losses["loss_ent_trg"]
        return losses
