"""Lightning callbacks of rtda's runs (``conf/callbacks/``).

:class:`ModelCheckpoint` (the validation's checkpoint: the best weights by ``val/mIoU``) writes ``last.ckpt`` at
every validation, improved or not.

:class:`LastCheckpoint` keeps ``checkpoints/last.ckpt`` at most N iterations old between validations, and
:class:`GracefulStop` makes it current when the job is told to stop (SIGTERM, SLURM's requeue signal), so a
preempted job loses nothing. Both save only at an iteration boundary, never at one that a validation follows
(the validation's own checkpoint holds that iteration, validated: a checkpoint taken just before a validation
would make the resumed run skip it, Lightning counting it as done).

:class:`RandomState` makes a resumed run draw the same random numbers as an uninterrupted one: Lightning's
checkpoints hold the weights, optimizers, schedules and loop counters, but not the random generators, and a
resumed run restarts them from ``seed`` (``seed_everything``), so the data order and augmentations after a
resume would differ from the run that was never interrupted.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning import callbacks as pl_callbacks
from pytorch_lightning.callbacks import Callback

from rtda.run.errors import ConfigValueError, RunInterrupted

log = logging.getLogger("rtda")


def validation_follows(trainer) -> bool:
    """Whether Lightning validates right after the training batch that just ended (called from
    ``on_train_batch_end``): the rule of its training epoch loop for iteration-based and epoch-based
    validation, without the loop's private method."""
    if not trainer.enable_validation or trainer.limit_val_batches == 0:
        return False
    loop = trainer.fit_loop.epoch_loop
    every_epochs = trainer.check_val_every_n_epoch
    if every_epochs is not None and (trainer.current_epoch + 1) % every_epochs != 0:
        return False
    interval = trainer.val_check_batch
    if interval is None or interval == float("inf"):  # validation at each epoch's end only
        return bool(loop.batch_progress.is_last_batch)
    done = loop.total_batch_idx if every_epochs is None else loop.batch_idx
    return (done + 1) % int(interval) == 0


