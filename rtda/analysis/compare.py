"""``rtda-compare PATH…``: gather the runs under run or sweep folders into one table (and plot) of target
mIoU and per-class IoU, seeds averaged.

    rtda-compare outputs/train/multiruns/2026-11-28_10-00-00-000000      # one sweep
    rtda-compare outputs/train/multiruns/A outputs/train/multiruns/B      # several sweeps and runs together
    rtda-compare SWEEP --out report/ --ignore trainer.max_steps           # merge runs that differ only in that key

Every ``results.json`` written by ``rtda-train`` under the given folders is one run. Runs are grouped by what
made them — their config-group choices (``adaptation=advent``, ``model=…``) and value overrides
(``optimizer.lr=…``) — minus the seed and the keys that do not change the experiment (paths, loggers,
Hydra's own settings, ``ckpt_path``, ``run_name``, ``data.num_workers``). Each group gives one row: its
number of runs and their seeds, the mean ± standard deviation (across runs, ``ddof=1``) of the target test
mIoU in %, and the mean IoU of every class in %. A class that is NaN in a run (absent from both ground
truth and prediction) is left out of that class's mean, as in the Cityscapes benchmark. Failed,
interrupted and still-running jobs are listed apart and never averaged.

An ``rtda-stream`` run folder is a run as well: grouped by the setting of the run that trained its checkpoint
(the seed is that run's) plus the stream's (``stream=demo adapt=tent``, its overrides), scored by the mIoU over
the stream with one column per condition, the harmonic mean over conditions, frames/s, forgetting and resets::

    rtda-stream -m ckpt_path=A/checkpoints/last.ckpt,B/…,C/… adapt=none,bn,tent
    rtda-compare outputs/stream/multiruns/<stamp>        # one row per training setting × adapt, 3 seeds each

Writes ``comparison.csv``, ``comparison.md`` and ``comparison_per_class.png`` (grouped bars, std as error
bars) into ``--out`` (default: the single folder given, else ``./comparison``). W&B is not needed.

With ``--bench PATH…`` (rtda-bench output folders), also the accuracy–speed front (:mod:`rtda.analysis.front`):
each group's target mIoU at its network's FPS (the newest ``--variant`` row at ``--size``), ``front.csv`` (model,
method, group, runs, seeds, mIoU, mIoU_std, fps, latency_ms, on_front) and ``front.png`` (one marker per network,
one colour per method, std error bars, the Pareto front as a step line, 30 FPS dashed)::

    rtda-compare outputs/train/multiruns/<stamp> --bench outputs/bench

The Python API is what the notebooks use::

    from rtda.analysis.compare import load_runs, summarize, plot_per_class
    runs = load_runs(["outputs/train/multiruns/…"])
    rows = summarize(runs)                  # list of dicts; pandas.DataFrame(rows) for a frame
    plot_per_class(rows, "per_class.png")
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from rtda.analysis.figures import accuracy_vs_fps, iou_bars
from rtda.analysis.front import (
    DEFAULT_SIZE,
    DEFAULT_VARIANT,
    bench_command,
    front_points,
    front_text,
    missing_models,
    newest_bench_rows,
    size_text,
    speed_title,
    write_front_csv,
)
from rtda.run.errors import RtdaError
from rtda.run.files import atomic_write_text, check_writable
from rtda.run.results import NOT_EXPERIMENT_KEYS as NOT_RUN_KEYS
from rtda.run.results import is_experiment_key, subset_mious

#: override keys (and prefixes, ending in ".") that do not change what a run measures: never grouped on
NOT_EXPERIMENT_KEYS = ("seed", *NOT_RUN_KEYS)
#: config groups whose choice does not change what a run measures
NOT_EXPERIMENT_GROUPS = ("paths", "logger", "callbacks", "hydra", "debug")
#: the groups shown first in a label, in this order
GROUP_ORDER = ("experiment", "data", "model", "augmentation", "adaptation", "optimizer", "trainer")


def _ignored(key: str, extra: Sequence[str] = ()) -> bool:
    """Not grouped on: the keys that do not change what a run measures, the seed, and ``--ignore`` keys."""
    return not is_experiment_key(key, ("seed", *extra))


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def _natural(path: Path) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` at or under ``paths`` (a run folder, a sweep folder, a results.json), each once."""
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise RtdaError(f"{path}: no such file or folder")
        if path.is_file():
            if path.name != "results.json":
                raise RtdaError(f"{path}: expected a run or sweep folder, or a results.json")
            files = [path]
        else:
            files = sorted((p for p in path.rglob("results.json") if "wandb" not in p.parts), key=_natural)
            if not files:
                raise RtdaError(f"{path}: no results.json under this folder (expected an rtda-train run or sweep folder)")
        for f in files:
            found.setdefault(f.resolve(), None)
    return list(found)


