"""IDD, the India Driving Dataset (Varma et al., WACV 2019), segmentation part (``idd-segmentation.tar.gz``)::

    ROOT/leftImg8bit/{train,val,test}/<drive>/<frame>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<drive>/<frame>_gtFine_polygons.json

scored on the 19 Cityscapes classes through the ``csTrainId`` column of the IDD toolkit's label table
(AutoNUE/public-code ``helpers/anue_labels.py``). The labels are the toolkit's rendering of the polygons
(``preperation/createLabels.py --id-type csTrainId`` → ``json2labelImg.py``): an 8-bit image filled with 255 (the
csTrainId of "unlabeled"), then each object's polygon, in file order, filled with its label's csTrainId by
Pillow's ``ImageDraw.polygon`` — deleted objects and polygons of fewer than 3 points skipped, a "…group" label
drawn as its class, unknown labels skipped. The same drawing is done here from the JSON, or the toolkit's own
``<frame>_gtFine_labelcsTrainIds.png`` is read when every image has one.

Why not the ``level3Id`` images (``_gtFine_labellevel3Ids.png``, the toolkit's default, IDD's 26-class benchmark):
level 3 merges classes that Cityscapes keeps apart, so no level3Id → trainId table exists. Level 3 id 3 holds rail
track (ignored in Cityscapes) with non-drivable fallback (terrain), id 4 person with animal (ignored), id 12 train
with caravan, trailer and vehicle fallback (ignored), id 20 pole with polegroup (ignored), id 25 sky with fallback
background (ignored): each of these ids is a train class for some of its pixels and 255 for others (and id 1 merges
parking with drivable fallback, Cityscapes label ids 9 and none). Only the polygons' own labels say which, hence
csTrainId.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rtda.data.base import (
    DatasetFormatError,
    DecodeError,
    SegmentationFiles,
    image_size,
    read_rgb,
    require_dir,
)
from rtda.data.cityscapes import _decode_train_ids

EXPECTED_TREE = (
    "  ROOT/leftImg8bit/{split}/<drive>/<frame>_leftImg8bit.png\n"
    "  ROOT/gtFine/{split}/<drive>/<frame>_gtFine_polygons.json   (or the toolkit's _gtFine_labelcsTrainIds.png)"
)
IMAGE_SUFFIXES = ("_leftImg8bit.png", "_leftImg8bit.jpg")

# fmt: off
#: IDD label name -> csTrainId: the ``csTrainId`` column of AutoNUE/public-code helpers/anue_labels.py
IDD_CS_TRAIN_ID: dict[str, int] = {
    "road": 0, "parking": 255, "drivable fallback": 255, "sidewalk": 1, "rail track": 255,
    "non-drivable fallback": 9, "person": 11, "animal": 255, "rider": 12, "motorcycle": 17, "bicycle": 18,
    "autorickshaw": 255, "car": 13, "truck": 14, "bus": 15, "caravan": 255, "trailer": 255, "train": 16,
    "vehicle fallback": 255, "curb": 255, "wall": 3, "fence": 4, "guard rail": 255, "billboard": 255,
    "traffic sign": 7, "traffic light": 6, "pole": 5, "polegroup": 255, "obs-str-bar-fallback": 255, "building": 2,
    "bridge": 255, "tunnel": 255, "vegetation": 8, "sky": 10, "fallback background": 255, "unlabeled": 255,
    "ego vehicle": 255, "rectification border": 255, "out of roi": 255, "license plate": 255,
}
# fmt: on


def _polygons(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
        return {"width": int(data["imgWidth"]), "height": int(data["imgHeight"]), "objects": list(data["objects"])}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise DecodeError(f"cannot read polygons {path}: {err!r} (expected an IDD _gtFine_polygons.json with imgWidth, "
                          "imgHeight and objects)", path) from err


def render_polygons(path: str | Path) -> np.ndarray:
    """An IDD ``_gtFine_polygons.json`` -> HxW uint8 csTrainIds, drawn as the toolkit's ``json2labelImg.py``."""
    annotation = _polygons(Path(path))
    label = Image.new("L", (annotation["width"], annotation["height"]), IDD_CS_TRAIN_ID["unlabeled"])
    drawer = ImageDraw.Draw(label)
    try:
        for obj in annotation["objects"]:
            name = str(obj["label"])
            polygon = [(p[0], p[1]) for p in obj["polygon"]]
            if obj.get("deleted", 0) or len(polygon) < 3:
                continue
            if name not in IDD_CS_TRAIN_ID and name.endswith("group"):
                name = name[: -len("group")]
            if name not in IDD_CS_TRAIN_ID:
                continue  # the toolkit prints "Label '…' not known." and goes on
            drawer.polygon(polygon, fill=IDD_CS_TRAIN_ID[name])
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise DecodeError(f"cannot read polygons {path}: an object without a valid label or polygon ({err!r})",
                          path) from err
    return np.asarray(label)


