"""Where the Hydra config tree lives, and the few helpers every entry point shares."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

#: the config tree: ``rtda/conf`` inside an installed wheel (copied there at build time, see setup.py), else the
#: ``conf/`` tree at the repository root (an editable install: ``pip install -e .``). Users add their own
#: groups and experiments with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``; rtda's own tree is
#: also reachable as ``pkg://rtda.conf`` from an installed wheel.
_PACKAGED = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = _PACKAGED if (_PACKAGED / "train.yaml").is_file() else Path(__file__).resolve().parent.parent / "conf"

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
    from hydra.core.override_parser.overrides_parser import OverridesParser

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


def _device_count() -> int:
    from rtda.launchers import device_count

    return device_count()


def _device_number(accelerator, devices) -> int:
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        return int(devices)
    from rtda.errors import ConfigValueError

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
    for name, fn in (("rtda.run_name", run_name), ("rtda.job_dirname", job_dirname), ("rtda.device_count", _device_count),
                     ("rtda.tasks_per_node", tasks_per_node), ("rtda.gpus_per_node", gpus_per_node),
                     ("rtda.cpus_per_task", cpus_per_task), ("rtda.mem_per_cpu", mem_per_cpu)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def instantiate_dict(cfg: DictConfig | None) -> dict:
    """Instantiate every ``_target_`` node of a mapping (callbacks, loggers); null entries are skipped."""
    if not cfg:
        return {}
    return {k: hydra.utils.instantiate(v) for k, v in cfg.items() if isinstance(v, DictConfig) and "_target_" in v}


def choices() -> dict:
    """Hydra's config-group choices of this run (``{"data": "demo", "model": "bisenet_r18", ...}``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        picked = HydraConfig.get().runtime.choices
    except ValueError:
        return {}
    return {k: v for k, v in picked.items() if not k.startswith("hydra") and v is not None}


def overrides() -> list[str]:
    """The command-line overrides of this run (``["experiment=...", "seed=2"]``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def in_multirun() -> bool:
    """Whether this is a job of a ``-m`` sweep (inside the sweep's process, a joblib worker or a SLURM job)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def describe(cfg: DictConfig) -> str:
    picked = choices()
    parts = [f"{k}={picked[k]}" for k in ("experiment", "data", "model", "augmentation", "adaptation") if picked.get(k)]
    return " ".join(parts) or str(cfg.get("task_name", "run"))


def closes_wandb(task: Callable) -> Callable:
    """Wrap a Hydra task so that W&B is always closed, marked failed when the task raised (each job of a
    sweep gets its own W&B run)."""

    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        failed = True
        try:
            result = task(*args, **kwargs)
            failed = False
            return result
        finally:
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish(exit_code=1 if failed else 0)

    return wrapped


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _size(v) -> bool:
    return v is None or (isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(_int(x) and x > 0 for x in v))


#: config values checked before anything is built: key -> (what is expected, test). A wrong value fails
#: here with the key's name, not deep inside Lightning or a DataLoader after minutes of work.
CHECKED_VALUES: dict[str, tuple[str, Callable]] = {
    "seed": ("an integer or null", lambda v: v is None or _int(v)),
    "trainer.max_steps": ("a positive number of training iterations, or -1 (use max_epochs)",
                          lambda v: _int(v) and (v > 0 or v == -1)),
    "trainer.max_epochs": ("an integer (-1: no limit) or null", lambda v: v is None or _int(v)),
    "trainer.val_check_interval": ("a positive number of iterations, or a fraction of an epoch in (0, 1]",
                                   lambda v: v is None or (_int(v) and v > 0) or (_number(v) and 0 < v <= 1)),
    "trainer.log_every_n_steps": ("a positive integer", lambda v: _int(v) and v > 0),
    "trainer.devices": ("a positive integer, a list of device indices or 'auto'",
                        lambda v: (_int(v) and v > 0) or v == "auto" or isinstance(v, (list, ListConfig))),
    "data.batch_size": ("a positive integer", lambda v: _int(v) and v > 0),
    "data.eval_batch_size": ("a positive integer or null", lambda v: v is None or (_int(v) and v > 0)),
    "data.num_workers": ("an integer >= 0", lambda v: _int(v) and v >= 0),
    "data.source_size": ("[height, width] in pixels, or null", _size),
    "data.target_size": ("[height, width] in pixels, or null", _size),
    "data.eval_size": ("[height, width] in pixels, or null", _size),
    "optimizer.lr": ("a positive number", lambda v: _number(v) and v > 0),
    "optimizer.weight_decay": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "optimizer.momentum": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "adaptation.poly_power": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "test_ckpt": ("'last' or 'best'", lambda v: v in ("last", "best")),
    "bench.height": ("a positive integer", lambda v: _int(v) and v > 0),
    "bench.width": ("a positive integer", lambda v: _int(v) and v > 0),
    "bench.batch_size": ("a positive integer", lambda v: _int(v) and v > 0),
}


def check_values(cfg: DictConfig) -> None:
    """Raise :class:`rtda.errors.ConfigValueError` naming the first key in :data:`CHECKED_VALUES` whose value
    is of the wrong type or range (keys absent from this config are skipped)."""
    from rtda.errors import ConfigValueError

    missing = object()
    for key, (expected, ok) in CHECKED_VALUES.items():
        value = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
        if value is missing:
            continue
        if isinstance(value, ListConfig):
            value = list(value)
        if not ok(value):
            raise ConfigValueError(f"{key}={value!r}: expected {expected}")
