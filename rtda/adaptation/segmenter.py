"""The segmenter of any method's checkpoint (or the softmax average of several) as a
:class:`rtda.adaptation.segmentation.SegmentationModule`: what ``rtda-eval``, ``rtda-bench`` and the notebooks
score, whichever method trained it (the network rebuilt from each checkpoint's own config, ``weights_only``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from rtda.adaptation.segmentation import SegmentationModule
from rtda.models.outputs import main_logits
from rtda.run import config as rtda_config
from rtda.run.checkpoints import build_net, describe_net, load_checkpoint
from rtda.run.errors import CheckpointError, ConfigValueError


class SoftmaxEnsemble(nn.Module):
    """Averages the class probabilities of several networks (FDA's multi-band transfer ensemble).

    Each member's logits are upsampled to the label's size before the softmax, so an ensemble of
    identical members predicts exactly what one of them does. (FDA's script averages at the network's
    output resolution and upsamples afterwards; our networks already output at the input size.)
    """

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def predict(self, x: torch.Tensor, size=None) -> torch.Tensor:
        total = None
        for net in self.nets:
            logits = main_logits(net(x))
            if size is not None and tuple(logits.shape[-2:]) != tuple(size):
                logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total + probs
        return total / len(self.nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)


def segmenter_module(cfg: DictConfig):
    """The checkpoint paths of ``cfg.ckpt_path`` and a SegmentationModule holding their network (or their
    softmax ensemble), each rebuilt from its own checkpoint."""
    if not cfg.get("ckpt_path"):
        raise ConfigValueError("ckpt_path is required: rtda-eval ckpt_path=<run>/checkpoints/last.ckpt "
                               "(or a list [a.ckpt,b.ckpt] for an ensemble)")
    paths = list(cfg.ckpt_path) if not isinstance(cfg.ckpt_path, str) else [cfg.ckpt_path]
    ckpts = [load_checkpoint(p) for p in paths]
    for path, ckpt in zip(paths, ckpts):
        model_cfg = ckpt["rtda"]["config"]["model"]
        if model_cfg.get("num_classes", cfg.data.num_classes) != cfg.data.num_classes:
            raise CheckpointError(f"{path} holds {describe_net(model_cfg)}, but data={rtda_config.choices().get('data')} "
                                  f"has data.num_classes={cfg.data.num_classes}")
    nets = [build_net(c, p) for c, p in zip(ckpts, paths)]
    net = nets[0] if len(nets) == 1 else SoftmaxEnsemble(nets)
    channels_last = ckpts[0]["rtda"]["config"].get("adaptation", {}).get("channels_last", True)  # as the run scored
    module = SegmentationModule(net=net, num_classes=cfg.data.num_classes, num_log_images=0, channels_last=channels_last)
    module.sources = [source_record(p, c) for p, c in zip(paths, ckpts)]
    return paths, module


def source_record(path, ckpt: dict) -> dict:
    """What trained a checkpoint, from its saved run record: its path, config-group choices, command-line
    overrides and seed (what ``rtda-compare`` groups a scored checkpoint by; a stream run records it)."""
    record = ckpt.get("rtda") or {}
    return {"checkpoint": str(path), "choices": dict(record.get("choices") or {}),
            "overrides": list(record.get("overrides") or []), "seed": (record.get("config") or {}).get("seed")}
