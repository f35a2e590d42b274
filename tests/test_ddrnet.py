import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rtda.models.ddrnet import CLASSIFIER_PREFIXES, SEGMENTATION_PREFIXES, DDRNet
from rtda.models.losses import loss_terms, total_loss
from rtda.models.outputs import SegmentationOutputs
from rtda.run.errors import ConfigValueError, PretrainedWeightsError

X = (2, 3, 64, 128)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return DDRNet(num_classes=19)


def _imagenet_state(net: DDRNet) -> dict:
    """A file in the official ImageNet layout (classification/DDRNet_23_slim.py keys), random values."""
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
             for k, v in net.state_dict().items() if not k.startswith(SEGMENTATION_PREFIXES)}
    # the classifier only the ImageNet model has: down5 (conv-BN-ReLU-conv-BN), last_layer (1x1 conv 1024, BN), linear
    state.update({"down5.0.weight": torch.randn(256, 128, 3, 3), "down5.3.weight": torch.randn(512, 256, 3, 3),
                  "last_layer.0.weight": torch.randn(1024, 512, 1, 1), "linear.weight": torch.randn(1000, 1024),
                  "linear.bias": torch.randn(1000)})
    for bn, c in (("down5.1", 256), ("down5.4", 512), ("last_layer.1", 1024)):
        state.update({f"{bn}.weight": torch.rand(c), f"{bn}.bias": torch.rand(c), f"{bn}.running_mean": torch.rand(c),
                      f"{bn}.running_var": torch.rand(c), f"{bn}.num_batches_tracked": torch.tensor(5)})
    return state


def test_train_and_eval_outputs(net):
    x = torch.randn(*X)
    net.train()
    out = net(x)
    assert isinstance(out, SegmentationOutputs) and set(out.aux) == {"high_res"} and not out.levels and not out.extra
    assert out.out.shape == out.aux["high_res"].shape == (2, 19, 64, 128)
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 19, 64, 128)
    # sizes not divisible by 8 run (the official code fails at 60x100), logits at the input size
    with torch.no_grad():
        assert net(torch.randn(1, 3, 60, 100)).shape == (1, 19, 60, 100)


def test_aux_head_options():
    plain = DDRNet(num_classes=5, aux_weights={})
    assert plain.seghead_extra is None and not plain.train()(torch.randn(*X)).aux
    level = DDRNet(num_classes=5, aux_weights={}, adaptation_levels=["high_res"]).train()(torch.randn(*X))
    assert set(level.levels) == {"high_res"} and not level.aux
    with pytest.raises(ConfigValueError, match=r"no auxiliary head \['stage4'\].*\['high_res'\]"):
        DDRNet(aux_weights={"stage4": 0.4})
    with pytest.raises(ConfigValueError, match="high_res"):
        DDRNet(adaptation_levels=("compact",))


def test_parameter_count_matches_the_official_code():
    # official segmentation/DDRNet_23_slim.py, DualResNet(BasicBlock, [2,2,2,2], 19, planes=32, spp_planes=128,
    # head_planes=64): augment=False (what the main output uses) 5,695,987; augment=True (+seghead_extra) 5,734,342
    net = DDRNet(num_classes=19)
    total = sum(p.numel() for p in net.parameters())
    assert total - sum(p.numel() for p in net.seghead_extra.parameters()) == 5_695_987
    assert total == 5_734_342
    assert sum(p.numel() for p in DDRNet(num_classes=19, aux_weights={}).parameters()) == 5_695_987


def test_eval_flops_match_the_official_code(net):
    # FlopCounterMode on the official model (augment=False), eval, 1x3x128x256: 1,134,100,480 FLOPs
    # (at 1x3x512x1024 18.141 G, at 1x3x1024x2048 72.563 G = the paper's 36.3 G multiply-adds)
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 128, 256))
    assert counter.get_total_flops() == 1_134_100_480


