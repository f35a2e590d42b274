"""Dark Zurich (Sakaridis et al., ICCV 2019 / TPAMI 2020) in its distributed layout
(``Dark_Zurich_train_anon.zip``, ``Dark_Zurich_val_anon.zip``)::

    ROOT/rgb_anon/train/{day,twilight,night}/<sequence>/<sequence>_frame_FFFFFF_rgb_anon.png   (no labels)
    ROOT/rgb_anon/val/night/<sequence>/<sequence>_frame_FFFFFF_rgb_anon.png
    ROOT/gt/val/night/<sequence>/<sequence>_frame_FFFFFF_gt_labelTrainIds.png               (or _gt_labelIds.png)

The training split is unlabelled (a target set only); val is labelled (Cityscapes train ids, or label ids
through the Cityscapes table); test has no public labels. The ``val_ref`` day references are not read.
DAFormer (``configs/_base_/datasets/uda_cityscapes_to_darkzurich_512x512.py``) adapts to ``rgb_anon/train/night``
and scores ``rgb_anon/val`` with ``mmseg/datasets/dark_zurich.py`` (``_rgb_anon.png`` / ``_gt_labelTrainIds.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rtda.data.acdc import condition_list
from rtda.data.base import DatasetFormatError, SegmentationFiles, require_dir
from rtda.data.cityscapes import train_or_label_id_files

SPLIT_CONDITIONS = {"train": ("day", "twilight", "night"), "val": ("night",), "test": ("night",)}
IMAGE_SUFFIX = "_rgb_anon.png"
EXPECTED_TREE = (
    "  ROOT/rgb_anon/train/{day,twilight,night}/<sequence>/<sequence>_frame_FFFFFF_rgb_anon.png\n"
    "  ROOT/rgb_anon/val/night/<sequence>/<sequence>_frame_FFFFFF_rgb_anon.png\n"
    "  ROOT/gt/val/night/<sequence>/<sequence>_frame_FFFFFF_gt_labelTrainIds.png  (or _gt_labelIds.png)"
)


class DarkZurich(SegmentationFiles):
    """Dark Zurich ``split`` (train / val / test). ``conditions``: the time-of-day folders to read (None: all of the
    split's: day, twilight and night for train; night for val and test). ``labelled`` (None: only val is) reads the
    labels; train and test have none."""

    name_suffix = "_rgb_anon"

    def __init__(self, root: str | Path, split: str = "val", conditions: Sequence[str] | None = None, transform=None,
                 labelled: bool | None = None, check: bool = True):
        self.root, self.split = Path(root), split
        if split not in SPLIT_CONDITIONS:
            raise DatasetFormatError(f"Dark Zurich: split={split!r}: expected train, val or test")
        known = SPLIT_CONDITIONS[split]
        self.conditions = condition_list(known if conditions is None else conditions, known, f"Dark Zurich {split}")
        labelled = split == "val" if labelled is None else bool(labelled)
        if labelled and split != "val":
            raise DatasetFormatError(f"Dark Zurich: the {split} split has no labels (only val is labelled): read it "
                                     "with labelled=false")
        self.dataset_name = f"Dark Zurich {self.root} ({split}, {'+'.join(self.conditions)})"
        images = []
        for condition in self.conditions:
            image_dir = require_dir(self.root / "rgb_anon" / split / condition, "Dark Zurich", EXPECTED_TREE)
            found = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
            if not found:
                raise DatasetFormatError(f"Dark Zurich: no *{IMAGE_SUFFIX} files in {image_dir}/<sequence>/\n"
                                         f"Expected:\n{EXPECTED_TREE}")
            images += found
        labels, decode = None, None
        if labelled:
            gt = self.root / "gt" / split
            for condition in self.conditions:
                require_dir(gt / condition, "Dark Zurich", EXPECTED_TREE)
            stems = [(p.parent.parent.name, p.parent.name, p.name[: -len(IMAGE_SUFFIX)]) for p in images]
            train_ids = [gt / c / seq / f"{s}_gt_labelTrainIds.png" for c, seq, s in stems]
            label_ids = [gt / c / seq / f"{s}_gt_labelIds.png" for c, seq, s in stems]
            labels, decode = train_or_label_id_files(train_ids, label_ids, "Dark Zurich", split, EXPECTED_TREE)
        super().__init__(images, labels, decode, transform, check)
        #: the time of day (day / twilight / night) of each sample, in order
        self.sample_conditions = [p.parent.parent.name for p in self.image_paths]
