"""``rtda-bench``: parameters, FLOPs, latency and FPS of a network at a resolution, device and precision.

    rtda-bench                                          # BiSeNet-R18, 512x1024, CPU, fp32
    rtda-bench model=deeplabv2_r101 bench.device=cuda bench.precision=bf16
    rtda-bench -m model=bisenet_r18,deeplabv2_r101      # one comparison table at the end

Rows (``bench.variants``): ``plain`` is the bare ``nn.Module`` forward under ``torch.no_grad`` (the
baseline, NCHW); ``eager`` is rtda's own inference path (``SegmentationModule.predict_logits``, NHWC
unless ``bench.channels_last=false``), so the ratio of the two shows any wrapper overhead or gain;
``channels_last`` (the bare module in NHWC); ``compile`` (``torch.compile``, compile time
excluded, reported apart); ``onnxruntime`` (ONNX export of the eval-mode network, fp32, run by ONNX
Runtime: the deployment path on a CPU). Achieved GFLOP/s is FLOPs / median latency; on the CPU it is also
given as a fraction of the matmul ceiling measured in the same run (the best of PyTorch's and ONNX
Runtime's fp32 GEMM, both reported).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import resource
import tempfile
import time
from pathlib import Path

import hydra
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rtda.adaptation.segmentation import SegmentationModule
from rtda.bench.complexity import (
    count_flops,
    count_parameters,
    measure_interleaved,
    onnxruntime_matmul_gflops,
    torch_matmul_gflops,
)
from rtda.bench.data import DATA_COLUMNS
from rtda.bench.training import TRAIN_COLUMNS
from rtda.run.checkpoints import build_net, load_checkpoint
from rtda.run.errors import ConfigValueError

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["model", "variant", "device", "precision", "input", "params_M", "GFLOPs", "GMACs", "median_ms", "p90_ms",
           "fps", "GFLOP/s", "ceiling_%", "torch_mm_%", "vs_plain", "peak_mem_MB", "threads", "note"]


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise ConfigValueError("bench.precision=fp16 needs bench.device=cuda (use bf16 on the CPU)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _onnx_runner(net: torch.nn.Module, example: torch.Tensor, device: torch.device, threads: int):
    import logging

    import onnxruntime as ort

    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO logs would bury the table
        logging.getLogger(noisy).setLevel(logging.WARNING)
    folder = tempfile.mkdtemp(prefix="rtda-onnx-")
    path = Path(folder) / "model.onnx"
    export_start = time.perf_counter()
    torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"], dynamo=True,
                      opset_version=18, verbose=False)
    export_s = time.perf_counter() - export_start
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    feed = {"image": example.detach().cpu().numpy()}
    return (lambda: session.run(None, feed)), f"export {export_s:.1f}s, {session.get_providers()[0]}", session, feed


def _variant(variant, net, module, model_cfg, example, device, precision, threads):
    """The timed callable of one row, and a note for the table."""
    if variant == "plain":
        def fn():
            with torch.no_grad(), _autocast(device, precision):
                return net(example)
        return fn, ""
    if variant == "eager":
        def fn():
            with _autocast(device, precision):
                return module.predict_logits(example)
        return fn, ""
    if variant == "channels_last":
        net_cl = hydra.utils.instantiate(model_cfg).eval().to(device).to(memory_format=torch.channels_last)
        net_cl.load_state_dict(net.state_dict())
        example_cl = example.contiguous(memory_format=torch.channels_last)

        def fn():
            with torch.no_grad(), _autocast(device, precision):
                return net_cl(example_cl)
        return fn, ""
    if variant == "compile":
        compiled = torch.compile(net)
        start = time.perf_counter()
        with torch.no_grad(), _autocast(device, precision):
            compiled(example)

        def fn():
            with torch.no_grad(), _autocast(device, precision):
                return compiled(example)
        return fn, f"compile {time.perf_counter() - start:.1f}s"
    if variant == "onnxruntime":
        fn, note, *_ = _onnx_runner(net, example, device, threads)
        return fn, note + (", fp32 graph" if precision != "fp32" else "")
    raise ConfigValueError(f"bench.variants: unknown variant {variant!r} (plain, eager, channels_last, compile, onnxruntime)")


def benchmark(cfg: DictConfig) -> list[dict]:
    b = cfg.bench
    device = torch.device(b.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigValueError("bench.device=cuda but no CUDA device is visible")
    if b.precision not in PRECISIONS:
        raise ConfigValueError(f"bench.precision={b.precision!r}: expected one of {sorted(PRECISIONS)}")
    if b.threads:
        torch.set_num_threads(int(b.threads))
    threads = torch.get_num_threads()
    if b.get("ckpt_path"):  # the segmenter of any method's checkpoint (weights_only), as its run configured it

        ckpt = load_checkpoint(b.ckpt_path)
        model_cfg = {**ckpt["rtda"]["config"]["model"], "pretrained": False}
        net = build_net(ckpt).to(device)
        name = ckpt["rtda"].get("choices", {}).get("model", type(net).__name__)
    else:
        model_cfg = dict(cfg.model)
        model_cfg["pretrained"] = False  # weights do not change the speed; fetch nothing
        net = hydra.utils.instantiate(model_cfg).eval().to(device)
        name = hydra.core.hydra_config.HydraConfig.get().runtime.choices.get("model", type(net).__name__)
    example = torch.randn(b.batch_size, 3, b.height, b.width, device=device)

    params = count_parameters(net, example[:1])
    flops = count_flops(net, example[:1])
    ceilings = {}
    if b.matmul_ceiling:
        dtype = PRECISIONS[b.precision] if device.type == "cuda" and PRECISIONS[b.precision] else torch.float32
        ceilings["torch"] = torch_matmul_gflops(device, dtype)
        if device.type == "cpu":
            ort_ceiling = onnxruntime_matmul_gflops(threads)
            if ort_ceiling:
                ceilings["onnxruntime"] = ort_ceiling
    ceiling = max(ceilings.values()) if ceilings else None

    # rtda's inference path on its own copy (it may change the copy's memory format), same weights
    module = SegmentationModule(net=copy.deepcopy(net), num_classes=cfg.data.num_classes, num_log_images=0,
                                channels_last=b.channels_last).eval()
    fns, notes, rows = {}, {}, []
    for variant in b.variants:
        try:
            fns[variant], notes[variant] = _variant(variant, net, module, model_cfg, example, device, b.precision, threads)
        except ImportError as err:
            rows.append({"model": name, "variant": variant, "note": f"skipped: {err}"})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = measure_interleaved(fns, device, warmup=b.warmup, min_runs=b.min_runs, max_runs=b.max_runs,
                                max_seconds=b.max_seconds * len(fns))
    for variant, st in stats.items():
        achieved = flops * b.batch_size / (st["median_ms"] / 1000.0) / 1e9
        rows.append({
            "model": name, "variant": variant, "device": str(device), "precision": b.precision,
            "input": f"{b.batch_size}x3x{b.height}x{b.width}", "params_M": params["inference_params"] / 1e6,
            "params_with_training_heads_M": params["params"] / 1e6,
            "trainable_params": params["trainable_params"], "GFLOPs": flops / 1e9, "GMACs": flops / 2e9,
            "median_ms": st["median_ms"], "p90_ms": st["p90_ms"], "fps": st["fps"] * b.batch_size,
            "runs": st["runs"], "GFLOP/s": achieved,
            "ceiling_%": (100.0 * achieved / ceiling) if ceiling and device.type == "cpu" else None,
            "torch_mm_%": (100.0 * achieved / ceilings["torch"]) if "torch" in ceilings else None,
            "peak_mem_MB": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
            "threads": threads, "note": notes[variant],
        })
    plain = next((r for r in rows if r.get("variant") == "plain" and "median_ms" in r), None)
    for r in rows:
        if plain and "median_ms" in r:
            r["vs_plain"] = r["median_ms"] / plain["median_ms"]
    record = machine_record(cfg, ceilings)
    for r in rows:
        r["machine"] = record
    return rows


def machine_record(cfg: DictConfig, ceilings: dict | None = None) -> dict:
    device = torch.device(cfg.bench.device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "matmul_ceiling_GFLOPs": ceilings or {},
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    cols = [c for c in (columns or _columns(rows)) if any(r.get(c) not in (None, "") for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _columns(rows: list[dict]) -> list[str]:
    """The table's columns for the kind of rows (inference, training or data pipeline)."""
    kinds = {r.get("mode", "infer") for r in rows}
    if kinds == {"train"}:
        return TRAIN_COLUMNS
    if kinds == {"data"}:
        return DATA_COLUMNS
    if kinds == {"infer"}:
        return COLUMNS
    return list(dict.fromkeys(["mode", *COLUMNS, *TRAIN_COLUMNS, *DATA_COLUMNS]))  # a collection of several kinds


