"""MiT encoder, SegFormer-B0/B1 and DAFormer (MiT-B5): interface, official figures, weights, checkpointing.

The official figures below were measured on the official code (NVlabs/SegFormer mmseg/models/backbones/
mix_transformer.py + decode_heads/segformer_head.py; lhoyer/DAFormer mix_transformer.py + daformer_head.py with
configs/_base_/models/daformer_sepaspp_mitb5.py), mmcv stubbed, 19 classes, eval mode, with
torch.utils.flop_counter.FlopCounterMode; the official state dicts loaded into these networks give the same
outputs (a comparison run outside the test suite).
"""

import copy
import functools
import io

import numpy as np
import pytest
import torch
from helpers import blocky_label
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rtda.models.daformer import DAFormer
from rtda.models.frozen_bn import FrozenBatchNorm2d
from rtda.models.losses import loss_terms, total_loss
from rtda.models.mix_transformer import MIT_VARIANTS, MixVisionTransformer, load_mit_weights, nvlabs_to_hf
from rtda.models.outputs import SegmentationOutputs
from rtda.models.segformer import SegFormer
from rtda.run.errors import ConfigValueError, PretrainedWeightsError

X = (2, 3, 64, 128)
# official eval-path parameters (the official SegFormerHead also builds mmseg's unused conv_seg, 2,451 more:
# 3,721,478 / 13,684,582), encoder parameters, FLOPs at 1x3x64x128 and at 1x3x512x1024, state-dict keys
OFFICIAL = {
    "b0": {"params": 3_719_027, "encoder": 3_319_392, "flops64": 426_917_888, "flops512": 35_514_220_544, "keys": 192},
    "b1": {"params": 13_682_131, "encoder": 13_151_424, "flops64": 832_077_824, "flops512": 69_635_932_160, "keys": 192},
}
# DAFormer (MiT-B5 + sep-ASPP DAFormerHead): conv_seg is used, so all parameters are on the eval path
DAFORMER_B5 = {"params": 85_155_283, "encoder": 81_443_008, "flops64": 7_279_902_720, "flops512": 545_714_601_984,
               "keys": 1110}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {"b0": SegFormer(19, variant="b0"), "b1": SegFormer(19, variant="b1")}


@pytest.fixture(scope="module")
def b5():
    torch.manual_seed(0)
    return DAFormer(19)


def _flops(net, size):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(torch.randn(1, 3, *size))
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", ["b0", "b1"])
def test_segformer_outputs_params_and_flops(nets, variant):
    net = nets[variant]
    x = torch.randn(*X)
    out = net.train()(x)
    assert isinstance(out, SegmentationOutputs) and not out.aux and not out.levels and not out.extra
    assert out.out.shape == (2, 19, 64, 128)
    with torch.no_grad():
        y = net.eval()(x)
        assert isinstance(y, torch.Tensor) and y.shape == (2, 19, 64, 128)
        assert net(torch.randn(1, 3, 50, 70)).shape == (1, 19, 50, 70)  # any size: logits at the input size
    figures = OFFICIAL[variant]
    assert sum(p.numel() for p in net.parameters()) == figures["params"]
    assert sum(p.numel() for p in net.backbone_parameters()) == figures["encoder"]
    assert len(net.state_dict()) == figures["keys"] and not hasattr(net.decode_head, "conv_seg")
    # attention is quadratic in the tokens: FLOPs do not scale with pixels, the official count at this size
    assert _flops(net, (64, 128)) == figures["flops64"]
    assert net.head_lr_mult == 10.0 and net.pretrained_weights is None


