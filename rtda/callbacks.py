"""Lightning callbacks of rtda's runs (``conf/callbacks/``).

:class:`RandomState` makes a resumed run draw the same random numbers as an uninterrupted one: Lightning's
checkpoints hold the weights, optimizers, schedules and loop counters, but not the random generators, and a
resumed run restarts them from ``seed`` (``seed_everything``), so the data order and augmentations after a
resume would differ from the run that was never interrupted.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback


class RandomState(Callback):
    """Save the Python, NumPy, torch (CPU and CUDA) random states in every checkpoint; restore them on resume.

    Stored as tensors and ints only, so that checkpoints still load with ``weights_only=True``. What this
    makes exact: a run resumed from a checkpoint taken at the end of an epoch of the training loader continues
    bit for bit (on the CPU with ``trainer.deterministic=true``) as the uninterrupted run. What it cannot:
    a checkpoint taken mid-epoch resumes with a new shuffle of the loader (Lightning does not restore a
    non-stateful sampler's position), so the remaining iterations of that epoch see other batches; the run
    is then statistically, not bitwise, the same.
    """

    def state_dict(self) -> dict:
        version, keys, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state = {
            "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        py = state["python"]
        random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