def _seed(results: dict, run_dir: Path):
    if "seed" in results:
        return results["seed"]
    for text in results.get("overrides") or []:
        key, value = _split_override(text)
        if key == "seed":
            return None if value in ("null", "None") else _number(value)
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.load(config).get("seed")
    return None


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def load_run(path: str | Path, ignore: Sequence[str] = ()) -> dict:
    """One run from its ``results.json`` (or its folder): status, seed, the setting that groups it, scores.

    Returns a dict with ``run_dir``, ``status`` (``completed`` / ``failed`` / ``running``: a job killed hard
    or still running), ``seed``, ``setting`` (``{"adaptation": "advent", "optimizer.lr": "0.01", …}``: the
    choices and value overrides that define the experiment, seed and ``ignore`` keys left out), ``mIoU``
    (target test mIoU as a fraction, or None), ``IoU`` (class -> fraction or None), ``best_val_mIoU``,
    ``error`` and ``results`` (the whole file).
    """
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise RtdaError(f"{file}: no such file") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RtdaError(f"{file}: not a readable results.json ({err})") from err
    if not isinstance(results, dict):
        raise RtdaError(f"{file}: not an rtda results.json (expected a JSON object)")
    run_dir = file.parent
    if results.get("kind") == "stream" or ("adapt" in results and "per_condition" in results):  # rtda-stream's
        return _stream_run(results, run_dir, ignore)
    test = results.get("test") or {}
    status = results.get("status") or ("completed" if test else "unknown")
    return {
        "run_dir": str(run_dir),
        "status": status,
        "seed": _seed(results, run_dir),
        "setting": _setting(results.get("choices") or {}, results.get("overrides") or [], ignore),
        "mIoU": test.get("mIoU"),
        "subsets": subset_mious(test),  # mIoU16 / mIoU13 of a SYNTHIA run (data.eval_classes)
        "groups": {g: (v or {}).get("mIoU") for g, v in (test.get("groups") or {}).items()},  # ACDC: per condition
        "IoU": dict(test.get("IoU") or {}),
        "best_val_mIoU": results.get("best_val_mIoU"),
        "error": results.get("error"),
        "results": results,
    }


def _setting(choices: dict, overrides: Sequence[str], ignore: Sequence[str] = (), not_experiment: Sequence[str] = ()) -> dict:
    """The config-group choices and value overrides that define an experiment (seed, ``ignore`` and
    :data:`NOT_EXPERIMENT_KEYS` left out)."""
    skip = (*ignore, *not_experiment)
    setting = {k: str(v) for k, v in choices.items()
               if k.split("/")[0] not in NOT_EXPERIMENT_GROUPS and not _ignored(k, skip)}
    for text in overrides:
        key, value = _split_override(text)
        if key in choices or _ignored(key, skip):  # a group choice: already in `setting` as chosen
            continue
        setting[key] = value
    return setting


