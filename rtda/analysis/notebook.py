"""What the notebooks (``notebooks/*.ipynb``) look at, found or made: the domain pair, runs, translators, speeds.

Each notebook's parameters cell names a data folder and an outputs folder; these helpers find what is there
(the built-in demo, finished ``rtda-train`` runs, ``rtda-bench`` results) and, when something is missing,
make it the way a user would on the command line (the demo generated, a short ``rtda-train`` run, an
``rtda-bench`` row), so a notebook opened with its defaults shows pictures without a line of code read.
Plots live in :mod:`rtda.analysis.figures`; the run table in :mod:`rtda.analysis.compare`.

A run is chosen by a *spec*: the ``key=value`` tokens of its command line that matter (``"data=demo
adaptation=fda"``). A finished run matches when its setting (:func:`rtda.analysis.compare.load_run`: config-group
choices and value overrides) holds every token; a run made for a spec is trained with exactly those tokens
(plus the notebook's budget overrides).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rtda.adaptation.cyclegan import load_generator
from rtda.adaptation.segmenter import segmenter_module
from rtda.analysis.compare import class_names, class_recovery, load_run, load_runs
from rtda.analysis.front import front_points, models_of, newest_bench_rows, speed_title  # noqa: F401 (the notebooks' names)
from rtda.data.cityscapes import Cityscapes
from rtda.data.demo import ensure_demo
from rtda.data.gta5 import GTA5
from rtda.data.render import spread_index
from rtda.data.stats import cached_class_stats
from rtda.data.transforms import SegmentationTransform
from rtda.run.checkpoints import load_checkpoint
from rtda.run.errors import RtdaError


def resolve(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, absolute (relative paths are relative to the working folder: a notebook's
    own folder when Jupyter runs it)."""
    return Path(path).expanduser().resolve()


# -- data ---------------------------------------------------------------------------------------------------

def demo_root(data_dir: str | Path = "data") -> Path:
    """``data_dir/demo``, the built-in domain pair: generated with the default spec when absent (as
    ``rtda-train`` does, ~20 s); a demo already there, of any spec, is read as it is."""
    demo = resolve(data_dir) / "demo"
    if not (demo / "demo.json").is_file():
        ensure_demo(demo)
    return demo


def source_domain(data_dir: str | Path = "data", root: str | Path | None = None):
    """The labelled source domain: the GTA5 reader of ``root`` (real GTA5: ``data/gta5``), by default the demo's."""
    return GTA5(resolve(root) if root is not None else demo_root(data_dir) / "gta5")


def target_domain(data_dir: str | Path = "data", root: str | Path | None = None, split: str = "val"):
    """The target domain's labelled ``split``: the Cityscapes reader of ``root`` (real Cityscapes:
    ``data/cityscapes``), by default the demo's."""
    return Cityscapes(resolve(root) if root is not None else demo_root(data_dir) / "cityscapes", split=split)


def class_stats(source, target, target_split: str = "train") -> dict:
    """Per-class pixel statistics of the source and of the target's ``target_split`` (what adaptation trains
    on), from :func:`rtda.data.stats.cached_class_stats` (cached next to the data)."""
    return {"source": cached_class_stats("gta5", source.root, "all"),
            "target": cached_class_stats("cityscapes", target.root, target_split)}


# -- runs ---------------------------------------------------------------------------------------------------

def parse_spec(spec: str | Sequence[str]) -> dict:
    """``"data=demo adaptation=fda"`` (or a list of tokens) -> {"data": "demo", "adaptation": "fda"}."""
    tokens = spec.split() if isinstance(spec, str) else list(spec)
    out = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise RtdaError(f"run spec {spec!r}: {token!r} is not key=value")
        out[key.lstrip("+~")] = value
    return out


def matches(run: dict, spec: str | Sequence[str]) -> bool:
    """Whether a run (:func:`rtda.analysis.compare.load_run`) or a summary row (``setting``) holds every token of ``spec``."""
    setting = run["setting"]
    return all(setting.get(k) == v for k, v in parse_spec(spec).items())


