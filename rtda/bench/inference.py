"""``rtda-bench``: parameters, FLOPs, latency and FPS of a network at a resolution, device and precision.

    rtda-bench                                          # BiSeNet-R18, 512x1024, CPU, fp32
    rtda-bench model=deeplabv2_r101 bench.device=cuda bench.precision=bf16
    rtda-bench -m model=bisenet_r18,deeplabv2_r101      # one comparison table at the end

Rows (``bench.variants``): ``plain`` is the bare ``nn.Module`` forward under ``torch.no_grad`` (the
baseline, NCHW); ``eager`` is rtda's own inference path (``SegmentationModule.predict_logits``, NHWC
unless ``bench.channels_last=false``), so the ratio of the two shows any wrapper overhead or gain;
``channels_last`` (the bare module in NHWC); ``compile`` (``torch.compile``, compile time
excluded, reported apart); ``onnxruntime`` (ONNX export of the eval-mode network, fp32, run by ONNX
Runtime: the deployment path on a CPU). ``bench.model_path=model.onnx`` (or a list) adds a row per file written by
``rtda-export`` (variant: its format, ``onnx`` / ``onnx_fp16`` / ``onnx_int8``; on ``bench.device=cuda`` one per
TensorRT and CUDA provider installed), beside the rows of its checkpoint (``bench.ckpt_path``, else the one its
card names). Achieved GFLOP/s is FLOPs / median latency; on the CPU it is also
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
import numpy as np
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
from rtda.models.deploy import execution_providers, export_onnx, onnx_session, read_card
from rtda.run import config as rtda_config
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
    """The ``onnxruntime`` row: the bare network exported as it is (float input, fixed shape) and run by ONNX Runtime
    (CUDA when ``device`` is and ORT has it)."""
    folder = tempfile.mkdtemp(prefix="rtda-onnx-")
    path = Path(folder) / "model.onnx"
    export_s = export_onnx(net, example, path, dynamic_batch=False)
    session = onnx_session(path, "cuda" if device.type == "cuda" else "cpu", threads)
    feed = {"image": example.detach().cpu().numpy()}
    return (lambda: session.run(None, feed)), f"export {export_s:.1f}s, {session.get_providers()[0]}", session, feed


#: rtda-export formats -> the precision column
_FILE_PRECISION = {"onnx": "fp32", "onnx_fp16": "fp16", "onnx_int8": "int8"}


def _file_runners(paths: list[str], device: torch.device, threads: int, batch_size: int) -> list[dict]:
    """One timed row per exported file (``bench.model_path``, :mod:`rtda.pipelines.export`) and execution provider:
    the CPU's on ``bench.device=cpu``; on ``cuda`` TensorRT's and CUDA's, each where ONNX Runtime has it."""
    import onnxruntime as ort

    runners = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"bench.model_path: no such file: {path}")
        card = read_card(path) or {}
        fmt = card.get("format", "onnx")
        if device.type == "cuda":
            installed = ort.get_available_providers()
            options = [(short, execution_providers(kind)) for short, kind, name in
                       (("TensorRT", "tensorrt", "TensorrtExecutionProvider"), ("CUDA", "cuda", "CUDAExecutionProvider"))
                       if name in installed]
            if not options:
                runners.append({"variant": fmt, "note": f"skipped: {Path(path).name}: ONNX Runtime has no CUDA "
                                                        "provider here (pip install onnxruntime-gpu)", "card": card})
                continue
        else:
            options = [("", ["CPUExecutionProvider"])]
        for short, providers in options:
            start = time.perf_counter()
            session = onnx_session(path, threads=threads, providers=providers)
            inp = session.get_inputs()[0]
            height, width = (int(s) for s in inp.shape[2:])
            shape = (batch_size, 3, height, width)
            image = (np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) if inp.type == "tensor(uint8)"
                     else np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
            feed = {inp.name: image}
            session.run(None, feed)  # TensorRT builds its engine on the first run: not timed
            runners.append({"variant": fmt + (f"@{short}" if short else ""), "fn": (lambda s=session, f=feed: s.run(None, f)),
                            "card": card, "input": f"{batch_size}x3x{height}x{width}", "size": (height, width),
                            "precision": _FILE_PRECISION.get(fmt, fmt),
                            "note": f"{Path(path).name}, {session.get_providers()[0]}, "
                                    f"session {time.perf_counter() - start:.1f}s"})
    names = [r["variant"] for r in runners]
    for r in runners:  # two files of one format: tell them apart by name
        if names.count(r["variant"]) > 1:
            r["variant"] += f"[{r['note'].split(',')[0]}]"
    return runners


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
    files = [] if not b.get("model_path") else [str(b.model_path)] if isinstance(b.model_path, str) else \
        [str(p) for p in b.model_path]
    ckpt_path = b.get("ckpt_path")
    if files and not ckpt_path:  # the files' own checkpoint (their card names it) beside them, when it is still there
        recorded = (read_card(files[0]) or {}).get("training_run", {}).get("checkpoint")
        ckpt_path = recorded if recorded and Path(recorded).is_file() else None
        if ckpt_path is None:
            return _files_only(cfg, files, device, threads)
    if ckpt_path:  # the segmenter of any method's checkpoint (weights_only), as its run configured it
        ckpt = load_checkpoint(ckpt_path)
        model_cfg = {**ckpt["rtda"]["config"]["model"], "pretrained": False}
        net = build_net(ckpt).to(device)
        name = ckpt["rtda"].get("choices", {}).get("model", type(net).__name__)
    else:
        model_cfg = dict(cfg.model)
        model_cfg["pretrained"] = False  # weights do not change the speed; fetch nothing
        net = hydra.utils.instantiate(model_cfg).eval().to(device)
        name = hydra.core.hydra_config.HydraConfig.get().runtime.choices.get("model", type(net).__name__)
    height, width = _rows_size(b, files)
    example = torch.randn(b.batch_size, 3, height, width, device=device)

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
    file_rows = {}
    for runner in _file_runners(files, device, threads, b.batch_size) if files else []:
        if "fn" not in runner:
            rows.append({"model": name, "variant": runner["variant"], "note": runner["note"]})
            continue
        fns[runner["variant"]], notes[runner["variant"]] = runner["fn"], runner["note"]
        same = runner["size"] == (height, width)  # the network's FLOPs hold for the file at its own size only
        file_rows[runner["variant"]] = {"precision": runner["precision"], "input": runner["input"],
                                        "GFLOPs": flops / 1e9 if same else None, "GMACs": flops / 2e9 if same else None,
                                        "flops": flops if same else None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = measure_interleaved(fns, device, warmup=b.warmup, min_runs=b.min_runs, max_runs=b.max_runs,
                                max_seconds=b.max_seconds * len(fns))
    for variant, st in stats.items():
        achieved = flops * b.batch_size / (st["median_ms"] / 1000.0) / 1e9
        rows.append({
            "model": name, "variant": variant, "device": str(device), "precision": b.precision,
            "input": f"{b.batch_size}x3x{height}x{width}", "params_M": params["inference_params"] / 1e6,
            "params_with_training_heads_M": params["params"] / 1e6,
            "trainable_params": params["trainable_params"], "GFLOPs": flops / 1e9, "GMACs": flops / 2e9,
            "median_ms": st["median_ms"], "p90_ms": st["p90_ms"], "fps": st["fps"] * b.batch_size,
            "runs": st["runs"], "GFLOP/s": achieved,
            "ceiling_%": (100.0 * achieved / ceiling) if ceiling and device.type == "cpu" else None,
            "torch_mm_%": (100.0 * achieved / ceilings["torch"]) if "torch" in ceilings else None,
            "peak_mem_MB": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
            "threads": threads, "note": notes[variant],
        })
        if variant in file_rows:  # an exported file: its own precision and input; GFLOP/s where its size is the net's
            extra = file_rows[variant]
            rows[-1].update({k: v for k, v in extra.items() if k != "flops"})
            if extra["flops"] is None:
                rows[-1].update({"GFLOP/s": None, "ceiling_%": None, "torch_mm_%": None})
    plain = next((r for r in rows if r.get("variant") == "plain" and "median_ms" in r), None)
    for r in rows:
        if plain and "median_ms" in r:
            r["vs_plain"] = r["median_ms"] / plain["median_ms"]
    record = machine_record(cfg, ceilings)
    for r in rows:
        r["machine"] = record
    return rows


def _rows_size(b: DictConfig, files: list[str]) -> tuple[int, int]:
    """The checkpoint rows' H×W: ``bench.height``/``bench.width``, except beside exported files when neither was
    given on the command line: the first file's own size (its card's), so the rows compare like with like."""
    given = {o.lstrip("+~").split("=", 1)[0] for o in rtda_config.overrides()}
    shape = ((read_card(files[0]) or {}).get("input") or {}).get("shape") if files else None
    if shape and not given & {"bench.height", "bench.width"}:
        return int(shape[2]), int(shape[3])
    return int(b.height), int(b.width)


def _files_only(cfg: DictConfig, files: list[str], device: torch.device, threads: int) -> list[dict]:
    """``bench.model_path`` without a checkpoint to time beside it (none given, the card's gone): the files' rows."""
    b = cfg.bench
    rows, fns, runners = [], {}, {}
    for runner in _file_runners(files, device, threads, b.batch_size):
        card = runner["card"]
        name = card.get("training_run", {}).get("choices", {}).get("model") or card.get("network") or "onnx"
        if "fn" not in runner:
            rows.append({"model": name, "variant": runner["variant"], "note": runner["note"]})
            continue
        fns[runner["variant"]], runners[runner["variant"]] = runner["fn"], (runner, name)
    stats = measure_interleaved(fns, device, warmup=b.warmup, min_runs=b.min_runs, max_runs=b.max_runs,
                                max_seconds=b.max_seconds * max(1, len(fns))) if fns else {}
    for variant, st in stats.items():
        runner, name = runners[variant]
        rows.append({"model": name, "variant": variant, "device": str(device), "precision": runner["precision"],
                     "input": runner["input"], "params_M": runner["card"].get("params_M"), "median_ms": st["median_ms"],
                     "p90_ms": st["p90_ms"], "fps": st["fps"] * b.batch_size, "runs": st["runs"], "threads": threads,
                     "note": runner["note"]})
    record = machine_record(cfg)
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
