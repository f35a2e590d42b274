"""Cityscapes (Cordts et al., 2016) in its distributed layout.

``ROOT/leftImg8bit/{split}/CITY/CITY_SSSSSS_FFFFFF_leftImg8bit.png`` with
``ROOT/gtFine/{split}/CITY/CITY_SSSSSS_FFFFFF_gtFine_labelIds.png``; when the
``*_gtFine_labelTrainIds.png`` made by ``cityscapesscripts/preparation/createTrainIdLabelImgs.py``
is there, it is read directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rtda.data.base import DatasetFormatError, SegmentationFiles, require_dir
from rtda.data.labels import IGNORE_INDEX, NUM_CLASSES, label_ids_to_train_ids

EXPECTED_TREE = (
    "  ROOT/leftImg8bit/{split}/CITY/CITY_SSSSSS_FFFFFF_leftImg8bit.png\n"
    "  ROOT/gtFine/{split}/CITY/CITY_SSSSSS_FFFFFF_gtFine_labelIds.png  (or _labelTrainIds.png)"
)
IMAGE_SUFFIX = "_leftImg8bit.png"


def _decode_label_ids(img: Image.Image) -> np.ndarray:
    if img.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"a labelIds PNG is single-channel (mode L), not {img.mode} (a _gtFine_color.png?)")
    return label_ids_to_train_ids(np.asarray(img))


def _decode_train_ids(img: Image.Image) -> np.ndarray:
    if img.mode not in ("L", "P"):
        raise ValueError(f"a labelTrainIds PNG is single-channel (mode L), not {img.mode}")
    ids = np.asarray(img)
    if ((ids >= NUM_CLASSES) & (ids != IGNORE_INDEX)).any():
        raise ValueError(f"holds values other than train ids 0..{NUM_CLASSES - 1} and {IGNORE_INDEX}: is it a "
                         "labelIds image named _labelTrainIds?")
    return ids.astype(np.uint8, copy=False)


def train_or_label_id_files(train_ids: list[Path], label_ids: list[Path], dataset: str, split: str, tree: str):
    """The ``_labelTrainIds.png`` files and their decoder when every image has one, else the ``_labelIds.png`` files
    through the Cityscapes table (ACDC, Dark Zurich: the two forms their ``gt`` folders ship); missing labels named."""
    if all(p.is_file() for p in train_ids):
        return train_ids, _decode_train_ids
    missing = [p for p in label_ids if not p.is_file()]
    if missing:
        raise DatasetFormatError(f"{dataset}: {len(missing)} of {len(label_ids)} {split} images have no label, e.g. "
                                 f"{missing[0]}\nExpected:\n{tree}")
    return label_ids, _decode_label_ids


class Cityscapes(SegmentationFiles):
    """Cityscapes ``split`` (train / val / test). ``labelled=False`` reads images only (adaptation target).

    ``label_root`` reads the labels from another tree of the same layout (``LABEL_ROOT/gtFine/{split}/CITY/
    …_gtFine_labelTrainIds.png``), e.g. the pseudo-labels ``rtda-eval … pseudo_labels.out=LABEL_ROOT`` writes,
    without copying the images; it implies ``labelled``."""

    name_suffix = "_leftImg8bit"

    def __init__(self, root: str | Path, split: str = "train", transform=None, labelled: bool = True, check: bool = True,
                 label_root: str | Path | None = None):
        self.root, self.split = Path(root), split
        self.label_root = Path(label_root) if label_root is not None else self.root
        self.dataset_name = f"Cityscapes {self.root} ({split})"
        tree = EXPECTED_TREE.replace("{split}", split)
        image_dir = require_dir(self.root / "leftImg8bit" / split, "Cityscapes", tree)
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DatasetFormatError(f"Cityscapes: no *{IMAGE_SUFFIX} files in {image_dir}/CITY/\nExpected:\n{tree}")
        labels, decode = None, None
        if labelled or label_root is not None:
            if label_root is not None:
                tree = tree.replace("ROOT/gtFine", "LABEL_ROOT/gtFine")
            label_dir = require_dir(self.label_root / "gtFine" / split, "Cityscapes", tree)
            stems = [p.parent.name + "/" + p.name[: -len(IMAGE_SUFFIX)] for p in images]
            train_ids = [label_dir / f"{s}_gtFine_labelTrainIds.png" for s in stems]
            label_ids = [label_dir / f"{s}_gtFine_labelIds.png" for s in stems]
            if all(p.is_file() for p in train_ids):
                labels, decode = train_ids, _decode_train_ids
            else:
                missing = [p for p in label_ids if not p.is_file()]
                if missing:
                    raise DatasetFormatError(
                        f"Cityscapes: {len(missing)} of {len(images)} {split} images have no label, e.g. {missing[0]}\nExpected:\n{tree}"
                    )
                labels, decode = label_ids, _decode_label_ids
        super().__init__(images, labels, decode, transform, check)
