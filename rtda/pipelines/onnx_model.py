"""Segmenters for inference, from a checkpoint or an exported file, behind one interface: ``rtda-eval`` scores an
``.onnx`` file (:func:`onnx_segmenter_module`) with the checkpoint's protocol, ``rtda-predict`` runs either.

Both take what :class:`rtda.models.deploy.SegmenterGraph` takes — ``N×3×H×W`` uint8 RGB at the segmenter's input
size — and give logits at a requested size (bilinear, ``align_corners=False``: the test step's upsampling of the
logits to the full-resolution label).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from rtda.adaptation.segmentation import SegmentationModule
from rtda.data.labels import CLASS_NAMES, TRAIN_ID_PALETTE
from rtda.models.deploy import SegmenterGraph, onnx_session, read_card
from rtda.run.checkpoints import build_net, load_checkpoint
from rtda.run.errors import CheckpointError, ConfigValueError


def is_onnx(path) -> bool:
    return str(path).lower().endswith(".onnx")


def card_overrides(path: str | Path) -> list[str]:
    """The training run's own overrides recorded in an exported file's card, and its fixed input size as
    ``data.eval_size`` (the size the file was exported at is the only size it takes); [] without a card."""
    card = read_card(path)
    if not card:
        return []
    try:
        saved = [str(o) for o in card.get("training_run", {}).get("overrides", [])]
        height, width = (int(s) for s in card["input"]["shape"][2:])
    except (KeyError, TypeError, ValueError, AttributeError):  # a card from elsewhere: the user gives the data
        return []
    return [*saved, f"data.eval_size=[{height},{width}]"]


class OnnxSegmenter:
    """An exported file run by ONNX Runtime: uint8 NCHW in, logits (or labels) out, as torch tensors.

    Its card (``model.json`` beside it) names the classes and the palette; a file without one still runs (classes
    named by the Cityscapes train ids), as long as it takes uint8 ``N×3×H×W`` with a fixed H, W."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ckpt_path: no such ONNX file: {self.path}")
        try:
            self.session = onnx_session(self.path, device, threads)
        except ImportError as err:
            raise ConfigValueError(f"ckpt_path={self.path}: running an ONNX file needs onnxruntime "
                                   f"(pip install 'rtda[onnx]'): {err}") from None
        except Exception as err:  # noqa: BLE001 -- onnxruntime's own exception types (InvalidGraph, Fail, ...)
            raise CheckpointError(f"{self.path} is not an ONNX model ONNX Runtime can load: "
                                  f"{str(err).splitlines()[0][:300]}") from None
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        shape = list(inp.shape)
        if inp.type != "tensor(uint8)" or len(shape) != 4 or shape[1] != 3 or not all(isinstance(s, int) for s in shape[2:]):
            raise CheckpointError(f"{self.path} takes {inp.type} {shape}: expected uint8 N×3×H×W with a fixed H, W "
                                  "(a file written by rtda-export)")
        self.input_name, self.output_name = inp.name, out.name
        self.size = (int(shape[2]), int(shape[3]))
        self.output = "logits" if out.type in ("tensor(float)", "tensor(float16)") else "labels"
        self.card = read_card(self.path) or {}
        n = self.card.get("num_classes") or (out.shape[1] if self.output == "logits" and isinstance(out.shape[1], int)
                                             else len(CLASS_NAMES))
        self.num_classes = int(n)
        self.class_names = list(self.card.get("classes") or CLASS_NAMES[: self.num_classes])
        palette = self.card.get("palette")
        self.palette = TRAIN_ID_PALETTE.copy()
        if palette:
            self.palette[: len(palette)] = np.asarray(palette, dtype=np.uint8)
        self.provider = self.session.get_providers()[0]

    def run(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The file's own output for a uint8 ``N×3×H×W`` batch at :attr:`size`."""
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.dtype != np.uint8 or tuple(array.shape[2:]) != self.size:
            raise ConfigValueError(f"{self.path} takes uint8 images of {self.size[0]}x{self.size[1]}, got "
                                   f"{array.dtype} {tuple(array.shape[2:])} (data.eval_size must be the export's size)")
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(array)})[0])

    def logits(self, images, size: Sequence[int] | None = None) -> torch.Tensor:
        """Float logits at ``size`` (default the input size). A file that outputs labels gives their one-hot
        encoding, the labels resized by nearest neighbour (the argmax is the file's own, resized)."""
        out = self.run(images)
        size = tuple(size) if size is not None else self.size
        if self.output == "labels":
            labels = out.long()
            if tuple(labels.shape[-2:]) != size:
                labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
            return F.one_hot(labels.clamp(0, self.num_classes - 1), self.num_classes).permute(0, 3, 1, 2).float()
        out = out.float()
        if tuple(out.shape[-2:]) != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


