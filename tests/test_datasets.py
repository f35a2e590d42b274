"""The readers on small trees written here in the real formats: each returns exactly the encoded ids."""

import numpy as np
import pytest
import torch
from helpers.cityscapes_table import ROWS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from rtda.data.base import DatasetFormatError
from rtda.data.cityscapes import Cityscapes
from rtda.data.gta5 import GTA5
from rtda.data.labels import ID_PALETTE, label_ids_to_train_ids
from rtda.data.transforms import SegmentationTransform

RNG = np.random.default_rng(0)


def _ids(h=6, w=10):
    return RNG.choice([0, 1, 7, 8, 11, 17, 19, 20, 21, 23, 24, 26, 33, 9, 14], size=(h, w)).astype(np.uint8)


def _image(h=6, w=10):
    return RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _gta5_tree(root, encodings=("P", "RGB")):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    truth = {}
    for i, enc in enumerate(encodings):
        name = f"{i + 1:05d}.png"
        ids = _ids()
        Image.fromarray(_image()).save(root / "images" / name)
        if enc == "P":
            lbl = Image.fromarray(ids, mode="P")
            lbl.putpalette(ID_PALETTE.flatten().tolist())
        elif enc == "L":
            lbl = Image.fromarray(ids, mode="L")
        else:
            lbl = Image.fromarray(ID_PALETTE[ids])
        lbl.save(root / "labels" / name)
        truth[name[:-4]] = label_ids_to_train_ids(ids)
    return truth


def test_gta5_indexed_greyscale_and_rgb_labels(tmp_path):
    truth = _gta5_tree(tmp_path, ("P", "L", "RGB"))
    ds = GTA5(tmp_path)
    assert len(ds) == 3
    for i in range(3):
        s = ds[i]
        np.testing.assert_array_equal(s["label"], truth[s["name"]])
        assert s["image"].shape == (6, 10, 3) and s["image"].dtype == np.uint8


def test_gta5_missing_pair_is_skipped_and_counted(tmp_path):
    _gta5_tree(tmp_path, ("P", "P", "P"))
    (tmp_path / "labels" / "00002.png").unlink()
    with pytest.warns(UserWarning, match=r"2 samples used; 1 of 3 samples skipped \(no label file"):
        ds = GTA5(tmp_path)
    assert len(ds) == 2 and ds.skipped == {"no label file, or no image, for the name": 1}


def test_gta5_split_list(tmp_path):
    _gta5_tree(tmp_path, ("P", "P", "P"))
    (tmp_path / "train.txt").write_text("00003.png\n00001.png\n")
    ds = GTA5(tmp_path, split="train")
    assert [p.name for p in ds.image_paths] == ["00003.png", "00001.png"]


def test_gta5_missing_root_names_the_path_and_layout(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"(?s)GTA5: folder not found: .*nowhere/images.*ROOT/labels/00001.png"):
        GTA5(tmp_path / "nowhere")


def _cityscapes_tree(root, split="val", train_ids=False, cities=("lindau", "munster")):
    truth = {}
    for c, city in enumerate(cities):
        for k in range(2):
            stem = f"{city}_{k:06d}_{19 + c:06d}"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image()).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            ids = _ids()
            Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            if train_ids:  # deliberately different from the labelIds file, to see which one is read
                Image.fromarray(np.full_like(ids, c + k)).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
                truth[stem] = np.full_like(ids, c + k)
            else:
                truth[stem] = label_ids_to_train_ids(ids)
    return truth


@pytest.mark.parametrize("train_ids", [False, True])
def test_cityscapes_label_ids_and_train_ids(tmp_path, train_ids):
    truth = _cityscapes_tree(tmp_path, train_ids=train_ids)
    ds = Cityscapes(tmp_path, "val")
    assert len(ds) == 4
    for i in range(len(ds)):
        s = ds[i]
        np.testing.assert_array_equal(s["label"], truth[s["name"]])


def test_cityscapes_unlabelled_target_needs_no_gtfine(tmp_path):
    _cityscapes_tree(tmp_path, split="train")
    import shutil

    shutil.rmtree(tmp_path / "gtFine")
    ds = Cityscapes(tmp_path, "train", labelled=False)
    assert "label" not in ds[0]
    with pytest.raises(DatasetFormatError, match="gtFine/train"):
        Cityscapes(tmp_path, "train")


def test_cityscapes_missing_split_names_the_path(tmp_path):
    _cityscapes_tree(tmp_path, split="val")
    with pytest.raises(DatasetFormatError, match=r"(?s)leftImg8bit/train.*_gtFine_labelIds.png"):
        Cityscapes(tmp_path, "train")


