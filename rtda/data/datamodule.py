"""One DataModule for every experiment: labelled source + unlabelled target for training, labelled
target for validation and test.

A training batch is ``{"source": {"image", "label"}, "target": {"image"}}``. The target loader is only
built when the method reads target images (``LightningModule.uses_target_images``), so source-only
runs do not pay for decoding images they never look at. Training length is counted in iterations
(``trainer.max_steps``); epochs are as long as the longer of the two loaders (the shorter one cycles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from rtda.data.transforms import SegmentationTransform
from rtda.errors import ConfigValueError


class DomainAdaptationDataModule(pl.LightningDataModule):
    def __init__(
        self,
        source: Callable[..., Dataset],
        val: Callable[..., Dataset],
        target: Callable[..., Dataset] | None = None,
        test: Callable[..., Dataset] | None = None,
        source_size: Sequence[int] | None = None,
        target_size: Sequence[int] | None = None,
        eval_size: Sequence[int] | None = None,
        full_res_labels: bool = True,
        augmentation: dict | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        prepare: Callable[[], object] | None = None,
        num_classes: int = 19,
    ):
        """``source``/``target``/``val``/``test`` are dataset factories taking ``transform=`` (Hydra partials).

        ``augmentation`` holds albumentations lists under ``source`` and ``target``; ``prepare`` runs once
        on the main process before anything is read (the demo generator).
        """
        super().__init__()
        self.factories = {"source": source, "target": target, "val": val, "test": test or val}
        self.sizes = {"source": source_size, "target": target_size, "eval": eval_size or target_size}
        self.full_res_labels = full_res_labels
        self.augmentation = dict(augmentation or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prepare = prepare
        self.num_classes = num_classes
        self.datasets: dict[str, Dataset] = {}

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (source / target / val / test) with its transform, built on first use."""
        if split not in self.datasets:
            factory = self.factories[split]
            if factory is None:
                raise ConfigValueError(f"data.{split} is not configured: this method needs a {split} dataset")
            if split in ("source", "target"):
                transform = SegmentationTransform(self.sizes[split], self.augmentation.get(split) or ())
            else:
                transform = SegmentationTransform(self.sizes["eval"], resize_label=not self.full_res_labels)
            dataset = factory(transform=transform)
            if split in ("source", "target") and hasattr(dataset, "skip_unreadable"):
                dataset.skip_unreadable = True  # a file truncated on disk must not kill a long run mid-epoch
            self.datasets[split] = dataset
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["source", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in splits.get(stage, ["source", "val", "test"]):
            self.dataset(split)

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,  # BatchNorm needs more than one sample; schedules count full batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _uses_target_images(self) -> bool:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return bool(getattr(module, "uses_target_images", True)) and self.factories["target"] is not None

    def train_dataloader(self):
        loaders = {"source": self._loader("source", train=True)}
        if self._uses_target_images():
            loaders["target"] = self._loader("target", train=True)
        return loaders  # Lightning combines a dict of loaders ("max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
