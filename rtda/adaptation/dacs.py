"""DACS (Tranheden et al., WACV 2021): self-training with a mean teacher and cross-domain ClassMix; with the
options of DAFormer (Hoyer et al., CVPR 2022: ImageNet feature distance; rare-class sampling and LR warm-up
are data and optimizer options of every method) and MIC (Hoyer et al., CVPR 2023: masked image consistency).

**One iteration** (the authors' ``trainUDA.py`` / DAFormer's ``mmseg/models/uda/dacs.py``):

1. the EMA teacher is updated from the student (:func:`ema_update`);
2. cross-entropy of the student on the source batch (its deep-supervision heads as in every rtda method);
3. the teacher labels the target batch (:func:`rtda.adaptation.pseudo_labels.dacs_pseudo_labels`: argmax,
   weighted by the share of pixels whose top probability is at least 0.968);
4. ClassMix (:func:`class_mix_masks`): for each pair, half of the classes present in the *source* label —
   ``ceil(n/2)`` of its ``n`` distinct values, the ignore value 255 included as in the authors' code — are
   pasted with their pixels onto the target image; the mixed label is the source label there and the
   pseudo-label elsewhere, the pixel weight 1 there and the pseudo-label weight elsewhere;
5. DACS's strong augmentation of the mixed images (:func:`strong_augment`): colour jitter (strength 0.25,
   applied when a per-iteration draw u ~ U(0, 1) exceeds 0.2) and Gaussian blur (when another u > 0.5;
   σ ~ U(0.15, 1.15), kernel ≈ 10 % of the side, odd), on the 0–255 images before normalisation;
6. the pixel-weighted cross-entropy of the student on the mixed images: ``mean(CE · w)`` over all pixels
   (``CrossEntropyLoss2dPixelWiseWeighted``; ignored pixels count as 0 in the mean, as there);
7. MIC (``masking: true``, ``adaptation=mic``): the target images, strongly augmented on their own draw, with
   random blocks (64 px at full resolution, 32 px at DAFormer's 512x512 crops; ratio 0.7) set to 0 after
   normalisation (:func:`block_mask`), trained with the
   same weighted cross-entropy on the teacher's pseudo-labels of the *unmasked* target, × ``mask_lambda``
   (MIC's ``separatetrgaug`` mode with ``mask_alpha`` and ``mask_pseudo_threshold`` ``same``: the DACS
   teacher's labels and weights are shared);
8. DAFormer's ImageNet feature distance (``fdist_lambda > 0``): the L2 distance between the student's and
   a frozen ImageNet copy's last backbone features on the source batch, averaged over the feature pixels
   whose source label (pooled to the feature grid) is a *thing* class on at least 75 % of the patch.

All the losses are summed and back-propagated once (DACS; DAFormer back-propagates them one by one to save
memory: the same gradient).

**The EMA teacher** (:class:`EMATeacher`) is a copy of the segmenter that never trains: parameters without
gradients, kept out of the optimizer, updated as ``θ_t ← α_k θ_t + (1 − α_k) θ_s`` with
``α_k = min(1 − 1/k, α)`` after the student's k-th optimizer step (DACS's ``update_ema_variables``; α 0.99 in
DACS, 0.999 in DAFormer/MIC): a plain average of the first students, then an exponential one
(``ema_schedule=daformer``: DAFormer/MIC's ``min(1 − 1/(k+1), α)``, the initial weights kept with 1/(k+1)). BatchNorm
running statistics are averaged the same way (the authors' teacher averages parameters only).
**Where we differ on purpose**: the update runs at the start of iteration k + 1 instead of right after step
k — the same values, used at the same moment — because only there is it correct under DDP: DistributedDataParallel broadcasts rank 0's buffers
(BatchNorm statistics) at the start of each forward, so every rank averages identical students, and the
teachers stay identical on every rank (tested with 2 processes); after the step each rank's statistics
still hold its own batches. A checkpoint therefore holds the teacher of its last iteration (one update
behind its student); a resumed run continues exactly. ``teacher_bn`` chooses the normalisation of the
teacher's forward pass: ``target_batch`` (the authors': their teacher runs in training mode, so BatchNorm
normalises with the target batch's own statistics — an AdaBN teacher — without moving any running
statistics here) or ``running`` (evaluation mode, the averaged running statistics). Dropout is off in
both; frozen BatchNorm (DeepLabV2's default) is the same in both.

**Differences, on purpose**: colour jitter is implemented here (no kornia): brightness added, contrast
multiplied (kornia's ColorJitter of the authors' era), saturation blended with the grey image, hue rotated
in HSV, one factor of each per image, fixed order; DACS's random flip of mixed images is off in its config
and absent here. The source batch is cropped on the device to the target batch's size before mixing
(:func:`rtda.adaptation.fda.match_size`; DACS random-crops both domains to 512×512 in its loaders).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rtda.adaptation.features import (
    THING_CLASSES,
    FeatureTap,
    default_feature_layer,
    downscale_label_ratio,
    masked_feature_distance,
)
from rtda.adaptation.mixing import CLASSMIX_POOLS, block_mask, class_mix_masks, mix, strong_augment
from rtda.adaptation.pseudo_labels import DACS_THRESHOLD, WEIGHTINGS, dacs_pseudo_labels
from rtda.adaptation.segmentation import SegmentationModule
from rtda.adaptation.spectrum import match_size
from rtda.adaptation.teacher import EMATeacher, state_digest
from rtda.data.render import colorize, to_rgb
from rtda.run.errors import ConfigValueError, RtdaError

log = logging.getLogger("rtda")


# -- the method ----------------------------------------------------------------------------------------------------
class DACSModule(SegmentationModule):
    """DACS, with MIC's masked image consistency and DAFormer's ImageNet feature distance as options.

    Args:
        ema_alpha: the teacher's EMA factor α (DACS 0.99; DAFormer and MIC 0.999).
        ema_schedule: ``dacs`` (α_k = min(1 − 1/k, α)) or ``daformer`` (min(1 − 1/(k+1), α): DAFormer/MIC's
            ``_update_ema``, which keeps the initial weights in the teacher with weight 1/(k+1)).
        teacher_bn: ``target_batch`` (the authors': BatchNorm of the teacher normalises with the target
            batch's statistics) or ``running`` (evaluation mode, averaged running statistics).
        pseudo_threshold: confidence threshold of the pseudo-label weights (0.968).
        weighting: ``share`` (DACS's default: the share of confident pixels, one number per batch), ``pixel``
            (confident pixels 1, others 0) or ``none`` (all 1).
        pseudo_weight_ignore_top / pseudo_weight_ignore_bottom: rows at the top / bottom of the target whose
            pseudo-label weight is 0 (DAFormer's 15 / 120 on 512-pixel Cityscapes crops: the ego car and
            rectification borders); 0 in DACS.
        mixing: ClassMix on (false: the student trains on the strongly augmented target with its pseudo-labels).
        classmix_classes: ``image`` (DACS: half of each source label's classes) or ``batch`` (DAFormer/MIC's
            ``get_class_masks``: half of the classes of the whole source batch, drawn for each image).
        lambda_mix: weight of the mixed (or target) loss (DACS's ``consistency_weight``: 1).
        jitter_strength / jitter_p / blur: the strong augmentation (DACS 0.25 / 0.2 / on; DAFormer 0.2 / 0.2 / on).
        masking: MIC's masked image consistency on; mask_block_size, mask_ratio, mask_lambda: its block (64),
            the masked share (0.7) and the loss weight (1); mask_blur_sigma: the blur σ of the masked images drawn
            per ``image`` or once per ``batch`` (MIC's code transforms the batch in one call).
        fdist_lambda: DAFormer's ImageNet feature distance weight (0.005 in DAFormer; 0: off);
            fdist_classes: the classes it applies to (the thing classes), fdist_scale_min_ratio (0.75),
            fdist_layer (null: the last ``layer4``). Needs an ImageNet-initialised network
            (``model.pretrained``): the frozen copy taken at construction *is* that initialisation.
        fdist_allow_random_init: run the feature distance from a random initialisation anyway (meaningless:
            for timing only).
        num_mix_samples: source | target | mixed | mixed label rows saved to ``<run>/dacs_samples.png`` at the
            first iteration (0: none).
    """

    uses_target_images = True
    picture_options = (*SegmentationModule.picture_options, "num_mix_samples")

    def __init__(self, *args, ema_alpha: float = 0.99, teacher_bn: str = "target_batch", ema_schedule: str = "dacs",
                 pseudo_threshold: float = DACS_THRESHOLD, weighting: str = "share",
                 pseudo_weight_ignore_top: int = 0, pseudo_weight_ignore_bottom: int = 0,
                 mixing: bool = True, classmix_classes: str = "image", lambda_mix: float = 1.0,
                 jitter_strength: float = 0.25, jitter_p: float = 0.2, blur: bool = True,
                 masking: bool = False, mask_block_size: int = 64, mask_ratio: float = 0.7, mask_lambda: float = 1.0,
                 mask_blur_sigma: str = "image",
                 fdist_lambda: float = 0.0, fdist_classes: Sequence[int] | None = THING_CLASSES,
                 fdist_scale_min_ratio: float = 0.75, fdist_layer: str | None = None,
                 fdist_allow_random_init: bool = False, num_mix_samples: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if classmix_classes not in CLASSMIX_POOLS:
            raise ConfigValueError(f"adaptation.classmix_classes={classmix_classes!r}: expected one of "
                                   f"{list(CLASSMIX_POOLS)} (image: DACS, half of each label's classes; batch: "
                                   "DAFormer/MIC, half of the whole batch's classes)")
        if mask_blur_sigma not in ("image", "batch"):
            raise ConfigValueError(f"adaptation.mask_blur_sigma={mask_blur_sigma!r}: expected 'image' or 'batch' (MIC)")
        if weighting not in WEIGHTINGS:
            raise ConfigValueError(f"adaptation.weighting={weighting!r}: expected one of {list(WEIGHTINGS)}")
        if not 0.0 <= pseudo_threshold <= 1.0:
            raise ConfigValueError(f"adaptation.pseudo_threshold={pseudo_threshold}: expected a probability in [0, 1]")
        if masking and not (isinstance(mask_block_size, int) and mask_block_size > 0):
            raise ConfigValueError(f"adaptation.mask_block_size={mask_block_size!r}: expected a positive number of pixels")
        if masking and not 0.0 <= mask_ratio < 1.0:
            raise ConfigValueError(f"adaptation.mask_ratio={mask_ratio}: expected the masked share in [0, 1) (MIC: 0.7)")
        if fdist_lambda < 0 or lambda_mix < 0 or mask_lambda < 0:
            raise ConfigValueError("adaptation.fdist_lambda, lambda_mix and mask_lambda must be >= 0")
        if fdist_scale_min_ratio is not None and not 0.0 <= fdist_scale_min_ratio <= 1.0:
            raise ConfigValueError(f"adaptation.fdist_scale_min_ratio={fdist_scale_min_ratio}: expected a share in [0, 1]")
        self.teacher = EMATeacher(self.net, ema_alpha, teacher_bn, ema_schedule)
        self.imnet: nn.Module | None = None
        if fdist_lambda > 0:
            layer = fdist_layer or default_feature_layer(self.net)
            self.imnet = copy.deepcopy(self.net).requires_grad_(False).eval()
            self._student_tap = FeatureTap(self.net, layer)
            self._imnet_tap = FeatureTap(self.imnet, layer, stop=True)
        self._teacher_updates = 0

    # frozen networks stay in evaluation mode whatever Lightning switches
    def train(self, mode: bool = True):
        super().train(mode)
        if self.imnet is not None:
            self.imnet.eval()
        return self

    def on_fit_start(self) -> None:
        """Refuse the feature distance from a random initialisation (its frozen reference would be noise)."""
        if self.imnet is None or self.hparams.fdist_allow_random_init:
            return
        if getattr(self.net, "pretrained_weights", None) is None:  # what initialised it (rtda.models.pretrained)
            raise ConfigValueError(
                "adaptation.fdist_lambda>0 needs model.pretrained=true (or a weights file): the ImageNet feature "
                "distance pulls the features toward a frozen copy of the ImageNet-initialised network, and from a "
                "random initialisation that copy is noise (adaptation.fdist_allow_random_init=true runs it anyway, "
                "for timing only)")

    # -- the batch --------------------------------------------------------------------------------------------
    def transform_training_batch(self, batch: dict) -> dict:
        """Source cropped (or resized) to the target batch's size; the raw 0–255 images kept beside the
        normalised ones (``raw``) for mixing and augmentation in the training step."""
        source, target = dict(batch["source"]), dict(batch["target"])
        image, label = match_size(source["image"], source["label"], tuple(target["image"].shape[-2:]))
        source.update(image=image, label=label, raw=image)
        target["raw"] = target["image"]
        return {**batch, "source": source, "target": target}

    def update_teacher(self) -> None:
        """The teacher update after the student's previous optimizer step (k = iteration − 1; none at the
        first iteration: the teacher starts as the student's copy)."""
        k = self.iteration - 1
        if k >= 1:
            alpha = self.teacher.update(self.net, k)
            self._teacher_updates += 1
            self.log("train/ema_alpha", alpha, batch_size=1)

    def weighted_segmentation_loss(self, outputs, label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The network's loss terms with DACS's per-pixel weights (``mean(CE · w)`` for cross-entropy)."""
        return self.segmentation_loss(outputs, label, weight)[0]

    def pseudo_labels(self, target_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's pseudo-labels and weights of a normalised target batch (+ the confident share)."""
        probs = self.teacher(target_image).float().softmax(dim=1)
        labels, weights = dacs_pseudo_labels(probs, self.hparams.pseudo_threshold, self.hparams.weighting)
        confident = (probs.max(dim=1).values >= self.hparams.pseudo_threshold).float().mean()
        top, bottom = self.hparams.pseudo_weight_ignore_top, self.hparams.pseudo_weight_ignore_bottom
        if top > 0:
            weights[:, :top, :] = 0
        if bottom > 0:
            weights[:, -bottom:, :] = 0
        return labels, weights, confident

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        self.update_teacher()
        source, target = batch["source"], batch["target"]
        hp = self.hparams
        loss_src, parts = self.segmentation_loss(self.net(source["image"]), source["label"])
        losses = {**parts, "loss_src": loss_src}
        total = loss_src
        if self.imnet is not None:
            student_feat = self._student_tap.features  # captured in the source forward just above
            self._student_tap.features = None  # the later (mixed, masked) forwards' maps are not kept alive
            with torch.no_grad():
                reference = self._imnet_tap.run(self.imnet, source["image"])
            mask = None
            if hp.fdist_classes is not None:
                pooled = downscale_label_ratio(source["label"], student_feat.shape[-2:], hp.fdist_scale_min_ratio,
                                               hp.num_classes, hp.ignore_index)
                mask = torch.isin(pooled, torch.as_tensor(list(hp.fdist_classes), device=pooled.device))
            losses["loss_fdist"] = hp.fdist_lambda * masked_feature_distance(student_feat, reference.detach(), mask)
            total = total + losses["loss_fdist"]

        pseudo, weight, confident = self.pseudo_labels(target["image"])
        losses["pseudo_confident_share"] = confident.detach()
        if hp.lambda_mix > 0:
            if hp.mixing:
                mask = class_mix_masks(source["label"], pool=hp.classmix_classes)
                mixed_raw = mix(mask, source["raw"].float(), target["raw"].float())
                mixed_label = mix(mask, source["label"], pseudo)
                mixed_weight = mix(mask, torch.ones_like(weight), weight)
            else:
                mixed_raw, mixed_label, mixed_weight = target["raw"].float(), pseudo, weight
            mixed = strong_augment(mixed_raw, hp.jitter_strength, hp.jitter_p, hp.blur)
            if hp.num_mix_samples and self.iteration == 1 and self._trainer is not None:
                self.save_mix_samples(source["raw"], target["raw"], mixed, mixed_label)
            losses["loss_mix"] = self.weighted_segmentation_loss(self.forward_target(self.normalize(mixed)),
                                                                 mixed_label, mixed_weight)
            total = total + hp.lambda_mix * losses["loss_mix"]
        if hp.masking and hp.mask_lambda > 0:
            augmented = self.normalize(strong_augment(target["raw"], hp.jitter_strength, hp.jitter_p, hp.blur,
                                                      blur_sigma=hp.mask_blur_sigma))
            masked = augmented * block_mask(augmented.shape, hp.mask_block_size, hp.mask_ratio, augmented.device)
            losses["loss_masked"] = self.weighted_segmentation_loss(self.forward_target(self.to_memory_format(masked)),
                                                                    pseudo, weight)
            total = total + hp.mask_lambda * losses["loss_masked"]
        losses["loss"] = total
        return losses

    # -- DDP check ----------------------------------------------------------------------------------------------
    def on_train_end(self) -> None:
        """Under DDP, check that every process holds the same teacher (digests of its state), and write them to
        ``<run>/ema_teacher_check.json``; a mismatch stops the run."""
        super().on_train_end()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, state_digest(self.teacher))
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "ema_teacher_check.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"world_size": len(digests), "teacher_sha1": digests,
                                        "updates": self._teacher_updates}, indent=2))
        if len(set(digests)) != 1:
            raise RtdaError(f"the EMA teachers differ across the {len(digests)} DDP processes: {digests}")

    # -- samples --------------------------------------------------------------------------------------------------
    def save_mix_samples(self, source: torch.Tensor, target: torch.Tensor, mixed: torch.Tensor,
                         label: torch.Tensor) -> None:
        """``source | target | mixed (augmented) | mixed label`` rows as ``<run>/dacs_samples.png`` (and W&B)."""
        n = min(self.hparams.num_mix_samples, source.shape[0])
        rows = [np.concatenate([to_rgb(source[i]), to_rgb(target[i]), to_rgb(mixed[i]),
                                colorize(label[i].cpu().numpy())], axis=1) for i in range(n)]
        self.save_training_samples("dacs_samples", rows, "source | target | mixed + strong augmentation | mixed label")

