"""Writing without losing anything: destinations checked before a run spends time, files and folders
that appear whole or not at all, and data built once however many processes ask for it at the same time.

Everything rtda writes for later runs to read (the demo pair, class-statistics caches, pseudo-labels,
translated datasets) goes through :func:`build_once` or :func:`atomic_write_text`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rtda.run.errors import OutputNotWritable, RunFolderInUse, full_error_requested, report

log = logging.getLogger("rtda")


def check_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` and write a probe file into it; raise :class:`OutputNotWritable` naming the folder,
    what was to go there and the reason, before any training time is spent."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".rtda-write-test-"):
            pass
    except OSError as err:
        raise OutputNotWritable(f"cannot write {what} to {folder}: {err.strerror or err}") from err
    return folder


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the process's umask, read once at import (reading it means setting it: not while other threads create files)
_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[object], None], binary: bool = False) -> None:
    """Write a file that readers see either complete or not at all: ``write(f)`` fills a temporary file beside
    it, renamed over ``path`` once complete; on any failure (a full disk included) the temporary file is removed
    and ``path`` is left as it was. The file gets the usual permissions (``0666 & ~umask``: collaborators on a
    cluster can read it), not ``mkstemp``'s private 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with contextlib.suppress(OSError):  # a file system without permissions (CIFS, some FUSE): as it comes
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of a text."""
    atomic_write(path, lambda f: f.write(text))


#: run folders this process holds (folder -> open lock file), see :func:`lock_run_folder`
_RUN_LOCKS: dict[str, object] = {}
#: set for the processes a run starts (DDP ranks, a sweep job's own command): the folder their parent holds
HELD_FOLDER_ENV = "RTDA_RUN_FOLDER_HELD"


def _is_other_rank() -> bool:
    """A DDP rank other than 0 of a run (Lightning's ranks, SLURM tasks): it works in rank 0's folder."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def lock_run_folder(folder: str | Path) -> bool:
    """Hold ``folder`` for this run until the process ends (or :func:`release_run_folder`): a second run started
    into the same folder while this one lives (``run_name=twin`` twice, a common slip on a cluster) is refused by
    :class:`RunFolderInUse` naming this process, before it writes anything there. A POSIX record lock on
    ``folder/.rtda-run.lock``: the kernel drops it when the process dies (SIGKILL, a node lost), so a requeued or
    resumed job never finds a stale lock; DataLoader workers forked from the run do not inherit it.

    DDP ranks other than 0 and the processes a run starts itself (their environment names the folder) share it.
    Returns whether this call took the lock."""
    folder = Path(folder).resolve()
    key = str(folder)
    if key in _RUN_LOCKS or _is_other_rank() or os.environ.get(HELD_FOLDER_ENV) == key:
        return False
    try:
        import fcntl
    except ImportError:  # not POSIX: no run-folder locks
        return False
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".rtda-run.lock", "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without record locks (some Lustre, NFS)
            f.close()
            log.warning("%s: run-folder locks are not supported here (%s); a second run into it would not be "
                        "refused", folder, err.strerror or err)
            return False
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunFolderInUse(f"the run folder {folder} is in use by {holder}: wait for that run to end, or give "
                             "this one another folder (run_name=..., hydra.run.dir=...)") from None
    import socket
    from datetime import datetime

    f.seek(0)
    f.truncate()
    f.write(f"rtda process {os.getpid()} on {socket.gethostname()} (since "
            f"{datetime.now().astimezone().isoformat(timespec='seconds')})\n")
    f.flush()
    _RUN_LOCKS[key] = f
    os.environ[HELD_FOLDER_ENV] = key
    return True


def release_run_folder(folder: str | Path) -> None:
    key = str(Path(folder).resolve())
    f = _RUN_LOCKS.pop(key, None)
    if f is not None:
        f.close()  # closing the file releases the record lock
    if os.environ.get(HELD_FOLDER_ENV) == key:
        del os.environ[HELD_FOLDER_ENV]


@contextlib.contextmanager
def holding_run_folder(folder: str | Path):
    """:func:`lock_run_folder` around one job (a sweep's job in a process that runs several)."""
    took = lock_run_folder(folder)
    try:
        yield
    finally:
        if took:
            release_run_folder(folder)


def build_once(root: str | Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None],
               readers: bool = False) -> bool:
    """Make the folder ``root`` with ``build(tmp)`` unless ``is_complete(root)``; True when this call built it.

    Safe under concurrent processes: builders take a lock file beside ``root`` (``root.lock``); a process
    that finds the lock taken waits, then reuses what the other one built. ``build`` writes into a private
    temporary folder that is renamed to ``root`` only once complete, so a half-written folder is never seen
    under ``root`` and an interrupted build leaves only a ``root.tmp-*`` folder, removed by the next builder.

    ``readers=True``: an existing ``root`` of another kind (e.g. the demo generated with another gap, in a sweep
    over that knob) is replaced only when no run holds a :func:`read_lock` on it: the builder waits for the
    runs reading it to end, then swaps in its copy.
    """
    root = Path(root)
    if is_complete(root):
        return False
    check_writable(root.parent, f"{root.name} (data rtda generates)")
    with FileLock(str(root.with_name(root.name + ".lock"))):
        if is_complete(root):  # another process built it while this one waited
            return False
        for stale in root.parent.glob(f"{root.name}.tmp-*"):  # builders that died; none runs: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-", dir=root.parent))
        try:
            build(tmp)
            if root.exists():  # an outdated or incomplete copy: replaced as a whole
                # ... once no run reads it any more (readers=True: see read_lock); the new copy is ready meanwhile
                with (_exclusive(root) if readers else contextlib.nullcontext()):
                    old = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-old-", dir=root.parent))
                    root.rename(old / root.name)
                    tmp.rename(root)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


