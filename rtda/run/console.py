"""What a run shows on the console (and keeps in its ``train.log``): rtda's lines, Lightning's that concern the
user, warnings once; Lightning's lines that say nothing about the run, or mislead in it, filtered out."""

from __future__ import annotations

import logging
import warnings

#: Lightning's lines that say nothing about this run, or mislead in it (rtda checkpoints are full on purpose)
LIGHTNING_NOISE_LINES = ("litlogger", "`weights_only` was not set")
LIGHTNING_NOISE_WARNINGS = ("The `srun` command is available on your system but is not used",
                            "isinstance\\(treespec, LeafSpec\\)` is deprecated",
                            "You have overridden `on_after_batch_transfer` in `LightningModule`",
                            "does not have many workers",
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
