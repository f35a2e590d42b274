"""Cityscapes label definitions: the 19 train classes, the id -> trainId lookup table, palettes.

Mirrors ``cityscapesscripts/helpers/labels.py`` (the benchmark's own table). GTA5 labels use the
same label ids, so both datasets go through :func:`label_ids_to_train_ids`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255


class Label(NamedTuple):
    name: str
    id: int
    train_id: int  # 255 = ignored in training and evaluation
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[Label, ...] = (
    Label("unlabeled",              0, 255, (0, 0, 0)),
    Label("ego vehicle",            1, 255, (0, 0, 0)),
    Label("rectification border",   2, 255, (0, 0, 0)),
    Label("out of roi",             3, 255, (0, 0, 0)),
    Label("static",                 4, 255, (0, 0, 0)),
    Label("dynamic",                5, 255, (111, 74, 0)),
    Label("ground",                 6, 255, (81, 0, 81)),
    Label("road",                   7,   0, (128, 64, 128)),
    Label("sidewalk",               8,   1, (244, 35, 232)),
    Label("parking",                9, 255, (250, 170, 160)),
    Label("rail track",            10, 255, (230, 150, 140)),
    Label("building",              11,   2, (70, 70, 70)),
    Label("wall",                  12,   3, (102, 102, 156)),
    Label("fence",                 13,   4, (190, 153, 153)),
    Label("guard rail",            14, 255, (180, 165, 180)),
    Label("bridge",                15, 255, (150, 100, 100)),
    Label("tunnel",                16, 255, (150, 120, 90)),
    Label("pole",                  17,   5, (153, 153, 153)),
    Label("polegroup",             18, 255, (153, 153, 153)),
    Label("traffic light",         19,   6, (250, 170, 30)),
    Label("traffic sign",          20,   7, (220, 220, 0)),
    Label("vegetation",            21,   8, (107, 142, 35)),
    Label("terrain",               22,   9, (152, 251, 152)),
    Label("sky",                   23,  10, (70, 130, 180)),
    Label("person",                24,  11, (220, 20, 60)),
    Label("rider",                 25,  12, (255, 0, 0)),
    Label("car",                   26,  13, (0, 0, 142)),
    Label("truck",                 27,  14, (0, 0, 70)),
    Label("bus",                   28,  15, (0, 60, 100)),
    Label("caravan",               29, 255, (0, 0, 90)),
    Label("trailer",               30, 255, (0, 0, 110)),
    Label("train",                 31,  16, (0, 80, 100)),
    Label("motorcycle",            32,  17, (0, 0, 230)),
    Label("bicycle",               33,  18, (119, 11, 32)),
)
# "license plate" (id -1, trainId -1) never occurs in uint8 label images and is left out.
# fmt: on

NUM_CLASSES = 19
TRAIN_LABELS: tuple[Label, ...] = tuple(sorted((lb for lb in LABELS if lb.train_id != 255), key=lambda lb: lb.train_id))
CLASS_NAMES: tuple[str, ...] = tuple(lb.name for lb in TRAIN_LABELS)
NAME_TO_ID: dict[str, int] = {lb.name: lb.id for lb in LABELS}

#: (256,) uint8 lookup table: label id -> train id; every id not in the table -> 255.
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lb in LABELS:
    ID_TO_TRAIN_ID[_lb.id] = _lb.train_id

#: (256, 3) uint8 palette indexed by train id (255 -> black), for colourising predictions.
TRAIN_ID_PALETTE = np.zeros((256, 3), dtype=np.uint8)
for _lb in TRAIN_LABELS:
    TRAIN_ID_PALETTE[_lb.train_id] = _lb.color

#: (256, 3) uint8 palette indexed by label id: the palette of GTA5's indexed label PNGs.
ID_PALETTE = np.zeros((256, 3), dtype=np.uint8)
for _lb in LABELS:
    ID_PALETTE[_lb.id] = _lb.color


def label_ids_to_train_ids(array: np.ndarray) -> np.ndarray:
    """Map Cityscapes label ids to the 19 train ids (255 = ignore), by table lookup.

    Accepts any integer array; values outside 0..255 (e.g. the -1 of "license plate") map to 255.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return ID_TO_TRAIN_ID[array]
    out = np.full(array.shape, IGNORE_INDEX, dtype=np.uint8)
    valid = (array >= 0) & (array < 256)
    out[valid] = ID_TO_TRAIN_ID[array[valid].astype(np.int64)]
    return out


def _pack_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


# Colour -> label id for RGB colour-coded labels. Several ids share black (0,0,0) and pole/polegroup
# share grey: the first (lowest) id wins, which maps to the same train id in every shared case.
_COLOR_KEYS, _COLOR_FIRST = np.unique(_pack_rgb(np.array([lb.color for lb in LABELS])), return_index=True)
_COLOR_IDS = np.array([LABELS[i].id for i in _COLOR_FIRST], dtype=np.uint8)


def colors_to_label_ids(rgb: np.ndarray, unknown: int = 0) -> np.ndarray:
    """Decode an HxWx3 colour-coded label image (Cityscapes palette) into label ids.

    Colours not in the palette (JPEG-like artefacts, anti-aliasing) become ``unknown`` (id 0,
    "unlabeled", hence ignored). Vectorised: one ``searchsorted`` over packed 24-bit colours.
    """
    keys = _pack_rgb(np.asarray(rgb)[..., :3])
    pos = np.clip(np.searchsorted(_COLOR_KEYS, keys), 0, len(_COLOR_KEYS) - 1)
    ids = _COLOR_IDS[pos]
    ids[_COLOR_KEYS[pos] != keys] = unknown
    return ids



# -- class subsets scored apart (``data.eval_classes``) -------------------------------------------------------
# SYNTHIA (SYNTHIA-RAND-CITYSCAPES) has no terrain, truck or train: its benchmark scores the other 16 classes
# (mIoU16) and the 13 without wall, fence and pole (mIoU13). These are the train-id lists that the public UDA
# evaluation scripts reporting both hard-code (``synthia_set_16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17,
# 18]``, ``synthia_set_13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]``); DAFormer's converter marks the
# same three (terrain, truck, train) "not present in synthia".
SYNTHIA16: tuple[str, ...] = tuple(n for n in CLASS_NAMES if n not in ("terrain", "truck", "train"))
SYNTHIA13: tuple[str, ...] = tuple(n for n in SYNTHIA16 if n not in ("wall", "fence", "pole"))

#: ``data.eval_classes`` -> the classes the headline ``mIoU`` averages
EVAL_CLASSES: dict[str, tuple[str, ...]] = {"all": CLASS_NAMES, "synthia16": SYNTHIA16, "synthia13": SYNTHIA13}

#: ``data.eval_classes`` -> the class subsets also reported, as ``mIoU<number of classes>``: a SYNTHIA run
#: reports mIoU16 and mIoU13 together (and mIoU19 over all classes), whichever of the two is the headline
REPORTED_SUBSETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "all": (),
    "synthia16": (SYNTHIA16, SYNTHIA13, CLASS_NAMES),
    "synthia13": (SYNTHIA16, SYNTHIA13, CLASS_NAMES),
}
