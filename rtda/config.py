"""Where the Hydra config tree lives, and the few helpers every entry point shares."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

#: the ``conf/`` tree at the repository root (rtda is installed editable: ``pip install -e .``)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"

def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "your input is wrong" (a missing dataset or checkpoint, unusable weights):
    shown as one clear message instead of a traceback."""
    from rtda.models.pretrained import PretrainedWeightsError

    return (FileNotFoundError, PretrainedWeightsError)


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


def describe(cfg: DictConfig) -> str:
    picked = choices()
    parts = [f"{k}={picked[k]}" for k in ("experiment", "data", "model", "augmentation", "adaptation") if picked.get(k)]
    return " ".join(parts) or str(cfg.get("task_name", "run"))


def report_user_errors(task: Callable) -> Callable:
    """Wrap a Hydra task: a user error exits with status 1 and its message; W&B is always closed."""

    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except user_errors() as err:
            print(f"rtda: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish()

    return wrapped
