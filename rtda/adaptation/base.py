"""The training core every method stands on (torchgeo's ``BaseTask`` pattern, without the task): a
LightningModule that counts iterations, steps optimizers, stops at the first non-finite loss, logs the named
losses a ``training_step`` returns, times steps, keeps decode failures and saves sample pictures. What the
run's commands need from a method is declared here (:class:`TrainingModule`'s class attributes and
:meth:`TrainingModule.run_results`), never read from its name or its keys.

A method returns its losses from ``training_step`` — a tensor, or a dict of named tensors with the total as
``"loss"`` — and the core logs each as ``train/<name>`` (``train/loss`` on the progress bar). Hyperparameters
are saved for it (:meth:`TrainingModule.on_save_checkpoint` turns Hydra's list and dict nodes into plain
containers, so checkpoints load with ``weights_only=True`` whatever its YAML says).

**Iterations, not optimizer steps.** Lightning's ``global_step`` counts ``optimizer.step()`` calls, so
a method stepping three optimizers would end after a third of ``trainer.max_steps`` iterations, with a
poly schedule cut short and checkpoints named by optimizer steps. Methods with several optimizers use manual
optimization and step them with :meth:`TrainingModule.step_optimizer`: the first optimizer stepped in
an iteration goes through Lightning's ``LightningOptimizer.step`` (counted); the others go straight to
``trainer.strategy.optimizer_step`` — the very call ``LightningOptimizer.step`` wraps, so the precision
plugin (AMP loss scaling and unscaling, ``on_before_optimizer_step`` hooks) and the strategy still run —
without the step counter. ``global_step``, ``max_steps``, ``val_check_interval``, checkpoint names, logged
steps and ``ckpt_path=auto`` resume therefore all count training iterations; each poly scheduler steps
with its optimizer, once per iteration (Lightning does not step schedulers under manual optimization).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from rtda.run.errors import TrainingDiverged

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


def plain(value):
    """Hydra's ``DictConfig`` / ``ListConfig`` (anywhere inside ``value``) as plain dicts and lists: what
    ``torch.load(weights_only=True)`` accepts in a checkpoint's hyperparameters."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def method_class(node: DictConfig | dict | None) -> type[TrainingModule] | None:
    """The class an ``adaptation`` config node names (its ``_target_``), read before anything is built; None
    when it names none or does not import (``hydra.utils.instantiate`` then reports it in one line)."""
    target = (node or {}).get("_target_")
    try:
        return hydra.utils.get_class(target) if target else None
    except Exception:  # noqa: BLE001 -- instantiate() names the bad target
        return None


def trains_segmenter(node: DictConfig | dict | None) -> bool:
    """Whether the method of an ``adaptation`` node trains a segmentation network (its ``trains_segmenter``)."""
    cls = method_class(node)
    return bool(getattr(cls, "trains_segmenter", True)) if cls is not None else True


def build_method(node: DictConfig | dict, net=None, optimizer=None) -> TrainingModule:
    """The method of an ``adaptation`` node, given the segmenter and its optimizer when it trains one."""
    given = {"net": net, "optimizer": optimizer} if trains_segmenter(node) else {}
    return hydra.utils.instantiate(node, **given)


