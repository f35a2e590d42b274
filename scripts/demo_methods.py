"""The adaptation methods on the demo pair, as recorded in BENCHMARKS.md: each method's demo experiment,
3 training seeds, same budget; target test mIoU and per-class IoU as mean ± std, and the median wall time
of one training iteration (results.json ``seconds_per_iteration``) beside source-only's.

    python scripts/demo_methods.py                                        # source_only adversarial minent advent
    python scripts/demo_methods.py demo_adversarial:adaptation.update_bn_on_target=false
    python scripts/demo_methods.py --table outputs/demo_methods.json      # print the table of earlier runs

Runs one training at a time; appends every finished run to outputs/demo_methods.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT = ["demo_source_only", "demo_adversarial", "demo_minent", "demo_advent"]
RECORD = Path("outputs/demo_methods.json")


def run(label: str, seed: int) -> dict:
    experiment, *extra = label.split(":")
    args = [f"experiment={experiment}", f"seed={seed}", *[e for part in extra for e in part.split(",")]]
    proc = subprocess.run(["rtda-train", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"rtda-train {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    folder = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))
    results = json.loads((folder / "results.json").read_text())
    return {"label": label, "seed": seed, "mIoU": results["test/mIoU"], "IoU": results["test"]["IoU"],
            "seconds_per_iteration": results["seconds_per_iteration"], "run_dir": str(folder)}


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def table(rows: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {lb: [r for r in rows if r["label"] == lb] for lb in labels}
    base = statistics.median(r["seconds_per_iteration"] for r in by[labels[0]])
    lines = ["| method | seeds | target mIoU | s / iteration | vs " + labels[0] + " |", "|---|---:|---:|---:|---:|"]
    for lb in labels:
        spi = statistics.median(r["seconds_per_iteration"] for r in by[lb])
        lines.append(f"| {lb} | {len(by[lb])} | {mean_std([r['mIoU'] for r in by[lb]])} | {spi:.3f} | {spi / base:.2f}x |")
    classes = list(rows[0]["IoU"])
    lines += ["", "| class | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(mean_std([r["IoU"][c] for r in by[lb]]) for lb in labels) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="*", default=DEFAULT, help="experiment[:override,override...]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--table", type=Path, help="only print the table of a record file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    rows = json.loads(RECORD.read_text()) if RECORD.is_file() else []
    for label in args.labels:
        for seed in args.seeds:
            row = run(label, seed)
            print(f"{label} seed={seed} mIoU={100 * row['mIoU']:.2f} s/it={row['seconds_per_iteration']:.3f}", flush=True)
            rows.append(row)
            RECORD.parent.mkdir(parents=True, exist_ok=True)
            RECORD.write_text(json.dumps(rows, indent=2))
    print(table([r for r in rows if r["label"] in args.labels]))


if __name__ == "__main__":
    main()
