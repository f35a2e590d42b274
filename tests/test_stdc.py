"""STDC-Seg (rtda.models.stdc): outputs, official figures, losses, pretrained layouts, BN freezing."""

import re

import hydra
import pytest
import torch
from helpers import compose_config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rtda.models.frozen_bn import FrozenBatchNorm2d
from rtda.models.losses import loss_terms, total_loss
from rtda.models.stdc import STDCSeg, detail_targets, stdc_ohem_cross_entropy
from rtda.run.errors import ConfigValueError, PretrainedWeightsError

# Measured on the official code (MichaelFan01/STDC-Seg @ 59ff37f, models/model_stages.py BiSeNet with
# nets/stdcnet.py, 19 classes, eval mode, only what the main output `conv_out` uses: the parameters reached by
# autograd from it; FLOPs with torch.utils.flop_counter.FlopCounterMode, 2 per MAC).
OFFICIAL = {
    "STDCNet813": {"params": 8_275_104, "flops_64x128": 527_360_000, "flops_512x1024": 33_726_267_392},
    "STDCNet1446": {"params": 12_305_568, "flops_64x128": 733_405_184, "flops_512x1024": 46_913_159_168},
}


@pytest.fixture(scope="module")
def stdc1():
    torch.manual_seed(0)
    return STDCSeg(5, backbone="STDCNet813")


def flops(net, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(x)
    return counter.get_total_flops()


def a_label(n=2, h=64, w=128, classes=5):
    label = torch.randint(0, classes, (n, h, w))
    label[:, :8] = 255
    return label


def test_outputs_in_train_and_eval_mode(stdc1):
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        assert stdc1.eval()(x).shape == (2, 5, 64, 128)
        out = stdc1.train()(x)
    assert out.out.shape == (2, 5, 64, 128)
    assert {k: v.shape for k, v in out.aux.items()} == {"context16": (2, 5, 64, 128), "context32": (2, 5, 64, 128)}
    assert out.levels == {} and out.extra["detail"].shape == (2, 1, 8, 16)
    net = STDCSeg(5, aux_weights={"context32": 1.0}, adaptation_levels=("context16",), detail_weight=0).train()
    with torch.no_grad():
        out = net(x)
    assert set(out.aux) == {"context32"} and set(out.levels) == {"context16"} and out.extra == {}
    with pytest.raises(ConfigValueError, match=r"no auxiliary head \['detail'\].*context16"):
        STDCSeg(5, aux_weights={"detail": 1.0})
    with pytest.raises(ConfigValueError, match="STDCNet813"):
        STDCSeg(5, backbone="STDCNet2")


@pytest.mark.parametrize("backbone", ["STDCNet813", "STDCNet1446"])
def test_eval_path_parameters_and_flops_equal_the_official_code(backbone):
    eval_only = STDCSeg(19, backbone=backbone, aux_weights={}, detail_weight=0)
    assert sum(p.numel() for p in eval_only.parameters()) == OFFICIAL[backbone]["params"]
    assert flops(eval_only, torch.randn(1, 3, 64, 128)) == OFFICIAL[backbone]["flops_64x128"]
    full = STDCSeg(19, backbone=backbone)  # + the training heads conv_out16, conv_out32, conv_out_sp8
    heads = sum(p.numel() for m in (full.conv_out16, full.conv_out32, full.conv_out_sp8) for p in m.parameters())
    assert sum(p.numel() for p in full.parameters()) == OFFICIAL[backbone]["params"] + heads
    assert flops(full, torch.randn(1, 3, 64, 128)) == OFFICIAL[backbone]["flops_64x128"]  # no head in eval


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["STDCNet813", "STDCNet1446"])
def test_flops_at_512x1024_equal_the_official_code(backbone):
    assert flops(STDCSeg(19, backbone=backbone), torch.randn(1, 3, 512, 1024)) == OFFICIAL[backbone]["flops_512x1024"]


