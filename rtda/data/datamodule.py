"""One DataModule for every experiment: labelled source + unlabelled target for training, labelled
target for validation and test.

A training batch is ``{"source": {"image", "label"}, "target": {"image"}}``. The target loader is only
built when the method reads target images (``LightningModule.uses_target_images``), so source-only
runs do not pay for decoding images they never look at. Training length is counted in iterations
(``trainer.max_steps``).

Training loaders resume exactly (:mod:`rtda.data.samplers`): every training loader yields the same number
of batches an epoch, ``max(len(set) // (batch_size × processes))`` over the training sets (the smaller set
runs on into its next permutation rather than restarting), combined in Lightning's ``min_size`` mode so
that each loader is iterated exactly once an epoch; which samples a batch holds and how they are augmented
are a pure function of (seed, loader, position), and after a checkpoint is restored ``train_dataloader``
starts each loader at the restored position of the epoch.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from rtda.data.cityscapes import Cityscapes
from rtda.data.gta5 import GTA5
from rtda.data.labels import EVAL_CLASSES, NUM_CLASSES
from rtda.data.samplers import ResumableDataLoader, ResumableSampler, SeededSamples, init_worker, mix_seed
from rtda.data.stats import cached_stats_of
from rtda.data.transforms import SegmentationTransform
from rtda.run.errors import ConfigValueError

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
    reproducible: those of epoch ``e`` (:meth:`epoch_draws`) come from a generator seeded from
    (``seed``, ``e``) only, the same on every DDP process (the training loader's
    :class:`~rtda.data.samplers.ResumableSampler` gives each process its share of them). Iterated on its
    own, it yields ``num_samples`` draws of epoch :attr:`epoch`, then moves to the next epoch
    (``set_epoch`` chooses it)."""

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
        # the pools end to end, for drawing n images at once
        self._pool_sizes = torch.tensor([len(pool) for pool in self.images_with])
        self._pool_starts = torch.cumsum(self._pool_sizes, 0) - self._pool_sizes
        self._pools = torch.cat(self.images_with)
        self.num_samples = int(num_samples or counts.shape[0])
        self.seed, self.epoch = int(seed), 0

    def class_probabilities(self) -> dict[int, float]:
        return {int(c): float(p) for c, p in zip(self.classes, self.probs)}

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` (class, image index) draws: a class by ``probs``, then uniformly one of its images."""
        which = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        sizes = self._pool_sizes[which]
        uniform = torch.rand(n, generator=generator, dtype=torch.float64)
        pick = torch.minimum((uniform * sizes).long(), sizes - 1)
        return self.classes[which], self._pools[self._pool_starts[which] + pick]

    def epoch_draws(self, epoch: int, n: int | None = None) -> torch.Tensor:
        """The image indices of epoch ``epoch``'s first ``n`` (``num_samples``) draws: a pure function of
        (``seed``, ``epoch``, ``n``)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, "rare-class", int(epoch)))
        return self.draw(self.num_samples if n is None else int(n), generator)[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(self.epoch_draws(epoch).tolist())

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
        seed: int | None = None,
        eval_classes: str = "all",
    ):
        """``source``/``target``/``val``/``test`` are dataset factories taking ``transform=`` (Hydra partials).

        ``augmentation`` holds albumentations lists under ``source`` and ``target``; ``prepare`` runs once
        on the main process before anything is read (the demo generator). ``rare_class_sampling`` draws the
        source images with :class:`RareClassSampler` (temperature ``rcs_temperature``, ``rcs_min_pixels``)
        from the class statistics of :mod:`rtda.data.stats` (computed once, cached next to the data).
        ``seed`` is the base seed of the training order and augmentation (:mod:`rtda.data.samplers`); None:
        the run's ``seed`` (what ``seed_everything`` set), else a random one. It is saved in the checkpoints,
        and a resumed run continues with the checkpoint's. ``eval_classes`` (``all`` | ``synthia16`` |
        ``synthia13``, :data:`rtda.data.labels.EVAL_CLASSES`): the classes the validation/test ``mIoU`` averages; a
        SYNTHIA subset also reports ``mIoU16`` and ``mIoU13`` (and ``mIoU19``) beside it.
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
        self.transforms: dict[str, SegmentationTransform] = {}
        self._rcs_sampler: RareClassSampler | None = None
        self._seed = None if seed is None else int(seed)
        if eval_classes not in EVAL_CLASSES:
            raise ConfigValueError(f"data.eval_classes={eval_classes!r}: expected one of {', '.join(EVAL_CLASSES)}")
        if eval_classes != "all" and num_classes != NUM_CLASSES:
            raise ConfigValueError(f"data.eval_classes={eval_classes} names Cityscapes classes: it needs num_classes="
                                   f"{NUM_CLASSES}, not {num_classes}")
        self.eval_classes = eval_classes

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
            self.transforms[split] = transform
            if split in ("source", "target") and hasattr(dataset, "skip_unreadable"):
                dataset.skip_unreadable = True  # a file truncated on disk must not kill a long run mid-epoch
            self.datasets[split] = dataset
        return self.datasets[split]

    def train_seed(self) -> int:
        """The base seed of the training loaders' order and augmentation, the same on every process."""
        if self._seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")  # seed_everything's, on every DDP process
            if env is not None:
                self._seed = int(env)
            else:  # no seed: a random one (not from the global generators), rank 0's for all
                seed = random.SystemRandom().getrandbits(31)
                trainer = getattr(self, "trainer", None)
                self._seed = int(trainer.strategy.broadcast(seed)) if trainer is not None else seed
        return self._seed

    def state_dict(self) -> dict:
        return {"train_seed": self._seed} if self._seed is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("train_seed") is not None:  # resumed: the order and augmentation the run began with
            self._seed = int(state_dict["train_seed"])
            if self._rcs_sampler is not None:
                self._rcs_sampler.seed = self._seed

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["source", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in splits.get(stage, ["source", "val", "test"]):
            self.dataset(split)

    def rare_class_sampler(self) -> RareClassSampler:
        """The source loader's :class:`RareClassSampler`, from the source set's cached class statistics."""
        if self._rcs_sampler is None:
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
                                                 num_samples=len(dataset), seed=self.train_seed())
            log.info("rare-class sampling (T=%s, min %s pixels): P(class) %s", self.rcs_temperature, self.rcs_min_pixels,
                     {c: round(p, 4) for c, p in self._rcs_sampler.class_probabilities().items()})
        return self._rcs_sampler

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=init_worker,
            # its own generator: creating an iterator (once, or again after a resume) draws nothing from the global
            # one, which a method's own random numbers (FDA's crops, DACS's masks) come from
            generator=torch.Generator().manual_seed(0),
        )

    def _uses_target_images(self) -> bool:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return bool(getattr(module, "uses_target_images", True)) and self.factories["target"] is not None

    def training_splits(self) -> list[str]:
        return ["source", "target"] if self._uses_target_images() else ["source"]

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if initialised else (0, 1)

    def batches_per_epoch(self) -> int:
        """``L``: the batches every training loader yields an epoch, on each process (full batches only)."""
        world = self._rank_and_world()[1]
        return max(1, max(len(self.dataset(split)) // (self.batch_size * world) for split in self.training_splits()))

    def resume_point(self, batches_per_epoch: int) -> tuple[int, int]:
        """(epoch, batches of it already trained) where training continues: after a restored checkpoint, the
        restored loop position (read when Lightning asks for the loaders, before its loops restart); else
        the current epoch from its start."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        epoch = int(trainer.current_epoch)
        fit_loop = trainer.fit_loop
        if not fit_loop.restarting:
            return epoch, 0
        # the batches whose training step is in the checkpoint: "processed" (a checkpoint written in
        # on_train_batch_end, every_n_train_steps, precedes that batch's "completed")
        done = int(fit_loop.epoch_loop.batch_progress.current.processed)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            epoch_length = min(batches_per_epoch, limit)
        else:
            epoch_length = int(batches_per_epoch * float(limit))
        if done >= epoch_length:  # the epoch was over: the loop goes on to the next one with these iterators
            return epoch + 1, 0
        return epoch, done

    def train_dataloader(self):
        """One loader per training set (``source``, and ``target`` when the method reads target images), each
        with a :class:`~rtda.data.samplers.ResumableSampler` of :meth:`batches_per_epoch` batches, started at
        :meth:`resume_point`; combined in ``min_size`` mode (no loader is restarted within an epoch)."""
        seed = self.train_seed()
        rank, world = self._rank_and_world()
        num_batches = self.batches_per_epoch()
        epoch, done = self.resume_point(num_batches)
        if epoch or done:
            log.info("training loaders start at epoch %d, batch %d (%d batches an epoch)", epoch, done, num_batches)
        loaders = {}
        for split in self.training_splits():
            dataset = self.dataset(split)
            rare_class = None
            if split == "source" and self.rare_class_sampling:
                rare_class = self.rare_class_sampler()
                rare_class.seed = seed
            sampler = ResumableSampler(len(dataset), num_batches * self.batch_size, seed, split,
                                       rare_class=rare_class, rank=rank, world_size=world)
            sampler.resume(epoch, done * self.batch_size)
            loaders[split] = ResumableDataLoader(
                SeededSamples(dataset, self.transforms.get(split), seed, split),
                batch_size=self.batch_size,
                sampler=sampler,
                drop_last=True,  # BatchNorm needs more than one sample; schedules count full batches
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
                worker_init_fn=init_worker,
                # the loader's own generator (worker base seeds), so creating iterators draws nothing from
                # the global one, which the checkpoints restore for the training step's own random numbers
                generator=torch.Generator().manual_seed(mix_seed(seed, split, "loader")),
            )
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
