"""Fail loudly, lose nothing: every bad input is one ``rtda: error:`` line and a non-zero exit, a failed or
diverged run says so in its results.json, and nothing written before a failure is lost.

One test per row of README.md's "When something goes wrong" table.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, rtda_train, run_in_process, tiny_overrides
from PIL import Image

from rtda.cli.bench import main as bench_main
from rtda.cli.evaluate import main as eval_main
from rtda.cli.train import main as train_main

QUICK = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "data.batch_size=2",
         "data.num_workers=0"]


MAINS = {"rtda-train": train_main, "rtda-eval": eval_main, "rtda-bench": bench_main}


def run(command, args, cwd, env=None):
    """``COMMAND ARGS`` in ``cwd``: its ``main`` in this process."""
    return run_in_process(MAINS[command], args, cwd, env)


def assert_one_line_error(proc, *fragments):
    """Exit 1, exactly one ``rtda: error:`` line holding every fragment, and no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtda: error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def only_run_folder(cwd: Path) -> Path:
    folders = [p for p in (cwd / "outputs" / "train" / "runs").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def copy_of_tiny_demo(tiny_demo_dir: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_demo_dir / "demo", data / "demo")
    return data


def truncate_keeping_the_header(path: Path) -> None:
    """A PNG whose header (size, mode) reads fine but whose pixels do not: what an interrupted copy leaves."""
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    with Image.open(path) as im:  # the header check still accepts it ...
        assert im.size[0] > 0
    with pytest.raises(OSError), Image.open(path) as im:  # ... but it does not decode
        im.load()


# -- distributed run ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_ddp_command_trains_validates_tests_and_keeps_the_whole_history(tiny_demo_dir, tmp_path):
    proc = rtda_train(["trainer=ddp_cpu", *QUICK, *tiny_overrides(tiny_demo_dir)], tmp_path, process=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = only_run_folder(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and 0.0 <= results["test/mIoU"] <= 1.0
    rows = (folder / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"train/loss", "val/mIoU", "val/IoU/road", "test/mIoU", "test/IoU/road"} <= set(header)
    val_rows = [r for r in rows[1:] if r.split(",")[header.index("val/mIoU")]]
    assert len(val_rows) == 2  # validations at iterations 2 and 4, none lost to the test stage
    assert (folder / "train_rank1.log").is_file()  # rank 1 ran as this job, in this job's folder


# -- divergence ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_divergence_stops_the_run_marks_it_failed_and_keeps_no_diverged_checkpoint(tiny_demo_dir, tmp_path):
    proc = rtda_train(["optimizer.lr=1e6", *QUICK, *tiny_overrides(tiny_demo_dir)], tmp_path)
    line = assert_one_line_error(proc, "training diverged at iteration", "loss = nan")
    assert "target test mIoU" not in proc.stdout
    folder = only_run_folder(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "failed" and results["error_type"] == "TrainingDiverged"
    assert results["error"] in line and "test/mIoU" not in results
    for ckpt in folder.rglob("*.ckpt"):  # whatever was saved before the divergence is finite
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), ckpt


def test_non_finite_weights_are_never_saved():
    from rtda.adaptation.segmentation import SegmentationModule
    from rtda.models.bisenet import BiSeNet
    from rtda.run.errors import TrainingDiverged

    module = SegmentationModule(BiSeNet(num_classes=19), optimizer=None)
    module.on_save_checkpoint({})  # finite: saved
    with torch.no_grad():
        module.net.classifier.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"1 weights are not finite \(e.g. net.classifier.weight\)"):
        module.on_save_checkpoint({})
    with torch.no_grad():  # a NaN BatchNorm statistic (a buffer, not a parameter) as well
        module.net.classifier.weight[0, 0, 0, 0] = 0.0
        bn = next(m for m in module.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var[-1] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"1 weights are not finite \(e.g. net\..*running_var\)"):
        module.on_save_checkpoint({})


@pytest.mark.slow
def test_sweep_records_the_failed_job_and_runs_the_others(tiny_demo_dir, tmp_path):
    proc = rtda_train(["-m", "optimizer.lr=1e6,0.01", *QUICK, *tiny_overrides(tiny_demo_dir)], tmp_path)
    assert_one_line_error(proc, "training diverged")
    sweep = next((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_optimizer.lr-1000000.0", "1_optimizer.lr-0.01"], jobs  # one readable folder per job
    first = json.loads((sweep / jobs[0] / "results.json").read_text())
    second = json.loads((sweep / jobs[1] / "results.json").read_text())
    assert first["status"] == "failed" and "optimizer.lr=1000000.0" in " ".join(first["overrides"])
    assert second["status"] == "completed" and 0.0 <= second["test/mIoU"] <= 1.0


# -- config values ------------------------------------------------------------------------------------------


def test_a_value_of_the_wrong_type_names_the_key_before_anything_runs(tiny_demo_dir, tmp_path):
    proc = run("rtda-train", ["trainer.max_steps=abc", *tiny_overrides(tiny_demo_dir)], tmp_path)
    assert_one_line_error(proc, "trainer.max_steps='abc'", "expected a positive number of training iterations")
    results = json.loads((only_run_folder(tmp_path) / "results.json").read_text())
    assert results["status"] == "failed" and results["error_type"] == "ConfigValueError"


@pytest.mark.parametrize("override, fragment", [
    ("data.batch_size=0", "data.batch_size=0: expected a positive integer"),
    ("data.num_workers=two", "data.num_workers='two'"),
    ("optimizer.lr=-1", "optimizer.lr=-1: expected a positive number"),
    ("data.source_size=[144]", "data.source_size=[144]: expected [height, width]"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0"),
    ("test_ckpt=first", "test_ckpt='first': expected 'last' or 'best'"),
    ("seed=1.5", "seed=1.5: expected an integer or null"),
])
def test_config_values_are_checked_with_the_key_named(override, fragment):
    from hydra import compose, initialize_config_dir

    from rtda.run.config import CONFIG_DIR, check_values
    from rtda.run.errors import ConfigValueError

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        good = compose("train", overrides=["paths.output_dir=x"])
        check_values(good)  # the defaults pass
        bad = compose("train", overrides=["paths.output_dir=x", override])
    with pytest.raises(ConfigValueError) as err:
        check_values(bad)
    assert fragment in str(err.value)


def test_an_unknown_option_is_one_line_listing_the_choices(tmp_path):
    proc = run("rtda-train", ["model=bisenet_r1000"], tmp_path)
    assert_one_line_error(proc, "model/bisenet_r1000", "bisenet_r18", "deeplabv2_r101")


# -- checkpoints --------------------------------------------------------------------------------------------


def test_eval_of_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("every run of the sweep\n")
    proc = run("rtda-eval", [f"ckpt_path={tmp_path / 'notes.txt'}"], tmp_path)
    assert_one_line_error(proc, f"{tmp_path / 'notes.txt'} is not a PyTorch checkpoint")
    Image.new("RGB", (4, 4)).save(tmp_path / "image.png")
    proc = run("rtda-eval", [f"ckpt_path={tmp_path / 'image.png'}"], tmp_path)
    assert_one_line_error(proc, "image.png is not a PyTorch checkpoint")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_eval_refuses_an_unsafe_checkpoint_without_suggesting_to_load_it(tmp_path):
    torch.save({"state_dict": {}, "rtda": {"config": {}}, "payload": _Payload()}, tmp_path / "evil.ckpt")
    proc = run("rtda-eval", [f"ckpt_path={tmp_path / 'evil.ckpt'}"], tmp_path)
    assert_one_line_error(proc, "evil.ckpt was refused as unsafe", "system")
    assert "weights_only=False" not in proc.stderr + proc.stdout and "owned" not in proc.stdout


def test_eval_of_a_truncated_checkpoint(trained_run, tmp_path):
    cut = tmp_path / "cut.ckpt"
    whole = Path(trained_run["checkpoint"]).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    proc = run("rtda-eval", [f"ckpt_path={cut}"], tmp_path)
    assert_one_line_error(proc, str(cut))


def test_eval_of_a_checkpoint_with_another_class_count(trained_run, tmp_path):
    proc = run("rtda-eval", [f"ckpt_path={trained_run['checkpoint']}", "data.num_classes=16"], trained_run["cwd"])
    assert_one_line_error(proc, "BiSeNet with 19 classes", "data.num_classes=16")


def test_resume_from_a_checkpoint_of_another_network_stops_before_training(trained_run, tmp_path):
    from rtda.adaptation.segmentation import SegmentationModule
    from rtda.models.bisenet import BiSeNet
    from rtda.run.checkpoints import check_checkpoint_fits
    from rtda.run.errors import CheckpointError

    check_checkpoint_fits(trained_run["checkpoint"], SegmentationModule(BiSeNet(num_classes=19)))  # fits
    with pytest.raises(CheckpointError, match=r"does not fit this run \(it holds BiSeNet with 19 classes.*\): net\..* is "
                                              r"\(19, .*\) in the checkpoint, \(7, .*\) here"):
        check_checkpoint_fits(trained_run["checkpoint"], SegmentationModule(BiSeNet(num_classes=7), num_classes=7,
                                                                            class_names=list("abcdefg")))
    proc = run("rtda-train", [*trained_run["args"], f"ckpt_path={trained_run['checkpoint']}", "model.backbone=resnet101"],
               trained_run["cwd"])
    assert_one_line_error(proc, "does not fit this run", "weights missing")
    assert "Epoch" not in proc.stdout


# -- destinations -------------------------------------------------------------------------------------------


def test_an_unwritable_checkpoint_folder_stops_the_run_before_training(tiny_demo_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    target = tmp_path / "a_file" / "checkpoints"
    proc = run("rtda-train", [f"callbacks.model_checkpoint.dirpath={target}", *QUICK, *tiny_overrides(tiny_demo_dir)],
                   tmp_path)
    assert_one_line_error(proc, f"cannot write checkpoints to {target}", "Not a directory")
    assert "Epoch" not in proc.stdout


@pytest.mark.parametrize("command", ["rtda-train", "rtda-bench"])
def test_an_unwritable_run_folder_is_one_line(command, tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = run(command, [f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"], tmp_path)
    assert_one_line_error(proc, f"cannot write the run folder to {tmp_path / 'a_file' / 'run'}")


def test_full_traceback_only_when_asked(tmp_path):
    proc = run("rtda-eval", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path, env={**ENV, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "nope.ckpt" in proc.stderr


# -- data written by rtda -----------------------------------------------------------------------------------


def test_concurrent_demo_generation_builds_once_and_both_runs_use_it(tmp_path):
    root = tmp_path / "demo"
    counts = ["--source-count", "6", "--target-train-count", "4", "--target-val-count", "2"]
    command = [sys.executable, "-m", "rtda.data.demo", "--root", str(root), *counts]
    procs = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("wrote the demo domain pair" in out for out, _ in outs) == 1  # one built it, the other reused it
    assert len(list((root / "gta5" / "images").glob("*.png"))) == 6
    assert len(list((root / "cityscapes" / "leftImg8bit" / "val").glob("*/*.png"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "demo.lock"]  # no temporary folder left


def test_a_half_written_folder_is_never_taken_as_complete(tmp_path):
    from rtda.run.files import build_once

    root = tmp_path / "pseudo"

    def crash(tmp):
        (tmp / "a.png").write_text("half")
        raise KeyboardInterrupt  # the process is stopped mid-build

    with pytest.raises(KeyboardInterrupt):
        build_once(root, lambda p: (p / "done").is_file(), crash)
    assert not root.exists() and not list(tmp_path.glob("pseudo.tmp-*"))
    (tmp_path / "pseudo.tmp-123").mkdir()  # left by a builder that was killed -9
    assert build_once(root, lambda p: (p / "done").is_file(), lambda tmp: (tmp / "done").write_text("ok"))
    assert (root / "done").is_file() and not (tmp_path / "pseudo.tmp-123").exists()
    assert not build_once(root, lambda p: (p / "done").is_file(), crash)  # complete: reused, not rebuilt


def test_a_half_generated_demo_is_regenerated(tmp_path):
    from rtda.data.demo import ensure_demo

    root = tmp_path / "demo"
    (root / "gta5" / "images").mkdir(parents=True)  # no demo.json stamp: incomplete
    (root / "gta5" / "images" / "00001.png").write_bytes(b"half")
    ensure_demo(root, seed=0, source_count=3, target_train_count=2, target_val_count=1)
    assert json.loads((root / "demo.json").read_text())["source_count"] == 3
    with Image.open(root / "gta5" / "images" / "00001.png") as im:  # a real image now
        im.load()
    assert len(list((root / "gta5" / "images").glob("*.png"))) == 3


# -- files that fail to decode ------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_files_that_fail_to_decode_are_counted_warned_once_and_listed(tiny_demo_dir, tmp_path):
    data = copy_of_tiny_demo(tiny_demo_dir, tmp_path)
    broken = data / "demo" / "gta5" / "images" / "00003.png"
    truncate_keeping_the_header(broken)
    overrides = [o.replace(str(tiny_demo_dir), str(data)) for o in tiny_overrides(tiny_demo_dir)]
    # two epochs of the 12 source images (6 iterations each), read by a DataLoader worker process
    args = ["trainer.max_steps=12", "trainer.val_check_interval=6", "data.batch_size=2", "data.num_workers=1", *overrides]
    proc = run("rtda-train", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((only_run_folder(tmp_path) / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["decode_failures"] == {str(broken): 2}  # once per epoch
    assert "1 training files failed to decode" in proc.stdout and str(broken) in proc.stdout
    log = (only_run_folder(tmp_path) / "train.log").read_text()
    assert log.count(f"failed to decode and is replaced by the next sample (counted in results.json): {broken}") == 1


def test_an_evaluation_file_that_fails_to_decode_stops_the_run_naming_it(tiny_demo_dir, tmp_path):
    data = copy_of_tiny_demo(tiny_demo_dir, tmp_path)
    broken = sorted((data / "demo" / "cityscapes" / "leftImg8bit" / "val").glob("*/*.png"))[0]
    truncate_keeping_the_header(broken)
    overrides = [o.replace(str(tiny_demo_dir), str(data)) for o in tiny_overrides(tiny_demo_dir)]
    proc = run("rtda-train", ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=2",
                              "data.num_workers=1", *overrides], tmp_path)
    assert_one_line_error(proc, f"cannot decode image {broken}")
    results = json.loads((only_run_folder(tmp_path) / "results.json").read_text())
    assert results["status"] == "failed" and str(broken) in results["error"]


def test_a_label_of_the_wrong_encoding_is_named(tmp_path):
    from rtda.data.cityscapes import Cityscapes
    from rtda.run.errors import DecodeError

    city = tmp_path / "leftImg8bit" / "val" / "lindau"
    gt = tmp_path / "gtFine" / "val" / "lindau"
    city.mkdir(parents=True)
    gt.mkdir(parents=True)
    Image.new("RGB", (8, 4)).save(city / "lindau_000000_000019_leftImg8bit.png")
    bad = gt / "lindau_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((4, 8), 26, np.uint8)).save(bad)  # a label id (car), not a train id
    with pytest.raises(DecodeError, match=rf"cannot decode label {bad}: holds values other than train ids"):
        Cityscapes(tmp_path, "val").load(0)
    bad.unlink()
    colour = gt / "lindau_000000_000019_gtFine_labelIds.png"
    Image.new("RGB", (8, 4), (0, 0, 142)).save(colour)  # the colour image saved under the labelIds name
    with pytest.raises(DecodeError, match=rf"cannot decode label {colour}: a labelIds PNG is single-channel"):
        Cityscapes(tmp_path, "val").load(0)

