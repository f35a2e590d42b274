"""SYNTHIA-RAND-CITYSCAPES (Ros et al., "The SYNTHIA Dataset", CVPR 2016): ``ROOT/RGB/NNNNNNN.png`` +
``ROOT/GT/LABELS/NNNNNNN.png``, 9,400 pairs at 1280x760.

The label PNGs are 16-bit, 3-channel: the class id in the first (R) channel, the instance id in the second.
Pillow opens them as 8-bit RGB, keeping each channel's high byte, and so loses the ids: they are read with
OpenCV (``IMREAD_UNCHANGED``, BGR order, the R channel last), as DAFormer's
``tools/convert_datasets/synthia.py`` does (``cv2.imread(file, cv2.IMREAD_UNCHANGED)[:, :, -1]``). Class ids go
through that script's table (the one of the dataset's README, the same in DACS's ``data/synthia_dataset.py``)
to the 19 Cityscapes train ids; every other value (void 0, parking slot 13, road work 14, lane marking 22,
anything above 255) is 255. SYNTHIA has no terrain (9), truck (14) or train (16) pixels: it is scored on 16 or
13 classes (``data.eval_classes=synthia16|synthia13``, :data:`rtda.data.labels.EVAL_CLASSES`).

When DAFormer's conversion has been run, its ``GT/LABELS/NNNNNNN_labelTrainIds.png`` (8-bit train ids) are
read directly, as the Cityscapes reader reads ``_labelTrainIds.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtda.data.base import DatasetFormatError, DecodeError, SegmentationFiles, read_rgb, require_dir
from rtda.data.cityscapes import _decode_train_ids
from rtda.data.labels import IGNORE_INDEX

EXPECTED_TREE = (
    "  ROOT/RGB/0000000.png ...\n"
    "  ROOT/GT/LABELS/0000000.png ...   (16-bit 3-channel PNG, class id in the R channel)"
)

#: SYNTHIA class id -> Cityscapes train id: DAFormer tools/convert_datasets/synthia.py ``id_to_trainid``
SYNTHIA_ID_TO_TRAIN_ID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,  # 16 terrain: not present in SYNTHIA
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14,  # 18 truck: not present
    19: 15, 20: 16,  # 20 train: not present
    12: 17, 11: 18,
}

#: (65536,) uint8 lookup table over the 16-bit ids; every id not in the table -> 255
ID_TO_TRAIN_ID = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
for _id, _train in SYNTHIA_ID_TO_TRAIN_ID.items():
    ID_TO_TRAIN_ID[_id] = _train


def synthia_ids_to_train_ids(ids: np.ndarray) -> np.ndarray:
    """SYNTHIA class ids (any integer array, e.g. the uint16 R channel) -> train ids, 255 outside the table."""
    ids = np.asarray(ids)
    if ids.dtype in (np.uint8, np.uint16):
        return ID_TO_TRAIN_ID[ids]
    out = np.full(ids.shape, IGNORE_INDEX, dtype=np.uint8)
    valid = (ids >= 0) & (ids < ID_TO_TRAIN_ID.size)
    out[valid] = ID_TO_TRAIN_ID[ids[valid].astype(np.int64)]
    return out


def read_synthia_label(path: Path) -> np.ndarray:
    """A SYNTHIA ``GT/LABELS`` PNG -> HxW train ids (OpenCV: Pillow would read only the high bytes)."""
    try:
        import cv2
    except ImportError as err:  # albumentations brings opencv-python(-headless)
        raise DatasetFormatError("SYNTHIA labels are 16-bit PNGs that need OpenCV: pip install opencv-python-headless") from err
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DecodeError(f"cannot decode label {path}: not a readable PNG", path)
    if label.ndim != 3 or label.shape[2] < 3:
        raise DecodeError(f"cannot decode label {path}: a SYNTHIA GT/LABELS PNG has 3 channels (class id in R), this "
                          f"one has shape {label.shape} (a _labelTrainIds.png? keep it next to its original)", path)
    return synthia_ids_to_train_ids(label[:, :, 2])  # BGR(A): R is channel 2


class Synthia(SegmentationFiles):
    """SYNTHIA-RAND-CITYSCAPES, all of it a training (source) set, as in DAFormer (``split`` None, ``"all"`` or
    ``"train"``). Another ``split`` names a list file ``ROOT/{split}.txt`` (one image file name a line);
    ``list_file`` points to a list elsewhere."""

    dataset_name = "SYNTHIA"

    def __init__(self, root: str | Path, split: str | None = None, transform=None, list_file: str | Path | None = None,
                 check: bool = True):
        self.root, self.split = Path(root), split or "all"
        self.dataset_name = f"SYNTHIA {self.root}"
        image_dir = require_dir(self.root / "RGB", "SYNTHIA", EXPECTED_TREE)
        label_dir = require_dir(self.root / "GT" / "LABELS", "SYNTHIA", EXPECTED_TREE)
        if list_file is not None and not Path(list_file).is_file():
            raise DatasetFormatError(f"SYNTHIA: split list not found: {list_file} (expected one image file name a line)")
        list_file = Path(list_file) if list_file else self.root / f"{self.split}.txt"
        if list_file.is_file():
            names = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
            images = [image_dir / Path(n).name for n in names]
        elif self.split in ("all", "train"):
            images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".png")
        else:
            raise DatasetFormatError(f"SYNTHIA: split list not found: {list_file} (split={split!r}; SYNTHIA has no "
                                     "official splits: use split=null for all images, or a list of image file names)")
        if not images:
            raise DatasetFormatError(f"SYNTHIA: no images in {image_dir}\nExpected:\n{EXPECTED_TREE}")
        raw = [label_dir / p.name for p in images]
        train_ids = [label_dir / f"{p.stem}_labelTrainIds.png" for p in images]
        self.train_id_labels = all(p.is_file() for p in train_ids)
        labels = train_ids if self.train_id_labels else raw
        pairs = [(im, lb) for im, lb in zip(images, labels) if im.is_file() and lb.is_file()]
        if not pairs:
            raise DatasetFormatError(f"SYNTHIA: none of the {len(images)} images under {self.root} has a label in "
                                     f"{label_dir}\nExpected:\n{EXPECTED_TREE}")
        super().__init__([p[0] for p in pairs], [p[1] for p in pairs], _decode_train_ids, transform, check,
                         skipped={"no label file, or no image, for the name": len(images) - len(pairs)})

    def load(self, index: int) -> dict:
        if self.train_id_labels:
            return super().load(index)
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        sample = {"image": read_rgb(image_path), "name": image_path.stem}
        sample["label"] = self.fit_label(read_synthia_label(label_path), sample["image"].shape[:2], label_path)
        return sample
