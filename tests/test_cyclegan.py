"""CycleGAN: the authors' networks (shapes, parameter counts, initialisation), the image pool, the LR schedule,
and one training iteration stepping generators and discriminators each in their own phase."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from rtda.adaptation.cyclegan import CycleGANModule, ImagePool, linear_decay_lambda
from rtda.adaptation.gan_losses import ls_gan_loss
from rtda.models.cyclegan import PatchDiscriminator, ResnetGenerator, to_uint8, translate_image


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _expected_generator(ngf: int, n_blocks: int, c: int = 3) -> int:
    """The authors' ResnetGenerator with instance norm (every convolution has a bias), counted by hand:
    c7s1-ngf, d2ngf, d4ngf, n_blocks x (two 3x3 4ngf convolutions), u2ngf, ungf (transposed), c7s1-c."""
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    return (conv(c, ngf, 7) + conv(ngf, 2 * ngf, 3) + conv(2 * ngf, 4 * ngf, 3) + n_blocks * 2 * conv(4 * ngf, 4 * ngf, 3)
            + conv(4 * ngf, 2 * ngf, 3) + conv(2 * ngf, ngf, 3) + conv(ngf, c, 7))


def test_parameter_counts_are_the_authors_architecture():
    # resnet_9blocks / resnet_6blocks 3->3 ngf 64 and the 70x70 PatchGAN (basic, ndf 64, n_layers 3), instance norm
    assert _expected_generator(64, 9) == 11_378_179 and _expected_generator(64, 6) == 7_837_699
    assert n_params(ResnetGenerator(3, 3, 64, 9)) == 11_378_179
    assert n_params(ResnetGenerator(3, 3, 64, 6)) == 7_837_699
    assert n_params(ResnetGenerator(3, 3, 32, 6)) == _expected_generator(32, 6)
    # 4x4 convolutions 3->64 (stride 2), 64->128, 128->256 (stride 2), 256->512 (stride 1), 512->1, all with bias
    assert n_params(PatchDiscriminator(3, 64, 3)) == 2_764_737 == (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512) * 16 + 64 + 128 + 256 + 512 + 1


def test_instance_norm_has_no_parameters_or_statistics_and_weights_follow_the_authors_init():
    g = ResnetGenerator(3, 3, 32, 2)
    norms = [m for m in g.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(not m.affine and not m.track_running_stats for m in norms)
    assert not list(g.buffers()) and not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in g.modules())
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in g.modules()) == 2 + 2 * 2
    big = ResnetGenerator(3, 3, 64, 9)
    weights = torch.cat([m.weight.flatten() for m in big.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(weights.std().item() - 0.02) < 2e-4 and abs(weights.mean().item()) < 2e-4
    assert all(float(m.bias.detach().abs().max()) == 0 for m in big.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))


def test_shapes_range_and_the_patchgan_receptive_field():
    g = ResnetGenerator(3, 3, 8, 2)
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and float(y.detach().abs().max()) <= 1.0
    d = PatchDiscriminator(3, 8, 3)
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # the authors' 256x256 -> 30x30 patch scores
    # one score sees exactly a 70x70 input patch (through the convolutions: instance norm, which mixes the
    # whole image's statistics in, is taken out for this check)
    convs = nn.Sequential(*[nn.Identity() if isinstance(m, nn.InstanceNorm2d) else m for m in d.model])
    inp = torch.randn(1, 3, 160, 160, requires_grad=True)
    out = convs(inp)
    out[0, 0, out.shape[-2] // 2, out.shape[-1] // 2].backward()
    rows = inp.grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    cols = inp.grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    assert int(rows[-1] - rows[0] + 1) == 70 and int(cols[-1] - cols[0] + 1) == 70


def test_translate_image_keeps_any_size_and_returns_uint8():
    g = ResnetGenerator(3, 3, 8, 1)
    image = torch.randint(0, 256, (1, 3, 53, 78), dtype=torch.uint8)
    out = translate_image(g, image)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


def test_image_pool_returns_inputs_until_full_then_swaps_half():
    pool = ImagePool(4, generator=torch.Generator().manual_seed(0))
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first) and len(pool) == 4  # filling: the inputs come back as they are
    new = torch.arange(100.0, 200.0).view(100, 1, 1, 1)
    out = pool.query(new).flatten().tolist()
    older = [i for i, v in enumerate(out) if v != 100.0 + i]
    # a draw that is not the new image is an image stored earlier (the first four, or a newer one that replaced one)
    assert all(out[i] in (0.0, 1.0, 2.0, 3.0) or 100.0 <= out[i] < 100.0 + i for i in older)
    assert 35 <= len(older) <= 65 and len(pool) == 4  # about half of the draws swap (p = 0.5)
    assert len(set(out)) == 100  # a stored image is handed out once, then replaced
    again = ImagePool(4, generator=torch.Generator().manual_seed(0))
    again.query(first)
    assert again.query(new).flatten().tolist() == out  # seeded: reproducible
    assert torch.equal(ImagePool(0).query(new), new)


def test_ls_gan_loss_and_the_linear_decay():
    scores = torch.tensor([[0.0, 2.0]])
    assert ls_gan_loss(scores, True).item() == pytest.approx((1 + 1) / 2)
    assert ls_gan_loss(scores, False).item() == pytest.approx((0 + 4) / 2)
    f = linear_decay_lambda(10, 4)
    assert [f(k) for k in range(11)] == pytest.approx([1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])


def _batches(n=2, size=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    src = [{"image": torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g), "label": torch.zeros(size, dtype=torch.long)}
           for _ in range(n)]
    trg = [{"image": torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g)} for _ in range(n)]
    return {"source": DataLoader(src, batch_size=n), "target": DataLoader(trg, batch_size=n)}


def _snapshot(nets):
    return [p.detach().clone() for net in nets for p in net.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_one_iteration_steps_generators_then_discriminators_each_in_its_phase(tmp_path):
    module = CycleGANModule(ngf=4, ndf=4, n_blocks=1, pool_size=2, num_samples=1)
    gens, discs = [module.g_s2t, module.g_t2s], [module.d_s, module.d_t]
    seen = []
    step = module.step_optimizer

    def spy(opt):  # before and after each optimizer step: which networks have gradients, which change
        inner = getattr(opt, "optimizer", opt)
        owned = {id(p) for group in inner.param_groups for p in group["params"]}
        before_g, before_d = _snapshot(gens), _snapshot(discs)
        grads = {name: [p.grad is not None and bool(p.grad.abs().sum() > 0) for n in nets for p in n.parameters()]
                 for name, nets in (("g", gens), ("d", discs))}
        step(opt)
        seen.append({"owns_g": all(id(p) in owned for n in gens for p in n.parameters()),
                     "grads": grads, "g_changed": not _same(before_g, _snapshot(gens)),
                     "d_changed": not _same(before_d, _snapshot(discs))})

    module.step_optimizer = spy
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=_batches())
    assert len(seen) == 2
    g_phase, d_phase = seen
    # (a) generators: they have gradients, the discriminators none (frozen), and only the generators change
    assert g_phase["owns_g"] and any(g_phase["grads"]["g"]) and not any(g_phase["grads"]["d"])
    assert g_phase["g_changed"] and not g_phase["d_changed"]
    # (b) discriminators: gradients, a step that changes them and leaves the generators as (a) left them
    assert not d_phase["owns_g"] and any(d_phase["grads"]["d"]) and d_phase["d_changed"] and not d_phase["g_changed"]
    assert trainer.global_step == 1  # two optimizers, one iteration
    assert len(module.pool_s) == 2 and len(module.pool_t) == 2
    assert list((tmp_path / "samples").glob("translations_step000001.png"))  # the end of the run


def test_images_reach_the_generators_in_minus_one_to_one():
    module = CycleGANModule(ngf=4, ndf=4, n_blocks=0)
    batch = {"source": {"image": torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)},
             "target": {"image": torch.full((1, 3, 1, 2), 255, dtype=torch.uint8)}}
    out = module.on_after_batch_transfer(batch, 0)
    assert out["source"]["image"][0, 0, 0].tolist() == [-1.0, 1.0] and float(out["target"]["image"].min()) == 1.0
    assert not hasattr(module, "net") and not module.trains_segmenter and module.uses_target_images
    assert module.strategy_options == {"find_unused_parameters": True}


@pytest.mark.parametrize("key,value", [("n_blocks", -1), ("ngf", 0), ("decay_iters", 0), ("pool_size", -1)])
def test_bad_settings_name_their_key(key, value):
    from rtda.run.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match=f"adaptation.{key}"):
        CycleGANModule(**{key: value})
