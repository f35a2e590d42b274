import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models

from rtda.models import pretrained
from rtda.models.bisenet import BiSeNet
from rtda.models.outputs import SegmentationOutputs
from rtda.run.errors import ConfigValueError


def test_bisenet_train_and_eval_outputs():
    net = BiSeNet(num_classes=19)
    x = torch.randn(2, 3, 64, 128)
    net.train()
    out = net(x)  # training mode: the main output and the two named deep-supervision heads
    assert isinstance(out, SegmentationOutputs) and set(out.aux) == {"context16", "context32"} and not out.levels
    assert all(o.shape == (2, 19, 64, 128) for o in (out.out, *out.aux.values()))
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 19, 64, 128)


def test_bisenet_r18_size_matches_the_reference():
    # course template / ooooverflow BiSeNet with ResNet-18 for 19 classes: 12,068,672 parameters
    assert sum(p.numel() for p in BiSeNet(19).parameters()) == 12_068_672


def test_pretrained_from_a_local_torchvision_file(tmp_path):
    ref = models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    net = BiSeNet(19, pretrained=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(net.context_path.stem[0].weight, ref.conv1.weight)
    torch.testing.assert_close(net.context_path.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)


def test_pretrained_file_errors_are_clear(tmp_path):
    with pytest.raises(pretrained.PretrainedWeightsError, match="not found: .*missing.pth"):
        BiSeNet(19, pretrained=str(tmp_path / "missing.pth"))
    torch.save({"something": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(pretrained.PretrainedWeightsError, match="wrong file"):
        BiSeNet(19, pretrained=str(tmp_path / "wrong.pth"))
    # an interrupted download, a bare tensor: one error naming the file, not torch's traceback
    whole = (tmp_path / "wrong.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(pretrained.PretrainedWeightsError, match=r"cut.pth: not a readable weights file"):
        BiSeNet(19, pretrained=str(tmp_path / "cut.pth"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(pretrained.PretrainedWeightsError, match=r"tensor.pth: holds a Tensor, not a state dict"):
        pretrained.file_state_dict(tmp_path / "tensor.pth")
    # safetensors is told by its header, whatever the file is called (Hugging Face's pytorch_model.bin era)
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "model.bin"))
    assert torch.equal(pretrained.file_state_dict(tmp_path / "model.bin")["a"], torch.ones(2))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.bin").read_bytes()[:20])
    with pytest.raises(pretrained.PretrainedWeightsError, match=r"cut.safetensors: not a readable safetensors file"):
        pretrained.file_state_dict(tmp_path / "cut.safetensors")


def test_registry_failure_says_how_to_pass_a_file(monkeypatch):
    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(pretrained.PretrainedWeightsError, match=r"(?s)resnet18-f37072fd.pth.*model.pretrained=/path/to/"):
        BiSeNet(19, pretrained=True)


def test_unknown_backbone():
    with pytest.raises(ConfigValueError, match="model.backbone='resnet7'"):
        BiSeNet(19, backbone="resnet7")


def test_deeplabv2_matches_the_official_parameter_count_and_shapes():
    from rtda.models.deeplabv2 import DeepLabV2

    net = DeepLabV2(19)
    assert sum(p.numel() for p in net.parameters()) == 43_901_068
    x = torch.randn(1, 3, 65, 129)  # odd sizes: ceil-mode pooling, output still at the input size
    net.train()
    assert net(x).shape == (1, 19, 65, 129)
    before = net.layer3[5].bn2.running_mean.clone()
    net(x * 5 + 2)
    assert torch.equal(net.layer3[5].bn2.running_mean, before)  # frozen BatchNorm: statistics never move
    assert not net.bn1.weight.requires_grad
    multi = DeepLabV2(19, multi_level=True).train()
    out = multi(x)
    assert out.out.shape == out.aux["layer3"].shape == (1, 19, 65, 129) and multi.aux_weights == {"layer3": 0.1}
    assert out.levels["layer3"] is out.aux["layer3"] and multi.adaptation_levels == ("layer3",)
    head = {id(p) for p in multi.classifier.parameters()} | {id(p) for p in multi.aux_classifier.parameters()}
    assert not head & {id(p) for p in multi.backbone_parameters()}


def test_deeplabv2_loads_official_style_init_and_skips_a_foreign_classifier(tmp_path):
    from rtda.models.deeplabv2 import DeepLabV2

    donor = DeepLabV2(21, stride_in_1x1=True)
    state = {("Scale." + k.replace("classifier.", "layer5.")): v for k, v in donor.state_dict().items()}
    torch.save(state, tmp_path / "DeepLab_init.pth")
    net = DeepLabV2(19, pretrained=str(tmp_path / "DeepLab_init.pth"))
    assert net.stride_in_1x1  # Caffe-style strides, as the DeepLab weights expect
    assert net.layer2[0].conv1.stride == (2, 2)
    torch.testing.assert_close(net.layer4[2].conv3.weight, donor.layer4[2].conv3.weight)
    assert net.classifier.conv2d_list[0].weight.shape[0] == 19  # 21-class head not loaded
    assert net.input_style == "caffe" and net.rebuild_kwargs == {"stride_in_1x1": True, "input_style": "caffe"}
    # what the first convolution sees: the image as BGR 0-255 minus the Caffe mean (the official loaders'
    # preprocessing), converted by the network from rtda's ImageNet-normalised RGB input
    from rtda.data.transforms import SegmentationTransform, normalize

    rgb = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    x = normalize(SegmentationTransform()(rgb)["image"][None])
    seen = {}
    net.conv1.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    net.eval()(x)
    expected = rgb[..., ::-1].astype(np.float64) - np.array([104.00698793, 116.66876762, 122.67891434])
    np.testing.assert_allclose(seen["x"][0].permute(1, 2, 0).double().numpy(), expected, atol=1e-3)


def test_deeplabv2_loads_torchvision_resnet101(tmp_path):
    from rtda.models.deeplabv2 import DeepLabV2

    ref = models.resnet101(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet101.pth")
    net = DeepLabV2(19, pretrained=str(tmp_path / "resnet101.pth"))
    torch.testing.assert_close(net.layer3[10].conv2.weight, ref.layer3[10].conv2.weight)
    assert net.rebuild_kwargs == {"stride_in_1x1": False, "input_style": "imagenet"}  # torchvision names: its conventions


def test_deeplabv2_affine_frozen_batchnorm_is_the_official_behaviour():
    from rtda.models.deeplabv2 import DeepLabV2

    net = DeepLabV2(19, layers=(1, 1, 1, 1), freeze_bn="affine").train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    before = net.bn1.running_mean.clone()
    net(torch.randn(1, 3, 33, 33))  # batch statistics in training, and the running statistics move
    assert not torch.equal(before, net.bn1.running_mean)
    with pytest.raises(ValueError, match="model.freeze_bn='stats'"):
        DeepLabV2(19, layers=(1, 1, 1, 1), freeze_bn="stats")