#: read locks held by this process (folder -> open lock file); see :func:`read_lock`
_READ_LOCKS: dict[str, object] = {}
#: whether this process is a run that holds read locks on the data it generated (set by :func:`holding_read_locks`)
_HOLD = {"on": False}


def _lock_file(root: Path) -> str:
    return str(root.with_name(root.name + ".readers"))


def read_lock(root: str | Path) -> bool:
    """Inside :func:`holding_read_locks`: take a shared lock on ``root`` (``root.readers``) until the run ends, so
    that :func:`build_once` (``readers=True``) in another process never replaces the folder under this run.
    Returns whether a lock is held (never outside a run, nor where ``fcntl`` is missing)."""
    root = Path(root).resolve()
    if not _HOLD["on"] or str(root) in _READ_LOCKS:
        return str(root) in _READ_LOCKS
    try:
        import fcntl
    except ImportError:  # not POSIX: no reader locks
        return False
    # a POSIX record lock (lockf), not flock: DataLoader workers forked from this process do not inherit it,
    # so it is gone as soon as this run releases it (or dies), whatever its workers do
    f = open(_lock_file(root), "a+")  # noqa: SIM115 - held open for the run's lifetime
    fcntl.lockf(f, fcntl.LOCK_SH)
    _READ_LOCKS[str(root)] = f
    return True


def release_read_lock(root: str | Path) -> None:
    f = _READ_LOCKS.pop(str(Path(root).resolve()), None)
    if f is not None:
        f.close()


@contextlib.contextmanager
def holding_read_locks():
    """Around one run (one job of a sweep): the data folders it generates or reuses stay as they are until it
    ends; the locks are released when it ends, also for the next job of a sweep in this same process."""
    _HOLD["on"] = True
    try:
        yield
    finally:
        _HOLD["on"] = False
        for root in list(_READ_LOCKS):
            release_read_lock(root)


@contextlib.contextmanager
def _exclusive(root: Path):
    try:
        import fcntl
    except ImportError:
        yield
        return
    release_read_lock(root)  # this process's own shared lock would block it
    with open(_lock_file(root), "a+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)  # waits for every run reading root to end
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _override_value(text: str) -> str:
    """``text`` as a quoted Hydra override value (any path: spaces, ``=``, quotes)."""
    return "'" + text.replace("'", "\\'") + "'"


def pin_sweep_folder(config: DictConfig) -> Path:
    """Fix a ``-m`` sweep's folder at submission: ``hydra.sweep.dir`` resolved once, here, and added to the
    sweep's Hydra overrides, from which every job recomposes its config. Without it a launcher that runs jobs
    elsewhere (submitit on SLURM) re-resolves the folder inside each job, where the time stamp and the run-name
    resolver (``slurm-<job id>`` in a SLURM job) give another one: the jobs landed outside the sweep folder."""
    from omegaconf import open_dict, read_write

    folder = Path(str(config.hydra.sweep.dir)).absolute()
    with read_write(config.hydra), open_dict(config.hydra), read_write(config.hydra.overrides):
        kept = [o for o in config.hydra.overrides.hydra if not str(o).lstrip("+~").startswith("hydra.sweep.dir=")]
        config.hydra.overrides.hydra = [*kept, f"hydra.sweep.dir={_override_value(str(folder))}"]
        config.hydra.sweep.dir = str(folder)
    return folder


class CheckRunFolder(Callback):
    """Hydra callback, before Hydra writes anything into a run or sweep folder: the folder must be writable
    (else one ``rtda: error`` line names it and the command exits 1 — Hydra turns a callback's exception into a
    warning and goes on, so this one exits itself); a single run's folder is held against a second live run
    (:func:`lock_run_folder`); a sweep's folder is fixed for all its jobs (:func:`pin_sweep_folder`)."""

    @staticmethod
    def _exit_on(err: Exception) -> None:
        if full_error_requested():
            raise SystemExit(str(err)) from err
        report(err)
        raise SystemExit(1) from None

    def _check(self, folder: str, what: str) -> None:
        try:
            check_writable(folder, what)
        except OutputNotWritable as err:
            self._exit_on(err)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "the run folder")
        try:
            lock_run_folder(config.hydra.run.dir)
        except RunFolderInUse as err:
            self._exit_on(err)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "the sweep folder")
        pin_sweep_folder(config)
