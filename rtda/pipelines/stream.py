"""``rtda-stream``: segment a stream frame by frame (or a few frames at a time) while adapting online.

    rtda-stream ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt                 # stream=demo adapt=none
    rtda-stream ckpt_path=… adapt=tent                                                 # bn | tent | cotta | budgeted
    rtda-stream ckpt_path=… stream=folder stream.reader.root=/data/cityscapes/leftImg8bit_sequence/val/frankfurt
    rtda-stream ckpt_path=… stream=video stream.reader.path=drive.mp4 adapt=budgeted stream.min_fps=15
    rtda-stream ckpt_path=… adapt=tent report.compare=[outputs/stream/runs/<the none run>]   # one figure, two lines

The segmenter is rebuilt from the checkpoint (any method's, :func:`rtda.adaptation.segmenter.segmenter_module`).
Frames are resized to ``stream.size`` (null: their own size), normalised as in training, passed to the online
method (:mod:`rtda.adaptation.online`), and — where the stream has labels — scored at the label's full resolution
(the probabilities upsampled bilinearly, as ``rtda-eval`` scores). After every batch the collapse guard looks at the
prediction and resets the method to the source weights when it degenerates.

The report (the run folder): ``results.json`` — mIoU over the stream, per condition and per schedule segment, the
harmonic mean over the conditions, *forgetting* (the first segment — clear, on the demo — scored again by the final
model, without adapting, against its online score: positive = forgotten), frames/s of the model including the
updates (and end to end with reading and scoring), updates, resets and the frames they happened at; ``frames.csv``
(one row a frame); ``miou_over_time.png`` (the windowed mIoU, ``report.window`` frames, conditions shaded, one line
per method with ``report.compare``); ``stream_overlay.mp4`` with ``report.video=true``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rtda.adaptation.online import CollapseGuard, OnlineAdapter, Timer, iterate_batches
from rtda.adaptation.segmenter import segmenter_module
from rtda.analysis.stream import class_ious, miou_of, segments_of, stream_curves, windowed_miou
from rtda.data.render import overlay, resize_image
from rtda.run import config as rtda_config
from rtda.run.errors import ConfigValueError, DatasetFormatError
from rtda.run.files import atomic_write, atomic_write_text, check_writable

CSV_FIELDS = ("frame", "name", "condition", "intensity", "segment", "mIoU", "acc", "updated", "loss", "skipped",
              "reset", "seconds", "confidence", "entropy", "top_share")


def _device(cfg: DictConfig) -> torch.device:
    wanted = str(cfg.get("device") or cfg.trainer.get("accelerator", "cpu"))
    if wanted in ("gpu", "cuda", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if wanted != "auto":
            raise ConfigValueError(f"device={wanted}: no CUDA device is visible (device=cpu)")
        return torch.device("cpu")
    return torch.device(wanted)


def confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """C×C confusion matrix (rows: truth) of one H×W prediction, on the device (no pixel loop)."""
    valid = label != ignore_index
    index = label[valid].long() * num_classes + pred[valid].long()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    if counts.numel() != num_classes * num_classes:
        raise DatasetFormatError(f"a label holds values outside 0..{num_classes - 1} and {ignore_index}")
    return counts.reshape(num_classes, num_classes).cpu().numpy()


def harmonic_mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    if min(values) <= 0:
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _nan_to_none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _tensor_batch(batch: list[dict], size, device) -> torch.Tensor:
    images = [resize_image(s["image"], tuple(size)) if size else s["image"] for s in batch]
    if len({im.shape for im in images}) > 1:
        raise DatasetFormatError(f"stream: frames of different sizes in one batch ({batch[0]['name']}…): set "
                                 "stream.size=[H,W] or stream.batch_size=1")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(device)


class _VideoOut:
    """The overlay video, written to a temporary file and renamed when complete."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self.writer = path, fps, None
        self.tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")

    def write(self, rgb: np.ndarray) -> None:
        if self.writer is None:
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                          (rgb.shape[1], rgb.shape[0]))
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            os.replace(self.tmp, self.path)


