"""A HAMLET-style budgeted online learner (after Colomer, Dovesi, Panariello, Savian, Tosi, Poggi, Mattoccia —
"To Adapt or Not to Adapt? Real-Time Adaptation for Semantic Segmentation", ICCV 2023: *HAMLET*, Hardware-Aware
Modular Least Expensive Training).

HAMLET makes online adaptation affordable on a frame-rate budget with two ideas, both here:

* **modular back-propagation**: only the last ``K`` modules of the network are trained, so the backward pass stops
  early (no gradient is computed for anything before them). Here the "modules" are the network's parameterised
  leaf layers (convolutions, normalisations, linear layers) in the order the forward pass runs them (recorded
  once with forward hooks), and ``depth`` = ``K``;
* **active training modulation**: adapt only when the domain changes. A *domain-shift detector* watches a
  statistic of the predictions — the frame's mean confidence (max softmax probability), which drops on a new
  domain — against a slow running reference (mean and variance, EMA rate ``reference_rate``); when it moves more
  than ``threshold`` reference standard deviations away (after ``warmup`` frames), a *burst* of ``burst`` updating
  frames starts and the reference restarts from the new level. Between bursts the network only infers;
* **a frame-rate budget**: an update is skipped when the projected frame rate over the last ``fps_window`` frames
  would fall under ``min_fps`` (``stream.min_fps``); the times of an inference-only and an updating frame are
  tracked as they run. Skips are counted (``skipped_budget``).

Where we differ (no official code could be read here; github.com/marcbotti/HAMLET was not reachable): HAMLET
self-trains a DAFormer-style mean teacher with source replay and chooses the back-propagation depth from the
shift's size; the stream has no source frames here, so the objective is TENT's entropy of the predictions
(:mod:`rtda.adaptation.tent`) on the last ``K`` modules' parameters, with Adam (lr 6e-5, DAFormer's, as HAMLET's
segmenter), at a fixed depth. BatchNorm normalises with batch statistics as in TENT.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
from torch import nn

from rtda.adaptation.online import (
    OnlineAdapter,
    logits_at,
    probabilities,
    softmax_entropy,
    use_batch_statistics,
)
from rtda.adaptation.tent import build_optimizer
from rtda.run.errors import ConfigValueError


def execution_order(net: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The parameterised leaf modules of ``net`` in the order a forward pass on ``x`` first calls them."""
    order: list[str] = []
    handles = []
    named = {m: n for n, m in net.named_modules()}
    for m in named:
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(lambda mod, args: order.append(named[mod])
                                                       if named[mod] not in order else None))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    modules = dict(net.named_modules())
    return [(n, modules[n]) for n in order]


class ShiftDetector:
    """A z-score detector of a scalar statistic against a slow running reference (see the module docstring)."""

    def __init__(self, threshold: float = 3.0, reference_rate: float = 0.05, warmup: int = 5, min_std: float = 0.01):
        self.threshold, self.rate, self.warmup, self.min_std = float(threshold), float(reference_rate), int(warmup), float(min_std)
        self.reset()

    def reset(self) -> None:
        self.mean, self.var, self.seen = None, 0.0, 0

    def update(self, value: float) -> tuple[bool, float]:
        """Feed one value; (shift detected, z-score)."""
        if self.mean is None:
            self.mean, self.seen = value, 1
            return False, 0.0
        std = max(math.sqrt(self.var), self.min_std)
        z = abs(value - self.mean) / std
        self.seen += 1
        shifted = self.seen > self.warmup and z > self.threshold
        if shifted:  # the new regime becomes the reference
            self.mean, self.var, self.seen = value, 0.0, 1
        else:
            delta = value - self.mean
            self.mean += self.rate * delta
            self.var = (1 - self.rate) * (self.var + self.rate * delta * delta)
        return shifted, z


class Budgeted(OnlineAdapter):
    """``adapt=budgeted`` (see the module docstring)."""

    name = "budgeted"

    def __init__(self, net: nn.Module, depth: int = 8, lr: float = 6e-5, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 threshold: float = 3.0, reference_rate: float = 0.05, warmup: int = 5, burst: int = 20,
                 min_fps: float | None = None, fps_window: int = 30, adapt_first: bool = True):
        if depth < 1:
            raise ConfigValueError(f"adapt.depth={depth}: expected the number of last modules to train, >= 1")
        if burst < 1 or fps_window < 1:
            raise ConfigValueError(f"adapt.burst={burst}, adapt.fps_window={fps_window}: expected integers >= 1")
        self.depth, self.lr, self.betas, self.weight_decay = int(depth), float(lr), tuple(betas), float(weight_decay)
        self.detector = ShiftDetector(threshold, reference_rate, warmup)
        self.burst, self.min_fps = int(burst), (float(min_fps) if min_fps else None)
        self.frame_times: deque = deque(maxlen=int(fps_window))
        self.adapt_first = bool(adapt_first)
        self.t_update: float | None = None
        self.order: list[tuple[str, nn.Module]] | None = None
        self.counts = {"triggers": 0, "skipped_budget": 0, "skipped_idle": 0}
        self.trainable_names: list[str] = []
        super().__init__(net)

    def configure(self) -> None:
        super().configure()
        use_batch_statistics(self.net, update_running=False)
        self.detector.reset()
        self.left = self.burst if self.adapt_first else 0  # frames left in the current burst
        self.optimizer = None
        if self.order is not None:
            self._select()

    def _select(self) -> None:
        last = self.order[-self.depth:]
        self.trainable_names = [n for n, _ in last]
        self.params = [p for _, m in last for p in m.parameters(recurse=False)]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = build_optimizer(self.params, "adam", self.lr, self.betas, weight_decay=self.weight_decay)

    def parameters_adapted(self) -> list[nn.Parameter]:
        return list(getattr(self, "params", []))

    def _within_budget(self) -> bool:
        if self.min_fps is None or self.t_update is None or not self.frame_times:
            return True
        projected = (len(self.frame_times) + 1) / (sum(self.frame_times) + self.t_update)
        return projected >= self.min_fps

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        start = time.perf_counter()
        if self.order is None:
            self.order = execution_order(self.net, x)
            self._select()
        want = self.left > 0
        info = {"updated": False, "loss": None, "skipped": None}
        if want and not self._within_budget():
            info["skipped"] = "budget"
            self.counts["skipped_budget"] += 1
            want = False
        if want:
            with torch.enable_grad():
                logits = logits_at(self.net, x)
                loss = softmax_entropy(logits).mean()
                if torch.isfinite(loss):
                    loss.backward()
                    self.optimizer.step()
                    self.updates += 1
                    info["updated"] = True
                else:
                    info["skipped"] = "non-finite"
                self.optimizer.zero_grad(set_to_none=True)
            probs = logits.detach().softmax(1)
            info["loss"] = float(loss.detach())
            self.left -= 1
        else:
            if info["skipped"] is None:
                info["skipped"] = "idle"
                self.counts["skipped_idle"] += 1
            with torch.no_grad():
                probs = probabilities(self.net, x)
        shifted, z = self.detector.update(float(probs.max(dim=1).values.mean()))
        if shifted:
            self.counts["triggers"] += 1
            self.left = self.burst
        info["shift_z"] = round(z, 3)
        info["triggered"] = shifted
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        elapsed = time.perf_counter() - start
        if info["updated"]:
            self.t_update = elapsed if self.t_update is None else 0.8 * self.t_update + 0.2 * elapsed
        self.frame_times.append(elapsed)
        return probs, info
