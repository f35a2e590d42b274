"""``rtda-predict``: colourised masks and overlays of images, folders and videos, from a checkpoint or an exported
file (:func:`rtda.pipelines.onnx_model.load_segmenter`).

    rtda-predict ckpt_path=<run>/checkpoints/last.ckpt input=street.png out=pred/
    rtda-predict ckpt_path=deploy/model_int8.onnx input=photos/ recursive=true out=pred/
    rtda-predict ckpt_path=deploy/model.onnx input=drive.mp4 out=pred/          # -> pred/drive_overlay.mp4

Each image is resized to the segmenter's input size (bilinear, as evaluation resizes), segmented, and its logits
upsampled back to the image's own size before the argmax (evaluation's protocol). An image gives
``<name>_mask.png`` (the Cityscapes colours) and ``<name>_overlay.png`` (the mask blended over the image, a legend
of the classes it shows below it). A video gives ``<name>_overlay.<ext>`` (same frame rate and container; the
measured segmentation frames/s in the top-left corner; a legend strip sized for every class below the frames).

In a folder, files that cannot be decoded are named on stderr, skipped and counted; other files (not images)
are ignored. Every output is written under a temporary name and renamed once complete: an interrupted or failed
command leaves no half-written file.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from rtda.data.base import read_rgb
from rtda.data.render import resize_image
from rtda.pipelines.onnx_model import load_segmenter
from rtda.run.errors import ConfigValueError, DecodeError, RtdaError
from rtda.run.files import atomic_write, check_writable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
#: video containers -> the codec written into them (what OpenCV's FFmpeg writes everywhere without extra libraries)
VIDEO_CODECS = {".mp4": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_SCALE, _ROW, _SWATCH = 0.4, 18, 12


def segment(segmenter, rgb: np.ndarray) -> np.ndarray:
    """``H×W×3`` uint8 RGB → ``H×W`` uint8 train ids at the image's own size."""
    batch = resize_image(rgb, segmenter.size).transpose(2, 0, 1)[None]
    logits = segmenter.logits(np.ascontiguousarray(batch), rgb.shape[:2])
    return logits.argmax(dim=1)[0].numpy().astype(np.uint8)


def _entries(ids, names) -> list[tuple[int, str, int]]:
    return [(int(i), names[int(i)], cv2.getTextSize(names[int(i)], _FONT, _SCALE, 1)[0][0]) for i in ids
            if 0 <= int(i) < len(names)]


def _layout(entries, width: int) -> list[tuple[int, int, int, str]]:
    """(x, y, class, name) of each legend entry, wrapped into rows of ``width`` pixels."""
    placed, x, y = [], 6, 0
    for cls, name, text_w in entries:
        w = _SWATCH + 4 + text_w + 12
        if x + w > width and x > 6:
            x, y = 6, y + _ROW
        placed.append((x, y, cls, name))
        x += w
    return placed


