"""``rtda-train``: seed, build data / network / method / trainer from the Hydra config, fit, test, summarise.

    rtda-train                                     # source-only BiSeNet-R18 on the built-in demo pair
    rtda-train experiment=demo_oracle              # trained on the target's labels: the upper bound
    rtda-train -m augmentation=none,geometric      # a sweep, one run folder per job
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from rtda.adaptation.base import build_method, trains_segmenter
from rtda.run import config as rtda_config
from rtda.run.callbacks import GracefulStop
from rtda.run.checkpoints import check_checkpoint_fits
from rtda.run.ddp import (
    launches_processes,
    run_job_as_own_command,
    shares_the_sweep_process,
    use_rtda_ddp_children,
)
from rtda.run.errors import (
    ConfigValueError,
    RtdaError,
    RunInterrupted,
    log_to_files,
    one_line,
)
from rtda.run.files import atomic_write_text, check_writable, holding_read_locks, holding_run_folder
from rtda.run.launchers import job_resources, trainer_plugins
from rtda.run.loggers import HistoryKeepingCSVLogger
from rtda.run.results import completed_job, format_summary

log = logging.getLogger("rtda")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``auto`` -> the newest whole checkpoint of this run folder: ``checkpoints/last.ckpt`` as a rule (resume
    after preemption), or Lightning's ``hpc_ckpt_N.ckpt`` when its SLURM auto-requeue saved a newer one; none
    (a fresh run): None, training starts from scratch.

    A checkpoint cut short (the job was killed while writing it: Lightning does not write checkpoints
    atomically) is passed over, with a warning, for the next newest.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        last = output_dir / "checkpoints" / "last.ckpt"
        found = [*output_dir.glob("checkpoints/*.ckpt"), *output_dir.glob("hpc_ckpt_*.ckpt")]
        # newest first; at equal times last.ckpt first (the top-k file of the same validation holds the same state)
        found.sort(key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)
        for candidate in found:
            if zipfile.is_zipfile(candidate):
                return str(candidate)
            log.warning(f"ckpt_path=auto: {candidate} is truncated (the job was killed while writing it); passed over")
        if last.is_file():
            log.warning(f"ckpt_path=auto: no whole checkpoint in {last.parent}; starting afresh")
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return ckpt_path


def resumed_iteration(ckpt_path: str | None) -> int | None:
    """The training iteration a checkpoint was taken at (``global_step``), or None."""
    if ckpt_path is None:
        return None
    import torch

    try:
        return int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    except Exception:  # a file check_checkpoint_fits accepted but without a step: nothing to trim
        return None


def set_aside_hpc_checkpoints(output_dir: Path) -> None:
    """A run that does not resume (``ckpt_path=null``, or no whole checkpoint) in a folder holding Lightning's
    ``hpc_ckpt_N.ckpt``: inside a SLURM job Lightning would resume from (and test) that file whatever
    ``ckpt_path`` says. Renamed ``unused-hpc_ckpt_N.ckpt`` (kept, out of Lightning's sight)."""
    for path in sorted(output_dir.glob("hpc_ckpt_*.ckpt")):
        target = path.with_name(f"unused-{path.name}")
        path.rename(target)
        log.warning(f"{path} set aside as {target.name}: this run does not resume from it (ckpt_path)")


def random_init_warning(cfg: DictConfig) -> str | None:
    """Real data with a randomly initialised network: the most common cause of far-too-low baselines."""
    pretrained = cfg.model.get("pretrained")
    real_data = cfg.data.get("prepare") is None  # the built-in demo is generated; real datasets are not
    if real_data and (pretrained is None or pretrained is False or str(pretrained).lower() == "false"):
        return ("model.pretrained=false on real data: the network trains from random initialisation and will "
                "score far below the references. Use model.pretrained=true (torchvision's ImageNet weights, where the "
                "network has them) or the authors' file (model.pretrained=/path/to/FILE).")
    return None


def destinations(cfg: DictConfig) -> dict[str, Path]:
    """Every folder the run writes into, with what goes there (checked before the first iteration)."""
    out = {"the run's results and logs": Path(cfg.paths.output_dir)}
    ckpt = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    if ckpt:
        out["checkpoints"] = Path(ckpt)
    for name, logger in (cfg.get("logger") or {}).items():
        if isinstance(logger, DictConfig) and logger.get("save_dir"):
            out[f"the {name} logger's files"] = Path(logger.save_dir)
    return out


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def log_lines(text: str) -> None:
    """Print ``text`` on the console and append it to the run's ``train.log`` (the summary, as the user saw it)."""
    print(text)
    for line in text.splitlines():
        log_to_files(line, logging.INFO)


def write_results(output_dir: Path, results: dict) -> None:
    if is_rank_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))


