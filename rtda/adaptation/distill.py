"""Knowledge distillation on the target domain: a frozen, already adapted teacher (any rtda checkpoint, any network,
any method, or the softmax ensemble of several) teaches a real-time student on the unlabelled target images, while
the student keeps its supervised losses on the labelled source.

**One iteration** (``adaptation=distill``; every term has its weight key, 0 switches it off):

1. the teacher labels the target batch, without gradients, in evaluation mode, at its own input size
   (``teacher.size``; null: the student's) and precision (``teacher.precision``: bf16 autocast on CUDA, fp32 on
   the CPU); its logits are resized bilinearly to the student's output size;
2. cross-entropy of the student on the source batch, with its own training heads (deep supervision, PIDNet's
   boundary, STDC's detail) as in every rtda method (``loss_src``, and its parts ``loss_seg``, ``loss_aux/…``);
3. on the target batch, the student's main logits ``s`` against the teacher's ``t``:

   * ``loss_kd`` × ``lambda_kd``: the pixel-wise KL of Hinton et al. (2015, "Distilling the knowledge in a
     neural network"), ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` summed over the classes and averaged over the
     N·H·W pixels (:func:`pixel_kl`). The T² keeps the gradients' scale across temperatures (Hinton, §2).
     ``temperature`` 1 by default: the pixel-wise distillation of semantic segmentation (Liu et al., CVPR 2019,
     "Structured knowledge distillation", and CWD's official ``CriterionKD``, irfanICMLL/TorchDistiller
     ``SemSeg-distill/utils/criterion.py``) runs at T = 1. That criterion is ``nn.KLDivLoss()``'s element mean,
     i.e. also divided by C; ours is the KL per pixel (C = 19 times larger), the weight absorbing it.
   * ``loss_cwd`` × ``lambda_cwd``: channel-wise distillation (Shu et al., ICCV 2021, :func:`channel_wise_divergence`):
     each class channel's map softmax-normalised over the H·W positions at temperature τ, the KL of the teacher's
     from the student's summed over the positions, × τ², averaged over the N·C channels — exactly mmrazor's
     ``ChannelWiseDivergence`` (open-mmlab/mmrazor ``mmrazor/models/losses/cwd.py``) and the official
     ``CriterionCWD(norm_type='channel', divergence='kl')``. The official segmentation setting on logits,
     ``exp_cwd.sh channel kl 3 4`` (TorchDistiller's README), is weight 3, τ = 4 (``cwd_tau``'s default;
     mmrazor's config ``cwd_logits_pspnet_r101_d8_pspnet_r18_d8_512x1024_cityscapes_80k.py`` uses τ = 1, weight 5).
     Off by default (``lambda_cwd: 0``); ``lambda_cwd=3`` turns it on.
   * ``loss_pl`` × ``lambda_pl``: the teacher's hard pseudo-labels (its argmax), weighted as DACS weighs them
     (:func:`rtda.adaptation.pseudo_labels.dacs_pseudo_labels`: ``share`` of the pixels whose top probability is at
     least 0.968), the pixel-weighted cross-entropy ``mean(CE · w)`` of DACS on the main output;

4. ``mixing: true``: DACS's cross-domain ClassMix with the fixed teacher instead of the student's EMA
   (:mod:`rtda.adaptation.mixing`: half of each source label's classes pasted onto the target, labels the
   source label there and the teacher's pseudo-label elsewhere, weights 1 there and the pseudo-label weight
   elsewhere, DACS's colour jitter and blur on the mixed 0–255 images), trained with the network's own weighted
   loss terms as DACS trains them (``loss_mix`` × ``lambda_mix``).

All the terms are summed and back-propagated once. The target terms of step 3 read the student's main output
only: its training heads keep their losses on the source (and on the mixed images, as in DACS).

**The teacher** is built from each checkpoint's own config and weights (:func:`rtda.run.checkpoints.build_net`,
``weights_only``: what ``rtda-eval`` scores; several paths: :class:`rtda.adaptation.segmenter.SoftmaxEnsemble`,
rtda-eval's multi-band ensemble, whose teacher logits are the log of the averaged probabilities, so the KL and the
pseudo-labels see exactly the ensemble's prediction; CWD then normalises log-probabilities instead of logits,
which differ from them by a per-pixel shift). It is loaded and checked when the method is built, before anything
trains: a missing or unreadable file, another class count (``data.num_classes``) or other class names (the label
space a checkpoint records in its hyperparameters) is one line naming ``adaptation.teacher.ckpt_path``. It is
frozen (``requires_grad`` False, evaluation mode whatever Lightning switches, BatchNorm on its running
statistics) and held **outside** the module's registry, so it is in no ``state_dict``: a student checkpoint holds
the student only (``rtda-eval``/``rtda-bench``/``rtda-export`` take it as any other) and records its teacher by
reference, each file's absolute path and SHA-256 (``checkpoint["distill_teacher"]``, and ``results.json``'s
``teacher``); resuming checks that the teacher files are those the run started with. Its input is the student's
normalised image: every rtda network is trained on the same ImageNet mean/std (:mod:`rtda.data.normalization`;
checkpoints record no statistics of their own), and resizing the normalised image is the same as normalising
the resized one (both are linear).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtda.adaptation.base import plain
from rtda.adaptation.mixing import CLASSMIX_POOLS, class_mix_masks, mix, strong_augment
from rtda.adaptation.pseudo_labels import DACS_THRESHOLD, WEIGHTINGS, dacs_pseudo_labels
from rtda.adaptation.segmentation import SegmentationModule
from rtda.adaptation.segmenter import SoftmaxEnsemble
from rtda.adaptation.spectrum import match_size
from rtda.data.labels import CLASS_NAMES
from rtda.models.losses import pixel_cross_entropy
from rtda.models.outputs import main_logits
from rtda.run.checkpoints import build_net, describe_net, load_checkpoint
from rtda.run.errors import CheckpointError, ConfigValueError

log = logging.getLogger("rtda")

#: the teacher's forward precision on CUDA (autocast dtype); on other devices it runs in fp32
TEACHER_PRECISIONS = {"bf16": torch.bfloat16, "16": torch.float16, "32": None}
KEY = "adaptation.teacher.ckpt_path"


# -- the losses ----------------------------------------------------------------------------------------------------
def pixel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's distillation loss per pixel: ``T² · mean_{n,h,w} Σ_c p_t (log p_t − log p_s)`` with
    ``p = softmax(logits / T)`` over the classes (dim 1) of ``N×C×H×W`` logits; in fp32, the teacher detached."""
    t = teacher_logits.detach().float() / temperature
    log_pt = t.log_softmax(dim=1)
    log_ps = (student_logits.float() / temperature).log_softmax(dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean() * temperature ** 2


def channel_wise_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021), as mmrazor's ``ChannelWiseDivergence``: each of the N·C
    channel maps softmax-normalised over its H·W positions at temperature ``tau``;
    ``τ² · Σ_{n,c,hw} p_t (log p_t − log p_s) / (N·C)``; in fp32, the teacher detached."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"channel_wise_divergence: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape")
    n, c = student_logits.shape[:2]
    t = teacher_logits.detach().float().reshape(n * c, -1) / tau
    log_pt = t.log_softmax(dim=1)
    log_ps = (student_logits.float().reshape(n * c, -1) / tau).log_softmax(dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum() * tau ** 2 / (n * c)


# -- the teacher ---------------------------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def teacher_paths(ckpt_path) -> list[str]:
    """``adaptation.teacher.ckpt_path`` as a list of paths (one path, or a list of them: an ensemble)."""
    value = plain(ckpt_path)
    paths = [value] if isinstance(value, (str, Path)) else list(value or [])
    if not paths or not all(isinstance(p, (str, Path)) and str(p) for p in paths):
        raise ConfigValueError(f"{KEY}={value!r}: expected a checkpoint of an rtda-train run (its checkpoints/last.ckpt) "
                               "or a list of them [a.ckpt,b.ckpt] for a softmax ensemble")
    return [str(p) for p in paths]


def load_teacher(ckpt_path, num_classes: int, class_names: Sequence[str]) -> tuple[nn.Module, list[dict]]:
    """The frozen teacher network of ``ckpt_path`` (one checkpoint, or a :class:`SoftmaxEnsemble` of several) and
    one record per file (absolute path, SHA-256, network, method). Every user error is one line naming the key."""
    nets, records = [], []
    for given in teacher_paths(ckpt_path):
        path = Path(given).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{KEY}: no such teacher checkpoint: {path} (adapt a teacher first, e.g. rtda-train "
                                  "experiment=demo_dacs, and pass its checkpoints/last.ckpt)")
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(f"{KEY}: {err}") from None
        config = ckpt["rtda"]["config"]
        model_cfg = dict(config.get("model") or {})
        theirs = model_cfg.get("num_classes", (config.get("data") or {}).get("num_classes"))
        if theirs != num_classes:
            raise CheckpointError(f"{KEY}={path}: the teacher is {describe_net(model_cfg)}, but the student trains "
                                  f"{num_classes} classes (data.num_classes={num_classes})")
        names = (ckpt.get("hyper_parameters") or {}).get("class_names") or CLASS_NAMES[:theirs]
        if list(names) != list(class_names):
            first = next(i for i, (a, b) in enumerate(zip(names, class_names)) if a != b)
            raise CheckpointError(f"{KEY}={path}: the teacher was trained on another label space: its class {first} is "
                                  f"{names[first]!r}, the student's is {class_names[first]!r}")
        try:
            net = build_net(ckpt, path)
        except CheckpointError as err:
            raise CheckpointError(f"{KEY}: {err}") from None
        if (config.get("adaptation") or {}).get("channels_last", True):  # as its run trained and scored it
            net = net.to(memory_format=torch.channels_last)
        nets.append(net.requires_grad_(False).eval())
        records.append({"path": str(path.resolve()), "sha256": file_sha256(path), "model": describe_net(model_cfg),
                        "adaptation": str((config.get("adaptation") or {}).get("_target_", "?")).rsplit(".", 1)[-1]})
        del ckpt
    net = nets[0] if len(nets) == 1 else SoftmaxEnsemble(nets).requires_grad_(False).eval()
    return net, records


class FrozenTeacher(nn.Module):
    """A teacher network that never trains: evaluation mode whatever ``train()`` asks, no gradients, its own input
    size and precision; :meth:`logits` gives its logits of a normalised batch at a given output size."""

    def __init__(self, net: nn.Module, records: list[dict], size: Sequence[int] | None = None, precision: str = "bf16"):
        super().__init__()
        self.net = net.requires_grad_(False)
        self.records = records
        self.size = tuple(int(v) for v in size) if size is not None else None
        self.precision = precision
        self.ensemble = isinstance(net, SoftmaxEnsemble)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:  # noqa: ARG002 - the teacher never trains
        return super().train(False)

    def autocast(self, device: torch.device):
        dtype = TEACHER_PRECISIONS[self.precision]
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=dtype) if dtype is not None else torch.autocast("cuda", enabled=False)
        if device.type == "cpu":  # fp32 on the CPU, also inside a CPU autocast of the student
            return torch.autocast("cpu", enabled=False)
        return contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """fp32 ``N×C×size`` logits of a normalised batch (an ensemble: the log of its averaged probabilities),
        the batch resized bilinearly to the teacher's input size first when it has one."""
        first = next(self.net.parameters(), None)
        if first is not None and first.device != image.device:  # outside the registry: Lightning does not move it
            self.net.to(image.device)
        x = image
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        size = tuple(size)
        with self.autocast(x.device):
            if self.ensemble:
                probs = self.net.predict(x, size).float()
                return probs.clamp_min(torch.finfo(torch.float32).tiny).log()
            logits = main_logits(self.net(x))
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.float()


