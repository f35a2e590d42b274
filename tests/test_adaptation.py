"""The method core (iterations vs optimizer steps, method-owned networks, named outputs, frozen BatchNorm
under SyncBatchNorm) and the AdaptSegNet / MinEnt / AdvEnt methods, on tiny in-memory data."""

import math

import pytest
import pytorch_lightning as pl
import torch
from helpers.lightning import NUM_CLASSES, SIZE, TinyData, bisenet, module, trainer  # noqa: E402
from torch import nn

from rtda.adaptation.advent import entropy_loss, self_information
from rtda.adaptation.gan_losses import gan_loss
from rtda.adaptation.segmentation import SegmentationModule
from rtda.models.bisenet import BiSeNet
from rtda.models.deeplabv2 import DeepLabV2
from rtda.models.discriminator import FCDiscriminator
from rtda.models.outputs import SegmentationOutputs


def test_discriminator_is_the_authors_fc_discriminator():
    d = FCDiscriminator(19)
    # by hand: 4x4 convs 19->64->128->256->512->1 with biases
    expected = (19 * 64 * 16 + 64) + (64 * 128 * 16 + 128) + (128 * 256 * 16 + 256) + (256 * 512 * 16 + 512) + (512 * 16 + 1)
    assert expected == 2_781_121
    assert sum(p.numel() for p in d.parameters()) == expected
    assert d(torch.randn(2, 19, 64, 128)).shape == (2, 1, 2, 4)  # output stride 32
    assert d(torch.randn(1, 19, 512, 1024)).shape == (1, 1, 16, 32)
    assert [m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)] == [0.2] * 4


def test_self_information_and_entropy_by_hand():
    uniform2 = torch.full((1, 2, 3, 5), 0.5)
    torch.testing.assert_close(self_information(uniform2), torch.full((1, 2, 3, 5), 0.5))  # -0.5*log2(0.5)/log2(2)
    assert entropy_loss(uniform2).item() == pytest.approx(1.0)
    uniform4 = torch.full((2, 4, 1, 1), 0.25)
    torch.testing.assert_close(self_information(uniform4), torch.full((2, 4, 1, 1), 0.25))  # -0.25*(-2)/2
    assert entropy_loss(uniform4).item() == pytest.approx(1.0)
    # one pixel certain (entropy 0), one at p = (0.25, 0.75): H = 0.25*2 + 0.75*log2(4/3) = 0.811278 bits
    prob = torch.tensor([[[[1.0, 0.25]], [[0.0, 0.75]]]])  # N=1, C=2, H=1, W=2
    info = self_information(prob)
    assert info[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert info[0, :, 0, 1].tolist() == pytest.approx([0.5, 0.311278], abs=1e-5)
    assert entropy_loss(prob).item() == pytest.approx(0.811278 / 2, abs=1e-5)  # averaged over the 2 pixels


def test_gan_losses():
    logits = torch.tensor([0.0, 2.0])
    assert gan_loss(logits, 0.0, "vanilla").item() == pytest.approx((math.log(2) + math.log(1 + math.e ** 2)) / 2)
    assert gan_loss(logits, 1.0, "ls").item() == pytest.approx((1 + 1) / 2)
    with pytest.raises(ValueError, match="vanilla or ls"):
        gan_loss(logits, 0.0, "wgan")


def test_named_outputs():
    net = BiSeNet(NUM_CLASSES, adaptation_levels=["context16"]).train()
    out = net(torch.randn(2, 3, *SIZE))
    assert isinstance(out, SegmentationOutputs) and set(out.aux) == {"context16", "context32"}
    assert list(out.level_logits()) == ["out", "context16"] and out.levels["context16"] is out.aux["context16"]
    with pytest.raises(ValueError, match="no auxiliary head"):
        BiSeNet(NUM_CLASSES, adaptation_levels=["layer3"])
    deeplab = DeepLabV2(NUM_CLASSES, multi_level=True, layers=(1, 1, 1, 1)).train()
    out = deeplab(torch.randn(1, 3, *SIZE))
    assert deeplab.adaptation_levels == ("layer3",) and deeplab.aux_weights == {"layer3": 0.1}
    assert set(out.aux) == set(out.levels) == {"layer3"}
    assert DeepLabV2(NUM_CLASSES, layers=(1, 1, 1, 1)).adaptation_levels == ()


def test_segmentation_loss_weights_auxiliary_heads_by_name():
    m = module("source_only", net=BiSeNet(NUM_CLASSES, aux_weights={"context16": 1.0, "context32": 0.5}))
    label = torch.randint(0, NUM_CLASSES, (1, 2, 2))
    logits = {k: torch.randn(1, NUM_CLASSES, 2, 2) for k in ("out", "a", "b")}
    ce = nn.functional.cross_entropy
    total, parts = m.segmentation_loss(SegmentationOutputs(logits["out"], aux={"context16": logits["a"],
                                                                                "context32": logits["b"]}), label)
    assert set(parts) == {"loss_seg", "loss_aux/context16", "loss_aux/context32"}
    torch.testing.assert_close(total, ce(logits["out"], label) + ce(logits["a"], label) + 0.5 * ce(logits["b"], label))
    with pytest.raises(ValueError, match="no aux_weights"):
        m.segmentation_loss(SegmentationOutputs(logits["out"], aux={"other": logits["a"]}), label)


def test_frozen_batchnorm_stays_frozen_under_syncbatchnorm_conversion():
    net = DeepLabV2(NUM_CLASSES, layers=(1, 1, 1, 1))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    before = {k: v.clone() for k, v in converted.state_dict().items() if "running" in k}
    converted.train()(torch.randn(2, 3, *SIZE) * 3 + 1)
    after = converted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for n, p in converted.named_parameters() if "bn" in n or "downsample.1" in n)
    assert sum(p.numel() for p in DeepLabV2(19).parameters()) == 43_901_068  # BN affine terms still counted
    # BiSeNet's BatchNorm is trainable and must be synchronised (the conversion itself is not broken)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in nn.SyncBatchNorm.convert_sync_batchnorm(bisenet()).modules())


