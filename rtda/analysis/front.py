"""The accuracy–speed front: each group of runs (:func:`rtda.analysis.compare.summarize`) at its network's speed.

    rtda-compare outputs/train/multiruns/<stamp> --bench outputs/bench              # front.csv, front.png
    rtda-compare SWEEP --bench outputs/bench --variant eager --size 512x1024         # the defaults, spelled out

Speeds come from the ``bench.json`` files ``rtda-bench`` writes (read here as data: one row per model, variant
and input size, with ``fps`` and ``median_ms``); for each network the newest row of the chosen variant (``eager``:
rtda's own inference path) at the chosen input size counts. A group's network is its ``model`` choice (recorded
in ``results.json``'s ``choices``), its method its ``adaptation`` choice, each defaulting to ``conf/train.yaml``'s.
Adaptation changes training only: groups sharing a network share its FPS.

A point is on the Pareto front when no other point has FPS >= and mIoU >= (means) with one of them strictly
greater: equal points are both on it.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from omegaconf import OmegaConf

from rtda.run.config import CONFIG_DIR
from rtda.run.errors import RtdaError
from rtda.run.files import atomic_write_text

#: the speed measurement the front uses unless told otherwise: rtda's inference path at Cityscapes' resolution
DEFAULT_VARIANT = "eager"
DEFAULT_SIZE = (512, 1024)
#: what conf/train.yaml chooses, should it be unreadable
_FALLBACK_DEFAULTS = {"model": "bisenet_r18", "adaptation": "source_only"}
#: the columns of front.csv
FRONT_COLUMNS = ["model", "method", "group", "runs", "seeds", "mIoU", "mIoU_std", "fps", "latency_ms", "on_front"]


@functools.cache
def train_defaults() -> dict:
    """The config-group choices of ``conf/train.yaml``'s defaults list (``{"model": "bisenet_r18", ...}``):
    what a run chose when its results record no choice."""
    try:
        defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "train.yaml")).get("defaults") or []
    except (OSError, ValueError, AttributeError):
        return dict(_FALLBACK_DEFAULTS)
    found = {k: str(v) for item in defaults if isinstance(item, dict) for k, v in item.items() if isinstance(v, str)}
    return {**_FALLBACK_DEFAULTS, **found}


def size_text(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1024"`` -> (512, 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", str(text))
    if not match or not all(int(v) > 0 for v in match.groups()):
        raise RtdaError(f"--size {text}: expected HEIGHTxWIDTH, e.g. 512x1024")
    return int(match.group(1)), int(match.group(2))


# -- rtda-bench rows ----------------------------------------------------------------------------------------

def bench_files(paths: str | Path | Iterable[str | Path], strict: bool = True) -> list[Path]:
    """Every ``bench.json`` at or under ``paths`` (rtda-bench run or sweep folders, or JSON files of rows), each
    once. ``strict``: a path that does not exist, or a folder without one, is an error (else it is skipped)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob("bench.json"))
            if not files and strict:
                raise RtdaError(f"--bench {path}: no bench.json under this folder (expected an rtda-bench output "
                                "folder, e.g. outputs/bench, or a bench.json)")
        elif strict:
            raise RtdaError(f"--bench {path}: no such file or folder (expected an rtda-bench output folder or a bench.json)")
        else:
            files = []
        for f in files:
            found.setdefault(f.resolve(), None)
    return list(found)


def _read_rows(file: Path) -> list[dict]:
    try:
        rows = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RtdaError(f"{file}: not a readable rtda-bench bench.json ({err})") from err
    if not isinstance(rows, list):
        raise RtdaError(f"{file}: not an rtda-bench bench.json (expected a JSON list of rows)")
    return [r for r in rows if isinstance(r, dict)]


def _is_speed_row(row: dict) -> bool:
    return row.get("mode", "infer") == "infer" and bool(row.get("fps")) and "model" in row


def newest_bench_rows(paths, variant: str = DEFAULT_VARIANT, size: Sequence[int] = DEFAULT_SIZE,
                      strict: bool = True) -> dict:
    """{model: row}: for each network, the newest rtda-bench inference row (files by modification time, the
    newest last; within a file, the last row) of ``variant`` at input ``size`` (H, W) under ``paths``.

    ``strict`` (rtda-compare ``--bench``): a missing path, a folder without ``bench.json``, or no matching row in
    any of them is a one-line error saying what was found; otherwise (the notebooks) an empty dict."""
    files = bench_files(paths, strict)
    wanted = "x" + size_text(size)
    found, seen = {}, set()
    for file in sorted(files, key=lambda f: (f.stat().st_mtime, str(f))):  # newest last: it wins
        for row in _read_rows(file):
            if not _is_speed_row(row):
                continue
            seen.add(f"{row.get('variant')} at {str(row.get('input', '?')).split('x', 2)[-1]}")
            if row.get("variant") == variant and str(row.get("input", "")).endswith(wanted):
                found[row["model"]] = row
    if not found and strict:
        where = " ".join(str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths))
        have = f"found {', '.join(sorted(seen))}" if seen else "no inference row with an FPS"
        raise RtdaError(f"--bench {where}: no rtda-bench row of variant {variant} at {size_text(size)} in "
                        f"{len(files)} bench.json ({have}); expected the output of rtda-bench bench.height={size[0]} "
                        f"bench.width={size[1]} with {variant} in bench.variants")
    return found