def test_corrupt_image_is_named(tmp_path):
    _gta5_tree(tmp_path, ("P",))
    (tmp_path / "images" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(OSError, match="00001.png"):
        GTA5(tmp_path)[0]


def test_transform_resizes_jointly_and_keeps_full_res_eval_labels(tmp_path):
    _cityscapes_tree(tmp_path)
    train = Cityscapes(tmp_path, "val", transform=SegmentationTransform((4, 8)))[0]
    assert train["image"].shape == (3, 4, 8) and train["image"].dtype == torch.uint8  # normalised on the device
    assert train["label"].shape == (4, 8) and train["label"].dtype == torch.long
    ev = Cityscapes(tmp_path, "val", transform=SegmentationTransform((4, 8), resize_label=False))
    s, raw = ev[0], ev.load(0)
    assert s["image"].shape == (3, 4, 8)
    np.testing.assert_array_equal(s["label"].numpy(), raw["label"])


def test_gta5_size_mismatch_is_resized_and_counted(tmp_path):
    truth = _gta5_tree(tmp_path, ("P", "P"))
    big = np.kron(np.asarray(Image.open(tmp_path / "labels" / "00002.png")), np.ones((2, 2), dtype=np.uint8))
    lbl = Image.fromarray(big, mode="P")
    lbl.putpalette(ID_PALETTE.flatten().tolist())
    lbl.save(tmp_path / "labels" / "00002.png")
    with pytest.warns(UserWarning, match="1 labels differ in size from their image and are resized"):
        ds = GTA5(tmp_path)
    s = ds[1]
    assert s["label"].shape == s["image"].shape[:2]
    np.testing.assert_array_equal(s["label"], truth["00002"])  # 2x nearest down-sampling restores it


def test_cityscapes_size_mismatch_stops_before_training(tmp_path):
    _cityscapes_tree(tmp_path)
    label = next((tmp_path / "gtFine" / "val").glob("*/*_labelIds.png"))
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(label)
    with pytest.raises(DatasetFormatError, match=rf"label {label} is 3x3 but its image .* is 10x6"):
        Cityscapes(tmp_path, "val")


def test_corrupt_png_is_skipped_with_a_count(tmp_path):
    _gta5_tree(tmp_path, ("P", "P", "RGB"))
    (tmp_path / "images" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match=r"1 of 3 samples skipped \(unreadable image or label, e.g. .*00002.png"):
        ds = GTA5(tmp_path)
    assert [p.name for p in ds.image_paths] == ["00001.png", "00003.png"]


def test_all_corrupt_or_empty_is_an_error_not_an_empty_epoch(tmp_path):
    _gta5_tree(tmp_path / "a", ("P",))
    (tmp_path / "a" / "labels" / "00001.png").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match=r"no usable samples \(1 of 1 samples skipped \(unreadable .*00001.png"):
        GTA5(tmp_path / "a")
    (tmp_path / "b" / "images").mkdir(parents=True)
    (tmp_path / "b" / "labels").mkdir()
    with pytest.raises(DatasetFormatError, match=r"no images in .*b/images"):
        GTA5(tmp_path / "b")
    (tmp_path / "c" / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r"no \*_leftImg8bit.png files in .*c/leftImg8bit/val"):
        Cityscapes(tmp_path / "c", "val")


def test_truncated_file_mid_epoch_is_skipped_in_training_only(tmp_path):
    _gta5_tree(tmp_path, ("P", "P"))
    path = tmp_path / "images" / "00001.png"
    data = Image.open(path)
    data = np.asarray(data)
    Image.fromarray(np.tile(data, (20, 20, 1))).save(tmp_path / "big.png")  # header survives, pixels do not
    big = (tmp_path / "big.png").read_bytes()
    path.write_bytes(big[: len(big) // 2])
    Image.fromarray(np.kron(np.asarray(Image.open(tmp_path / "labels" / "00001.png")), np.ones((20, 20), np.uint8))).save(
        tmp_path / "labels" / "00001.png")
    ds = GTA5(tmp_path)
    with pytest.raises(OSError, match="00001.png"):
        ds[0]
    ds.skip_unreadable = True
    sample = ds[0]  # replaced by the next one, and the failed file named for the run's count
    assert sample["name"] == "00002" and sample["skipped"] == str(path)
    assert ds[1]["skipped"] == ""


# Property test: for any label-id image (any byte values, any size), every on-disk encoding the readers
# accept decodes to the benchmark's mapping. The expected ids come from test_labels' copy of the
# cityscapesscripts table, not from rtda.data.labels.

BENCHMARK_LUT = np.full(256, 255, dtype=np.uint8)
for _name, _id, _train_id, _color in ROWS:
    BENCHMARK_LUT[int(_id)] = int(_train_id)
BENCHMARK_COLOURS = {int(i): tuple(int(c) for c in col.split(",")) for _, i, _, col in ROWS}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 13))), encoding=st.sampled_from(["P", "L", "RGB"]))
def test_gta5_any_label_image_decodes_as_the_benchmark(tmp_path_factory, ids, encoding):
    root = tmp_path_factory.mktemp("gta5")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    Image.fromarray(np.zeros((*ids.shape, 3), np.uint8)).save(root / "images" / "00001.png")
    if encoding == "RGB":
        # only ids with an unambiguous colour can be colour-coded; others become "unlabeled" black
        ids = np.where(np.isin(ids, [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]), ids, 0)
        rgb = np.zeros((*ids.shape, 3), np.uint8)
        for i, colour in BENCHMARK_COLOURS.items():
            rgb[ids == i] = colour
        Image.fromarray(rgb).save(root / "labels" / "00001.png")
    else:
        img = Image.fromarray(ids, mode=encoding)
        if encoding == "P":
            img.putpalette(ID_PALETTE.flatten().tolist())
        img.save(root / "labels" / "00001.png")
    np.testing.assert_array_equal(GTA5(root)[0]["label"], BENCHMARK_LUT[ids])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 13))))
def test_cityscapes_any_label_ids_decode_as_the_benchmark(tmp_path_factory, ids):
    root = tmp_path_factory.mktemp("cityscapes")
    (root / "leftImg8bit" / "val" / "ulm").mkdir(parents=True)
    (root / "gtFine" / "val" / "ulm").mkdir(parents=True)
    Image.fromarray(np.zeros((*ids.shape, 3), np.uint8)).save(root / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    Image.fromarray(ids).save(root / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png")
    np.testing.assert_array_equal(Cityscapes(root, "val")[0]["label"], BENCHMARK_LUT[ids])