# -- the method ----------------------------------------------------------------------------------------------------
class DistillModule(SegmentationModule):
    """Distillation of a frozen adapted teacher into the student on the target (see the module docstring).

    Args:
        teacher: ``{ckpt_path, size, precision}``: the teacher's checkpoint (a path, or a list of paths: their
            softmax ensemble); its input size ``[H, W]`` (null: the student's target batch as it is); its forward
            precision on CUDA (``bf16`` default, ``16`` or ``32``; the CPU runs it in fp32).
        lambda_kd / temperature: the pixel-wise KL's weight (1) and temperature T (1).
        lambda_cwd / cwd_tau: channel-wise distillation's weight (0: off; the official setting 3) and τ (4).
        lambda_pl: the weight of the teacher's DACS-weighted hard pseudo-labels on the target (1).
        pseudo_threshold / weighting: their confidence threshold (0.968) and weighting (``share``: DACS's; ``pixel``;
            ``none``), as :class:`rtda.adaptation.dacs.DACSModule`.
        mixing / lambda_mix / classmix_classes / jitter_strength / jitter_p / blur: DACS's ClassMix of source and
            target labelled by the teacher (off by default), its loss weight (1), the classes pasted (``image``:
            DACS; ``batch``: DAFormer) and the strong augmentation of the mixed images (DACS: 0.25, 0.2, on).
    """

    uses_target_images = True

    def __init__(self, *args, teacher: dict | None = None, lambda_kd: float = 1.0, temperature: float = 1.0,
                 lambda_cwd: float = 0.0, cwd_tau: float = 4.0, lambda_pl: float = 1.0,
                 pseudo_threshold: float = DACS_THRESHOLD, weighting: str = "share", mixing: bool = False,
                 lambda_mix: float = 1.0, classmix_classes: str = "image", jitter_strength: float = 0.25,
                 jitter_p: float = 0.2, blur: bool = True, **kwargs):
        super().__init__(*args, **kwargs)  # configure_models (below) loads the teacher

    def configure_models(self) -> None:
        hp = self.hparams
        for key in ("lambda_kd", "lambda_cwd", "lambda_pl", "lambda_mix"):
            if not hp[key] >= 0:
                raise ConfigValueError(f"adaptation.{key}={hp[key]!r}: expected a weight >= 0 (0 switches the term off)")
        for key in ("temperature", "cwd_tau"):
            if not hp[key] > 0:
                raise ConfigValueError(f"adaptation.{key}={hp[key]!r}: expected a temperature > 0")
        if hp.weighting not in WEIGHTINGS:
            raise ConfigValueError(f"adaptation.weighting={hp.weighting!r}: expected one of {list(WEIGHTINGS)}")
        if not 0.0 <= hp.pseudo_threshold <= 1.0:
            raise ConfigValueError(f"adaptation.pseudo_threshold={hp.pseudo_threshold}: expected a probability in [0, 1]")
        if hp.classmix_classes not in CLASSMIX_POOLS:
            raise ConfigValueError(f"adaptation.classmix_classes={hp.classmix_classes!r}: expected one of {list(CLASSMIX_POOLS)}")
        options = dict(plain(hp.teacher) or {})
        unknown = sorted(set(options) - {"ckpt_path", "size", "precision"})
        if unknown:
            raise ConfigValueError(f"adaptation.teacher.{unknown[0]}: unknown key (expected ckpt_path, size, precision)")
        precision = str(options.get("precision") or "bf16")
        if precision not in TEACHER_PRECISIONS:
            raise ConfigValueError(f"adaptation.teacher.precision={precision!r}: expected one of {list(TEACHER_PRECISIONS)}")
        size = options.get("size")
        if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2
                                     and all(isinstance(v, int) and v > 0 for v in size)):
            raise ConfigValueError(f"adaptation.teacher.size={size!r}: expected [height, width] in pixels, or null "
                                   "(the student's size)")
        self._teacher: FrozenTeacher | None = None
        if options.get("ckpt_path") is not None:
            net, records = load_teacher(options["ckpt_path"], hp.num_classes, self.class_names)
            # outside the module registry (object.__setattr__): in no state_dict, optimizer, DDP or .to() of the student
            object.__setattr__(self, "_teacher", FrozenTeacher(net, records, size, precision))
            log.info("distillation teacher: %s", "; ".join(f"{r['model']} ({r['adaptation']}) {r['path']} "
                                                           f"sha256 {r['sha256'][:12]}" for r in records))

    @property
    def teacher(self) -> FrozenTeacher:
        if self._teacher is None:
            raise ConfigValueError(f"{KEY} is required for adaptation=distill: the checkpoint of an adapted teacher, "
                                   f"e.g. {KEY}=outputs/train/runs/<run>/checkpoints/last.ckpt (a list for an ensemble)")
        return self._teacher

    def teacher_records(self) -> list[dict]:
        return list(self._teacher.records) if self._teacher is not None else []

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.teacher  # noqa: B018 -- no teacher: the one-line error, before anything trains
        super().setup(stage)

    # -- checkpoints: the teacher by reference ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distill_teacher"] = self.teacher_records()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming training: the teacher files must be those the run started with (same SHA-256, in order)."""
        super().on_load_checkpoint(checkpoint)
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        recorded = checkpoint.get("distill_teacher")
        if recorded is None:
            log.warning("resuming distillation from a checkpoint that records no teacher (another method's run)")
            return
        now = self.teacher_records()
        if [r["sha256"] for r in recorded] != [r["sha256"] for r in now]:
            then = ", ".join(f"{r['path']} (sha256 {r['sha256'][:12]})" for r in recorded)
            given = ", ".join(f"{r['path']} (sha256 {r['sha256'][:12]})" for r in now)
            raise CheckpointError(f"{KEY}: the teacher changed since this run started: it was trained with {then}, "
                                  f"now {given}; restore that file or start a new run")

    def run_results(self, trainer) -> dict:
        return {**super().run_results(trainer), "teacher": self.teacher_records()}

    # -- the batch --------------------------------------------------------------------------------------------
    def transform_training_batch(self, batch: dict) -> dict:
        """With ClassMix, the source cropped (or resized) to the target batch's size and the raw 0–255 images kept
        beside the normalised ones (``raw``), as DACS."""
        if not (self.hparams.mixing and self.hparams.lambda_mix > 0):
            return batch
        source, target = dict(batch["source"]), dict(batch["target"])
        image, label = match_size(source["image"], source["label"], tuple(target["image"].shape[-2:]))
        source.update(image=image, label=label, raw=image)
        target["raw"] = target["image"]
        return {**batch, "source": source, "target": target}

    # -- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        hp = self.hparams
        source, target = batch["source"], batch["target"]
        loss_src, parts = self.segmentation_loss(self.net(source["image"]), source["label"])
        losses = {**parts, "loss_src": loss_src}
        total = loss_src
        mixing = hp.mixing and hp.lambda_mix > 0
        if not (hp.lambda_kd > 0 or hp.lambda_cwd > 0 or hp.lambda_pl > 0 or mixing):
            losses["loss"] = total
            return losses
        teacher = self.teacher.logits(target["image"], target["image"].shape[-2:])
        pseudo = weight = None
        if hp.lambda_pl > 0 or mixing:
            probs = teacher.softmax(dim=1)
            pseudo, weight = dacs_pseudo_labels(probs, hp.pseudo_threshold, hp.weighting)
            losses["pseudo_confident_share"] = (probs.max(dim=1).values >= hp.pseudo_threshold).float().mean()
        if hp.lambda_kd > 0 or hp.lambda_cwd > 0 or hp.lambda_pl > 0:
            student = main_logits(self.forward_target(target["image"]))
            if tuple(student.shape[-2:]) != tuple(teacher.shape[-2:]):  # a network whose output is not input-sized
                teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
            if hp.lambda_kd > 0:
                losses["loss_kd"] = pixel_kl(student, teacher, hp.temperature)
                total = total + hp.lambda_kd * losses["loss_kd"]
            if hp.lambda_cwd > 0:
                losses["loss_cwd"] = channel_wise_divergence(student, teacher, hp.cwd_tau)
                total = total + hp.lambda_cwd * losses["loss_cwd"]
            if hp.lambda_pl > 0:
                if tuple(student.shape[-2:]) != tuple(pseudo.shape[-2:]):
                    pseudo_s = F.interpolate(pseudo[:, None].float(), size=student.shape[-2:], mode="nearest")[:, 0].long()
                    weight_s = F.interpolate(weight[:, None], size=student.shape[-2:], mode="nearest")[:, 0]
                else:
                    pseudo_s, weight_s = pseudo, weight
                losses["loss_pl"] = pixel_cross_entropy(student, pseudo_s, weight_s, hp.ignore_index)
                total = total + hp.lambda_pl * losses["loss_pl"]
        if mixing:
            mask = class_mix_masks(source["label"], pool=hp.classmix_classes)
            mixed_raw = mix(mask, source["raw"].float(), target["raw"].float())
            mixed_label = mix(mask, source["label"], pseudo)
            mixed_weight = mix(mask, torch.ones_like(weight), weight)
            mixed = strong_augment(mixed_raw, hp.jitter_strength, hp.jitter_p, hp.blur)
            losses["loss_mix"] = self.segmentation_loss(self.forward_target(self.normalize(mixed)), mixed_label,
                                                        mixed_weight)[0]
            total = total + hp.lambda_mix * losses["loss_mix"]
        losses["loss"] = total
        return losses
