"""Writing without losing anything: destinations checked before a run spends time, files and folders
that appear whole or not at all, and data built once however many processes ask for it at the same time.

Everything rtda writes for later runs to read (the demo pair, class-statistics caches, pseudo-labels,
translated datasets) goes through :func:`build_once` or :func:`atomic_write_text`.
"""

from __future__ import annotations

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


def build_once(root: str | Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None]) -> bool:
    """Make the folder ``root`` with ``build(tmp)`` unless ``is_complete(root)``; True when this call built it.

    Safe under concurrent processes: builders take a lock file beside ``root`` (``root.lock``); a process
    that finds the lock taken waits, then reuses what the other one built. ``build`` writes into a private
    temporary folder that is renamed to ``root`` only once complete, so a half-written folder is never seen
    under ``root`` and an interrupted build leaves only a ``root.tmp-*`` folder, removed by the next builder.
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
                old = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-old-", dir=root.parent))
                root.rename(old / root.name)
                tmp.rename(root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


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