#: rtda-stream keys that do not change what a stream run measures (its figure, video, progress bar)
NOT_STREAM_KEYS = ("report.",)
#: the stream figures summarised beside mIoU: harmonic mean over conditions, frames/s, forgetting, resets
STREAM_FIELDS = ("harmonic_mean", "fps", "forgetting", "resets")


def _stream_run(results: dict, run_dir: Path, ignore: Sequence[str]) -> dict:
    """An ``rtda-stream`` run: grouped by the setting of the run that trained its checkpoint (its seed the
    checkpoint's) plus the stream's own (``stream``, ``adapt`` and their overrides); scored by the mIoU over the
    stream, one column per condition, with the harmonic mean, frames/s, forgetting and resets beside it. An
    ensemble of checkpoints is grouped by its first member's setting plus ``ensemble=<n>``, with no seed."""
    sources = results.get("sources") or []
    setting = _setting(sources[0].get("choices") or {}, sources[0].get("overrides") or [], ignore) if sources else {}
    if len(sources) > 1:
        setting["ensemble"] = str(len(sources))
    setting.update(_setting(results.get("choices") or {}, results.get("overrides") or [], ignore, NOT_STREAM_KEYS))
    forgetting = results.get("forgetting") or {}
    return {
        "run_dir": str(run_dir),
        "status": results.get("status", "completed"),
        "seed": sources[0].get("seed") if len(sources) == 1 else None,
        "setting": setting,
        "mIoU": results.get("mIoU"),
        "subsets": {},
        "groups": dict(results.get("per_condition") or {}),
        "IoU": dict(results.get("IoU") or {}),
        "best_val_mIoU": None,
        "stream": {"harmonic_mean": results.get("harmonic_mean"), "fps": results.get("fps"),
                   "forgetting": forgetting.get("forgetting"), "resets": results.get("resets")},
        "error": results.get("error"),
        "results": results,
    }


