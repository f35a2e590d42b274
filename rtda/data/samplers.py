"""Training-loader sampling that a resumed run reproduces exactly, augmentation included.

Which sample a training loader yields at each step, and the random numbers its augmentation draws, are
pure functions of (the run's seed, the loader's name, the position in the loader's stream of samples):
nothing depends on how often an iterator was created, on the global random generators, on the number of
DataLoader workers or on which process (DDP rank) reads it. A run resumed from any checkpoint, mid-epoch
included, therefore reads exactly the batches the uninterrupted run read after that checkpoint:

- :class:`ResumableSampler` yields ``(index, sample_seed)`` pairs: epoch ``e`` is the positions
  ``e*M … (e+1)*M − 1`` of an endless stream (``M`` samples an epoch over all ranks) that concatenates
  permutations of the dataset (the ``k``-th drawn from a generator seeded from (seed, name, ``k``)), or the
  rare-class draws of :class:`rtda.data.datamodule.RareClassSampler` for the epoch. ``resume(epoch, skip)``
  makes the next pass over that epoch start ``skip`` samples in.
- :class:`SeededSamples` wraps a reader (any map-style dataset, unaware of all this): for
  ``(index, sample_seed)`` it reseeds the transform the reader was built with
  (:meth:`rtda.data.transforms.SegmentationTransform.reseed`), then returns ``reader[index]``.
- :class:`ResumableDataLoader` is a ``DataLoader`` that Lightning recognises as resumable; the position to
  resume from is read from Lightning's restored loop counters by the data module
  (:meth:`rtda.data.datamodule.DomainAdaptationDataModule.resume_point`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger("rtda")

SEED_BITS = 63


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints and strings): the same in every process and
    Python session (unlike ``hash()``), and unrelated for neighbouring inputs (unlike ``seed + k``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    return int(rank), int(world_size)


class ResumableSampler(DistributedSampler):
    """A training loader's sampler: ``samples_per_epoch`` ``(index, sample_seed)`` pairs an epoch for this
    process, a pure function of (``seed``, ``name``, epoch, position).

    The epoch's global sequence is ``M = samples_per_epoch × world_size`` positions of the loader's endless
    stream; rank ``r`` of ``w`` takes the positions ``r::w`` of it (the ranks partition the epoch, and a
    sample's position, so its augmentation, does not depend on the number of processes). ``sample_seed`` is
    a 63-bit hash of (``seed``, ``name``, global stream position). The stream concatenates permutations of
    ``range(dataset_size)``, so each sample is read once before any is read twice, across epoch boundaries
    too (an epoch longer or shorter than the dataset: the shorter of two domains); with ``rare_class`` (a
    :class:`~rtda.data.datamodule.RareClassSampler`) epoch ``e`` is instead its ``M`` draws for ``e``.

    ``set_epoch(e)`` (Lightning calls it on every training loader's sampler at each epoch start, with the
    epoch number restored from a checkpoint) selects the epoch; ``resume(e, skip)`` makes the next pass over
    epoch ``e`` start ``skip`` of this rank's samples in (once: a later pass is the whole epoch). ``len()``
    is always the whole epoch, as Lightning counts a resumed epoch's batches from the restored position.

    Why a :class:`~torch.utils.data.DistributedSampler` subclass: under DDP Lightning replaces the sampler of a
    training loader that is not one (``use_distributed_sampler``) by a ``DistributedSamplerWrapper`` that would
    re-shard and re-shuffle it; it leaves a ``DistributedSampler`` alone. The parent's ``__init__`` is not
    called (it needs an initialised process group); its attributes are set to what this sampler does.
    """

    def __init__(self, dataset_size: int, samples_per_epoch: int, seed: int, name: str = "train",
                 rare_class=None, rank: int | None = None, world_size: int | None = None):
        if dataset_size <= 0:
            raise ValueError("ResumableSampler: the dataset is empty")
        if samples_per_epoch <= 0:
            raise ValueError(f"ResumableSampler: samples_per_epoch={samples_per_epoch}: expected a positive number")
        self.dataset_size, self.name, self.rare_class = int(dataset_size), str(name), rare_class
        self.rank, self.num_replicas = _rank_and_world(rank, world_size)
        self.seed, self.epoch = int(seed), 0
        self.num_samples = int(samples_per_epoch)  # this rank's, as DistributedSampler names it
        self.total_size = self.num_samples * self.num_replicas  # M: the epoch's global sequence
        self.shuffle, self.drop_last, self.dataset = True, True, None
        self._resume_epoch: int | None = None
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._resume_epoch:
            self._resume_epoch, self._skip = None, 0
        self.epoch = int(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        """The next ``__iter__`` yields epoch ``epoch`` from this rank's ``skip``-th sample on."""
        if skip < 0:
            raise ValueError(f"ResumableSampler.resume: skip={skip}")
        self.epoch = int(epoch)
        self._resume_epoch, self._skip = (int(epoch), int(skip)) if skip else (None, 0)

    def permutation(self, k: int) -> torch.Tensor:
        """The stream's ``k``-th permutation of the dataset."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.name, "permutation", k))
        return torch.randperm(self.dataset_size, generator=generator)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The dataset indices at the ``M`` global positions of epoch ``epoch`` (all ranks)."""
        if self.rare_class is not None:
            return self.rare_class.epoch_draws(epoch, self.total_size)
        first, stop = epoch * self.total_size, (epoch + 1) * self.total_size
        k0, k1 = first // self.dataset_size, (stop - 1) // self.dataset_size
        stream = torch.cat([self.permutation(k) for k in range(k0, k1 + 1)])
        offset = first - k0 * self.dataset_size
        return stream[offset: offset + self.total_size]

    def sample_seed(self, position: int) -> int:
        """The augmentation seed of the sample at global stream ``position``."""
        return mix_seed(self.seed, self.name, "sample", position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        start = self._skip if self._resume_epoch == epoch else 0
        self._resume_epoch, self._skip = None, 0
        if start >= self.num_samples:
            return iter(())
        indices = self.epoch_indices(epoch)[self.rank:: self.num_replicas].tolist()
        first = epoch * self.total_size + self.rank
        return iter([(indices[i], self.sample_seed(first + i * self.num_replicas))
                     for i in range(start, self.num_samples)])

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict:
        """What makes this sampler's stream (not its position: Lightning's loop counters hold that)."""
        return {"name": self.name, "seed": self.seed, "dataset_size": self.dataset_size,
                "samples_per_epoch": self.num_samples, "world_size": self.num_replicas,
                "rare_class": self.rare_class is not None}

    def check_state(self, saved: dict) -> bool:
        """Whether a checkpoint's :meth:`state_dict` describes this stream; if not, say what changed (the
        resumed run then reads other batches than the uninterrupted one would have)."""
        changed = {k: (v, self.state_dict().get(k)) for k, v in saved.items() if self.state_dict().get(k) != v}
        if changed:
            log.warning("the %s loader's sampling differs from the checkpoint's (%s): the resumed run reads other "
                        "batches than the interrupted one would have", self.name,
                        ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
        return not changed

    def __repr__(self) -> str:
        return (f"ResumableSampler({self.name!r}, {self.num_samples} of {self.dataset_size} samples an epoch, "
                f"rank {self.rank}/{self.num_replicas}, seed {self.seed}, epoch {self.epoch}"
                f"{', rare-class' if self.rare_class is not None else ''})")


class SeededSamples(Dataset):
    """``dataset`` read at ``(index, sample_seed)``: ``transform.reseed(sample_seed)``, then ``dataset[index]``.

    ``transform`` is the object the reader was built with (``factory(transform=...)``), so the reader needs no
    change: its ``__getitem__`` (decoding, ``skip_unreadable``'s replacement of a file that fails to decode by
    the next one, then the transform) runs as always, its augmentation drawing from generators seeded for this
    sample only. The same pair gives the same sample in any process, after any other reads, with any number of
    DataLoader workers. A plain index (Lightning's sequential sampler with ``trainer.overfit_batches``) is
    seeded from (``seed``, ``name``, the index): a sample then gets the same augmentation at every epoch.
    """

    def __init__(self, dataset: Dataset, transform: Any, seed: int, name: str = "train"):
        self.dataset, self.transform, self.seed, self.name = dataset, transform, int(seed), str(name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            index, sample_seed = int(item[0]), int(item[1])
        else:
            index = int(item)
            sample_seed = mix_seed(self.seed, self.name, "index", index)
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:
            reseed(sample_seed)
        return self.dataset[index]

    def __repr__(self) -> str:
        return f"SeededSamples({self.name!r}, {self.dataset!r})"


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` that Lightning treats as resumable (``state_dict`` / ``load_state_dict``; so it
    does not warn that a mid-epoch checkpoint resumes unreliably). The position is not in this state: the
    data module restarts the sampler from Lightning's restored loop counters (``resume``); the state holds
    what defines the stream, and a resumed run whose stream differs (another batch size, number of
    processes, dataset) says so."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if isinstance(self.sampler, ResumableSampler) else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict and isinstance(self.sampler, ResumableSampler):
            self.sampler.check_state(state_dict)


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of rtda's loaders: a DataLoader worker leaves SLURM's requeue signals (SIGUSR1 of the
    plain ``sbatch`` recipe, submitit's SIGUSR2) to its training process. SLURM delivers ``--signal`` /
    ``scancel --signal`` to every process of a job step, workers included: with the handlers they inherit when
    forked, a worker would die (SIGUSR1's default action; the training process then fails on a lost worker) or
    run submitit's requeue itself before the run has saved anything. SIGTERM keeps its default action: it is how
    the loader and multiprocessing end their workers. Lightning's worker seeding (``seed_everything(workers=True)``),
    which a ``worker_init_fn`` of our own replaces, runs as before."""
    import os
    import signal

    for name in ("SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
