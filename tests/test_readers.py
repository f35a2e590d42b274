"""The further benchmarks' readers (SYNTHIA, ACDC, Dark Zurich, BDD100K, Mapillary Vistas, IDD) on small trees
written here in their real formats, against the official tables transcribed below from the official code (not
from the readers' own tables); the class-subset scores (mIoU16 / mIoU13) of a SYNTHIA run; the new configs."""

import json
import re

import cv2
import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_config
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader

from rtda.adaptation.segmentation import SegmentationModule
from rtda.analysis.compare import load_runs, subset_names, summarize, to_text
from rtda.data.acdc import ACDC
from rtda.data.base import DatasetFormatError, DecodeError
from rtda.data.bdd100k import BDD100K
from rtda.data.dark_zurich import DarkZurich
from rtda.data.datamodule import DomainAdaptationDataModule
from rtda.data.idd import IDD
from rtda.data.labels import CLASS_NAMES, ID_PALETTE, SYNTHIA13, SYNTHIA16, label_ids_to_train_ids
from rtda.data.mapillary import Mapillary
from rtda.data.synthia import Synthia
from rtda.metrics import SegmentationMetrics, subset_miou, subset_scores
from rtda.run import results as run_results
from rtda.run.errors import ConfigValueError, one_line

RNG = np.random.default_rng(0)
H, W = 6, 10


def _image(h=H, w=W):
    return RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _save_rgb(path, h=H, w=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(h, w)).save(path)


# ---------------------------------------------------------------------------------------------------------------
# SYNTHIA
# ---------------------------------------------------------------------------------------------------------------

# lhoyer/DAFormer tools/convert_datasets/synthia.py, convert_to_train_id's id_to_trainid (the dataset README's)
DAFORMER_ID_TO_TRAINID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15,
    20: 16, 12: 17, 11: 18,
}


def daformer_convert_to_train_id(file):
    """DAFormer's converter, as its tools/convert_datasets/synthia.py runs it (minus the class statistics)."""
    label = cv2.imread(file, cv2.IMREAD_UNCHANGED)[:, :, -1]
    label_copy = 255 * np.ones(label.shape, dtype=np.uint8)
    for k, v in DAFORMER_ID_TO_TRAINID.items():
        label_copy[label == k] = v
    new_file = file.replace(".png", "_labelTrainIds.png")
    Image.fromarray(label_copy, mode="L").save(new_file)
    return np.asarray(Image.open(new_file))


# every SYNTHIA id 0..22, and 16-bit values whose low byte is a class id (259 = 256 + 3, 1290 = 5 * 256 + 10): an
# 8-bit read (Pillow keeps the high byte) would make them sky / fence; officially they are not in the table: 255
SYNTHIA_VALUES = np.array(list(range(23)) + [259, 1290, 65535], dtype=np.uint16)


def _synthia_tree(root, n=2, h=H, w=W):
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    truth = {}
    for i in range(n):
        name = f"{i:07d}.png"
        Image.fromarray(_image(h, w)).save(root / "RGB" / name)
        ids = RNG.choice(SYNTHIA_VALUES, size=(h, w))
        ids.flat[: len(SYNTHIA_VALUES)] = SYNTHIA_VALUES
        instance = RNG.integers(0, 65535, (h, w), dtype=np.uint16)
        bgr = np.stack([np.zeros_like(ids), instance, ids], axis=-1)  # R (class id) last in OpenCV's BGR order
        assert cv2.imwrite(str(root / "GT" / "LABELS" / name), bgr)
        expected = np.full((h, w), 255, np.uint8)
        for k, v in DAFORMER_ID_TO_TRAINID.items():
            expected[ids == k] = v
        truth[name[:-4]] = (ids, expected)
    return truth


def test_synthia_16bit_labels_give_the_official_train_ids(tmp_path):
    truth = _synthia_tree(tmp_path)
    label_file = tmp_path / "GT" / "LABELS" / "0000000.png"
    assert cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # the real format: 16-bit, 3 channels
    ds = Synthia(tmp_path)
    assert len(ds) == 2
    for i in range(2):
        s = ds[i]
        ids, expected = truth[s["name"]]
        np.testing.assert_array_equal(s["label"], expected)
        assert s["label"].dtype == np.uint8 and s["image"].shape == (H, W, 3) and s["image"].dtype == np.uint8
    ids, expected = truth["0000000"]
    assert set(expected[ids == 259].tolist()) == {255} and set(expected[ids == 3].tolist()) == {0}
    # what Pillow would have given: not the official ids
    pillow_r = np.asarray(Image.open(label_file).convert("RGB"))[..., 0].astype(np.int64)
    assert not np.array_equal(pillow_r, ids.astype(np.int64))
    # the same as DAFormer's converter output
    np.testing.assert_array_equal(ds[0]["label"], daformer_convert_to_train_id(str(label_file)))


def test_synthia_reads_daformers_converted_train_ids(tmp_path):
    truth = _synthia_tree(tmp_path)
    converted = {p.stem: daformer_convert_to_train_id(str(p)) for p in sorted((tmp_path / "GT" / "LABELS").glob("*.png"))}
    ds = Synthia(tmp_path, split="train")
    assert ds.train_id_labels and len(ds) == 2  # RGB/*.png only: the _labelTrainIds files are not images
    for i in range(2):
        s = ds[i]
        np.testing.assert_array_equal(s["label"], converted[s["name"]])
        np.testing.assert_array_equal(s["label"], truth[s["name"]][1])


