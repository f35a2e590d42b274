"""Jobs of a local parallel sweep (``hydra/launcher=parallel``, Hydra's joblib launcher): one device each.

Several jobs run at once in worker processes of one machine. A single-GPU job takes a GPU that no other job
of the sweep holds (a lock file per GPU in the sweep folder, held until the job ends), so ``n_jobs`` jobs
spread over ``n_jobs`` GPUs instead of all landing on ``cuda:0``. On the CPU each job gets an equal share of
the cores (``torch.set_num_threads``) instead of every job starting one thread per core.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from rtda.run.checkpoints import AtomicCheckpointIO
from rtda.run.config import CONFIG_DIR
from rtda.run.errors import run_cli
from rtda.run.resolvers import device_count

log = logging.getLogger("rtda")


def parallel_jobs() -> int | None:
    """``n_jobs`` when this job runs under the joblib (parallel) launcher, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except ValueError:
        return None
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return None
    n = int(launcher.get("n_jobs") or 1)
    return (os.cpu_count() or 1) if n < 1 else n


def _single_gpu(trainer: DictConfig) -> bool:
    accelerator = str(trainer.get("accelerator", "cpu"))
    return accelerator in ("gpu", "cuda") and trainer.get("devices", 1) in (1, "1") and (trainer.get("num_nodes") or 1) == 1


@contextlib.contextmanager
def job_resources(cfg: DictConfig, poll_seconds: float = 1.0) -> Iterator[None]:
    """Around one job of a parallel sweep: a GPU of its own (``trainer.devices=[k]``), or its share of CPU threads.
    Outside a parallel sweep, does nothing."""
    n_jobs = parallel_jobs()
    if n_jobs is None or n_jobs <= 1:
        yield
        return
    if not _single_gpu(cfg.trainer):
        if str(cfg.trainer.get("accelerator", "cpu")) == "cpu":
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))
        yield
        return
    from filelock import FileLock, Timeout
    from hydra.core.hydra_config import HydraConfig

    gpus = device_count()
    folder = Path(HydraConfig.get().sweep.dir)
    lock = None
    while lock is None:
        for k in range(gpus):
            candidate = FileLock(str(folder / f".gpu{k}.lock"))
            try:
                candidate.acquire(timeout=0)
            except Timeout:
                continue
            lock, gpu = candidate, k
            break
        else:
            time.sleep(poll_seconds)  # every GPU is taken (n_jobs > GPUs): wait for a job to end
    try:
        cfg.trainer.devices = ListConfig([gpu])
        log.info(f"parallel sweep: this job runs on GPU {gpu}")
        yield
    finally:
        lock.release()


def trainer_plugins() -> dict:
    """The Trainer's ``plugins``: rtda's whole-or-nothing checkpoint writer, and — inside a SLURM job — Lightning's
    SLURM environment with its auto-requeue off. Requeueing is left to one mechanism: submitit's in a job of
    ``hydra/launcher=slurm``, rtda's :class:`rtda.run.callbacks.GracefulStop` in a plain ``sbatch`` + ``srun`` job
    (it saves the iteration that ended, where Lightning's handler saved ``hpc_ckpt_N.ckpt`` mid-iteration)."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return {"plugins": plugins}


def sbatch_script(launcher: dict, command: str = "python -u -m submitit.core._submit <folder>") -> str:
    """The sbatch script that ``hydra/launcher=slurm`` would submit for one job, written by submitit itself
    from the resolved launcher config (a dry run: nothing is submitted; works without SLURM)."""
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

    params = {k: v for k, v in launcher.items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout") and v is not None}
    renamed = SlurmExecutor._equivalence_dict()
    params = {renamed.get(k, k): v for k, v in params.items()}
    if "mem" in params:
        params["mem"] = _convert_mem(params["mem"])
    return _make_sbatch_string(command=command, folder=launcher["submitit_folder"], **params)


def main(argv: list[str] | None = None) -> None:
    """``python -m rtda.run.launchers [overrides]``: print the sbatch script of ``rtda-train -m hydra/launcher=slurm
    [overrides]`` without submitting anything (the overrides of one job: no comma lists)."""
    import sys

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    overrides = list(sys.argv[1:] if argv is None else argv)

    def task():
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        print(sbatch_script(launcher))
        print(f"# requeues on timeout/preemption (submitit): {launcher['max_num_timeout']}")

    run_cli(task)


if __name__ == "__main__":
    main()
