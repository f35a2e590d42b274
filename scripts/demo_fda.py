"""FDA's pipeline on the demo pair, as recorded in BENCHMARKS.md: per seed, one demo_fda network per β
(0.01, 0.05, 0.09), their softmax ensemble (MBT) scored by rtda-eval, its pseudo-labels of the target
training split, and one self-training round (demo_fda_ssl, β=0.01) on them. Rows are appended to
outputs/demo_methods.json beside the other methods' (``scripts/demo_methods.py --table`` prints them all).

    python scripts/demo_fda.py                  # seeds 1 2 3
    python scripts/demo_fda.py --seeds 1

One training at a time; pass ``--lock FILE`` to hold an flock on FILE around each command.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_methods import RECORD, run, table  # noqa: E402

BETAS = (0.01, 0.05, 0.09)


@contextlib.contextmanager
def locked(path: str | None):
    if path is None:
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rtda_eval(args: list[str]) -> dict:
    proc = subprocess.run(["rtda-eval", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"rtda-eval {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return {"stdout": proc.stdout}


def record(rows: list[dict], row: dict) -> None:
    rows.append(row)
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(rows, indent=2))
    print(f"{row['label']} seed={row['seed']} mIoU={100 * row['mIoU']:.2f} s/it={row['seconds_per_iteration']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--lock", help="flock this file around each command (shared machines)")
    args = parser.parse_args()
    rows = json.loads(RECORD.read_text()) if RECORD.is_file() else []
    labels = []
    for seed in args.seeds:
        runs = []
        for beta in BETAS:
            label = f"demo_fda:adaptation.beta={beta}"
            with locked(args.lock):
                row = run(label, seed)
            record(rows, row)
            runs.append(row)
            labels.append(label)
        ckpts = "[" + ",".join(f"{r['run_dir']}/checkpoints/last.ckpt" for r in runs) + "]"
        with locked(args.lock):
            out = rtda_eval([f"ckpt_path={ckpts}", "plot_confusion_matrix=false"])["stdout"]
        folder = Path(re.search(r"^run folder: (.+)$", out, re.M).group(1))
        scored = json.loads((folder / "results.json").read_text())
        record(rows, {"label": "demo_fda MBT (3 betas)", "seed": seed, "mIoU": scored["test/mIoU"],
                      "IoU": scored["test"]["IoU"], "run_dir": str(folder),
                      "seconds_per_iteration": sum(r["seconds_per_iteration"] for r in runs)})
        pseudo = Path(f"data/pseudo/demo_fda_seed{seed}").resolve()
        with locked(args.lock):
            rtda_eval([f"ckpt_path={ckpts}", f"pseudo_labels.out={pseudo}"])
        manifest = json.loads((pseudo / "pseudo_labels.json").read_text())
        print(f"pseudo-labels seed={seed}: kept {100 * manifest['kept_share']:.1f}% of the pixels", flush=True)
        label = f"demo_fda_ssl:data.target.label_root={pseudo}"
        with locked(args.lock):
            row = run(label, seed)
        row["label"] = "demo_fda_ssl (beta 0.01, MBT pseudo-labels)"
        row["pseudo_label_kept_share"] = manifest["kept_share"]
        record(rows, row)
    chosen = [*dict.fromkeys(labels), "demo_fda MBT (3 betas)", "demo_fda_ssl (beta 0.01, MBT pseudo-labels)"]
    base = [r for r in rows if r["label"] == "demo_source_only"]
    print(table(base + [r for r in rows if r["label"] in chosen]))


if __name__ == "__main__":
    main()
