"""The training loaders' order and augmentation are pure functions of (seed, loader, position): the pieces
that make a resumed run read exactly what the uninterrupted one would have (rtda.data.samplers)."""

from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from rtda.data.datamodule import DomainAdaptationDataModule, RareClassSampler
from rtda.data.samplers import ResumableDataLoader, ResumableSampler, SeededSamples, mix_seed
from rtda.data.transforms import SegmentationTransform


def _indices(sampler) -> list[int]:
    return [index for index, _ in sampler]


def _epochs(sampler, epochs=range(3)) -> list[list[tuple[int, int]]]:
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


# -- the sampler -------------------------------------------------------------------------------------------------
def test_the_epoch_order_is_a_pure_function_of_seed_loader_epoch_and_position():
    a, b = ResumableSampler(10, 8, seed=1, name="source"), ResumableSampler(10, 8, seed=1, name="source")
    epochs = _epochs(a)
    assert epochs == _epochs(b) and len(a) == 8 and all(len(e) == 8 for e in epochs)
    assert _epochs(b, [2, 0, 1]) == [epochs[2], epochs[0], epochs[1]]  # no state carried between epochs
    assert _epochs(ResumableSampler(10, 8, seed=2, name="source")) != epochs
    assert _epochs(ResumableSampler(10, 8, seed=1, name="target")) != epochs  # each loader its own stream
    # the stream concatenates permutations: every sample once before any twice, across epoch boundaries
    stream = [index for epoch in epochs for index, _ in epoch]
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10))
    # a sample's seed is the hash of its stream position
    seeds = [seed for epoch in epochs for _, seed in epoch]
    assert seeds == [mix_seed(1, "source", "sample", p) for p in range(24)] and len(set(seeds)) == 24
    assert all(0 <= s < 2**63 for s in seeds)
    # the epoch's draws come from generators of their own: the global ones are neither used nor disturbed
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a.set_epoch(5)
    list(a)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("epoch, skip", [(0, 3), (2, 5), (1, 7), (1, 8)])
def test_resume_yields_exactly_the_tail_of_the_epoch_once(epoch, skip):
    full = _epochs(ResumableSampler(6, 8, seed=0, name="source"), range(4))
    sampler = ResumableSampler(6, 8, seed=0, name="source")
    sampler.resume(epoch, skip)
    sampler.set_epoch(epoch)  # what Lightning calls at the epoch's start: the resume stands
    assert list(sampler) == full[epoch][skip:]
    assert list(sampler) == full[epoch]  # once: a later pass is the whole epoch
    assert len(sampler) == 8  # Lightning counts the resumed epoch's batches from the restored position
    sampler.resume(epoch, skip)
    sampler.set_epoch(epoch + 1)  # another epoch: nothing to skip
    assert list(sampler) == full[epoch + 1]


def test_the_shards_of_two_ranks_partition_the_epoch_and_keep_each_sample_its_seed():
    one = ResumableSampler(11, 12, seed=4, name="source", rank=0, world_size=1)
    ranks = [ResumableSampler(11, 6, seed=4, name="source", rank=r, world_size=2) for r in (0, 1)]
    for epoch in range(3):
        whole, shards = _epochs(one, [epoch])[0], [_epochs(r, [epoch])[0] for r in ranks]
        assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert all(isinstance(r, torch.utils.data.DistributedSampler) for r in ranks)  # Lightning leaves it alone
    ranks[1].resume(1, 2)
    assert list(ranks[1]) == _epochs(one, [1])[0][1::2][2:]
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(11, 6, seed=4, rank=2, world_size=2)


def test_rare_class_draws_are_reproducible_per_epoch_and_sharded():
    counts = torch.tensor([[9000, 0, 0], [9000, 4000, 0], [9000, 0, 3500], [9000, 3100, 3100], [8000, 0, 0]],
                          dtype=torch.float64)
    a, b = RareClassSampler(counts, seed=3), RareClassSampler(counts, seed=3)
    assert torch.equal(a.epoch_draws(2, 50), b.epoch_draws(2, 50))
    assert not torch.equal(a.epoch_draws(2, 50), a.epoch_draws(3, 50))
    assert not torch.equal(a.epoch_draws(2, 50), RareClassSampler(counts, seed=4).epoch_draws(2, 50))
    assert set(a.epoch_draws(0, 200).tolist()) <= {1, 2, 3}  # images holding a class above min_pixels
    a.set_epoch(2)
    assert list(a) == a.epoch_draws(2).tolist()  # on its own: num_samples draws of the chosen epoch
    sampler = ResumableSampler(5, 6, seed=3, name="source", rare_class=b, rank=1, world_size=2)
    sampler.set_epoch(4)
    assert _indices(sampler) == b.epoch_draws(4, 12)[1::2].tolist()


def test_a_changed_stream_is_reported_on_resume(caplog):
    sampler = ResumableSampler(10, 8, seed=1, name="source")
    loader = ResumableDataLoader(range(10), batch_size=2, sampler=sampler, drop_last=True)
    assert loader.state_dict()["samples_per_epoch"] == 8
    assert sampler.check_state(loader.state_dict())
    loader.load_state_dict({**loader.state_dict(), "samples_per_epoch": 16})
    assert "samples_per_epoch 16 -> 8" in caplog.text