def test_official_module_names_and_structure(nets):
    net = nets["b0"]
    keys = set(net.state_dict())
    assert {"backbone.patch_embed1.proj.weight", "backbone.block1.0.attn.kv.weight", "backbone.block1.0.attn.sr.weight",
            "backbone.block4.1.mlp.dwconv.dwconv.weight", "backbone.norm4.bias", "decode_head.linear_c4.proj.weight",
            "decode_head.linear_fuse.conv.weight", "decode_head.linear_fuse.bn.running_var",
            "decode_head.linear_pred.bias"} <= keys
    assert "backbone.block4.0.attn.sr.weight" not in keys  # sr_ratio 1 in the last stage
    enc = net.backbone
    assert [enc.block1[0].attn.sr.stride[0], enc.block2[0].attn.sr.stride[0], enc.block3[0].attn.sr.stride[0]] == [8, 4, 2]
    assert enc.patch_embed1.proj.kernel_size == (7, 7) and enc.patch_embed1.proj.stride == (4, 4)
    assert enc.patch_embed2.proj.kernel_size == (3, 3) and enc.patch_embed2.proj.stride == (2, 2)
    # LayerNorm eps: 1e-6 for the blocks' and stages' norms, PyTorch's 1e-5 in the patch embeddings and attention
    assert enc.block1[0].norm1.eps == enc.block1[0].norm2.eps == enc.norm1.eps == 1e-6
    assert enc.patch_embed1.norm.eps == enc.block1[0].attn.norm.eps == 1e-5
    # stochastic depth: linear from 0 to 0.1 over the 8 blocks
    assert isinstance(enc.block1[0].drop_path, nn.Identity) and enc.block4[1].drop_path.drop_prob == pytest.approx(0.1)
    assert enc.block2[0].drop_path.drop_prob == pytest.approx(0.1 * 2 / 7)
    assert enc.block1[0].attn.q.bias is not None and enc.block1[0].attn.kv.bias is not None  # qkv_bias True


def test_official_initialisation(nets):
    net = nets["b1"]  # as built: no test changes its parameters
    enc = net.backbone
    assert enc.block3[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert enc.block3[0].mlp.fc1.bias.abs().sum() == 0 and torch.equal(enc.norm3.weight, torch.ones(320))
    proj = enc.patch_embed1.proj  # normal(0, sqrt(2 / fan_out)), fan_out = 7 * 7 * 64
    assert proj.weight.std().item() == pytest.approx((2 / (49 * 64)) ** 0.5, rel=0.05)
    dw = enc.block3[0].mlp.dwconv.dwconv  # groups = channels: fan_out = 3 * 3 * 1280 / 1280
    assert dw.weight.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.05)
    fuse = net.decode_head.linear_fuse.conv  # Kaiming normal, fan_out = 256
    assert fuse.weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.05)
    conv_seg = DAFormer(19, variant="b0").decode_head.conv_seg
    assert conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.2) and conv_seg.bias.abs().sum() == 0


def test_no_auxiliary_heads():
    SegFormer(19, aux_weights=None)
    for cls in (SegFormer, DAFormer):
        with pytest.raises(ConfigValueError, match=r"has no auxiliary heads.*\['context16'\]"):
            cls(19, aux_weights={"context16": 1.0})
        with pytest.raises(ConfigValueError, match=r"has no auxiliary heads.*\['layer3'\]"):
            cls(19, adaptation_levels=["layer3"])
    with pytest.raises(ConfigValueError, match=r"model\.variant='b9'"):
        SegFormer(19, variant="b9")


def test_loss_terms_average_over_all_pixels_and_weight(nets):
    net = nets["b0"].train()
    out = net(torch.randn(*X))
    label = blocky_label()
    label[1] = 255
    terms = loss_terms(net, out, label)
    assert {k: c for k, (_, c) in terms.items()} == {"loss_seg": 1.0}
    # mmseg v0.x CrossEntropyLoss: per-pixel CE, ignored pixels 0, mean over all pixels
    ce = nn.functional.cross_entropy(out.out, label, ignore_index=255, reduction="none")
    torch.testing.assert_close(terms["loss_seg"][0], ce.mean())
    weight = torch.rand(2, 64, 128)
    torch.testing.assert_close(net.loss_terms(out, label, weight=weight)["loss_seg"][0], (ce * weight).mean())
    assert net.loss_terms(out, label, weight=torch.zeros(2, 64, 128))["loss_seg"][0].item() == 0.0
    total, _ = total_loss(terms)
    net.zero_grad()
    total.backward()
    assert torch.isfinite(total) and net.backbone.patch_embed1.proj.weight.grad.abs().sum() > 0


