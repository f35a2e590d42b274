"""A test-only callback: the process kills itself with SIGKILL when training reaches an iteration, as a
preempted or OOM-killed job dies (no Python cleanup, no ``finally``, nothing flushed)."""

import os
import signal

from pytorch_lightning.callbacks import Callback


class KillAt(Callback):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # global_step = iterations completed: the checkpoints of iteration `iteration` are already written
        if trainer.global_step >= self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
