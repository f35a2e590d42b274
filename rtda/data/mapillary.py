"""Mapillary Vistas v1.2 (Neuhold et al., ICCV 2017), as distributed (``mapillary-vistas-dataset_public_v2.0.zip``
holds v1.2 beside v2.0)::

    ROOT/{training,validation}/images/<key>.jpg
    ROOT/{training,validation}/v1.2/labels/<key>.png    (palette PNG: index = one of the 66 v1.2 classes)

(the v1.0/v1.1 layout, ``ROOT/<split>/labels/<key>.png``, same 66 classes, is read too). The 66 classes map to
the 19 Cityscapes train ids with the rule that domain-generalisation work scores Vistas with: Rein's
``tools/convert_datasets/mapillary2cityscape.py`` (w1oves/Rein, from openseg.pytorch), which matches each class's
``readable`` name in ``config_v1.2.json`` (lower case, spaces and hyphens removed) against the Cityscapes names,
then: any name with "trafficsign", "front" or "back" -> traffic sign; "onrail" -> train; "cyclist" or "rider"
-> rider; "pole" or "streetlight" -> pole; "curb" or "pedestrianarea" -> sidewalk; "crosswalkplain", "parking",
"bikelane", "servicelane" or "lanemarking" -> road; every other class -> 255. :data:`MAPILLARY_TO_TRAIN_ID` is
that rule applied to the v1.2 names (:data:`V12_CLASSES`, the order of ``config_v1.2.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rtda.data.base import DatasetFormatError, SegmentationFiles, require_dir, require_files
from rtda.data.labels import CLASS_NAMES, IGNORE_INDEX

#: the ``readable`` names of Vistas v1.2's 66 classes, in label order (``config_v1.2.json``)
V12_CLASSES: tuple[str, ...] = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane", "Crosswalk - Plain",
    "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane", "Sidewalk", "Bridge", "Building",
    "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk",
    "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner", "Bench",
    "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox", "Manhole",
    "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame", "Utility Pole", "Traffic Light",
    "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan",
    "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow", "Car Mount", "Ego Vehicle",
    "Unlabeled",
)
SPLITS = {"train": "training", "val": "validation", "test": "testing",
          "training": "training", "validation": "validation", "testing": "testing"}
EXPECTED_TREE = (
    "  ROOT/{split}/images/<key>.jpg\n"
    "  ROOT/{split}/v1.2/labels/<key>.png   (palette PNG, index = the 66 v1.2 class ids)"
)


def rein_train_id(readable: str) -> int:
    """Rein's ``mapillary2cityscape.py`` rule for one class name -> Cityscapes train id (255: void)."""
    cityscapes = {n.replace(" ", ""): i for i, n in enumerate(CLASS_NAMES)}  # "trafficlight", "trafficsign", ...
    name = readable.lower().replace(" ", "").replace("-", "")
    if name in cityscapes:
        return cityscapes[name]
    rules = ((("trafficsign", "front", "back"), "trafficsign"), (("onrail",), "train"), (("cyclist", "rider"), "rider"),
             (("pole", "streetlight"), "pole"), (("curb", "pedestrianarea"), "sidewalk"),
             (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), "road"))
    for keys, target in rules:
        if any(k in name for k in keys):
            return cityscapes[target]
    return IGNORE_INDEX


#: (256,) uint8: Vistas v1.2 class id -> Cityscapes train id; ids 66..255 (not v1.2 classes) -> 255
MAPILLARY_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _id, _name in enumerate(V12_CLASSES):
    MAPILLARY_TO_TRAIN_ID[_id] = rein_train_id(_name)


def decode_mapillary_label(img: Image.Image) -> np.ndarray:
    if img.mode not in ("P", "L"):
        raise ValueError(f"a Vistas v1.2 label is a palette PNG (mode P), not {img.mode} (an instance or panoptic "
                         "image? the labels are under <split>/v1.2/labels/)")
    ids = np.asarray(img)
    if (ids >= len(V12_CLASSES)).any():
        raise ValueError(f"holds class ids above {len(V12_CLASSES) - 1}: a v2.0 label (124 classes)? read "
                         "<split>/v1.2/labels/")
    return MAPILLARY_TO_TRAIN_ID[ids]


class Mapillary(SegmentationFiles):
    """Mapillary Vistas ``split`` (train / val / test, or training / validation / testing) with the v1.2 labels
    (``version``) mapped to the 19 Cityscapes classes. ``labelled=False`` reads images only."""

    def __init__(self, root: str | Path, split: str = "val", transform=None, labelled: bool = True,
                 version: str = "v1.2", check: bool = True):
        self.root = Path(root)
        if split not in SPLITS:
            raise DatasetFormatError(f"Mapillary: split={split!r}: expected train, val or test (training, validation, "
                                     "testing)")
        self.split = SPLITS[split]
        self.dataset_name = f"Mapillary Vistas {self.root} ({self.split})"
        tree = EXPECTED_TREE.replace("{split}", self.split)
        image_dir = require_dir(self.root / self.split / "images", "Mapillary", tree)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not images:
            raise DatasetFormatError(f"Mapillary: no .jpg images in {image_dir}\nExpected:\n{tree}")
        labels = None
        if labelled:
            label_dir = self.root / self.split / version / "labels"
            if not label_dir.is_dir() and (self.root / self.split / "labels").is_dir():  # v1.0 / v1.1 layout
                label_dir = self.root / self.split / "labels"
            require_dir(label_dir, "Mapillary", tree)
            labels = require_files([label_dir / f"{p.stem}.png" for p in images], "Mapillary", self.split, "label", tree)
        super().__init__(images, labels, decode_mapillary_label, transform, check)
