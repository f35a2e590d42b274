"""Small Lightning pieces for the method tests: a 4-class BiSeNet, a one-batch-per-epoch data module, a method
built by name, a CPU Trainer."""

from __future__ import annotations

from functools import partial

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from rtda.adaptation.advent import AdvEntModule, MinEntModule
from rtda.adaptation.adversarial import AdversarialModule
from rtda.adaptation.segmentation import SegmentationModule
from rtda.models.bisenet import BiSeNet

NUM_CLASSES = 4
SIZE = (32, 64)


class Pairs(Dataset):
    """Fixed random source/target pairs (a sample is what DomainAdaptationDataModule yields)."""

    def __init__(self, n: int, labelled_target: bool = False):
        g = torch.Generator().manual_seed(0)
        self.src = torch.randn(n, 3, *SIZE, generator=g)
        self.lbl = torch.randint(0, NUM_CLASSES, (n, *SIZE), generator=g)
        self.trg = torch.randn(n, 3, *SIZE, generator=g) * 0.5 + 0.3
        self.labelled_target = labelled_target

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        if self.labelled_target:
            return {"image": self.trg[i], "label": self.lbl[i]}
        return {"source": {"image": self.src[i], "label": self.lbl[i]}, "target": {"image": self.trg[i]}}


class TinyData(pl.LightningDataModule):
    """One batch per epoch, no shuffling: every iteration ends an epoch, so any checkpoint resumes exactly."""

    def train_dataloader(self):
        return DataLoader(Pairs(2), batch_size=2)

    def val_dataloader(self):
        return DataLoader(Pairs(2, labelled_target=True), batch_size=2)


def bisenet(**kwargs):
    torch.manual_seed(0)
    return BiSeNet(NUM_CLASSES, **kwargs)


def module(kind: str = "adversarial", net=None, **kwargs):
    net = net if net is not None else bisenet()
    opt = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    cls = {"source_only": SegmentationModule, "adversarial": AdversarialModule, "minent": MinEntModule,
           "advent": AdvEntModule}[kind]
    torch.manual_seed(1)
    return cls(net=net, optimizer=opt, num_classes=NUM_CLASSES, class_names=list("abcd"), num_log_images=0, **kwargs)


def trainer(tmp_path, max_steps=4, callbacks=(), **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, val_check_interval=2,
                      check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, deterministic=True, default_root_dir=tmp_path,
                      callbacks=list(callbacks), **kwargs)


# -- pure functions and networks ----------------------------------------------------------------------
