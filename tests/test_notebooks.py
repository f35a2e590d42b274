"""The notebooks (notebooks/*.ipynb): each executed end to end on the tiny demo pair, its parameters replaced
as papermill does (an ``injected-parameters`` cell after the ``parameters`` cell), no cell may fail and each
must draw its figures; and the committed notebooks carry no outputs."""

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from helpers import REPO, TINY_DEMO
from nbclient import NotebookClient

from rtda.data.labels import CLASS_NAMES

NOTEBOOKS = REPO / "notebooks"
#: the tiny demo's spec, as the command-line overrides of a run that must not regenerate it
DEMO_SPEC = [f"+data.prepare.{k}={v}" for k, v in TINY_DEMO.items() if k != "seed"]
#: a run of a few seconds on the tiny demo
TINY_TRAIN = ["trainer.max_steps=4", "trainer.val_check_interval=4", "data.batch_size=2", "data.num_workers=0",
              *DEMO_SPEC]


def test_the_three_notebooks_are_there_with_a_parameters_cell_and_no_outputs():
    """Outputs stay out of git: a committed notebook holds no outputs nor execution counts."""
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_data.ipynb", "02_predictions.ipynb", "03_results.ipynb"]
    for path in NOTEBOOKS.glob("*.ipynb"):
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        code = [c for c in book.cells if c.cell_type == "code"]
        dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
        assert not dirty, f"{path.name}: code cells {dirty} hold outputs or execution counts: clear them before committing"
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: the first code cell is not the parameters cell"
        assert book.metadata.get("kernelspec", {}).get("name") == "python3"


def run_notebook(name: str, params: dict, cwd: Path):
    """Execute notebooks/<name> in ``cwd`` with ``params`` replacing the parameters cell's values; every
    parameter given must be one the notebook declares. Returns the executed notebook."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
    declared = book.cells[index].source
    for key in params:
        assert f"\n{key} = " in "\n" + declared, f"{name}: no parameter {key}"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(index + 1, injected)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    (cwd / name).write_text(nbformat.writes(book))  # kept with the test's files, to look at when a test fails
    return book


def figures(book) -> list[int]:
    """PNG images each code cell displayed (after execution), in order (the injected cell left out)."""
    cells = [c for c in book.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    return [sum("image/png" in o.get("data", {}) for o in c.outputs) for c in cells]


def outputs_of(book, mime: str) -> list[str]:
    return [o["data"][mime] for c in book.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


def errors(book) -> list[str]:
    return [o.get("ename", "") for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


@pytest.fixture
def demo_copy(tiny_demo_dir, tmp_path) -> Path:
    """A data folder with a copy of the session's tiny demo (the notebooks cache statistics next to the data)."""
    shutil.copytree(tiny_demo_dir / "demo", tmp_path / "data" / "demo", ignore=shutil.ignore_patterns("*.lock", ".*lock*"))
    return tmp_path / "data"


@pytest.mark.slow
def test_01_data_draws_both_domains_statistics_fda_and_a_cyclegan_it_trains(demo_copy, tmp_path):
    cyclegan = ["experiment=demo_cyclegan", "trainer.max_steps=2", "trainer.val_check_interval=2", "adaptation.ngf=8",
                "adaptation.ndf=8", "adaptation.n_blocks=2", "data.num_workers=0", *DEMO_SPEC]
    book = run_notebook("01_data.ipynb", {"DATA_DIR": str(demo_copy), "N_SAMPLES": 2, "STATS_IMAGES": 4,
                                          "OUTPUTS": str(tmp_path / "outputs"), "CYCLEGAN_TRAIN": cyclegan}, tmp_path)
    assert not errors(book)
    # parameters, setup, legend, samples, class distributions, image statistics, FDA, CycleGAN
    assert figures(book) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert "source: 12 images" in "".join(o.get("text", "") for c in book.cells for o in c.get("outputs", []))
    assert (tmp_path / "outputs" / "train" / "runs" / "nb_cyclegan" / "checkpoints" / "last.ckpt").is_file()
    cached = json.loads((demo_copy / "demo" / "cityscapes" / "class_stats_train.json").read_text())
    assert cached["images"] == TINY_DEMO["target_train_count"]


