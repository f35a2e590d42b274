"""Lightning callbacks of rtda's runs (``conf/callbacks/``).

:class:`RandomState` makes a resumed run draw the same random numbers as an uninterrupted one: Lightning's
checkpoints hold the weights, optimizers, schedules and loop counters, but not the random generators, and a
resumed run restarts them from ``seed`` (``seed_everything``), so the data order and augmentations after a
resume would differ from the run that was never interrupted.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback


class RandomState(Callback):
    """Save the Python, NumPy, torch (CPU and CUDA) random states in every checkpoint; restore them on resume.

    Stored as tensors and ints only, so that checkpoints still load with ``weights_only=True``. What this
    makes exact: a run resumed from a checkpoint taken at the end of an epoch of the training loader continues
    bit for bit (on the CPU with ``trainer.deterministic=true``) as the uninterrupted run. What it cannot:
    a checkpoint taken mid-epoch resumes with a new shuffle of the loader (Lightning does not restore a
    non-stateful sampler's position), so the remaining iterations of that epoch see other batches; the run
    is then statistically, not bitwise, the same.
    """

    def state_dict(self) -> dict:
        version, keys, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state = {
            "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        py = state["python"]
        random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


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
        from rtda.viz import _fit, denormalize

        images = batch["image"][: self.num_images]
        preds = pl_module.predict_logits(images, images.shape[-2:]).argmax(dim=1).cpu().numpy().astype(np.uint8)
        labels = batch["label"][: self.num_images].cpu().numpy().astype(np.uint8)
        class_labels = self._class_labels(pl_module)
        pictures, masks = [], []
        for image, pred, label in zip(images, preds, labels):
            pictures.append(denormalize(image))
            masks.append({"prediction": {"mask_data": pred, "class_labels": class_labels},
                          "ground_truth": {"mask_data": _fit(label, pred.shape), "class_labels": class_labels}})
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
