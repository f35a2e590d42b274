"""rtda-compare --bench: each group's target mIoU at its network's rtda-bench FPS, the Pareto front."""

import csv
import json
import os
from pathlib import Path

import pytest
from helpers import run_in_process
from matplotlib.container import ErrorbarContainer

from rtda.analysis import figures as viz
from rtda.analysis.front import newest_bench_rows, pareto_front, train_defaults
from rtda.cli.compare import main as compare_main
from rtda.run.errors import RtdaError


def run(folder: Path, miou: float, seed: int, model: str | None = "bisenet_r18", adaptation: str = "source_only") -> None:
    """A finished rtda-train run as results.json records it (``model=None``: a run that recorded no model choice)."""
    folder.mkdir(parents=True)
    choices = {"data": "demo", "adaptation": adaptation, "logger": "csv", **({"model": model} if model else {})}
    (folder / "results.json").write_text(json.dumps({
        "status": "completed", "seed": seed, "choices": choices, "overrides": [f"adaptation={adaptation}", f"seed={seed}"],
        "test": {"mIoU": miou, "IoU": {"road": miou}}, "best_val_mIoU": miou}))


def bench(folder: Path, rows: list[dict], mtime: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.json"
    path.write_text(json.dumps(rows))
    os.utime(path, (mtime, mtime))
    return path


def speed(model: str, fps: float, variant: str = "eager", size: str = "512x1024") -> dict:
    return {"model": model, "variant": variant, "input": f"1x3x{size}", "fps": fps, "median_ms": 1000.0 / fps,
            "device": "cpu", "precision": "fp32", "machine": {"device": "Test CPU"}}


def test_the_pareto_front_keeps_the_points_nothing_beats_at_both():
    points = [{"fps": 100.0, "mIoU": 40.0},   # the fastest with the best mIoU at that speed: on
              {"fps": 100.0, "mIoU": 35.0},   # as fast, less accurate: off
              {"fps": 50.0, "mIoU": 40.0},    # as accurate, slower than the first: off
              {"fps": 10.0, "mIoU": 50.0},    # the most accurate: on
              {"fps": 10.0, "mIoU": 45.0},    # off
              {"fps": 5.0, "mIoU": 60.0},     # a tie of two equal points: both on
              {"fps": 5.0, "mIoU": 60.0},
              {"fps": 1.0, "mIoU": 59.0}]     # slower and worse than the tie: off
    assert pareto_front(points) == [True, False, False, True, False, True, True, False]
    assert pareto_front([{"fps": 3.0, "mIoU": 1.0}]) == [True] and pareto_front([]) == []


def test_the_front_figure_marks_networks_colours_methods_and_steps_through_the_front():
    points = [{"label": "a", "model": "bisenet_r18", "method": "source_only", "fps": 100.0, "mIoU": 35.0, "mIoU_std": 2.0},
              {"label": "b", "model": "bisenet_r18", "method": "fda", "fps": 100.0, "mIoU": 46.0, "mIoU_std": None},
              {"label": "c", "model": "stdc1", "method": "fda", "fps": 50.0, "mIoU": 50.0, "mIoU_std": 1.0}]
    fig = viz.accuracy_vs_fps(points, real_time_fps=30, front=True)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    marks = [c.lines[0] for c in bars]
    assert [(m.get_xdata()[0], m.get_ydata()[0]) for m in marks] == [(100.0, 35.0), (100.0, 46.0), (50.0, 50.0)]
    assert marks[0].get_marker() == marks[1].get_marker() != marks[2].get_marker()  # one shape per network
    assert marks[1].get_color() == marks[2].get_color() != marks[0].get_color()     # one colour per method
    assert bars[0].has_yerr and len(bars[0].lines[2][0].get_segments()) == 1        # std as an error bar
    step = next(line for line in ax.lines if line.get_label() == "Pareto front")
    assert list(step.get_xdata()) == [50.0, 100.0] and list(step.get_ydata()) == [50.0, 46.0]
    assert step.get_drawstyle() == "steps-pre"
    assert any(list(line.get_xdata()) == [30, 30] for line in ax.lines)  # the real-time line
    assert "Pareto front" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_bench_rows_newest_per_model_of_the_variant_and_size(tmp_path):
    bench(tmp_path / "old", [speed("stdc1", 10.0)], 1000)
    bench(tmp_path / "new", [speed("stdc1", 50.0), speed("stdc1", 99.0, variant="plain"),
                             speed("stdc1", 7.0, size="64x128"),
                             {"method": "fda", "variant": "lightning", "model": "stdc1", "input": "2x3x512x1024",
                              "median_s": 0.5}], 2000)  # a training row (no fps): not a speed
    assert {m: r["fps"] for m, r in newest_bench_rows([tmp_path]).items()} == {"stdc1": 50.0}
    assert newest_bench_rows([tmp_path], "plain")["stdc1"]["fps"] == 99.0
    assert newest_bench_rows([tmp_path / "old" / "bench.json"])["stdc1"]["fps"] == 10.0  # a file given itself
    with pytest.raises(RtdaError, match=r"no rtda-bench row of variant eager at 32x32 .*found .*eager at 512x1024"):
        newest_bench_rows([tmp_path], size=(32, 32))
    with pytest.raises(RtdaError, match="no such file or folder"):
        newest_bench_rows([tmp_path / "gone"])
    assert newest_bench_rows([tmp_path / "gone"], strict=False) == {}  # the notebooks measure what is missing
    assert train_defaults()["model"] == "bisenet_r18" and train_defaults()["adaptation"] == "source_only"


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    run(root / "0", 0.30, 1)
    run(root / "1", 0.40, 2)
    run(root / "2", 0.45, 1, adaptation="fda")
    run(root / "3", 0.47, 2, adaptation="fda")
    run(root / "4", 0.50, 1, model="stdc1", adaptation="fda")
    run(root / "5", 0.60, 1, model="pidnet_s", adaptation="fda")  # never benchmarked
    run(root / "6", 0.61, 2, model="pidnet_s", adaptation="source_only")
    run(root / "7", 0.20, 1, model=None, adaptation="advent")  # no model recorded: conf/train.yaml's default
    return root


def test_cli_writes_the_front_of_each_group_at_its_networks_speed(sweep, tmp_path):
    benches = tmp_path / "bench"
    bench(benches / "runs" / "a", [speed("bisenet_r18", 100.0), speed("stdc1", 10.0)], 1000)
    bench(benches / "runs" / "b", [speed("stdc1", 50.0), speed("bisenet_r18", 999.0, variant="plain")], 2000)
    out = tmp_path / "report"
    proc = run_in_process(compare_main, [str(sweep), "--out", str(out), "--bench", str(benches)])
    assert proc.returncode == 0, proc.stderr
    with open(out / "front.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "method", "group", "runs", "seeds", "mIoU", "mIoU_std", "fps", "latency_ms", "on_front"]
    got = [(r["model"], r["method"], r["runs"], r["seeds"], round(float(r["mIoU"]), 2), float(r["fps"]), r["on_front"])
           for r in rows]
    assert got == [("bisenet_r18", "source_only", "2", "1 2", 35.0, 100.0, "false"),  # beaten by FDA at the same speed
                   ("bisenet_r18", "fda", "2", "1 2", 46.0, 100.0, "true"),
                   ("stdc1", "fda", "1", "1", 50.0, 50.0, "true"),            # the newest stdc1 eager row
                   ("bisenet_r18", "advent", "1", "1", 20.0, 100.0, "false")]
    assert float(rows[0]["mIoU_std"]) == pytest.approx(7.0711, abs=1e-3) and rows[2]["mIoU_std"] == ""
    assert float(rows[2]["latency_ms"]) == pytest.approx(20.0)
    assert "model=bisenet_r18 adaptation=fda" in rows[1]["group"]
    png = (out / "front.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    notices = [ln for ln in proc.stdout.splitlines() if ln.startswith("no rtda-bench row")]
    assert notices == ["no rtda-bench row for model pidnet_s at 512x1024 (variant eager): run rtda-bench model=pidnet_s "
                       "bench.height=512 bench.width=1024 bench.variants=[eager] to put its groups on the front; left out"]
    assert "accuracy vs speed (* on the Pareto front)" in proc.stdout and str(out / "front.png") in proc.stdout


@pytest.mark.parametrize("make, args, fragment", [
    (lambda p: p / "nowhere", [], "nowhere: no such file or folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", [], "empty: no bench.json under this folder"),
    (lambda p: bench(p / "b", [speed("stdc1", 5.0)], 1000).parent, ["--variant", "compile"],
     "no rtda-bench row of variant compile at 512x1024 in 1 bench.json (found eager at 512x1024)"),
    (lambda p: bench(p / "b", [speed("stdc1", 5.0)], 1000).parent, ["--size", "512"], "argument --size: '512': expected HEIGHTxWIDTH"),
])
def test_a_bad_bench_path_is_one_line_naming_it(sweep, tmp_path, make, args, fragment):
    path = make(tmp_path)
    proc = run_in_process(compare_main, [str(sweep), "--out", str(tmp_path / "o"), "--bench", str(path), *args])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("rtda: error: "), proc.stderr
    assert fragment in lines[0]
    assert not (tmp_path / "o" / "front.csv").exists()


def test_variant_and_size_need_bench(sweep, tmp_path):
    proc = run_in_process(compare_main, [str(sweep), "--out", str(tmp_path / "o"), "--size", "64x128"])
    assert proc.returncode == 1 and "give --bench" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