@pytest.mark.slow
def test_02_predictions_finds_a_run_trains_the_missing_method_and_draws_its_figures(demo_copy, trained_run, tmp_path):
    outputs = tmp_path / "outputs"
    found = outputs / "train" / "runs" / "source_only_run"  # the session's source-only run, found under OUTPUTS
    found.mkdir(parents=True)
    shutil.copy(trained_run["folder"] / "results.json", found / "results.json")
    methods = {"source-only": "data=demo adaptation=source_only", "FDA": "data=demo adaptation=fda"}
    book = run_notebook("02_predictions.ipynb", {"DATA_DIR": str(demo_copy), "OUTPUTS": str(outputs), "METHODS": methods,
                                                 "TRAIN": TINY_TRAIN, "N_IMAGES": 2}, tmp_path)
    assert not errors(book)
    # parameters, setup, predictions, legend, error maps, IoU bars, one confusion matrix per method
    assert figures(book) == [0, 0, 1, 1, 1, 1, 2]
    made = json.loads((outputs / "train" / "runs" / "nb_FDA" / "results.json").read_text())
    assert made["status"] == "completed" and made["choices"]["adaptation"] == "fda"
    assert not (outputs / "train" / "runs" / "nb_source-only").exists()  # found, not trained again
    printed = "".join(o.get("text", "") for c in book.cells for o in c.get("outputs", []))
    assert f"source-only: target test mIoU {100 * trained_run['test/mIoU']:.2f}" in printed