def test_feature_layer_and_optimizer_rules(nets):
    net = nets["b0"].eval()
    captured = {}
    handle = dict(net.named_modules())[net.feature_layer].register_forward_hook(
        lambda m, i, o: captured.__setitem__("f", o))
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        net(x)
        last = net.backbone(x)[-1]
    handle.remove()
    assert net.feature_layer == "backbone.stage4" and captured["f"].shape == (1, 256, 2, 4)
    torch.testing.assert_close(captured["f"], last)
    # the official custom_keys (mmcv: the first matching key, longest first): MiT's LayerNorms without decay
    names = net.no_weight_decay_names()
    assert len(names) == 60 and all(n.startswith("backbone.") and "norm" in n for n in names)
    assert {"backbone.patch_embed1.norm.weight", "backbone.block1.0.attn.norm.bias", "backbone.norm4.weight"} <= set(names)
    assert net.paramwise_rule("decode_head.linear_fuse.bn.weight") == {"lr_mult": 10.0, "decay_mult": 1.0}
    assert net.paramwise_rule("backbone.block1.0.norm1.weight") == {"lr_mult": 1.0, "decay_mult": 0.0}
    assert net.paramwise_rule("backbone.block1.0.attn.q.weight") == {"lr_mult": 1.0, "decay_mult": 1.0}
    backbone = {id(p) for p in net.backbone_parameters()}
    assert all((id(p) in backbone) == n.startswith("backbone.") for n, p in net.named_parameters())


@functools.cache
def _encoder_shapes(variant: str) -> dict:
    return {k: v.shape for k, v in MixVisionTransformer(variant).state_dict().items()}