def checkpoint_folder(trainer) -> Path | None:
    """Where the run keeps ``last.ckpt``: the folder of its validation checkpoint callback."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None)
    return Path(folder) if folder else None


def save_last(trainer, folder: Path) -> Path:
    """Write ``folder/last.ckpt`` (whole or not at all: rtda's checkpoint IO writes a temporary file, then renames).
    Called on every rank (Lightning's save is collective; rank 0 writes)."""
    path = Path(folder) / "last.ckpt"
    trainer.save_checkpoint(str(path), weights_only=False)
    for logger in trainer.loggers:  # the CSV history is flushed with every checkpoint (what ModelCheckpoint does)
        if trainer.checkpoint_callback is not None:
            logger.after_save_checkpoint(trainer.checkpoint_callback)
        else:
            logger.save()
    return path


class ModelCheckpoint(pl_callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (top-k by the monitored score) whose ``save_last`` writes ``last.ckpt`` at every
    validation. Lightning's (2.6.6) ``save_last=True`` writes it only when a top-k file was saved at that step: a
    validation that did not improve left ``last.ckpt`` up to ``val_check_interval`` iterations old — a killed run
    resumed from there, and at the end of training ``last.ckpt`` was not the final weights. Lightning's own
    ``_save_last_checkpoint`` does the writing (private helpers of ``ModelCheckpoint``, read in 2.6.6;
    ``tests/test_run_safety.py`` fails if they stop writing it)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if due:
            self._last_too(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if due:
            self._last_too(trainer)

    def _last_too(self, trainer) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:  # no top-k file (and no last) now
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class LastCheckpoint(Callback):
    """``last.ckpt`` every ``every_n_train_steps`` training iterations, between validations (which write their
    own): a killed or preempted job resumes (``ckpt_path=auto``) losing at most N iterations.

    One file, overwritten in place (Lightning's second ``ModelCheckpoint(save_last=True)`` in the same folder wrote
    ``last-v1.ckpt`` beside the validation callback's ``last.ckpt``); an iteration a validation follows is left to
    the validation's checkpoint, so that a resumed run never skips a validation."""

    def __init__(self, every_n_train_steps: int = 500, dirpath: str | None = None):
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ConfigValueError(f"callbacks.periodic_checkpoint.every_n_train_steps={every_n_train_steps!r}: "
                                   "expected a positive number of iterations")
        self.every_n_train_steps = every_n_train_steps
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_train_steps or validation_follows(trainer) or trainer.sanity_checking:
            return
        folder = Path(self.dirpath) if self.dirpath else checkpoint_folder(trainer)
        if folder is not None:
            save_last(trainer, folder)


class GracefulStop(Callback):
    """A job told to stop finishes its iteration, saves it and exits, instead of dying mid-step.

    - ``SIGTERM`` (Kubernetes, a scheduler's grace period, ``kill``): ``last.ckpt`` of the current iteration, then
      the run ends ``"status": "interrupted"`` naming it; the same command resumes from it.
    - SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@120`` in a plain ``sbatch`` + ``srun`` job): the same, then
      ``scontrol requeue`` — rtda's replacement for Lightning's auto-requeue, which saved ``hpc_ckpt_N.ckpt`` from
      inside the signal handler, mid-iteration (the resumed run's steps came out shifted by one).
      Inside a submitit job (``hydra/launcher=slurm``) submitit owns the requeue signal (USR2) and requeues itself.

    The signal only sets a flag; the work happens at the next iteration boundary (all DDP ranks agree on it). At
    an iteration a validation follows, the validation runs first and its checkpoint is the one kept."""

    def __init__(self, requeue_signal: str | None = "SIGUSR1"):
        self.requeue_signal = requeue_signal
        self._received: str | None = None
        self._pending: Path | None = None  # the checkpoint holding the iteration the job stops after
        self._previous: dict = {}

    # -- signals ------------------------------------------------------------------------------------------------
    def _requeue_signum(self) -> int | None:
        """The signal that asks this job to save and requeue: submitit's (USR2) in its jobs, ``requeue_signal`` in
        a plain SLURM job, none elsewhere."""
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        elif self.requeue_signal and os.environ.get("SLURM_JOB_ID"):
            name = str(self.requeue_signal)
        else:
            return None
        name = name.upper()
        return getattr(signal, name if name.startswith("SIG") else f"SIG{name}")

    def _signals(self) -> list[int]:
        requeue = self._requeue_signum()
        return [signal.SIGTERM] + ([requeue] if requeue is not None else [])

    def _handler(self, signum, frame) -> None:
        # only a flag: Lightning's own SIGTERM handler is not called, as it would abort a validation under way
        # (its evaluation loop stops on a noted SIGTERM) and the run would lose that iteration's checkpoint
        self._received = signal.Signals(signum).name

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self._signals():
            current = signal.getsignal(signum)
            if current != self._handler:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._handler)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # from the start of fit (and through the test stage, where a signal only sets the flag: the run completes)
        self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        # again: Lightning installs its own SIGTERM handler after setup, and it would abort a validation under way
        self._install()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._pending is not None:  # asked at the last iteration: training is complete, the job still stops
            self._stop(trainer, self._pending)

    def restore(self) -> None:
        """Give the signals back their handlers from before this run (rtda.pipelines.train calls it when the run ends)."""
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    # -- at iteration boundaries --------------------------------------------------------------------------------
    def _asked_to_stop(self, trainer) -> bool:
        asked = self._received is not None
        if trainer.world_size > 1:
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        return bool(asked)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending is not None or not self._asked_to_stop(trainer):
            return
        folder = checkpoint_folder(trainer)
        if folder is not None and validation_follows(trainer):
            self._pending = folder / "last.ckpt"  # written by the validation's checkpoint, after it
        else:
            self._pending = save_last(trainer, folder or Path(trainer.default_root_dir) / "checkpoints")
        # the job stops before the next iteration: Lightning logs this one's losses first (and validates, if due)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            self._stop(trainer, self._pending)

    def _stop(self, trainer, saved: Path) -> None:
        self._pending = None
        what = self._received or "SIGTERM"
        requeue = self._requeue_action(trainer) if what != "SIGTERM" else None
        action = f"requeueing SLURM job {_slurm_job_id()}" if requeue else "stopped; the same command resumes from it"
        log.warning("%s at iteration %d: %s saved; %s", what, trainer.global_step, saved, action)
        # the requeue itself comes last (rtda.pipelines.train, once results.json says so): SLURM ends the job right after it
        raise RunInterrupted(f"{what} at iteration {trainer.global_step}: {saved} holds it; {action}",
                             iteration=trainer.global_step, checkpoint=str(saved), requeue=requeue)

    def _requeue_action(self, trainer):
        """What requeues this job: submitit's own handler in its jobs (re-pickles the job, ``scontrol requeue``;
        on rank 0 only), else ``scontrol requeue`` (rank 0; the other ranks only stop)."""
        signum = self._requeue_signum()
        submitit = self._previous.get(signum) if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" else None

        def requeue() -> bool:
            try:
                if callable(submitit):
                    try:
                        submitit(signum, None)
                    except SystemExit:  # submitit exits once it has requeued
                        pass
                    return True
                if not trainer.is_global_zero:
                    return True
                job = _slurm_job_id()
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                if result.returncode != 0:
                    log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
                return result.returncode == 0
            except Exception as err:  # noqa: BLE001 -- no scontrol, submitit out of retries: the job just stops
                log.warning("the job was not requeued: %s", err)
                return False

        return requeue


def _slurm_job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


class RandomState(Callback):
    """Save the Python, NumPy, torch (CPU and CUDA) random states in every checkpoint; restore them on resume.

    Stored as tensors and ints only, so that checkpoints still load with ``weights_only=True``. The order and
    augmentation of the training samples do not depend on these states (they are a pure function of the seed and
    the sample's position, :mod:`rtda.data.samplers`); what a method draws itself (DACS's mixing masks, MIC's
    masks, dropout) does, and continues here as in the uninterrupted run.
    """

    def state_dict(self) -> dict:
        version, keys, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state = {
            "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        py = state["python"]
        random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