def test_target_images_update_batchnorm_statistics_only_when_asked():
    x = torch.randn(2, 3, *SIZE) * 2 + 1
    for update in (True, False):
        m = module("minent", update_bn_on_target=update).train()
        bn = m.net.spatial_path[0][1]
        mean, tracked = bn.running_mean.clone(), bn.num_batches_tracked.clone()
        m.forward_target(x)
        assert torch.equal(bn.running_mean, mean) is (not update)
        assert torch.equal(bn.num_batches_tracked, tracked) is (not update)
        assert bn.momentum == 0.1  # restored


# -- training through Lightning --------------------------------------------------------------------------

class Recorder(pl.Callback):
    """Learning rates at the start of every iteration, and how many training steps ran."""

    def __init__(self):
        self.lrs, self.steps = [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for opt in trainer.optimizers for g in opt.param_groups])
        self.steps += 1


@pytest.mark.parametrize("kind,levels,n_optimizers", [("source_only", [], 1), ("adversarial", [], 2),
                                                      ("advent", ["context16"], 3),
                                                      ("adversarial", ["context16", "context32"], 4)])
def test_max_steps_counts_iterations_whatever_the_optimizers(kind, levels, n_optimizers, tmp_path):
    m = module(kind, net=bisenet(adaptation_levels=levels))
    rec = Recorder()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=2, save_top_k=-1,
                                        auto_insert_metric_name=False)
    t = trainer(tmp_path, max_steps=4, callbacks=[rec, ckpt], enable_checkpointing=True)
    t.fit(m, datamodule=TinyData())
    assert len(t.optimizers) == n_optimizers
    assert rec.steps == 4 and t.global_step == 4 and m.iteration == 4
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["step2.ckpt", "step4.ckpt"]
    # poly per iteration, for every optimizer: base * (1 - i/4)^0.9, the last iteration at (1/4)^0.9 and 0 after it
    for i, lrs in enumerate(rec.lrs):
        base = rec.lrs[0]
        assert lrs == pytest.approx([b * (1 - i / 4) ** 0.9 for b in base])
    assert all(g["lr"] == 0.0 for opt in t.optimizers for g in opt.param_groups)


