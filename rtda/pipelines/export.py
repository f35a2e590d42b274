"""``rtda-export``: the segmenter of any method's checkpoint as one deployable ONNX file, with its card.

    rtda-export ckpt_path=<run>/checkpoints/last.ckpt                          # fp32, at the run's data.eval_size
    rtda-export ckpt_path=… format=onnx_fp16 size=[512,1024] out=deploy/
    rtda-export ckpt_path=… format=onnx_int8 calibration.images=32 calibration.method=entropy

The file computes :class:`rtda.models.deploy.SegmenterGraph`: uint8 RGB ``N×3×H×W`` (0–255; normalisation
inside), dynamic N, fixed H×W (``size``), out ``logits`` (float32 ``N×C×H×W``) or ``labels`` (the argmax, uint8
``N×H×W``). Formats:

- ``onnx``: fp32, torch's dynamo exporter (opset 18), weights inside the file.
- ``onnx_fp16``: the fp32 graph converted by ONNX Runtime's float16 converter (``keep_io_types``: uint8 in,
  float32 logits out); meant for GPUs (ONNX Runtime's CPU provider has few fp16 kernels and casts around them).
- ``onnx_int8``: ONNX Runtime static quantisation: QDQ, weights int8 per channel, activations uint8, calibrated
  (MinMax / Entropy / Percentile) on ``calibration.images`` images of the target training split (the unlabelled
  images adaptation trains on: what the deployed model sees), resized to the export size as evaluation resizes.

Before the command says done, the file passes ``onnx.checker`` and runs once in ONNX Runtime; its agreement with
the checkpoint on a few target images is measured and reported (fp32: the largest logit difference too). The
file is written under a temporary name and renamed into place, then ``<name>.json`` (the card: classes, palette,
input and output, the training run, the versions of the tools) beside it: a failure leaves neither.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from rtda.data.labels import CLASS_NAMES, IGNORE_INDEX, TRAIN_ID_PALETTE
from rtda.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from rtda.data.render import resize_image, spread_index
from rtda.models.deploy import OUTPUTS, SegmenterGraph, card_path, export_onnx, onnx_session
from rtda.run import config as rtda_config
from rtda.run.checkpoints import build_net, describe_net, load_checkpoint
from rtda.run.errors import ConfigValueError, DecodeError, one_line
from rtda.run.files import atomic_write_text, check_writable

FORMATS = {"onnx": "", "onnx_fp16": "_fp16", "onnx_int8": "_int8"}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _size(cfg: DictConfig) -> tuple[int, int]:
    size = cfg.get("size") or cfg.data.get("eval_size") or cfg.data.get("target_size")
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ConfigValueError(f"size={size!r}: expected [H, W]") from None
    if height < 16 or width < 16:
        raise ConfigValueError(f"size={[height, width]}: expected at least 16 pixels a side")
    return height, width


def _destination(cfg: DictConfig) -> Path:
    name = f"model{FORMATS[cfg.format]}.onnx"
    if not cfg.get("out"):
        return Path(cfg.paths.output_dir) / name
    out = Path(str(cfg.out))
    return out if out.suffix.lower() == ".onnx" else out / name


def _versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for package in ("rtda", "torch", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def target_images(cfg: DictConfig, n: int, size: tuple[int, int], split: str = "target") -> np.ndarray:
    """``n`` images of the data config's ``split`` (default the unlabelled target training split), spread evenly
    over it, resized to ``size`` as evaluation resizes: an ``n×3×H×W`` uint8 array."""
    if split not in ("target", "source", "val", "test"):
        raise ConfigValueError(f"calibration.split={split!r}: expected target, source, val or test")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    dataset = datamodule.dataset(split)
    count = min(int(n), len(dataset))
    images = [resize_image(dataset.load(spread_index(k, count, len(dataset)))["image"], size) for k in range(count)]
    return np.stack(images).transpose(0, 3, 1, 2).copy()


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over a uint8 batch, one image a call."""

    def __init__(self, images: np.ndarray, input_name: str = "image"):
        self.images, self.input_name, self.i = images, input_name, 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        self.i += 1
        return {self.input_name: self.images[self.i - 1: self.i]}

    def rewind(self):
        self.i = 0


