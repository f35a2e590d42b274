"""The ``${rtda.…}`` resolvers of ``conf/``: run and sweep-job folder names, the parallel launcher's job count,
the SLURM job's tasks, GPUs, CPUs and memory. Registered once by :func:`register_resolvers` (rtda.run.config)."""

from __future__ import annotations

import hashlib
import os
import re

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import ListConfig, OmegaConf

from rtda.run.errors import ConfigValueError

_UNSAFE = re.compile(r"[^A-Za-z0-9._+@%-]+")  # no "=" or ",": a folder must pass as an unquoted override value


def safe_name(text: str, limit: int = 120) -> str:
    """``text`` as one folder name: no ``/`` or spaces, at most ``limit`` characters (a hash keeps it unique)."""
    name = _UNSAFE.sub("_", str(text)).strip("._") or "_"
    if len(name) > limit:
        name = name[: limit - 9].rstrip("._") + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def slurm_job_name() -> str | None:
    """``slurm-<job id>`` (``slurm-<array job id>_<task id>`` in an array) inside a SLURM job, else None.
    SLURM keeps the job id when it requeues a job, so this names the same folder on every retry."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"slurm-{array}_{task}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def run_name(given, stamp) -> str:
    """The folder name of a single run (``hydra.run.dir``): ``run_name`` when given, else the SLURM job id
    (stable across requeues), else the start time ``stamp``. Registered as the ``rtda.run_name`` resolver."""
    if given not in (None, "", "null"):
        return safe_name(given)
    return slurm_job_name() or str(stamp)


def swept_keys(sweep_dir) -> list[str]:
    """The override keys a ``-m`` sweep varies (``seed=1,2`` -> ``seed``), read from the sweep's
    ``multirun.yaml`` (written before any job starts, on every launcher: local, joblib, submitit)."""
    path = os.path.join(str(sweep_dir), "multirun.yaml")
    try:
        task = OmegaConf.load(path).hydra.overrides.task
    except Exception:  # no file (a job run by hand), unreadable: the job number alone names the folder
        return []
    try:
        parsed = OverridesParser.create().parse_overrides(list(task))
    except Exception:
        return []
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def job_dirname(num, sweep_dir, task_overrides) -> str:
    """The folder name of a sweep job (``hydra.sweep.subdir``): its number, then the values the sweep varies,
    ``3_adaptation-advent_seed-1``: unique (the number), readable (the values), one folder level, and no ``=``
    or ``,`` so that ``ckpt_path=<job>/checkpoints/last.ckpt`` parses as a Hydra override without quotes.
    Registered as the ``rtda.job_dirname`` resolver."""
    keys = set(swept_keys(sweep_dir))
    parts = []
    for text in task_overrides or []:
        key, _, value = str(text).partition("=")
        if key.lstrip("+~") in keys:
            parts.append(f"{key.lstrip('+~')}-{value}")
    return safe_name(f"{num}_{'_'.join(parts)}" if parts else str(num))


def device_count() -> int:
    """GPUs on this machine, at least 1 (the ``rtda.device_count`` resolver: the parallel launcher's n_jobs)."""
    try:
        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 -- a broken CUDA install: one job, as on a machine without GPUs
        return 1


def _device_number(accelerator, devices) -> int:
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        return int(devices)
    raise ConfigValueError(f"trainer.devices={devices!r}: with hydra/launcher=slurm give the number of devices per node "
                           "(e.g. trainer.devices=4): SLURM reserves them before the job can count them")


def tasks_per_node(accelerator, devices) -> int:
    """SLURM tasks per node: one per device (Lightning's SLURM DDP runs one process per task)."""
    return _device_number(accelerator, devices)


def gpus_per_node(accelerator, devices) -> int | None:
    return _device_number(accelerator, devices) if str(accelerator) in ("gpu", "cuda", "auto") else None


def cpus_per_task(num_workers) -> int:
    """The source and target loaders' workers, plus the training process itself."""
    return 2 * int(num_workers or 0) + 1


def mem_per_cpu(mem_gb, mem_per_gpu, default) -> str | None:
    """``--mem-per-cpu`` of a SLURM job: ``default`` unless the user asked for memory another way (sbatch refuses
    two memory options)."""
    return None if mem_gb is not None or mem_per_gpu is not None else str(default)


def register_resolvers() -> None:
    for name, fn in (("rtda.run_name", run_name), ("rtda.job_dirname", job_dirname), ("rtda.device_count", device_count),
                     ("rtda.tasks_per_node", tasks_per_node), ("rtda.gpus_per_node", gpus_per_node),
                     ("rtda.cpus_per_task", cpus_per_task), ("rtda.mem_per_cpu", mem_per_cpu)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