class IDD(SegmentationFiles):
    """IDD ``split`` (train / val / test) on the 19 Cityscapes classes. ``labelled=False`` reads images only."""

    name_suffix = "_leftImg8bit"

    def __init__(self, root: str | Path, split: str = "val", transform=None, labelled: bool = True, check: bool = True):
        self.root, self.split = Path(root), split
        self.dataset_name = f"IDD {self.root} ({split})"
        tree = EXPECTED_TREE.replace("{split}", split)
        image_dir = require_dir(self.root / "leftImg8bit" / split, "IDD", tree)
        images = sorted(p for p in image_dir.glob("*/*") if p.name.endswith(IMAGE_SUFFIXES))
        if not images:
            raise DatasetFormatError(f"IDD: no *_leftImg8bit.png files in {image_dir}/<drive>/\nExpected:\n{tree}")
        labels = None
        if labelled:
            label_dir = require_dir(self.root / "gtFine" / split, "IDD", tree)
            stems = [f"{p.parent.name}/{p.name[: -len(IMAGE_SUFFIXES[0])]}" for p in images]
            rendered = [label_dir / f"{s}_gtFine_labelcsTrainIds.png" for s in stems]
            polygons = [label_dir / f"{s}_gtFine_polygons.json" for s in stems]
            if all(p.is_file() for p in rendered):
                labels = rendered
            else:
                missing = [p for p in polygons if not p.is_file()]
                if missing:
                    raise DatasetFormatError(f"IDD: {len(missing)} of {len(images)} {split} images have no polygons, "
                                             f"e.g. {missing[0]}\nExpected:\n{tree}")
                labels = polygons
        super().__init__(images, labels, _decode_train_ids, transform, check)

    def _check(self, images: list[Path], labels: list[Path] | None):
        if labels is None or labels[0].suffix != ".json":
            return super()._check(images, labels)
        keep_images, keep_labels, unreadable = [], [], []
        for image, label in zip(images, labels):
            size = image_size(image)
            try:
                annotation = _polygons(label)
            except DecodeError:
                annotation = None
            if size is None or annotation is None:
                unreadable.append(image if size is None else label)
                continue
            if (annotation["height"], annotation["width"]) != size:
                raise DatasetFormatError(f"{self.dataset_name}: label {label} is {annotation['width']}x"
                                         f"{annotation['height']} but its image {image} is {size[1]}x{size[0]}")
            keep_images.append(image)
            keep_labels.append(label)
        if unreadable:
            self.skipped[f"unreadable image or label, e.g. {unreadable[0]}"] = len(unreadable)
        return keep_images, keep_labels

    def load(self, index: int) -> dict:
        """The raw sample, named ``<drive>_<frame>`` (frame numbers repeat across drives)."""
        image_path = self.image_paths[index]
        label_path = self.label_paths[index] if self.label_paths is not None else None
        if label_path is None or label_path.suffix != ".json":
            sample = super().load(index)
        else:
            sample = {"image": read_rgb(image_path)}
            sample["label"] = self.fit_label(render_polygons(label_path), sample["image"].shape[:2], label_path)
        sample["name"] = f"{image_path.parent.name}_{image_path.stem.removesuffix(self.name_suffix)}"
        return sample
