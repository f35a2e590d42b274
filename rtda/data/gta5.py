"""GTA5 (Richter et al., "Playing for Data", 2016): ``ROOT/images/NNNNN.png`` + ``ROOT/labels/NNNNN.png``.

Labels hold Cityscapes label ids, either as the original indexed (palette) PNGs or, in some
redistributions, as RGB colour-coded PNGs; the encoding is detected per file. The public copy lacks
some label files: such images are skipped and counted in one warning. A label whose size differs
from its image is resized to it with nearest neighbour, as the authors' loaders effectively do (they
resize both to 1280x720), and counted in the same warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rtda.data.base import DatasetFormatError, SegmentationFiles, require_dir
from rtda.data.labels import colors_to_label_ids, label_ids_to_train_ids

EXPECTED_TREE = "  ROOT/images/00001.png ...\n  ROOT/labels/00001.png ...   (label ids, indexed or RGB colour-coded)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def decode_gta5_label(img: Image.Image) -> np.ndarray:
    """Indexed/greyscale PNG -> its values are label ids; RGB -> colours decoded to ids. Returns train ids."""
    if img.mode in ("RGB", "RGBA"):
        ids = colors_to_label_ids(np.asarray(img.convert("RGB")))
    elif img.mode in ("P", "L"):
        ids = np.asarray(img)
    elif img.mode in ("I", "I;16", "I;16B"):
        ids = np.asarray(img).astype(np.int64)
    else:
        raise ValueError(f"unsupported label PNG mode {img.mode!r} (expected P, L or RGB)")
    return label_ids_to_train_ids(ids)


class GTA5(SegmentationFiles):
    """The GTA5 dataset. ``split`` names a list file ``ROOT/{split}.txt`` (one image name a line, as the
    authors' ``gta5_list/train.txt``) when one exists; otherwise (and for ``split="all"``) every image
    is used. ``list_file`` points to a list elsewhere."""

    dataset_name = "GTA5"
    allow_resize = True

    def __init__(self, root: str | Path, split: str = "all", transform=None, list_file: str | Path | None = None,
                 check: bool = True):
        self.root = Path(root)
        self.dataset_name = f"GTA5 {self.root}"
        image_dir = require_dir(self.root / "images", "GTA5", EXPECTED_TREE)
        label_dir = require_dir(self.root / "labels", "GTA5", EXPECTED_TREE)
        if list_file is not None and not Path(list_file).is_file():
            raise DatasetFormatError(f"GTA5: split list not found: {list_file} (expected one image file name a line)")
        list_file = Path(list_file) if list_file else self.root / f"{split}.txt"
        if list_file.is_file():
            names = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
            images = [image_dir / n for n in names]
        else:
            images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetFormatError(f"GTA5: no images in {image_dir}\nExpected:\n{EXPECTED_TREE}")
        labels = [label_dir / (p.stem + ".png") for p in images]
        pairs = [(im, lb) for im, lb in zip(images, labels) if im.is_file() and lb.is_file()]
        missing = len(images) - len(pairs)
        if not pairs:
            raise DatasetFormatError(f"GTA5: none of the {len(images)} images under {self.root} has a label in {label_dir}"
                                     f"\nExpected:\n{EXPECTED_TREE}")
        super().__init__([p[0] for p in pairs], [p[1] for p in pairs], decode_gta5_label, transform, check,
                         skipped={"no label file, or no image, for the name": missing})
