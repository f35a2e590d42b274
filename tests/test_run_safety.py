"""Runs that lose nothing: one live run per folder, whole checkpoints on a full disk, a graceful stop on SIGTERM,
the run's log in train.log, readable results, and a sweep started again that finishes what is left."""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import ENV, rtda_train, tiny_overrides
from omegaconf import OmegaConf

from rtda.run.callbacks import ModelCheckpoint

TINY = ["trainer.log_every_n_steps=1", "data.batch_size=2", "data.num_workers=0", "data.source_size=[36,64]",
        "data.target_size=[32,64]"]


def _training_steps(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.slow
def test_sigterm_saves_the_iteration_and_the_same_command_resumes_it_with_the_log_kept(tiny_demo_dir, tmp_path):
    args = ["run_name=stop", "trainer.max_steps=40", "trainer.val_check_interval=10", "seed=0", *TINY,
            *tiny_overrides(tiny_demo_dir)]
    run = tmp_path / "outputs" / "train" / "runs" / "stop"
    proc = subprocess.Popen(["rtda-train", *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(run / "train.log", "iteration 10/40: val/mIoU", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("rtda: interrupted")]
    results = json.loads((run / "results.json").read_text())
    stopped_at = results["interrupted_at"]
    assert results["status"] == "interrupted" and results["requeued"] is False and stopped_at >= 10
    assert f"SIGTERM at iteration {stopped_at}" in line and "last.ckpt holds it" in line
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stopped_at
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))

    resumed = rtda_train(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["resumed_from"]["iteration"] == stopped_at
    assert _training_steps(run) == list(range(40))  # the stopped iteration's row kept, none twice
    log = (run / "train.log").read_text()
    for text in ("iteration 10/40: val/mIoU", "run interrupted: SIGTERM", f"resumed from iteration {stopped_at} of 40",
                 "iteration 40/40: val/mIoU", "target test mIoU", "run folder:"):
        assert text in log, text
    assert oct((run / "results.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # collaborators can read it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_folder_is_refused_before_writing_anything(tiny_demo_dir, tmp_path):
    args = ["run_name=twin", "trainer.max_steps=20", "trainer.val_check_interval=10", *TINY,
            *tiny_overrides(tiny_demo_dir)]
    run = tmp_path / "outputs" / "train" / "runs" / "twin"
    first = subprocess.Popen(["rtda-train", *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "results.json", '"running"', first)
        config_before = (run / ".hydra" / "config.yaml").read_text()
        second = rtda_train([*args, "optimizer.lr=0.5"], tmp_path)
        assert second.returncode == 1, second.stderr[-3000:]
        (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("rtda: error")]
        assert f"the run folder {run.resolve()} is in use by rtda process {first.pid}" in line
        assert "Traceback" not in second.stderr
        assert (run / ".hydra" / "config.yaml").read_text() == config_before  # the live run's record untouched
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert _training_steps(run) == list(range(20))  # the first run's history alone


def test_a_checkpoint_that_cannot_be_written_leaves_no_partial_file_and_says_where(tmp_path, monkeypatch):
    from rtda.run.checkpoints import AtomicCheckpointIO
    from rtda.run.errors import DiskFull

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"the previous whole checkpoint")

    def save_half_then_fail(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(DiskFull, match=f"no space left on the device of {folder}"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no temporary file left behind
    assert (folder / "last.ckpt").read_bytes() == b"the previous whole checkpoint"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_line_naming_the_folder(tiny_demo_dir, tmp_path):
    disk = tmp_path / "small_disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:  # BiSeNet-R18's checkpoint (weights + SGD state) is ~97 MB: it cannot fit
        proc = rtda_train([f"hydra.run.dir={disk}/run", "trainer.max_steps=2", "trainer.val_check_interval=2", *TINY,
                           *tiny_overrides(tiny_demo_dir)], tmp_path, process=True)  # its files closed at exit: unmountable
        assert proc.returncode == 1, proc.stderr[-3000:]
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtda: error")]
        assert f"no space left on the device of {disk}/run/checkpoints" in line, line
        assert "Traceback" not in proc.stderr
        assert not [p.name for p in (disk / "run" / "checkpoints").iterdir()]  # nothing partial
        assert json.loads((disk / "run" / "results.json").read_text())["status"] == "failed"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_sweep_started_again_skips_completed_jobs_runs_new_ones_and_refuses_another_config(tiny_demo_dir, tmp_path):
    sweep = tmp_path / "sweep"
    common = [f"hydra.sweep.dir={sweep}", "trainer.max_steps=2", "trainer.val_check_interval=2", *TINY,
              *tiny_overrides(tiny_demo_dir)]
    first = rtda_train(["-m", "seed=0,1", *common], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    done = {name: (sweep / name / "results.json").read_text() for name in ("0_seed-0", "1_seed-1")}

    again = rtda_train(["-m", "seed=0,1,2", *common], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rtda: job 0_seed-0: completed, skipped" in again.stdout
    assert "rtda: job 1_seed-1: completed, skipped" in again.stdout
    assert {name: (sweep / name / "results.json").read_text() for name in done} == done  # untouched
    assert json.loads((sweep / "2_seed-2" / "results.json").read_text())["status"] == "completed"
    assert "skipped" not in again.stdout.split("2_seed-2")[-1]

    other = rtda_train(["-m", "seed=0,1", "optimizer.lr=0.5", *common], tmp_path)
    assert other.returncode == 1
    assert "sweep job 0_seed-0" in other.stderr and "optimizer.lr: 0.025 -> 0.5" in other.stderr
    assert {name: (sweep / name / "results.json").read_text() for name in done} == done


def test_a_sweep_folder_is_fixed_at_submission_for_every_job(tmp_path, monkeypatch):
    """What a SLURM job recomposes: the sweep's Hydra overrides carry the folder resolved on the login node, so a
    job's own time stamp or SLURM job id cannot move it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from rtda.run.config import CONFIG_DIR
    from rtda.run.files import pin_sweep_folder

    GlobalHydra.instance().clear()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["seed=0"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        folder = pin_sweep_folder(cfg)
        assert folder.is_absolute() and "multiruns" in str(folder)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # inside the job: the run-name resolver would say slurm-4242
        job = compose("train", overrides=[*OmegaConf.to_container(cfg.hydra.overrides.hydra), "seed=0"],
                      return_hydra_config=True)
    assert job.hydra.sweep.dir == str(folder)


class _SignalsItself(torch.utils.data.Dataset):
    """Each sample sends SLURM's requeue signal to the process reading it: a DataLoader worker."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGUSR1)
        return torch.tensor([index])


def test_loader_workers_leave_the_jobs_signals_to_the_training_process():
    """SLURM signals every process of a job step: a worker that kept SIGUSR1's default action would die and fail the
    run (rtda's training process saves, requeues and stops the workers itself)."""
    from torch.utils.data import DataLoader

    from rtda.data.samplers import init_worker

    loader = DataLoader(_SignalsItself(), batch_size=2, num_workers=1, worker_init_fn=init_worker)
    assert [b.flatten().tolist() for b in loader] == [[0, 1], [2, 3]]
    with pytest.raises(RuntimeError, match="(?i)worker"):  # the control: without it the worker is killed
        list(DataLoader(_SignalsItself(), batch_size=2, num_workers=1))


class _Worsening(pl.LightningModule):
    """One weight; a validation score that falls at every validation (never a new best after the first)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum() + 0 * batch.sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/mIoU", 1.0 / (1 + self.validations))

    def on_validation_epoch_end(self):
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_ckpt_is_written_at_every_validation_even_without_a_new_best(tmp_path):
    """rtda's validation checkpoint writes last.ckpt whether or not the score improved (Lightning 2.6.6's own
    writes it only beside a new top-k file: last.ckpt stayed at iteration 2 here), so a run killed after the
    validation of iteration 6 resumes from 6, and a finished run's last.ckpt is its final weights."""
    data = torch.utils.data.DataLoader(torch.randn(8, 1), batch_size=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/mIoU", mode="max", save_last=True,
                           save_top_k=1, enable_version_counter=False)
    trainer = pl.Trainer(max_steps=6, val_check_interval=2, limit_val_batches=1, callbacks=[ckpt], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accelerator="cpu")
    trainer.fit(_Worsening(), data, data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6  # 4 and 6 did not improve on 2
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["global_step"] == 2
