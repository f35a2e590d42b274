"""Multi-process DDP under Hydra: the command that starts ranks 1..N-1 of this job.

Lightning's ``ddp`` strategy starts the other ranks by re-running the command line. Its Hydra variant
replays ``sys.argv`` with ``hydra.run.dir`` set to the run-mode folder pattern, which breaks two things:
in a ``-m`` sweep every rank would start the whole sweep again, and the folder is not this job's. rtda
starts each rank as a single run of exactly this job: its resolved overrides (a sweep's values included),
in this job's own output folder, without writing the Hydra config a second time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def this_job_command(*extra: str, module: str | None = None) -> list[str]:
    """The running Hydra job as a single-run command: its resolved overrides (a sweep's values included),
    in its own output folder, without writing the Hydra config again. ``module``: run ``python -m module``
    instead of this process's script (a parallel launcher's worker process runs no rtda script)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    program = ["-m", module] if module else [os.path.abspath(sys.argv[0])]
    return [sys.executable, *program, *hc.overrides.task,
            f'hydra.run.dir="{hc.runtime.output_dir}"', "hydra.output_subdir=null", *extra]


def rank_command(local_rank: int) -> tuple[Sequence[str], str]:
    """(command, working folder) of the process for ``local_rank`` of the running Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    return this_job_command(f"hydra.job.name={HydraConfig.get().job.name}_rank{local_rank}"), get_original_cwd()


def use_rtda_ddp_children() -> None:
    """Make Lightning's subprocess launcher start the other ranks with :func:`rank_command`."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = rank_command


def launches_processes(trainer_cfg) -> bool:
    """Whether this trainer config makes Lightning start more processes of this command (``ddp``-like
    strategies on more than one device); ``ddp_spawn`` and single-device runs do not."""
    strategy = trainer_cfg.get("strategy") or ""
    name = (strategy if isinstance(strategy, str) else str(strategy.get("_target_", ""))).lower()
    if not any(k in name for k in ("ddp", "fsdp", "deepspeed")) or "spawn" in name or "notebook" in name:
        return False
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1) or 1
    if devices in ("auto", -1, "-1"):
        return True
    count = len(devices) if not isinstance(devices, (int, str)) else int(devices)
    return count * nodes > 1


def shares_the_sweep_process() -> bool:
    """True for a job of a ``-m`` sweep run inside the sweep's own processes: Hydra's basic launcher (all jobs
    in this one process) or the joblib launcher (jobs in a pool of worker processes)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    target = str(hc.launcher.get("_target_", ""))
    return hc.mode == RunMode.MULTIRUN and (target.endswith("BasicLauncher") or target.endswith("JoblibLauncher"))


def run_job_as_own_command() -> int:
    """Run this sweep job as a single-run command in its own folder, and wait for it.

    Lightning starts DDP ranks once per process, so jobs of a local sweep cannot each start their own;
    run as a command of its own, each job starts (and ends) its ranks like any single run.
    """
    import subprocess

    return subprocess.run(this_job_command(module="rtda.cli.train"), cwd=os.getcwd()).returncode
