"""Logger factories that behave on a laptop, a cluster node and CI alike: nothing prompts, nothing hangs."""

from __future__ import annotations

import csv
import io
import netrc
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from rtda.config import choices


def wandb_logged_in() -> bool:
    """True when W&B credentials exist (API key in the environment or ~/.netrc); never prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return rc.authenticators(host) is not None


def default_group() -> str | None:
    """``data-model-adaptation`` from Hydra's config choices, so runs of one setting group together."""
    picked = choices()
    return "-".join(str(picked[k]) for k in ("data", "model", "adaptation") if picked.get(k)) or None


def choice_tags() -> list[str]:
    picked = choices()
    return [f"{k}={picked[k]}" for k in ("data", "model", "augmentation", "adaptation", "optimizer", "experiment") if picked.get(k)]


def wandb_logger(
    project: str = "rtda",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    name: str | None = None,
    save_dir: str = ".",
    offline: bool | None = None,
    log_model: bool = False,
    **kwargs,
):
    """A Lightning ``WandbLogger`` that is offline unless the user is logged in (or asks otherwise).

    ``WANDB_MODE`` in the environment still wins (``disabled`` turns it off entirely).
    """
    from pytorch_lightning.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")
    if offline is None:
        offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_logged_in())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        entity=entity,
        group=group or default_group(),
        tags=list(tags or []) + choice_tags(),
        name=name,
        save_dir=save_dir,
        offline=offline,
        log_model=False if offline else log_model,
        **kwargs,
    )
    if offline:
        print(f"rtda: W&B is offline (not logged in); the run is saved under {Path(save_dir) / 'wandb'} "
              "- upload it later with `wandb sync`.")
    return logger



class HistoryKeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when a new writer opens the folder (a
    resumed run, the test stage in another process) and then rewrites the file with only the columns this
    process has seen. This one keeps the file and starts from its columns: rows are appended, and a new
    column rewrites the file with the old rows intact."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class HistoryKeepingCSVLogger(CSVLogger):
    """A ``CSVLogger`` whose ``metrics.csv`` survives resumes and new processes: nothing logged is lost.

    The rows are written to disk whenever a checkpoint is saved (Lightning's writer buffers up to 100 steps,
    which a killed job would lose for good: the resumed run starts after them); on resume, the rows of
    iterations after the checkpoint, which the resumed run logs again, are removed first
    (:meth:`forget_from`), so the history has each iteration once.
    """

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        if self._experiment is not None:
            self.save()

    def forget_from(self, step: int) -> int:
        """Remove the rows logged at ``step`` or later from ``metrics.csv`` (``step`` = the iteration a
        resumed checkpoint was taken at: Lightning logs iteration ``i`` at step ``i - 1``); returns how many."""
        from rtda.io import atomic_write_text

        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return 0
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if not (r.get("step") or "").isdigit() or int(r["step"]) < step]
        if len(kept) == len(rows):
            return 0
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, out.getvalue())
        return len(rows) - len(kept)

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryKeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryKeepingWriter(log_dir=self.log_dir)
        return self._experiment
