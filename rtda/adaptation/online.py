"""Online (test-time) adaptation on a stream: what every method shares, the ``none`` and ``bn`` methods, and the
collapse guard. The methods with an objective are one file each: :mod:`rtda.adaptation.tent`,
:mod:`rtda.adaptation.cotta`, :mod:`rtda.adaptation.budgeted`.

An :class:`OnlineAdapter` wraps the segmenter of a checkpoint (a plain ``nn.Module`` taking a normalised batch)
and is called once per batch of frames, in stream order: ``step(x)`` returns the class probabilities it predicts
for the batch (N×C×H×W, at the input's size) after or while adapting on it, and a dict of what it did
(``updated``, ``loss``, ``skipped``); ``predict(x)`` predicts without adapting (to score a segment again);
``reset()`` puts the source weights (and the method's optimizer, teacher, detector) back.

* ``none``: the source model in evaluation mode (the lower bound of the stream).
* ``bn``: test-time normalisation, as ``norm.py`` of github.com/DequanWang/tent (Schneider et al., 2020;
  Wang et al., ICLR 2021's "BN" baseline): every BatchNorm in training mode with momentum ``momentum`` (tent's
  default 0.1) — each batch is normalised with its own statistics and the running statistics follow the stream;
  ``reset_stats`` starts them from zero instead of the source's. No parameter changes.

**Batch statistics of a single value.** A BatchNorm whose input holds one value per channel (a batch of one frame
through a global-pooling branch, BiSeNet's attention refinement) cannot normalise with batch statistics; such a
layer uses its running statistics for that call (a forward pre-hook, :func:`use_batch_statistics`).

**The collapse guard** (:class:`CollapseGuard`, every method): a prediction is degenerate when one class takes more
than ``max_class_share`` of the pixels or fewer than ``min_classes`` classes cover ``class_floor`` of them each;
``patience`` degenerate batches in a row (or a non-finite loss) reset the adapter to the source weights, and the
resets are counted in the report. (Continual TTA collapses this way: entropy minimisation's trivial solution is
one confident class; RDumb (Press et al., NeurIPS 2023) resets periodically — here only when needed.)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rtda.models.outputs import main_logits
from rtda.run.errors import ConfigValueError

#: the normalisation layers whose affine parameters the entropy methods adapt (TENT: BatchNorm; its paper: "for
#: other normalisation layers (LayerNorm, GroupNorm) the same"), by config name
NORM_TYPES = {"batch": nn.modules.batchnorm._BatchNorm, "layer": nn.LayerNorm, "group": nn.GroupNorm,
              "instance": nn.modules.instancenorm._InstanceNorm}


def norm_layers(net: nn.Module, types=("batch", "layer", "group")) -> list[tuple[str, nn.Module]]:
    bad = [t for t in types if t not in NORM_TYPES]
    if bad:
        raise ConfigValueError(f"adapt.norm_types={list(types)}: unknown {bad}; expected some of {list(NORM_TYPES)}")
    classes = tuple(NORM_TYPES[t] for t in types)
    return [(name, m) for name, m in net.named_modules() if isinstance(m, classes)]


def norm_affine_parameters(net: nn.Module, types=("batch", "layer", "group")) -> list[tuple[str, nn.Parameter]]:
    """The scale and shift of every normalisation layer (TENT's ``collect_params``: ``weight`` and ``bias``)."""
    params = []
    for name, m in norm_layers(net, types):
        for pname, p in m.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                params.append((f"{name}.{pname}" if name else pname, p))
    return params


def _one_value_pre_hook(m: nn.Module, args) -> None:
    x = args[0]
    if m.training and x.dim() >= 2 and x.numel() // max(x.shape[1], 1) <= 1:
        m._rtda_single_value = True
        m.training = False


def _one_value_post_hook(m: nn.Module, args, out) -> None:
    if getattr(m, "_rtda_single_value", False):
        m._rtda_single_value = False
        m.training = True


def use_batch_statistics(net: nn.Module, update_running: bool, momentum: float | None = 0.1) -> None:
    """Every BatchNorm of ``net`` in training mode: batches are normalised with their own statistics; the running
    statistics follow them with ``momentum`` when ``update_running`` (tent's ``norm.py``) and are left as they
    are otherwise (tent's ``configure_model`` drops them; here they stay in the state, unused). The rest of the
    network stays as it is (evaluation mode: no dropout)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(True)
            m.track_running_stats = bool(update_running)
            if update_running:
                m.momentum = momentum
            if not getattr(m, "_rtda_hooked", False):
                m.register_forward_pre_hook(_one_value_pre_hook)
                m.register_forward_hook(_one_value_post_hook)
                m._rtda_hooked = True


class frozen_running_stats:
    """Within: no BatchNorm of ``net`` updates its running statistics (batch statistics still normalise)."""

    def __init__(self, net: nn.Module):
        self.layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [m.track_running_stats for m in self.layers]
        for m in self.layers:
            m.track_running_stats = False

    def __exit__(self, *exc):
        for m, s in zip(self.layers, self.saved):
            m.track_running_stats = s


def probabilities(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax of the network's main logits at the input's size."""
    logits = main_logits(net(x))
    if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return logits.softmax(dim=1)


def logits_at(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = main_logits(net(x))
    if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return logits


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy of the softmax of N×C×H×W logits (TENT's ``softmax_entropy``), N×H×W."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class OnlineAdapter:
    """The ``none`` method and the interface of every other (see the module docstring)."""

    name = "none"

    def __init__(self, net: nn.Module):
        self.net = net
        self.source_state = copy.deepcopy(net.state_dict())
        self.updates = 0
        self.configure()

    def configure(self) -> None:
        """Put the network in the method's mode and build its optimizer / extra networks."""
        self.net.eval()
        self.net.requires_grad_(False)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return probabilities(self.net, x)

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.predict(x), {"updated": False, "loss": None, "skipped": None}

    def reset(self) -> None:
        self.net.load_state_dict(self.source_state, strict=True)
        self.configure()

    def parameters_adapted(self) -> list[nn.Parameter]:
        return []


class BatchNormAdapter(OnlineAdapter):
    """``bn``: test-time BatchNorm statistics (tent's ``norm.py``; see the module docstring)."""

    name = "bn"

    def __init__(self, net: nn.Module, momentum: float | None = 0.1, reset_stats: bool = False):
        if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
            raise ConfigValueError(f"adapt.momentum={momentum}: expected a number in [0, 1] or null (cumulative)")
        self.momentum, self.reset_stats = momentum, bool(reset_stats)
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            raise ConfigValueError("adapt=bn: the network has no BatchNorm layer to adapt (adapt=tent adapts LayerNorm too)")
        super().__init__(net)

    def configure(self) -> None:
        super().configure()
        use_batch_statistics(self.net, update_running=True, momentum=self.momentum)
        if self.reset_stats:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with frozen_running_stats(self.net):
            return probabilities(self.net, x)

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self.updates += 1
        return probabilities(self.net, x), {"updated": True, "loss": None, "skipped": None}


class CollapseGuard:
    """Detects degenerate predictions (see the module docstring); ``check(probs, loss)`` is True when the adapter
    should be reset, and counts the resets."""

    def __init__(self, enabled: bool = True, max_class_share: float = 0.95, min_classes: int = 2,
                 class_floor: float = 0.001, patience: int = 3):
        if not 0.0 < max_class_share <= 1.0 or patience < 1 or min_classes < 1:
            raise ConfigValueError(f"guard: expected max_class_share in (0, 1], min_classes >= 1, patience >= 1; got "
                                   f"{max_class_share}, {min_classes}, {patience}")
        self.enabled, self.max_class_share, self.min_classes = bool(enabled), float(max_class_share), int(min_classes)
        self.class_floor, self.patience = float(class_floor), int(patience)
        self.strikes = 0
        self.resets = 0
        self.reset_frames: list[int] = []

    @staticmethod
    def statistics(probs: torch.Tensor) -> dict:
        """Share of the most predicted class, the class shares, mean entropy and confidence of a prediction."""
        pred = probs.argmax(dim=1)
        shares = torch.bincount(pred.reshape(-1), minlength=probs.shape[1]).double() / pred.numel()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
        return {"top_share": float(shares.max()), "shares": shares, "entropy": float(entropy),
                "confidence": float(probs.max(dim=1).values.mean())}

    def degenerate(self, probs: torch.Tensor) -> bool:
        stats = self.statistics(probs)
        covered = int((stats["shares"] >= self.class_floor).sum())
        return stats["top_share"] > self.max_class_share or covered < self.min_classes

    def check(self, probs: torch.Tensor, loss: float | None = None, frame: int | None = None) -> bool:
        if not self.enabled:
            return False
        bad_loss = loss is not None and not torch.isfinite(torch.tensor(loss))
        bad_pred = not bool(torch.isfinite(probs).all()) or self.degenerate(probs)
        self.strikes = self.strikes + 1 if bad_pred else 0
        if bad_loss or self.strikes >= self.patience:
            self.strikes = 0
            self.resets += 1
            if frame is not None:
                self.reset_frames.append(int(frame))
            return True
        return False


class Timer:
    """Wall time of a block, with the device synchronised at both ends (CUDA is asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start


def iterate_batches(stream, batch_size: int) -> Iterator[list[dict]]:
    """The stream's samples in order, ``batch_size`` at a time (the last batch may be shorter)."""
    batch = []
    for sample in stream:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