def build_adapter(cfg: DictConfig, net) -> OnlineAdapter:
    node = cfg.adapt.get("method")
    if node is None or "_target_" not in node:
        raise ConfigValueError("adapt.method: expected a node with _target_ (adapt=none|bn|tent|cotta|budgeted)")
    adapter = hydra.utils.instantiate(node, net=net)
    if not isinstance(adapter, OnlineAdapter):
        raise ConfigValueError(f"adapt.method._target_={node._target_}: not an rtda.adaptation.online.OnlineAdapter")
    return adapter


def stream(cfg: DictConfig) -> dict:
    rtda_config.check_values(cfg)
    for key in ("batch_size", "frames"):
        value = cfg.stream.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigValueError(f"stream.{key}={value!r}: expected an integer >= 1")
    window = int(cfg.report.window)
    if window < 1:
        raise ConfigValueError(f"report.window={window}: expected a number of frames >= 1")
    compared = _compared_runs(cfg.report.get("compare") or [])  # read first: a typo fails before the stream runs
    output_dir = check_writable(cfg.paths.output_dir, "the stream's report")
    torch.manual_seed(int(cfg.get("seed") or 0))
    device = _device(cfg)
    paths, module = segmenter_module(cfg)
    module = module.to(device)
    num_classes = int(cfg.data.num_classes)
    reader = hydra.utils.instantiate(cfg.stream.reader)
    adapter = build_adapter(cfg, module.net)
    guard = CollapseGuard(**OmegaConf.to_container(cfg.guard, resolve=True))
    size = list(cfg.stream.size) if cfg.stream.get("size") else None
    batch_size = int(cfg.stream.batch_size)
    video = _VideoOut(output_dir / "stream_overlay.mp4", float(cfg.report.video_fps)) if cfg.report.video else None

    rows, confmats, labelled_rows = [], [], []
    model_seconds, start = 0.0, time.perf_counter()
    n_frames = 0
    total = len(reader) if hasattr(reader, "__len__") else None
    bar = tqdm(total=total, desc=f"stream, adapt={adapter.name}", unit="frame", file=sys.stderr,
               disable=not cfg.report.get("progress", True), dynamic_ncols=True)
    try:
        for batch in iterate_batches(reader, batch_size):
            x = module.normalize(_tensor_batch(batch, size, device))
            with Timer(device) as timer:
                probs, info = adapter.step(x)
            model_seconds += timer.seconds
            first = batch[0]["index"]
            reset = guard.check(probs, info.get("loss"), frame=first)
            if reset:
                adapter.reset()
            stats = CollapseGuard.statistics(probs)
            for j, sample in enumerate(batch):
                row = {"frame": sample["index"], "name": sample["name"], "condition": sample.get("condition", "all"),
                       "intensity": sample.get("intensity", 0.0), "segment": sample.get("segment"),
                       "updated": int(bool(info.get("updated"))), "loss": info.get("loss"),
                       "skipped": info.get("skipped") or "", "reset": int(reset and j == 0),
                       "seconds": round(timer.seconds / len(batch), 6), "confidence": round(stats["confidence"], 4),
                       "entropy": round(stats["entropy"], 4), "top_share": round(stats["top_share"], 4),
                       "mIoU": None, "acc": None}
                label = sample.get("label")
                p = probs[j : j + 1]
                if label is not None or video is not None:
                    full = tuple((label if label is not None else sample["image"]).shape[:2])
                    if tuple(p.shape[-2:]) != full:
                        p = F.interpolate(p, size=full, mode="bilinear", align_corners=False)
                    pred = p.argmax(dim=1)[0]
                if label is not None:
                    cm = confusion(pred, torch.from_numpy(np.ascontiguousarray(label)).to(device), num_classes)
                    confmats.append(cm)
                    labelled_rows.append(row)
                    row["mIoU"] = _nan_to_none(round(miou_of(cm), 5))
                    total = cm.sum()
                    row["acc"] = round(float(np.trace(cm) / total), 5) if total else None
                if video is not None:
                    video.write(overlay(sample["image"], pred.cpu().numpy()))
                rows.append(row)
            n_frames += len(batch)
            bar.update(len(batch))
            bar.set_postfix_str(f"{batch[0].get('condition', '')} {n_frames / max(model_seconds, 1e-9):.1f} fps, "
                                f"resets {guard.resets}", refresh=False)
        bar.close()
        rescored = _rescore_first_segment(cfg, reader, rows, adapter, module, size, batch_size, device, num_classes)
    finally:
        bar.close()
        if video is not None:
            video.close()
    wall = time.perf_counter() - start
    if not rows:
        raise DatasetFormatError("stream: the stream holds no frames")

    results = _report(cfg, paths, output_dir, rows, labelled_rows, confmats, rescored, adapter, guard,
                      n_frames, model_seconds, wall, window)
    results["sources"] = list(getattr(module, "sources", []))  # what trained the checkpoint: rtda-compare groups by it
    if confmats:
        results["IoU"] = class_ious(np.stack(confmats).sum(0), module.class_names)
    _write_csv(output_dir / "frames.csv", rows)
    if cfg.report.figure and results["curve"]:
        curves = {results["label"]: results["curve"]}
        for path, done in compared:
            curves[done.get("label") or done.get("adapt", path.parent.name)] = done.get("curve") or []
        stream_curves(curves, segments_of([r["condition"] for r in labelled_rows], [r["segment"] for r in labelled_rows]),
                      output_dir / "miou_over_time.png", title=results["experiment"], window=window)
        results["figure"] = str(output_dir / "miou_over_time.png")
    if video is not None:
        results["video"] = str(video.path)
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
    print(format_stream_summary(results))
    return results


