"""User errors and how every entry point reports them: one line, ``rtda: error: …``, and a non-zero exit.

A researcher runs hundreds of unattended jobs; a job that fails must say why in one line that names the
key, file or value and what was expected, and must be marked failed. The full traceback is shown only
with ``HYDRA_FULL_ERROR=1``. Errors that are not the user's (bugs) keep their traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable

#: set by :func:`run_cli` for its own process and the processes it starts (DDP ranks), so that all of
#: them know whether the *user* asked for full tracebacks
_FULL_ERROR_ENV = "RTDA_FULL_ERROR"


class RtdaError(Exception):
    """An error in what the user gave rtda (config, files, paths): reported as one line."""


class ConfigValueError(RtdaError, ValueError):
    """A config value of the wrong type or range."""


class CheckpointError(RtdaError):
    """A file that is not an rtda checkpoint, or one that does not fit the network or data asked for."""


class OutputNotWritable(RtdaError):
    """A folder the run must write into cannot be written."""


class TrainingDiverged(RtdaError):
    """A loss or a weight became NaN or infinite: the run stops at once, marked failed."""


class RunFolderInUse(RtdaError):
    """Another live process holds the run folder (two runs started with the same ``run_name``)."""


class DiskFull(OutputNotWritable):
    """A write failed for lack of space (or quota); nothing partial is left behind."""


class RunInterrupted(SystemExit):
    """The job was told to stop (SIGTERM, a requeue signal) and stopped at an iteration boundary, saved.

    A ``SystemExit`` (status 143, as a process ended by SIGTERM): it must end the process as submitit's own
    requeue exit does — neither Hydra (which records an ``Exception`` as a failed job and returns it to the
    login node, which would then stop waiting for the requeued job) nor a local sweep catches it."""

    def __init__(self, message: str, iteration: int | None = None, checkpoint: str | None = None,
                 requeue: Callable[[], bool] | None = None):
        super().__init__(143)
        self.message, self.iteration, self.checkpoint = message, iteration, checkpoint
        self.requeue = requeue  # called last, once the run's record is written: SLURM ends the job right after it

    def __str__(self) -> str:
        return self.message


def no_space_left(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(err: OSError, what: str | None = None) -> DiskFull:
    """``err`` (ENOSPC / EDQUOT) as one line naming the folder that could not take the file."""
    where = what or (os.path.dirname(os.path.abspath(err.filename)) if err.filename else "the output folder")
    return DiskFull(f"no space left on the device of {where} ({err.strerror or err}); free some space and run the "
                    "same command again: it resumes from the last whole checkpoint")


class DatasetFormatError(FileNotFoundError):
    """A dataset folder is missing or laid out differently from the format the reader expects."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights that cannot be fetched or do not fit the network (the message says what to do)."""


class DecodeError(OSError):
    """An image or label file that cannot be decoded (truncated, corrupt, not an image)."""

    def __init__(self, message: str, path: object = None):
        super().__init__(message)
        self.path = path


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "your input is wrong": configuration, files, paths, weights, divergence."""
    from hydra.errors import (
        ConfigCompositionException,
        InstantiationException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

    # InstantiationException: a config node that cannot be built (an unknown argument, a value the class refuses)
    return (RtdaError, FileNotFoundError, DatasetFormatError, PretrainedWeightsError, ConfigCompositionException,
            MissingConfigException, OverrideParseException, OmegaConfBaseException, DecodeError, InstantiationException)


def one_line(err: BaseException) -> str:
    """The error's message on one line: Hydra's option lists and DataLoader worker tracebacks folded; a
    user error raised while Hydra instantiated a config node is shown as itself."""
    from hydra.errors import InstantiationException

    if isinstance(err, InstantiationException) and isinstance(err.__cause__, user_error_types()):
        return one_line(err.__cause__)
    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own message
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if "Available options" in text:  # Hydra: "Could not find 'model/x'\n\nAvailable options in 'model':\n\ta\n\tb"
        head = lines[0].replace("In 'train': ", "")
        first = lines.index(next(ln for ln in lines if ln.startswith("Available options"))) + 1
        options = []
        for ln in lines[first:]:
            if ln.startswith("Config search path"):
                break
            options.append(ln)
        return f"{head}; available options: {', '.join(options)}"
    if len(lines) > 1 and lines[0].endswith(":"):
        return " ".join(lines)
    return "; ".join(lines)


def log_to_files(message: str, level: int = logging.ERROR) -> None:
    """Append a line to the run's log files (``train.log``) without printing it twice on the console."""
    record = logging.LogRecord("rtda", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def full_error_requested() -> bool:
    return os.environ.get(_FULL_ERROR_ENV, os.environ.get("HYDRA_FULL_ERROR", "0")) == "1"


def _rank_prefix() -> str:
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return "" if rank == "0" else f" (rank {rank})"


def report(err: BaseException) -> None:
    if _rank_prefix() and isinstance(err, (TrainingDiverged, RunInterrupted)):
        return  # every rank stops together (the flag is reduced): rank 0 reports it
    if no_space_left(err):
        err = disk_full_error(err)
    kind = "interrupted" if isinstance(err, RunInterrupted) else "error"
    print(f"rtda: {kind}{_rank_prefix()}: {one_line(err)}", file=sys.stderr, flush=True)


def exit_on_user_error(task: Callable) -> Callable:
    """Wrap a Hydra task. In a single run a user error is reported here, in one line, and exits 1 (Hydra
    would add its own lines); in a sweep it is raised, so that Hydra marks the job failed and runs the
    others, and :func:`run_cli` reports it when the sweep ends."""

    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except user_error_types() as err:
            if full_error_requested() or _in_multirun():
                raise
            report(err)
            raise SystemExit(1) from None
        except OSError as err:
            if not no_space_left(err) or full_error_requested():
                raise
            if _in_multirun():
                raise disk_full_error(err) from err
            report(err)
            raise SystemExit(1) from None

    return wrapped


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_cli(hydra_main: Callable[[], object]) -> None:
    """Run a ``@hydra.main`` function; a user error anywhere (composition included) exits 1 with one line.

    Hydra prints its own multi-line report unless ``HYDRA_FULL_ERROR=1``; rtda sets it so that every error
    reaches this function, and keeps the user's own choice in ``RTDA_FULL_ERROR``.
    """
    full = full_error_requested()
    os.environ[_FULL_ERROR_ENV] = "1" if full else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except user_error_types() as err:
        if full:
            raise
        report(err)
        raise SystemExit(1) from None
    except OSError as err:
        if full or not no_space_left(err):
            raise
        report(err)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("rtda: interrupted", file=sys.stderr)
        raise SystemExit(130) from None