def test_loss_terms_and_backward():
    torch.manual_seed(0)
    net = DDRNet(num_classes=7).train()
    x = torch.randn(*X)
    label = torch.randint(0, 7, X[:1] + X[2:])
    label[:, :8] = 255
    out = net(x)
    terms = loss_terms(net, out, label)
    assert {k: c for k, (_, c) in terms.items()} == {"loss_seg": 1.0, "loss_aux/high_res": 0.4}
    total, parts = total_loss(terms)
    assert torch.isfinite(total) and set(parts) == set(terms)
    total.backward()
    assert net.final_layer.conv2.weight.grad is not None and net.seghead_extra.conv2.weight.grad is not None
    assert net.conv1[0].weight.grad.abs().sum() > 0
    zero = loss_terms(net, SegmentationOutputs(out.out.detach(), aux={"high_res": out.aux["high_res"].detach()}),
                      label, weight=torch.zeros(label.shape))
    assert all(float(v) == 0.0 for v, _ in zero.values())
    # aux_ohem=False: HRNet-OCR's / PIDNet's plain cross-entropy, averaged over all pixels (ignored ones count 0)
    ce = nn.functional.cross_entropy(out.aux["high_res"].detach(), label, ignore_index=255, reduction="none").mean()
    plain = DDRNet(num_classes=7, aux_ohem=False)
    torch.testing.assert_close(plain.loss_terms(out, label)["loss_aux/high_res"][0].detach(), ce)


def test_imagenet_file_loads_where_expected(tmp_path):
    torch.manual_seed(0)
    net = DDRNet(num_classes=19)
    state = _imagenet_state(net)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "DDRNet23s_imagenet.pth")
    head_before = net.final_layer.conv2.weight.clone()
    torch.manual_seed(0)  # the same initialisation: what the file does not hold keeps it
    loaded = DDRNet(num_classes=19, pretrained=str(tmp_path / "DDRNet23s_imagenet.pth"))
    assert loaded.pretrained_weights == str(tmp_path / "DDRNet23s_imagenet.pth")
    for key in ("conv1.0.weight", "conv1.0.bias", "layer5.0.conv2.weight", "layer5_.0.downsample.1.running_var",
                "down4.3.weight", "compression3.1.bias", "layer3_.1.bn2.weight"):
        torch.testing.assert_close(loaded.state_dict()[key], state[key])
    torch.testing.assert_close(loaded.final_layer.conv2.weight, head_before)  # heads keep their initialisation
    assert not torch.equal(loaded.state_dict()["conv1.0.weight"], net.state_dict()["conv1.0.weight"])
    assert not any(k.startswith(CLASSIFIER_PREFIXES) for k in loaded.state_dict())
    backbone = {id(p) for p in loaded.backbone_parameters()}
    assert id(loaded.layer5[0].conv1.weight) in backbone and id(loaded.spp.scale0[2].weight) not in backbone
    assert DDRNet.head_lr_mult == 1.0


def test_imagenet_file_errors_name_both_sides(tmp_path):
    net = DDRNet(num_classes=19)
    state = _imagenet_state(net)
    missing = {k: v for k, v in state.items() if k != "layer4.1.conv1.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(PretrainedWeightsError, match=r"missing.pth.*1 network tensors not in the file.*layer4\.1\.conv1"
                                                     r".*File keys e\.g\..*network keys e\.g\."):
        DDRNet(pretrained=str(tmp_path / "missing.pth"))
    torch.save({**state, "layer9.0.weight": torch.zeros(1)}, tmp_path / "unexpected.pth")
    with pytest.raises(PretrainedWeightsError, match=r"1 file tensors the network does not have.*layer9\.0\.weight"
                                                     r".*network keys e\.g\."):
        DDRNet(pretrained=str(tmp_path / "unexpected.pth"))
    with pytest.raises(PretrainedWeightsError, match=r"DDRNet23s_imagenet\.pth.*model\.pretrained=/path/to/"):
        DDRNet(pretrained=True)


def test_freeze_bn_keeps_keys_and_official_state_dict_loads():
    frozen = DDRNet(num_classes=19, freeze_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    plain = DDRNet(num_classes=19)
    assert list(frozen.state_dict()) == list(plain.state_dict())
    frozen.load_state_dict(plain.state_dict(), strict=True)


@pytest.mark.slow
def test_channels_last_and_onnx(net, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net.eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        ref = net(x)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    net.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    torch.onnx.export(net, x, str(tmp_path / "ddrnet.onnx"), opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(tmp_path / "ddrnet.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), ref, rtol=1e-3, atol=1e-3)