def test_loss_terms_and_backward(stdc1):
    stdc1.train().zero_grad()
    out = stdc1(torch.randn(2, 3, 64, 128))
    terms = loss_terms(stdc1, out, a_label())
    assert {k: c for k, (_, c) in terms.items()} == {
        "loss_seg": 1.0, "loss_aux/context16": 1.0, "loss_aux/context32": 1.0, "loss_detail/bce": 1.0, "loss_detail/dice": 1.0}
    total, _ = total_loss(terms)
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in stdc1.parameters() if p.grad is not None)
    assert stdc1.conv_out_sp8.conv_out.weight.grad.abs().sum() > 0
    zero = stdc1.loss_terms(out, a_label(), weight=torch.zeros(2, 64, 128))
    for name in ("loss_seg", "loss_aux/context16", "loss_aux/context32", "loss_detail/bce"):
        assert zero[name][0].item() == 0.0, name
    assert zero["loss_detail/dice"][0].item() > 0  # an image-level term: the weight does not apply


def test_ohem_is_stdc_s_threshold_on_the_loss():
    # 32 pixels, n_min = 32 // 16 = 2; two classes, logit margin m gives loss log(1 + e^-m)
    label = torch.zeros(1, 4, 8, dtype=torch.long)
    margin = torch.full((1, 4, 8), 5.0)  # easy: loss 0.0067 < -log(0.7) = 0.357
    margin[0, 0, :3] = -1.0  # three hard pixels, loss 1.313
    logits = torch.stack([margin, torch.zeros_like(margin)], dim=1)
    hard = torch.log1p(torch.exp(torch.tensor(1.0)))
    torch.testing.assert_close(stdc_ohem_cross_entropy(logits, label), hard)  # the 3 losses above the limit
    margin[0, 0, 1:3] = 5.0  # one hard pixel only: the n_min = 2 largest losses
    logits = torch.stack([margin, torch.zeros_like(margin)], dim=1)
    easy = torch.log1p(torch.exp(torch.tensor(-5.0)))
    torch.testing.assert_close(stdc_ohem_cross_entropy(logits, label), (hard + easy) / 2)
    label[0, 0, 0] = 255  # ignored pixels count as 0 among the n_min largest, as official
    torch.testing.assert_close(stdc_ohem_cross_entropy(logits, label), (easy + easy) / 2)
    weight = torch.full((1, 4, 8), 0.5)
    torch.testing.assert_close(stdc_ohem_cross_entropy(logits, label, weight), easy / 2)


def test_detail_targets_are_the_official_laplacian_pyramid():
    label = torch.zeros(1, 16, 16, dtype=torch.long)
    label[0, 8, 8] = 1
    expected = torch.zeros(1, 1, 16, 16)
    expected[0, 0, 8:10, 8:10] = 1  # stride 1 (the pixel) or stride 2 (its 2x2 cell); stride 4 alone is 0.1, not > 0.1
    torch.testing.assert_close(detail_targets(label), expected)
    label[0] = 255  # the ignore value is a label like any other to the Laplacian, as official
    label[0, 4:12, 4:12] = 0
    target = detail_targets(label)[0, 0]
    assert target[3, 6] == 1 and target[8, 8] == 0 and set(target.unique().tolist()) == {0.0, 1.0}


def official_names(net: STDCSeg) -> dict[str, str]:
    """rtda backbone key -> the official ImageNet file's key (identical names under ``features``)."""
    return {k: k for k in net.cp.backbone.state_dict()}


def mmseg_names(net: STDCSeg) -> dict[str, str]:
    """rtda backbone key -> mmseg's converted key (stdc2mmseg.py: stages.<s>.<j>, layers, downsample)."""
    ends = net.cp.backbone.stage_ends
    starts = {2: 2, 3: ends[0], 4: ends[1]}
    out = {}
    for key in net.cp.backbone.state_dict():
        index, rest = re.fullmatch(r"features\.(\d+)\.(.*)", key).groups()
        index = int(index)
        stage = "stages.0" if index == 0 else "stages.1" if index == 1 else next(
            f"stages.{s}.{index - starts[s]}" for s in (4, 3, 2) if index >= starts[s])
        rest = rest.replace("conv_list.", "layers.").replace("avd_layer.0.", "downsample.conv.").replace(
            "avd_layer.1.", "downsample.bn.")
        out[key] = f"{stage}.{rest}"
    return out