def fake_run(folder: Path, choices: dict, seed: int, miou: float, overrides=()) -> None:
    """A finished rtda-train run's results.json: per-class IoU spread around ``miou``."""
    import random

    rng = random.Random(f"{folder.name}")
    iou = {name: min(max(miou + rng.uniform(-0.15, 0.15), 0.0), 1.0) for name in CLASS_NAMES}
    iou["train"] = None  # absent from ground truth and prediction: left out of the means
    scores = [v for v in iou.values() if v is not None]
    miou = sum(scores) / len(scores)
    folder.mkdir(parents=True)
    results = {"status": "completed", "choices": {"paths": "default", "logger": "csv", **choices}, "seed": seed,
               "overrides": [*overrides, f"seed={seed}", "trainer.max_steps=200"], "run_dir": str(folder),
               "test": {"mIoU": miou, "IoU": iou}, "test/mIoU": miou, "best_val_mIoU": miou}
    (folder / "results.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_03_results_reads_a_sweep_measures_the_missing_speed_and_draws_the_trade_off(tmp_path):
    sweep = tmp_path / "sweep"
    bisenet = {"data": "demo", "model": "bisenet_r18"}
    settings = [("oracle", {**bisenet, "data": "demo_oracle", "adaptation": "source_only"}, 0.60),
                ("source_only", {**bisenet, "adaptation": "source_only"}, 0.35),
                ("fda", {**bisenet, "adaptation": "fda"}, 0.42),
                ("deeplab", {"data": "demo", "model": "deeplabv2_r101", "adaptation": "source_only"}, 0.40)]
    job = 0
    for name, choices, miou in settings:
        for seed in (0, 1) if name != "deeplab" else (0,):
            fake_run(sweep / f"{job}_{name}_seed-{seed}", choices, seed, miou + 0.02 * seed)
            job += 1
    outputs = tmp_path / "outputs"  # rtda-bench result of DeepLabV2 found there; BiSeNet measured by the notebook
    (outputs / "bench" / "runs" / "deeplab").mkdir(parents=True)
    (outputs / "bench" / "runs" / "deeplab" / "bench.json").write_text(json.dumps([
        {"model": "deeplabv2_r101", "variant": "eager", "device": "cpu", "precision": "fp32", "input": "1x3x64x128",
         "fps": 3.5, "median_ms": 285.0, "machine": {"device": "a CPU"}}]))
    specs = {"target-trained": "data=demo_oracle", "source-only": "data=demo adaptation=source_only model=bisenet_r18",
             "FDA": "data=demo adaptation=fda", "DeepLabV2 source-only": "model=deeplabv2_r101"}
    bench = ["bench.matmul_ceiling=false", "bench.warmup=1", "bench.min_runs=3", "bench.max_runs=5", "bench.max_seconds=1"]
    book = run_notebook("03_results.ipynb", {"OUTPUTS": str(outputs), "RUNS": [str(sweep)], "SETTINGS": specs,
                                             "BENCH_SIZE": [64, 128], "BENCH": bench}, tmp_path)
    assert not errors(book)
    # parameters, setup, seed table, mIoU bars, compare's table, compare's plot, recovery, accuracy vs FPS
    assert figures(book) == [0, 0, 0, 1, 0, 1, 1, 1]
    seed_table, compare_table = outputs_of(book, "text/markdown")
    assert seed_table.splitlines()[0] == "| setting | seed 0 | seed 1 | mean ± std |"
    assert [line.split(" | ")[0] for line in seed_table.splitlines()[2:]] == [f"| {k}" for k in specs]
    assert "| 4 settings" not in compare_table and compare_table.count("\n|") >= 5
    measured = list((outputs / "bench" / "runs").glob("nb_bisenet_r18*/bench.json"))
    assert len(measured) == 1 and json.loads(measured[0].read_text())[0]["input"] == "1x3x64x128"


# -- rtda.analysis.notebook: how the notebooks find their inputs (seconds) ---------------------------------------------

def test_specs_select_runs_and_rows_by_their_command_line(tmp_path):
    from rtda.analysis.compare import summarize
    from rtda.analysis.notebook import find_runs, matches, parse_spec, seed_table, select_rows

    assert parse_spec("data=demo +adaptation.beta=0.05") == {"data": "demo", "adaptation.beta": "0.05"}
    with pytest.raises(Exception, match="not key=value"):
        parse_spec("data")
    base = {"data": "demo", "model": "bisenet_r18"}
    fake_run(tmp_path / "a0", {**base, "adaptation": "source_only"}, 0, 0.30)
    fake_run(tmp_path / "a1", {**base, "adaptation": "source_only"}, 1, 0.34)
    fake_run(tmp_path / "b0", {**base, "adaptation": "fda"}, 0, 0.40, overrides=["adaptation.beta=0.05"])
    fake_run(tmp_path / "c0", {**base, "data": "demo_oracle", "adaptation": "source_only"}, 0, 0.6)
    (tmp_path / "c0" / "results.json").write_text((tmp_path / "c0" / "results.json").read_text()
                                                  .replace('"completed"', '"failed"'))
    runs = find_runs([tmp_path, tmp_path / "missing"], "data=demo adaptation=source_only")
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert [r["seed"] for r in find_runs(tmp_path, "adaptation.beta=0.05")] == [0]
    assert find_runs(tmp_path, "data=demo_oracle") == []  # failed: never used
    assert matches(runs[0], "model=bisenet_r18") and not matches(runs[0], "adaptation=fda")
    all_runs = find_runs(tmp_path)
    rows = select_rows(summarize(all_runs), {"FDA": "adaptation=fda", "source-only": "data=demo adaptation=source_only",
                                             "none": "adaptation=advent"})
    assert [(r["label"], r["runs"]) for r in rows] == [("FDA", 1), ("source-only", 2)]
    table = seed_table(rows, all_runs).splitlines()
    assert table[0] == "| setting | seed 0 | seed 1 | mean ± std |"
    assert table[2].startswith("| FDA | ") and table[2].endswith(" |  | " + f"{rows[0]['mIoU']:.2f} |")
    assert table[3].startswith("| source-only | ") and " ± " in table[3]


def test_bench_rows_take_the_newest_matching_result_and_speed_points_join_them(tmp_path):
    import os

    from rtda.analysis.notebook import bench_rows, speed_points
    from rtda.run.errors import RtdaError

    def write(folder, rows, mtime):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "bench.json").write_text(json.dumps(rows))
        os.utime(tmp_path / folder / "bench.json", (mtime, mtime))

    row = {"model": "bisenet_r18", "variant": "eager", "input": "1x3x64x128", "fps": 50.0}
    write("old", [row], 1000)
    write("new", [{**row, "fps": 60.0}, {**row, "variant": "plain", "fps": 99.0}, {**row, "input": "1x3x32x64", "fps": 1.0}], 2000)
    speeds = bench_rows(tmp_path, ["bisenet_r18"], (64, 128))
    assert speeds["bisenet_r18"]["fps"] == 60.0
    with pytest.raises(RtdaError, match="no rtda-bench result for model=deeplabv2_r101"):
        bench_rows(tmp_path, ["deeplabv2_r101"], (64, 128))  # and no outputs folder to measure it into
    rows = [{"group": "g", "label": "FDA", "setting": {"model": "bisenet_r18"}, "mIoU": 40.0, "mIoU_std": 1.0},
            {"group": "h", "setting": {"model": "deeplabv2_r101"}, "mIoU": 45.0, "mIoU_std": None}]
    points = speed_points(rows, speeds)  # the network without a speed is left out
    assert [{k: p[k] for k in ("label", "model", "method", "fps", "mIoU", "mIoU_std", "on_front")} for p in points] == [
        {"label": "FDA", "model": "bisenet_r18", "method": "FDA", "fps": 60.0, "mIoU": 40.0, "mIoU_std": 1.0, "on_front": True}]