def legend(ids, names, palette: np.ndarray, width: int, reserve=None) -> np.ndarray:
    """A strip ``width`` pixels wide naming the classes ``ids`` with their colours; as tall as the classes
    ``reserve`` need (a video's strip keeps one height: room for every class) or ``ids`` do."""
    rows = max(1, 1 + max((y for _, y, _, _ in _layout(_entries(reserve if reserve is not None else ids, names), width)),
                          default=0) // _ROW)
    strip = np.full((rows * _ROW + 4, width, 3), 32, np.uint8)
    for x, y, cls, name in _layout(_entries(ids, names), width):
        top = y + 3
        cv2.rectangle(strip, (x, top), (x + _SWATCH, top + _SWATCH), tuple(int(c) for c in palette[cls]), -1)
        cv2.putText(strip, name, (x + _SWATCH + 4, top + _SWATCH - 2), _FONT, _SCALE, (235, 235, 235), 1, cv2.LINE_AA)
    return strip


def blend(rgb: np.ndarray, mask_rgb: np.ndarray, alpha: float) -> np.ndarray:
    return (rgb.astype(np.float32) * (1 - alpha) + mask_rgb.astype(np.float32) * alpha).round().astype(np.uint8)


def _classes_by_area(labels: np.ndarray, num_classes: int) -> list[int]:
    counts = np.bincount(labels.ravel(), minlength=256)[:num_classes]
    return [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(np.ascontiguousarray(array)).save(f, format="PNG"), binary=True)


def predict_image(segmenter, path: Path, out_dir: Path, alpha: float, with_legend: bool) -> list[Path]:
    """``<name>_mask.png`` and ``<name>_overlay.png`` of one image file (a :class:`DecodeError` naming it when it
    cannot be decoded)."""
    rgb = read_rgb(path)
    labels = segment(segmenter, rgb)
    mask = segmenter.palette[labels]
    over = blend(rgb, mask, alpha)
    if with_legend:
        over = np.concatenate([over, legend(_classes_by_area(labels, segmenter.num_classes), segmenter.class_names,
                                            segmenter.palette, over.shape[1])])
    written = [out_dir / f"{path.stem}_mask.png", out_dir / f"{path.stem}_overlay.png"]
    _save_png(mask, written[0])
    _save_png(over, written[1])
    return written


def _fps_text(frame: np.ndarray, text: str) -> None:
    for color, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # outlined: readable on any background
        cv2.putText(frame, text, (6, 18), _FONT, 0.55, color, thickness, cv2.LINE_AA)


def predict_video(segmenter, path: Path, out_dir: Path, alpha: float, with_legend: bool, fourcc: str | None,
                  progress: bool = True) -> dict:
    """``<name>_overlay.<ext>``: every frame's overlay at the input's frame rate, the measured segmentation FPS
    (frames segmented per second of segmentation, a running mean) in the top-left corner."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise DecodeError(f"cannot open video {path} (not a video, or a codec OpenCV cannot decode)", path)
        fps = capture.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and np.isfinite(fps) and fps > 0 else 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        ok, frame = capture.read()
        if not ok:
            raise DecodeError(f"cannot decode a single frame of video {path}", path)
        suffix = path.suffix.lower() if path.suffix.lower() in VIDEO_CODECS else ".mp4"
        dest = out_dir / f"{path.stem}_overlay{suffix}"
        codec = fourcc or VIDEO_CODECS[suffix]
        reserve = range(segmenter.num_classes)
        # beside the destination (the rename stays on one file system), the container's suffix last (OpenCV picks
        # the muxer by it); created by the writer itself, with the usual permissions
        tmp = out_dir / f".{dest.stem}.{os.getpid()}-{time.monotonic_ns()}.tmp{suffix}"
        writer = None
        frames, seg_seconds = 0, 0.0
        try:
            with tqdm(total=total, desc=path.name, unit="frame", file=sys.stderr, disable=not progress,
                      dynamic_ncols=True) as bar:
                while ok:
                    rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    start = time.perf_counter()
                    labels = segment(segmenter, rgb)
                    seg_seconds += time.perf_counter() - start
                    frames += 1
                    over = blend(rgb, segmenter.palette[labels], alpha)
                    _fps_text(over, f"{frames / seg_seconds:.1f} FPS")
                    if with_legend:
                        over = np.concatenate([over, legend(_classes_by_area(labels, segmenter.num_classes),
                                                            segmenter.class_names, segmenter.palette, over.shape[1],
                                                            reserve=reserve)])
                    if writer is None:
                        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*codec), fps,
                                                 (over.shape[1], over.shape[0]))
                        if not writer.isOpened():
                            raise ConfigValueError(f"cannot write a {suffix} video with codec {codec!r} here "
                                                   f"(fourcc=...: e.g. mp4v for .mp4, MJPG for .avi)")
                    writer.write(cv2.cvtColor(over, cv2.COLOR_RGB2BGR))
                    bar.update(1)
                    ok, frame = capture.read()
            writer.release()
            writer = None
            os.replace(tmp, dest)
        finally:
            if writer is not None:
                writer.release()
            tmp.unlink(missing_ok=True)
    finally:
        capture.release()
    return {"file": dest, "frames": frames, "fps_in": fps, "fps_measured": frames / seg_seconds if seg_seconds else None,
            "codec": codec}


def _images_of(folder: Path, recursive: bool) -> tuple[list[Path], int]:
    """The folder's image files (sorted; below it with ``recursive``), and how many other files it holds."""
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file()
                   and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, len(files) - len(images)


def predict(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt_path"):
        raise ConfigValueError("ckpt_path is required: a checkpoint (.ckpt) or an rtda-export file (.onnx)")
    if not cfg.get("input"):
        raise ConfigValueError("input is required: an image, a folder of images or a video file")
    if not 0.0 <= float(cfg.alpha) <= 1.0:
        raise ConfigValueError(f"alpha={cfg.alpha!r}: expected the mask's opacity in [0, 1]")
    source = Path(str(cfg.input))
    if not source.exists():
        raise FileNotFoundError(f"input: no such file or folder: {source}")
    out_dir = check_writable(cfg.get("out") or cfg.paths.output_dir, "the predictions")
    segmenter = load_segmenter(cfg.ckpt_path, cfg.get("size"), str(cfg.get("device", "cpu")))
    progress = bool(cfg.get("progress", True))
    result = {"input": str(source), "out": str(out_dir.resolve()), "ckpt_path": str(cfg.ckpt_path),
              "runtime": segmenter.provider, "size": list(segmenter.size), "written": [], "skipped": {}}
    if source.is_dir():
        result["kind"] = "folder"
        images, others = _images_of(source, bool(cfg.recursive))
        result["ignored"] = others
        if not images:
            raise ConfigValueError(f"input={source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder"
                                   + ("" if cfg.recursive else " (recursive=true looks below it)"))
        for path in tqdm(images, desc=source.name or str(source), unit="image", file=sys.stderr, disable=not progress,
                         dynamic_ncols=True):
            try:
                result["written"] += predict_image(segmenter, path, out_dir / path.parent.relative_to(source),
                                                   float(cfg.alpha), bool(cfg.legend))
            except DecodeError as err:
                result["skipped"][str(path)] = str(err)
                tqdm.write(f"rtda: warning: skipped {path}: cannot be decoded", file=sys.stderr)
        if not result["written"]:
            raise RtdaError(f"input={source}: none of its {len(images)} image files could be decoded")
    elif source.suffix.lower() in VIDEO_CODECS:
        result["kind"] = "video"
        video = predict_video(segmenter, source, out_dir, float(cfg.alpha), bool(cfg.legend), cfg.get("fourcc"), progress)
        result["written"] = [video["file"]]
        result["video"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in video.items()}
    else:
        result["kind"] = "image"
        result["written"] = predict_image(segmenter, source, out_dir, float(cfg.alpha), bool(cfg.legend))
    result["written"] = [str(p) for p in result["written"]]
    print(format_predict_summary(result))
    return result


def format_predict_summary(result: dict) -> str:
    lines = ["", "=" * 60, f"rtda-predict: {result['kind']} {result['input']} with {result['ckpt_path']} "
             f"({result['runtime']}, {result['size'][0]}x{result['size'][1]})"]
    if result["kind"] == "video":
        v = result["video"]
        lines.append(f"video: {v['file']} ({v['frames']} frames at {v['fps_in']:.3g} fps, codec {v['codec']}; "
                     f"segmentation {v['fps_measured']:.1f} FPS)")
    else:
        n = len(result["written"]) // 2
        lines.append(f"written: {n} image{'s' * (n != 1)} (mask + overlay each) to {result['out']}")
    if result["skipped"]:
        lines.append(f"skipped: {len(result['skipped'])} unreadable file{'s' * (len(result['skipped']) != 1)}:")
        lines += [f"  {p}" for p in list(result["skipped"])[:10]]
        if len(result["skipped"]) > 10:
            lines.append(f"  ... and {len(result['skipped']) - 10} more")
    if result.get("ignored"):
        lines.append(f"ignored: {result['ignored']} files that are not images")
    lines.append("=" * 60)
    return "\n".join(lines)
