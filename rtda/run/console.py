"""What a run shows on the console (and keeps in its ``train.log``): rtda's lines, Lightning's that concern the
user, warnings once; Lightning's lines that say nothing about the run, or mislead in it, filtered out."""

from __future__ import annotations

import logging
import warnings

from pytorch_lightning.callbacks import ModelSummary, RichProgressBar
from pytorch_lightning.utilities.model_summary import get_human_readable_count

log = logging.getLogger("rtda")

#: Lightning's lines that say nothing about this run, or mislead in it (rtda checkpoints are full on purpose)
LIGHTNING_NOISE_LINES = ("litlogger", "`weights_only` was not set", "TPU available:", "Trainer already configured with model summary",
                         "HPU available:")
LIGHTNING_NOISE_WARNINGS = ("The `srun` command is available on your system but is not used",
                            "isinstance\\(treespec, LeafSpec\\)` is deprecated",
                            "You have overridden `on_after_batch_transfer` in `LightningModule`",
                            "does not have many workers",
                            # the EMA teacher and the frozen ImageNet copy of DACS/MIC stay in eval mode by design
                            "module\\(s\\) in eval mode at the start of training",
                            # a method without a segmenter checkpoints every N iterations, after its optimizers stepped
                            "ModelCheckpoint with manual optimization and every_n_train_steps")


class LightningNoise(logging.Filter):
    """Drops the records whose message holds one of :data:`LIGHTNING_NOISE_LINES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in LIGHTNING_NOISE_LINES)


def log_to_the_run() -> None:
    """Everything the run says goes to the console and to its ``train.log`` (Hydra's two handlers on the root
    logger): rtda's lines, Lightning's (its loggers print on their own handler unless told to propagate) and
    Python warnings (each shown once, as usual, and kept in the file)."""
    logging.captureWarnings(True)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)]
        logger.propagate = True
    for handler in logging.getLogger().handlers:  # a logger's own filters do not see its children's records
        if not any(isinstance(f, LightningNoise) for f in handler.filters):
            handler.addFilter(LightningNoise())
    for text in LIGHTNING_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", f".*{text}.*")


class IterationProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting what a run counts: training iterations out of
    ``trainer.max_steps`` (``iteration 120/200``), with the time left to the last one, where Lightning shows
    epochs out of ``max_epochs - 1`` (``Epoch 3/-2`` with ``max_epochs=-1``) and restarts the bar every epoch.
    Losses and the validation mIoU sit beside it; a run without ``max_steps`` keeps Lightning's epochs."""

    def _counts_iterations(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_iterations() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_iterations():
            return super()._get_train_description(current_epoch)
        text = "iteration"
        return f"{text:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._counts_iterations() or self.train_progress_bar_id is None:
            super().on_train_epoch_start(trainer, pl_module)  # the first epoch (or epochs): Lightning's bar
            if self._counts_iterations():
                self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts where it was
            return
        self.refresh()  # one bar for the whole run: not reset at an epoch's start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._counts_iterations():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class ParameterSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column and total, which read 0 for every rtda network (it
    counts them only with an ``example_input_array``); ``rtda-bench`` measures FLOPs at a given resolution."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int = 0, **summarize_kwargs) -> None:
        columns = [(name, values) for name, values in summary_data if name not in ("FLOPs", "Mode")]
        widths = [max(len(name), *(len(str(v)) for v in values)) if values else len(name) for name, values in columns]
        rows = list(zip(*(values for _, values in columns)))
        lines = ["  ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths))]
        lines += ["  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)) for row in rows]
        lines.append(f"parameters: {get_human_readable_count(int(trainable_parameters))} trainable, "
                     f"{get_human_readable_count(int(total_parameters - trainable_parameters))} frozen "
                     f"({model_size:.1f} MB); FLOPs at a resolution: rtda-bench")
        log.info("\n" + "\n".join(lines))