class TrainingModule(pl.LightningModule):
    """What every method shares, and what it declares to the commands that run it.

    The declared interface (class attributes a method sets; ``rtda-train``, ``rtda-eval``, ``rtda-bench`` and
    the checkpoint readers read only these):

    - ``trains_segmenter``: whether the method trains a segmentation network (``rtda-train`` builds the
      ``model`` group, validates and tests it; ``rtda-eval`` scores its checkpoints). A method that does not
      (CycleGAN's translator) gets no network, no validation or test, and checkpoints without a monitor.
    - ``uses_target_images`` / ``uses_target_labels``: what the DataModule delivers in ``batch["target"]``.
    - ``strategy_options``: keyword arguments a DDP strategy needs for this method (``find_unused_parameters``).
    - ``picture_options``: hyperparameters that only save pictures (``rtda-bench bench.mode=train`` sets them
      to 0 so a timed iteration never writes a PNG).
    - ``learning_rate_options``: the method's own learning rates besides ``optimizer.lr``.
    - ``checkpoint_hint``: what to do with a checkpoint of the method when a segmenter is asked of it.
    - :meth:`run_results`: what the method adds to ``results.json`` at the end of a run.

    Args:
        gradient_clip_val: clip every optimizer's gradient norm to this value before its step (null: no
            clipping, as the references). Works with manual optimization, unlike ``trainer.gradient_clip_val``.
        channels_last: the method's networks and inputs in NHWC memory format (:meth:`to_memory_format`).
    """

    trains_segmenter: bool = False
    uses_target_images: bool = False
    #: True for a method training on (pseudo-)labelled target images (FDA's self-training round)
    uses_target_labels: bool = False
    #: keyword arguments a DDP strategy needs for this method (rtda-train applies them to ``trainer.strategy``)
    strategy_options: dict = {}
    #: hyperparameters that only save pictures; rtda-bench sets them to 0 (or False) for its timed iterations
    picture_options: tuple[str, ...] = ()
    #: the method's own learning rates besides ``optimizer.lr`` (rtda-bench scales them all by ``bench.lr_scale``)
    learning_rate_options: tuple[str, ...] = ()
    #: shown when a segmenter is asked of this method's checkpoint ({path}: the file)
    checkpoint_hint: str = ""

    def __init__(self, gradient_clip_val: float | None = None, channels_last: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"])  # every __init__ argument of the method's class chain
        self.run_config: dict | None = None  # config, overrides and choices of the run, saved into checkpoints
        self.decode_failures: dict[str, int] = {}  # training files that failed to decode -> times replaced
        self.step_seconds: list[float] = []  # wall time of each training step (the batch already loaded)
        self._step_start = 0.0
        self._counted_iteration = -1  # the iteration whose optimizer step Lightning counted last

    def run_results(self, trainer: pl.Trainer) -> dict:
        """What this method adds to the run's ``results.json`` (after training and testing)."""
        return {}

    def to_memory_format(self, image: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and image.ndim == 4:
            return image.contiguous(memory_format=torch.channels_last)
        return image

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """0–255 images (as the data loaders deliver them) -> the networks' float input; here ``image / 255``."""
        return self.to_memory_format(image.float() / 255.0)

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

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """Log the named losses ``training_step`` returned (``train/<name>``), then stop at the first
        non-finite one: one flag is reduced across processes so that all ranks stop together."""
        if isinstance(outputs, torch.Tensor):
            outputs = {"loss": outputs}
        losses = {k: v for k, v in (outputs or {}).items() if isinstance(v, torch.Tensor)}
        source = batch.get("source") if isinstance(batch, dict) else None
        n = int(source["image"].shape[0]) if isinstance(source, dict) and "image" in source else 1
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=n)
        if "loss" in losses:
            # under automatic optimization Lightning hands this hook the loss divided by accumulate_grad_batches
            scale = self.trainer.accumulate_grad_batches if self.automatic_optimization else 1
            self.log("train/loss", losses["loss"].detach() * scale, prog_bar=True, batch_size=n)
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
        named = [(name, t) for name, t in self.state_dict().items() if t.is_floating_point() and t.numel()]
        if not named:
            return
        # one max-|x| per tensor in a single fused call (NaN and inf propagate into it), one host sync: an
        # elementwise isfinite per tensor costs ~100x more on a CPU, paid at every validation and checkpoint
        peaks = torch.stack(torch._foreach_norm([t.detach() for _, t in named], ord=float("inf")))
        if bool(torch.isfinite(peaks).all()):
            return
        bad = [name for (name, _), peak in zip(named, peaks.tolist()) if not math.isfinite(peak)]
        if bad:
            raise TrainingDiverged(f"training diverged by iteration {self.iteration}: {len(bad)} weights are not "
                                   f"finite (e.g. {bad[0]}) {when}. The run stopped; no checkpoint of them was kept "
                                   "(try a lower optimizer.lr)")

    def save_training_samples(self, name: str, rows: list[np.ndarray], caption: str) -> None:
        """Rows of HxWx3 uint8 panels stacked into ``<run>/<name>.png`` and logged as ``train/<name>`` to
        image-capable loggers (W&B); on rank 0 only. What a method's batch transform made, for the notebooks."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        grid = np.concatenate(rows, axis=0)
        path = Path(self.trainer.default_root_dir) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"train/{name}", images=[grid], step=0, caption=[caption])

    def max_iterations(self) -> int:
        """Training iterations of the run (``trainer.max_steps``: one per batch, whatever the optimizers)."""
        steps = self.trainer.max_steps
        if steps is None or steps < 0:
            steps = int(self.trainer.estimated_stepping_batches)
        return max(int(steps), 1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_weights_finite("when saving a checkpoint")
        if "hyper_parameters" in checkpoint:  # loadable with weights_only=True, whatever the method's YAML
            checkpoint["hyper_parameters"] = plain(checkpoint["hyper_parameters"])
        if self.run_config is not None:
            checkpoint["rtda"] = self.run_config