def _compared_runs(folders) -> list[tuple[Path, dict]]:
    runs = []
    for other in folders:
        path = Path(other)
        path = path / "results.json" if path.is_dir() else path
        try:
            runs.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigValueError(f"report.compare: cannot read {path} (an rtda-stream run folder): {err}") from err
    return runs


def _rescore_first_segment(cfg, reader, rows, adapter, module, size, batch_size, device, num_classes):
    """The first segment's frames predicted again by the final model, without adapting (forgetting)."""
    if not cfg.report.forgetting or not rows or not hasattr(reader, "__getitem__"):
        return None
    end = next((i for i, r in enumerate(rows) if (r["segment"], r["condition"]) != (rows[0]["segment"], rows[0]["condition"])), None)
    if end is None:  # one segment only: nothing came after it
        return None
    first = rows[:end]
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in range(0, len(first), batch_size):
        batch = [reader[r["frame"]] for r in first[i : i + batch_size]]
        if any(s.get("label") is None for s in batch):
            return None
        probs = adapter.predict(module.normalize(_tensor_batch(batch, size, device)))
        for j, sample in enumerate(batch):
            p = probs[j : j + 1]
            full = tuple(sample["label"].shape[:2])
            if tuple(p.shape[-2:]) != full:
                p = F.interpolate(p, size=full, mode="bilinear", align_corners=False)
            total += confusion(p.argmax(1)[0], torch.from_numpy(np.ascontiguousarray(sample["label"])).to(device), num_classes)
    return {"condition": rows[0]["condition"], "frames": len(first), "mIoU": miou_of(total)}