class PhaseSnapshots(pl.Callback):
    """State of the segmenter and the discriminators when each optimizer steps and after the iteration."""

    def __init__(self):
        self.snaps = []

    def _snap(self, pl_module, when):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        grads = {n: p.grad for n, p in pl_module.named_parameters()}
        self.snaps.append((when, state, grads))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._snap(pl_module, "start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._snap(pl_module, trainer.optimizers.index(getattr(optimizer, "optimizer", optimizer)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._snap(pl_module, "end")


def _changed(a, b, prefix):
    keys = [k for k in a if k.startswith(prefix) and a[k].is_floating_point()]
    return {k for k in keys if not torch.equal(a[k], b[k])}, keys


def test_segmenter_phase_changes_only_the_segmenter_and_discriminator_phase_only_d(tmp_path):
    m = module("adversarial")
    snaps = PhaseSnapshots()
    trainer(tmp_path, max_steps=1, callbacks=[snaps]).fit(m, datamodule=TinyData())
    assert [s[0] for s in snaps.snaps] == ["start", 0, 1, "end"]
    (_, start, _), (_, before_seg, seg_grads), (_, before_d, _), (_, end, _) = snaps.snaps
    # phase (a): D is frozen (no gradient at all), the segmenter learns
    assert all(seg_grads[k] is None for k in seg_grads if k.startswith("discriminators."))
    assert any(seg_grads[k] is not None and seg_grads[k].abs().sum() > 0 for k in seg_grads if k.startswith("net.classifier"))
    changed, _ = _changed(start, before_d, "discriminators.")
    assert not changed
    changed, keys = _changed(before_seg, before_d, "net.")
    weights = [k for k in keys if k.endswith("weight") and "bn" not in k and "running" not in k]
    assert set(weights) <= changed  # every conv weight of the segmenter moved in its step
    # phase (b): only the discriminator moves; the segmenter (weights and BatchNorm statistics) does not
    changed, _ = _changed(before_d, end, "net.")
    assert not changed
    changed, keys = _changed(before_d, end, "discriminators.")
    assert changed == set(keys) and keys


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(tmp_path):
    ref = module("adversarial")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step}", every_n_train_steps=2,
                                        save_top_k=-1, auto_insert_metric_name=False)
    t = trainer(tmp_path / "ref", max_steps=4, callbacks=[ckpt], enable_checkpointing=True)
    t.fit(ref, datamodule=TinyData())
    mid = torch.load(tmp_path / "ckpt" / "step2.ckpt", map_location="cpu", weights_only=True)
    assert [s["last_epoch"] for s in mid["lr_schedulers"]] == [2, 2]  # schedules saved in step with the weights

    resumed = module("adversarial")  # fresh weights: everything must come from the checkpoint
    t2 = trainer(tmp_path / "resumed", max_steps=4)
    t2.fit(resumed, datamodule=TinyData(), ckpt_path=tmp_path / "ckpt" / "step2.ckpt")

    assert t2.global_step == 4 and resumed.iteration == 4
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for o_ref, o_res in zip(t.optimizers, t2.optimizers):  # both optimizers: state and schedule
        assert [g["lr"] for g in o_ref.param_groups] == [g["lr"] for g in o_res.param_groups]
        for p_ref, p_res in zip(o_ref.state.values(), o_res.state.values()):
            for key in p_ref:
                torch.testing.assert_close(p_res[key], p_ref[key], rtol=1e-5, atol=1e-6)
    assert [c.scheduler.last_epoch for c in t2.lr_scheduler_configs] == [4, 4]


def test_checkpoint_holds_the_discriminators_and_loads_without_pickles(tmp_path):
    m = module("advent", net=bisenet(adaptation_levels=["context32"]))
    t = trainer(tmp_path, max_steps=1)
    t.fit(m, datamodule=TinyData())
    t.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("discriminators.out.") for k in keys) and any(k.startswith("discriminators.context32.") for k in keys)
    assert len(ckpt["optimizer_states"]) == 3 and len(ckpt["lr_schedulers"]) == 3
    assert ckpt["hyper_parameters"]["d_betas"] == (0.9, 0.99) and ckpt["global_step"] == 1


