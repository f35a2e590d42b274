"""Per-class pixel statistics of a dataset split, cached next to the data.

    python -m rtda.data.stats gta5 data/gta5
    python -m rtda.data.stats cityscapes data/cityscapes --split train

Writes ``ROOT/class_stats_<split>.json``: pixel count and frequency per train class, the ignored pixels,
and how many images contain each class. A cache is reused while the split's file list is unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rtda.data.cityscapes import Cityscapes
from rtda.data.gta5 import GTA5
from rtda.data.labels import CLASS_NAMES, NUM_CLASSES
from rtda.run.errors import run_cli
from rtda.run.files import atomic_write_text

READERS = {"gta5": GTA5, "cityscapes": Cityscapes}


class _Counts(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        label = self.dataset.load(i)["label"]
        return torch.from_numpy(np.bincount(label.ravel(), minlength=256).astype(np.int64))


def _fingerprint(dataset) -> str:
    h = hashlib.sha1()
    for p in dataset.label_paths:
        h.update(str(p).encode())
    return h.hexdigest()


def class_stats(dataset, num_workers: int = 2) -> dict:
    """Pixel counts of every train class over ``dataset`` (a reader with labels); ``per_image`` holds each
    image's counts of the train classes (in ``label_paths`` order: what rare-class sampling draws from)."""
    total = torch.zeros(256, dtype=torch.int64)
    images_with = torch.zeros(256, dtype=torch.int64)
    per_image = []
    for counts in DataLoader(_Counts(dataset), batch_size=8, num_workers=num_workers):
        total += counts.sum(0)
        images_with += (counts > 0).sum(0)
        per_image += counts[:, :NUM_CLASSES].tolist()
    labelled = int(total[:NUM_CLASSES].sum())
    return {
        "images": len(dataset),
        "pixels": {name: int(total[i]) for i, name in enumerate(CLASS_NAMES)},
        "frequency": {name: (int(total[i]) / labelled if labelled else 0.0) for i, name in enumerate(CLASS_NAMES)},
        "images_containing": {name: int(images_with[i]) for i, name in enumerate(CLASS_NAMES)},
        "ignored_pixels": int(total[255]),
        "per_image": per_image,
    }


def cached_class_stats(dataset_name: str, root: str | Path, split: str = "all", num_workers: int = 2) -> dict:
    """:func:`class_stats` of a split, from ``ROOT/class_stats_<split>.json`` when its file list matches."""
    root = Path(root)
    dataset = READERS[dataset_name](root, split=split)
    return cached_stats_of(dataset, root / f"class_stats_{split}.json", {"dataset": dataset_name, "split": split},
                           num_workers)


def cached_stats_of(dataset, cache: Path, meta: dict, num_workers: int = 2) -> dict:
    """:func:`class_stats` of a dataset instance, cached in ``cache`` (reused while the dataset's label files
    are the same list, and recomputed for a cache written before ``per_image`` existed)."""
    fingerprint = _fingerprint(dataset)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("fingerprint") == fingerprint and "per_image" in cached:
            return cached
    stats = {**meta, "fingerprint": fingerprint, **class_stats(dataset, num_workers)}
    try:  # complete or absent: a concurrent run reading the cache never sees half of it
        atomic_write_text(cache, json.dumps(stats, indent=2))
    except OSError:  # a read-only dataset folder: still return the numbers
        pass
    return stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Per-class pixel frequencies of a dataset split (cached).")
    parser.add_argument("dataset", choices=sorted(READERS))
    parser.add_argument("root")
    parser.add_argument("--split", default=None, help="gta5: all or a list name (default all); cityscapes: default train")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    split = args.split or ("all" if args.dataset == "gta5" else "train")
    stats = {}
    run_cli(lambda: stats.update(cached_class_stats(args.dataset, args.root, split, args.workers)))
    print(f"{args.dataset} {split}: {stats['images']} images, {stats['ignored_pixels']} ignored pixels")
    for name in CLASS_NAMES:
        print(f"  {name:<14} {100 * stats['frequency'][name]:7.3f}%  in {stats['images_containing'][name]} images")


if __name__ == "__main__":
    main()
