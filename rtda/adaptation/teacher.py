"""The mean teacher of the self-training methods (DACS, MIC): an EMA copy of the student that predicts
pseudo-labels, and the digest that checks two modules are identical."""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from rtda.models.outputs import main_logits
from rtda.run.errors import ConfigValueError

#: how the EMA factor ramps up over the first steps: DACS's ``min(1 − 1/k, α)`` or DAFormer/MIC's ``min(1 − 1/(k+1), α)``
EMA_SCHEDULES = ("dacs", "daformer")


def ema_alpha(k: int, alpha: float, schedule: str = "dacs") -> float:
    """The EMA factor of the update after the student's k-th optimizer step (k ≥ 1): DACS's
    ``update_ema_variables`` ``min(1 − 1/k, α)`` (the first update copies the student: a plain average of the
    students so far), or DAFormer's ``_update_ema(local_iter)`` ``min(1 − 1/(k+1), α)`` (the initial weights —
    ImageNet's — keep weight 1/(k+1): 0.5 after one step)."""
    k = max(int(k), 1)
    return min(1.0 - 1.0 / (k + 1 if schedule == "daformer" else k), float(alpha))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``θ_t ← α θ_t + (1 − α) θ_s`` for every parameter and floating-point buffer; integer buffers
    (``num_batches_tracked``) are copied. The two modules must have the same structure."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
    if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
        raise RuntimeError("the EMA teacher and the student differ in structure")
    floats_t = t_params + [b for b in t_bufs if b.is_floating_point()]
    floats_s = [p.detach() for p in s_params] + [b for b in s_bufs if b.is_floating_point()]
    if floats_t:
        torch._foreach_mul_(floats_t, alpha)
        torch._foreach_add_(floats_t, floats_s, alpha=1.0 - alpha)
    for t, s in zip(t_bufs, s_bufs):
        if not t.is_floating_point():
            t.copy_(s)


class EMATeacher(nn.Module):
    """A frozen copy of ``net`` that follows it by exponential moving average (see the module docstring).

    Always in evaluation mode (``train()`` does not switch it), parameters without gradients."""

    def __init__(self, net: nn.Module, alpha: float = 0.99, bn: str = "target_batch", schedule: str = "dacs"):
        super().__init__()
        if schedule not in EMA_SCHEDULES:
            raise ConfigValueError(f"adaptation.ema_schedule={schedule!r}: expected one of {list(EMA_SCHEDULES)} "
                                   "(dacs: min(1-1/k, alpha); daformer: min(1-1/(k+1), alpha))")
        if not 0.0 <= alpha < 1.0:
            raise ConfigValueError(f"adaptation.ema_alpha={alpha}: expected a number in [0, 1) (DACS: 0.99, DAFormer: 0.999)")
        if bn not in ("target_batch", "running"):
            raise ConfigValueError(f"adaptation.teacher_bn={bn!r}: expected 'target_batch' (the authors') or 'running'")
        self.net = copy.deepcopy(net)
        self.net.requires_grad_(False)
        self.alpha = float(alpha)
        self.bn = bn
        self.schedule = schedule
        super().train(False)

    def train(self, mode: bool = True) -> EMATeacher:  # noqa: ARG002 - the teacher never trains
        return super().train(False)

    def update(self, student: nn.Module, k: int) -> float:
        """The update after the student's k-th optimizer step; returns the α used."""
        alpha = ema_alpha(k, self.alpha, self.schedule)
        ema_update(self.net, student, alpha)
        return alpha

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The teacher's main logits of a (normalised) batch, without gradients."""
        if self.bn == "running":
            return main_logits(self.net(image))
        batchnorms = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in batchnorms]
        for m in batchnorms:  # batch statistics, and the running ones left as they are
            m.train(True)
            m.momentum = 0.0
        try:
            return main_logits(self.net(image))
        finally:
            for m, momentum, tracked in saved:
                m.train(False)
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)


def state_digest(module: nn.Module) -> str:
    """SHA-1 of a module's state (names, shapes and bytes): equal digests, identical modules."""

    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
