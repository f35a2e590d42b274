"""Ordered target streams for online adaptation: the built-in drifting demo stream and readers for real ones.

**The demo stream** (:func:`ensure_stream`) is a drive through the demo's target domain (the same procedural
scenes and "real-looking" style as :mod:`rtda.data.demo`'s Cityscapes split) whose weather changes over time:
clear, then fog, rain, night and clear again — an analogue of OnDA's *Increasing Storm* and of SHIFT's
continuous weather shifts. Each condition is a photometric corruption of the clear frame whose intensity follows
a smooth schedule (``conf/stream/demo.yaml``: the segments, their lengths and intensity ramps):

* ``fog``: a blend toward grey whose density grows with distance (a depth-like ramp peaking at the horizon,
  Koschmieder's ``I = J t + A (1 − t)``, ``t = exp(−β d)``), plus a loss of contrast;
* ``rain``: slanted streaks, an overall darkening and a blur (a wet lens);
* ``night``: darkening and a gamma, a blue tint and sensor noise (amplified by the gain).

Written in the Cityscapes sequence layout, one "city" ``drive``::

    ROOT/leftImg8bit_sequence/stream/drive/drive_000000_FFFFFF_leftImg8bit.png
    ROOT/gtFine/stream/drive/drive_000000_FFFFFF_gtFine_labelIds.png
    ROOT/stream.csv            frame, name, condition, intensity, segment (one row a frame, in order)
    ROOT/stream.json           the spec (seed, frames, size, gap, schedule): its stamp; another spec regenerates

Deterministic in the seed and the spec; generated once and cached like the demo (:func:`rtda.run.files.build_once`).
The default root is ``${paths.data_dir}/demo_stream``, beside (not inside) the demo pair, which is replaced as a
whole when its own spec changes.

**Readers** return samples ``{"image": HxWx3 uint8, "label": HxW uint8 train ids (absent when unlabelled), "name",
"index", "condition", "intensity"}`` in stream order:

* :class:`FrameFolder`: the image files of a folder in name order (Cityscapes ``leftImg8bit_sequence``, ACDC's
  ``rgb_anon/<condition>/…``, Dark Zurich's ``rgb_anon/…``, any folder of frames), labels matched by name from a
  label folder of the same layout (``_gtFine_labelTrainIds`` / ``_gtFine_labelIds`` / ACDC's ``_gt_labelTrainIds``
  / ``_gt_labelIds`` suffixes, or the same stem), conditions from a ``stream.csv`` or from the first folder
  below the root (ACDC's ``fog`` / ``night`` / ``rain`` / ``snow``);
* :class:`VideoFrames`: the frames of a video file (OpenCV), unlabelled.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from rtda.data.base import read_label, read_rgb
from rtda.data.cityscapes import _decode_label_ids, _decode_train_ids
from rtda.data.demo import REAL_STYLE, SOURCE_STYLE, _gauss_blur, blend_style, render_sample
from rtda.run.errors import ConfigValueError, DatasetFormatError
from rtda.run.files import build_once

STREAM_VERSION = 1
CONDITIONS = ("clear", "fog", "rain", "night")
CITY = "drive"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: image-name suffixes stripped to match a label (Cityscapes, ACDC / Dark Zurich)
IMAGE_SUFFIXES = ("_leftImg8bit", "_rgb_anon", "_rgb_ref_anon")
#: label suffixes tried in order after the stripped stem; train ids first
LABEL_SUFFIXES = (("_gtFine_labelTrainIds.png", "train"), ("_gt_labelTrainIds.png", "train"),
                  ("_labelTrainIds.png", "train"), ("_gtFine_labelIds.png", "ids"), ("_gt_labelIds.png", "ids"),
                  ("_labelIds.png", "ids"), (".png", "ids"))


# -- the schedule ---------------------------------------------------------------------------------------------

def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


def frame_schedule(segments: Sequence[dict], frames: int) -> list[dict]:
    """One ``{"frame", "condition", "intensity", "segment"}`` per frame from the segments (each ``condition``,
    ``length`` (a share of the stream; the shares are normalised), ``peak`` intensity in [0, 1] (default 1) and
    ``ramp``: the share of the segment over which the intensity rises from 0 at its start and falls back to 0 at
    its end, a smoothstep — 0 holds the peak throughout). Segment boundaries are rounded to frames."""
    if frames < 1:
        raise ConfigValueError(f"stream.frames={frames}: expected at least 1 frame")
    if not segments:
        raise ConfigValueError("stream.schedule: expected a list of segments {condition, length, peak, ramp}")
    lengths = []
    for i, seg in enumerate(segments):
        cond = seg.get("condition")
        if cond not in CONDITIONS:
            raise ConfigValueError(f"stream.schedule[{i}].condition={cond!r}: expected one of {list(CONDITIONS)}")
        length = float(seg.get("length", 1.0))
        ramp = float(seg.get("ramp", 0.0))
        peak = float(seg.get("peak", 1.0))
        if length <= 0 or not 0 <= ramp <= 0.5 or not 0 <= peak <= 1:
            raise ConfigValueError(f"stream.schedule[{i}]: expected length > 0, ramp in [0, 0.5], peak in [0, 1]; "
                                   f"got length={length}, ramp={ramp}, peak={peak}")
        lengths.append(length)
    total = sum(lengths)
    bounds = [round(frames * sum(lengths[:i]) / total) for i in range(len(lengths) + 1)]
    rows = []
    for i, seg in enumerate(segments):
        start, end = bounds[i], bounds[i + 1]
        n = end - start
        ramp, peak = float(seg.get("ramp", 0.0)), float(seg.get("peak", 1.0))
        for f in range(start, end):
            pos = (f - start + 0.5) / max(n, 1)  # position inside the segment, in (0, 1)
            level = 1.0 if ramp == 0 else _smoothstep(min(pos, 1 - pos) / ramp)
            intensity = 0.0 if seg["condition"] == "clear" else peak * level
            rows.append({"frame": f, "condition": seg["condition"], "intensity": round(intensity, 4), "segment": i})
    return rows


# -- the corruptions ------------------------------------------------------------------------------------------

def _fog(img: np.ndarray, t: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    horizon = 0.45 * h
    rows = np.arange(h, dtype=np.float32)
    # a depth-like ramp: far (1) at the horizon, near (0) at the bottom; the sky is far too
    depth = np.where(rows < horizon, 1.0, 1.0 - (rows - horizon) / (h - horizon))[:, None, None]
    beta = 2.5 * t
    trans = np.exp(-beta * (0.25 + 0.75 * depth))  # transmission
    air = 0.8 * 255 + rng.uniform(-8, 8)
    out = img * trans + air * (1 - trans)
    mean = out.mean()
    return mean + (out - mean) * (1 - 0.3 * t)


def _rain(img: np.ndarray, t: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    out = img * (1 - 0.35 * t)
    drops = (rng.random((h, w)) < 0.012 * t).astype(np.float32)
    length = max(2, int(round(0.06 * h * (0.5 + t))))
    streaks = np.zeros((h, w), dtype=np.float32)
    for k in range(length):  # slanted streaks: each drop drawn down and to the right
        streaks += np.roll(np.roll(drops, k, axis=0), k // 3, axis=1)
    streaks = np.clip(streaks, 0, 1)[..., None]
    out = out * (1 - 0.6 * streaks) + 210.0 * 0.6 * streaks
    return _gauss_blur(out, 0.4 + 1.2 * t)


def _night(img: np.ndarray, t: float, rng: np.random.Generator) -> np.ndarray:
    x = np.clip(img / 255.0, 0, 1)
    x = x ** (1 + 1.5 * t) * (1 - 0.7 * t)
    x = x * np.array([1 - 0.35 * t, 1 - 0.15 * t, 1 + 0.25 * t], dtype=np.float32)
    x = x * 255.0 + rng.normal(0, 1 + 9 * t, x.shape).astype(np.float32)
    return x


CORRUPTIONS = {"fog": _fog, "rain": _rain, "night": _night}


def corrupt(image: np.ndarray, condition: str, intensity: float, seed: int) -> np.ndarray:
    """``image`` (HxWx3 uint8) under ``condition`` at ``intensity`` in [0, 1]; deterministic in ``seed``."""
    if condition == "clear" or intensity <= 0:
        return image
    rng = np.random.default_rng(seed)
    out = CORRUPTIONS[condition](image.astype(np.float32), float(intensity), rng)
    return np.clip(out, 0, 255).astype(np.uint8)


# -- the writer -----------------------------------------------------------------------------------------------

def frame_stem(index: int) -> str:
    return f"{CITY}_000000_{index:06d}"


def ensure_stream(root: str | Path, frames: int = 300, seed: int = 0, size: Sequence[int] = (256, 512),
                  gap: float = 0.4, schedule: Sequence[dict] = ()) -> Path:
    """Write the drifting demo stream under ``root`` unless an identical one is there (see the module
    docstring); returns ``root``. ``size`` is (H, W); ``gap`` the demo's domain-gap strength (its target style)."""
    root = Path(root)
    segments = [dict(s) for s in schedule]
    rows = frame_schedule(segments, int(frames))
    size = tuple(int(v) for v in size)
    stamp = json.loads(json.dumps({"version": STREAM_VERSION, "frames": int(frames), "seed": int(seed),
                                   "size": list(size), "gap": float(gap), "schedule": segments}))

    def is_complete(folder: Path) -> bool:
        try:
            return json.loads((folder / "stream.json").read_text()) == stamp
        except (OSError, json.JSONDecodeError):
            return False

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        img_dir = tmp / "leftImg8bit_sequence" / "stream" / CITY
        gt_dir = tmp / "gtFine" / "stream" / CITY
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        style = blend_style(SOURCE_STYLE, REAL_STYLE, float(gap))
        for row in rows:
            base_seed = 900_000_000 + int(seed) * 1_000_003 + row["frame"]
            image, ids = render_sample(base_seed, size[0], size[1], style)
            image = corrupt(image, row["condition"], row["intensity"], base_seed + 17)
            stem = frame_stem(row["frame"])
            Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png", compress_level=1)
            Image.fromarray(ids, mode="L").save(gt_dir / f"{stem}_gtFine_labelIds.png", compress_level=1)
            row["name"] = stem
        with open(tmp / "stream.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["frame", "name", "condition", "intensity", "segment"])
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "stream.json").write_text(json.dumps(stamp, indent=2))  # last: marks the folder complete
        print(f"rtda: wrote the demo stream ({len(rows)} frames) to {root} in {time.perf_counter() - start:.1f} s")

    build_once(root, is_complete, build)
    return root


