"""Colourised labels and predictions, side-by-side panels, and the figures of the notebooks.

Figures (:func:`domain_samples`, :func:`class_frequencies`, :func:`plot_image_statistics`, :func:`fda_examples`,
:func:`translation_examples`, :func:`prediction_grid`, :func:`error_grid`, :func:`iou_bars`,
:func:`confusion_matrix_figure`, :func:`miou_bars`, :func:`recovery_bars`, :func:`accuracy_vs_fps`) are built
without pyplot: a notebook shows each once, a script saves it with ``path=``.
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image

from rtda.adaptation.fda import fda_source_to_target
from rtda.analysis.front import pareto_front
from rtda.data.labels import TRAIN_ID_PALETTE
from rtda.data.render import colorize, resize_image, spread_index, to_rgb
from rtda.models.cyclegan import translate_image

# ---------------------------------------------------------------------------------------------------------
# Figures for the notebooks (notebooks/*.ipynb). Each returns a matplotlib Figure built without pyplot (no
# global state, no backend switch: a notebook shows it once, a script saves it) and saves a PNG when ``path``
# is given. The numbers each draws come in as arguments, so tests check what is drawn.
# ---------------------------------------------------------------------------------------------------------

#: colours of the groups in bar charts and scatter plots (matplotlib's tab10)
GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
#: error-map colours: correct, wrong, ignored (label 255)
ERROR_COLOURS = {"correct": (235, 235, 235), "wrong": (220, 30, 30), "ignored": (0, 0, 0)}
#: gain-map colours (a method against a baseline, pixel by pixel)
GAIN_COLOURS = {"both right": (235, 235, 235), "fixed": (40, 170, 60), "broken": (220, 30, 30),
                "both wrong": (120, 120, 120), "ignored": (0, 0, 0)}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _done(fig, path=None, dpi: int = 100):
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _legend_patches(colours: dict):
    from matplotlib.patches import Patch

    return [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="0.5", label=name) for name, c in colours.items()]


def image_grid(rows, titles=None, row_labels=None, path=None, cell_width: float = 2.6, legend=None):
    """Images (HxWx3 uint8, or HxW train ids, colourised) in a grid: ``rows`` is a list of rows of images,
    ``titles`` one per column, ``row_labels`` one per row; ``legend`` a {name: RGB} dict shown below."""
    rows = [list(r) for r in rows]
    ncols = max(len(r) for r in rows)
    aspect = max(np.asarray(im).shape[0] / np.asarray(im).shape[1] for r in rows for im in r)
    fig = _figure(cell_width * ncols, cell_width * aspect * len(rows) + 0.4 + (0.4 if legend else 0))
    axes = np.atleast_2d(fig.subplots(len(rows), ncols, squeeze=False))
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.set_axis_off()
                continue
            image = np.asarray(row[j])
            ax.imshow(colorize(image) if image.ndim == 2 else image, interpolation="nearest")
            if i == 0 and titles:
                ax.set_title(titles[j], fontsize=9)
            if j == 0 and row_labels:
                ax.set_ylabel("\n".join(textwrap.wrap(str(row_labels[i]), 16)), fontsize=7)
    if legend:
        fig.legend(handles=_legend_patches(legend), loc="outside lower center", ncol=min(len(legend), 6), fontsize=8)
    return _done(fig, path)


def class_legend(class_names, path=None):
    """The Cityscapes colour of every train class, as a strip (the key to every colourised label)."""
    return _done(_legend_figure({n: TRAIN_ID_PALETTE[i] for i, n in enumerate(class_names)}), path)


def _legend_figure(colours: dict):
    fig = _figure(10, 0.8)
    ax = fig.subplots()  # an axes to hold the legend: a figure without axes is not drawn by notebooks
    ax.set_axis_off()
    ax.legend(handles=_legend_patches(colours), loc="center", ncol=(len(colours) + 1) // 2, fontsize=8, frameon=False)
    return fig


def domain_samples(source, target, n: int = 3, path=None):
    """``n`` samples of each domain with their colourised labels: source image | source label | target image |
    target label (datasets with ``load(i)`` -> {"image", "label"}, as rtda's GTA5 and Cityscapes readers)."""
    rows = []
    for k in range(n):
        s = source.load(spread_index(k, n, len(source)))
        t = target.load(spread_index(k, n, len(target)))
        rows.append([s["image"], s["label"], t["image"], t["label"]])
    return image_grid(rows, ["source", "source labels", "target", "target labels"], path=path)


def class_frequencies(stats: dict, class_names, path=None, log: bool = True):
    """Per-class pixel frequency (%) of each domain, grouped bars: ``stats`` maps a domain name to the
    :func:`rtda.data.stats.class_stats` dict of its split (``frequency`` by class name)."""
    names = list(class_names)
    x = np.arange(len(names))
    width = 0.8 / max(len(stats), 1)
    fig = _figure(11, 4)
    ax = fig.subplots()
    for i, (domain, st) in enumerate(stats.items()):
        heights = [100.0 * st["frequency"].get(n, 0.0) for n in names]
        ax.bar(x + (i - (len(stats) - 1) / 2) * width, heights, width, label=f"{domain} ({st['images']} images)",
               color=GROUP_COLOURS[i % len(GROUP_COLOURS)])
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("share of labelled pixels (%)")
    if log:
        ax.set_yscale("log")
    ax.set_title("class distribution per domain")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _done(fig, path)


def image_statistics(dataset, n: int | None = 50, size: tuple[int, int] = (128, 256), bins: int = 32) -> dict:
    """Colour and spectrum statistics of ``n`` images spread over ``dataset`` (all when None), each resized to
    ``size`` for the spectrum: ``mean_rgb`` (3, 0-255), ``brightness`` (a normalised histogram of the pixels'
    luma over ``bins`` bins of 0-255), ``frequency`` (cycles per pixel, radial bins) and ``amplitude``
    (the mean log-amplitude of the grey image's centred 2-D spectrum in each radial bin), ``log_amplitude``
    (the mean 2-D log-amplitude, centred) and ``images``."""
    from PIL import Image

    count = len(dataset) if n is None else min(n, len(dataset))
    rgb_sum = np.zeros(3)
    pixels = 0
    hist = np.zeros(bins)
    spectrum = np.zeros(size)
    for k in range(count):
        image = dataset.load(spread_index(k, count, len(dataset)))["image"]
        flat = image.reshape(-1, 3).astype(np.float64)
        rgb_sum += flat.sum(0)
        pixels += len(flat)
        luma = flat @ np.array([0.299, 0.587, 0.114])
        hist += np.histogram(luma, bins=bins, range=(0, 255))[0]
        grey = np.asarray(Image.fromarray(image).convert("L").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float64)
        spectrum += np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(grey))))
    spectrum /= max(count, 1)
    fy = np.fft.fftshift(np.fft.fftfreq(size[0]))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(size[1]))[None, :]
    radius = np.sqrt(fy ** 2 + fx ** 2)
    edges = np.linspace(0, 0.5, bins + 1)
    which = np.digitize(radius, edges) - 1
    inside = (which >= 0) & (which < bins)
    sums = np.bincount(which[inside], weights=spectrum[inside], minlength=bins)
    counts = np.bincount(which[inside], minlength=bins)
    return {
        "images": count,
        "mean_rgb": rgb_sum / max(pixels, 1),
        "brightness_edges": np.linspace(0, 255, bins + 1),
        "brightness": hist / max(hist.sum(), 1),
        "frequency": (edges[:-1] + edges[1:]) / 2,
        "amplitude": sums / np.maximum(counts, 1),
        "log_amplitude": spectrum,
    }


