import math

import numpy as np
import pytest
import torch

from rtda.metrics import SegmentationMetrics


def benchmark_iou(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = 255):
    """The Cityscapes evaluation script's procedure, written out independently: a confusion matrix
    over all pixels, fp counted only on non-ignored ground truth, NaN when tp + fp + fn == 0."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g == ignore:
            continue
        conf[g, p] += 1
    ious = []
    for c in range(num_classes):
        tp = conf[c, c]
        fn = conf[c, :].sum() - tp
        fp = conf[:, c].sum() - tp
        denom = tp + fp + fn
        ious.append(float("nan") if denom == 0 else tp / denom)
    return ious, conf


def test_hand_computed_case():
    # 3 classes; class 2 never appears in truth or prediction -> NaN, excluded from the mean
    target = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 255]])
    preds = torch.tensor([[0, 1, 1, 1], [0, 2 - 2, 0, 1]])
    m = SegmentationMetrics(num_classes=3)
    m.update(preds, target)
    out = m.compute()
    # class 0: tp=2 (0,0),(1,0); fn=1 (0,1 -> 1); fp=1 ((1,2): gt 1 pred 0) -> 2/4
    # class 1: tp=2; fn=1; fp=1 -> 2/4 ; ignored pixels (preds 0 and 1) do not count
    assert out["IoU"][0].item() == pytest.approx(0.5)
    assert out["IoU"][1].item() == pytest.approx(0.5)
    assert math.isnan(out["IoU"][2].item())
    assert out["mIoU"] == pytest.approx(0.5)
    assert out["acc"] == pytest.approx(4 / 6)
    assert out["confmat"].tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]


def test_class_only_predicted_has_zero_iou_not_nan():
    m = SegmentationMetrics(num_classes=3)
    m.update(torch.tensor([[2, 0]]), torch.tensor([[0, 0]]))
    out = m.compute()
    assert out["IoU"][2].item() == 0.0
    assert math.isnan(out["IoU"][1].item())
    assert out["mIoU"] == pytest.approx((0.5 + 0.0) / 2)


def test_matches_benchmark_procedure_on_random_batches():
    rng = np.random.default_rng(0)
    c = 19
    m = SegmentationMetrics(num_classes=c)
    gts, preds = [], []
    for _ in range(3):
        gt = rng.integers(0, c, size=(2, 17, 23))
        gt[rng.random(gt.shape) < 0.2] = 255
        gt[gt == 7] = 255  # class 7 absent from the truth
        pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, c, gt.shape))
        pred[pred == 9] = 3  # class 9 never predicted
        m.update(torch.from_numpy(pred), torch.from_numpy(gt))
        gts.append(gt)
        preds.append(pred)
    ious, conf = benchmark_iou(np.concatenate(gts), np.concatenate(preds), c)
    out = m.compute()
    np.testing.assert_allclose(out["IoU"].numpy(), np.array(ious, dtype=np.float32), rtol=1e-6, equal_nan=True)
    assert out["mIoU"] == pytest.approx(np.nanmean(ious))
    assert out["confmat"].numpy().tolist() == conf.tolist()


def test_logits_are_argmaxed_and_reset_clears():
    m = SegmentationMetrics(num_classes=2)
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]])  # N=1, C=2, H=1, W=2 -> preds [0, 1]
    m.update(logits, torch.tensor([[[0, 1]]]))
    assert m.compute()["mIoU"] == pytest.approx(1.0)
    m.reset()
    assert int(m.confmat.sum()) == 0


def test_bad_target_values_and_shapes_are_reported():
    m = SegmentationMetrics(num_classes=3)
    with pytest.raises(ValueError, match="outside 0..2"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


def test_states_merge_like_a_distributed_sum():
    a, b, both = (SegmentationMetrics(num_classes=4) for _ in range(3))
    rng = np.random.default_rng(1)
    x1, y1 = (torch.from_numpy(rng.integers(0, 4, (10,))) for _ in range(2))
    x2, y2 = (torch.from_numpy(rng.integers(0, 4, (10,))) for _ in range(2))
    a.update(x1, y1)
    b.update(x2, y2)
    both.update(x1, y1)
    both.update(x2, y2)
    a.merge_state(b)
    assert a.compute()["confmat"].tolist() == both.compute()["confmat"].tolist()
