"""ACDC, the Adverse Conditions Dataset with Correspondences (Sakaridis et al., ICCV 2021), in its distributed
layout (``rgb_anon_trainvaltest.zip`` + ``gt_trainval.zip``)::

    ROOT/rgb_anon/<condition>/<split>/<sequence>/<sequence>_frame_FFFFFF_rgb_anon.png
    ROOT/gt/<condition>/<split>/<sequence>/<sequence>_frame_FFFFFF_gt_labelTrainIds.png   (or _gt_labelIds.png)

conditions fog, night, rain, snow; splits train, val, test (test: no labels). The ``<split>_ref`` folders (the
daytime reference frames, ``…_rgb_ref_anon.png``) are not read. Labels are the Cityscapes ones:
``_gt_labelTrainIds.png`` read directly when every image has one, else ``_gt_labelIds.png`` through the
Cityscapes table (:func:`rtda.data.labels.label_ids_to_train_ids`). DAFormer (``mmseg/datasets/acdc.py``) reads
the same files after flattening the conditions into one folder; here the official tree is read as it is, and
each sample's condition is kept (:attr:`ACDC.sample_conditions`, and as the sample's ``"group"``): a test set of
several conditions is scored per condition as well (``results.json``: ``test.groups.fog.mIoU``, …).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rtda.data.base import DatasetFormatError, SegmentationFiles, require_dir
from rtda.data.cityscapes import train_or_label_id_files

CONDITIONS = ("fog", "night", "rain", "snow")
IMAGE_SUFFIX = "_rgb_anon.png"
EXPECTED_TREE = (
    "  ROOT/rgb_anon/<condition>/{split}/<sequence>/<sequence>_frame_FFFFFF_rgb_anon.png\n"
    "  ROOT/gt/<condition>/{split}/<sequence>/<sequence>_frame_FFFFFF_gt_labelTrainIds.png  (or _gt_labelIds.png)\n"
    "  (conditions: fog, night, rain, snow)"
)


def condition_list(conditions, known: Sequence[str], dataset: str) -> list[str]:
    conditions = [conditions] if isinstance(conditions, str) else list(conditions)
    unknown = [c for c in conditions if c not in known]
    if unknown or not conditions:
        raise DatasetFormatError(f"{dataset}: conditions={conditions}: expected some of {', '.join(known)}")
    return conditions


class ACDC(SegmentationFiles):
    """ACDC ``split`` (train / val / test) of the given ``conditions`` (default all four). ``labelled=False`` reads
    the images only (the adaptation target; the test split has no public labels)."""

    name_suffix = "_rgb_anon"
    group_by = "condition"

    def __init__(self, root: str | Path, split: str = "train", conditions: Sequence[str] = CONDITIONS, transform=None,
                 labelled: bool = True, check: bool = True):
        self.root, self.split = Path(root), split
        self.conditions = condition_list(conditions, CONDITIONS, "ACDC")
        self.dataset_name = f"ACDC {self.root} ({split}, {'+'.join(self.conditions)})"
        tree = EXPECTED_TREE.replace("{split}", split)
        images, image_conditions = [], []
        for condition in self.conditions:
            image_dir = require_dir(self.root / "rgb_anon" / condition / split, "ACDC", tree)
            found = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
            if not found:
                raise DatasetFormatError(f"ACDC: no *{IMAGE_SUFFIX} files in {image_dir}/<sequence>/\nExpected:\n{tree}")
            images += found
            image_conditions += [condition] * len(found)
        labels, decode = None, None
        if labelled:
            if split == "test":
                raise DatasetFormatError("ACDC: the test split has no public labels: read it with labelled=false "
                                         "(score it on the benchmark server)")
            stems = [(c, p.parent.name, p.name[: -len(IMAGE_SUFFIX)]) for c, p in zip(image_conditions, images)]
            for condition in self.conditions:
                require_dir(self.root / "gt" / condition / split, "ACDC", tree)
            train_ids = [self.root / "gt" / c / split / seq / f"{s}_gt_labelTrainIds.png" for c, seq, s in stems]
            label_ids = [self.root / "gt" / c / split / seq / f"{s}_gt_labelIds.png" for c, seq, s in stems]
            labels, decode = train_or_label_id_files(train_ids, label_ids, "ACDC", split, tree)
        condition_of = dict(zip(images, image_conditions))
        super().__init__(images, labels, decode, transform, check)
        #: the condition (fog / night / rain / snow) of each sample, in order
        self.sample_conditions = [condition_of[p] for p in self.image_paths]
        self.sample_groups = self.sample_conditions  # each sample's "group": per-condition test scores
