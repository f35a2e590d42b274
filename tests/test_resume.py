"""Preemption-safe resume: ckpt_path=auto, periodic checkpoints, random states, the CSV history, SIGKILL."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_DEMO, rtda_train, tiny_overrides


def test_random_state_round_trips_and_loads_weights_only(tmp_path):
    from rtda.run.callbacks import RandomState

    cb = RandomState()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save({"callbacks": {"RandomState": cb.state_dict()}}, tmp_path / "c.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    cb.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["RandomState"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_auto_passes_over_a_truncated_last_checkpoint(tmp_path):
    import time

    from rtda.pipelines.train import resolve_ckpt_path

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert resolve_ckpt_path("auto", tmp_path) is None  # nothing yet: from scratch
    torch.save({"a": 1}, folder / "step000004-mIoU0.1000.ckpt")
    time.sleep(0.01)
    torch.save({"a": 2}, folder / "last.ckpt")
    assert resolve_ckpt_path("auto", tmp_path) == str(folder / "last.ckpt")
    whole = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])  # killed while writing it
    assert resolve_ckpt_path("auto", tmp_path) == str(folder / "step000004-mIoU0.1000.ckpt")
    assert resolve_ckpt_path(None, tmp_path) is None


def test_csv_rows_after_the_resumed_checkpoint_are_dropped_once(tmp_path):
    from rtda.run.loggers import HistoryKeepingCSVLogger

    logger = HistoryKeepingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.log_metrics({"val/mIoU": 0.2}, step=1)
    logger.log_metrics({"train/loss": 0.4}, step=2)  # after the checkpoint of iteration 2, flushed before the kill
    logger.save()
    assert HistoryKeepingCSVLogger(save_dir=str(tmp_path), name="csv", version="").forget_from(2) == 1
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["val/mIoU"]) for r in rows] == [("0", "1.0", ""), ("1", "0.5", ""), ("1", "", "0.2")]




def _history(folder: Path) -> list[tuple]:
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["step"], r.get("train/loss", ""), r.get("val/mIoU", ""), r.get("test/mIoU", "")) for r in rows
            if r.get("train/loss") or r.get("val/mIoU") or r.get("test/mIoU")]


# The tiny demo's 12 source images at batch 2: 6 iterations an epoch. Validation (and its last.ckpt) at 3, 6, 9;
# the periodic last.ckpt at 4 and 8. MinEnt reads target images: two training loaders (12 and 8 images), both
# with random scale/crop/flip; CPU, trainer.deterministic=true.
RESUME_RUN = ["trainer.max_steps=9", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
              "trainer.deterministic=true", "callbacks.periodic_checkpoint.every_n_train_steps=4", "data.batch_size=2",
              "data.num_workers=0", "data.source_size=[36,64]", "data.target_size=[32,64]", "data.eval_batch_size=4",
              "augmentation=geometric", "adaptation=minent"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_demo_dir, tmp_path_factory) -> Path:
    """The run every resumed one must reproduce, never interrupted: its run folder."""
    assert TINY_DEMO["source_count"] // 2 == 6
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = rtda_train([*RESUME_RUN, *tiny_overrides(tiny_demo_dir), "run_name=A"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "outputs" / "train" / "runs" / "A"


def _same_run(folder_a: Path, folder_b: Path) -> None:
    ra, rb = (json.loads((f / "results.json").read_text()) for f in (folder_a, folder_b))
    assert rb["status"] == ra["status"] == "completed"
    assert rb["test/mIoU"] == ra["test/mIoU"] and rb["best_val_mIoU"] == ra["best_val_mIoU"]
    assert rb["test"]["IoU"] == ra["test"]["IoU"]
    history_a, history_b = _history(folder_a), _history(folder_b)
    assert [h[0] for h in history_a if h[1]] == [str(i) for i in range(9)]  # one training row per iteration
    assert [h[0] for h in history_a if h[2]] == ["2", "5", "8"]
    assert history_b == history_a  # the same values, nothing lost or repeated


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, resumed_with", [
    pytest.param(4, [], id="periodic-checkpoint-mid-epoch"),  # saved in on_train_batch_end: 4 of 6 batches done
    pytest.param(3, [], id="validation-checkpoint-mid-epoch"),  # saved after the validation of iteration 3
    # the next epoch from its start, read by a worker process this time (data.num_workers changes nothing)
    pytest.param(6, ["data.num_workers=1"], id="validation-checkpoint-at-epoch-end"),
])
def test_a_run_killed_with_sigkill_resumes_bit_exact(kill_at, resumed_with, uninterrupted, tiny_demo_dir, tmp_path):
    """Run B killed with SIGKILL after the checkpoint of iteration ``kill_at`` (mid-epoch or at the epoch's
    end), then the same command again (ckpt_path=auto, same run_name): the uninterrupted run's losses at every
    iteration, its validation and test mIoU and per-class IoU, each iteration once in the CSV history. Both
    training loaders continue from the checkpoint's position in their epoch, with the same augmentation."""
    common = [*RESUME_RUN, *tiny_overrides(tiny_demo_dir), "run_name=B"]
    wandb = ["logger=many"] if kill_at == 4 else []  # the W&B run continues too (once: W&B's start is slow)
    killed = rtda_train([*common, *wandb, "+callbacks.kill._target_=kill_at.KillAt",
                         f"+callbacks.kill.iteration={kill_at}"], tmp_path, process=True)  # the process dies
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no cleanup ran
    folder_b = tmp_path / "outputs" / "train" / "runs" / "B"
    assert json.loads((folder_b / "results.json").read_text())["status"] == "running"  # what rtda-compare shows
    assert torch.load(folder_b / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == kill_at
    resumed = rtda_train([*common, *wandb, *resumed_with], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "Restoring states from the checkpoint" in output
    assert "dataloader is not resumable" not in output  # Lightning sees loaders that resume
    assert "sampling differs from the checkpoint's" not in output  # the same streams as before the kill
    if kill_at % 6:
        assert f"training loaders start at epoch 0, batch {kill_at} (6 batches an epoch)" in output
    else:
        assert "training loaders start at epoch 1, batch 0" in output
    _same_run(uninterrupted, folder_b)
    if wandb:  # both processes wrote to the run id of the folder
        ids = {p.name.rsplit("-", 2)[-2] + "-" + p.name.rsplit("-", 1)[-1] for p in (folder_b / "wandb").glob("offline-run-*")}
        assert len(list((folder_b / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1


@pytest.mark.slow
def test_two_runs_of_the_same_seed_with_augmentation_are_identical(uninterrupted, tiny_demo_dir, tmp_path):
    """The same command in another folder, its samples read by a DataLoader worker process this time: the same
    losses at every iteration and the same metrics (augmentation draws from generators seeded per sample, not
    from the OS entropy albumentations seeds itself with)."""
    proc = rtda_train([*RESUME_RUN, *tiny_overrides(tiny_demo_dir), "run_name=twin", "data.num_workers=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_run(uninterrupted, tmp_path / "outputs" / "train" / "runs" / "twin")