def _report(cfg, paths, output_dir, rows, labelled_rows, confmats, rescored, adapter, guard, n_frames,
            model_seconds, wall, window) -> dict:
    choices = rtda_config.choices()
    name = choices.get("adapt", adapter.name)
    results = {
        "kind": "stream", "status": "completed",
        # the stream's own choices and overrides (rtda-compare: the stream setting beside the checkpoint's run)
        "choices": {k: choices[k] for k in ("stream", "adapt") if k in choices}, "overrides": rtda_config.overrides(),
        "experiment": f"stream={choices.get('stream', '?')} adapt={name} ckpt={Path(paths[0]).parent.parent.name}/{Path(paths[0]).name}",
        "adapt": adapter.name, "label": cfg.report.get("label") or adapter.name,
        "stream": choices.get("stream"), "checkpoint": str(Path(paths[0]).resolve()), "run_dir": str(output_dir.resolve()),
        "frames": n_frames, "labelled_frames": len(labelled_rows), "batch_size": int(cfg.stream.batch_size),
        "size": list(cfg.stream.size) if cfg.stream.get("size") else None,
        "fps": n_frames / model_seconds if model_seconds > 0 else None,
        "fps_end_to_end": n_frames / wall if wall > 0 else None,
        "min_fps": cfg.stream.get("min_fps"),
        "updates": int(adapter.updates), "resets": guard.resets, "reset_frames": guard.reset_frames,
        "adapted_parameters": int(sum(p.numel() for p in adapter.parameters_adapted())),
    }
    if results["min_fps"]:
        results["meets_min_fps"] = bool(results["fps"] and results["fps"] >= float(results["min_fps"]))
    counts = getattr(adapter, "counts", None)
    if counts:
        results["budget"] = dict(counts)
    if confmats:
        cms = np.stack(confmats)
        conditions = [r["condition"] for r in labelled_rows]
        per_condition = {}
        for c in dict.fromkeys(conditions):
            per_condition[c] = _nan_to_none(miou_of(cms[[i for i, k in enumerate(conditions) if k == c]].sum(0)))
        segments = segments_of(conditions, [r["segment"] for r in labelled_rows])
        for seg in segments:
            seg["mIoU"] = _nan_to_none(miou_of(cms[seg["start"] : seg["end"]].sum(0)))
            seg["first_frame"], seg["last_frame"] = labelled_rows[seg["start"]]["frame"], labelled_rows[seg["end"] - 1]["frame"]
        results.update({
            "mIoU": _nan_to_none(miou_of(cms.sum(0))),
            "per_condition": per_condition,
            "harmonic_mean": harmonic_mean(per_condition.values()),
            "per_segment": segments,
            "curve_window": window,
            "curve": [_nan_to_none(round(v, 5)) for v in windowed_miou(cms, window)],
        })
        if rescored is not None:
            online = segments[0]["mIoU"]
            results["forgetting"] = {
                "segment": 0, "condition": rescored["condition"], "frames": rescored["frames"],
                "online_mIoU": online, "final_model_mIoU": _nan_to_none(rescored["mIoU"]),
                "forgetting": (online - rescored["mIoU"]) if online is not None and not math.isnan(rescored["mIoU"]) else None,
            }
            later = [s for s in segments[1:] if s["condition"] == rescored["condition"]]
            if later:
                results["forgetting"]["last_same_condition_mIoU"] = later[-1]["mIoU"]
    else:
        results.update({"mIoU": None, "per_condition": {}, "harmonic_mean": None, "per_segment": [], "curve": []})
    results["mean_confidence"] = float(np.mean([r["confidence"] for r in rows]))
    return results


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def format_stream_summary(results: dict) -> str:
    lines = [f"rtda-stream: {results['experiment']}",
             f"  frames: {results['frames']} ({results['labelled_frames']} labelled), updates: {results['updates']}, "
             f"resets: {results['resets']}",
             f"  fps (model + updates): {results['fps']:.1f}, end to end: {results['fps_end_to_end']:.1f}"
             + (f", min_fps {results['min_fps']}: {'met' if results.get('meets_min_fps') else 'NOT met'}"
                if results.get("min_fps") else "")]
    if results.get("mIoU") is not None:
        lines.append(f"  mIoU over the stream: {_pct(results['mIoU'])}, harmonic mean over conditions: "
                     f"{_pct(results['harmonic_mean'])}")
        lines.append("  per condition: " + ", ".join(f"{c} {_pct(v)}" for c, v in results["per_condition"].items()))
        lines.append("  per segment: " + ", ".join(f"{s['condition']}[{s['first_frame']}-{s['last_frame']}] {_pct(s['mIoU'])}"
                                                  for s in results["per_segment"]))
        fg = results.get("forgetting")
        if fg:
            lines.append(f"  forgetting ({fg['condition']}, first {fg['frames']} frames): online {_pct(fg['online_mIoU'])} -> "
                         f"final model {_pct(fg['final_model_mIoU'])}"
                         + (f" ({100 * fg['forgetting']:+.1f} points)" if fg.get("forgetting") is not None else ""))
    if results.get("budget"):
        lines.append("  budget: " + ", ".join(f"{k} {v}" for k, v in results["budget"].items()))
    lines.append(f"run folder: {results['run_dir']}")
    return "\n".join(lines)
