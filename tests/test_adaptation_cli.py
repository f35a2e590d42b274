"""Adaptation methods through the console scripts, as a user runs them (tiny demo, a few iterations)."""

import json
import math

import pytest
import torch
from helpers import rtda_eval, rtda_train, run_folder, tiny_overrides

TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.batch_size=2", "data.num_workers=0",
        "data.source_size=[72,128]", "data.target_size=[64,128]", "trainer.log_every_n_steps=1"]


def test_adversarial_run_end_to_end_and_eval_scores_its_checkpoint(tiny_demo_dir, tmp_path):
    proc = rtda_train(["adaptation=adversarial", "model.adaptation_levels=[context16]", *TINY,
                       *tiny_overrides(tiny_demo_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_folder(proc.stdout)
    results = json.loads((folder / "results.json").read_text())
    assert math.isfinite(results["test/mIoU"]) and 0.0 <= results["test/mIoU"] <= 1.0
    assert results["choices"]["adaptation"] == "adversarial"
    names = sorted(p.name for p in (folder / "checkpoints").glob("step*.ckpt"))
    assert names and all(n.startswith(("step000002", "step000004")) for n in names)  # iterations, not optimizer steps
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["rtda"]["choices"]["adaptation"] == "adversarial"
    assert {"discriminators.out.layers.0.weight", "discriminators.context16.layers.0.weight"} <= set(ckpt["state_dict"])
    assert all(s["_step_count"] == 5 for s in ckpt["lr_schedulers"]) and len(ckpt["lr_schedulers"]) == 3
    header = (folder / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_seg", "train/loss_adv/out", "train/loss_adv/context16", "train/loss_d/out", "val/mIoU"} <= set(header)

    ev = rtda_eval([f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}", "plot_confusion_matrix=false"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    scored = json.loads((run_folder(ev.stdout) / "results.json").read_text())
    assert scored["test/mIoU"] == pytest.approx(results["test/mIoU"], abs=1e-9)


@pytest.mark.slow
def test_adversarial_ddp_on_cpu_two_processes(tiny_demo_dir, tmp_path):
    args = ["trainer=ddp_cpu", "trainer.strategy=ddp", "adaptation=adversarial", "callbacks=none", *TINY,
            *tiny_overrides(tiny_demo_dir)]
    proc = rtda_train(args, cwd=tmp_path, process=True)  # rank 1 re-runs the command
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_folder(proc.stdout) / "results.json").read_text())
    assert math.isfinite(results["test/mIoU"]) and 0.0 <= results["test/mIoU"] <= 1.0