def method_strategy(strategy, module) -> dict:
    """``{"strategy": ...}`` with the options the method needs (``module.strategy_options``, e.g. DDP's
    ``find_unused_parameters`` for adversarial methods) applied to a named DDP strategy, so the user never
    has to know them; ``{}`` (keep the trainer config's strategy) when the method needs none."""
    options = dict(getattr(module, "strategy_options", None) or {})
    if not options or not isinstance(strategy, str) or not strategy.startswith("ddp"):
        return {}
    from pytorch_lightning.strategies import StrategyRegistry

    if strategy not in StrategyRegistry:
        raise ConfigValueError(f"trainer.strategy={strategy!r}: expected one of {sorted(StrategyRegistry)}")
    entry = StrategyRegistry[strategy]
    return {"strategy": entry["strategy"](**{**entry["init_params"], **options})}


def supported_precision(trainer_cfg: DictConfig) -> dict:
    """``{"precision": "16-mixed"}`` (float16 with a gradient scaler) when the config asks for ``bf16-mixed``
    on a GPU that lacks bfloat16 (before Ampere: it would run emulated, slowly), with a warning; else ``{}``."""
    precision = str(trainer_cfg.get("precision", ""))
    if not precision.startswith("bf16") or trainer_cfg.get("accelerator") not in ("gpu", "cuda", "auto"):
        return {}
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        fallback = "16-mixed" if precision.endswith("mixed") else "16-true"
        log.warning("trainer.precision=%s: %s has no bfloat16; training in %s instead", precision,
                    torch.cuda.get_device_name(), fallback)
        return {"precision": fallback}
    return {}


def without_segmenter_callbacks(callbacks_cfg: DictConfig | None, val_check_interval) -> DictConfig | None:
    """The callbacks of a run with no segmenter (nothing logs ``val/*``): a ``ModelCheckpoint`` loses its
    monitor and saves every ``val_check_interval`` iterations (``step<N>.ckpt``, the latest kept, plus
    ``last.ckpt``); an ``EarlyStopping`` on a metric is dropped."""
    if not callbacks_cfg:
        return callbacks_cfg
    out = OmegaConf.create(OmegaConf.to_container(callbacks_cfg, resolve=True))
    for name in list(out):
        node = out[name]
        target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
        if target.endswith("EarlyStopping"):
            log.info("callbacks.%s dropped: the method has no segmenter, so nothing is validated", name)
            del out[name]
        elif target.endswith("ModelCheckpoint") and node.get("monitor"):
            node.monitor = None
            node.mode = "min"
            node.filename = "step{step:06d}"
            if isinstance(val_check_interval, int):
                node.every_n_train_steps = val_check_interval
            else:
                node.every_n_epochs = 1
                node.save_on_train_epoch_end = True
    return out


