import io

import numpy as np
import pytest
import torch
from helpers import blocky_label
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rtda.models.frozen_bn import FrozenBatchNorm2d
from rtda.models.losses import loss_terms, total_loss
from rtda.models.outputs import SegmentationOutputs
from rtda.models.pidnet import (
    IMAGENET_CLASSIFIER,
    IMAGENET_PARTS,
    SEGMENTATION_ONLY,
    PIDNet,
    boundary_target,
    canny_on_labels,
)
from rtda.run.errors import ConfigValueError, PretrainedWeightsError

X = (2, 3, 64, 128)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return PIDNet(19)


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def test_train_and_eval_outputs(net):
    x = torch.randn(*X)
    out = net.train()(x)
    assert isinstance(out, SegmentationOutputs) and set(out.aux) == {"p"} and not out.levels
    assert out.out.shape == out.aux["p"].shape == (2, 19, 64, 128)
    assert set(out.extra) == {"boundary"} and out.extra["boundary"].shape == (2, 1, 64, 128)
    with torch.no_grad():
        y = net.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 19, 64, 128)
    levels = PIDNet(19, aux_weights={}, adaptation_levels=["p"]).train()(x)
    assert not levels.aux and set(levels.levels) == {"p"}
    with pytest.raises(ConfigValueError, match=r"no auxiliary head \['d'\].*\['p'\]"):
        PIDNet(19, aux_weights={"d": 1.0})


def test_eval_path_parameters_and_flops_match_the_official_code(net):
    # official models/pidnet.py PIDNet(m=2, n=3, planes=32, ppm_planes=96, head_planes=128, augment=False), 19
    # classes: 7,625,715 parameters (the paper's 7.6 M); with the two training heads (augment=True) 7,720,935
    heads = {id(p) for h in (net.seghead_p, net.seghead_d) for p in h.parameters()}
    assert sum(p.numel() for p in net.parameters() if id(p) not in heads) == 7_625_715
    assert sum(p.numel() for p in net.parameters()) == 7_720_935
    # FlopCounterMode on the official eval model at 1x3x64x128: 369,033,216 FLOPs (23,597,187,072 at 512x1024)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(torch.randn(1, 3, 64, 128))
    assert counter.get_total_flops() == 369_033_216


@pytest.mark.slow
def test_flops_at_512x1024(net):
    # official eval model, FlopCounterMode: 23,597,187,072 at 1x3x512x1024 (94,388,453,376 at 1024x2048)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(torch.randn(1, 3, 512, 1024))
    assert counter.get_total_flops() == 23_597_187_072


def test_loss_terms_names_coefficients_and_backward(net):
    net.train()
    out = net(torch.randn(*X))
    terms = loss_terms(net, out, blocky_label())
    assert {k: c for k, (_, c) in terms.items()} == {"loss_seg": 1.0, "loss_aux/p": 0.4, "loss_boundary": 20.0,
                                                     "loss_bas": 1.0}
    total, values = total_loss(terms)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in values.values())
    net.zero_grad()
    total.backward()
    assert net.seghead_d.conv2.weight.grad.abs().sum() > 0 and net.seghead_p.conv2.weight.grad.abs().sum() > 0
    assert net.conv1[0].weight.grad.abs().sum() > 0


def test_zero_weight_gives_zero_terms(net):
    net.train()
    out = net(torch.randn(*X))
    out.extra["boundary"] = torch.full_like(out.extra["boundary"], 3.0)  # every pixel passes the 0.8 threshold
    for name, (value, _) in net.loss_terms(out, blocky_label(), weight=torch.zeros(2, 64, 128)).items():
        assert value.item() == 0.0, name


def test_aux_ce_averages_over_all_pixels_as_the_official_loop():
    # the official _ce_forward returns per-pixel losses, averaged by the training loop with ignored pixels as 0
    net = PIDNet(19).train()
    out = net(torch.randn(*X))
    label = blocky_label()
    label[1] = 255
    ce = nn.functional.cross_entropy(out.aux["p"], label, ignore_index=255, reduction="none")
    torch.testing.assert_close(net.loss_terms(out, label)["loss_aux/p"][0], ce.mean())


