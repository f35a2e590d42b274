"""The figure of ``rtda-stream``: mIoU over the stream (a windowed curve), one line per method, the conditions
shaded; and the windowed mIoU itself, from per-frame confusion matrices."""

from __future__ import annotations

import numpy as np

from rtda.analysis.figures import GROUP_COLOURS, _done, _figure

#: shading of the conditions (clear: none)
CONDITION_COLOURS = {"clear": None, "fog": "#b0b0b0", "rain": "#7fa7d9", "night": "#3b3b6d", "snow": "#dde8f0"}


def miou_of(confmat: np.ndarray) -> float:
    """mIoU (in [0, 1]) of a confusion matrix (rows: truth), classes absent from truth and prediction left out."""
    cm = np.asarray(confmat, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    valid = union > 0
    return float((tp[valid] / union[valid]).mean()) if valid.any() else float("nan")


def class_ious(confmat: np.ndarray, names) -> dict:
    """IoU per class (in [0, 1]; None for a class absent from truth and prediction) of a confusion matrix."""
    cm = np.asarray(confmat, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    return {n: (float(tp[i] / union[i]) if union[i] > 0 else None) for i, n in enumerate(names)}


def windowed_miou(confmats: np.ndarray, window: int) -> list[float]:
    """mIoU (in [0, 1]) of the frames ``[i − window + 1, i]`` for each frame ``i`` (confusion matrices summed): a curve
    over time that a single frame's few classes do not make jumpy."""
    confmats = np.asarray(confmats)
    csum = np.concatenate([np.zeros_like(confmats[:1]), np.cumsum(confmats, axis=0)])
    return [miou_of(csum[i + 1] - csum[max(0, i + 1 - window)]) for i in range(len(confmats))]


def segments_of(conditions: list[str], segment_ids: list | None = None) -> list[dict]:
    """Runs of consecutive frames of one condition (or one schedule segment): ``{"condition", "start", "end"}``
    (``end`` exclusive)."""
    keys = [(c, s) for c, s in zip(conditions, segment_ids or [None] * len(conditions))]
    runs = []
    for i, key in enumerate(keys):
        if runs and runs[-1]["key"] == key:
            runs[-1]["end"] = i + 1
        else:
            runs.append({"key": key, "condition": key[0], "start": i, "end": i + 1})
    return [{k: v for k, v in r.items() if k != "key"} for r in runs]


def stream_curves(curves: dict, segments: list[dict], path=None, title: str | None = None, window: int | None = None):
    """``curves``: method -> windowed mIoU (in [0, 1]) per frame, drawn in %; ``segments``: the conditions to shade."""
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot()
    for seg in segments:
        colour = CONDITION_COLOURS.get(seg["condition"], "#e0c080")
        if colour:
            ax.axvspan(seg["start"] - 0.5, seg["end"] - 0.5, color=colour, alpha=0.25, lw=0)
        ax.text((seg["start"] + seg["end"] - 1) / 2, 1.0, seg["condition"], transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8)
    for i, (name, values) in enumerate(curves.items()):
        ax.plot(np.arange(len(values)), 100.0 * np.asarray(values, dtype=float), color=GROUP_COLOURS[i % len(GROUP_COLOURS)], lw=1.4, label=name)
    ax.set_xlabel("frame")
    ax.set_ylabel("mIoU (%)" + (f", window of {window} frames" if window else ""))
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9, pad=14)
    return _done(fig, path)
