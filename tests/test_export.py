"""rtda-export on the checkpoint of a short run: the fp32 file scores what the checkpoint scores through rtda-eval
(within 0.05 mIoU points), takes uint8 images of any batch, carries its card; fp16 and INT8 files are written,
checked, scored and timed; a failed export leaves nothing behind."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import rtda_eval, run_in_process

from rtda.cli.bench import main as bench_main
from rtda.cli.export import main as export_main
from rtda.models.deploy import SegmenterGraph, onnx_session
from rtda.run.checkpoints import build_net, load_checkpoint


def _export(trained_run, out: Path, *args):
    proc = run_in_process(export_main, [f"ckpt_path={trained_run['checkpoint']}", f"out={out}", *args], trained_run["cwd"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _scores(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def fp32(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    proc = _export(trained_run, out)
    return {"file": out / "model.onnx", "card": json.loads((out / "model.json").read_text()), "out": out,
            "stdout": proc.stdout}


def test_fp32_file_and_its_card(fp32, trained_run):
    card = fp32["card"]
    assert sorted(p.name for p in fp32["out"].iterdir()) == ["model.json", "model.onnx"]  # no temporary left
    onnx.checker.check_model(str(fp32["file"]))
    assert card["format"] == "onnx" and card["file"] == "model.onnx"
    assert card["input"]["dtype"] == "uint8" and card["input"]["layout"] == "NCHW"
    assert card["input"]["shape"] == ["batch", 3, 128, 256]  # the run's data.eval_size (the demo's)
    assert card["input"]["normalization"]["inside_graph"] is True
    assert card["num_classes"] == 19 and card["classes"][0] == "road" and card["palette"][0] == [128, 64, 128]
    assert card["training_run"]["checkpoint"] == str(Path(trained_run["checkpoint"]).resolve())
    assert "augmentation=geometric" in card["training_run"]["overrides"]
    assert card["exporter"]["torch"] and card["exporter"]["onnxruntime"] and card["opset"] == 18
    assert card["checks"]["onnx_checker"] == "passed" and card["checks"]["label_agreement_vs_checkpoint"] > 0.999
    assert "score it: rtda-eval ckpt_path=" in fp32["stdout"]


def test_fp32_file_runs_any_batch_as_the_checkpoint(fp32, trained_run):
    ckpt = load_checkpoint(trained_run["checkpoint"])
    graph = SegmenterGraph(build_net(ckpt)).eval()
    session = onnx_session(fp32["file"])
    images = torch.randint(0, 256, (3, 3, 128, 256), dtype=torch.uint8)
    got = session.run(None, {"image": images.numpy()})[0]
    with torch.no_grad():
        ref = graph(images).numpy()
    assert got.shape == (3, 19, 128, 256)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.999


def test_fp32_file_scores_the_checkpoints_miou_through_rtda_eval(fp32, trained_run):
    results = _scores(rtda_eval([f"ckpt_path={fp32['file']}", "plot_confusion_matrix=false", "save_predictions=1"],
                                cwd=trained_run["cwd"]))
    # the bar: within 0.05 mIoU points of the checkpoint (scores are fractions here)
    assert abs(results["test/mIoU"] - trained_run["test/mIoU"]) <= 0.05 / 100
    assert sum(map(sum, results["test/confmat"])) == sum(map(sum, trained_run["test/confmat"]))  # same labels
    assert "onnx file, ONNX Runtime CPUExecutionProvider" in results["experiment"]
    assert results["checkpoints"] == [str(fp32["file"].resolve())]


def test_exported_file_takes_only_its_own_size(fp32, trained_run):
    proc = rtda_eval([f"ckpt_path={fp32['file']}", "data.eval_size=[64,128]"], cwd=trained_run["cwd"])
    assert proc.returncode == 1
    assert "rtda: error: data.eval_size=[64, 128]" in proc.stderr and "exported for [128, 256]" in proc.stderr


def test_labels_output_at_another_size_without_the_data(trained_run, tmp_path):
    # fp32 needs no data: without the target images the file is checked on random ones (INT8 would stop)
    proc = _export(trained_run, tmp_path / "labels.onnx", "output=labels", "size=[64,128]", "check_images=2",
                   f"data.target.root={tmp_path / 'nowhere'}")
    assert "(on 2 random images (no target images:" in proc.stdout
    card = json.loads((tmp_path / "labels.json").read_text())
    assert card["output"] == {"name": "labels", "dtype": "uint8", "shape": ["batch", 64, 128],
                              "note": "train ids (argmax of the logits)"}
    session = onnx_session(tmp_path / "labels.onnx")
    labels = session.run(None, {"image": np.zeros((2, 3, 64, 128), np.uint8)})[0]
    assert labels.dtype == np.uint8 and labels.shape == (2, 64, 128) and labels.max() < 19


@pytest.mark.slow
def test_fp16_and_int8_files_are_written_scored_and_timed(fp32, trained_run, tmp_path):
    out = tmp_path / "deploy"
    _export(trained_run, out, "format=onnx_fp16", "check_images=2")
    proc = _export(trained_run, out, "format=onnx_int8", "calibration.images=6", "calibration.method=entropy",
                   "calibration.entropy_bins=512")
    assert "INT8 calibration: entropy on 6 target images" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["model_fp16.json", "model_fp16.onnx", "model_int8.json",
                                                     "model_int8.onnx"]
    int8 = onnx.load(str(out / "model_int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ
    per_channel = [n for n in int8.graph.initializer if n.name.endswith("_scale") and len(n.dims) == 1 and n.dims[0] > 1]
    assert per_channel  # per-channel weight scales
    card = json.loads((out / "model_int8.json").read_text())
    assert card["quantization"]["calibration"] == {"method": "entropy", "images": 6, "split": "target",
                                                   "histogram_bins": 512}
    assert (out / "model_int8.onnx").stat().st_size < 0.4 * fp32["file"].stat().st_size
    fp16 = onnx_session(out / "model_fp16.onnx")
    assert fp16.get_inputs()[0].type == "tensor(uint8)" and fp16.get_outputs()[0].type == "tensor(float)"

    for name, tolerance in (("model_fp16.onnx", 0.01), ("model_int8.onnx", 0.5)):  # scored; drops reported
        results = _scores(rtda_eval([f"ckpt_path={out / name}", "plot_confusion_matrix=false"], cwd=trained_run["cwd"]))
        assert abs(results["test/mIoU"] - trained_run["test/mIoU"]) <= tolerance

    args = [f"bench.model_path=[{fp32['file']},{out / 'model_int8.onnx'}]", "bench.height=128", "bench.width=256",
            "bench.variants=[eager]", "bench.max_seconds=0.05", "bench.min_runs=2", "bench.warmup=1",
            "bench.matmul_ceiling=false"]
    proc = run_in_process(bench_main, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(next(Path(tmp_path).rglob("bench.json")).read_text())
    assert [r["variant"] for r in rows] == ["eager", "onnx", "onnx_int8"]  # beside the card's checkpoint
    assert [r["precision"] for r in rows] == ["fp32", "fp32", "int8"]
    assert all(r["median_ms"] > 0 and r["input"] == "1x3x128x256" for r in rows)
    assert "onnx_int8" in proc.stdout and "model_int8.onnx, CPUExecutionProvider" in proc.stdout


def test_bench_of_a_file_alone(fp32, tmp_path):
    copy = tmp_path / "elsewhere.onnx"  # no card beside it: no checkpoint to time, the file's row only
    copy.write_bytes(fp32["file"].read_bytes())
    args = [f"bench.model_path={copy}", "bench.max_seconds=0.05", "bench.min_runs=2", "bench.warmup=1",
            "bench.matmul_ceiling=false"]
    proc = run_in_process(bench_main, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(next(Path(tmp_path).rglob("bench.json")).read_text())
    assert [(r["variant"], r["input"]) for r in rows] == [("onnx", "1x3x128x256")] and rows[0]["fps"] > 0


def test_failed_export_leaves_nothing(trained_run, tmp_path, monkeypatch):
    import rtda.pipelines.export as export_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure after the graph was written")

    monkeypatch.setattr(export_module, "_check", broken)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_in_process(export_main, [f"ckpt_path={trained_run['checkpoint']}", f"out={out}"], trained_run["cwd"])
    assert proc.returncode == 1 and "simulated failure" in proc.stderr
    assert list(out.iterdir()) == []  # neither the file, its card, nor a temporary


@pytest.mark.parametrize("args, message", [
    (["format=tflite"], "format='tflite': expected one of onnx, onnx_fp16, onnx_int8"),
    (["format=onnx_int8", "calibration.method=kl"], "calibration.method='kl': expected one of minmax, entropy"),
    (["output=probs"], "output='probs': expected logits or labels"),
    (["size=[8,8]"], "size=[8, 8]: expected at least 16 pixels a side"),
])
def test_bad_keys_are_one_line_errors(trained_run, tmp_path, args, message):
    proc = run_in_process(export_main, [f"ckpt_path={trained_run['checkpoint']}", f"out={tmp_path}", *args],
                          trained_run["cwd"])
    assert proc.returncode == 1 and f"rtda: error: {message}" in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.glob("*.onnx")) == []


def test_a_file_that_is_not_onnx_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    proc = rtda_eval([f"ckpt_path={bad}"], cwd=tmp_path)
    assert proc.returncode == 1 and f"rtda: error: {bad} is not an ONNX model ONNX Runtime can load" in proc.stderr