def plot_image_statistics(stats: dict, path=None):
    """Per domain (``stats``: name -> :func:`image_statistics`): mean colour (bars in R, G, B, with a swatch),
    brightness histogram, radially averaged amplitude spectrum, and the difference of the mean 2-D
    log-amplitude spectra of the first two domains (where their spectra differ: what FDA swaps)."""
    domains = list(stats)
    fig = _figure(14, 3.4)
    axes = fig.subplots(1, 4 if len(domains) >= 2 else 3)
    ax = axes[0]
    width = 0.8 / len(domains)
    for i, d in enumerate(domains):
        rgb = stats[d]["mean_rgb"]
        ax.bar(np.arange(3) + (i - (len(domains) - 1) / 2) * width, rgb, width, label=d,
               color=np.clip(rgb / 255.0, 0, 1), edgecolor=GROUP_COLOURS[i % len(GROUP_COLOURS)], linewidth=2)
    ax.set_xticks(range(3), ["R", "G", "B"])
    ax.set_ylim(0, 255)
    ax.set_title("mean colour (bar colour = the mean)", fontsize=9)
    ax.legend(fontsize="small")
    ax = axes[1]
    for i, d in enumerate(domains):
        edges = stats[d]["brightness_edges"]
        ax.plot((edges[:-1] + edges[1:]) / 2, 100 * stats[d]["brightness"], label=d, color=GROUP_COLOURS[i % len(GROUP_COLOURS)])
    ax.set_xlabel("brightness (luma, 0-255)")
    ax.set_ylabel("pixels (%)")
    ax.set_title("brightness histogram", fontsize=9)
    ax = axes[2]
    for i, d in enumerate(domains):
        ax.plot(stats[d]["frequency"], stats[d]["amplitude"], label=d, color=GROUP_COLOURS[i % len(GROUP_COLOURS)])
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("mean log amplitude")
    ax.set_title("amplitude spectrum (radial mean)", fontsize=9)
    if len(domains) >= 2:
        ax = axes[3]
        diff = stats[domains[1]]["log_amplitude"] - stats[domains[0]]["log_amplitude"]
        lim = float(np.abs(diff).max()) or 1.0
        im = ax.imshow(diff, cmap="coolwarm", vmin=-lim, vmax=lim, extent=(-0.5, 0.5, 0.5, -0.5))
        ax.set_title(f"log amplitude: {domains[1]} - {domains[0]}", fontsize=9)
        ax.set_xlabel("horizontal frequency")
        ax.set_ylabel("vertical frequency")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _done(fig, path)