# -- readers --------------------------------------------------------------------------------------------------

def _strip_suffix(stem: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_conditions(path: Path) -> dict[str, dict]:
    """``name -> {"condition", "intensity", "segment"}`` from a ``stream.csv`` (columns ``name``, ``condition``,
    optional ``intensity`` and ``segment``)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"name", "condition"} <= set(rows[0]):
        raise DatasetFormatError(f"{path}: expected the columns name,condition[,intensity,segment]; got {list(rows[0])}")
    return {r["name"]: {"condition": r["condition"], "intensity": float(r.get("intensity") or 0.0),
                        "segment": int(r["segment"]) if r.get("segment") not in (None, "") else None} for r in rows}


class FrameFolder:
    """The frames of ``root`` in order (the file names' order, recursively: sequence frame numbers, ACDC's
    condition folders one after the other), as a sequence of samples (see the module docstring).

    Args:
        root: the folder of frames.
        label_root: a folder of labels in the same sub-folder layout (null: unlabelled, or ``labels: auto``).
        labels: ``auto`` (Cityscapes: ``leftImg8bit_sequence``/``leftImg8bit`` → ``gtFine``, ACDC/Dark Zurich:
            ``rgb_anon`` → ``gt``, when such a folder exists), ``none``, or ``required``.
        conditions: a CSV (``name,condition[,intensity,segment]``); ``auto``: ``stream.csv`` in ``root`` or
            the folders above it, else the first folder below ``root`` when there are several (ACDC), else ``all``.
        pattern: a glob below ``root`` (default every image file).
        limit: the first ``limit`` frames only (null: all).
    """

    def __init__(self, root: str | Path, label_root: str | Path | None = None, labels: str = "auto",
                 conditions: str | None = "auto", pattern: str | None = None, limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetFormatError(f"stream: folder of frames not found: {self.root} (stream.reader.root=...)")
        files = sorted(self.root.glob(pattern)) if pattern else sorted(p for p in self.root.rglob("*")
                                                                        if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.images = [p for p in files if p.is_file()][: limit if limit else None]
        if not self.images:
            raise DatasetFormatError(f"stream: no image files ({'/'.join(IMAGE_EXTENSIONS)}) under {self.root}")
        if labels not in ("auto", "none", "required"):
            raise ConfigValueError(f"stream.reader.labels={labels!r}: expected auto, none or required")
        self.labels: list[tuple[Path, str] | None] = [None] * len(self.images)
        if labels != "none":
            label_dir = Path(label_root) if label_root else self._auto_label_root()
            if label_dir is not None:
                self.labels = [self._find_label(label_dir, p) for p in self.images]
            missing = sum(lab is None for lab in self.labels)
            if labels == "required" and missing:
                first = next(p for p, lab in zip(self.images, self.labels) if lab is None)
                raise DatasetFormatError(f"stream: {missing} of {len(self.images)} frames have no label, e.g. {first} "
                                         f"(looked in {label_dir}; stream.reader.label_root=...)")
        self.meta = self._conditions(conditions)

    def _auto_label_root(self) -> Path | None:
        parts = self.root.resolve().parts
        for image_name, label_name in (("leftImg8bit_sequence", "gtFine"), ("leftImg8bit", "gtFine"),
                                       ("rgb_anon", "gt")):
            if image_name in parts:
                i = len(parts) - 1 - parts[::-1].index(image_name)
                candidate = Path(*parts[:i], label_name, *parts[i + 1:])
                if candidate.is_dir():
                    return candidate
        return None

    def _find_label(self, label_dir: Path, image: Path) -> tuple[Path, str] | None:
        folder = label_dir / image.parent.relative_to(self.root)
        stem = _strip_suffix(image.stem)
        for suffix, kind in LABEL_SUFFIXES:
            path = folder / f"{stem}{suffix}"
            if path.is_file() and path != image:
                return path, kind
        return None

    def _conditions(self, conditions: str | None) -> list[dict]:
        names = [_strip_suffix(p.stem) for p in self.images]
        table = None
        if conditions and conditions not in ("auto", "all", "folder"):
            table = read_conditions(Path(conditions))
        elif conditions == "auto":
            for folder in (self.root, *self.root.resolve().parents[:4]):
                if (folder / "stream.csv").is_file():
                    table = read_conditions(folder / "stream.csv")
                    break
        if table is not None:
            return [table.get(n, {"condition": "unknown", "intensity": 0.0, "segment": None}) for n in names]
        firsts = [p.relative_to(self.root).parts[0] if len(p.relative_to(self.root).parts) > 1 else "all"
                  for p in self.images]
        use_folder = conditions == "folder" or (conditions == "auto" and len(set(firsts)) > 1)
        return [{"condition": f if use_folder else "all", "intensity": 0.0, "segment": None} for f in firsts]

    @property
    def labelled(self) -> bool:
        return any(lab is not None for lab in self.labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        sample = {"image": read_rgb(self.images[i]), "name": _strip_suffix(self.images[i].stem), "index": i,
                  **self.meta[i]}
        if self.labels[i] is not None:
            path, kind = self.labels[i]
            sample["label"] = read_label(path, _decode_train_ids if kind == "train" else _decode_label_ids)
        return sample

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class VideoFrames:
    """The frames of a video file in order (OpenCV), unlabelled; every ``stride``-th frame, at most ``limit``."""

    def __init__(self, path: str | Path, stride: int = 1, limit: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetFormatError(f"stream: video file not found: {self.path} (stream.reader.path=...)")
        capture = cv2.VideoCapture(str(self.path))
        ok = capture.isOpened()
        self.fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0) if ok else 0.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if ok else 0
        capture.release()
        if not ok:
            raise DatasetFormatError(f"stream: cannot open the video {self.path} (a video format OpenCV reads: mp4, avi…)")
        if stride < 1:
            raise ConfigValueError(f"stream.reader.stride={stride}: expected an integer >= 1")
        self.stride, self.limit = int(stride), limit
        count = math.ceil(total / self.stride) if total else 0
        self.count = min(count, limit) if limit else count
        self.labelled = False

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        capture = cv2.VideoCapture(str(self.path))
        try:
            i = n = 0
            while self.limit is None or n < self.limit:
                ok, frame = capture.read()
                if not ok:
                    break
                if i % self.stride == 0:
                    yield {"image": cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), "name": f"{self.path.stem}_{i:06d}",
                           "index": n, "condition": "all", "intensity": 0.0, "segment": None}
                    n += 1
                i += 1
        finally:
            capture.release()


def demo_stream(root: str | Path, frames: int = 300, seed: int = 0, size: Sequence[int] = (256, 512),
                gap: float = 0.4, schedule: Sequence[dict] = (), limit: int | None = None) -> FrameFolder:
    """The demo stream (written on first use) as a :class:`FrameFolder` reader."""
    root = ensure_stream(root, frames=frames, seed=seed, size=size, gap=gap, schedule=schedule)
    return FrameFolder(root / "leftImg8bit_sequence" / "stream", label_root=root / "gtFine" / "stream",
                       labels="required", conditions=str(root / "stream.csv"), limit=limit)