def test_a_runs_checkpoint_is_the_tested_one_else_last(tmp_path):
    from rtda.analysis.notebook import checkpoint_of
    from rtda.run.errors import RtdaError

    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    run = {"run_dir": str(tmp_path), "results": {"checkpoint": str(tmp_path / "gone.ckpt")}}
    with pytest.raises(RtdaError, match="no checkpoint"):
        checkpoint_of(run)
    last.write_bytes(b"")
    assert checkpoint_of(run) == last
    best = tmp_path / "best.ckpt"
    best.write_bytes(b"")
    assert checkpoint_of({**run, "results": {"checkpoint": str(best)}}) == best


def test_runs_for_uses_what_is_there_and_trains_only_what_is_missing(tmp_path, monkeypatch):
    import rtda.analysis.notebook as nb

    trained = []

    def fake_train(spec, outputs, overrides, name, data_dir):
        trained.append((spec, list(overrides), name))
        return {"run_dir": name, "seed": int(overrides[-1].split("=")[1]) if overrides and "seed=" in overrides[-1] else None}

    monkeypatch.setattr(nb, "train", fake_train)
    outputs = tmp_path / "outputs"
    fake_run(outputs / "train" / "runs" / "a", {"data": "demo", "adaptation": "source_only"}, 0, 0.3)
    specs = {"source-only": "data=demo adaptation=source_only", "FDA": "data=demo adaptation=fda"}
    runs = nb.runs_for(specs, outputs, ["trainer.max_steps=5"])
    assert runs["source-only"]["seed"] == 0 and trained == [("data=demo adaptation=fda", ["trainer.max_steps=5"], "nb_FDA")]
    trained.clear()
    runs = nb.runs_for(specs, outputs, ["trainer.max_steps=5"], seeds=[0, 1])
    assert [r["seed"] for r in runs["source-only"]] == [0, 1] and [r["seed"] for r in runs["FDA"]] == [0, 1]
    assert [name for *_, name in trained] == ["nb_source-only_seed1", "nb_FDA_seed0", "nb_FDA_seed1"]