# -- seeded augmentation -------------------------------------------------------------------------------------------
def _files(tmp_path, n=5, broken=None):
    from rtda.data.base import SegmentationFiles

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        images.append(tmp_path / f"{i}.png")
        labels.append(tmp_path / f"{i}_label.png")
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(images[-1])
        Image.fromarray(rng.integers(0, 19, (24, 40), dtype=np.uint8)).save(labels[-1])
    if broken is not None:  # the header reads, the pixels do not (an interrupted copy)
        whole = images[broken].read_bytes()
        images[broken].write_bytes(whole[: len(whole) // 3])
    transform = SegmentationTransform((16, 32), [A.RandomScale(scale_limit=(-0.25, 0.5), p=1.0),
                                                 A.PadIfNeeded(16, 32, border_mode=0, fill=0, fill_mask=255),
                                                 A.RandomCrop(16, 32), A.HorizontalFlip(p=0.5),
                                                 A.ColorJitter(p=0.8), A.GaussNoise(p=0.5)])
    files = SegmentationFiles(images, labels, lambda img: np.asarray(img), transform)
    files.skip_unreadable = True
    return files, transform


def _same(a: dict, b: dict) -> bool:
    return torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_a_seeded_sample_is_the_same_after_any_other_reads_and_differs_for_another_seed(tmp_path):
    files, transform = _files(tmp_path)
    samples = SeededSamples(files, transform, seed=0, name="source")
    first = samples[(2, 123)]
    for item in [(0, 5), (2, 124), (4, 9), 3]:
        samples[item]
    np.random.seed(1)  # the global generators play no part
    assert _same(samples[(2, 123)], first)
    others = [samples[(2, s)] for s in (124, 125, 126)]
    assert not any(_same(o, first) for o in others)
    assert _same(samples[3], samples[3])  # a plain index (trainer.overfit_batches) is seeded from it
    # a fresh reader and transform (what another process holds) give the same sample
    (tmp_path / "copy").mkdir()
    again, transform2 = _files(tmp_path / "copy")
    assert _same(SeededSamples(again, transform2, seed=0, name="source")[(2, 123)], first)


def test_a_file_that_fails_to_decode_is_replaced_by_the_next_sample_deterministically(tmp_path):
    files, transform = _files(tmp_path, broken=1)
    samples = SeededSamples(files, transform, seed=0, name="source")
    replaced = samples[(1, 77)]
    assert replaced["skipped"].endswith("1.png") and replaced["name"] == "2"
    assert _same(replaced, samples[(1, 77)]) and _same(replaced, samples[(2, 77)])  # the next one, same draws


# -- the data module's training loaders ----------------------------------------------------------------------------
def _datamodule(data_dir, num_workers=0, seed=7, **kwargs) -> DomainAdaptationDataModule:
    from functools import partial

    from rtda.data.cityscapes import Cityscapes
    from rtda.data.gta5 import GTA5

    geometric = lambda size: [A.RandomScale(scale_limit=(-0.25, 0.5), p=1.0),  # noqa: E731
                              A.PadIfNeeded(*size, border_mode=0, fill=0, fill_mask=255), A.RandomCrop(*size),
                              A.HorizontalFlip(p=0.5)]
    return DomainAdaptationDataModule(
        source=partial(GTA5, root=data_dir / "demo" / "gta5"),
        target=partial(Cityscapes, root=data_dir / "demo" / "cityscapes", split="train", labelled=False),
        val=partial(Cityscapes, root=data_dir / "demo" / "cityscapes", split="val"),
        source_size=[18, 32], target_size=[16, 32], batch_size=2, num_workers=num_workers, seed=seed,
        augmentation={"source": geometric((18, 32)), "target": geometric((16, 32))}, **kwargs)


def _batches(datamodule, epochs=(0, 1), trainer=None) -> list:
    if trainer is not None:
        datamodule.trainer = trainer
    combined = datamodule.train_dataloader()
    out = []
    for epoch in epochs:
        for loader in combined.flattened:
            loader.sampler.set_epoch(epoch)
        out += [batch for batch, _, _ in combined]
    return out


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[d]["image"], y[d]["image"]) and (d == "target" or torch.equal(x[d]["label"], y[d]["label"]))
        for x, y in zip(a, b) for d in ("source", "target"))


def test_training_loaders_are_equally_long_and_workers_give_the_batches_of_the_main_process(tiny_demo_dir):
    datamodule = _datamodule(tiny_demo_dir)
    plain = _batches(datamodule)
    combined = datamodule.train_dataloader()
    # 12 source images, 8 target images, batches of 2: 6 batches an epoch from both loaders
    assert combined._mode == "min_size" and [len(dl) for dl in combined.flattened] == [6, 6]
    assert len(plain) == 12 and set(plain[0]) == {"source", "target"}
    assert plain[0]["source"]["image"].shape == (2, 3, 18, 32) and plain[0]["target"]["image"].shape == (2, 3, 16, 32)
    assert _same_batches(_batches(_datamodule(tiny_demo_dir)), plain)  # the same seed: the same batches
    assert not _same_batches(_batches(_datamodule(tiny_demo_dir, seed=8)), plain)
    assert _same_batches(_batches(_datamodule(tiny_demo_dir, num_workers=2)), plain)  # persistent workers


