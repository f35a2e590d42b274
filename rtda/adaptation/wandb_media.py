"""The segmentation module's pictures and tables on W&B (only when a W&B logger is configured; else nothing)."""

from __future__ import annotations

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback

from rtda.data.render import denormalize, fit_to


def _wandb_loggers(trainer) -> list:
    from pytorch_lightning.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)] if trainer.is_global_zero else []


class WandbMedia(Callback):
    """What W&B shows beyond the scalar curves (only when a W&B logger is configured; else nothing):

    - ``val/segmentation``: the first ``num_images`` validation images as ``wandb.Image`` with two
      segmentation-mask layers, ``prediction`` and ``ground_truth``, labelled with the class names (W&B's mask
      viewer toggles them and each class), at every validation;
    - ``test/IoU_per_class``: a ``wandb.Table`` (class, IoU in %) of the test scores.
    """

    def __init__(self, num_images: int = 2):
        self.num_images = num_images

    def _class_labels(self, pl_module) -> dict[int, str]:
        return {**dict(enumerate(pl_module.class_names)), 255: "ignore"}

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        loggers = _wandb_loggers(trainer)
        if batch_idx != 0 or trainer.sanity_checking or self.num_images <= 0 or not loggers:
            return
        images = batch["image"][: self.num_images]
        preds = pl_module.predict_logits(images, images.shape[-2:]).argmax(dim=1).cpu().numpy().astype(np.uint8)
        labels = batch["label"][: self.num_images].cpu().numpy().astype(np.uint8)
        class_labels = self._class_labels(pl_module)
        pictures, masks = [], []
        for image, pred, label in zip(images, preds, labels):
            pictures.append(denormalize(image))
            masks.append({"prediction": {"mask_data": pred, "class_labels": class_labels},
                          "ground_truth": {"mask_data": fit_to(label, pred.shape), "class_labels": class_labels}})
        for logger in loggers:
            logger.log_image(key="val/segmentation", images=pictures, step=trainer.global_step, masks=masks,
                             caption=[f"iteration {trainer.global_step}"] * len(pictures))

    def on_test_end(self, trainer, pl_module) -> None:
        loggers = _wandb_loggers(trainer)
        if not loggers:
            return
        metrics = trainer.callback_metrics
        rows = []
        for name in pl_module.class_names:
            value = metrics.get(f"test/IoU/{name}")
            value = None if value is None or bool(torch.isnan(torch.as_tensor(value))) else 100.0 * float(value)
            rows.append([name, value])
        for logger in loggers:
            logger.log_table(key="test/IoU_per_class", columns=["class", "IoU (%)"], data=rows)
