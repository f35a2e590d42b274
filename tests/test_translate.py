"""rtda-translate (FDA and CycleGAN) on the tiny demo: a GTA5 tree the reader reads, labels byte-identical,
resumable; and the two-stage CycleGAN pipeline through the console scripts (slow)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rtda_eval, rtda_train, run_folder, run_in_process, tiny_overrides
from PIL import Image

from rtda.cli.translate import main as translate_main
from rtda.data.gta5 import GTA5


def rtda_translate(args, cwd):
    """``rtda-translate ARGS`` run in ``cwd`` (its ``main``, in this process)."""
    return run_in_process(translate_main, args, cwd)


def _check_tree(out: Path, source: Path) -> None:
    """OUT is a GTA5 tree of the source's images (same names and sizes) with byte-identical labels."""
    names = sorted(p.name for p in (source / "images").iterdir())
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    for name in names:
        assert (out / "labels" / name).read_bytes() == (source / "labels" / name).read_bytes()
        with Image.open(out / "images" / name) as a, Image.open(source / "images" / name) as b:
            assert a.size == b.size and a.mode == "RGB"
    data = GTA5(out)
    assert len(data) == len(names) and data[0]["image"].shape == GTA5(source)[0]["image"].shape


def test_fda_translation_is_a_gta5_tree_seeded_resumable_and_multi_process(tiny_demo_dir, tmp_path):
    source = tiny_demo_dir / "demo" / "gta5"
    out = tmp_path / "fda"
    args = ["method=fda", "beta=0.05", *tiny_overrides(tiny_demo_dir)]
    proc = rtda_translate([*args, f"out={out}", "num_workers=0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 already there, 12 to translate" in proc.stdout
    _check_tree(out, source)
    manifest = json.loads((out / "translation.json").read_text())
    assert manifest["status"] == "complete" and manifest["method"] == "fda" and manifest["num_images"] == 12
    first = np.asarray(Image.open(out / "images" / "00001.png")).astype(float)
    assert np.abs(first - np.asarray(Image.open(source / "images" / "00001.png"))).mean() > 1  # translated

    # the same settings with two worker processes: the same bytes (each image's style is seeded by its index)
    other = tmp_path / "fda_workers"
    proc = rtda_translate([*args, f"out={other}", "num_workers=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for p in (out / "images").iterdir():
        assert (other / "images" / p.name).read_bytes() == p.read_bytes()

    # resumed: what exists is skipped; a missing image is written again; a half-written temporary is removed
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    (out / "images" / "00003.png").unlink()
    (out / "images" / ".00004.abc.tmp.png").write_bytes(b"half")
    again = rtda_translate([*args, f"out={out}", "num_workers=0"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "11 already there, 1 to translate (1 half-written files removed)" in again.stdout
    assert not list((out / "images").glob(".*"))
    assert all((out / "images" / n).stat().st_mtime_ns == t for n, t in stamps.items() if n != "00003.png")
    assert (out / "images" / "00003.png").read_bytes() == (other / "images" / "00003.png").read_bytes()
    _check_tree(out, source)

    # other settings into the same folder: refused in one line
    clash = rtda_translate(["method=fda", "beta=0.01", *tiny_overrides(tiny_demo_dir), f"out={out}"], cwd=tmp_path)
    assert clash.returncode == 1 and clash.stderr.strip().count("\n") == 0
    assert "already holds another translation (beta=0.05 there, 0.01 now)" in clash.stderr


@pytest.mark.parametrize("settings,message", [
    ({"method": "cyclegan"}, "ckpt_path is required with method=cyclegan"),
    ({"method": "fda", "beta": 2}, "beta=2: expected a fraction in [0, 1]"),
    ({"method": "gan"}, "method='gan': expected one of cyclegan, fda"),
    ({"method": "fda", "size": [0, 256]}, "size=[0, 256]: expected [height, width]"),
    ({"method": "fda", "num_workers": -1}, "num_workers=-1: expected an integer >= 0"),
])
def test_bad_settings_name_their_key(settings, message):
    from omegaconf import OmegaConf

    from rtda.pipelines.translate import check_settings
    from rtda.run.errors import ConfigValueError

    cfg = OmegaConf.create({"out": "x", "ckpt_path": None, "beta": 0.01, "seed": 0, "size": None, "num_workers": 0, **settings})
    with pytest.raises(ConfigValueError, match=re.escape(message)):
        check_settings(cfg)


def test_a_bad_argument_is_one_line_on_the_command_line(tmp_path):
    proc = run_in_process(translate_main, ["method=cyclegan", "ckpt_path=/nonexistent/last.ckpt", f"out={tmp_path / 'out'}",
                                     f"paths.data_dir={tmp_path}"], tmp_path)
    assert proc.returncode == 1 and proc.stderr == "rtda: error: ckpt_path: no such checkpoint file: /nonexistent/last.ckpt\n"
    assert not (tmp_path / "demo").exists() and not (tmp_path / "out").exists()  # refused before any work


CYCLEGAN_TINY = ["adaptation=cyclegan", "adaptation.ngf=8", "adaptation.ndf=8", "adaptation.n_blocks=1",
                 "adaptation.num_samples=2", "trainer.max_steps=4", "trainer.val_check_interval=2", "data.batch_size=2",
                 "data.num_workers=0", "data.source_size=[72,128]", "data.target_size=[64,128]", "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_two_stage_cyclegan_pipeline_through_the_console_scripts(tiny_demo_dir, tmp_path):
    """rtda-train adaptation=cyclegan (no segmenter) -> resume -> rtda-translate -> source-only on the copy."""
    proc = rtda_train([*CYCLEGAN_TINY, *tiny_overrides(tiny_demo_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no segmenter: no mIoU" in proc.stdout and "target test mIoU" not in proc.stdout
    folder = run_folder(proc.stdout)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["test"] is None and "test/mIoU" not in results
    assert [Path(p).name for p in results["samples"]] == ["translations_step000002.png", "translations_step000004.png"]
    panel = np.asarray(Image.open(results["samples"][-1]))
    assert panel.shape == (2 * 72, 3 * 128, 3)  # two kept source images: source | translated | cycled
    assert math.isfinite(results["final_losses"]["train/loss_g"]) and "train/loss_d/t" in results["final_losses"]
    ckpt_path = folder / "checkpoints" / "last.ckpt"
    assert Path(results["checkpoint"]) == ckpt_path.resolve() and (folder / "checkpoints" / "step000004.ckpt").is_file()
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and len(ckpt["lr_schedulers"]) == 2
    assert all(s["_step_count"] == 5 for s in ckpt["lr_schedulers"])  # each stepped once per iteration
    assert not any(k.startswith("net.") for k in ckpt["state_dict"])  # no segmenter built
    assert {"g_s2t.model.1.weight", "g_t2s.model.1.weight", "d_s.model.0.weight", "d_t.model.0.weight"} <= set(ckpt["state_dict"])
    header = (folder / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_gan/s2t", "train/loss_cycle/s", "train/loss_idt/t", "train/loss_d/s"} <= set(header)
    assert not any(h.startswith(("val/", "test/")) for h in header)

    # resume: two more iterations from last.ckpt (the LR decays to 0 over the last half of the new length)
    resumed = rtda_train([*CYCLEGAN_TINY, *tiny_overrides(tiny_demo_dir), "trainer.max_steps=6", "ckpt_path=auto",
                          f"hydra.run.dir={folder}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(ckpt_path, map_location="cpu", weights_only=True)["global_step"] == 6

    # rtda-eval refuses it in one line: there is nothing to score
    ev = rtda_eval([f"ckpt_path={ckpt_path}"], tmp_path)
    assert ev.returncode == 1 and "holds no segmentation network (trained by CycleGANModule)" in ev.stderr

    # stage two: translate the source (the run's data is replayed from the checkpoint), train on the copy
    out = tmp_path / "gta5_cyclegan"
    tr = rtda_translate(["method=cyclegan", f"ckpt_path={ckpt_path}", f"out={out}", "num_workers=0"], cwd=tmp_path)
    assert tr.returncode == 0, tr.stderr[-3000:]
    _check_tree(out, tiny_demo_dir / "demo" / "gta5")
    seg = rtda_train(["trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=2", "data.num_workers=0",
                      f"data.source.root={out}", *tiny_overrides(tiny_demo_dir)], cwd=tmp_path)
    assert seg.returncode == 0, seg.stderr[-3000:]
    assert 0.0 <= json.loads((run_folder(seg.stdout) / "results.json").read_text())["test/mIoU"] <= 1.0
