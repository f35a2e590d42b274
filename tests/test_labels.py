import numpy as np
import pytest
from helpers.cityscapes_table import ROWS  # noqa: E402

from rtda.data import labels


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
