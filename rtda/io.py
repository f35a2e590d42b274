"""Writing without losing anything: destinations checked before a run spends time, files and folders
that appear whole or not at all, and data built once however many processes ask for it at the same time.

Everything rtda writes for later runs to read (the demo pair, class-statistics caches, pseudo-labels,
translated datasets) goes through :func:`build_once` or :func:`atomic_write_text`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rtda.errors import OutputNotWritable, full_error_requested, report


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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file that readers see either complete or not at all (a temporary file, then ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


class CheckRunFolder(Callback):
    """Hydra callback: the run (or sweep) folder must be writable before Hydra writes its config there;
    otherwise one ``rtda: error`` line names it and the command exits 1 (Hydra turns a callback's
    exception into a warning and goes on, so this one exits itself)."""

    @staticmethod
    def _check(folder: str, what: str) -> None:
        try:
            check_writable(folder, what)
        except OutputNotWritable as err:
            if full_error_requested():
                raise SystemExit(str(err)) from err
            report(err)
            raise SystemExit(1) from None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "the run folder")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "the sweep folder")