def bench_command(model: str, size: Sequence[int] = DEFAULT_SIZE, variant: str = DEFAULT_VARIANT) -> str:
    """The rtda-bench command line that measures ``model`` as the front needs it."""
    return f"rtda-bench model={model} bench.height={size[0]} bench.width={size[1]} bench.variants=[{variant}]"


def speed_title(speeds: Mapping[str, dict]) -> str:
    """What the FPS were measured on: input, device, precision (from the rtda-bench rows)."""
    row = next(iter(speeds.values()))
    device = (row.get("machine") or {}).get("device", row.get("device", "?"))
    return f"target mIoU vs FPS (rtda-bench {row.get('variant')}, input {row.get('input')}, {device}, {row.get('precision')})"


# -- the front ----------------------------------------------------------------------------------------------

def model_of(row: dict, default_model: str | None = None) -> str:
    """A summary row's network: its ``model`` choice, else ``default_model`` (conf/train.yaml's)."""
    return row["setting"].get("model") or default_model or train_defaults()["model"]


def models_of(rows: Sequence[dict], default_model: str | None = None) -> list[str]:
    """The networks (``model`` choices) the summary rows were trained with, in order."""
    return list(dict.fromkeys(model_of(r, default_model) for r in rows))


def missing_models(rows: Sequence[dict], speeds: Mapping[str, dict], default_model: str | None = None) -> list[str]:
    """The networks of ``rows`` that ``speeds`` has no row for, each once."""
    return [m for m in models_of(rows, default_model) if m not in speeds]


def pareto_front(points: Sequence[dict]) -> list[bool]:
    """Per point (``fps``, ``mIoU``: means), whether it is on the accuracy–speed Pareto front: no other point
    has FPS >= and mIoU >= with one of them strictly greater (equal points are both on it)."""
    def dominated(p, q):  # q dominates p
        return q["fps"] >= p["fps"] and q["mIoU"] >= p["mIoU"] and (q["fps"] > p["fps"] or q["mIoU"] > p["mIoU"])

    return [not any(dominated(p, q) for q in points if q is not p) for p in points]


def front_points(rows: Sequence[dict], speeds: Mapping[str, dict], default_model: str | None = None) -> list[dict]:
    """The points of :func:`rtda.analysis.figures.accuracy_vs_fps`: each summary row (with an mIoU) whose network
    ``speeds`` (:func:`newest_bench_rows`) has, at that network's FPS. Each point: ``label`` (the row's label,
    else its group), ``group``, ``model``, ``method`` (the row's label when it has one, as the notebooks name
    their settings, else its ``adaptation`` choice), ``runs``, ``seeds``, ``mIoU``, ``mIoU_std``, ``fps``,
    ``latency_ms`` and ``on_front`` (:func:`pareto_front`)."""
    method_default = train_defaults()["adaptation"]
    points = []
    for row in rows:
        model = model_of(row, default_model)
        if model not in speeds or row.get("mIoU") is None:
            continue
        speed = speeds[model]
        points.append({
            "label": row.get("label", row["group"]), "group": row["group"], "model": model,
            "method": row.get("label") or row["setting"].get("adaptation", method_default),
            "runs": row.get("runs"), "seeds": list(row.get("seeds") or []),
            "mIoU": row["mIoU"], "mIoU_std": row.get("mIoU_std"),
            "fps": float(speed["fps"]), "latency_ms": speed.get("median_ms"),
        })
    for point, on in zip(points, pareto_front(points)):
        point["on_front"] = on
    return points


def write_front_csv(points: Sequence[dict], path: str | Path) -> None:
    """``front.csv``: one line per point, :data:`FRONT_COLUMNS` (``on_front`` true/false, seeds space-separated)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FRONT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for p in points:
        writer.writerow({**p, "seeds": " ".join(str(s) for s in p["seeds"]), "on_front": str(p["on_front"]).lower(),
                         "mIoU_std": "" if p["mIoU_std"] is None else p["mIoU_std"],
                         "latency_ms": "" if p["latency_ms"] is None else p["latency_ms"]})
    atomic_write_text(path, buffer.getvalue())


def front_text(points: Sequence[dict]) -> str:
    """The front as printed on the console, fastest first; ``*`` marks the points on the Pareto front."""
    def miou(p):
        return f"{p['mIoU']:.2f}" + (f" ± {p['mIoU_std']:.2f}" if p["mIoU_std"] is not None else "")

    header = ["", "group", "model", "method", "mIoU (%)", "FPS"]
    cells = [["*" if p["on_front"] else "", p["group"], p["model"], str(p["method"]), miou(p), f"{p['fps']:.1f}"]
             for p in sorted(points, key=lambda p: (-p["fps"], -p["mIoU"]))]
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    lines = ["accuracy vs speed (* on the Pareto front):"]
    for i, line in enumerate([header, *cells]):
        lines.append("  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
