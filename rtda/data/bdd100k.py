"""BDD100K semantic segmentation (Yu et al., CVPR 2020), the 10K images: ``bdd100k_images_10k.zip`` +
``bdd100k_sem_seg_labels_trainval.zip``::

    ROOT/images/10k/{train,val,test}/<name>.jpg
    ROOT/labels/sem_seg/masks/{train,val}/<name>.png

The masks already hold the 19 Cityscapes train ids (255 = ignore), as greyscale or palette PNGs whose
indices are the ids, as the release ships them; they are read as they are, and a value outside
0..18 and 255 is an error (a colour map, ``labels/sem_seg/colormaps``, is not a mask). The older release
(``bdd100k/seg/images/{split}/<name>.jpg`` + ``seg/labels/{split}/<name>_train_id.png``) is read too. Rein
(``configs/_base_/datasets/bdd100k_512x512.py``) scores the same files (``images/10k/val`` against
``labels/sem_seg/masks/val``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rtda.data.base import DatasetFormatError, SegmentationFiles, require_dir, require_files
from rtda.data.labels import IGNORE_INDEX, NUM_CLASSES

EXPECTED_TREE = (
    "  ROOT/images/10k/{split}/<name>.jpg\n"
    "  ROOT/labels/sem_seg/masks/{split}/<name>.png   (train ids 0..18, 255 ignore)"
)


def decode_train_id_mask(img: Image.Image) -> np.ndarray:
    """A greyscale or palette PNG whose values (indices) are the 19 train ids and 255."""
    if img.mode not in ("L", "P"):
        raise ValueError(f"a train-id mask is single-channel (mode L or P), not {img.mode} (a colour map?)")
    ids = np.asarray(img)
    if ((ids >= NUM_CLASSES) & (ids != IGNORE_INDEX)).any():
        raise ValueError(f"holds values other than train ids 0..{NUM_CLASSES - 1} and {IGNORE_INDEX}: "
                         f"{sorted(set(np.unique(ids).tolist()) - set(range(NUM_CLASSES)) - {IGNORE_INDEX})[:5]}")
    return ids.astype(np.uint8, copy=False)


class BDD100K(SegmentationFiles):
    """BDD100K 10K ``split`` (train / val / test). ``labelled=False`` reads images only (test has no labels)."""

    def __init__(self, root: str | Path, split: str = "val", transform=None, labelled: bool = True, check: bool = True):
        self.root, self.split = Path(root), split
        self.dataset_name = f"BDD100K {self.root} ({split})"
        tree = EXPECTED_TREE.replace("{split}", split)
        old = self.root / "seg" / "images" / split
        if not (self.root / "images" / "10k" / split).is_dir() and old.is_dir():  # the older release
            image_dir, label_dir, label_suffix = old, self.root / "seg" / "labels" / split, "_train_id.png"
        else:
            image_dir = require_dir(self.root / "images" / "10k" / split, "BDD100K", tree)
            label_dir, label_suffix = self.root / "labels" / "sem_seg" / "masks" / split, ".png"
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not images:
            raise DatasetFormatError(f"BDD100K: no .jpg images in {image_dir}\nExpected:\n{tree}")
        labels = None
        if labelled:
            require_dir(label_dir, "BDD100K", tree)
            labels = require_files([label_dir / f"{p.stem}{label_suffix}" for p in images], "BDD100K", split, "mask", tree)
        super().__init__(images, labels, decode_train_id_mask, transform, check)