@pytest.mark.parametrize("layout", ["official", "mmseg"])
def test_pretrained_file_loads_strictly_into_the_backbone(layout, tmp_path):
    net = STDCSeg(5)
    names = official_names(net) if layout == "official" else mmseg_names(net)
    torch.manual_seed(1)
    own = net.cp.backbone.state_dict()
    state = {names[k]: torch.rand_like(v.float()).to(v.dtype) for k, v in own.items()}
    if layout == "official":  # the file also holds the x2..x32 aliases and the ImageNet classifier
        state.update({"x8.0.3." + k[len("features.3."):]: v for k, v in state.items() if k.startswith("features.3.")})
        state.update({"conv_last.conv.weight": torch.rand(1024, 1024, 1, 1), "fc.weight": torch.rand(1024, 1024),
                      "bn.weight": torch.rand(1024), "linear.weight": torch.rand(1000, 1024)})
        file = tmp_path / "STDCNet813M_73.91.tar"
        torch.save({"state_dict": state}, file)
    else:
        file = tmp_path / "stdc1_20220308-5368626c.pth"
        torch.save(state, file)
    loaded = STDCSeg(5, pretrained=str(file))
    assert loaded.pretrained_weights == str(file)
    loaded_state = loaded.cp.backbone.state_dict()
    for key, theirs in names.items():
        assert torch.equal(loaded_state[key], state[theirs]), key
    # missing and unexpected keys: one error naming the file and both sides
    for change in ("missing", "unexpected"):
        broken = dict(state)
        if change == "missing":
            del broken[names["features.4.conv_list.1.conv.weight"]]
        else:
            broken[names["features.4.conv_list.1.conv.weight"].replace("conv.weight", "extra.weight")] = torch.rand(1)
        bad = tmp_path / f"{change}.pth"
        torch.save(broken, bad)
        with pytest.raises(PretrainedWeightsError) as err:
            STDCSeg(5, pretrained=str(bad))
        message = str(err.value)
        assert str(bad) in message and "file keys e.g." in message.lower() and "network keys e.g." in message
        assert ("1 network keys missing" if change == "missing" else "1 unexpected file keys") in message
        assert "features.4.conv_list.1" in message or "stages.3.0.layers.1" in message


def test_pretrained_true_says_which_file_to_download():
    with pytest.raises(PretrainedWeightsError, match=r"STDCNet1446_76\.47\.tar.*stdc2_20220308-7dbd9127\.pth.*model\.pretrained="):
        STDCSeg(5, backbone="STDCNet1446", pretrained=True)


def test_learning_rate_groups_are_the_official_ones(stdc1):
    backbone = {id(p) for p in stdc1.backbone_parameters()}
    assert STDCSeg.head_lr_mult == 10.0
    assert {id(p) for p in stdc1.cp.arm16.parameters()} <= backbone  # official get_params: the context path at 1x
    assert not backbone & {id(p) for m in (stdc1.ffm, stdc1.conv_out, stdc1.conv_out_sp8) for p in m.parameters()}


def test_freeze_bn_and_channels_last(stdc1):
    frozen = STDCSeg(5, freeze_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    assert frozen.state_dict().keys() == stdc1.state_dict().keys()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        stdc1.eval()
        expected = stdc1(x)
        stdc1.to(memory_format=torch.channels_last)
        got = stdc1(x.to(memory_format=torch.channels_last))
        stdc1.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("option", ["stdc1", "stdc2"])
def test_config_instantiates(option, tmp_path):
    cfg = compose_config("train", [f"model={option}"], output_dir=tmp_path)
    net = hydra.utils.instantiate(cfg.model)
    assert isinstance(net, STDCSeg) and net.backbone_name == {"stdc1": "STDCNet813", "stdc2": "STDCNet1446"}[option]


@pytest.mark.slow
def test_onnx_export(stdc1, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    x = torch.randn(1, 3, 64, 128)
    file = tmp_path / "stdc1.onnx"
    torch.onnx.export(stdc1.eval(), x, file, opset_version=17, dynamo=False)
    got = onnxruntime.InferenceSession(str(file)).run(None, {onnxruntime.InferenceSession(str(file)).get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), stdc1(x), atol=1e-4, rtol=1e-4)