def _ort_tools():
    """Import ``onnxruntime.transformers``, whose modules import each other as top-level modules from its folder,
    which its ``__init__`` appends to ``sys.path`` once: a host that restores ``sys.path`` between commands (a
    notebook, a test runner) would lose it, and the quantiser (which imports them) would fail."""
    import onnxruntime.transformers as tools

    folder = os.path.dirname(tools.__file__)
    if folder not in sys.path:
        sys.path.append(folder)


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx

    _ort_tools()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def _to_int8(src: Path, dst: Path, images: np.ndarray, method: str, percentile: float, work: Path,
             entropy_bins: int = 2048) -> None:
    _ort_tools()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    # ONNX Runtime's recommended preprocessing: shape inference and graph optimisation, so that the quantiser
    # sees fused Conv+BN and knows every tensor's shape (symbolic inference is for transformers' dynamic axes)
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    extra = {"CalibPercentile": float(percentile)} if method == "percentile" else {}
    cache = None
    if method == "entropy":
        # quantize_static runs its entropy calibrator with 128 histogram bins for 128 quantised bins, where the KL
        # search has one candidate, the whole range (MinMax's ranges, bit for bit); calibrated here with the 2048
        # bins of TensorRT's entropy calibration instead, the ranges handed to quantize_static as its cache
        ops = sorted(set(QDQRegistry) | set(QLinearOpsRegistry))  # the tensors quantize_static would calibrate
        calibrator = create_calibrator(prepared, ops, augmented_model_path=str(work / "augmented.onnx"),
                                       calibrate_method=calibrate, extra_options={"num_bins": entropy_bins,
                                                                                  "num_quantized_bins": 128})
        calibrator.collect_data(_Calibration(images))
        cache = work / "ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
    quantize_static(str(prepared), str(dst), _Calibration(images), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calibrate,
                    extra_options=extra, calibration_cache_path=cache)