def train(cfg: DictConfig, job_config: dict | None = None) -> dict:
    """Run one experiment; returns the results written to ``results.json``.

    A failure (a user error, divergence, an interruption, a bug) still writes ``results.json`` with
    ``"status": "failed"`` and the error, flushes the loggers and keeps every checkpoint written so far,
    then re-raises: the job exits non-zero, and a sweep records it and goes on with its other jobs.
    """
    output_dir = Path(cfg.paths.output_dir)
    record = {
        "status": "running",
        "experiment": rtda_config.describe(cfg),
        "choices": rtda_config.choices(),
        "overrides": rtda_config.overrides(),
        "seed": cfg.get("seed"),
        "run_dir": str(output_dir.resolve()),
        "git_revision": _git_revision(),
        # what the job is, to recognise it when a sweep is started again into the same folder (results.completed_job)
        "config": job_config if job_config is not None else OmegaConf.to_container(cfg, resolve=True),
    }
    state: dict = {}
    try:
        # on disk from the start: a job killed hard (SIGKILL, preemption) shows as "running" to rtda-compare
        try:
            write_results(output_dir, {**record, "started": _now()})
        except OSError:
            pass  # an unwritable folder: _train's check names it
        results = _train(cfg, record, state)
    except BaseException as err:
        module, ckpt_cb = state.get("module"), state.get("checkpoint_callback")
        last = Path(ckpt_cb.dirpath) / "last.ckpt" if ckpt_cb is not None and ckpt_cb.dirpath else None
        interrupted = isinstance(err, RunInterrupted)
        if type(err).__name__ == "SIGTERMException":  # Lightning's (outside training iterations): exit status 0
            err = RunInterrupted("SIGTERM outside a training iteration (setting up, validating or testing): the last "
                                 "checkpoint is the newest whole one; the same command resumes from it")
            interrupted = True
        failed = {
            **record,
            "status": "interrupted" if interrupted else "failed",
            "error": (str(err) if interrupted else
                      "interrupted" if isinstance(err, KeyboardInterrupt) else  # Lightning turns Ctrl+C into exit(1)
                      f"stopped (exit status {err.code}): interrupted or killed" if isinstance(err, SystemExit)
                      else one_line(err)),
            "error_type": type(err).__name__,
            "last_checkpoint": str(last.resolve()) if last is not None and last.is_file() else None,
            "decode_failures": getattr(module, "decode_failures", {}),
        }
        if interrupted:
            failed.update({"interrupted_at": err.iteration, "requeued": err.requeue is not None})
            if is_rank_zero():
                print(f"rtda: interrupted: {err}", file=sys.stderr, flush=True)
        log_to_files(f"run {failed['status']}: {failed['error']}")
        try:
            write_results(output_dir, failed)
        except OSError:
            pass  # the destination itself is the problem: the error says so
        if interrupted and err.requeue is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # SLURM's SIGTERM to a requeued job: all is saved already
            if not err.requeue():
                write_results(output_dir, {**failed, "requeued": False})
        if interrupted:
            raise err from None
        raise
    write_results(output_dir, results)
    if is_rank_zero():
        log_lines(format_summary(results))
    return results


def _train(cfg: DictConfig, record: dict, state: dict) -> dict:
    import pytorch_lightning as pl

    rtda_config.check_values(cfg)
    for what, folder in destinations(cfg).items():
        check_writable(folder, what)
    segmenter = trains_segmenter(cfg.adaptation)  # False: a translator (CycleGAN), no model to build, validate or test
    warnings_seen = [w for w in [random_init_warning(cfg) if segmenter else None] if w]
    for warning in warnings_seen:
        log.warning(warning)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data, augmentation=cfg.get("augmentation"))
    net = hydra.utils.instantiate(cfg.model) if segmenter else None
    module = build_method(cfg.adaptation, net=net, optimizer=hydra.utils.instantiate(cfg.optimizer) if segmenter else None)
    state["module"] = module
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["model"].update(getattr(net, "rebuild_kwargs", {}))  # what the weights decided, to rebuild without them
    # saved in every checkpoint: the resolved config (what the weights need) and the command line that made
    # it (so rtda-eval can recompose the run's data with today's paths)
    module.run_config = {"config": resolved, "overrides": record["overrides"], "choices": record["choices"]}
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.output_dir))
    if ckpt_path is not None:
        check_checkpoint_fits(ckpt_path, module)
    elif is_rank_zero():
        set_aside_hpc_checkpoints(Path(cfg.paths.output_dir))
    if is_rank_zero():  # a checkpoint being written when the job was killed: its temporary file (this run holds the folder)
        for stale in Path(cfg.paths.output_dir).glob("checkpoints/.*.ckpt.*.tmp"):
            stale.unlink(missing_ok=True)

    loggers = list(rtda_config.instantiate_dict(cfg.get("logger")).values())
    resumed_at = resumed_iteration(ckpt_path) if cfg.get("train", True) else None
    if resumed_at is not None and is_rank_zero():
        log.info(f"resumed from iteration {resumed_at} of {cfg.trainer.max_steps}: {ckpt_path}")
        record["resumed_from"] = {"iteration": resumed_at, "checkpoint": str(Path(ckpt_path).resolve())}
        for logger in loggers:  # rows logged after the checkpoint, before the job died, are logged again
            if isinstance(logger, HistoryKeepingCSVLogger):
                logger.forget_from(resumed_at)
    callbacks_cfg = cfg.get("callbacks") if segmenter else without_segmenter_callbacks(
        cfg.get("callbacks"), cfg.trainer.get("val_check_interval"))
    callbacks = list(rtda_config.instantiate_dict(callbacks_cfg).values())
    if not loggers:  # LearningRateMonitor refuses to run without a logger; nothing to monitor into
        callbacks = [cb for cb in callbacks if not isinstance(cb, pl.callbacks.LearningRateMonitor)]
    use_rtda_ddp_children()
    no_eval = {} if segmenter else {"limit_val_batches": 0, "limit_test_batches": 0}
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                  **method_strategy(cfg.trainer.get("strategy"), module),
                                                  **supported_precision(cfg.trainer),
                                                  **trainer_plugins(), **no_eval)
    for logger in loggers:
        logger.log_hyperparams({**resolved, "git_revision": record["git_revision"]})

    ckpt_cb = state["checkpoint_callback"] = trainer.checkpoint_callback
    tested = None
    status = "failed"
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            if ckpt_cb is not None and ckpt_cb.dirpath:
                # last.ckpt = the final weights, even when training stopped between two validations
                tested = str(Path(ckpt_cb.dirpath) / "last.ckpt")
                trainer.save_checkpoint(tested, weights_only=False)
        elif ckpt_path:
            tested = ckpt_path
        # read before testing: trainer.test(ckpt_path=...) restores the callbacks' states from the file it loads
        best = getattr(ckpt_cb, "best_model_path", "") or None
        best_score = getattr(ckpt_cb, "best_model_score", None) if ckpt_cb else None
        if cfg.get("test", True) and segmenter:
            if cfg.get("test_ckpt") == "best" and best:
                tested = best
            # always a file: with none, Lightning inside a SLURM job tests the hpc_ckpt the run resumed from
            trainer.test(module, datamodule=datamodule, ckpt_path=tested, weights_only=True,
                         verbose=False)  # the summary below lists the scores
        status = "success"
    finally:
        for logger in loggers:  # flushes what is buffered (CSV rows), also when the run failed
            logger.finalize(status)
        for callback in trainer.callbacks:  # signals get their handlers back (the next job of a sweep, the shell)
            if isinstance(callback, GracefulStop):
                callback.restore()

    results = {
        **record,
        "status": "completed",
        "test": None,  # a segmenter's scores: its run_results
        "best_val_mIoU": None if best_score is None else float(best_score),
        "best_checkpoint": str(Path(best).resolve()) if best else None,
        "checkpoint": str(Path(tested).resolve()) if tested and Path(tested).is_file() else None,
        "tested_weights": cfg.get("test_ckpt", "last"),
        "warnings": warnings_seen,
        "decode_failures": module.decode_failures,
        "seconds_per_iteration": float(np.median(module.step_seconds)) if module.step_seconds else None,
    }
    if not segmenter:  # nothing validated or tested
        results.update({"best_val_mIoU": None, "best_checkpoint": None, "tested_weights": None})
    results.update(module.run_results(trainer))  # what the method adds (CycleGAN: what it left instead of a score)
    return results


