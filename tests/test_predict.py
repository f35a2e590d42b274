"""rtda-predict from the checkpoint of a short run and from its exported file: an image gives a mask and an overlay,
a folder every image (unreadable files named and skipped), a demo video (frames written to a video file here) an
overlay video; nothing half-written when an input cannot be read."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import run_in_process
from PIL import Image

from rtda.cli.export import main as export_main
from rtda.cli.predict import main as predict_main
from rtda.data.labels import TRAIN_ID_PALETTE


@pytest.fixture(scope="module")
def demo_images(tiny_demo_dir) -> list[Path]:
    return sorted((tiny_demo_dir / "demo" / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))


@pytest.fixture(scope="module")
def onnx_file(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "model.onnx"
    proc = run_in_process(export_main, [f"ckpt_path={trained_run['checkpoint']}", f"out={out}", "check_images=1"],
                          trained_run["cwd"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _predict(ckpt, source, out, *args):
    return run_in_process(predict_main, [f"ckpt_path={ckpt}", f"input={source}", f"out={out}", "progress=false", *args],
                          out.parent)


def test_an_image_gives_a_mask_and_an_overlay_with_a_legend(trained_run, onnx_file, demo_images, tmp_path):
    image = demo_images[0]
    masks = {}
    for kind, model in (("ckpt", trained_run["checkpoint"]), ("onnx", onnx_file)):
        out = tmp_path / kind
        proc = _predict(model, image, out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == [f"{image.stem}_mask.png", f"{image.stem}_overlay.png"]
        mask = np.asarray(Image.open(out / f"{image.stem}_mask.png"))
        overlay = np.asarray(Image.open(out / f"{image.stem}_overlay.png"))
        h, w = np.asarray(Image.open(image)).shape[:2]
        assert mask.shape == (h, w, 3)  # at the image's own size, not the network's
        assert {tuple(c) for c in mask.reshape(-1, 3)} <= {tuple(c) for c in TRAIN_ID_PALETTE[:19]}
        assert overlay.shape[0] > h and overlay.shape[1] == w  # the legend strip below the image
        assert "written: 1 image (mask + overlay each)" in proc.stdout
        masks[kind] = mask
    assert (masks["ckpt"] == masks["onnx"]).all(axis=-1).mean() > 0.999  # the file predicts what the checkpoint does


def test_a_folder_skips_and_names_unreadable_files(trained_run, demo_images, tmp_path):
    source = tmp_path / "photos"
    (source / "more").mkdir(parents=True)
    for image in demo_images[:2]:
        (source / image.name).write_bytes(image.read_bytes())
    (source / "more" / demo_images[2].name).write_bytes(demo_images[2].read_bytes())
    (source / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (source / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    proc = _predict(trained_run["checkpoint"], source, out, "recursive=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rtda: warning: skipped {source / 'broken.png'}: cannot be decoded" in proc.stderr
    assert "written: 3 images" in proc.stdout and "skipped: 1 unreadable file" in proc.stdout
    assert "ignored: 1 files that are not images" in proc.stdout
    assert len(list(out.glob("*_overlay.png"))) == 2 and len(list((out / "more").glob("*_mask.png"))) == 1
    assert not list(out.glob("broken*")) and not list(out.rglob(".*"))  # nothing of the broken file, no temporaries


def test_a_demo_video_gives_an_overlay_video(onnx_file, demo_images, tmp_path):
    video = tmp_path / "drive.mp4"
    first = np.asarray(Image.open(demo_images[0]).convert("RGB"))
    h, w = first.shape[:2]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (w, h))
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in demo_images] * 2
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "pred"
    proc = _predict(onnx_file, video, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["drive_overlay.mp4"]  # no temporary left
    capture = cv2.VideoCapture(str(out / "drive_overlay.mp4"))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(8.0)
    read = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        read.append(frame)
    capture.release()
    assert len(read) == len(frames)
    assert read[0].shape[1] == w and read[0].shape[0] > h  # the frames over the legend strip
    assert f"video: {out / 'drive_overlay.mp4'} ({len(frames)} frames at 8 fps" in proc.stdout
    assert "FPS)" in proc.stdout
    corner, elsewhere = read[0][:22, :90].astype(int), read[0][:22, -90:].astype(int)
    assert (np.abs(corner - 255).sum(axis=-1) < 60).sum() > 20  # the white FPS text in the top-left corner
    assert (np.abs(corner - 255).sum(axis=-1) < 60).sum() > (np.abs(elsewhere - 255).sum(axis=-1) < 60).sum()


@pytest.mark.parametrize("name, content, message", [
    ("broken.png", b"\x89PNG\r\n\x1a\n truncated", "cannot decode image"),
    ("broken.mp4", b"definitely not a video", "cannot open video"),
])
def test_an_unreadable_input_is_named_and_nothing_is_written(trained_run, tmp_path, name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "pred"
    proc = _predict(trained_run["checkpoint"], bad, out)
    assert proc.returncode == 1
    assert proc.stderr.startswith("rtda: error: ") and message in proc.stderr and str(bad) in proc.stderr
    assert list(out.iterdir()) == []


def test_onnx_size_is_fixed(onnx_file, demo_images, tmp_path):
    proc = _predict(onnx_file, demo_images[0], tmp_path / "pred", "size=[64,128]")
    assert proc.returncode == 1 and "was exported for [128, 256] images" in proc.stderr
    card = json.loads(onnx_file.with_suffix(".json").read_text())
    assert card["input"]["shape"][2:] == [128, 256]
