"""The deployable form of a segmenter, and the ONNX plumbing every command shares (``rtda-export`` writes the
files, ``rtda-eval``/``rtda-predict`` run them, ``rtda-bench`` times them and its own ``onnxruntime`` row).

:class:`SegmenterGraph` is what an exported file computes: **uint8 RGB, NCHW, 0–255** in (what a decoder hands
over, transposed; NCHW is what most ONNX consumers feed), the training normalisation inside the graph, the
network, its main logits bilinearly upsampled to the input size, optionally their argmax. The batch axis is
dynamic, H and W are fixed at export (the accuracy of a segmenter depends on the resolution it runs at).

ONNX Runtime is an optional dependency (``pip install rtda[onnx]``): it is imported where a file is written or
run, so the rest of rtda imports without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtda.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from rtda.models.outputs import main_logits

#: opset of every exported file (torch's dynamo exporter's own default range; Resize/ArgMax as ORT runs them)
OPSET = 18
OUTPUTS = ("logits", "labels")


class SegmenterGraph(nn.Module):
    """``N×3×H×W`` uint8 RGB (0–255) → ``N×C×H×W`` float logits, or ``N×H×W`` labels (uint8 when the classes fit,
    else int64). The same arithmetic as rtda's own inference path (:func:`rtda.data.normalization.normalize`,
    ``main_logits``, bilinear ``align_corners=False`` upsampling), so an fp32 file scores what the checkpoint does.
    """

    def __init__(self, net: nn.Module, output: str = "logits", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, num_classes: int | None = None):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: expected one of {OUTPUTS}")
        self.net = net.eval()
        self.output = output
        self.label_dtype = torch.uint8 if (num_classes or 256) <= 256 else torch.int64
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = main_logits(self.net((image.float() - self.mean) / self.std))
        if logits.shape[-2:] != image.shape[-2:]:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if self.output == "labels":
            return logits.argmax(dim=1).to(self.label_dtype)
        return logits


def quiet_exporter():
    """torch.onnx's dynamo exporter, onnxscript and onnx_ir log and print progress lines at INFO: silenced, so
    a command's own summary stays readable."""
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, input_name: str = "image",
                output_name: str = "logits", dynamic_batch: bool = True, opset: int = OPSET) -> float:
    """``module`` (eval mode) as one self-contained ONNX file at ``path`` (weights inside, no ``.data`` side
    file), traced with torch's dynamo exporter on ``example``; the batch axis dynamic when asked (the example
    should then have a batch of 2 or more, else torch.export specialises it to 1). Returns the seconds it took."""
    quiet_exporter()
    dynamic = {"batch": torch.export.Dim("batch", min=1, max=4096)} if dynamic_batch else None
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamo=True, opset_version=opset, external_data=False, verbose=False,
                          dynamic_shapes=(({0: dynamic["batch"]},) if dynamic else None))
    return time.perf_counter() - start


def execution_providers(device: str = "cpu") -> list[str]:
    """ONNX Runtime providers for ``device``, best first, only those installed: ``cpu``; ``cuda`` (CUDA, then the
    CPU for any node it lacks); ``tensorrt`` (TensorRT, CUDA, CPU); ``auto`` (CUDA where installed, else CPU)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = {"cpu": [], "cuda": ["CUDAExecutionProvider"], "auto": ["CUDAExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}.get(str(device).split(":")[0])
    if wanted is None:
        raise ValueError(f"device={device!r}: expected cpu, cuda, tensorrt or auto")
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def onnx_session(path: str | Path, device: str = "cpu", threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session of the file at ``path`` on ``device`` (:func:`execution_providers`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # ORT's warnings (nodes placed on the CPU provider) would bury the summary
    return ort.InferenceSession(str(path), options, providers=providers or execution_providers(device))


def card_path(model_path: str | Path) -> Path:
    """The ``.json`` card beside an exported file: ``model.onnx`` → ``model.json``."""
    return Path(model_path).with_suffix(".json")


def read_card(model_path: str | Path) -> dict | None:
    """The card :mod:`rtda.pipelines.export` wrote beside ``model_path``, or None when there is none (a file from
    elsewhere); an unreadable card is None too (the caller says what it then misses)."""
    path = card_path(model_path)
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None