def _nvlabs_state(variant: str, seed: int = 1) -> dict:
    """An ImageNet file in the official NVlabs layout (mit_bX.pth): encoder keys + the classifier head.*."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) if variant == "b0" else torch.zeros(shape)
             for k, shape in _encoder_shapes(variant).items()}
    width = MIT_VARIANTS[variant]["embed_dims"][-1]
    state.update({"head.weight": torch.randn(1000, width, generator=g), "head.bias": torch.randn(1000, generator=g)})
    return state


def test_nvlabs_imagenet_file_loads_into_the_encoder(tmp_path):
    state = _nvlabs_state("b0")
    torch.save(state, tmp_path / "mit_b0.pth")
    torch.manual_seed(0)
    ref = SegFormer(19)
    torch.manual_seed(0)
    net = SegFormer(19, pretrained=str(tmp_path / "mit_b0.pth"))
    assert net.pretrained_weights == str(tmp_path / "mit_b0.pth")
    torch.testing.assert_close(net.backbone.block2[1].attn.q.weight, state["block2.1.attn.q.weight"])
    torch.testing.assert_close(net.backbone.block3[0].attn.kv.weight, state["block3.0.attn.kv.weight"])
    torch.testing.assert_close(net.backbone.patch_embed1.norm.bias, state["patch_embed1.norm.bias"])
    for key, value in net.decode_head.state_dict().items():  # the decoder keeps its initialisation
        assert torch.equal(value, ref.decode_head.state_dict()[key]), key
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "nested.pth")  # nested under state_dict also loads
    nested = SegFormer(19, pretrained=str(tmp_path / "nested.pth"))
    torch.testing.assert_close(nested.backbone.norm4.weight, state["norm4.weight"])


def test_hugging_face_files_load_into_the_encoder(tmp_path):
    from safetensors.torch import save_file

    nv = _nvlabs_state("b0", seed=2)
    hf = nvlabs_to_hf({k: v for k, v in nv.items() if not k.startswith("head.")})
    hf.update({"classifier.weight": nv["head.weight"], "classifier.bias": nv["head.bias"]})
    assert "segformer.encoder.block.2.0.attention.self.key.weight" in hf
    assert "segformer.encoder.patch_embeddings.0.layer_norm.weight" in hf and "segformer.encoder.layer_norm.3.bias" in hf
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    torch.save(hf, tmp_path / "pytorch_model.bin")
    for name in ("model.safetensors", "pytorch_model.bin"):
        net = DAFormer(19, variant="b0", pretrained=str(tmp_path / name))
        enc = net.backbone
        torch.testing.assert_close(enc.block2[1].attn.q.weight, hf["segformer.encoder.block.1.1.attention.self.query.weight"])
        kv = torch.cat([hf["segformer.encoder.block.2.0.attention.self.key.weight"],
                        hf["segformer.encoder.block.2.0.attention.self.value.weight"]])
        torch.testing.assert_close(enc.block3[0].attn.kv.weight, kv)
        torch.testing.assert_close(enc.block3[0].attn.kv.weight, nv["block3.0.attn.kv.weight"])
        torch.testing.assert_close(enc.block1[0].attn.proj.bias, nv["block1.0.attn.proj.bias"])
        torch.testing.assert_close(enc.norm2.weight, nv["norm2.weight"])


def test_wrong_files_give_one_clear_error(tmp_path):
    state = _nvlabs_state("b0")
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "block1.0.attn.kv.weight"},
                    r"(?s)mit_b0\.pth.*not in the file.*block1\.0\.attn\.kv\.weight.*File keys e\.g\..*network keys e\.g\."),
        "unexpected": ({**state, "block1.9.attn.q.weight": torch.zeros(1)},
                       r"(?s)not in the network.*block1\.9\.attn\.q\.weight.*File keys e\.g\..*network keys e\.g\."),
        "variant": (_nvlabs_state("b1"), r"(?s)176 tensors differ in shape, e\.g\. block1\.0\.attn\.kv\.bias: file \(128,\), "
                                         r"network \(64,\).*holds MiT-B1, the network is MiT-B0.*model\.variant=b1"
                                         r".*File keys e\.g\..*network keys e\.g\."),
    }
    encoder = MixVisionTransformer("b0")
    for what, (bad, pattern) in cases.items():
        torch.save(bad, tmp_path / "mit_b0.pth")
        with pytest.raises(PretrainedWeightsError, match=pattern):
            if what == "missing":  # through the network's option once, the encoder's loader for the others
                SegFormer(19, pretrained=str(tmp_path / "mit_b0.pth"))
            else:
                load_mit_weights(encoder, tmp_path / "mit_b0.pth")
    hf = nvlabs_to_hf({k: v for k, v in state.items() if not k.startswith("head.")})
    del hf["segformer.encoder.block.0.0.attention.self.value.weight"]  # kv needs both halves
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(PretrainedWeightsError, match=r"(?s)Hugging Face names.*not in the file.*block1\.0\.attn\.kv\.weight"
                                                     r".*File keys e\.g\. \['segformer\.encoder"):
        load_mit_weights(encoder, tmp_path / "pytorch_model.bin")
    seg = {**nvlabs_to_hf({k: v for k, v in state.items() if not k.startswith("head.")}),
           "decode_head.classifier.weight": torch.zeros(19, 256, 1, 1)}
    torch.save(seg, tmp_path / "hf_segformer.bin")
    with pytest.raises(PretrainedWeightsError, match=r"segmentation model.*nvidia/mit-b0"):
        load_mit_weights(encoder, tmp_path / "hf_segformer.bin")
    with pytest.raises(PretrainedWeightsError, match=r"mit_b5\.pth.*nvidia/mit-b5.*model\.pretrained=/path/to/mit_b5\.pth"):
        DAFormer(19, pretrained=True)
    with pytest.raises(PretrainedWeightsError, match=r"not found"):
        load_mit_weights(encoder, tmp_path / "absent.safetensors")


def test_official_segmentation_checkpoints_load_the_whole_network(nets, tmp_path):
    src = nets["b0"].train()
    src(torch.randn(*X))  # moves the BatchNorm statistics
    state = dict(src.state_dict())
    state.update({"decode_head.conv_seg.weight": torch.zeros(19, 128, 1, 1), "decode_head.conv_seg.bias": torch.zeros(19)})
    torch.save({"state_dict": state, "meta": {"CLASSES": []}}, tmp_path / "segformer.b0.city.pth")
    net = SegFormer(19, pretrained=str(tmp_path / "segformer.b0.city.pth")).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(net(x), src.eval()(x))
    # a DAFormer UDA checkpoint: the student model.* (as DAFormer's tools/test.py), ema_model / imnet_model dropped
    noise = {k: v + 1 if v.is_floating_point() else v for k, v in src.state_dict().items()}
    uda = {**{f"model.{k}": v for k, v in src.state_dict().items()}, **{f"ema_model.{k}": v for k, v in noise.items()},
           **{f"imnet_model.{k}": v for k, v in noise.items() if k.startswith("backbone.")}}
    torch.save({"state_dict": uda}, tmp_path / "latest.pth")
    torch.nn.init.zeros_(net.decode_head.linear_pred.weight)
    assert net.load_pretrained(str(tmp_path / "latest.pth")) == "full"
    with torch.no_grad():
        torch.testing.assert_close(net(x), src(x))
    del state["decode_head.linear_pred.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(PretrainedWeightsError, match=r"(?s)mmsegmentation checkpoint.*decode_head\.linear_pred\.bias"
                                                     r".*File keys.*network keys"):
        net.load_pretrained(str(tmp_path / "partial.pth"))
    with pytest.raises(PretrainedWeightsError, match=r"(?s)differ in shape.*decode_head\.linear_pred"):
        SegFormer(12, pretrained=str(tmp_path / "segformer.b0.city.pth"))


def test_checkpointing_gives_the_same_loss_gradients(nets):
    assert SegFormer(19, checkpointing=True).backbone.checkpointing
    plain = nets["b0"].train()
    plain.zero_grad()  # gradients of earlier tests
    ckpt = copy.deepcopy(plain)
    ckpt.backbone.checkpointing = True
    calls = []
    ckpt.backbone.block2[0].register_forward_pre_hook(lambda *args: calls.append(1))  # recomputation stops early
    x, label = torch.randn(*X), blocky_label()
    grads = []
    for net in (plain, ckpt):
        torch.manual_seed(7)  # the same stochastic depth and dropout draws
        total, _ = total_loss(net.loss_terms(net(x), label))
        total.backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        net.zero_grad()
    assert len(calls) == 2  # the block ran again in the backward pass
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)
    assert plain.backbone.block2[0].drop_path.drop_prob > 0
    with torch.no_grad():
        ckpt.eval()(x)
    assert len(calls) == 3  # no checkpointing without gradients / in eval


def test_freeze_bn_and_channels_last(nets):
    frozen = DAFormer(19, variant="b0", freeze_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 8  # ASPP: 1 + 3 x 2, bottleneck: 1
    assert list(frozen.state_dict()) == list(DAFormer(19, variant="b0").state_dict())
    x = torch.randn(1, 3, 64, 128)
    for net in (nets["b0"].eval(), frozen.eval()):
        with torch.no_grad():
            ref = net(x)
            got = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        net.to(memory_format=torch.contiguous_format)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert ref.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)  # the input's format


def test_onnx_export_b0(nets):
    ort = pytest.importorskip("onnxruntime")
    net = nets["b0"].eval()
    x = torch.randn(1, 3, 64, 128)
    buf = io.BytesIO()
    torch.onnx.export(net, x, buf, opset_version=17, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-3, atol=1e-3)


def test_daformer_b5_official_figures(b5):
    assert sum(p.numel() for p in b5.parameters()) == DAFORMER_B5["params"]
    assert sum(p.numel() for p in b5.backbone_parameters()) == DAFORMER_B5["encoder"]
    assert len(b5.state_dict()) == DAFORMER_B5["keys"] and b5.backbone.depths == (3, 6, 40, 3)
    assert len(b5.no_weight_decay_names()) == 322 and b5.feature_layer == "backbone.stage4"
    head = b5.decode_head
    assert list(head.embed_layers) == ["0", "1", "2", "3"] and head.embed_layers["3"].proj.in_features == 512
    assert [m.depthwise_conv.conv.dilation[0] for m in list(head.fuse_layer.aspp_modules)[1:]] == [6, 12, 18]
    assert head.fuse_layer.aspp_modules[0].conv.kernel_size == (1, 1) and head.fuse_layer.bottleneck.conv.in_channels == 1024
    assert _flops(b5, (64, 128)) == DAFORMER_B5["flops64"]  # the train path: DAFormer at MiT-B0 in the other tests


def test_model_configs_instantiate():
    hydra = pytest.importorskip("hydra")
    from omegaconf import OmegaConf

    from rtda.run.config import CONFIG_DIR

    for name, cls, variant in (("segformer_b0", SegFormer, "b0"), ("segformer_b1", SegFormer, "b1"),
                               ("daformer_mitb5", DAFormer, "b5")):
        cfg = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")
        cfg.num_classes = 19
        if variant == "b5":
            cfg.variant = "b0"  # the same options, a small encoder
        net = hydra.utils.instantiate(cfg)
        assert type(net) is cls and net.pretrained_weights is None and net.aux_weights == {}
        assert net.variant == ("b0" if variant == "b5" else variant)
        assert OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml").variant == variant


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["b0", "b1", "b5"])
def test_flops_at_512x1024(nets, b5, variant):
    # official eval models, FlopCounterMode at 1x3x512x1024: 35.51 (SegFormer-B0), 69.64 (B1), 545.71 (DAFormer) GFLOPs
    net, figure = (b5, DAFORMER_B5["flops512"]) if variant == "b5" else (nets[variant], OFFICIAL[variant]["flops512"])
    assert _flops(net, (512, 1024)) == figure