def _check(path: Path, images: np.ndarray, graph: SegmenterGraph, output: str) -> dict:
    """``onnx.checker`` on the file, one ONNX Runtime run, and its agreement with the checkpoint on ``images``."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    session = onnx_session(path)
    start = time.perf_counter()
    got = session.run(None, {"image": images})[0]
    run_ms = 1000 * (time.perf_counter() - start)
    with torch.no_grad():
        ref = graph.eval()(torch.from_numpy(images)).numpy()
    checks = {"onnx_checker": "passed", "onnxruntime_run": f"passed ({len(images)} images, {run_ms:.0f} ms)"}
    if output == "logits":
        checks["max_abs_logit_diff_vs_checkpoint"] = float(np.abs(got.astype(np.float32) - ref).max())
        checks["max_abs_logit_checkpoint"] = float(np.abs(ref).max())  # the scale of that difference
        got, ref = got.argmax(axis=1), ref.argmax(axis=1)
    checks["label_agreement_vs_checkpoint"] = float((got == ref).mean())
    return checks


def export(cfg: DictConfig) -> dict:
    rtda_config.check_values(cfg)
    if cfg.format not in FORMATS:
        raise ConfigValueError(f"format={cfg.format!r}: expected one of {', '.join(FORMATS)}")
    if cfg.output not in OUTPUTS:
        raise ConfigValueError(f"output={cfg.output!r}: expected logits or labels")
    if not cfg.get("ckpt_path") or not isinstance(cfg.ckpt_path, str) or cfg.ckpt_path == "auto":
        raise ConfigValueError("ckpt_path is required: rtda-export ckpt_path=<run>/checkpoints/last.ckpt")
    calibration = cfg.calibration
    method = str(calibration.method).lower()
    if method not in CALIBRATION_METHODS:
        raise ConfigValueError(f"calibration.method={calibration.method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
    if cfg.format == "onnx_int8" and not (isinstance(calibration.images, int) and calibration.images >= 1):
        raise ConfigValueError(f"calibration.images={calibration.images!r}: expected a number of images >= 1")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ConfigValueError(f"rtda-export needs onnx and onnxruntime (pip install 'rtda[onnx]'): {err}") from None

    size = _size(cfg)
    dest = _destination(cfg)
    check_writable(dest.parent, "the exported model")
    ckpt = load_checkpoint(cfg.ckpt_path)
    net = build_net(ckpt, cfg.ckpt_path)
    run = ckpt["rtda"]
    num_classes = int(run["config"]["model"].get("num_classes") or cfg.data.num_classes)
    graph = SegmenterGraph(net, cfg.output, num_classes=num_classes).eval()

    # images for the checks (and the calibration): the target training split, as the deployed model meets it
    split = str(calibration.get("split", "target"))
    wanted = int(calibration.images) if cfg.format == "onnx_int8" else int(cfg.check_images)
    try:
        images = target_images(cfg, max(wanted, 1), size, split)
        checked_on = f"{split} images"
    except (FileNotFoundError, ConfigValueError, DecodeError) as err:
        if cfg.format == "onnx_int8":  # calibration needs the real images
            raise ConfigValueError(f"format=onnx_int8 calibrates on {split} images (calibration.split): "
                                   f"{one_line(err)}") from None
        # fp32 / fp16 need no data: a machine without the dataset still exports, checked on random images
        images = np.random.default_rng(0).integers(0, 256, (max(wanted, 1), 3, *size), dtype=np.uint8)
        checked_on = f"random images (no {split} images: {one_line(err).split('; ')[0]})"
    checks_on = images[: max(1, int(cfg.check_images))]

    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        fp32 = work / "fp32.onnx"
        example = torch.from_numpy(np.concatenate([checks_on, checks_on])[:2].copy())  # batch 2: the batch stays dynamic
        export_s = export_onnx(graph, example, fp32, output_name=cfg.output, opset=int(cfg.opset))
        final = work / "final.onnx"
        start = time.perf_counter()
        if cfg.format == "onnx":
            final = fp32
        elif cfg.format == "onnx_fp16":
            _to_fp16(fp32, final)
        else:
            _to_int8(fp32, final, images, method, float(calibration.percentile), work, int(calibration.entropy_bins))
        convert_s = time.perf_counter() - start
        checks = _check(final, checks_on, graph, cfg.output)
        checks["compared_on"] = f"{len(checks_on)} {checked_on}"
        os.replace(final, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    height, width = size
    card = {
        "format": cfg.format,
        "file": dest.name,
        "input": {"name": "image", "dtype": "uint8", "layout": "NCHW", "shape": ["batch", 3, height, width],
                  "color": "RGB", "range": [0, 255],
                  "normalization": {"inside_graph": True, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                    "formula": "(x / 255 - mean) / std"}},
        "output": ({"name": "logits", "dtype": "float32", "shape": ["batch", num_classes, height, width],
                    "note": "bilinearly upsampled to the input size; argmax over axis 1 gives the train ids"}
                   if cfg.output == "logits" else
                   {"name": "labels", "dtype": str(graph.label_dtype).replace("torch.", ""),
                    "shape": ["batch", height, width], "note": "train ids (argmax of the logits)"}),
        "num_classes": num_classes,
        "classes": list(CLASS_NAMES[:num_classes]),
        "palette": TRAIN_ID_PALETTE[:num_classes].tolist(),
        "ignore_index": IGNORE_INDEX,
        "network": describe_net(run["config"]["model"]),
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "training_run": {"checkpoint": str(Path(cfg.ckpt_path).resolve()), "overrides": list(run.get("overrides", [])),
                         "choices": dict(run.get("choices", {})), "model": run["config"]["model"],
                         "data_eval_size": run["config"].get("data", {}).get("eval_size")},
        "opset": int(cfg.opset),
        "export_seconds": round(export_s + convert_s, 2),
        "checks": checks,
        "exporter": _versions(),
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if cfg.format == "onnx_int8":
        card["quantization"] = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                                "weights": "int8, per channel", "activations": "uint8, per tensor",
                                "calibration": {"method": method, "images": len(images),
                                                "split": str(calibration.get("split", "target")),
                                                **({"percentile": float(calibration.percentile)} if method == "percentile" else {}),
                                **({"histogram_bins": int(calibration.entropy_bins)} if method == "entropy" else {})}}
    if cfg.format == "onnx_fp16":
        card["conversion"] = {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}
    atomic_write_text(card_path(dest), json.dumps(card, indent=2))
    result = {"file": str(dest.resolve()), "card": str(card_path(dest).resolve()), "format": cfg.format,
              "size_MB": dest.stat().st_size / 2**20, "input": f"uint8 Nx3x{height}x{width}", "output": cfg.output,
              "checks": checks, "run_dir": str(Path(cfg.paths.output_dir).resolve())}
    print(format_export_summary(result, card))
    return result


def format_export_summary(result: dict, card: dict) -> str:
    checks = result["checks"]
    lines = ["", "=" * 60, f"rtda-export: {card['network']} ({card['training_run']['choices'].get('adaptation', '?')}) "
             f"-> {result['format']}, {result['input']} -> {result['output']}"]
    lines.append(f"onnx.checker: {checks['onnx_checker']}; ONNX Runtime: {checks['onnxruntime_run']}")
    if "max_abs_logit_diff_vs_checkpoint" in checks:
        lines.append(f"largest logit difference from the checkpoint: {checks['max_abs_logit_diff_vs_checkpoint']:.3g} "
                     f"(its logits reach {checks['max_abs_logit_checkpoint']:.3g})")
    lines.append(f"pixels labelled as the checkpoint labels them: {100 * checks['label_agreement_vs_checkpoint']:.2f}% "
                 f"(on {checks['compared_on']})")
    if "quantization" in card:
        cal = card["quantization"]["calibration"]
        lines.append(f"INT8 calibration: {cal['method']} on {cal['images']} {cal['split']} images")
    lines.append(f"file: {result['file']} ({result['size_MB']:.1f} MB)")
    lines.append(f"card: {result['card']}")
    lines.append(f"score it: rtda-eval ckpt_path={result['file']}")
    lines.append("=" * 60)
    return "\n".join(lines)