def fda_stylise(source: np.ndarray, target: np.ndarray, betas) -> list[np.ndarray]:
    """The source image (HxWx3 uint8) in the target image's low-frequency amplitude, one per β, by
    :func:`rtda.adaptation.fda.fda_source_to_target` (the target is first resized to the source's size:
    FDA swaps spectra of equal sizes)."""
    if target.shape[:2] != source.shape[:2]:
        target = np.asarray(Image.fromarray(target).resize((source.shape[1], source.shape[0]), Image.BILINEAR))
    src = torch.from_numpy(np.ascontiguousarray(source.transpose(2, 0, 1)))[None].float()
    trg = torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1)))[None].float()
    return [to_rgb(fda_source_to_target(src, trg, float(beta))[0]) for beta in betas]


def fda_examples(source, target, betas=(0.01, 0.05, 0.09), n: int = 2, path=None):
    """What FDA does: each row a source image, the target image whose style it takes, and the source in that
    style for each β (the side of the swapped low-frequency window is β·min(H, W))."""
    rows, labels = [], []
    for k in range(n):
        s = source.load(spread_index(k, n, len(source)))
        t = target.load(spread_index(n - 1 - k, n, len(target)))
        rows.append([s["image"], t["image"], *fda_stylise(s["image"], t["image"], betas)])
        labels.append(s["name"])
    return image_grid(rows, ["source", "target (style)", *(f"FDA β={b}" for b in betas)], labels, path)


def translation_examples(generator, source, n: int = 3, size: tuple[int, int] | None = None, path=None):
    """A CycleGAN translator's work: source image | the same image translated to the target domain
    (``generator``: :func:`rtda.pipelines.translate.load_generator`), at ``size`` (H, W) when given."""
    rows, labels = [], []
    device = next(generator.parameters()).device
    for k in range(n):
        s = source.load(spread_index(k, n, len(source)))
        image = resize_image(s["image"], size) if size is not None else s["image"]
        batch = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)
        rows.append([image, translate_image(generator, batch)[0].permute(1, 2, 0).cpu().numpy()])
        labels.append(s["name"])
    return image_grid(rows, ["source", "CycleGAN: source → target"], labels, path, cell_width=3.5)