def test_minent_adds_the_weighted_target_entropy(tmp_path):
    m = module("minent", lambda_ent=0.5)
    batch = next(iter(TinyData().train_dataloader()))
    m.train()
    torch.manual_seed(0)
    m.log = m.log_dict = lambda *a, **k: None  # no trainer attached
    out = m.training_step(batch, 0)
    assert set(out) == {"loss", "loss_seg", "loss_aux/context16", "loss_aux/context32", "loss_ent/out"}
    expected = out["loss_seg"] + out["loss_aux/context16"] + out["loss_aux/context32"] + 0.5 * out["loss_ent/out"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert 0 < out["loss_ent/out"] <= 1


def test_ddp_options_come_from_the_method():
    from pytorch_lightning.strategies import DDPStrategy

    from rtda.pipelines.train import method_strategy

    strategy = method_strategy("ddp_spawn", module("adversarial"))["strategy"]
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs == {"find_unused_parameters": True}
    assert strategy._start_method == "spawn"
    assert method_strategy("ddp", module("advent"))["strategy"]._start_method == "popen"
    assert method_strategy("ddp", module("source_only")) == {} and method_strategy("auto", module("adversarial")) == {}


def test_compile_options_from_a_config_node_reach_torch_compile(monkeypatch):
    """Hydra hands ``adaptation.compile={mode: …}`` over as a DictConfig (no ``_convert_``): its keys still reach
    ``nn.Module.compile``."""
    from omegaconf import OmegaConf

    m = SegmentationModule(bisenet(), num_classes=NUM_CLASSES, class_names=list("abcd"),
                           compile=OmegaConf.create({"mode": "max-autotune", "dynamic": False}))
    seen = {}
    monkeypatch.setattr(m.net, "compile", lambda **kwargs: seen.update(kwargs))
    m.setup("fit")
    assert seen == {"mode": "max-autotune", "dynamic": False}


def test_parameter_groups_give_the_head_its_rate_and_the_named_parameters_no_weight_decay():
    net = DeepLabV2(num_classes=NUM_CLASSES, layers=(1, 1, 1, 1), freeze_bn=False)  # classifier at 10 x lr
    plain = SegmentationModule(net).parameter_groups(0.01)
    assert [g["lr"] for g in plain] == [0.01, 0.1] and all("weight_decay" not in g for g in plain)
    grouped = SegmentationModule(net, no_decay_keys=["bn", "bias"]).parameter_groups(0.01)
    names = {id(p): n for n, p in net.named_parameters()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sorted(id(p) for g in grouped for p in g["params"]) == sorted(id(p) for p in trainable)  # each once
    backbone = {id(p) for p in net.backbone_parameters()}
    for g in grouped:
        free = [("bn" in names[id(p)] or "bias" in names[id(p)]) for p in g["params"]]
        assert all(free) if g.get("weight_decay") == 0.0 else not any(free)
        assert g["lr"] == (0.01 if id(g["params"][0]) in backbone else 0.1)
        assert all((id(p) in backbone) == (g["lr"] == 0.01) for p in g["params"])
    assert any(g.get("weight_decay") == 0.0 for g in grouped) and len(grouped) > len(plain)
    # by default a network's own rule: the MiT networks' norm layers, as mmseg's custom_keys norm decay_mult 0
    from rtda.models.segformer import SegFormer

    segformer = SegFormer(num_classes=NUM_CLASSES)
    names = {id(p): n for n, p in segformer.named_parameters()}
    groups = SegmentationModule(segformer).parameter_groups(1.0)
    free = sorted(names[id(p)] for g in groups if g.get("weight_decay") == 0.0 for p in g["params"])
    assert free == sorted(segformer.no_weight_decay_names()) and free and all("norm" in n for n in free)
    assert [g["lr"] for g in groups] == [1.0, 1.0, 10.0]  # encoder (decayed, norms), head (its BatchNorm decays)
