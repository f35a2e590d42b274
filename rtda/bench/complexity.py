"""Complexity and speed of a network: parameters, FLOPs, latency, and the machine's matmul ceiling.

Conventions (stated because papers mix them): FLOPs are counted by ``torch.utils.flop_counter`` at
2 per multiply-accumulate (fvcore and most segmentation papers report MACs and call them FLOPs: divide
by 2, reported here as GMACs). Latency is the median of timed forward passes at batch 1 in eval mode
after warm-up, synchronised on CUDA; FPS = 1000 / median ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, example: torch.Tensor | None = None) -> dict:
    """Parameters (all, trainable) and, given an ``example`` input, ``inference_params``: those of the modules an
    eval-mode forward runs, each counted once. Training-only heads (auxiliary, boundary, detail) are built but
    not run in evaluation: the deployed network, and the official papers' counts, leave them out."""
    counts = {"params": sum(p.numel() for p in model.parameters()),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if example is not None:
        ran: list[nn.Module] = []
        hooks = [m.register_forward_pre_hook(lambda module, args: ran.append(module)) for m in model.modules()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example)
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        used = {id(p): p for m in ran for p in m.parameters(recurse=False)}
        counts["inference_params"] = sum(p.numel() for p in used.values())
    return counts


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward of ``example`` (2 per multiply-accumulate)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], object], device: torch.device, warmup: int = 3, min_runs: int = 5,
                    max_runs: int = 100, max_seconds: float = 20.0) -> dict:
    """Time ``fn`` after ``warmup`` calls: at least ``min_runs`` runs, then more until ``max_runs`` or
    ``max_seconds``. Returns median / p90 / mean / min latency in ms and the FPS of the median."""
    return measure_interleaved({"fn": fn}, device, warmup, min_runs, max_runs, max_seconds, rounds=1)["fn"]


def torch_matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 2.0) -> float:
    """Achieved GFLOP/s of a square ``n x n`` matmul in PyTorch (best of repeated runs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = measure_latency(lambda: a @ b, device, warmup=3, min_runs=5, max_runs=200, max_seconds=seconds)
    return 2 * n**3 / (stats["min_ms"] / 1000.0) / 1e9


def onnxruntime_matmul_gflops(threads: int, n: int = 2048, seconds: float = 2.0) -> float | None:
    """Achieved GFLOP/s of an fp32 ``n x n`` MatMul in ONNX Runtime's CPU kernels (MLAS); None without onnxruntime.

    On some CPUs (AMD with MKL, for one) this is well above PyTorch's own matmul, so the ceiling is the
    best of both."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"A": np.random.randn(n, n).astype(np.float32), "B": np.random.randn(n, n).astype(np.float32)}
    stats = measure_latency(lambda: session.run(None, feeds), torch.device("cpu"), warmup=3, min_runs=5, max_runs=200,
                            max_seconds=seconds)
    return 2 * n**3 / (stats["min_ms"] / 1000.0) / 1e9


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 3, min_runs: int = 5,
                        max_runs: int = 100, max_seconds: float = 20.0, rounds: int = 5) -> dict[str, dict]:
    """:func:`measure_latency` for several functions, alternating them in ``rounds`` so that a machine
    that speeds up or slows down during the benchmark biases none of them (ratios stay honest)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, -(-min_runs // rounds))
    budget = max_seconds / rounds
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            done = 0
            while len(times[name]) < max_runs and (done < per_round or time.perf_counter() - start < budget):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1000.0)
                done += 1
    out = {}
    for name, values in times.items():
        arr = np.array(values)
        median = float(np.median(arr))
        out[name] = {"median_ms": median, "p90_ms": float(np.percentile(arr, 90)), "mean_ms": float(arr.mean()),
                     "min_ms": float(arr.min()), "runs": len(values), "fps": 1000.0 / median}
    return out