def train_in_own_process(cfg: DictConfig) -> dict:
    """A multi-process (DDP) job of a local sweep: run as its own ``rtda-train`` (see :mod:`rtda.run.ddp`)."""
    code = run_job_as_own_command()
    path = Path(cfg.paths.output_dir) / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"status": "failed", "error": f"exit status {code}"}
    if code != 0 or results.get("status") != "completed":
        raise RtdaError(f"job in {cfg.paths.output_dir} failed: {results.get('error', f'exit status {code}')}")
    return results


def run_job(cfg: DictConfig) -> dict:
    """One job of ``rtda-train`` (a single run or a sweep's job), in its run folder: skipped when a sweep started
    again finds it completed, run as its own process when it launches several (DDP in a local sweep), else
    trained here; returns its results."""
    with holding_run_folder(cfg.paths.output_dir):  # a single run's folder is held already (rtda.run.files.CheckRunFolder)
        results = completed_job(cfg)  # a sweep started again: its completed jobs are not trained again
        if results is not None:
            print(f"rtda: job {Path(cfg.paths.output_dir).name}: completed, skipped")
            return results
        if launches_processes(cfg.trainer) and shares_the_sweep_process():
            return train_in_own_process(cfg)
        # a parallel sweep's job: a GPU of its own, or its share of the CPU; the data it reads stays as it is.
        # The job is recorded as configured (job_resources picks its GPU into cfg.trainer.devices)
        job_config = OmegaConf.to_container(cfg, resolve=True)
        with job_resources(cfg), holding_read_locks():
            return train(cfg, job_config)


def optimized_value(cfg: DictConfig, results: dict) -> float | None:
    """The number a Hydra sweeper optimises: ``optimized_metric`` (``val/mIoU`` = the best validation score),
    else the test mIoU; None when there is none."""
    metric = cfg.get("optimized_metric")
    value = results.get("best_val_mIoU") if metric == "val/mIoU" else results.get(metric)
    if value is None:
        value = results.get("test/mIoU")
    return None if value is None or math.isnan(value) else float(value)