def test_synthia_split_list_and_missing_list(tmp_path):
    _synthia_tree(tmp_path, n=3)
    (tmp_path / "mine.txt").write_text("0000002.png\n0000000.png\n")
    assert [p.name for p in Synthia(tmp_path, split="mine").image_paths] == ["0000002.png", "0000000.png"]
    with pytest.raises(DatasetFormatError, match=r"SYNTHIA: split list not found: .*other.txt"):
        Synthia(tmp_path, split="other")


def test_synthia_missing_label_is_skipped_and_counted(tmp_path):
    _synthia_tree(tmp_path, n=3)
    (tmp_path / "GT" / "LABELS" / "0000001.png").unlink()
    with pytest.warns(UserWarning, match=r"2 samples used; 1 of 3 samples skipped \(no label file"):
        ds = Synthia(tmp_path)
    assert len(ds) == 2


# ---------------------------------------------------------------------------------------------------------------
# missing folders and wrong label sizes: one line naming the path (every reader)
# ---------------------------------------------------------------------------------------------------------------

READERS = {
    "synthia": (lambda root: Synthia(root), "SYNTHIA", "RGB"),
    "acdc": (lambda root: ACDC(root, "val"), "ACDC", "rgb_anon/fog/val"),
    "dark_zurich": (lambda root: DarkZurich(root, "val"), "Dark Zurich", "rgb_anon/val/night"),
    "bdd100k": (lambda root: BDD100K(root, "val"), "BDD100K", "images/10k/val"),
    "mapillary": (lambda root: Mapillary(root, "val"), "Mapillary", "validation/images"),
    "idd": (lambda root: IDD(root, "val"), "IDD", "leftImg8bit/val"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_missing_root_is_one_line_naming_the_folder(tmp_path, reader):
    build, name, folder = READERS[reader]
    with pytest.raises(DatasetFormatError) as info:
        build(tmp_path / "nowhere")
    line = one_line(info.value)
    assert "\n" not in line and line.startswith(f"{name}: folder not found: ") and f"nowhere/{folder}" in line


def _wrong_size_trees(root, reader):
    """A tree of one image whose label is 1 pixel narrower; returns the label's path."""
    if reader == "synthia":
        _synthia_tree(root, n=1)
        label = root / "GT" / "LABELS" / "0000000.png"
        cv2.imwrite(str(label), np.zeros((H, W - 1, 3), np.uint16))
    elif reader == "acdc":
        _acdc_tree(root)
        label = next((root / "gt" / "fog" / "val").glob("*/*_gt_labelTrainIds.png"))
        Image.fromarray(np.zeros((H, W - 1), np.uint8)).save(label)
    elif reader == "dark_zurich":
        _dark_zurich_tree(root)
        label = next((root / "gt" / "val" / "night").glob("*/*_gt_labelTrainIds.png"))
        Image.fromarray(np.zeros((H, W - 1), np.uint8)).save(label)
    elif reader == "bdd100k":
        _bdd_tree(root)
        label = next((root / "labels" / "sem_seg" / "masks" / "val").glob("*.png"))
        Image.fromarray(np.zeros((H, W - 1), np.uint8)).save(label)
    elif reader == "mapillary":
        _mapillary_tree(root)
        label = next((root / "validation" / "v1.2" / "labels").glob("*.png"))
        Image.fromarray(np.zeros((H, W - 1), np.uint8), mode="P").save(label)
    else:
        _idd_tree(root)
        label = next((root / "gtFine" / "val").glob("*/*_polygons.json"))
        data = json.loads(label.read_text())
        data["imgWidth"] = W - 1
        label.write_text(json.dumps(data))
    return label


@pytest.mark.parametrize("reader", sorted(READERS))
def test_label_of_another_size_is_one_line_naming_it(tmp_path, reader):
    label = _wrong_size_trees(tmp_path, reader)
    with pytest.raises(DatasetFormatError) as info:
        READERS[reader][0](tmp_path)
    line = one_line(info.value)
    assert "\n" not in line and str(label) in line and f"is {W - 1}x{H} but its image" in line


# ---------------------------------------------------------------------------------------------------------------
# ACDC
# ---------------------------------------------------------------------------------------------------------------

def _label_ids(h=H, w=W):
    return RNG.choice([0, 1, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33, 9, 14],
                      size=(h, w)).astype(np.uint8)


def _acdc_tree(root, split="val", conditions=("fog", "night", "rain", "snow"), train_ids=True, label_ids=True):
    truth = {}
    for c, condition in enumerate(conditions):
        seq = f"GOPR0{400 + c}"
        for f in range(2):
            stem = f"{seq}_frame_{f:06d}"
            _save_rgb(root / "rgb_anon" / condition / split / seq / f"{stem}_rgb_anon.png")
            # the reference (daytime) frames, which must not be read
            _save_rgb(root / "rgb_anon" / condition / f"{split}_ref" / f"{seq}_ref" / f"{stem}_rgb_ref_anon.png")
            ids = _label_ids()
            gt = root / "gt" / condition / split / seq
            gt.mkdir(parents=True, exist_ok=True)
            if label_ids:
                Image.fromarray(ids).save(gt / f"{stem}_gt_labelIds.png")
                Image.fromarray(ID_PALETTE[ids]).save(gt / f"{stem}_gt_labelColor.png")
            if train_ids:
                Image.fromarray(label_ids_to_train_ids(ids)).save(gt / f"{stem}_gt_labelTrainIds.png")
            truth[stem] = (condition, label_ids_to_train_ids(ids))
    return truth


@pytest.mark.parametrize("train_ids", [True, False])
def test_acdc_all_conditions_without_the_ref_folders(tmp_path, train_ids):
    truth = _acdc_tree(tmp_path, train_ids=train_ids)
    ds = ACDC(tmp_path, "val")
    assert len(ds) == 8  # 4 conditions x 2 frames; the _ref frames are not samples
    for i in range(len(ds)):
        s = ds[i]
        condition, expected = truth[s["name"]]
        np.testing.assert_array_equal(s["label"], expected)
        assert ds.sample_conditions[i] == condition
    assert "ref" not in " ".join(str(p) for p in ds.image_paths)
    assert all(p.name.endswith("_gt_labelTrainIds.png" if train_ids else "_gt_labelIds.png") for p in ds.label_paths)


def test_acdc_conditions_unlabelled_target_and_test_split(tmp_path):
    _acdc_tree(tmp_path, split="train", label_ids=False)
    night = ACDC(tmp_path, "train", conditions=["night"], labelled=False)
    assert len(night) == 2 and night.sample_conditions == ["night", "night"] and "label" not in night[0]
    with pytest.raises(DatasetFormatError, match=r"ACDC: conditions=\['dusk'\]: expected some of fog, night, rain, snow"):
        ACDC(tmp_path, "train", conditions=["dusk"])
    _acdc_tree(tmp_path, split="test", train_ids=False, label_ids=False)
    assert len(ACDC(tmp_path, "test", labelled=False)) == 8
    with pytest.raises(DatasetFormatError, match="ACDC: the test split has no public labels"):
        ACDC(tmp_path, "test")


def test_acdc_missing_labels_are_counted_in_one_line(tmp_path):
    _acdc_tree(tmp_path, train_ids=False)
    next((tmp_path / "gt" / "rain" / "val").glob("*/*_gt_labelIds.png")).unlink()
    with pytest.raises(DatasetFormatError, match=r"ACDC: 1 of 8 val images have no label, e.g. .*rain/val/GOPR0402/"):
        ACDC(tmp_path, "val")


# ---------------------------------------------------------------------------------------------------------------
# Dark Zurich
# ---------------------------------------------------------------------------------------------------------------

def _dark_zurich_tree(root, train_ids=True):
    truth = {}
    for c, condition in enumerate(("day", "twilight", "night")):
        seq = f"GOPR0{350 + c}"
        _save_rgb(root / "rgb_anon" / "train" / condition / seq / f"{seq}_frame_000001_rgb_anon.png")
    for f in range(2):
        stem = f"GOPR0356_frame_{f:06d}"
        _save_rgb(root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png")
        _save_rgb(root / "rgb_anon" / "val_ref" / "day" / "GOPR0356_ref" / f"GOPR0356_frame_{f:06d}_ref_rgb_anon.png")
        ids = _label_ids()
        gt = root / "gt" / "val" / "night" / "GOPR0356"
        gt.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(gt / f"{stem}_gt_labelIds.png")
        if train_ids:
            Image.fromarray(label_ids_to_train_ids(ids)).save(gt / f"{stem}_gt_labelTrainIds.png")
        Image.fromarray(ids).save(gt / f"{stem}_gt_invGray.png")
        truth[stem] = label_ids_to_train_ids(ids)
    return truth


@pytest.mark.parametrize("train_ids", [True, False])
def test_dark_zurich_val_is_labelled_train_is_not(tmp_path, train_ids):
    truth = _dark_zurich_tree(tmp_path, train_ids)
    val = DarkZurich(tmp_path, "val")
    assert len(val) == 2
    for i in range(2):
        np.testing.assert_array_equal(val[i]["label"], truth[val[i]["name"]])
    train = DarkZurich(tmp_path, "train")
    assert len(train) == 3 and train.sample_conditions == ["day", "twilight", "night"] and "label" not in train[0]
    assert DarkZurich(tmp_path, "train", conditions=["night"]).sample_conditions == ["night"]
    with pytest.raises(DatasetFormatError, match="Dark Zurich: the train split has no labels"):
        DarkZurich(tmp_path, "train", labelled=True)


# ---------------------------------------------------------------------------------------------------------------
# BDD100K
# ---------------------------------------------------------------------------------------------------------------

def _train_ids(h=H, w=W):
    return RNG.choice(list(range(19)) + [255], size=(h, w)).astype(np.uint8)


def _bdd_tree(root, split="val", encodings=("L", "P")):
    truth = {}
    for i, enc in enumerate(encodings):
        name = f"7d06fefd-f7be05a{i}"
        (root / "images" / "10k" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image()).save(root / "images" / "10k" / split / f"{name}.jpg", quality=95)
        ids = _train_ids()
        mask = Image.fromarray(ids, mode="L")
        if enc == "P":  # an identity palette: index i is the grey (i, i, i)
            mask = Image.fromarray(ids, mode="P")
            mask.putpalette([v for i in range(256) for v in (i, i, i)])
        out = root / "labels" / "sem_seg" / "masks" / split
        out.mkdir(parents=True, exist_ok=True)
        mask.save(out / f"{name}.png")
        truth[name] = ids
    return truth


def test_bdd100k_greyscale_and_palette_masks(tmp_path):
    truth = _bdd_tree(tmp_path)
    assert {Image.open(p).mode for p in (tmp_path / "labels" / "sem_seg" / "masks" / "val").iterdir()} == {"L", "P"}
    ds = BDD100K(tmp_path, "val")
    assert len(ds) == 2
    for i in range(2):
        s = ds[i]
        np.testing.assert_array_equal(s["label"], truth[s["name"]])
        assert s["image"].shape == (H, W, 3)


def test_bdd100k_bad_values_missing_masks_and_unlabelled_test(tmp_path):
    _bdd_tree(tmp_path)
    mask = next((tmp_path / "labels" / "sem_seg" / "masks" / "val").glob("*.png"))
    Image.fromarray(np.full((H, W), 30, np.uint8)).save(mask)
    ds = BDD100K(tmp_path, "val")
    with pytest.raises(DecodeError, match=r"cannot decode label .*: holds values other than train ids 0..18 and 255"):
        ds.load(ds.label_paths.index(mask))
    mask.unlink()
    with pytest.raises(DatasetFormatError, match=r"BDD100K: 1 of 2 val images have no mask"):
        BDD100K(tmp_path, "val")
    (tmp_path / "images" / "10k" / "test").mkdir()
    Image.fromarray(_image()).save(tmp_path / "images" / "10k" / "test" / "a.jpg")
    assert "label" not in BDD100K(tmp_path, "test", labelled=False)[0]


def test_bdd100k_older_seg_release(tmp_path):
    ids = _train_ids()
    (tmp_path / "seg" / "images" / "val").mkdir(parents=True)
    (tmp_path / "seg" / "labels" / "val").mkdir(parents=True)
    Image.fromarray(_image()).save(tmp_path / "seg" / "images" / "val" / "abc.jpg")
    Image.fromarray(ids).save(tmp_path / "seg" / "labels" / "val" / "abc_train_id.png")
    np.testing.assert_array_equal(BDD100K(tmp_path, "val")[0]["label"], ids)


# ---------------------------------------------------------------------------------------------------------------
# Mapillary Vistas v1.2
# ---------------------------------------------------------------------------------------------------------------

# The "readable" names of config_v1.2.json, in label order (as facebookresearch/Mask2Former's
# register_mapillary_vistas.py copies them), with the Cityscapes train id that Rein's
# tools/convert_datasets/mapillary2cityscape.py gives each (worked out by hand from its if/elif chain)
VISTAS_V12 = """
Bird 255|Ground Animal 255|Curb 1|Fence 4|Guard Rail 255|Barrier 255|Wall 3|Bike Lane 0|Crosswalk - Plain 0|Curb Cut 1|
Parking 0|Pedestrian Area 1|Rail Track 255|Road 0|Service Lane 0|Sidewalk 1|Bridge 255|Building 2|Tunnel 255|Person 11|
Bicyclist 12|Motorcyclist 12|Other Rider 12|Lane Marking - Crosswalk 0|Lane Marking - General 0|Mountain 255|Sand 255|
Sky 10|Snow 255|Terrain 9|Vegetation 8|Water 255|Banner 255|Bench 255|Bike Rack 255|Billboard 255|Catch Basin 255|
CCTV Camera 255|Fire Hydrant 255|Junction Box 255|Mailbox 255|Manhole 255|Phone Booth 255|Pothole 255|Street Light 5|
Pole 5|Traffic Sign Frame 7|Utility Pole 5|Traffic Light 6|Traffic Sign (Back) 7|Traffic Sign (Front) 7|Trash Can 255|
Bicycle 18|Boat 255|Bus 15|Car 13|Caravan 255|Motorcycle 17|On Rails 16|Other Vehicle 255|Trailer 255|Truck 14|
Wheeled Slow 255|Car Mount 255|Ego Vehicle 255|Unlabeled 255
"""
VISTAS = [(e.strip().rsplit(" ", 1)[0], int(e.strip().rsplit(" ", 1)[1])) for e in VISTAS_V12.replace("\n", "").split("|")]


def rein_get_trans_idx(readables):
    """Rein's MapillaryGenerator.get_trans_idx (train_id=True), its loop as written, on the given names."""
    class_name_dict = {0: "road", 1: "sidewalk", 2: "building", 3: "wall", 4: "fence", 5: "pole", 6: "trafficlight",
                       7: "trafficsign", 8: "vegetation", 9: "terrain", 10: "sky", 11: "person", 12: "rider", 13: "car",
                       14: "truck", 15: "bus", 16: "train", 17: "motorcycle", 18: "bicycle"}
    class_name_dict = {v: k for k, v in class_name_dict.items()}
    mapillary2city = [255] * len(readables)
    for label_id, readable in enumerate(readables):
        name = readable.lower().replace(" ", "").replace("-", "")
        if name in class_name_dict.keys():
            mapillary2city[label_id] = class_name_dict[name]
        elif "trafficsign" in name or "front" in name or "back" in name:
            mapillary2city[label_id] = class_name_dict["trafficsign"]
        elif "onrail" in name:
            mapillary2city[label_id] = class_name_dict["train"]
        elif "cyclist" in name or "rider" in name:
            mapillary2city[label_id] = class_name_dict["rider"]
        elif "pole" in name or "streetlight" in name:
            mapillary2city[label_id] = class_name_dict["pole"]
        elif "curb" in name or "pedestrianarea" in name:
            mapillary2city[label_id] = class_name_dict["sidewalk"]
        elif ("crosswalkplain" in name or "parking" in name or "bikelane" in name or "servicelane" in name
              or "lanemarking" in name):
            mapillary2city[label_id] = class_name_dict["road"]
    return np.asarray(mapillary2city, dtype=np.uint8)


def test_vistas_table_is_reins():
    assert len(VISTAS) == 66
    assert rein_get_trans_idx([n for n, _ in VISTAS]).tolist() == [t for _, t in VISTAS]


def _mapillary_tree(root, split="validation", version="v1.2"):
    truth = {}
    lut = np.array([t for _, t in VISTAS], dtype=np.uint8)
    palette = np.random.default_rng(1).integers(0, 255, (256, 3)).astype(np.uint8)
    for i in range(2):
        key = f"-{i}aBcDeFgHiJkLmN"
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image()).save(root / split / "images" / f"{key}.jpg")
        ids = RNG.integers(0, 66, (H, W)).astype(np.uint8)
        ids.flat[:60] = np.arange(60)
        if i == 1:
            ids.flat[:6] = np.arange(60, 66)
        label = Image.fromarray(ids, mode="P")
        label.putpalette(palette.flatten().tolist())
        out = root / split / version / "labels" if version else root / split / "labels"
        out.mkdir(parents=True, exist_ok=True)
        label.save(out / f"{key}.png")
        truth[key] = lut[ids]
    return truth


@pytest.mark.parametrize("split,version", [("val", "v1.2"), ("validation", "v1.2"), ("val", None)])
def test_mapillary_palette_labels_to_the_19_classes(tmp_path, split, version):
    truth = _mapillary_tree(tmp_path, version=version)
    assert Image.open(next((tmp_path / "validation").glob("**/*.png"))).mode == "P"
    ds = Mapillary(tmp_path, split)
    assert len(ds) == 2
    for i in range(2):
        s = ds[i]
        np.testing.assert_array_equal(s["label"], truth[s["name"]])


def test_mapillary_v2_ids_are_refused(tmp_path):
    _mapillary_tree(tmp_path)
    label = next((tmp_path / "validation" / "v1.2" / "labels").glob("*.png"))
    v2 = Image.fromarray(np.full((H, W), 100, np.uint8), mode="P")
    v2.putpalette(list(range(256)) * 3)
    v2.save(label)
    ds = Mapillary(tmp_path, "val")
    with pytest.raises(DecodeError, match=r"holds class ids above 65: a v2.0 label"):
        ds.load(ds.label_paths.index(label))


def test_missing_labels_are_one_error_of_the_shared_check(tmp_path):
    """BDD100K and Mapillary count missing labels with one helper (rtda.data.base.require_files): same message."""
    _mapillary_tree(tmp_path / "mapillary")
    next((tmp_path / "mapillary" / "validation" / "v1.2" / "labels").glob("*.png")).unlink()
    with pytest.raises(DatasetFormatError) as info:
        Mapillary(tmp_path / "mapillary", "val")
    line = one_line(info.value)
    assert re.match(r"Mapillary: 1 of 2 validation images have no label, e\.g\. .*/validation/v1\.2/labels/-\daBcDeFgHiJkLmN"
                    r"\.png; Expected:.*ROOT/validation/images/<key>\.jpg", line), line
    _bdd_tree(tmp_path / "bdd")
    for mask in (tmp_path / "bdd" / "labels" / "sem_seg" / "masks" / "val").glob("*.png"):
        mask.unlink()
    with pytest.raises(DatasetFormatError, match=r"BDD100K: 2 of 2 val images have no mask, e\.g\. .*masks/val/7d06fefd"):
        BDD100K(tmp_path / "bdd", "val")


# ---------------------------------------------------------------------------------------------------------------
# IDD
# ---------------------------------------------------------------------------------------------------------------

# AutoNUE/public-code helpers/anue_labels.py: name | id | csTrainId | level3Id
ANUE_LABELS = """
road|0|0|0
parking|1|255|1
drivable fallback|2|255|1
sidewalk|3|1|2
rail track|4|255|3
non-drivable fallback|5|9|3
person|6|11|4
animal|7|255|4
rider|8|12|5
motorcycle|9|17|6
bicycle|10|18|7
autorickshaw|11|255|8
car|12|13|9
truck|13|14|10
bus|14|15|11
caravan|15|255|12
trailer|16|255|12
train|17|16|12
vehicle fallback|18|255|12
curb|19|255|13
wall|20|3|14
fence|21|4|15
guard rail|22|255|16
billboard|23|255|17
traffic sign|24|7|18
traffic light|25|6|19
pole|26|5|20
polegroup|27|255|20
obs-str-bar-fallback|28|255|21
building|29|2|22
bridge|30|255|23
tunnel|31|255|23
vegetation|32|8|24
sky|33|10|25
fallback background|34|255|25
unlabeled|35|255|255
ego vehicle|36|255|255
rectification border|37|255|255
out of roi|38|255|255
license plate|39|255|255
"""
ANUE = {row.split("|")[0]: (int(row.split("|")[2]), int(row.split("|")[3])) for row in ANUE_LABELS.strip().splitlines()}


def toolkit_create_label_image(annotation: dict) -> np.ndarray:
    """AutoNUE/public-code preperation/json2labelImg.py createLabelImage(..., encoding="csTrainId"), transcribed."""
    label_img = Image.new("L", (annotation["imgWidth"], annotation["imgHeight"]), ANUE["unlabeled"][0])
    drawer = ImageDraw.Draw(label_img)
    for obj in annotation["objects"]:
        label = str(obj["label"])
        polygon = [tuple(p) for p in obj["polygon"]]
        if obj.get("deleted", 0) or len(polygon) < 3:
            continue
        if (label not in ANUE) and label.endswith("group"):
            label = label[: -len("group")]
        if label not in ANUE:
            continue
        drawer.polygon(polygon, fill=ANUE[label][0])
    return np.asarray(label_img)


def _idd_annotation(w=W, h=H):
    return {"imgWidth": w, "imgHeight": h, "objects": [
        {"label": "sky", "polygon": [[0, 0], [w, 0], [w, h], [0, h]]},
        {"label": "road", "polygon": [[0, 3], [w - 1, 3], [w - 1, h - 1], [0, h - 1]]},
        {"label": "non-drivable fallback", "polygon": [[0.4, 0.2], [3.7, 0.5], [2.2, 2.9]]},  # terrain, float points
        {"label": "cargroup", "polygon": [[5, 1], [8, 1], [8, 2], [5, 2]]},  # drawn as car
        {"label": "autorickshaw", "polygon": [[7, 3], [9, 3], [9, 5], [7, 5]]},  # 255 over the road
        {"label": "person", "polygon": [[1, 4], [2, 4], [2, 5], [1, 5]], "deleted": 1},  # deleted: not drawn
        {"label": "truck", "polygon": [[0, 0], [9, 5]]},  # 2 points: not drawn
        {"label": "no such label", "polygon": [[0, 0], [9, 0], [9, 5]]},  # unknown: skipped
    ]}


def _idd_tree(root, split="val", rendered=False):
    truth = {}
    for d, drive in enumerate(("201", "338")):
        stem = f"frame{1000 + d}"
        _save_rgb(root / "leftImg8bit" / split / drive / f"{stem}_leftImg8bit.png")
        gt = root / "gtFine" / split / drive
        gt.mkdir(parents=True, exist_ok=True)
        annotation = _idd_annotation()
        (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps(annotation))
        expected = toolkit_create_label_image(annotation)
        if rendered:
            Image.fromarray(expected, mode="L").save(gt / f"{stem}_gtFine_labelcsTrainIds.png")
        truth[f"{drive}_{stem}"] = expected
    return truth


@pytest.mark.parametrize("rendered", [False, True])
def test_idd_polygons_give_the_toolkits_cs_train_ids(tmp_path, rendered):
    truth = _idd_tree(tmp_path, rendered=rendered)
    ds = IDD(tmp_path, "val")
    assert len(ds) == 2 and all(p.suffix == (".png" if rendered else ".json") for p in ds.label_paths)
    for i in range(2):
        s = ds[i]
        np.testing.assert_array_equal(s["label"], truth[s["name"]])
    label = ds[0]["label"]
    assert label[0, 9] == 10 and label[5, 0] == 0 and label[1, 6] == 13 and label[4, 8] == 255 and label[4, 1] == 0
    assert {9, 10, 0, 13, 255} <= set(np.unique(label).tolist())


def test_idd_level3_ids_do_not_determine_the_cityscapes_class():
    """The docstring's reason for csTrainId: level3Ids that hold pixels of different csTrainIds."""
    train_ids_of = {}
    for cs_train_id, level3 in ANUE.values():
        train_ids_of.setdefault(level3, set()).add(cs_train_id)
    ambiguous = sorted(k for k, v in train_ids_of.items() if len(v) > 1)
    assert ambiguous == [3, 4, 12, 20, 25]


def test_idd_missing_polygons_and_unreadable_json(tmp_path):
    _idd_tree(tmp_path)
    polygons = sorted((tmp_path / "gtFine" / "val").glob("*/*_polygons.json"))
    polygons[0].write_text("{not json")
    with pytest.warns(UserWarning, match=r"1 of 2 samples skipped \(unreadable image or label"):
        assert len(IDD(tmp_path, "val")) == 1
    polygons[0].unlink()
    with pytest.raises(DatasetFormatError, match=r"IDD: 1 of 2 val images have no polygons"):
        IDD(tmp_path, "val")
    assert len(IDD(tmp_path, "val", labelled=False)) == 2


# ---------------------------------------------------------------------------------------------------------------
# mIoU16 / mIoU13
# ---------------------------------------------------------------------------------------------------------------

# The subsets the public UDA evaluation scripts hard-code (synthia_set_16 / synthia_set_13)
SYNTHIA_SET_16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
SYNTHIA_SET_13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]


def test_synthia_subsets_are_the_benchmarks():
    assert list(SYNTHIA16) == [CLASS_NAMES[i] for i in SYNTHIA_SET_16]
    assert list(SYNTHIA13) == [CLASS_NAMES[i] for i in SYNTHIA_SET_13]


def _known_confusion():
    """19x19 confusion matrix with a hand-checkable IoU per class; terrain, truck, train absent (NaN)."""
    cm = torch.zeros(19, 19, dtype=torch.long)
    for c in range(19):
        if c in (9, 14, 16):
            continue
        cm[c, c] = 10 + c  # TP
        cm[c, (c + 1) % 19 if (c + 1) % 19 not in (9, 14, 16) else 0] += 5  # FN (and FP for the other class)
    return cm


def test_miou16_and_miou13_on_a_known_confusion_matrix():
    cm = _known_confusion()
    metric = SegmentationMetrics(19)
    metric.confmat += cm
    result = metric.compute()
    iou = result["IoU"].double()
    tp, gt, pred = cm.diag().double(), cm.sum(1).double(), cm.sum(0).double()
    by_hand = tp / (gt + pred - tp)
    np.testing.assert_allclose(iou[~iou.isnan()].numpy(), by_hand[~by_hand.isnan()].numpy())
    assert torch.isnan(iou[[9, 14, 16]]).all()
    m16 = float(by_hand[SYNTHIA_SET_16].mean())
    m13 = float(by_hand[SYNTHIA_SET_13].mean())
    assert subset_miou(iou, CLASS_NAMES, SYNTHIA16) == pytest.approx(m16)
    assert subset_miou(iou, CLASS_NAMES, SYNTHIA13) == pytest.approx(m13)
    # NaN classes are left out of the mean (here the 3 absent ones): mIoU19 == mIoU16, no 19/16 rescaling
    assert result["mIoU"] == pytest.approx(m16)
    iou[3] = float("nan")  # a SYNTHIA class absent too: left out of mIoU16, not counted as 0
    assert subset_miou(iou, CLASS_NAMES, SYNTHIA16) == pytest.approx(float(by_hand[[i for i in SYNTHIA_SET_16 if i != 3]].mean()))
    scores = subset_scores(result["IoU"], CLASS_NAMES, SYNTHIA16, (SYNTHIA16, SYNTHIA13, CLASS_NAMES))
    assert scores == pytest.approx({"mIoU": m16, "mIoU16": m16, "mIoU13": m13, "mIoU19": m16})


class _FixedPrediction(nn.Module):
    """A "network" whose prediction is the given label map (one-hot logits), whatever the image."""

    def __init__(self, prediction):
        super().__init__()
        self.register_buffer("prediction", prediction)
        self.anchor = nn.Parameter(torch.zeros(1))

    def predict(self, image, size):
        return nn.functional.one_hot(self.prediction.expand(image.shape[0], -1, -1), 19).permute(0, 3, 1, 2).float()


class _OneBatch(pl.LightningDataModule):
    def __init__(self, label, eval_classes):
        super().__init__()
        self.label, self.eval_classes = label, eval_classes

    def test_dataloader(self):
        return DataLoader([{"image": torch.zeros(3, *self.label.shape, dtype=torch.uint8), "label": self.label}],
                          batch_size=1)


def _tested(eval_classes):
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 19, (16, 24), generator=g)
    label[label == 9] = 255  # terrain never in the ground truth (SYNTHIA-like: never learnt, never predicted)
    prediction = torch.where(torch.rand(16, 24, generator=g) < 0.7, label.clamp(max=18), torch.randint(0, 19, (16, 24), generator=g))
    module = SegmentationModule(_FixedPrediction(prediction), num_log_images=0, channels_last=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(module, datamodule=_OneBatch(label, eval_classes), verbose=False)
    metric = SegmentationMetrics(19)
    metric.update(prediction[None], label[None])
    return module.run_results(trainer)["test"], metric.compute()["IoU"]


def test_a_synthia_run_reports_miou16_and_miou13_in_its_results():
    test, iou = _tested("synthia16")
    assert test["mIoU16"] == pytest.approx(subset_miou(iou, CLASS_NAMES, SYNTHIA16))
    assert test["mIoU13"] == pytest.approx(subset_miou(iou, CLASS_NAMES, SYNTHIA13))
    assert test["mIoU19"] == pytest.approx(float(torch.nanmean(iou.double())))
    assert test["mIoU"] == test["mIoU16"] and test["mIoU13"] != test["mIoU16"]
    summary = run_results.format_summary({"experiment": "x", "test": test, "run_dir": "r"})
    assert "mIoU19:" in summary and "mIoU16:" in summary and "mIoU13:" in summary
    test13, _ = _tested("synthia13")
    assert test13["mIoU"] == test13["mIoU13"] == pytest.approx(test["mIoU13"])
    plain, _ = _tested("all")
    assert not any(k.startswith("mIoU") and k != "mIoU" for k in plain)
    assert plain["mIoU"] == pytest.approx(test["mIoU19"])


def test_test_scores_and_rtda_compare_carry_the_subsets(tmp_path):
    metrics = {"test/mIoU": 0.5, "test/mIoU16": 0.5, "test/mIoU13": 0.6, "test/acc": 0.9, "test/mAcc": 0.7,
               **{f"test/IoU/{n}": 0.5 for n in CLASS_NAMES}}
    test = run_results.test_scores({k: torch.tensor(v) for k, v in metrics.items()}, list(CLASS_NAMES))
    assert test["mIoU16"] == pytest.approx(0.5) and test["mIoU13"] == pytest.approx(0.6)
    for seed, (m16, m13) in enumerate([(0.40, 0.50), (0.44, 0.56)]):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        results = {"status": "completed", "seed": seed, "choices": {"data": "synthia_to_cityscapes"}, "overrides": [],
                   "test": {**test, "mIoU": m16, "mIoU16": m16, "mIoU13": m13}}
        (run / "results.json").write_text(json.dumps(results))
    rows = summarize(load_runs([tmp_path]))
    assert len(rows) == 1 and subset_names(rows) == ["mIoU16", "mIoU13"]
    assert rows[0]["mIoU16"] == pytest.approx(42.0) and rows[0]["mIoU13"] == pytest.approx(53.0)
    assert rows[0]["mIoU13_std"] == pytest.approx(100 * float(np.std([0.50, 0.56], ddof=1)))
    text = to_text(rows)
    assert "mIoU16 (%)" in text and "mIoU13 (%)" in text and "53.00" in text


def test_eval_classes_is_checked():
    with pytest.raises(ConfigValueError, match=r"data.eval_classes='synthia19': expected one of all, synthia16, synthia13"):
        DomainAdaptationDataModule(source=None, val=None, eval_classes="synthia19")
    with pytest.raises(ConfigValueError, match=r"needs num_classes=19, not 4"):
        DomainAdaptationDataModule(source=None, val=None, num_classes=4, eval_classes="synthia16")


# ---------------------------------------------------------------------------------------------------------------
# configs: compose, instantiate, read the trees written under the data folder
# ---------------------------------------------------------------------------------------------------------------

def _cityscapes_tree(root, split):
    for i in range(2):
        stem = f"aachen_{i:06d}_000019"
        _save_rgb(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
        gt = root / "gtFine" / split / "aachen"
        gt.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_label_ids()).save(gt / f"{stem}_gtFine_labelIds.png")


@pytest.mark.parametrize("option,splits", [
    ("synthia_to_cityscapes", ("source", "target", "val")),
    ("cityscapes_to_acdc", ("source", "target", "val")),
    ("cityscapes_to_dark_zurich", ("source", "target", "val")),
])
def test_new_data_configs_instantiate_and_read(tmp_path, option, splits):
    cfg = compose_config("train", [f"data={option}"], output_dir=tmp_path)
    data = tmp_path / "data"
    _cityscapes_tree(data / "cityscapes", "train")
    _cityscapes_tree(data / "cityscapes", "val")
    _synthia_tree(data / "synthia")
    _acdc_tree(data / "acdc", "train", label_ids=False, train_ids=False)
    _acdc_tree(data / "acdc", "val")
    _dark_zurich_tree(data / "dark_zurich")
    dm = hydra.utils.instantiate(cfg.data, augmentation=cfg.augmentation)
    assert dm.eval_classes == ("synthia16" if option == "synthia_to_cityscapes" else "all")
    for split in splits:
        sample = dm.dataset(split)[0]
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape[0] == 3
        assert ("label" in sample) == (split != "target")


@pytest.mark.parametrize("reader,tree", [("bdd100k", _bdd_tree), ("mapillary", _mapillary_tree), ("idd", _idd_tree),
                                         ("acdc", _acdc_tree), ("dark_zurich", _dark_zurich_tree),
                                         ("cityscapes", lambda root: _cityscapes_tree(root, "val"))])
def test_test_set_configs_score_another_target(tmp_path, reader, tree):
    cfg = compose_config("eval", ["ckpt_path=x.ckpt", f"+data/test={reader}", "data.eval_batch_size=1"], output_dir=tmp_path)
    tree(tmp_path / "data" / reader)
    dm = hydra.utils.instantiate(cfg.data)
    sample = dm.dataset("test")[0]
    assert sample["label"].dtype == torch.long and sample["label"].shape == (H, W)


@pytest.mark.parametrize("experiment", ["synthia_source_only", "synthia_dacs", "cityscapes_acdc_dacs",
                                        "cityscapes_dark_zurich_dacs"])
def test_new_experiments_compose(tmp_path, experiment):
    cfg = compose_config("train", [f"experiment={experiment}"], output_dir=tmp_path)
    data = {"synthia_source_only": "synthia_to_cityscapes", "synthia_dacs": "synthia_to_cityscapes",
            "cityscapes_acdc_dacs": "cityscapes_to_acdc", "cityscapes_dark_zurich_dacs": "cityscapes_to_dark_zurich"}
    assert cfg.tags[0] == data[experiment]
    if experiment.startswith("synthia"):
        assert list(cfg.data.source_size) == [760, 1280] and cfg.data.eval_classes == "synthia16"
    else:
        assert list(cfg.data.target_size) == [540, 960] and cfg.data.rare_class_sampling
    dm = hydra.utils.instantiate(cfg.data, augmentation=cfg.augmentation)
    assert dm.num_classes == 19
