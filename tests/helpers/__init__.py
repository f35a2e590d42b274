"""What the tests share: one environment for the commands they run, one rtda-train / rtda-eval runner, one
compose helper, the tiny demo's overrides. No test module imports another; they all import from here."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import torch
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


#: the loggers Lightning writes its lines to
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


def blocky_label(n: int = 2, h: int = 64, w: int = 128, seed: int = 0) -> torch.Tensor:
    """An ``n×h×w`` label of 19 classes in 8x16 blocks (edges for boundary losses), a 2x3-block corner of 255."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 19, (n, 8, 16), generator=g)
    small[0, :2, :3] = 255
    return torch.nn.functional.interpolate(small[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()


def tiny_overrides(data_dir: Path) -> list[str]:
    """Hydra overrides that point the demo config at the tiny demo and keep a run to seconds."""
    return [f"paths.data_dir={data_dir}"] + [f"+data.prepare.{k}={v}" for k, v in TINY_DEMO.items() if k != "seed"]


def run_command(command: list[str], cwd, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def rtda_train(args, cwd, timeout: float = 600, env: dict | None = None, *, process: bool = False):
    """``rtda-train ARGS`` run in ``cwd``: its ``main`` in this process (:func:`run_in_process`), or with
    ``process=True`` its console script in a new process, as a user runs it (what the console shows, a
    re-launched DDP rank, a signal, a SLURM job need one)."""
    if process:
        return run_command(["rtda-train", *args], cwd, timeout, env)
    from rtda.cli.train import main

    return run_in_process(main, args, cwd, env)


def rtda_eval(args, cwd, timeout: float = 600, env: dict | None = None, *, process: bool = False):
    """``rtda-eval ARGS`` run in ``cwd``, as :func:`rtda_train`."""
    if process:
        return run_command(["rtda-eval", *args], cwd, timeout, env)
    from rtda.cli.evaluate import main

    return run_in_process(main, args, cwd, env)


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


def run_in_process(main, argv, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """A console script's ``main`` in this process, as ``COMMAND ARGV`` run in ``cwd`` with environment ``env``
    (default :data:`ENV`) would: its exit status, stdout and stderr. No interpreter start and no imports
    (~8 s a command on this machine). What a command changes in the process is put back afterwards: the
    environment, the working folder, ``sys.argv`` / ``sys.path``, logging (handlers closed, so a run's
    ``train.log`` is complete), warning filters and their once-registries, Hydra's global state, torch's
    thread count and determinism flags."""
    env = ENV if env is None else env
    saved_env, saved_cwd, saved_argv, saved_path = dict(os.environ), os.getcwd(), list(sys.argv), list(sys.path)
    root = logging.getLogger()
    saved_handlers, saved_level, saved_filters = list(root.handlers), root.level, list(warnings.filters)
    saved_torch = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
                   torch.backends.cudnn.deterministic)
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    # Lightning's loggers as a new process has them (INFO): an in-process benchmark quietens them to WARNING
    lightning = {name: logging.getLogger(name) for name in LIGHTNING_LOGGERS}
    saved_lightning = {name: (lg.level, list(lg.handlers), lg.propagate) for name, lg in lightning.items()}
    for lg in lightning.values():
        lg.setLevel(logging.INFO)
    takes_argv = bool(inspect.signature(main).parameters)
    sys.argv = [main.__module__, *argv]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    GlobalHydra.instance().clear()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(argv)) if takes_argv else main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:  # what the interpreter would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        for name, (level, handlers, propagate) in saved_lightning.items():
            lightning[name].setLevel(level)
            lightning[name].handlers[:], lightning[name].propagate = handlers, propagate
        root.setLevel(saved_level)
        logging.captureWarnings(False)
        warnings.resetwarnings()  # also forgets which warnings were shown once
        warnings.filters[:] = saved_filters
        torch.set_num_threads(saved_torch[0])
        torch.use_deterministic_algorithms(saved_torch[1], warn_only=saved_torch[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved_torch[3:]
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, sys.path[:] = saved_argv, saved_path
    return subprocess.CompletedProcess([main.__module__, *argv], code, out.getvalue(), err.getvalue())
