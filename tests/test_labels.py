import numpy as np
import pytest

from rtda.data import labels

# The rows of cityscapesscripts/helpers/labels.py (name, id, trainId, color), as the benchmark ships them.
BENCHMARK_TABLE = """
unlabeled 0 255 0,0,0
ego_vehicle 1 255 0,0,0
rectification_border 2 255 0,0,0
out_of_roi 3 255 0,0,0
static 4 255 0,0,0
dynamic 5 255 111,74,0
ground 6 255 81,0,81
road 7 0 128,64,128
sidewalk 8 1 244,35,232
parking 9 255 250,170,160
rail_track 10 255 230,150,140
building 11 2 70,70,70
wall 12 3 102,102,156
fence 13 4 190,153,153
guard_rail 14 255 180,165,180
bridge 15 255 150,100,100
tunnel 16 255 150,120,90
pole 17 5 153,153,153
polegroup 18 255 153,153,153
traffic_light 19 6 250,170,30
traffic_sign 20 7 220,220,0
vegetation 21 8 107,142,35
terrain 22 9 152,251,152
sky 23 10 70,130,180
person 24 11 220,20,60
rider 25 12 255,0,0
car 26 13 0,0,142
truck 27 14 0,0,70
bus 28 15 0,60,100
caravan 29 255 0,0,90
trailer 30 255 0,0,110
train 31 16 0,80,100
motorcycle 32 17 0,0,230
bicycle 33 18 119,11,32
"""
ROWS = [line.split() for line in BENCHMARK_TABLE.strip().splitlines()]


def test_table_matches_benchmark():
    assert len(labels.LABELS) == len(ROWS)
    for lb, (name, id_, train_id, color) in zip(labels.LABELS, ROWS):
        assert (lb.name.replace(" ", "_"), lb.id, lb.train_id, lb.color) == (
            name, int(id_), int(train_id), tuple(int(c) for c in color.split(","))
        )
    assert labels.NUM_CLASSES == 19 and len(labels.CLASS_NAMES) == 19
    assert labels.CLASS_NAMES[0] == "road" and labels.CLASS_NAMES[18] == "bicycle"


def test_every_byte_value_maps_as_the_benchmark():
    expected = np.full(256, 255, dtype=np.uint8)
    for _, id_, train_id, _ in ROWS:
        expected[int(id_)] = int(train_id)
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(labels.label_ids_to_train_ids(ids), expected.reshape(16, 16))


def test_wider_integer_types_and_out_of_range():
    arr = np.array([[7, 33, -1], [300, 26, 34]], dtype=np.int32)
    out = labels.label_ids_to_train_ids(arr)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 18, 255], [255, 13, 255]])


def test_colour_decoding_round_trip():
    rng = np.random.default_rng(0)
    ids = rng.choice([lb.id for lb in labels.LABELS if lb.id not in (18,) and lb.color != (0, 0, 0)], size=(20, 30))
    rgb = labels.ID_PALETTE[ids]
    decoded = labels.colors_to_label_ids(rgb)
    np.testing.assert_array_equal(labels.label_ids_to_train_ids(decoded), labels.label_ids_to_train_ids(ids.astype(np.uint8)))


@pytest.mark.parametrize("colour,train_id", [((153, 153, 153), 5), ((0, 0, 0), 255), ((1, 2, 3), 255), ((0, 0, 142), 13)])
def test_shared_and_unknown_colours(colour, train_id):
    rgb = np.array(colour, dtype=np.uint8).reshape(1, 1, 3)
    assert labels.label_ids_to_train_ids(labels.colors_to_label_ids(rgb))[0, 0] == train_id
