"""Source-only training: the segmentation LightningModule every adaptation method extends.

A method is "supervised loss on source + something that uses the target". This module owns what they
all share (torchgeo's ``BaseTask`` pattern): the network, the segmentation loss with auxiliary heads,
SGD with a per-iteration poly schedule, and target-domain validation/test with
:class:`rtda.metrics.SegmentationMetrics`. A method overrides ``configure_models`` (build its own
networks: discriminators, a teacher; registered as submodules, they are saved in its checkpoints),
``configure_extra_optimizers`` (one optimizer per own network, poly-scheduled like the segmenter) and
``training_step``; it sets ``uses_target_images = True`` to receive ``batch["target"]``.

**Iterations, not optimizer steps.** Lightning's ``global_step`` counts ``optimizer.step()`` calls, so
a method stepping three optimizers would end after a third of ``trainer.max_steps`` iterations, with a
poly schedule cut short and checkpoints named by optimizer steps. Methods with several optimizers use manual
optimization and step them with :meth:`SegmentationModule.step_optimizer`: the first optimizer stepped in
an iteration goes through Lightning's ``LightningOptimizer.step`` (counted); the others go straight to
``trainer.strategy.optimizer_step`` — the very call ``LightningOptimizer.step`` wraps, so the precision
plugin (AMP loss scaling and unscaling, ``on_before_optimizer_step`` hooks) and the strategy still run —
without the step counter. ``global_step``, ``max_steps``, ``val_check_interval``, checkpoint names, logged
steps and ``ckpt_path=auto`` resume therefore all count training iterations; each poly scheduler steps
with its optimizer, once per iteration (Lightning does not step schedulers under manual optimization).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from rtda.data.labels import CLASS_NAMES, IGNORE_INDEX
from rtda.data.normalization import normalize
from rtda.errors import ConfigValueError, TrainingDiverged
from rtda.metrics import SegmentationMetrics
from rtda.models.outputs import as_outputs, main_logits
from rtda.viz import prediction_panel

log = logging.getLogger("rtda")


def _no_closure() -> None:
    return None


def poly_lambda(max_iters: int, power: float = 0.9, warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> Callable[[int], float]:
    """``lr = base_lr * (1 - it / max_iters) ** power``, the DeepLab schedule the references step per iteration.

    With ``warmup_iters > 0``, mmcv's linear warm-up (DAFormer/MIC: 1500 iterations, ratio 1e-6) scales it
    during the first iterations: ``poly(it) * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))``, from
    ``warmup_ratio`` of the poly rate at iteration 0 to all of it at ``warmup_iters``."""

    def factor(it: int) -> float:
        poly = (1.0 - min(it, max_iters) / max_iters) ** power
        if it < warmup_iters:
            poly *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
        return poly

    return factor


class SegmentationModule(pl.LightningModule):
    """Supervised segmentation on the source domain, scored on the target domain.

    Args:
        net: the segmentation network (None for a method without one, ``has_segmenter = False``); in training mode it may return
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
            clipping, as the references). Works with manual optimization, unlike ``trainer.gradient_clip_val``.
        warmup_iters: linear learning-rate warm-up over this many iterations before the poly schedule takes
            over (0: none, as the seed's references; DAFormer/MIC: 1500), starting at ``warmup_ratio`` × the
            rate (1e-6); applies to every optimizer of the method (:func:`poly_lambda`).
        compile: ``torch.compile`` the segmenter for training: false (default), true, or the keyword
            arguments of ``torch.compile`` (``{mode: max-autotune}``). In place (``nn.Module.compile``), so
            checkpoints keep their keys and every method's passes through ``self.net`` are compiled; the
            first iterations pay the compilation (minutes for DeepLabV2 on a CPU).
    """

    uses_target_images: bool = False
    #: True for a method training on (pseudo-)labelled target images (FDA's self-training round)
    uses_target_labels: bool = False
    #: False for a method that trains no segmentation network (CycleGAN's translator): rtda-train then builds
    #: nothing from the ``model`` group, runs no validation or test, and checkpoints without a monitor
    has_segmenter: bool = True
    #: keyword arguments a DDP strategy needs for this method (rtda-train applies them to ``trainer.strategy``)
    strategy_options: dict = {}

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
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"])
        # None for a method without a segmenter (``has_segmenter = False``: CycleGAN's translator)
        self.net = net.to(memory_format=torch.channels_last) if channels_last and net is not None else net
        self.optimizer_factory = optimizer
        self.class_names = list(class_names or CLASS_NAMES[:num_classes])
        if not (isinstance(warmup_iters, int) and warmup_iters >= 0):
            raise ConfigValueError(f"adaptation.warmup_iters={warmup_iters!r}: expected a number of iterations >= 0")
        if not 0.0 < warmup_ratio <= 1.0:
            raise ConfigValueError(f"adaptation.warmup_ratio={warmup_ratio!r}: expected a fraction in (0, 1] (DAFormer: 1e-6)")
        if len(self.class_names) != num_classes:
            raise ConfigValueError(f"{len(self.class_names)} class names for num_classes={num_classes}")
        self.run_config: dict | None = None  # config, overrides and choices of the run, saved into checkpoints
        self.test_results: dict | None = None
        self.decode_failures: dict[str, int] = {}  # training files that failed to decode -> times replaced
        self.step_seconds: list[float] = []  # wall time of each training step (the batch already loaded)
        self._step_start = 0.0
        self._counted_iteration = -1  # the iteration whose optimizer step Lightning counted last
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def setup(self, stage: str) -> None:
        """Compile the segmenter for training when asked (``compile``)."""
        options = self.hparams.get("compile")
        if stage == "fit" and options and self.net is not None and not getattr(self, "_compiled", False):
            self.net.compile(**(dict(options) if isinstance(options, dict) else {}))
            self._compiled = True

    # -- hooks a method overrides -------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the method's own networks (discriminators, a translator) as submodules."""

    def configure_losses(self) -> None:
        self.seg_criterion = nn.CrossEntropyLoss(ignore_index=self.hparams.ignore_index)

    def configure_metrics(self) -> None:
        self.val_metrics = SegmentationMetrics(self.hparams.num_classes, self.hparams.ignore_index)
        self.test_metrics = SegmentationMetrics(self.hparams.num_classes, self.hparams.ignore_index)

    # -- shared pieces ------------------------------------------------------------------------
    def forward(self, image: torch.Tensor):
        return self.net(image)

    def to_memory_format(self, image: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and image.ndim == 4:
            return image.contiguous(memory_format=torch.channels_last)
        return image

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """0–255 images (as the data loaders deliver them) -> the network's normalised float input, in its
        memory format."""
        return self.to_memory_format(normalize(image))

    def normalize_images(self, batch):
        """Every ``image`` of a (nested) batch through :meth:`normalize`."""
        if isinstance(batch, dict):
            return {k: (self.normalize(v) if k == "image" and isinstance(v, torch.Tensor)
                        else self.normalize_images(v)) for k, v in batch.items()}
        return batch

    def transform_training_batch(self, batch: dict) -> dict:
        """Batch-level operations on the raw 0–255 training images, on the device, before normalisation
        (FDA's spectrum swap, mixing). None here."""
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the device, after the transfer: the method's batch transform on a training batch
        (``{"source", "target"}``), then every image normalised (training, validation and test alike)."""
        if isinstance(batch, dict) and "source" in batch:
            batch = self.transform_training_batch(batch)
        return self.normalize_images(batch)

    def segmentation_loss(self, outputs, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Cross-entropy on the main output plus each deep-supervision head weighted by ``net.aux_weights``;
        returns (total, parts) with parts ``loss_seg`` and ``loss_aux/<head>``."""
        outputs = as_outputs(outputs)
        weights = getattr(self.net, "aux_weights", {})
        parts = {"loss_seg": self.seg_criterion(outputs.out, label)}
        total = parts["loss_seg"]
        for name, logits in outputs.aux.items():
            if name not in weights:
                raise ConfigValueError(f"{type(self.net).__name__} returned auxiliary head {name!r} but no aux_weights[{name!r}]")
            parts[f"loss_aux/{name}"] = self.seg_criterion(logits, label)
            total = total + weights[name] * parts[f"loss_aux/{name}"]
        return total, parts

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
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        source = batch["source"]
        loss, parts = self.segmentation_loss(self.net(source["image"]), source["label"])
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=source["image"].shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=source["image"].shape[0])
        return loss

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Count the training files that failed to decode and were replaced (``"skipped"`` in the batch);
        warn once per file. Starts the step's clock (the method's cost per iteration, without data loading
        and validation, is reported in results.json)."""
        self._step_start = time.perf_counter()
        for domain in batch.values():
            for entry in (domain.get("skipped", ()) if isinstance(domain, dict) else ()):
                for path in filter(None, entry.split(os.pathsep)):
                    if path not in self.decode_failures:
                        log.warning("a training file failed to decode and is replaced by the next sample "
                                    "(counted in results.json): %s", path)
                    self.decode_failures[path] = self.decode_failures.get(path, 0) + 1

    def on_train_end(self) -> None:
        """Gather every process's decode failures, so the run's results list them all."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.decode_failures)
            merged: dict[str, int] = {}
            for part in gathered:
                for path, n in part.items():
                    merged[path] = merged.get(path, 0) + n
            self.decode_failures = merged

    @property
    def iteration(self) -> int:
        """Training iterations started so far (this one included), whatever number of optimizers step."""
        trainer = self._trainer  # None outside a Trainer (a module saved or checked by hand)
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready) if trainer is not None else 0

    def step_optimizer(self, optimizer) -> None:
        """Step one optimizer and its poly schedule under manual optimization, counting training iterations.

        The first optimizer stepped in an iteration steps through Lightning (``LightningOptimizer.step``:
        it increments ``global_step``); any other in the same iteration calls the strategy's
        ``optimizer_step`` directly, which is what ``LightningOptimizer.step`` runs between its counter
        hooks: precision plugin (AMP scaling), ``on_before_optimizer_step`` (gradient clipping), strategy.
        The optimizer's scheduler steps right after it, as Lightning does in automatic optimization (and
        before any ``on_train_batch_end`` checkpoint, so a checkpoint never holds a schedule one step
        behind its weights). Every iteration must step at least one optimizer, each at most once."""
        inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer a LightningOptimizer wraps
        if self._counted_iteration != self.iteration:
            self._counted_iteration = self.iteration
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(inner, closure=_no_closure)
        for config in self.trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is inner:
                config.scheduler.step()

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.gradient_clip_val:  # after AMP unscaling, before the step, in either optimization mode
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Stop at the first non-finite loss. ``training_step`` returns its loss, or a dict of named losses
        (every method does): one flag is reduced across processes so that all ranks stop together."""
        if isinstance(outputs, torch.Tensor):
            outputs = {"loss": outputs}
        losses = {k: v for k, v in (outputs or {}).items() if isinstance(v, torch.Tensor)}
        # one host sync per iteration for all losses (a NaN or inf anywhere makes the mean non-finite)
        finite = not losses or bool(torch.isfinite(torch.stack([v.detach().float().mean() for v in losses.values()])).all())
        self.step_seconds.append(time.perf_counter() - self._step_start)  # after that sync: the step's real time
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            bad = {k: float(v.detach().float().mean()) for k, v in losses.items() if not torch.isfinite(v.detach()).all()}
            where = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "a loss on another process is not finite"
            raise TrainingDiverged(f"training diverged at iteration {self.iteration}: {where}. The run stopped; "
                                   "no checkpoint of the diverged weights was kept (try a lower optimizer.lr)")

    def check_weights_finite(self, when: str) -> None:
        """A NaN/inf weight or BatchNorm statistic (an infinite gradient on a finite loss) stops the run
        before the diverged network is scored or saved."""
        bad = [name for name, t in self.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise TrainingDiverged(f"training diverged by iteration {self.iteration}: {len(bad)} weights are not "
                                   f"finite (e.g. {bad[0]}) {when}. The run stopped; no checkpoint of them was kept "
                                   "(try a lower optimizer.lr)")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self.check_weights_finite("before validation")

    # -- evaluation on the target ---------------------------------------------------------------
    def _eval_step(self, batch: dict, batch_idx: int, metrics: SegmentationMetrics, stage: str) -> None:
        label = batch["label"]
        logits = self.predict_logits(batch["image"], label.shape[-2:])
        metrics.update(logits.argmax(dim=1), label)
        if stage == "val" and batch_idx == 0 and self.hparams.num_log_images > 0:
            self.log_predictions(batch, logits.argmax(dim=1), stage)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics, "test")

    def _log_epoch_metrics(self, metrics: SegmentationMetrics, stage: str) -> dict:
        result = metrics.compute()
        metrics.reset()
        values = {f"{stage}/acc": result["acc"], f"{stage}/mAcc": result["mAcc"]}
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

    def save_training_samples(self, name: str, rows: list[np.ndarray], caption: str) -> None:
        """Rows of HxWx3 uint8 panels stacked into ``<run>/<name>.png`` and logged as ``train/<name>`` to
        image-capable loggers (W&B); on rank 0 only. What a method's batch transform made, for the notebooks."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        from PIL import Image

        grid = np.concatenate(rows, axis=0)
        path = Path(self.trainer.default_root_dir) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"train/{name}", images=[grid], step=0, caption=[caption])

    def log_predictions(self, batch: dict, preds: torch.Tensor, stage: str) -> None:
        """Save image | truth | prediction panels as a PNG in the run folder, and to W&B when it logs."""
        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        n = min(self.hparams.num_log_images, preds.shape[0])
        grid = np.concatenate([prediction_panel(batch["image"][i], batch["label"][i], preds[i]) for i in range(n)], axis=0)
        from PIL import Image

        folder = Path(self.trainer.default_root_dir) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(folder / f"{stage}_step{self.global_step:06d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"{stage}/predictions", images=[grid], step=self.global_step,
                                 caption=["image | ground truth | prediction"])

    # -- optimisation ---------------------------------------------------------------------------
    def parameter_groups(self, base_lr: float) -> list[dict]:
        """Backbone at ``base_lr``, the rest at ``head_lr_mult * base_lr``; frozen parameters left out."""
        mult = self.hparams.head_lr_mult
        if mult is None:
            mult = getattr(self.net, "head_lr_mult", 1.0)
        backbone_fn = getattr(self.net, "backbone_parameters", None)
        if mult == 1.0 or backbone_fn is None:
            return [{"params": [p for p in self.net.parameters() if p.requires_grad], "lr": base_lr}]
        backbone_ids = {id(p) for p in backbone_fn()}
        backbone = [p for p in self.net.parameters() if p.requires_grad and id(p) in backbone_ids]
        head = [p for p in self.net.parameters() if p.requires_grad and id(p) not in backbone_ids]
        return [{"params": backbone, "lr": base_lr}, {"params": head, "lr": base_lr * mult}]

    def max_iterations(self) -> int:
        """Training iterations of the run (``trainer.max_steps``: one per batch, whatever the optimizers)."""
        steps = self.trainer.max_steps
        if steps is None or steps < 0:
            steps = int(self.trainer.estimated_stepping_batches)
        return max(int(steps), 1)

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_weights_finite("when saving a checkpoint")
        if self.run_config is not None:
            checkpoint["rtda"] = self.run_config
