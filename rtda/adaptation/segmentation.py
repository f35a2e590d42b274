"""Supervised segmentation on the source domain, scored on the target domain: the module every
segmentation method extends (source-only training is this module as it is).

It owns the network, the segmentation loss with auxiliary heads, SGD with a per-iteration poly schedule, and
target-domain validation/test with :class:`rtda.metrics.SegmentationMetrics`, on the training core of
:mod:`rtda.adaptation.base`. A method overrides ``configure_models`` (build its own networks:
discriminators, a teacher; registered as submodules, they are saved in its checkpoints),
``configure_extra_optimizers`` (one optimizer per own network, poly-scheduled like the segmenter) and
``training_step`` (returning its named losses); it sets ``uses_target_images = True`` to receive
``batch["target"]``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rtda.adaptation.base import TrainingModule, plain, poly_lambda
from rtda.data.labels import CLASS_NAMES, EVAL_CLASSES, IGNORE_INDEX, REPORTED_SUBSETS
from rtda.data.normalization import normalize
from rtda.data.render import prediction_panel
from rtda.metrics import SegmentationMetrics, subset_scores
from rtda.models.losses import loss_terms, total_loss
from rtda.models.outputs import main_logits
from rtda.run.errors import ConfigValueError
from rtda.run.results import test_scores

log = logging.getLogger("rtda")


def _finite(value: float) -> float | None:
    """A score for ``results.json``: NaN (a class or group without pixels) as None."""
    value = float(value)
    return None if math.isnan(value) else value


class SegmentationModule(TrainingModule):
    """Supervised segmentation on the source domain, scored on the target domain.

    Args:
        net: the segmentation network; in training mode it may return
            :class:`rtda.models.outputs.SegmentationOutputs` whose ``aux`` heads are weighted in the loss by
            ``net.aux_weights[name]``.
        optimizer: a partial optimizer (Hydra ``_partial_: true``) taking parameter groups (None: evaluation only).
        poly_power: exponent of the poly learning-rate schedule, stepped once per iteration.
        poly_iters: length of the poly schedule in iterations (null: ``trainer.max_steps``). The official
            AdaptSegNet / ADVENT scripts schedule over 250k iterations and stop early (150k / 120k).
        head_lr_mult: learning-rate multiplier for everything but ``net.backbone_parameters()``;
            ``None`` takes the network's own ``head_lr_mult`` (DeepLabV2: 10, as in the official code).
        class_names: names used in metric keys (``val/IoU/<name>``).
        num_log_images: validation predictions logged per validation run (0 = none).
        channels_last: run the network in NHWC memory format (oneDNN on the CPU and tensor cores on the
            GPU are faster with it: BENCHMARKS.md measures -18% per training step and -40% per BiSeNet
            inference on this project's 2-core CPU). Numerically the same network.
        update_bn_on_target: whether target batches update the BatchNorm running statistics (what evaluation
            normalises with). The official code passes target images through the network in training
            mode, so they do (default). With false they are still normalised with their own batch
            statistics, but the running statistics stay the source's. No effect on frozen BatchNorm.
        gradient_clip_val: clip every optimizer's gradient norm to this value before its step (null: no
            clipping, as the references; :class:`rtda.adaptation.base.TrainingModule`).
        warmup_iters: linear learning-rate warm-up over this many iterations before the poly schedule takes
            over (0: none, as the seed's references; DAFormer/MIC: 1500), starting at ``warmup_ratio`` × the
            rate (1e-6); applies to every optimizer of the method (:func:`poly_lambda`).
        compile: ``torch.compile`` the segmenter for training: false (default), true, or the keyword
            arguments of ``torch.compile`` (``{mode: max-autotune}``). In place (``nn.Module.compile``), so
            checkpoints keep their keys and every method's passes through ``self.net`` are compiled; the
            first iterations pay the compilation (minutes for DeepLabV2 on a CPU).
        no_decay_keys: parameters of the network whose names contain one of these strings train without weight
            decay (mmseg's ``paramwise_cfg`` ``custom_keys`` with ``decay_mult=0``); ``None`` (default) takes the
            network's own ``no_weight_decay_names()`` (the MiT networks: their LayerNorms, as SegFormer/DAFormer/MIC
            train them), none for a network without it; ``[]``: one weight decay for all.
    """

    trains_segmenter = True
    picture_options = ("num_log_images",)

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        num_classes: int = 19,
        poly_power: float = 0.9,
        head_lr_mult: float | None = None,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        num_log_images: int = 4,
        channels_last: bool = True,
        poly_iters: int | None = None,
        update_bn_on_target: bool = True,
        gradient_clip_val: float | None = None,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
        compile: bool | dict = False,
        no_decay_keys: Sequence[str] | None = None,
    ):
        super().__init__(gradient_clip_val=gradient_clip_val, channels_last=channels_last)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.optimizer_factory = optimizer
        self.class_names = list(class_names or CLASS_NAMES[:num_classes])
        if not (isinstance(warmup_iters, int) and warmup_iters >= 0):
            raise ConfigValueError(f"adaptation.warmup_iters={warmup_iters!r}: expected a number of iterations >= 0")
        if not 0.0 < warmup_ratio <= 1.0:
            raise ConfigValueError(f"adaptation.warmup_ratio={warmup_ratio!r}: expected a fraction in (0, 1] (DAFormer: 1e-6)")
        if len(self.class_names) != num_classes:
            raise ConfigValueError(f"{len(self.class_names)} class names for num_classes={num_classes}")
        self.test_results: dict | None = None
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def setup(self, stage: str) -> None:
        """Compile the segmenter for training when asked (``compile``)."""
        options = plain(self.hparams.get("compile"))  # a Hydra DictConfig of torch.compile's arguments, as a dict
        if stage == "fit" and options and not getattr(self, "_compiled", False):
            self.net.compile(**(dict(options) if isinstance(options, dict) else {}))
            self._compiled = True

    # -- hooks a method overrides -------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the method's own networks (discriminators, a translator) as submodules."""

    def configure_losses(self) -> None:
        """Build the method's own loss modules (the segmentation loss comes with the network)."""

    def configure_metrics(self) -> None:
        self.val_metrics = SegmentationMetrics(self.hparams.num_classes, self.hparams.ignore_index)
        self.test_metrics = SegmentationMetrics(self.hparams.num_classes, self.hparams.ignore_index)
        #: the test set's sample groups (ACDC's conditions) when it has two or more, and one metric per group
        self.test_groups: list[str] = []
        self.test_group_by: str | None = None
        self.test_group_metrics = nn.ModuleList()

    # -- shared pieces ------------------------------------------------------------------------
    def forward(self, image: torch.Tensor):
        return self.net(image)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """0–255 images (as the data loaders deliver them) -> the network's normalised float input, in its
        memory format."""
        return self.to_memory_format(normalize(image))

    def segmentation_loss(self, outputs, label: torch.Tensor,
                          weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The network's supervised loss terms (:func:`rtda.models.losses.loss_terms`: cross-entropy on the main
        output and each deep-supervision head × ``net.aux_weights``, or the network's own terms: PIDNet's OHEM
        and boundary losses, STDC's detail loss), with optional per-pixel ``weight``; returns (total, parts) with
        parts ``loss_seg``, ``loss_aux/<head>`` and the network's own names."""
        return total_loss(loss_terms(self.net, outputs, label, weight, self.hparams.ignore_index))

    @torch.no_grad()
    def predict_logits(self, image: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Eval-mode logits, bilinearly upsampled to ``size`` (the label's resolution) when given.

        A network with its own ``predict(image, size)`` (an ensemble) does both itself."""
        image = self.to_memory_format(image)
        if hasattr(self.net, "predict"):
            return self.net.predict(image, size)
        logits = main_logits(self.net(image))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    @contextlib.contextmanager
    def target_batchnorm(self) -> Iterator[None]:
        """Around a target forward pass: leave the BatchNorm running statistics untouched unless
        ``update_bn_on_target``. Batch statistics still normalise the batch (momentum 0 keeps the running
        ones), exactly as a training-mode pass does."""
        if self.hparams.update_bn_on_target:
            yield
            return
        saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m, _, _ in saved:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, momentum, tracked in saved:
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)

    def forward_target(self, image: torch.Tensor):
        """The network on a target batch in training mode, under :meth:`target_batchnorm`."""
        with self.target_batchnorm():
            return self.net(image)

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        source = batch["source"]
        loss, parts = self.segmentation_loss(self.net(source["image"]), source["label"])
        return {"loss": loss, **parts}

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self.check_weights_finite("before validation")

    # -- evaluation on the target ---------------------------------------------------------------
    def _test_dataset(self):
        """The dataset the test stage reads (the data module's, else the test loader's), or None."""
        datasets = getattr(getattr(self.trainer, "datamodule", None), "datasets", None)
        if isinstance(datasets, dict) and datasets.get("test") is not None:
            return datasets["test"]
        loaders = self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        return getattr(loader, "dataset", None)

    def on_test_start(self) -> None:
        """One confusion matrix per group of the test set (:attr:`rtda.data.base.SegmentationFiles.sample_groups`:
        ACDC's conditions) when it has two or more: each process knows them from the dataset, not from the
        batches it happens to see, so every process holds the same metrics and they are summed across processes
        as the overall one is."""
        dataset = self._test_dataset()
        groups = list(dict.fromkeys(getattr(dataset, "sample_groups", None) or []))
        self.test_groups = groups if len(groups) > 1 else []
        self.test_group_by = (getattr(dataset, "group_by", None) or "group") if self.test_groups else None
        self.test_group_metrics = nn.ModuleList(
            SegmentationMetrics(self.hparams.num_classes, self.hparams.ignore_index) for _ in self.test_groups
        ).to(self.device)

    def _eval_step(self, batch: dict, batch_idx: int, metrics: SegmentationMetrics, stage: str) -> None:
        label = batch["label"]
        logits = self.predict_logits(batch["image"], label.shape[-2:])
        metrics.update(logits.argmax(dim=1), label)
        if stage == "test" and getattr(self, "test_groups", None) and "group" in batch:
            preds = logits.argmax(dim=1)
            for metric, group in zip(self.test_group_metrics, self.test_groups):
                chosen = torch.tensor([g == group for g in batch["group"]], device=preds.device)
                if bool(chosen.any()):
                    metric.update(preds[chosen], label[chosen])
        if stage == "val" and batch_idx == 0 and self.hparams.num_log_images > 0:
            self.log_predictions(batch, logits.argmax(dim=1), stage)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics, "test")

    def _computed(self, metrics: SegmentationMetrics) -> dict:
        """The metric's scores (summed across processes), with ``data.eval_classes``' subsets; the metric reset."""
        result = metrics.compute()
        metrics.reset()
        # data.eval_classes (SYNTHIA: synthia16 | synthia13): mIoU over that subset, mIoU16 and mIoU13 beside it
        eval_classes = getattr(getattr(self.trainer, "datamodule", None), "eval_classes", "all")
        if eval_classes != "all":
            result.update(subset_scores(result["IoU"], self.class_names, EVAL_CLASSES[eval_classes],
                                        REPORTED_SUBSETS[eval_classes]))
        return result

    def _log_epoch_metrics(self, metrics: SegmentationMetrics, stage: str) -> dict:
        result = self._computed(metrics)
        values = {f"{stage}/acc": result["acc"], f"{stage}/mAcc": result["mAcc"],
                  **{f"{stage}/{k}": v for k, v in result.items() if k.startswith("mIoU") and k != "mIoU"}}
        for name, iou in zip(self.class_names, result["IoU"].tolist()):
            # NaN (class absent from truth and prediction) is logged as NaN: loggers and rtda-compare skip it
            values[f"{stage}/IoU/{name}"] = iou
        self.log_dict(values, prog_bar=False, sync_dist=False)  # the confusion matrix is already synced
        self.log(f"{stage}/mIoU", result["mIoU"], prog_bar=True)
        return result

    def on_validation_epoch_end(self) -> None:
        result = self._log_epoch_metrics(self.val_metrics, "val")
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:  # in train.log too, not only the bar
            log.info(f"iteration {self.global_step}/{self.trainer.max_steps}: val/mIoU {100 * float(result['mIoU']):.2f}")

    def on_test_epoch_end(self) -> None:
        result = self._log_epoch_metrics(self.test_metrics, "test")
        self.test_results = {
            "mIoU": result["mIoU"],
            "acc": result["acc"],
            "mAcc": result["mAcc"],
            "IoU": {n: (None if math.isnan(v) else v) for n, v in zip(self.class_names, result["IoU"].tolist())},
            "confmat": result["confmat"].cpu().tolist(),
        }
        if getattr(self, "test_groups", None):  # per group (ACDC: per condition): test/<group>/mIoU logged, the rest in results.json
            groups = {}
            for group, metric in zip(self.test_groups, self.test_group_metrics):
                scores = self._computed(metric)
                self.log(f"test/{group}/mIoU", scores["mIoU"])
                groups[group] = {
                    **{k: _finite(v) for k, v in scores.items() if k.startswith("mIoU")},
                    "acc": _finite(scores["acc"]),
                    "mAcc": _finite(scores["mAcc"]),
                    "pixels": int(scores["confmat"].sum()),
                    "IoU": {n: _finite(v) for n, v in zip(self.class_names, scores["IoU"].tolist())},
                }
            self.test_results["group_by"] = self.test_group_by
            self.test_results["groups"] = groups

    def run_results(self, trainer) -> dict:
        """The target test scores of the run (none when it was not tested), for ``results.json``; a test set of
        several groups (ACDC's conditions) adds ``test.groups`` (``{"fog": {"mIoU", "IoU", …}, …}``) and
        ``test.group_by`` (``"condition"``)."""
        scores = test_scores(trainer.callback_metrics, self.class_names)
        if scores and self.test_results and self.test_results.get("groups"):
            scores["group_by"] = self.test_results["group_by"]
            scores["groups"] = self.test_results["groups"]
        out = {"test": scores}
        if scores:
            out["test/mIoU"] = scores["mIoU"]
        if self.test_results:
            out["test/confmat"] = self.test_results["confmat"]
        return out

    def log_predictions(self, batch: dict, preds: torch.Tensor, stage: str) -> None:
        """Save image | truth | prediction panels as a PNG in the run folder, and to W&B when it logs."""
        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        n = min(self.hparams.num_log_images, preds.shape[0])
        grid = np.concatenate([prediction_panel(batch["image"][i], batch["label"][i], preds[i]) for i in range(n)], axis=0)
        folder = Path(self.trainer.default_root_dir) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(folder / f"{stage}_step{self.global_step:06d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"{stage}/predictions", images=[grid], step=self.global_step,
                                 caption=["image | ground truth | prediction"])

    # -- optimisation ---------------------------------------------------------------------------
    def parameter_groups(self, base_lr: float) -> list[dict]:
        """Backbone at ``base_lr``, the rest at ``head_lr_mult * base_lr``; parameters named by ``no_decay_keys``
        in groups of their own with ``weight_decay=0``; frozen parameters left out; empty groups dropped."""
        mult = self.hparams.head_lr_mult
        if mult is None:
            mult = getattr(self.net, "head_lr_mult", 1.0)
        backbone_fn = getattr(self.net, "backbone_parameters", None)
        backbone_ids = {id(p) for p in backbone_fn()} if mult != 1.0 and backbone_fn is not None else set()
        keys = self.hparams.get("no_decay_keys")
        if keys is None:
            own = getattr(self.net, "no_weight_decay_names", None)
            free = set(own()) if own is not None else set()
        else:
            free = {n for n, _ in self.net.named_parameters() if any(k in n for k in keys)}
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in backbone_ids or not backbone_ids, name in free), []).append(p)
        out = []
        for (backbone, no_decay), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
            group = {"params": params, "lr": base_lr if backbone else base_lr * mult}
            if no_decay:
                group["weight_decay"] = 0.0
            out.append(group)
        return out

    def poly_iterations(self) -> int:
        """Length of the poly schedules: ``poly_iters``, else the run's iterations (the LR reaches 0 after
        the last one)."""
        return int(self.hparams.poly_iters or self.max_iterations())

    def configure_extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers of the method's own networks, after the segmenter's; each gets its own poly schedule."""
        return []

    def configure_optimizers(self):
        base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if base_lr is None:
            raise ConfigValueError("optimizer.lr must be set: the poly schedule and the head multiplier scale it")
        optimizers = [self.optimizer_factory(params=self.parameter_groups(base_lr)), *self.configure_extra_optimizers()]
        factor = poly_lambda(self.poly_iterations(), self.hparams.poly_power,
                             self.hparams.get("warmup_iters", 0), self.hparams.get("warmup_ratio", 1e-6))
        configs = [{"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                       "interval": "step", "frequency": 1}} for opt in optimizers]
        return configs[0] if len(configs) == 1 else configs

