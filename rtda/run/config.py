"""Where the Hydra config tree lives, and the few helpers every entry point shares."""

from __future__ import annotations

import functools
import importlib.resources
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from rtda.run.errors import ConfigValueError
from rtda.run.resolvers import register_resolvers

register_resolvers()  # the ${rtda.…} resolvers of conf/, whichever entry point composes it

#: the config tree: ``rtda/conf`` inside an installed wheel (copied there at build time, see setup.py), else the
#: ``conf/`` tree at the repository root (an editable install: ``pip install -e .``). Users add their own
#: groups and experiments with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``; rtda's own tree is
#: also reachable as ``pkg://rtda.conf`` from an installed wheel.
_PACKAGE = Path(__file__).resolve().parent.parent  # rtda/
_PACKAGED = _PACKAGE / "conf"
CONFIG_DIR = _PACKAGED if (_PACKAGED / "train.yaml").is_file() else _PACKAGE.parent / "conf"

def group_option_files(group: str) -> dict[str, Path]:
    """The options of config group ``group`` (``"data/test"``) as name -> YAML file, from this run's config search
    path (rtda's tree, the user's ``--config-dir`` / ``hydra.searchpath`` folders; the first one holding a name
    wins, as in Hydra), or rtda's own tree outside a Hydra run."""
    folders: list[Path] = []
    try:
        sources = list(HydraConfig.get().runtime.config_sources)
    except ValueError:
        sources = []
    for source in sources:
        if source.schema == "file":
            folders.append(Path(source.path))
        elif source.schema == "pkg":
            try:
                folders.append(Path(str(importlib.resources.files(source.path.replace("/", ".")))))
            except (ImportError, TypeError, ValueError):
                continue
    found: dict[str, Path] = {}
    for folder in [*folders, CONFIG_DIR]:
        for file in sorted((folder / group).glob("*.yaml")) if (folder / group).is_dir() else ():
            found.setdefault(file.stem, file)
    return dict(sorted(found.items()))


def instantiate_dict(cfg: DictConfig | None) -> dict:
    """Instantiate every ``_target_`` node of a mapping (callbacks, loggers); null entries are skipped."""
    if not cfg:
        return {}
    return {k: hydra.utils.instantiate(v) for k, v in cfg.items() if isinstance(v, DictConfig) and "_target_" in v}


def choices() -> dict:
    """Hydra's config-group choices of this run (``{"data": "demo", "model": "bisenet_r18", ...}``)."""
    try:
        picked = HydraConfig.get().runtime.choices
    except ValueError:
        return {}
    return {k: v for k, v in picked.items() if not k.startswith("hydra") and v is not None}


def overrides() -> list[str]:
    """The command-line overrides of this run (``["experiment=...", "seed=2"]``)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def in_multirun() -> bool:
    """Whether this is a job of a ``-m`` sweep (inside the sweep's process, a joblib worker or a SLURM job)."""
    try:
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
    """Raise :class:`rtda.run.errors.ConfigValueError` naming the first key in :data:`CHECKED_VALUES` whose value
    is of the wrong type or range (keys absent from this config are skipped)."""
    missing = object()
    for key, (expected, ok) in CHECKED_VALUES.items():
        value = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
        if value is missing:
            continue
        if isinstance(value, ListConfig):
            value = list(value)
        if not ok(value):
            raise ConfigValueError(f"{key}={value!r}: expected {expected}")