def test_boundary_target_equals_the_official_cv2_edge():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for h, w in ((40, 72), (23, 31)):
        lab = np.kron(rng.choice(np.r_[0:19, 255], size=(h // 3 + 1, w // 4 + 1)), np.ones((3, 4)))[:h, :w]
        lab = np.ascontiguousarray(lab.astype(np.uint8))
        lab[5:9, 7:20] = rng.integers(0, 19, (4, 13))  # noisy patch: every gradient direction
        canny = cv2.Canny(lab, 0.1, 0.2)
        edge = np.pad(canny[6:-6, 6:-6], ((6, 6), (6, 6)))  # datasets/base_dataset.py gen_sample, edge_size 4
        edge = (cv2.dilate(edge, np.ones((4, 4), np.uint8), iterations=1) > 50) * 1.0
        label = torch.from_numpy(lab.astype(np.int64))[None]
        assert torch.equal(canny_on_labels(label)[0], torch.from_numpy(canny > 0))
        assert torch.equal(boundary_target(label)[0], torch.from_numpy(edge).float())


def _imagenet_file(net: PIDNet, tmp_path, drop=None, extra=None):
    """A file in the official ImageNet layout (PIDNet_S_Imgnet: the shared parts + its classifier), random values."""
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
             for k, v in net.state_dict().items() if _top(k) in IMAGENET_PARTS and k != drop}
    state.update({"down5.0.weight": torch.randn(256, 128, 3, 3), "last_layer.0.weight": torch.randn(1024, 512, 1, 1),
                  "linear.weight": torch.randn(1000, 1024), "linear.bias": torch.randn(1000)})
    state.update(extra or {})
    path = tmp_path / "PIDNet_S_ImageNet.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, path)
    return path, state


def test_imagenet_file_loads_into_the_shared_parts(tmp_path):
    torch.manual_seed(0)
    ref = PIDNet(19)
    path, state = _imagenet_file(ref, tmp_path)
    torch.manual_seed(0)
    net = PIDNet(19, pretrained=str(path))
    assert net.pretrained_weights == str(path)
    torch.testing.assert_close(net.conv1[0].weight, state["conv1.0.weight"])
    torch.testing.assert_close(net.pag4.f_y[1].running_var, state["pag4.f_y.1.running_var"])
    torch.testing.assert_close(net.layer5[1].bn3.bias, state["layer5.1.bn3.bias"])
    for key, value in net.state_dict().items():  # the segmentation-only parts keep their initialisation
        if _top(key) in SEGMENTATION_ONLY:
            assert torch.equal(value, ref.state_dict()[key]), key
    assert not {_top(k) for k in state} - set(IMAGENET_PARTS) - set(IMAGENET_CLASSIFIER)
    backbone = {id(p) for p in net.backbone_parameters()}
    assert sum(p.numel() for p in net.parameters() if id(p) in backbone) == 6_442_400
    assert {id(p) for p in net.final_layer.parameters()}.isdisjoint(backbone) and net.head_lr_mult == 1.0


def test_missing_or_unexpected_key_is_one_clear_error(tmp_path):
    net = PIDNet(19)
    path, _ = _imagenet_file(net, tmp_path, drop="layer4_.1.bn2.weight")
    with pytest.raises(PretrainedWeightsError, match=r"(?s)PIDNet_S_ImageNet.*not in the file.*layer4_\.1\.bn2\.weight"
                                                     r".*File keys e\.g\..*network keys e\.g\."):
        PIDNet(19, pretrained=str(path))
    path, _ = _imagenet_file(net, tmp_path, extra={"layer9.conv.weight": torch.zeros(1)})
    with pytest.raises(PretrainedWeightsError, match=r"(?s)not in the network.*layer9\.conv\.weight.*File keys.*network keys"):
        PIDNet(19, pretrained=str(path))
    with pytest.raises(PretrainedWeightsError, match=r"PIDNet_S_ImageNet\.pth\.tar.*model\.pretrained=/path/to/"):
        PIDNet(19, pretrained=True)


def test_official_checkpoint_loads_the_whole_network(tmp_path):
    torch.manual_seed(3)
    src = PIDNet(19).train()
    src(torch.randn(*X))  # moves the BatchNorm statistics away from their initialisation
    state = {f"model.{k}": v for k, v in src.state_dict().items()}  # FullModel: model.*, plus its OHEM weights
    state["sem_loss.criterion.weight"] = torch.ones(19)
    torch.save(state, tmp_path / "best.pt")
    net = PIDNet(19, pretrained=str(tmp_path / "best.pt")).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(net(x), src.eval()(x))
    del state["model.seghead_d.conv2.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(PretrainedWeightsError, match=r"(?s)checkpoint.*seghead_d\.conv2\.bias"):
        PIDNet(19, pretrained=str(tmp_path / "partial.pt"))


def test_freeze_bn_keeps_keys_and_no_batchnorm():
    net = PIDNet(19, freeze_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    assert list(net.state_dict()) == list(PIDNet(19).state_dict())


@pytest.mark.slow
def test_channels_last_and_onnx_export(net):
    onnx = pytest.importorskip("onnxruntime")
    x = torch.randn(1, 3, 64, 128)
    net.eval()
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last)),
                                   ref, rtol=1e-4, atol=1e-4)
    net.to(memory_format=torch.contiguous_format)
    buf = io.BytesIO()
    torch.onnx.export(net, x, buf, opset_version=17, dynamo=False)
    session = onnx.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-3, atol=1e-3)