def _restored(epoch: int, processed: int, limit=1.0):
    """What train_dataloader() sees of a trainer that has just restored a checkpoint."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    fit_loop = SimpleNamespace(restarting=True, epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(current_epoch=epoch, fit_loop=fit_loop, limit_train_batches=limit, global_rank=0,
                           world_size=1, lightning_module=SimpleNamespace(uses_target_images=True))


def test_restored_loaders_start_at_the_checkpoints_position(tiny_demo_dir):
    full = _batches(_datamodule(tiny_demo_dir), epochs=(0, 1, 2))  # 6 batches an epoch
    mid = _batches(_datamodule(tiny_demo_dir), epochs=(1, 2), trainer=_restored(1, 4))
    assert _same_batches(mid, full[10:])  # the last 2 batches of epoch 1, then epoch 2
    # a checkpoint of the epoch's last batch: the loop goes on with the next epoch, from its start
    end = _batches(_datamodule(tiny_demo_dir), epochs=(1, 2), trainer=_restored(0, 6))
    assert _same_batches(end[:6], full[6:12])
    # trainer.limit_train_batches=3 (debug=limit): an epoch is 3 batches, so after 3 the next epoch begins
    limited = _datamodule(tiny_demo_dir)
    limited.trainer = _restored(0, 3, limit=3)
    assert limited.resume_point(limited.batches_per_epoch()) == (1, 0)
    limited.trainer = _restored(0, 2, limit=3)
    assert limited.resume_point(limited.batches_per_epoch()) == (0, 2)
    limited.trainer = _restored(2, 1, limit=0.5)
    assert limited.resume_point(limited.batches_per_epoch()) == (2, 1)
    # the seed a checkpoint saved wins over this run's
    datamodule = _datamodule(tiny_demo_dir, seed=1)
    datamodule.load_state_dict(_datamodule(tiny_demo_dir).state_dict())
    assert datamodule.train_seed() == 7


# -- through Lightning's loops: a restored checkpoint, wherever it was taken, continues with the same batches -------
class _Recorder(__import__("pytorch_lightning").LightningModule):
    """A one-parameter module that records what each training step reads (names and pixels of both domains)."""

    uses_target_images = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple((tuple(batch[d]["name"]), int(batch[d]["image"].sum())) for d in ("source", "target")))
        return self.w * batch["source"]["image"].float().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _SaveAt(__import__("pytorch_lightning").Callback):
    """Checkpoints at the given iterations: in ``on_train_batch_end`` (as rtda's periodic checkpoint) and after
    the validation (as the validation's checkpoint)."""

    def __init__(self, folder, steps):
        self.folder, self.steps = folder, set(steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.folder / f"batch_end_{trainer.global_step}.ckpt")

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.folder / f"validation_{trainer.global_step}.ckpt")


def _fit(data_dir, folder, ckpt_path=None, save_at=(), num_workers=0, **trainer_kwargs) -> list:
    import pytorch_lightning as pl

    module = _Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=9, max_epochs=-1, val_check_interval=3, check_val_every_n_epoch=None,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                         callbacks=[_SaveAt(folder, save_at)], **trainer_kwargs)
    trainer.fit(module, datamodule=_datamodule(data_dir, num_workers=num_workers), ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("limit", [1.0, 4], ids=["whole-epochs", "limit_train_batches=4"])
def test_a_run_resumed_from_any_checkpoint_reads_the_batches_of_the_uninterrupted_run(limit, tiny_demo_dir, tmp_path):
    """6 batches an epoch (4 with trainer.limit_train_batches=4), validation every 3 iterations: checkpoints in
    on_train_batch_end and after the validation, mid-epoch and at an epoch's end; each resumed (with a worker
    process at the epoch ends: its iterator is made, and fills, before the epoch begins) reads exactly the
    uninterrupted run's remaining batches."""
    steps = [2, 3, 4, 6] if limit == 1.0 else [2, 3, 4]
    whole = _fit(tiny_demo_dir, tmp_path, save_at=steps, limit_train_batches=limit)
    assert len(whole) == 9 and len(set(whole)) == 9  # 9 iterations, no batch read twice
    for ckpt in sorted(tmp_path.glob("*.ckpt")):
        step = int(ckpt.stem.rsplit("_", 1)[1])
        at_epoch_end = step % (6 if limit == 1.0 else limit) == 0
        resumed = _fit(tiny_demo_dir, tmp_path / ckpt.stem, ckpt_path=ckpt, num_workers=1 if at_epoch_end else 0,
                       limit_train_batches=limit)
        assert resumed == whole[step:], ckpt.name
