"""Joint image + label transforms built on albumentations.

A :class:`SegmentationTransform` resizes to the training resolution, runs the augmentation list
chosen by the ``augmentation`` config group (named albumentations transforms, instantiated by Hydra),
and returns tensors: the image stays ``uint8`` on the 0–255 scale. Normalisation (:func:`normalize`, the
ImageNet statistics the torchvision backbones were trained with, :mod:`rtda.data.normalization`) runs on the device after the batch
transfer, so batch-level operations that need raw pixels (FDA's spectrum swap, mixing) come first and a
batch crosses to the GPU at a quarter of the float32 size. For evaluation, ``resize_label=False`` keeps the label at its full resolution: the network
predicts at the training resolution and the logits are upsampled to the label (the protocol of the
AdaptSegNet / ADVENT / FDA evaluation scripts).

Random augmentation draws from the pipeline's own generators (albumentations 2 seeds them from OS entropy
at construction, not from ``seed_everything``): :meth:`SegmentationTransform.reseed` makes the next call a
pure function of a seed; the training loaders call it with a seed per sample (:mod:`rtda.data.samplers`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from rtda.data.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: E402,F401  (re-exported)


class SegmentationTransform:
    """``(image HxWx3 uint8, label HxW uint8 | None) -> {"image": 3xHxW uint8 (0–255), "label": HxW long}``."""

    def __init__(
        self,
        size: Sequence[int] | None = None,
        augment: Sequence[A.BasicTransform] | Mapping[str, A.BasicTransform | None] = (),
        resize_label: bool = True,
    ):
        self.size = tuple(size) if size is not None else None
        self.resize_label = resize_label
        if isinstance(augment, Mapping):  # named steps from the config; null drops a step
            augment = [t for t in augment.values() if t is not None]
        steps = list(augment or ())
        # bilinear for the image, nearest for the label; skipped for a file already at the size (a cached copy,
        # python -m rtda.data.cache): the same pixels without a copy
        self.resize = A.Resize(*self.size) if self.size is not None else None
        self.pipeline = A.Compose(([self.resize] if self.resize is not None else []) + steps)
        self.pipeline_at_size = A.Compose(steps)

    def reseed(self, seed: int) -> None:
        """Make the random draws of the next calls a pure function of ``seed`` (a non-negative int).

        Both pipelines (they share the augmentation steps) get one NumPy and one Python generator seeded with
        ``seed``, shared by all their steps (albumentations' ``set_random_state``; its ``set_random_seed``
        would give every step an identically seeded generator of its own, so that, e.g., the flip decision
        and the scale factor came from the same number). An albumentations without per-pipeline generators
        draws from the global ``random`` and ``np.random``: those are seeded instead.
        """
        seed = int(seed)
        rng, py_random = np.random.default_rng(seed), random.Random(seed)
        for pipeline in (self.pipeline, self.pipeline_at_size):
            if hasattr(pipeline, "set_random_state"):
                pipeline.set_random_state(rng, py_random)
            elif hasattr(pipeline, "set_random_seed"):
                pipeline.set_random_seed(seed)
            else:
                random.seed(seed)
                np.random.seed(seed % 2**32)

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None) -> dict:
        at_size = self.size is None or (image.shape[:2] == self.size and (label is None or label.shape[:2] == self.size))
        pipeline = self.pipeline_at_size if at_size else self.pipeline
        if label is not None and self.resize_label:
            out = pipeline(image=image, mask=label)
            image, label = out["image"], out["mask"]
        else:
            image = pipeline(image=image)["image"]
        if image.dtype != np.uint8:  # a float-valued augmentation: back to the 0-255 scale
            image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))}
        if label is not None:
            sample["label"] = torch.from_numpy(np.ascontiguousarray(label)).long()
        return sample

    def __repr__(self) -> str:
        return f"SegmentationTransform(size={self.size}, resize_label={self.resize_label}, pipeline={self.pipeline})"

