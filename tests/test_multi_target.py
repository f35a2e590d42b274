"""Per-group test scores (ACDC's conditions) and one checkpoint scored on several targets in one rtda-eval command,
on tiny trees written here in the real formats."""

import functools
import json
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import rtda_eval
from PIL import Image
from torch import nn

from rtda.adaptation.segmentation import SegmentationModule
from rtda.analysis.compare import group_names, load_runs, summarize, to_text, write_csv
from rtda.data.acdc import ACDC
from rtda.data.datamodule import DomainAdaptationDataModule
from rtda.pipelines.evaluate import replay_overrides
from rtda.run.results import format_summary

H, W = 6, 10


def _acdc_frame(root, condition, seq, frame, image, train_ids, split="val"):
    stem = f"{seq}_frame_{frame:06d}"
    folder = root / "rgb_anon" / condition / split / seq
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{stem}_rgb_anon.png")
    gt = root / "gt" / condition / split / seq
    gt.mkdir(parents=True, exist_ok=True)
    Image.fromarray(train_ids.astype(np.uint8)).save(gt / f"{stem}_gt_labelTrainIds.png")


class _ByBrightness(nn.Module):
    """A "network" predicting class 2 everywhere on a bright image and class 0 on a dark one."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def predict(self, image, size):
        bright = image.float().mean(dim=(1, 2, 3)) > 0  # normalised: black < 0 < white
        pred = torch.where(bright, 2, 0)[:, None, None].expand(-1, *size)
        return nn.functional.one_hot(pred, 19).permute(0, 3, 1, 2).float()


def test_acdc_conditions_are_scored_one_confusion_matrix_each(tmp_path):
    # fog: a dark image, left half road (0), right half sidewalk (1); predicted all road
    fog = np.zeros((H, W), np.uint8)
    fog[:, W // 2:] = 1
    _acdc_frame(tmp_path, "fog", "GOPR0475", 0, np.zeros((H, W, 3), np.uint8), fog)
    # night: a bright image, all building (2); predicted all building
    _acdc_frame(tmp_path, "night", "GOPR0351", 0, np.full((H, W, 3), 255, np.uint8), np.full((H, W), 2))
    val = functools.partial(ACDC, tmp_path, "val", conditions=["fog", "night"])
    datamodule = DomainAdaptationDataModule(source=None, val=val, eval_size=[H, W], eval_batch_size=2, num_workers=0)
    assert val()[0]["group"] == "fog" and val().group_by == "condition"
    module = SegmentationModule(_ByBrightness(), num_log_images=0, channels_last=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(module, datamodule=datamodule, verbose=False)  # one batch holding both conditions
    test = module.run_results(trainer)["test"]
    # by hand: fog IoU road 30/60, sidewalk 0/30 -> 0.25; night IoU building 1 -> 1.0;
    # overall road 0.5, sidewalk 0, building 1 -> 0.5
    assert test["mIoU"] == pytest.approx(0.5)
    assert test["group_by"] == "condition" and list(test["groups"]) == ["fog", "night"]
    assert test["groups"]["fog"]["mIoU"] == pytest.approx(0.25)
    assert test["groups"]["fog"]["IoU"]["road"] == pytest.approx(0.5) and test["groups"]["fog"]["IoU"]["sidewalk"] == 0
    assert test["groups"]["fog"]["IoU"]["building"] is None and test["groups"]["fog"]["pixels"] == H * W
    assert test["groups"]["night"]["mIoU"] == pytest.approx(1.0) and test["groups"]["night"]["acc"] == 1.0
    assert float(trainer.callback_metrics["test/fog/mIoU"]) == pytest.approx(0.25)
    summary = format_summary({"experiment": "x", "test": test, "run_dir": "r"})
    assert "per-condition mIoU: fog 25.00   night 100.00" in summary
    # one condition: no groups
    trainer.test(module, datamodule=DomainAdaptationDataModule(
        source=None, val=functools.partial(ACDC, tmp_path, "val", conditions=["night"]), eval_size=[H, W],
        num_workers=0), verbose=False)
    assert "groups" not in module.run_results(trainer)["test"]


# ---------------------------------------------------------------------------------------------------------------
# rtda-eval on several targets (the checkpoint of the session's short run)
# ---------------------------------------------------------------------------------------------------------------

def _trees(data):
    rng = np.random.default_rng(3)
    for c, condition in enumerate(("fog", "night", "rain", "snow")):
        _acdc_frame(data / "acdc", condition, f"GOPR04{c}0", 0, rng.integers(0, 255, (H, W, 3), dtype=np.uint8),
                    rng.integers(0, 19, (H, W)))
    for i in range(2):
        name = f"7d06fefd-f7be05a{i}"
        (data / "bdd100k" / "images" / "10k" / "val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            data / "bdd100k" / "images" / "10k" / "val" / f"{name}.jpg", quality=95)
        out = data / "bdd100k" / "labels" / "sem_seg" / "masks" / "val"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.choice(list(range(19)) + [255], (H, W)).astype(np.uint8), mode="L").save(out / f"{name}.png")


def _eval(trained_run, tmp_path, name, *args):
    """rtda-eval of the session's checkpoint on the trees under tmp_path/data (one image a batch: the same
    predictions whichever images share a batch)."""
    data = tmp_path / "data"
    proc = rtda_eval([f"ckpt_path={trained_run['checkpoint']}", f"paths.data_dir={data}", "data.prepare=null",
                      "plot_confusion_matrix=false", "data.eval_batch_size=1", f"hydra.run.dir={tmp_path / name}", *args], cwd=trained_run["cwd"])
    return proc


def _results(proc, tmp_path, name):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / name / "results.json").read_text())


def test_one_checkpoint_on_several_targets_in_one_command(trained_run, tmp_path):
    _trees(tmp_path / "data")
    proc = _eval(trained_run, tmp_path, "both", "data.test=[acdc,bdd100k]")
    both = _results(proc, tmp_path, "both")
    assert [r["target"] for r in both["targets"]] == ["acdc", "bdd100k"] and "test" not in both
    acdc, bdd = both["targets"]
    assert acdc["images"] == 4 and bdd["images"] == 2
    assert both["test/mIoU"] == pytest.approx((acdc["mIoU"] + bdd["mIoU"]) / 2)
    assert list(acdc["groups"]) == ["fog", "night", "rain", "snow"] and "groups" not in bdd
    assert both["experiment"].startswith("eval split=test targets=acdc,bdd100k")
    # the printed table: one row per target (and per ACDC condition), the mean, per-class IoU per target
    assert re.search(rf"^  acdc +4 +{100 * acdc['mIoU']:.2f} ", proc.stdout, re.M), proc.stdout
    assert re.search(rf"^  bdd100k +2 +{100 * bdd['mIoU']:.2f} ", proc.stdout, re.M)
    assert re.search(rf"^    acdc/fog +{100 * acdc['groups']['fog']['mIoU']:.2f} ", proc.stdout, re.M)
    assert re.search(rf"^  mean +{100 * both['test/mIoU']:.2f}$", proc.stdout, re.M)
    assert re.search(r"^  class +acdc +bdd100k$", proc.stdout, re.M)

    # each row is what scoring that target alone gives (a name: the single-target layout, unchanged)
    alone = _results(_eval(trained_run, tmp_path, "bdd", "data.test=bdd100k"), tmp_path, "bdd")
    assert "targets" not in alone and alone["test/mIoU"] == bdd["mIoU"]
    assert alone["test"]["IoU"] == bdd["IoU"] and alone["test/confmat"] == bdd["confmat"]
    # ... and each ACDC condition is what scoring that condition alone gives
    proc = _eval(trained_run, tmp_path, "fog", "+data/test=acdc", "data.test.conditions=[fog]")
    fog = _results(proc, tmp_path, "fog")
    # (the overall mIoU is read back from Lightning's float32 log, a group's from the metric: equal to 1e-6)
    assert fog["test/mIoU"] == pytest.approx(acdc["groups"]["fog"]["mIoU"], abs=1e-6)
    assert fog["test"]["IoU"] == acdc["groups"]["fog"]["IoU"]
    assert "groups" not in fog["test"]
    assert "per-condition" not in proc.stdout


def test_acdc_results_json_and_summary_carry_each_condition(trained_run, tmp_path):
    _trees(tmp_path / "data")
    proc = _eval(trained_run, tmp_path, "acdc", "+data/test=acdc", "data.test.conditions=[fog,night]")
    results = _results(proc, tmp_path, "acdc")
    test = results["test"]
    assert list(test["groups"]) == ["fog", "night"] and test["group_by"] == "condition"
    assert test["groups"]["fog"]["mIoU"] != test["groups"]["night"]["mIoU"]
    assert test["groups"]["fog"]["pixels"] + test["groups"]["night"]["pixels"] == sum(map(sum, results["test/confmat"]))
    line = f"per-condition mIoU: fog {100 * test['groups']['fog']['mIoU']:.2f}   night {100 * test['groups']['night']['mIoU']:.2f}"
    assert line in proc.stdout


def test_a_named_test_set_replaces_the_runs_own(tmp_path):
    """A run trained with +data/test=acdc: data.test=[...] (or data/test=...) at evaluation replaces its test-set
    overrides (a list would not merge into the replayed ACDC node); other test-set keys are still replayed."""
    ckpt = tmp_path / "run.ckpt"
    saved = ["paths.data_dir=/d", "+data/test=acdc", "data.test.conditions=[fog]", "data.eval_size=[64,128]"]
    torch.save({"state_dict": {}, "rtda": {"config": {}, "overrides": saved}}, ckpt)
    assert replay_overrides([f"ckpt_path={ckpt}", "data.test=[cityscapes,bdd100k]"]) == [
        "paths.data_dir=/d", "data.eval_size=[64,128]", f"ckpt_path={ckpt}", "data.test=[cityscapes,bdd100k]"]
    assert replay_overrides([f"ckpt_path={ckpt}", "data/test=idd"])[:2] == ["paths.data_dir=/d", "data.eval_size=[64,128]"]
    assert replay_overrides([f"ckpt_path={ckpt}", "data.test.conditions=[night]"]) == [
        "paths.data_dir=/d", "+data/test=acdc", "data.eval_size=[64,128]", f"ckpt_path={ckpt}", "data.test.conditions=[night]"]


def test_an_unknown_target_is_one_line_naming_the_key_and_the_choices(tmp_path):
    proc = rtda_eval([f"ckpt_path={tmp_path / 'x.ckpt'}", "data.test=[cityscapes,nowhere]"], cwd=tmp_path)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtda: error:")]
    assert errors == ["rtda: error: data.test: unknown test set 'nowhere'; expected one of acdc, bdd100k, cityscapes, "
                      "dark_zurich, idd, mapillary (conf/data/test)"], proc.stderr


def test_rtda_compare_has_a_column_per_condition(tmp_path):
    for seed, (fog, night) in enumerate([(0.40, 0.20), (0.50, 0.30)]):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        test = {"mIoU": (fog + night) / 2, "acc": 0.9, "mAcc": 0.5, "IoU": {"road": 0.5}, "group_by": "condition",
                "groups": {"fog": {"mIoU": fog}, "night": {"mIoU": night}}}
        (run / "results.json").write_text(json.dumps({"status": "completed", "seed": seed, "choices": {},
                                                      "overrides": [], "test": test}))
    rows = summarize(load_runs([tmp_path]))
    assert len(rows) == 1 and group_names(rows) == ["fog", "night"]
    assert rows[0]["mIoU/fog"] == pytest.approx(45.0) and rows[0]["mIoU/night"] == pytest.approx(25.0)
    assert rows[0]["mIoU_std/fog"] == pytest.approx(100 * float(np.std([0.40, 0.50], ddof=1)))
    text = to_text(rows)
    assert "fog (%)" in text and "night (%)" in text and "45.00" in text
    write_csv(rows, tmp_path / "comparison.csv")
    assert "mIoU/fog,mIoU_std/fog,mIoU/night" in (tmp_path / "comparison.csv").read_text().splitlines()[0]