def load_runs(paths: Iterable[str | Path], ignore: Sequence[str] = ()) -> list[dict]:
    """Every run under ``paths`` (run folders, sweep folders, results.json files), as :func:`load_run` gives."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return [load_run(f, ignore) for f in find_results(paths)]


def _ordered(keys: Iterable[str]) -> list[str]:
    keys = list(dict.fromkeys(keys))
    first = [k for k in GROUP_ORDER if k in keys]
    return first + sorted(k for k in keys if k not in GROUP_ORDER)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: Sequence[dict]) -> list[dict]:
    """One row per setting over the completed runs that have test scores (mean over seeds, in %).

    Each row: ``group`` (what differs between the settings, e.g. ``adaptation=advent seed-mean``), ``setting``
    (the whole setting), ``runs``, ``seeds``, ``mIoU`` / ``mIoU_std`` (std None for a single run),
    ``best_val_mIoU``, ``IoU/<class>`` (mean, NaN classes left out), ``IoU_std/<class>`` and ``run_dirs``.
    Rows keep the order in which their first run was found. ``pandas.DataFrame(rows)`` gives a frame.
    """
    done = [r for r in runs if r["status"] == "completed" and r["mIoU"] is not None]
    groups: dict[tuple, list[dict]] = {}
    for run in done:
        groups.setdefault(tuple(sorted(run["setting"].items())), []).append(run)
    settings = [dict(key) for key in groups]
    all_keys = _ordered(k for s in settings for k in s)
    varying = [k for k in all_keys if len({s.get(k) for s in settings}) > 1]
    classes = list(dict.fromkeys(name for r in done for name in r["IoU"]))
    subsets = list(dict.fromkeys(name for r in done for name in r.get("subsets") or {}))
    per_group = list(dict.fromkeys(name for r in done for name in r.get("groups") or {}))  # ACDC's conditions
    streams = any("stream" in r for r in done)
    rows = []
    for key, members in groups.items():
        setting = dict(key)
        label = " ".join(f"{k}={setting.get(k, '(default)')}" for k in varying)
        if not label:
            label = " ".join(f"{k}={setting[k]}" for k in ("experiment", "data", "model", "adaptation") if k in setting) or "all runs"
        mean, std = _mean_std([r["mIoU"] for r in members])
        val, _ = _mean_std([r["best_val_mIoU"] for r in members])
        row = {
            "group": label,
            "runs": len(members),
            "seeds": [r["seed"] for r in members],
            "mIoU": _pct(mean),
            "mIoU_std": _pct(std),
            "best_val_mIoU": _pct(val),
        }
        for name in subsets:  # mIoU16, mIoU13: their own columns, beside mIoU
            m, s = _mean_std([(r.get("subsets") or {}).get(name) for r in members])
            row[name], row[f"{name}_std"] = _pct(m), _pct(s)
        for name in per_group:  # per-group (ACDC: per-condition) mIoU: columns mIoU/fog, ...
            m, s = _mean_std([(r.get("groups") or {}).get(name) for r in members])
            row[f"mIoU/{name}"], row[f"mIoU_std/{name}"] = _pct(m), _pct(s)
        if streams:  # rtda-stream runs: harmonic mean, fps, forgetting, resets
            for name in STREAM_FIELDS:
                m, s = _mean_std([(r.get("stream") or {}).get(name) for r in members])
                scale = _pct if name in ("harmonic_mean", "forgetting") else (lambda v: v)
                row[name], row[f"{name}_std"] = scale(m), scale(s)
        for name in classes:
            m, s = _mean_std([r["IoU"].get(name) for r in members])
            row[f"IoU/{name}"] = _pct(m)
            row[f"IoU_std/{name}"] = _pct(s)
        row["setting"] = setting
        row["run_dirs"] = [r["run_dir"] for r in members]
        rows.append(row)
    return rows


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def not_averaged(runs: Sequence[dict]) -> list[dict]:
    """The runs left out of :func:`summarize`: failed, interrupted or running jobs, and runs without test scores."""
    return [r for r in runs if not (r["status"] == "completed" and r["mIoU"] is not None)]


def common_setting(runs: Sequence[dict]) -> dict:
    """The setting keys every completed run shares (shown once above the table)."""
    settings = [r["setting"] for r in runs if r["status"] == "completed"]
    if not settings:
        return {}
    return {k: v for k, v in settings[0].items() if all(s.get(k) == v for s in settings[1:])}


def class_names(rows: Sequence[dict]) -> list[str]:
    return [k.split("/", 1)[1] for k in (rows[0] if rows else {}) if k.startswith("IoU/")]


def subset_names(rows: Sequence[dict]) -> list[str]:
    """The ``mIoU<n>`` columns of the rows (a SYNTHIA run's mIoU16, mIoU13)."""
    return [k for k in (rows[0] if rows else {}) if k[:4] == "mIoU" and k[4:].isdigit()]


def group_names(rows: Sequence[dict]) -> list[str]:
    """The per-group columns of the rows (an ACDC test set's conditions: ``fog``, ``night``, ...)."""
    return [k.split("/", 1)[1] for k in (rows[0] if rows else {}) if k.startswith("mIoU/")]


def stream_names(rows: Sequence[dict]) -> list[str]:
    """The rtda-stream columns of the rows (:data:`STREAM_FIELDS`), where the rows hold stream runs."""
    return [k for k in STREAM_FIELDS if k in (rows[0] if rows else {})]


#: headers of the stream columns in the printed and markdown tables
STREAM_HEADERS = {"harmonic_mean": "H-mean (%)", "fps": "fps", "forgetting": "forgetting (pts)", "resets": "resets"}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _miou_cell(row: dict) -> str:
    return f"{_fmt(row['mIoU'])} ± {_fmt(row['mIoU_std'])}" if row["mIoU_std"] is not None else _fmt(row["mIoU"])


def table(rows: Sequence[dict], per_class: bool = True) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the comparison table, numbers in % with two decimals."""
    names = class_names(rows) if per_class else []
    subsets = subset_names(rows)
    groups = group_names(rows)
    streams = stream_names(rows)
    header = ["group", "runs", "seeds", "mIoU (%)", *(f"{n} (%)" for n in subsets), *(f"{g} (%)" for g in groups),
              *(STREAM_HEADERS[n] for n in streams), *names]
    cells = [[row["group"], str(row["runs"]), ",".join(str(s) for s in row["seeds"]), _miou_cell(row),
              *(_fmt(row[n]) for n in subsets), *(_fmt(row.get(f"mIoU/{g}")) for g in groups),
              *(_fmt(row[n], 1) for n in streams), *(_fmt(row[f"IoU/{n}"], 1) for n in names)] for row in rows]
    return header, cells


def to_markdown(rows: Sequence[dict], runs: Sequence[dict] = ()) -> str:
    header, cells = table(rows)
    lines = []
    common = common_setting(runs)
    if common:
        lines += ["Common to all runs: " + " ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    left_out = not_averaged(runs)
    if left_out:
        lines += ["", "Not averaged:", ""]
        lines += [f"- `{r['run_dir']}`: {r['status']}" + (f" ({r['error']})" if r.get("error") else "") for r in left_out]
    return "\n".join(lines) + "\n"


def to_text(rows: Sequence[dict], runs: Sequence[dict] = ()) -> str:
    """The table as printed on the console: mIoU first, then one column per class (IoU, %)."""
    header, cells = table(rows)
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    out = []
    common = common_setting(runs)
    if common:
        out.append("common to all runs: " + " ".join(f"{k}={v}" for k, v in common.items()))
    out.append("target test mIoU and per-class IoU (%), mean over runs (± std):")
    for i, line in enumerate([header, *cells]):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    for run in not_averaged(runs):
        out.append(f"not averaged ({run['status']}): {run['run_dir']}" + (f": {run['error']}" if run.get("error") else ""))
    return "\n".join(out)


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    """One line per group: group, runs, seeds, mIoU, mIoU_std, best_val_mIoU, IoU/<class>, IoU_std/<class>, setting."""
    names = class_names(rows)
    fields = ["group", "runs", "seeds", "mIoU", "mIoU_std", *(f for n in subset_names(rows) for f in (n, f"{n}_std")),
              *(f for g in group_names(rows) for f in (f"mIoU/{g}", f"mIoU_std/{g}")),
              *(f for n in stream_names(rows) for f in (n, f"{n}_std")),
              "best_val_mIoU",
              *(f"IoU/{n}" for n in names), *(f"IoU_std/{n}" for n in names), "setting", "run_dirs"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "seeds": " ".join(str(s) for s in row["seeds"]),
                         "setting": " ".join(f"{k}={v}" for k, v in row["setting"].items()),
                         "run_dirs": " ".join(row["run_dirs"])})
    atomic_write_text(path, buffer.getvalue())


def plot_per_class(rows: Sequence[dict], path: str | Path | None = None, title: str | None = None):
    """Grouped bar chart of per-class IoU (%), one bar colour per group, std over runs as error bars
    (:func:`rtda.analysis.figures.iou_bars`). Saves a PNG when ``path`` is given; returns the matplotlib Figure (for notebooks)."""
    names = class_names(rows)
    if not rows or not names:
        raise RtdaError("nothing to plot: no completed run with per-class IoU")
    label = {id(row): f"{row['group']} (n={row['runs']})" for row in rows}
    ious = {label[id(r)]: {"mIoU": r["mIoU"], **{n: r[f"IoU/{n}"] for n in names}} for r in rows}
    stds = {label[id(r)]: {"mIoU": r["mIoU_std"], **{n: r[f"IoU_std/{n}"] for n in names}} for r in rows}
    return iou_bars(ious, names, errors=stds, path=path, title=title or "target test IoU per class (mean over runs)")


def compare(paths: Sequence[str | Path], out: str | Path | None = None, ignore: Sequence[str] = (),
            plot: bool = True, bench: Sequence[str | Path] | None = None, variant: str = DEFAULT_VARIANT,
            size: Sequence[int] = DEFAULT_SIZE) -> dict:
    """Load, summarise, print and write the comparison; returns ``{"rows", "runs", "files", "front"}``.

    ``bench`` (rtda-bench output folders or bench.json files): also the accuracy–speed front
    (:func:`write_front`), ``front.csv`` and ``front.png``, of the ``variant`` rows at input ``size`` (H, W)."""
    runs = load_runs(paths, ignore)
    rows = summarize(runs)
    speeds = newest_bench_rows(bench, variant, size) if bench else None  # a bad --bench stops before writing
    if out is None:
        only = Path(paths[0]) if len(paths) == 1 else None
        out = only if only is not None and only.is_dir() else Path("comparison")
    out = Path(out)

    check_writable(out, "the comparison")
    files = {"csv": out / "comparison.csv", "markdown": out / "comparison.md"}
    write_csv(rows, files["csv"])
    atomic_write_text(files["markdown"], to_markdown(rows, runs))
    if plot and rows and class_names(rows):
        files["plot"] = out / "comparison_per_class.png"
        plot_per_class(rows, files["plot"])
    print(to_text(rows, runs))
    points = None
    if speeds is not None and rows:
        points, written = write_front(rows, speeds, out, variant, size, plot)
        files.update(written)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    if not rows:
        print("rtda-compare: no completed run with test scores to average", file=sys.stderr)
    return {"rows": rows, "runs": runs, "files": files, "front": points}


def write_front(rows: Sequence[dict], speeds: dict, out: str | Path, variant: str = DEFAULT_VARIANT,
                size: Sequence[int] = DEFAULT_SIZE, plot: bool = True) -> tuple[list[dict], dict]:
    """The accuracy–speed front of the summary ``rows`` at the rtda-bench ``speeds``
    (:func:`rtda.analysis.front.newest_bench_rows`) into ``out``: ``front.csv`` and (``plot``) ``front.png``
    (:func:`rtda.analysis.figures.accuracy_vs_fps`, the Pareto front drawn). A network without a speed is
    named once on the console with the rtda-bench command that measures it, and left out. Returns the
    points (:func:`rtda.analysis.front.front_points`) and the files written."""
    out = Path(out)
    for model in missing_models(rows, speeds):
        print(f"no rtda-bench row for model {model} at {size_text(size)} (variant {variant}): run "
              f"{bench_command(model, size, variant)} to put its groups on the front; left out")
    points = front_points(rows, speeds)
    if not points:
        print("rtda-compare: no group's network has an rtda-bench row: no accuracy-speed front", file=sys.stderr)
        return points, {}
    files = {"front_csv": out / "front.csv"}
    write_front_csv(points, files["front_csv"])
    if plot:
        files["front_plot"] = out / "front.png"
        accuracy_vs_fps(points, front=True, path=files["front_plot"], title=speed_title(speeds))
    print(front_text(points))
    return points, files


def class_recovery(oracle: dict, source_only: dict, methods: dict, class_names) -> dict:
    """Per class (IoU in %, from :func:`summarize` rows): ``drop`` = target-trained − source-only,
    and for each method ``recovered`` = method − source-only (None where a class has no score)."""
    def get(row, name):
        v = row.get(f"IoU/{name}")
        return None if v is None or v != v else float(v)

    out = {"classes": list(class_names), "drop": [], "recovered": {m: [] for m in methods}}
    for name in class_names:
        o, s = get(oracle, name), get(source_only, name)
        out["drop"].append(None if o is None or s is None else o - s)
        for m, row in methods.items():
            v = get(row, name)
            out["recovered"][m].append(None if v is None or s is None else v - s)
    out["mIoU_drop"] = oracle["mIoU"] - source_only["mIoU"]
    out["mIoU_recovered"] = {m: row["mIoU"] - source_only["mIoU"] for m, row in methods.items()}
    return out