def error_map(label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """HxWx3: correct pixels light grey, wrong ones red, ignored (255) ones black."""
    label, pred = np.asarray(label), np.asarray(pred)
    out = np.empty((*label.shape, 3), dtype=np.uint8)
    out[:] = ERROR_COLOURS["wrong"]
    out[label == pred] = ERROR_COLOURS["correct"]
    out[label == 255] = ERROR_COLOURS["ignored"]
    return out


def gain_map(label: np.ndarray, baseline: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """HxWx3, ``pred`` against ``baseline`` pixel by pixel: fixed (green: baseline wrong, pred right), broken
    (red), both right (light grey), both wrong (dark grey), ignored (black)."""
    label = np.asarray(label)
    base_ok, pred_ok = np.asarray(baseline) == label, np.asarray(pred) == label
    out = np.empty((*label.shape, 3), dtype=np.uint8)
    out[:] = GAIN_COLOURS["both wrong"]
    out[base_ok & pred_ok] = GAIN_COLOURS["both right"]
    out[~base_ok & pred_ok] = GAIN_COLOURS["fixed"]
    out[base_ok & ~pred_ok] = GAIN_COLOURS["broken"]
    out[label == 255] = GAIN_COLOURS["ignored"]
    return out


def prediction_grid(samples, path=None):
    """Each row one target image: image | ground truth | every method's prediction. ``samples``: a list of
    ``{"image", "label", "name", "preds": {method: HxW train ids}}`` (:func:`rtda.analysis.notebook.predict`)."""
    methods = list(samples[0]["preds"])
    rows = [[s["image"], s["label"], *(s["preds"][m] for m in methods)] for s in samples]
    return image_grid(rows, ["target image", "ground truth", *methods], [s["name"] for s in samples], path)


def error_grid(samples, baseline: str | None = None, path=None):
    """Each row one target image: every method's errors (red), then, for each other method, where it fixes
    (green) and breaks (red) the ``baseline`` method's prediction (default: the first method)."""
    methods = list(samples[0]["preds"])
    baseline = baseline or methods[0]
    others = [m for m in methods if m != baseline]
    rows, titles = [], ["target image", *(f"errors: {m}" for m in methods), *(f"{m} vs {baseline}" for m in others)]
    for s in samples:
        row = [s["image"], *(error_map(s["label"], s["preds"][m]) for m in methods)]
        row += [gain_map(s["label"], s["preds"][baseline], s["preds"][m]) for m in others]
        rows.append(row)
    legend = {"correct": ERROR_COLOURS["correct"], "wrong / broken": ERROR_COLOURS["wrong"],
              "fixed": GAIN_COLOURS["fixed"], "both wrong": GAIN_COLOURS["both wrong"], "ignored": ERROR_COLOURS["ignored"]}
    return image_grid(rows, titles, [s["name"] for s in samples], path, legend=legend)


def _nan(v):
    return np.nan if v is None else float(v)


def iou_bars(ious: dict, class_names, errors: dict | None = None, path=None, title: str | None = None):
    """Grouped bars of per-class IoU (%) with the mIoU first: ``ious`` maps a method to {class: IoU in %}
    (None or NaN: absent, no bar); ``errors`` the same shape for error bars (std over runs)."""
    names = list(class_names)
    x = np.arange(len(names) + 1)
    width = 0.8 / max(len(ious), 1)
    fig = _figure(max(11, 0.5 * len(x) * max(1, len(ious) ** 0.5)), 4.2)
    ax = fig.subplots()
    for i, (method, values) in enumerate(ious.items()):
        per_class = [_nan(values.get(n)) for n in names]
        heights = [float(np.nanmean(per_class)) if not np.isnan(per_class).all() else np.nan, *per_class]
        if "mIoU" in values:
            heights[0] = _nan(values["mIoU"])
        yerr = None
        if errors and method in errors:
            e = errors[method]
            yerr = [0.0 if e.get(k) is None else float(e[k]) for k in ["mIoU", *names]]
        ax.bar(x + (i - (len(ious) - 1) / 2) * width, heights, width, yerr=yerr, capsize=2, label=method,
               color=GROUP_COLOURS[i % len(GROUP_COLOURS)])
    ax.set_xticks(x, ["mIoU", *names], rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "target IoU per class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")
    return _done(fig, path)


def confusion_matrix_figure(confmat, class_names, path=None, title: str | None = None):
    """Row-normalised confusion matrix (rows: ground truth), per-class recall (%) on the diagonal."""
    cm = torch.as_tensor(confmat).double()
    norm = (cm / cm.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    n = len(class_names)
    fig = _figure(0.45 * n + 2, 0.45 * n + 1.5)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if title:
        ax.set_title(title)
    for i in range(n):
        if cm[i].sum() > 0:
            ax.text(i, i, f"{100 * norm[i, i]:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if norm[i, i] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _done(fig, path)


def miou_bars(rows, runs=(), path=None):
    """Target mIoU (%) per group of :func:`rtda.analysis.compare.summarize`: the mean over seeds as a bar, ± the std as
    an error bar, each seed's run as a dot (``runs``: :func:`rtda.analysis.compare.load_runs`); a row's ``label`` (else
    its ``group``) names it."""
    fig = _figure(max(5, 1.3 * len(rows) + 2), 4)
    ax = fig.subplots()
    by_dir = {r["run_dir"]: r for r in runs}
    for i, row in enumerate(rows):
        colour = GROUP_COLOURS[i % len(GROUP_COLOURS)]
        ax.bar(i, _nan(row["mIoU"]), 0.6, yerr=row["mIoU_std"] or 0.0, capsize=4, color=colour, alpha=0.8)
        seeds = [100.0 * by_dir[d]["mIoU"] for d in row["run_dirs"] if d in by_dir and by_dir[d]["mIoU"] is not None]
        ax.scatter([i] * len(seeds), seeds, color="black", s=12, zorder=3, label="one run (seed)" if i == 0 and seeds else None)
        text = f"{row['mIoU']:.1f}" + (f" ± {row['mIoU_std']:.1f}" if row["mIoU_std"] is not None else "")
        ax.annotate(text, (i, _nan(row["mIoU"]) + (row["mIoU_std"] or 0.0)), xytext=(0, 4), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), [r.get("label", r["group"]) for r in rows], rotation=20, ha="right")
    ax.set_ylabel("target test mIoU (%)")
    ax.set_title("mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    if runs:
        ax.legend(fontsize="small")
    return _done(fig, path)


def recovery_bars(rec: dict, path=None):
    """The synthetic-to-real drop per class (grey: target-trained − source-only IoU) and what each method
    recovers of it (coloured: method − source-only; below zero it loses), from :func:`recovery`."""
    names = rec["classes"]
    x = np.arange(len(names))
    n = 1 + len(rec["recovered"])
    width = 0.8 / n
    fig = _figure(max(11, 0.5 * len(names) * n ** 0.5), 4.2)
    ax = fig.subplots()
    ax.bar(x - (n - 1) / 2 * width, [_nan(v) for v in rec["drop"]], width, color="0.6",
           label=f"drop: target-trained − source-only (mIoU {rec['mIoU_drop']:.1f})")
    for i, (m, values) in enumerate(rec["recovered"].items(), start=1):
        ax.bar(x + (i - (n - 1) / 2) * width, [_nan(v) for v in values], width, color=GROUP_COLOURS[(i - 1) % len(GROUP_COLOURS)],
               label=f"recovered by {m} (mIoU {rec['mIoU_recovered'][m]:+.1f})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("IoU points (%)")
    ax.set_title("per-class drop from the target-trained model to source-only, and what each method recovers")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _done(fig, path)


def accuracy_vs_fps(points, real_time_fps: float | None = 30.0, path=None, title: str | None = None,
                    front: bool = False):
    """The real-time trade-off: one point per setting at (FPS of its network, target mIoU ± std). ``points``:
    dicts with ``label``, ``fps``, ``mIoU``, optional ``mIoU_std``, ``model`` and ``method``
    (:func:`rtda.analysis.front.front_points`); a dashed line marks ``real_time_fps``. One marker shape per
    network; one colour per method when the points name their methods, else per point. Settings sharing a
    network share its FPS: adaptation costs nothing at inference. ``front``: the Pareto front (the points'
    ``on_front``, else :func:`rtda.analysis.front.pareto_front`) drawn as a step line through its points."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    models = list(dict.fromkeys(p.get("model", "") for p in points))
    by_method = bool(points) and all("method" in p for p in points)
    methods = list(dict.fromkeys(p["method"] for p in points)) if by_method else []
    markers = "osD^vP*X"
    for i, p in enumerate(points):
        colour = GROUP_COLOURS[(methods.index(p["method"]) if by_method else i) % len(GROUP_COLOURS)]
        ax.errorbar(p["fps"], p["mIoU"], yerr=p.get("mIoU_std") or 0.0, fmt=markers[models.index(p.get("model", "")) % len(markers)],
                    color=colour, capsize=3, markersize=8, zorder=3,
                    label=p["label"] + (f" [{p['model']}]" if p.get("model") else ""))
    if front and points:
        flags = [p["on_front"] for p in points] if all("on_front" in p for p in points) else pareto_front(points)
        best = sorted((p for p, on in zip(points, flags) if on), key=lambda p: (p["fps"], -p["mIoU"]))
        # the best mIoU reachable at each speed or faster: down at each front point, flat to the next one
        ax.step([p["fps"] for p in best], [p["mIoU"] for p in best], where="pre", color="0.35", linewidth=1.3,
                zorder=2, label="Pareto front")
    if real_time_fps:
        ax.axvline(real_time_fps, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"{real_time_fps:g} FPS", (real_time_fps, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=8, ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("frames per second (log)")
    ax.set_ylabel("target test mIoU (%)")
    ax.set_title(title or "accuracy vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _done(fig, path)
