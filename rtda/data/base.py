"""What GTA5 and Cityscapes share: a list of (image, label) files read into train-id samples."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from rtda.run.errors import DatasetFormatError, DecodeError

__all__ = ["DatasetFormatError", "DecodeError", "SegmentationFiles", "image_size", "read_label", "read_rgb", "require_dir",
           "require_files"]


def read_rgb(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB; a corrupt or truncated file is reported by name."""
    try:
        with Image.open(path) as img:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # no copy for an RGB file
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError(f"cannot decode image {path}: {err}", path) from err


def read_label(path: Path, decode: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return decode(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError(f"cannot decode label {path}: {err}", path) from err


def require_dir(path: Path, dataset: str, expected_tree: str) -> Path:
    if not path.is_dir():
        raise DatasetFormatError(
            f"{dataset}: folder not found: {path}\nExpected this layout under the dataset root:\n{expected_tree}\n"
            "Set the root with paths.data_dir=... (or RTDA_DATA_DIR), or data.<split>.root=..."
        )
    return path


def require_files(paths: Sequence[Path], dataset: str, split: str, what: str, expected_tree: str) -> list[Path]:
    """``paths`` (one per image: its label, mask, polygons) when every one is a file; else one error counting the
    missing ones and naming the first: ``BDD100K: 2 of 10 val images have no mask, e.g. …``."""
    paths = list(paths)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetFormatError(f"{dataset}: {len(missing)} of {len(paths)} {split} images have no {what}, e.g. "
                                 f"{missing[0]}\nExpected:\n{expected_tree}")
    return paths


def image_size(path: Path) -> tuple[int, int] | None:
    """(H, W) from the file header, or None when the file is not a readable image (cheap: no decoding)."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except (OSError, SyntaxError, ValueError):
        return None


class SegmentationFiles(Dataset):
    """Samples ``{"image": HxWx3 uint8, "label": HxW uint8 train ids, "name": str}`` from file pairs.

    ``transform(image=..., label=...)`` (see :mod:`rtda.data.transforms`) turns them into tensors.
    ``label_paths=None`` makes an unlabelled set (the adaptation target): samples carry no label.

    With ``check=True`` every file's header is read once at construction (no decoding, about a
    millisecond a file): unreadable files are dropped and counted before training starts, and labels
    whose size differs from their image are found (``allow_resize`` decides: resize or stop).
    ``skip_unreadable`` (set by the DataModule for training sets) replaces a sample that still fails to
    decode mid-epoch (a truncated file: its header is fine) by the next one instead of killing the run;
    the sample then names the failed file under ``"skipped"`` (always present in training samples, ``""``
    when nothing failed), so the training module counts failures per file across DataLoader workers and
    processes, warns once per file and lists them in the run's results. Evaluation sets never skip, so
    scores are always over the whole split: a file that fails there stops the run naming it.

    Optional groups: a reader whose samples fall into named groups (ACDC: the condition of each image) sets
    :attr:`sample_groups` (one name per sample, in order, after ``__init__`` dropped unreadable files) and
    :attr:`group_by` (what a group is: ``"condition"``); each sample then also carries ``"group"`` (its name), and
    a test set of two or more groups is scored per group as well as over the whole split
    (:class:`rtda.adaptation.segmentation.SegmentationModule`; ``results.json``'s ``test.groups``).
    """

    dataset_name = "dataset"
    allow_resize = False
    name_suffix = ""  # removed from file stems to name samples (Cityscapes: "_leftImg8bit")
    #: what the optional groups of the samples are (``"condition"``); None: no groups
    group_by: str | None = None
    #: the group of each sample, in order (None: no groups)
    sample_groups: list[str] | None = None

    def __init__(
        self,
        image_paths: Sequence[Path],
        label_paths: Sequence[Path] | None,
        decode_label: Callable[[Image.Image], np.ndarray] | None = None,
        transform: Callable | None = None,
        check: bool = True,
        skipped: dict[str, int] | None = None,
    ):
        if label_paths is not None and len(label_paths) != len(image_paths):
            raise ValueError("image_paths and label_paths differ in length")
        self.skipped = {why: n for why, n in (skipped or {}).items() if n}
        self.resized = 0
        image_paths, label_paths = list(image_paths), None if label_paths is None else list(label_paths)
        if check:
            image_paths, label_paths = self._check(image_paths, label_paths)
        if not image_paths:
            raise DatasetFormatError(f"{self.dataset_name}: no usable samples ({self._skip_note() or 'no files'})")
        self.image_paths = image_paths
        self.label_paths = label_paths
        self.decode_label = decode_label
        self.transform = transform
        self.skip_unreadable = False
        if self.skipped or self.resized:
            warnings.warn(f"{self.dataset_name}: {len(self.image_paths)} samples used; {self._skip_note()}", stacklevel=3)

    def _skip_note(self) -> str:
        total = len(getattr(self, "image_paths", ())) + sum(self.skipped.values())
        notes = [f"{n} of {total} samples skipped ({why})" for why, n in self.skipped.items() if n]
        if self.resized:
            notes.append(f"{self.resized} labels differ in size from their image and are resized to it (nearest)")
        return "; ".join(notes)

    def _check(self, images: list[Path], labels: list[Path] | None):
        keep_images, keep_labels, unreadable, mismatch = [], [], [], []
        for i, image in enumerate(images):
            size = image_size(image)
            label_size = image_size(labels[i]) if labels is not None else size
            if size is None or label_size is None:
                unreadable.append(image if size is None else labels[i])
                continue
            if label_size != size:
                if not self.allow_resize:
                    raise DatasetFormatError(
                        f"{self.dataset_name}: label {labels[i]} is {label_size[1]}x{label_size[0]} but its image "
                        f"{image} is {size[1]}x{size[0]}"
                    )
                mismatch.append(labels[i])
            keep_images.append(image)
            if labels is not None:
                keep_labels.append(labels[i])
        if unreadable:
            self.skipped[f"unreadable image or label, e.g. {unreadable[0]}"] = len(unreadable)
        self.resized = len(mismatch)
        return keep_images, (keep_labels if labels is not None else None)

    def __len__(self) -> int:
        return len(self.image_paths)

    def load(self, index: int) -> dict:
        """The raw sample at the file's own resolution (no transform)."""
        sample = {"image": read_rgb(self.image_paths[index]), "name": self.image_paths[index].stem.removesuffix(self.name_suffix)}
        if self.label_paths is not None:
            label = read_label(self.label_paths[index], self.decode_label)
            sample["label"] = self.fit_label(label, sample["image"].shape[:2], self.label_paths[index])
        if self.sample_groups is not None:
            sample["group"] = self.sample_groups[index]
        return sample

    def fit_label(self, label: np.ndarray, size: tuple[int, int], path: Path) -> np.ndarray:
        if label.shape == size:
            return label
        if not self.allow_resize:
            raise DecodeError(f"label {path} is {label.shape[1]}x{label.shape[0]}, its image is {size[1]}x{size[0]}", path)
        return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))

    def __getitem__(self, index: int) -> dict:
        failed = []
        for attempt in range(len(self) if self.skip_unreadable else 1):
            try:
                sample = self.load((index + attempt) % len(self))
                break
            except DecodeError as err:
                if not self.skip_unreadable or attempt == len(self) - 1:
                    raise
                failed.append(str(err.path))
        if self.transform is not None:
            out = self.transform(image=sample["image"], label=sample.get("label"))
            out["name"] = sample["name"]
            if "group" in sample:
                out["group"] = sample["group"]
            sample = out
        if self.skip_unreadable:
            sample["skipped"] = os.pathsep.join(failed)
        return sample
