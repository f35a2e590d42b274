"""rtda-train through its console script, as a user runs it."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, rtda_train, run_folder, run_in_process, tiny_overrides

from rtda.cli.train import main as train_main


def test_fast_dev_run_writes_a_summary_and_results(tiny_demo_dir, tmp_path):
    proc = rtda_train(["debug=fdr", *tiny_overrides(tiny_demo_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target test mIoU:" in proc.stdout and "per-class IoU:" in proc.stdout
    results = json.loads((run_folder(proc.stdout) / "results.json").read_text())
    assert 0.0 <= results["test/mIoU"] <= 1.0
    assert set(results["test"]["IoU"]) == {"road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                                            "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                                            "truck", "bus", "train", "motorcycle", "bicycle"}
    assert results["choices"]["model"] == "bisenet_r18"


def test_short_run_saves_resumable_checkpoints_with_config(trained_run):
    folder = trained_run["folder"]
    last = Path(trained_run["checkpoint"])
    assert last.name == "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # no pickled objects inside
    assert ckpt["global_step"] == 6
    assert ckpt["rtda"]["config"]["model"]["_target_"] == "rtda.models.bisenet.BiSeNet"
    assert "augmentation=geometric" in ckpt["rtda"]["overrides"] and ckpt["rtda"]["choices"]["data"] == "demo"
    metrics = (folder / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/loss_seg", "train/loss_aux/context16", "val/mIoU", "val/IoU/road", "test/mIoU"} <= set(metrics)
    assert list((folder / "predictions").glob("val_step*.png"))
    assert (folder / ".hydra" / "config.yaml").is_file()


def test_the_console_counts_iterations_and_shows_no_lightning_noise(trained_run):
    """What a new user sees: the bar at iteration N of max_steps, the parameters, no FLOPs read as 0, no
    epochs out of -2, none of Lightning's lines that say nothing about the run."""
    out = trained_run["stdout"] + trained_run["stderr"]
    assert re.search(r"^iteration +\S+ 6/6 ", out, re.M), out[-2000:]
    assert "iteration 3/6: val/mIoU" in out and "parameters: 12.1 M trainable" in out
    for noise in ("Epoch ", "/-2", "Total FLOPs", "litlogger", "`srun` command", "LeafSpec", "on_after_batch_transfer",
                  "weights_only` was not set", "Test metric", "TPU available"):
        assert noise not in out, noise


def test_resume_continues_from_last_checkpoint(trained_run, tmp_path):
    import shutil

    folder = tmp_path / "resumed"
    shutil.copytree(trained_run["folder"], folder)
    args = [*trained_run["args"], "trainer.max_steps=9", "ckpt_path=auto", f"hydra.run.dir={folder}"]
    proc = rtda_train(args, cwd=trained_run["cwd"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Restoring states from the checkpoint" in proc.stdout + proc.stderr
    assert torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 9
    import csv

    with open(folder / "csv" / "metrics.csv", newline="") as f:  # the history before the resume is kept
        rows = list(csv.DictReader(f))
    val_steps = sorted(int(r["step"]) for r in rows if r.get("val/mIoU"))
    assert len(val_steps) == 3 and val_steps[:2] == [2, 5], val_steps  # the first run's (iterations 3, 6) + the resumed
    assert any(r.get("test/mIoU") for r in rows)


def test_missing_dataset_root_names_the_path(tmp_path):
    proc = run_in_process(train_main, ["debug=fdr", "data.prepare=null", f"paths.data_dir={tmp_path / 'nowhere'}"], tmp_path)
    assert proc.returncode == 1
    assert f"{tmp_path / 'nowhere'}/demo/gta5/images" in proc.stderr and "Expected this layout" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_readme_gives_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[dev]" && rtda-train' in readme
    assert re.search(r"^pytest\b", readme, re.M)
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in ci and "pytest" in ci


@pytest.mark.slow
def test_wandb_without_login_runs_offline_and_never_prompts(tiny_demo_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HOME": str(tmp_path), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_SILENT": "true"})  # no ~/.netrc, no key
    args = ["logger=many", "trainer.max_steps=1", "trainer.val_check_interval=1", "data.batch_size=2",
            "data.num_workers=0", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", *tiny_overrides(tiny_demo_dir)]
    proc = subprocess.run(["rtda-train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B is offline (not logged in)" in proc.stdout
    folder = run_folder(proc.stdout)
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert runs, list(folder.iterdir())
    assert (folder / "csv" / "metrics.csv").is_file()
