"""What the tests share: one environment for the commands they run, one rtda-train / rtda-eval runner, one
compose helper, the tiny demo's overrides. No test module imports another; they all import from here."""

from __future__ import annotations

import inspect
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from rtda.run.config import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent.parent
#: the environment of every command a test runs: no network (albumentations' update check, W&B), one-line errors,
#: and the tests' folder importable (tests/helpers, tests/kill_at.py) in the processes they start
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "HYDRA_FULL_ERROR": "0",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}

# a demo small enough for seconds-long tests; the same keys as conf/data/demo.yaml's prepare node
TINY_DEMO = {"seed": 0, "source_count": 12, "target_train_count": 8, "target_val_count": 4}


def tiny_overrides(data_dir: Path) -> list[str]:
    """Hydra overrides that point the demo config at the tiny demo and keep a run to seconds."""
    return [f"paths.data_dir={data_dir}"] + [f"+data.prepare.{k}={v}" for k, v in TINY_DEMO.items() if k != "seed"]


def run_command(command: list[str], cwd, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def rtda_train(args, cwd, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``rtda-train ARGS`` through its console script, as a user runs it."""
    return run_command(["rtda-train", *args], cwd, timeout, env)


def rtda_eval(args, cwd, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_command(["rtda-eval", *args], cwd, timeout, env)


def run_folder(out: str) -> Path:
    """The run folder a command's summary names (``run folder: …``)."""
    match = re.search(r"^run folder: (.+)$", out, re.M)
    assert match, out[-3000:]
    return Path(match.group(1))


def compose_config(name: str = "train", overrides=(), output_dir: Path | None = None) -> DictConfig:
    """A config as the command ``name`` composes it (with Hydra's own node, set as the current run's), its
    output (and data) folder under ``output_dir`` when given."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.data_dir = str(Path(output_dir) / "data")
    return cfg


def run_main(main, argv, monkeypatch, capsys, cwd=None) -> subprocess.CompletedProcess:
    """A console script's ``main`` in this process, as ``COMMAND ARGV`` run in ``cwd`` would (no interpreter
    start, ~8 s each on this machine): its exit status, stdout and stderr. Only for commands that stop before
    training (bad input); what rtda's entry points change in the process (environment, logging, warnings,
    Hydra's global state) is put back afterwards."""
    for key in ("HYDRA_FULL_ERROR", "RTDA_FULL_ERROR"):
        monkeypatch.setenv(key, "0")
    if cwd is not None:
        monkeypatch.chdir(cwd)
    takes_argv = bool(inspect.signature(main).parameters)
    if not takes_argv:
        monkeypatch.setattr(sys, "argv", [main.__module__, *argv])
    root = logging.getLogger()
    saved = list(root.handlers), root.level, list(warnings.filters)
    GlobalHydra.instance().clear()
    code = 0
    try:
        main(list(argv)) if takes_argv else main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
        root.handlers[:], _, warnings.filters[:] = saved[0], root.setLevel(saved[1]), saved[2]
        logging.captureWarnings(False)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([main.__module__, *argv], code, out, err)
