"""rtda-compare: runs found under run and sweep folders, grouped by their overrides minus the seed."""

import csv
import json
import math
from pathlib import Path

import pytest
from helpers import REPO, rtda_train, run_in_process, tiny_overrides

from rtda.analysis.compare import compare, load_runs, plot_per_class, summarize
from rtda.cli.compare import main as compare_main

CLASSES = ["road", "sidewalk", "car"]


def fake_run(folder: Path, overrides: list[str], miou: float | None, iou=None, status="completed", seed=None,
             choices=None, error=None) -> Path:
    folder.mkdir(parents=True)
    results = {
        "status": status,
        "experiment": "data=demo",
        "choices": choices or {"data": "demo", "model": "bisenet_r18", "adaptation": "source_only", "logger": "csv",
                               "paths": "default"},
        "overrides": overrides,
        "run_dir": str(folder),
    }
    if seed is not None:
        results["seed"] = seed
    if miou is not None:
        results["test"] = {"mIoU": miou, "IoU": dict(zip(CLASSES, iou or [miou] * 3))}
        results["test/mIoU"] = miou
        results["best_val_mIoU"] = miou + 0.01
    if error:
        results["error"] = error
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep of 2 settings x 2 seeds, one failed job and one killed job (still "running" on disk)."""
    root = tmp_path / "sweep"
    common = ["paths.data_dir=/data", "trainer.max_steps=100"]
    fake_run(root / "0_adaptation=source_only,seed=1", ["adaptation=source_only", "seed=1", *common], 0.30, [0.5, 0.1, None])
    fake_run(root / "1_adaptation=source_only,seed=2", ["adaptation=source_only", "seed=2", *common], 0.40, [0.7, 0.3, 0.2])
    adv = {"data": "demo", "model": "bisenet_r18", "adaptation": "adversarial"}
    fake_run(root / "2_adaptation=adversarial,seed=1", ["adaptation=adversarial", "seed=1", *common], 0.50, choices=adv)
    fake_run(root / "3_adaptation=adversarial,seed=2", ["adaptation=adversarial", "seed=2", *common], 0.60, choices=adv)
    fake_run(root / "4_adaptation=adversarial,seed=3", ["adaptation=adversarial", "seed=3", *common], None,
             status="failed", choices=adv, error="training diverged at iteration 7: loss = nan")
    fake_run(root / "5_adaptation=adversarial,seed=4", ["adaptation=adversarial", "seed=4", *common], None,
             status="running", choices=adv)
    return root


def test_groups_by_overrides_minus_the_seed_with_mean_and_std(sweep):
    runs = load_runs([sweep])
    assert len(runs) == 6
    rows = summarize(runs)
    assert [r["group"] for r in rows] == ["adaptation=source_only", "adaptation=adversarial"]
    src, adv = rows
    assert src["runs"] == 2 and src["seeds"] == [1, 2]
    assert src["mIoU"] == pytest.approx(35.0) and src["mIoU_std"] == pytest.approx(100 * math.sqrt(0.005))  # ddof=1
    assert adv["runs"] == 2 and adv["mIoU"] == pytest.approx(55.0)  # the failed and the killed job are not averaged
    assert src["IoU/road"] == pytest.approx(60.0)
    assert src["IoU/car"] == pytest.approx(20.0) and src["IoU_std/car"] is None  # NaN (None) in one run: left out
    assert src["best_val_mIoU"] == pytest.approx(36.0)
    assert src["setting"]["trainer.max_steps"] == "100" and "paths.data_dir" not in src["setting"]


def test_the_same_setting_reached_by_another_command_line_is_one_group(tmp_path):
    # `adaptation=source_only` typed out or left to the default: the same choices, the same group
    fake_run(tmp_path / "a", ["seed=1"], 0.2)
    fake_run(tmp_path / "b", ["seed=2", "adaptation=source_only", "+data.num_workers=0"], 0.4)
    fake_run(tmp_path / "c", ["seed=3", "optimizer.lr=0.1"], 0.9)
    rows = summarize(load_runs([tmp_path]))
    assert [(r["group"], r["runs"]) for r in rows] == [("optimizer.lr=(default)", 2), ("optimizer.lr=0.1", 1)]
    assert rows[1]["mIoU_std"] is None  # one run: no spread to report


def test_ignore_merges_settings_that_differ_only_in_that_key(tmp_path):
    fake_run(tmp_path / "a", ["seed=1", "trainer.max_steps=10"], 0.2)
    fake_run(tmp_path / "b", ["seed=1", "trainer.max_steps=20"], 0.4)
    assert len(summarize(load_runs([tmp_path]))) == 2
    rows = summarize(load_runs([tmp_path], ignore=["trainer.max_steps"]))
    assert len(rows) == 1 and rows[0]["runs"] == 2


def test_seed_comes_from_results_or_overrides(tmp_path):
    fake_run(tmp_path / "a", [], 0.2, seed=7)
    fake_run(tmp_path / "b", ["seed=3"], 0.2)
    assert sorted(r["seed"] for r in load_runs([tmp_path])) == [3, 7]


def test_writes_csv_markdown_and_plot_and_lists_failed_runs(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    result = compare([sweep], out=out)
    printed = capsys.readouterr().out
    assert "adaptation=adversarial" in printed and "55.00 ± 7.07" in printed
    assert "not averaged (failed)" in printed and "training diverged" in printed and "not averaged (running)" in printed
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["adaptation=source_only", "adaptation=adversarial"]
    assert float(rows[1]["mIoU"]) == pytest.approx(55.0) and rows[1]["seeds"] == "1 2"
    assert {"IoU/road", "IoU_std/road", "setting", "run_dirs"} <= set(rows[0])
    md = (out / "comparison.md").read_text()
    assert "| adaptation=source_only | 2 | 1,2 | 35.00 ± 7.07 |" in md
    assert "Not averaged:" in md and "4_adaptation=adversarial,seed=3" in md
    png = (out / "comparison_per_class.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert result["files"]["plot"] == out / "comparison_per_class.png"


def test_plot_api_returns_a_figure_for_notebooks(sweep):
    fig = plot_per_class(summarize(load_runs([sweep])))
    bars = [p for p in fig.axes[0].patches]
    assert len(bars) == 2 * (1 + len(CLASSES))  # two groups x (mIoU + classes)


def test_cli_defaults_to_writing_into_the_folder_given(sweep):
    proc = run_in_process(compare_main, [str(sweep)])
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "comparison.md").is_file() and (sweep / "comparison.csv").is_file()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "nowhere", "no such file or folder"),
    (lambda p: p, "no results.json under this folder"),
    (lambda p: _write(p / "r" / "results.json", "{not json").parent.parent, "not a readable results.json"),
    (lambda p: _write(p / "notes.txt", "x"), "expected a run or sweep folder"),
])
def test_bad_paths_are_one_line_naming_them(tmp_path, make, fragment):
    path = make(tmp_path)
    proc = run_in_process(compare_main, [str(path), "--out", str(tmp_path / "o")])
    code, err = proc.returncode, proc.stderr
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rtda: error: ") and fragment in lines[0], err
    assert str(tmp_path) in lines[0]


def test_no_arguments_is_one_line_with_the_usage():
    proc = run_in_process(compare_main, [])
    code, err = proc.returncode, proc.stderr
    assert code == 1 and err.strip().startswith("rtda: error: ")
    assert "usage: rtda-compare PATH" in err and len(err.strip().splitlines()) == 1


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'rtda-compare = "rtda.cli.compare:main"' in text


@pytest.mark.slow
def test_two_job_sweep_through_the_cli_then_compare(tiny_demo_dir, tmp_path):
    """`rtda-train -m seed=1,2` (tiny budget): readable job folders, results.json with the overrides, and
    rtda-compare on the sweep folder: one group of two seeds."""
    args = ["-m", "seed=1,2", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=2",
            "data.num_workers=0", "data.source_size=[36,64]", "data.target_size=[32,64]", *tiny_overrides(tiny_demo_dir)]
    proc = rtda_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_seed-1", "1_seed-2"]
    for job, seed in zip(jobs, (1, 2)):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "completed" and results["seed"] == seed
        assert f"seed={seed}" in results["overrides"] and "trainer.max_steps=2" in results["overrides"]
    proc = run_in_process(compare_main, [str(sweep)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(sweep / "comparison.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["runs"] == "2" and row["seeds"] == "1 2" and "trainer.max_steps=2" in row["setting"]
    assert 0.0 <= float(row["mIoU"]) <= 100.0 and float(row["mIoU_std"]) >= 0.0
    assert (sweep / "comparison_per_class.png").is_file()


def fake_stream_run(folder: Path, train_overrides: list[str], train_seed: int, adapt: str, miou: float,
                    per_condition: dict, fps: float, resets: int = 0, stream_overrides=()) -> Path:
    """An rtda-stream results.json as the command writes it: the stream's choices and overrides, and what trained
    its checkpoint (``sources``)."""
    folder.mkdir(parents=True)
    results = {
        "kind": "stream", "status": "completed", "adapt": adapt,
        "choices": {"stream": "demo", "adapt": adapt},
        "overrides": [f"ckpt_path=/runs/{train_seed}/checkpoints/last.ckpt", f"adapt={adapt}", "report.window=50",
                      *stream_overrides],
        "sources": [{"checkpoint": f"/runs/{train_seed}/checkpoints/last.ckpt", "seed": train_seed,
                     "choices": {"data": "demo", "model": "bisenet_r18", "adaptation": "dacs", "logger": "csv"},
                     "overrides": [*train_overrides, f"seed={train_seed}"]}],
        "mIoU": miou, "per_condition": per_condition, "harmonic_mean": min(per_condition.values()),
        "fps": fps, "resets": resets, "IoU": dict(zip(CLASSES, [miou, None, miou / 2])),
        "forgetting": {"forgetting": 0.01 * train_seed},
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_stream_runs_group_by_the_checkpoints_setting_and_the_stream_with_per_condition_columns(tmp_path, capsys):
    root = tmp_path / "stream_sweep"
    train = ["experiment=demo_dacs"]
    for i, (seed, adapt) in enumerate([(1, "none"), (2, "none"), (1, "bn"), (2, "bn")]):
        gain = 0.2 if adapt == "bn" else 0.0
        fake_stream_run(root / f"{i}_adapt={adapt}", train, seed, adapt, 0.30 + gain + 0.02 * seed,
                        {"clear": 0.4, "night": 0.05 + gain + 0.02 * seed}, fps=10.0 + seed, resets=seed - 1)
    # another stream setting (an override of the online method): its own row
    fake_stream_run(root / "4_adapt=bn_lr", train, 1, "bn", 0.6, {"clear": 0.5, "night": 0.5}, 9.0,
                    stream_overrides=["adapt.method.momentum=0.5"])
    runs = load_runs([root])
    assert all(r["status"] == "completed" for r in runs) and [r["seed"] for r in runs] == [1, 2, 1, 2, 1]
    assert runs[0]["setting"] == {"data": "demo", "model": "bisenet_r18", "adaptation": "dacs",
                                  "experiment": "demo_dacs", "stream": "demo", "adapt": "none"}
    rows = summarize(runs)
    assert [r["runs"] for r in rows] == [2, 2, 1]
    none, bn, lr = rows
    assert "adapt=none" in none["group"] and "adapt.method.momentum=0.5" in lr["group"]
    assert none["mIoU"] == pytest.approx(33.0) and bn["mIoU"] == pytest.approx(53.0)
    assert bn["mIoU/night"] == pytest.approx(28.0) and bn["mIoU_std/night"] == pytest.approx(100 * math.sqrt(2e-4))
    assert bn["mIoU/clear"] == pytest.approx(40.0)
    assert bn["fps"] == pytest.approx(11.5) and bn["resets"] == pytest.approx(0.5)
    assert bn["harmonic_mean"] == pytest.approx(28.0) and bn["forgetting"] == pytest.approx(1.5)
    assert bn["IoU/car"] == pytest.approx(26.5) and bn["IoU/sidewalk"] is None

    result = compare([root], out=tmp_path / "report")
    text = capsys.readouterr().out
    assert "night (%)" in text and "H-mean (%)" in text and "not averaged" not in text
    with open(result["files"]["csv"]) as f:
        lines = list(csv.DictReader(f))
    assert float(lines[1]["mIoU/night"]) == pytest.approx(28.0) and float(lines[1]["fps"]) == pytest.approx(11.5)
    assert "| adapt=bn" in (tmp_path / "report" / "comparison.md").read_text().replace("`", "")
