"""rtda-eval on the checkpoint of a short run: the same protocol gives the same numbers."""

import json
import re
from pathlib import Path

import pytest
from helpers import rtda_eval, run_in_process

from rtda.cli.evaluate import main as eval_main


def _results(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))
    return folder, json.loads((folder / "results.json").read_text())


def test_eval_reproduces_the_runs_test_miou_exactly(trained_run):
    proc = rtda_eval([f"ckpt_path={trained_run['checkpoint']}", "save_predictions=2"], cwd=trained_run["cwd"])
    folder, results = _results(proc)
    assert results["test/mIoU"] == trained_run["test/mIoU"]
    assert results["test"]["IoU"] == trained_run["test"]["IoU"]
    assert re.search(r"target test mIoU: [\d.]+", proc.stdout)
    assert (folder / "confusion_matrix.png").is_file()
    preds = sorted(p.name for p in (folder / "predictions").iterdir())
    assert len(preds) == 4 and preds[0].endswith("_overlay.png") and "leftImg8bit" not in preds[0]


def test_ensemble_of_one_model_twice_is_that_model(trained_run):
    ckpt = trained_run["checkpoint"]
    _, results = _results(rtda_eval([f"ckpt_path=[{ckpt},{ckpt}]", "plot_confusion_matrix=false"], cwd=trained_run["cwd"]))
    assert results["test/mIoU"] == pytest.approx(trained_run["test/mIoU"], abs=1e-12)
    assert results["test/confmat"] == trained_run["test/confmat"]


def test_eval_overrides_change_the_split_and_resolution(trained_run):
    args = [f"ckpt_path={trained_run['checkpoint']}", "split=val", "data.eval_size=[64,128]"]
    _, results = _results(rtda_eval(args, cwd=trained_run["cwd"]))
    assert results["experiment"].startswith("eval split=val")
    # the labels are the same full-resolution ones; predicted at another resolution, the predictions differ
    assert sum(map(sum, results["test/confmat"])) == sum(map(sum, trained_run["test/confmat"]))
    assert results["test/confmat"] != trained_run["test/confmat"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_in_process(eval_main, [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path)
    assert proc.returncode == 1 and f"no such checkpoint file: {tmp_path / 'nope.ckpt'}" in proc.stderr