class TorchSegmenter:
    """A checkpoint's segmenter (any method's, ``weights_only``) as :class:`SegmenterGraph` in PyTorch, with the
    :class:`OnnxSegmenter` interface; ``size`` defaults to the run's ``data.eval_size``."""

    def __init__(self, path: str | Path, size: Sequence[int] | None = None, device: str = "cpu"):
        ckpt = load_checkpoint(path)
        self.path = Path(path)
        config = ckpt["rtda"]["config"]
        self.num_classes = int(config["model"].get("num_classes") or config.get("data", {}).get("num_classes", 19))
        self.class_names = list(CLASS_NAMES[: self.num_classes])
        self.palette = TRAIN_ID_PALETTE.copy()
        data = config.get("data", {})
        size = size or data.get("eval_size") or data.get("target_size")
        if not size:
            raise ConfigValueError(f"{path} records no data.eval_size: give size=[H,W]")
        self.size = (int(size[0]), int(size[1]))
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.graph = SegmenterGraph(build_net(ckpt, path), num_classes=self.num_classes).to(self.device).eval()
        self.output = "logits"
        self.provider = f"PyTorch ({self.device.type})"

    @torch.no_grad()
    def logits(self, images, size: Sequence[int] | None = None) -> torch.Tensor:
        images = torch.as_tensor(images).to(self.device)
        out = self.graph(images)
        size = tuple(size) if size is not None else self.size
        if tuple(out.shape[-2:]) != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out.float().cpu()


def load_segmenter(path: str | Path, size: Sequence[int] | None = None, device: str = "cpu"):
    """:class:`OnnxSegmenter` for an ``.onnx`` file (its size is fixed: ``size`` must match), else
    :class:`TorchSegmenter` of a checkpoint."""
    if is_onnx(path):
        segmenter = OnnxSegmenter(path, device="cpu" if device == "cpu" else "auto")
        if size is not None and tuple(int(s) for s in size) != segmenter.size:
            raise ConfigValueError(f"size={list(size)}: {path} was exported for {list(segmenter.size)} images "
                                   "(its input size is fixed; export again with rtda-export size=[H,W])")
        return segmenter
    return TorchSegmenter(path, size, device)


class OnnxNet(nn.Module):
    """An exported file as the network of a :class:`SegmentationModule` (``predict(image, size)``, as an ensemble
    has), so ``rtda-eval`` scores it through the very test step that scores checkpoints."""

    def __init__(self, segmenter: OnnxSegmenter):
        super().__init__()
        self.segmenter = segmenter

    def predict(self, image: torch.Tensor, size=None) -> torch.Tensor:
        return self.segmenter.logits(image, size).to(image.device)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.predict(image)


class OnnxSegmentationModule(SegmentationModule):
    """:class:`SegmentationModule` whose network is an exported file: the images stay uint8 0–255 (the file
    normalises them itself); everything else — upsampling, confusion matrix, scores — is the checkpoint's."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image


def onnx_segmenter_module(cfg: DictConfig):
    """``rtda-eval ckpt_path=model.onnx``: the file's path and a module scoring it at ``data.eval_size``, which
    must be the file's own input size."""
    path = cfg.ckpt_path
    if not isinstance(path, str):
        raise ConfigValueError("ckpt_path: an ensemble of exported files is not supported; give one .onnx file "
                               "(or a list of checkpoints)")
    device = "auto" if str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto") else "cpu"
    segmenter = OnnxSegmenter(path, device=device)
    eval_size = tuple(int(s) for s in (cfg.data.get("eval_size") or cfg.data.target_size))
    if eval_size != segmenter.size:
        raise ConfigValueError(f"data.eval_size={list(eval_size)}: {path} was exported for {list(segmenter.size)} "
                               "images; score it at its own size (drop the override) or export again with "
                               "rtda-export size=[H,W]")
    if segmenter.num_classes != cfg.data.num_classes:
        raise CheckpointError(f"{path} predicts {segmenter.num_classes} classes, but data.num_classes="
                              f"{cfg.data.num_classes}")
    module = OnnxSegmentationModule(net=OnnxNet(segmenter), num_classes=cfg.data.num_classes, num_log_images=0,
                                    channels_last=False, class_names=segmenter.class_names)
    return [path], module