def _mtime(run: dict) -> float:
    try:
        return (Path(run["run_dir"]) / "results.json").stat().st_mtime
    except OSError:
        return 0.0


def find_runs(paths, spec: str | Sequence[str] | None = None, scored: bool = True) -> list[dict]:
    """Completed runs under ``paths`` (folders; missing ones skipped) that match ``spec``, newest first;
    ``scored``: only runs with target test scores (a segmenter; CycleGAN's translator has none)."""
    paths = [p for p in ([paths] if isinstance(paths, (str, Path)) else paths) if Path(p).exists()]
    found = []
    for path in paths:
        try:
            found += load_runs([path])
        except RtdaError:  # a folder without results.json
            continue
    runs = [r for r in found if r["status"] == "completed" and (r["mIoU"] is not None or not scored)
            and (spec is None or matches(r, spec))]
    return sorted(runs, key=_mtime, reverse=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "run"


def train(spec: str | Sequence[str], outputs: str | Path, overrides: Sequence[str] = (), name: str | None = None,
          data_dir: str | Path | None = None) -> dict:
    """One ``rtda-train`` run of ``spec`` + ``overrides`` into ``outputs/train/runs/<name>``; returns the finished
    run (:func:`rtda.analysis.compare.load_run`). Its output is kept in ``<run>/notebook.log``; a failure raises with its
    last lines."""
    outputs = resolve(outputs)
    tokens = spec.split() if isinstance(spec, str) else list(spec)
    name = _slug(name or "nb_" + "_".join(tokens))
    args = [*tokens, *overrides, f"paths.log_dir={outputs}", f"run_name={name}"]
    if data_dir is not None:
        args.append(f"paths.data_dir={resolve(data_dir)}")
    print(f"rtda-train {' '.join(args)}", flush=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    proc = subprocess.run([sys.executable, "-m", "rtda.cli.train", *args], cwd=outputs.parent if outputs.parent.is_dir() else None,
                          capture_output=True, text=True, env=env)
    run_dir = outputs / "train" / "runs" / name
    if run_dir.is_dir():
        (run_dir / "notebook.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RtdaError(f"rtda-train {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = re.search(r"^target test mIoU: .*$", proc.stdout, re.M)
    print(f"  -> {run_dir}" + (f" ({summary.group(0)})" if summary else ""), flush=True)
    return load_run(run_dir)


def runs_for(specs: Mapping[str, str], outputs: str | Path = "outputs", overrides: Sequence[str] = (),
             data_dir: str | Path | None = None, seeds: Sequence[int] | None = None, scored: bool = True) -> dict:
    """For each ``label: spec``, the newest finished run matching it under ``outputs``, or (none there) one
    trained now with ``overrides`` (a short budget). With ``seeds``: every finished run of the spec, plus one
    trained now for each of ``seeds`` that none of them has. Returns {label: run} (with ``seeds``: {label: [runs]})."""
    outputs = resolve(outputs)
    out = {}
    for label, spec in specs.items():
        found = find_runs([outputs], spec, scored)
        if seeds:
            have = {r["seed"] for r in found}
            out[label] = found + [train(spec, outputs, [*overrides, f"seed={s}"], f"nb_{label}_seed{s}", data_dir)
                                  for s in seeds if s not in have]
        else:
            out[label] = found[0] if found else train(spec, outputs, overrides, f"nb_{label}", data_dir)
    return out


def checkpoint_of(run: dict) -> Path:
    """The weights a run was tested with (``results.json``'s ``checkpoint``), else its ``last.ckpt``."""
    results = run.get("results") or {}
    for candidate in (results.get("checkpoint"), Path(run["run_dir"]) / "checkpoints" / "last.ckpt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise RtdaError(f"{run['run_dir']}: no checkpoint (results.json names none that exists, no checkpoints/last.ckpt)")


# -- predictions --------------------------------------------------------------------------------------------

def load_segmenter(run_or_checkpoint):
    """A run's (or a checkpoint's) segmentation network as rtda-eval loads it (``weights_only=True``, the
    network rebuilt from the checkpoint's own config, any method): a SegmentationModule in eval mode, and
    the resolution (H, W) its run predicted at (``data.eval_size``)."""
    from omegaconf import OmegaConf

    path = checkpoint_of(run_or_checkpoint) if isinstance(run_or_checkpoint, dict) else resolve(run_or_checkpoint)
    config = load_checkpoint(path)["rtda"]["config"]
    data = config.get("data", {})
    _, module = segmenter_module(OmegaConf.create({"ckpt_path": str(path), "data": {"num_classes": data.get("num_classes", 19)}}))
    size = data.get("eval_size") or data.get("target_size")
    return module.eval(), (tuple(size) if size else None)


def predict(models: Mapping, dataset, n: int = 3) -> list[dict]:
    """Every model's prediction on ``n`` images spread over ``dataset`` (a labelled target split), as rtda-eval
    predicts: resized to the model's ``eval_size``, logits upsampled to the label's full resolution.
    ``models``: {label: (module, eval_size)} from :func:`load_segmenter`. Returns one dict per image:
    ``image``, ``label`` (train ids), ``name``, ``preds`` {label: HxW train ids}."""
    import torch

    samples = []
    for k in range(min(n, len(dataset))):
        raw = dataset.load(spread_index(k, n, len(dataset)))
        preds = {}
        for label, (module, size) in models.items():
            image = SegmentationTransform(size)(raw["image"])["image"][None]
            with torch.no_grad():
                logits = module.predict_logits(module.normalize(image), raw["label"].shape)
            preds[label] = logits.argmax(dim=1)[0].numpy().astype("uint8")
        samples.append({"image": raw["image"], "label": raw["label"], "name": raw["name"], "preds": preds})
    return samples


# -- CycleGAN -----------------------------------------------------------------------------------------------

def cyclegan_generator(outputs: str | Path = "outputs", spec: str = "adaptation=cyclegan", overrides: Sequence[str] = (),
                       data_dir: str | Path | None = None, make: bool = True):
    """The source→target generator of the newest CycleGAN translator run under ``outputs`` (trained now with
    ``overrides`` when there is none and ``make``), loaded by :func:`rtda.adaptation.cyclegan.load_generator`; None
    when there is none to show."""
    runs = find_runs([resolve(outputs)], spec, scored=False)
    runs = [r for r in runs if (Path(r["run_dir"]) / "checkpoints" / "last.ckpt").is_file()]
    if not runs:
        if not make:
            return None
        runs = [train(spec, outputs, overrides, "nb_cyclegan", data_dir)]
    return load_generator(str(Path(runs[0]["run_dir"]) / "checkpoints" / "last.ckpt"), _cpu())


def _cpu():
    import torch

    return torch.device("cpu")


# -- results ------------------------------------------------------------------------------------------------

def select_rows(rows: Sequence[dict], specs: Mapping[str, str]) -> list[dict]:
    """The summary rows (:func:`rtda.analysis.compare.summarize`) that match one of ``specs`` ({label: spec}), in the
    order of ``specs``, each with its ``label`` added (the first matching spec names a row; a second row under
    the same label is told apart by its group)."""
    picked: dict[str, list[dict]] = {label: [] for label in specs}
    for row in rows:
        for label, spec in specs.items():
            if all(row["setting"].get(k) == v for k, v in parse_spec(spec).items()):
                picked[label].append(row)
                break
    out = []
    for label, members in picked.items():
        for i, row in enumerate(members):
            out.append({**row, "label": label if i == 0 else f"{label} ({row['group']})"})
    return out


def recovery(rows: Sequence[dict], oracle: str, source_only: str) -> dict:
    """:func:`rtda.analysis.compare.class_recovery` of the labelled rows (:func:`select_rows`): the drop from the ``oracle`` row
    (trained on the target's labels) to the ``source_only`` row, per class, and what every other row recovers."""
    by_label = {r["label"]: r for r in rows}
    for name in (oracle, source_only):
        if name not in by_label:
            raise RtdaError(f"no finished run for {name!r}: the settings found are {sorted(by_label)}")
    methods = {k: v for k, v in by_label.items() if k not in (oracle, source_only)}
    return class_recovery(by_label[oracle], by_label[source_only], methods, class_names(rows))


def seed_table(rows: Sequence[dict], runs: Sequence[dict]) -> str:
    """Markdown: one line per setting, one column per seed (target test mIoU, %), then mean ± std."""
    by_dir = {r["run_dir"]: r for r in runs}
    seeds = list(dict.fromkeys(s for row in rows for s in row["seeds"]))
    lines = ["| setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for row in rows:
        cells = {}
        for d in row["run_dirs"]:
            run = by_dir.get(d)
            if run is not None and run["mIoU"] is not None:
                cells.setdefault(run["seed"], f"{100 * run['mIoU']:.2f}")
        std = f" ± {row['mIoU_std']:.2f}" if row["mIoU_std"] is not None else ""
        lines.append(f"| {row.get('label', row['group'])} | " + " | ".join(cells.get(s, "") for s in seeds)
                     + f" | {row['mIoU']:.2f}{std} |")
    return "\n".join(lines)


def iou_of(runs: Mapping[str, dict]) -> dict:
    """{label: {"mIoU": %, class: IoU %}} of runs (:func:`rtda.analysis.compare.load_run`): each run's own target test
    (``rtda-train``'s test over the whole split)."""
    return {label: {"mIoU": None if run["mIoU"] is None else 100.0 * run["mIoU"],
                    **{k: (None if v is None else 100.0 * v) for k, v in run["IoU"].items()}}
            for label, run in runs.items()}


def confusion_matrix(run: dict):
    """A run's target test confusion matrix (``results.json``'s ``test/confmat``: rows ground truth)."""
    confmat = run["results"].get("test/confmat")
    if confmat is None:
        raise RtdaError(f"{run['run_dir']}: results.json has no test/confmat")
    return confmat


def bench_rows(paths, models: Sequence[str], size: Sequence[int] = (512, 1024), variant: str = "eager",
               outputs: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """{model: rtda-bench row} of each network: the newest ``bench.json`` row under ``paths`` for that model,
    ``variant`` (``eager``: rtda's inference path) and input ``size`` (H, W)
    (:func:`rtda.analysis.front.newest_bench_rows`, as ``rtda-compare --bench`` reads them; missing folders
    skipped); a model without one is measured now with ``rtda-bench model=<model> bench.height=H
    bench.width=W bench.variants=[variant]`` (+ ``overrides``) into ``outputs/bench``."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found = newest_bench_rows([resolve(p) for p in paths], variant, size, strict=False)
    wanted = f"x{size[0]}x{size[1]}"
    for model in models:
        if model in found:
            continue
        if outputs is None:
            raise RtdaError(f"no rtda-bench result for model={model} at {size[0]}x{size[1]} ({variant}) under {paths}")
        args = [f"model={model}", f"bench.height={size[0]}", f"bench.width={size[1]}", f"bench.variants=[{variant}]",
                f"paths.log_dir={resolve(outputs)}", f"hydra.run.dir={resolve(outputs) / 'bench' / 'runs' / _slug('nb_' + model + wanted)}",
                *overrides]
        print(f"rtda-bench {' '.join(args)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "rtda.cli.bench", *args], capture_output=True, text=True,
                              env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        if proc.returncode != 0:
            raise RtdaError(f"rtda-bench {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        made = resolve(outputs) / "bench" / "runs" / _slug("nb_" + model + wanted) / "bench.json"
        row = next(r for r in json.loads(made.read_text()) if r.get("variant") == variant)
        print(f"  -> {row['fps']:.1f} FPS ({row['median_ms']:.1f} ms) on {row['machine']['device']}", flush=True)
        found[model] = row
    return {m: found[m] for m in models}


def speed_points(rows: Sequence[dict], speeds: Mapping[str, dict], default_model: str | None = None) -> list[dict]:
    """The points of :func:`rtda.analysis.figures.accuracy_vs_fps`: each summary row's mIoU ± std at its network's FPS
    (``speeds``: :func:`bench_rows`), method and Pareto-front flag included (:func:`rtda.analysis.front.front_points`)."""
    return front_points(rows, speeds, default_model)
