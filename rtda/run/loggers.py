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

from rtda.run.config import choices
from rtda.run.files import atomic_write_text


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


def _hydra():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except ValueError:
        return None


def default_group() -> str | None:
    """A sweep's jobs form one group, named after the sweep folder (``multiruns/<stamp>``); a single run is
    grouped by its ``data-model-adaptation`` choices, so runs of one setting group together."""
    hc = _hydra()
    if hc is not None and str(hc.mode) == "RunMode.MULTIRUN":
        return f"sweep-{Path(hc.sweep.dir).name}"
    picked = choices()
    return "-".join(str(picked[k]) for k in ("data", "model", "adaptation") if picked.get(k)) or None


def choice_tags() -> list[str]:
    picked = choices()
    return [f"{k}={picked[k]}" for k in ("data", "model", "augmentation", "adaptation", "optimizer", "experiment") if picked.get(k)]


def run_id(run_dir: str | Path) -> str:
    """The W&B run id of a run folder: the same folder (a resumed or requeued job) -> the same W&B run."""
    import hashlib

    return "rtda-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def default_job_type() -> str:
    """The entry point: ``train`` (rtda-train), ``eval`` (rtda-eval), ``debug`` ... (the config's task_name)."""
    hc = _hydra()
    name = hc.job.name if hc is not None else "train"
    return name.split("_rank")[0]


def wandb_logger(
    project: str = "rtda",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    name: str | None = None,
    save_dir: str = ".",
    offline: bool | None = None,
    log_model: bool = False,
    id: str | None = None,  # noqa: A002 - wandb.init's name
    job_type: str | None = None,
    **kwargs,
):
    """A Lightning ``WandbLogger``: one W&B run per job, offline unless the user is logged in (or asks otherwise).

    - ``id``: derived from the run folder (:func:`run_id`), with ``resume="allow"``: a job resumed in its folder
      (``ckpt_path=auto``, a SLURM requeue) appends to the same W&B run instead of starting another;
    - ``group``: the sweep (one group per ``-m`` sweep), else the data-model-adaptation choices;
    - ``job_type``: the entry point (``train``, ``eval``); ``tags``: the config-group choices plus ``tags``;
    - ``name``: the run folder's name (``<sweep stamp>/<job folder>`` in a sweep).

    ``WANDB_MODE`` in the environment still wins (``disabled`` turns it off entirely).
    """
    from pytorch_lightning.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")
    if offline is None:
        offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_logged_in())
    folder = Path(save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    hc = _hydra()
    if name is None:
        name = f"{folder.resolve().parent.name}/{folder.resolve().name}" if hc is not None and str(hc.mode) == "RunMode.MULTIRUN" \
            else folder.resolve().name
    logger = WandbLogger(
        project=project,
        entity=entity,
        group=group or default_group(),
        tags=list(tags or []) + choice_tags(),
        name=name,
        save_dir=save_dir,
        offline=offline,
        log_model=False if offline else log_model,
        id=id or run_id(folder),
        resume="allow",
        job_type=job_type or default_job_type(),
        **kwargs,
    )
    if offline:
        print(f"rtda: W&B is offline (not logged in); the run is saved under {folder / 'wandb'}. Upload it with:\n"
              f"  wandb sync {folder.resolve() / 'wandb'}/offline-run-*")
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
