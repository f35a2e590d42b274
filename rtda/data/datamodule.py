"""One DataModule for every experiment: labelled source + unlabelled target for training, labelled
target for validation and test.

A training batch is ``{"source": {"image", "label"}, "target": {"image"}}``. The target loader is only
built when the method reads target images (``LightningModule.uses_target_images``), so source-only
runs do not pay for decoding images they never look at. Training length is counted in iterations
(``trainer.max_steps``); epochs are as long as the longer of the two loaders (the shorter one cycles).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rtda.data.transforms import SegmentationTransform
from rtda.errors import ConfigValueError

log = logging.getLogger("rtda")


def rare_class_probabilities(frequency: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """DAFormer's rare-class sampling distribution: ``P(c) = softmax((1 − f_c) / T)`` over the classes given."""
    return torch.softmax((1.0 - frequency.double()) / temperature, dim=0)


class RareClassSampler(Sampler[int]):
    """DAFormer's rare-class sampling (RCS, ``mmseg/datasets/uda_dataset.py``) for the source loader.

    Each draw picks a class ``c`` with probability ``softmax((1 − f_c) / T)`` — ``f_c`` the class's share of
    the labelled source pixels — then a uniformly random source image holding more than ``min_pixels``
    pixels of ``c`` (DAFormer: 3000 in GTA5's 1914×1052 labels). Classes without such an image cannot be
    drawn: the softmax runs over the others (DAFormer would fail on them). DAFormer also re-draws the random
    crop up to 10 times until it keeps ``min_pixels/2`` pixels of ``c``; that is not done here (rtda's GTA5
    recipe resizes the whole image, no crop: the class stays in the sample unless a geometric augmentation
    crops it out).

    ``counts``: ``N×C`` per-image pixel counts (:mod:`rtda.data.stats` ``per_image``). Draws are
    reproducible: a generator seeded with ``seed`` + the epoch, the same on every DDP process (Lightning
    then gives each process its own share of the draws)."""

    def __init__(self, counts: torch.Tensor, temperature: float = 0.01, min_pixels: int = 3000,
                 num_samples: int | None = None, seed: int = 0):
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.ndim != 2 or counts.shape[0] == 0:
            raise ConfigValueError("data.rare_class_sampling: the source set has no per-image class counts")
        if not temperature > 0:
            raise ConfigValueError(f"data.rcs_temperature={temperature}: expected a positive number (DAFormer: 0.01)")
        total = counts.sum()
        self.frequency = counts.sum(0) / total if total > 0 else counts.sum(0)
        eligible = (counts > min_pixels).any(dim=0) & (self.frequency > 0)
        if not eligible.any():
            raise ConfigValueError(f"data.rcs_min_pixels={min_pixels}: no source image has that many pixels of any class")
        self.classes = eligible.nonzero().flatten()
        self.probs = rare_class_probabilities(self.frequency[self.classes], temperature)
        self.images_with = [(counts[:, c] > min_pixels).nonzero().flatten() for c in self.classes.tolist()]
        self.num_samples = int(num_samples or counts.shape[0])
        self.seed, self.epoch = int(seed), 0

    def class_probabilities(self) -> dict[int, float]:
        return {int(c): float(p) for c, p in zip(self.classes, self.probs)}

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` (class, image index) draws."""
        which = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        images = torch.empty(n, dtype=torch.long)
        for k, w in enumerate(which.tolist()):
            pool = self.images_with[w]
            images[k] = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        return self.classes[which], images

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        yield from self.draw(self.num_samples, generator)[1].tolist()

    def __len__(self) -> int:
        return self.num_samples


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
        rare_class_sampling: bool = False,
        rcs_temperature: float = 0.01,
        rcs_min_pixels: int = 3000,
    ):
        """``source``/``target``/``val``/``test`` are dataset factories taking ``transform=`` (Hydra partials).

        ``augmentation`` holds albumentations lists under ``source`` and ``target``; ``prepare`` runs once
        on the main process before anything is read (the demo generator). ``rare_class_sampling`` draws the
        source images with :class:`RareClassSampler` (temperature ``rcs_temperature``, ``rcs_min_pixels``)
        from the class statistics of :mod:`rtda.data.stats` (computed once, cached next to the data).
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
        self.rare_class_sampling = bool(rare_class_sampling)
        self.rcs_temperature = rcs_temperature
        self.rcs_min_pixels = rcs_min_pixels
        if self.rare_class_sampling and not (isinstance(rcs_temperature, (int, float)) and rcs_temperature > 0):
            raise ConfigValueError(f"data.rcs_temperature={rcs_temperature!r}: expected a positive number (DAFormer: 0.01)")
        self.datasets: dict[str, Dataset] = {}
        self._rcs_sampler: RareClassSampler | None = None

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

    def rare_class_sampler(self) -> RareClassSampler:
        """The source loader's :class:`RareClassSampler`, from the source set's cached class statistics."""
        if self._rcs_sampler is None:
            from rtda.data.cityscapes import Cityscapes
            from rtda.data.gta5 import GTA5
            from rtda.data.stats import cached_stats_of

            dataset = self.dataset("source")
            if getattr(dataset, "label_paths", None) is None:
                raise ConfigValueError("data.rare_class_sampling=true needs a labelled source set")
            keywords = getattr(self.factories["source"], "keywords", {}) or {}
            name = "gta5" if isinstance(dataset, GTA5) else "cityscapes" if isinstance(dataset, Cityscapes) else "source"
            split = keywords.get("split", getattr(dataset, "split", "all"))
            root = Path(getattr(dataset, "root", keywords.get("root", ".")))
            stats = cached_stats_of(dataset, root / f"class_stats_{split}.json", {"dataset": name, "split": split},
                                    self.num_workers)
            counts = torch.tensor(stats["per_image"], dtype=torch.float64)[:, : self.num_classes]
            self._rcs_sampler = RareClassSampler(counts, self.rcs_temperature, self.rcs_min_pixels,
                                                 num_samples=len(dataset), seed=torch.initial_seed() % (2**31))
            log.info("rare-class sampling (T=%s, min %s pixels): P(class) %s", self.rcs_temperature, self.rcs_min_pixels,
                     {c: round(p, 4) for c, p in self._rcs_sampler.class_probabilities().items()})
        return self._rcs_sampler

    def _loader(self, split: str, train: bool) -> DataLoader:
        sampler = self.rare_class_sampler() if train and split == "source" and self.rare_class_sampling else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
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