def format_tables(rows: list[dict]) -> str:
    """One table per kind of rows (inference, training, data pipeline), in that order."""
    parts = []
    for mode in ("infer", "train", "data"):
        some = [r for r in rows if r.get("mode", "infer") == mode]
        if some:
            parts.append(format_table(some))
    return "\n\n".join(parts)


def write_rows(rows: list[dict], folder: Path, name: str = "bench") -> None:
    """``name.json`` and ``name.csv`` in ``folder`` (one job: bench; a collection: comparison)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(rows, indent=2))
    with open(folder / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def machine_line(rows: list[dict]) -> str:
    m = rows[0]["machine"]
    ceil = ", ".join(f"{k} {v:.0f}" for k, v in m["matmul_ceiling_GFLOPs"].items())
    return f"{m['device']}, {m['threads']} threads, torch {m['torch']}; matmul ceiling GFLOP/s: {ceil or 'not measured'}; " \
           f"peak RSS {m['peak_rss_MB']:.0f} MB"


def collect(folder: str | Path) -> list[dict]:
    """Every job's ``bench.json`` below ``folder`` (a sweep, or a folder of sweeps) as one list of rows."""
    rows = []
    for path in sorted(Path(folder).rglob("bench.json")):
        rows += json.loads(path.read_text())
    return rows


class ComparisonTable(Callback):
    """Hydra callback: after ``rtda-bench -m ...`` print one table of every job's rows."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        rows = collect(sweep)
        if rows:
            write_rows(rows, sweep, "comparison")
            print(f"\nrtda-bench comparison ({machine_line(rows)})\n{format_tables(rows)}\nwritten to {sweep / 'comparison.csv'}")
