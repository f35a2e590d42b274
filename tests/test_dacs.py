"""DACS / MIC / DAFormer's recipe: ClassMix, the EMA teacher, pseudo-label weights, the strong augmentation, MIC's
masks, the feature distance, rare-class sampling, LR warm-up, and the method through the console script (one run,
and a 2-process DDP run whose teachers must stay identical)."""

import json
import math

import pytest
import torch
from helpers import rtda_train, run_folder, tiny_overrides
from torch import nn

from rtda.adaptation.base import poly_lambda
from rtda.adaptation.dacs import DACSModule
from rtda.adaptation.features import downscale_label_ratio, masked_feature_distance
from rtda.adaptation.mixing import (
    block_mask,
    blur_kernel_size,
    class_mix_masks,
    gaussian_blur,
    mix,
    strong_augment,
)
from rtda.adaptation.pseudo_labels import dacs_pseudo_labels
from rtda.adaptation.teacher import EMATeacher, ema_alpha
from rtda.data.datamodule import RareClassSampler, rare_class_probabilities
from rtda.models.bisenet import BiSeNet
from rtda.models.losses import pixel_cross_entropy
from rtda.run.errors import ConfigValueError

TINY = ["trainer.max_steps=3", "trainer.val_check_interval=3", "data.batch_size=2", "data.num_workers=0",
        "data.source_size=[72,128]", "data.target_size=[64,128]", "trainer.log_every_n_steps=1"]


# -- ClassMix -------------------------------------------------------------------------------------------------
def test_class_mix_pastes_half_of_the_source_classes_consistently():
    # a crafted pair: the source label holds classes 0, 3, 5 and ignore (4 values -> 2 drawn), the target is flat
    label = torch.full((1, 8, 8), 255)
    label[0, :4, :4], label[0, :4, 4:], label[0, 4:, :4] = 0, 3, 5
    src_img = torch.arange(3 * 64, dtype=torch.float32).view(1, 3, 8, 8)
    trg_img = torch.full((1, 3, 8, 8), -1.0)
    pseudo = torch.full((1, 8, 8), 7)
    for seed in range(20):
        mask = class_mix_masks(label, torch.Generator().manual_seed(seed))
        chosen = set(label[mask].unique().tolist())
        assert len(chosen) == 2 and chosen <= {0, 3, 5, 255}
        assert torch.equal(mask, torch.isin(label, torch.tensor(sorted(chosen))))  # whole classes, nothing else
        img, lab = mix(mask, src_img, trg_img), mix(mask, label, pseudo)
        assert torch.equal(img[mask[:, None].expand_as(img)], src_img[mask[:, None].expand_as(img)])
        assert (img[~mask[:, None].expand_as(img)] == -1).all()
        assert torch.equal(lab[mask], label[mask]) and (lab[~mask] == 7).all()
    # odd counts round up: 3 classes -> 2
    odd = torch.tensor([[[1, 1, 2, 2], [3, 3, 3, 3]]])
    assert len(odd[class_mix_masks(odd)].unique()) == 2
    # every class is drawn sometime
    seen = set()
    for seed in range(50):
        seen |= set(label[class_mix_masks(label, torch.Generator().manual_seed(seed))].unique().tolist())
    assert seen == {0, 3, 5, 255}


def test_class_mix_from_the_batch_pool_draws_half_of_the_batchs_classes_for_each_image():
    # DAFormer/MIC's get_class_masks: two labels with disjoint classes {0..3} and {4..7}; each image gets 4 of the 8
    labels = torch.stack([torch.arange(4).repeat_interleave(4).view(4, 4), 4 + torch.arange(4).repeat_interleave(4).view(4, 4)])
    pasted, empty = set(), 0
    for seed in range(200):
        masks = class_mix_masks(labels, torch.Generator().manual_seed(seed), pool="batch")
        for i in range(2):
            own = len(labels[i][masks[i]].unique())
            pasted.add(own)
            empty += own == 0
        for i in range(2):  # whole classes of the image's own label
            assert torch.equal(masks[i], torch.isin(labels[i], labels[i][masks[i]].unique()))
    assert pasted == {0, 1, 2, 3, 4}  # none to all of the image's own classes (the image pool: always 2)
    assert 0 < empty < 40  # an empty mask 1/70 of the time per image: C(4,4)/C(8,4)
    for seed in range(20):
        masks = class_mix_masks(labels, torch.Generator().manual_seed(seed), pool="image")
        assert [len(labels[i][masks[i]].unique()) for i in range(2)] == [2, 2]


# -- the EMA teacher ------------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_ema_update_formula():
    assert ema_alpha(1, 0.99) == 0.0 and ema_alpha(2, 0.99) == 0.5 and ema_alpha(10, 0.99) == pytest.approx(0.9)
    # DAFormer's _update_ema(local_iter): min(1 - 1/(L+1), alpha) -- the initial weights keep 1/(L+1)
    assert ema_alpha(1, 0.999, "daformer") == 0.5 and ema_alpha(10, 0.999, "daformer") == pytest.approx(10 / 11)
    assert ema_alpha(5000, 0.999, "daformer") == 0.999
    student = _Tiny()
    initial = {n: t.clone() for n, t in student.state_dict().items()}
    teacher = EMATeacher(student, alpha=0.999, schedule="daformer")
    with torch.no_grad():
        student.conv.weight.add_(1.0)
    assert teacher.update(student, 1) == 0.5
    torch.testing.assert_close(teacher.net.conv.weight, initial["conv.weight"] + 0.5)
    assert ema_alpha(100, 0.99) == pytest.approx(0.99) and ema_alpha(10_000, 0.99) == 0.99
    torch.manual_seed(0)
    student = _Tiny()
    teacher = EMATeacher(student, alpha=0.99)
    history = []
    for k in range(1, 6):
        before = {n: t.clone() for n, t in teacher.net.state_dict().items()}
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student.train()(torch.randn(4, 3, 5, 5))  # moves the running statistics
        a = teacher.update(student, k)
        assert a == ema_alpha(k, 0.99)
        for name, value in teacher.net.state_dict().items():
            s = student.state_dict()[name]
            if value.is_floating_point():
                torch.testing.assert_close(value, a * before[name] + (1 - a) * s, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(value, s)
        history.append({n: p.clone() for n, p in student.named_parameters()})
    # while 1 - 1/k < alpha, the teacher is the plain average of the students so far
    for name, value in teacher.net.named_parameters():
        torch.testing.assert_close(value, torch.stack([h[name] for h in history]).mean(0), rtol=1e-5, atol=1e-5)


def test_teacher_never_trains_nor_receives_gradients():
    torch.manual_seed(0)
    net = BiSeNet(num_classes=19)
    module = DACSModule(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.01), num_mix_samples=0,
                        masking=True, mask_block_size=8)
    module.train()
    assert not module.teacher.training and not module.teacher.net.training
    assert all(not p.requires_grad for p in module.teacher.parameters())
    group_ids = {id(p) for g in module.parameter_groups(0.01) for p in g["params"]}
    assert not group_ids & {id(p) for p in module.teacher.parameters()}
    raw_s = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    raw_t = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    label = torch.randint(0, 19, (2, 64, 96))
    batch = {"source": {"image": raw_s, "label": label}, "target": {"image": raw_t}}
    batch = module.normalize_images(module.transform_training_batch(batch))
    before = {n: t.clone() for n, t in module.teacher.state_dict().items()}
    losses = module.training_step(batch, 0)
    assert {"loss", "loss_src", "loss_mix", "loss_masked", "pseudo_confident_share"} <= set(losses)
    losses["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None for p in module.net.parameters())
    # the teacher's forward (target-batch statistics) leaves its running statistics and counters alone
    for name, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


# -- pseudo-label weights ---------------------------------------------------------------------------------------
def test_pseudo_label_weighting_on_a_crafted_softmax():
    probs = torch.zeros(2, 3, 2, 2)
    # image 0: confidences 0.99, 0.97 (>= 0.968), 0.9, 0.5 ; image 1: all 0.98 except one 0.6
    conf = torch.tensor([[[0.99, 0.97], [0.9, 0.5]], [[0.98, 0.98], [0.98, 0.6]]])
    cls = torch.tensor([[[0, 1], [2, 0]], [[1, 1], [2, 2]]])
    for c in range(3):
        probs[:, c] = torch.where(cls == c, conf, (1 - conf) / 2)
    labels, weights = dacs_pseudo_labels(probs)
    assert torch.equal(labels, cls)
    assert torch.allclose(weights, torch.full((2, 2, 2), 5 / 8))  # 5 of the batch's 8 pixels are confident
    _, pixel = dacs_pseudo_labels(probs, weighting="pixel")
    assert torch.equal(pixel, (conf >= 0.968).float())
    _, none = dacs_pseudo_labels(probs, weighting="none")
    assert (none == 1).all()
    with pytest.raises(ConfigValueError, match="adaptation.weighting"):
        dacs_pseudo_labels(probs, weighting="soft")
    # the weighted loss: mean over all pixels of CE x weight, ignored pixels counted as 0
    logits = torch.randn(1, 3, 2, 2)
    label = torch.tensor([[[0, 1], [255, 2]]])
    w = torch.tensor([[[1.0, 0.5], [1.0, 0.25]]])
    ce = torch.nn.functional.cross_entropy(logits, label, ignore_index=255, reduction="none")
    assert pixel_cross_entropy(logits, label, w) == pytest.approx(float((ce * w).sum() / 4))


# -- strong augmentation, MIC masks, feature distance ----------------------------------------------------------
def test_strong_augmentation_and_mic_masks():
    images = torch.randint(0, 256, (3, 3, 40, 60), dtype=torch.uint8)
    out = strong_augment(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255
    assert blur_kernel_size(512) == 51 and blur_kernel_size(128) == 13 and blur_kernel_size(256) == 25
    same = strong_augment(images, jitter_strength=0.0, blur=False)
    torch.testing.assert_close(same, images.float())
    # the blur's sigma: one per image (DACS, DAFormer) or one for the batch (MIC's masked branch); a seed that blurs
    copies = images[:1].expand(3, -1, -1, -1)
    seed = next(s for s in range(50) if float(torch.rand(1, generator=torch.Generator().manual_seed(s))) > 0.5)
    per_image = strong_augment(copies, 0.0, blur=True, generator=torch.Generator().manual_seed(seed))
    per_batch = strong_augment(copies, 0.0, blur=True, generator=torch.Generator().manual_seed(seed), blur_sigma="batch")
    assert not torch.equal(per_image, copies.float()) and not torch.equal(per_image[0], per_image[1])
    assert torch.equal(per_batch[0], per_batch[1]) and torch.equal(per_batch[1], per_batch[2])
    mask = block_mask((4, 3, 128, 256), 32, 0.7, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (4, 1, 128, 256) and set(mask.unique().tolist()) <= {0.0, 1.0}
    blocks = mask[:, 0, ::32, ::32]
    assert torch.equal(mask[:, 0], blocks.repeat_interleave(32, 1).repeat_interleave(32, 2))  # whole 32-px blocks
    big = block_mask((64, 1, 128, 256), 32, 0.7, generator=torch.Generator().manual_seed(1))
    assert abs(1 - big.mean().item() - 0.7) < 0.03  # 70 % masked


def test_separable_blur_equals_torchvisions_2d_kernel():
    from torchvision.transforms.v2 import functional as TF

    images = torch.rand(2, 3, 40, 72) * 255
    sigma = [0.15, 1.1]
    ky, kx = blur_kernel_size(40), blur_kernel_size(72)
    assert (ky, kx) == (3, 7)
    reference = torch.cat([TF.gaussian_blur(images[i:i + 1], kernel_size=[kx, ky], sigma=[s, s]) for i, s in enumerate(sigma)])
    blurred = gaussian_blur(images, sigma)
    torch.testing.assert_close(blurred, reference, atol=1e-3, rtol=1e-5)
    assert not torch.allclose(blurred[1], images[1], atol=1.0)  # sigma 1.1 does blur


def test_feature_distance_pieces():
    label = torch.full((1, 8, 8), 255)
    label[0, :4, :4] = 13                 # car: a whole cell
    label[0, :4, 4:] = 0                  # road
    label[0, 4:, :4] = 11                 # person on 3/4 of the cell ...
    label[0, 4:, :1] = 0                  # ... and road on 1/4
    pooled = downscale_label_ratio(label, (2, 2), 0.75, 19)
    assert pooled.tolist() == [[[13, 0], [11, 255]]]
    assert downscale_label_ratio(label, (2, 2), 0.8, 19).tolist() == [[[13, 0], [255, 255]]]
    f1, f2 = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    f1[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 at the car cell
    f1[0, :, 0, 1] = torch.tensor([6.0, 8.0])  # 10 at the road cell
    things = torch.isin(pooled, torch.tensor([11, 13]))
    assert masked_feature_distance(f1, f2, things).item() == pytest.approx(2.5)  # (5 + 0) / 2
    assert masked_feature_distance(f1, f2, None).item() == pytest.approx(15 / 4)
    assert masked_feature_distance(f1, f2, torch.zeros_like(things)).item() == 0.0


def test_feature_distance_runs_and_trains_only_the_student():
    torch.manual_seed(0)
    module = DACSModule(BiSeNet(num_classes=19), optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
                        fdist_lambda=0.005, num_mix_samples=0, lambda_mix=0.0)
    module.train()
    assert not module.imnet.training and all(not p.requires_grad for p in module.imnet.parameters())
    raw = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    label = torch.full((2, 64, 96), 13)
    batch = module.normalize_images(module.transform_training_batch(
        {"source": {"image": raw, "label": label}, "target": {"image": raw.clone()}}))
    module.net.eval()  # both normalising with the same (initial) running statistics: the student is its frozen copy
    losses = module.training_step(batch, 0)
    assert losses["loss_fdist"].item() == pytest.approx(0.0, abs=1e-6)
    module.train()
    with torch.no_grad():
        for p in module.net.context_path.layer4.parameters():
            p.add_(0.1)
    losses = module.training_step(batch, 0)
    assert losses["loss_fdist"].item() > 0
    losses["loss"].backward()
    assert all(p.grad is None for p in module.imnet.parameters())


# -- rare-class sampling -------------------------------------------------------------------------------------------
def test_rare_class_sampling_follows_the_temperature_softmax():
    # 6 images, 4 classes: class 0 everywhere (frequent), 1 and 2 rarer, 3 in one image below min_pixels only
    counts = torch.tensor([[9000, 0, 0, 0], [9000, 4000, 0, 0], [9000, 0, 3500, 0], [9000, 3100, 3100, 0],
                           [9000, 0, 0, 100], [8000, 0, 0, 0]], dtype=torch.float64)
    for temperature in (0.01, 0.05):
        sampler = RareClassSampler(counts, temperature=temperature, min_pixels=3000, seed=0)
        freq = counts.sum(0) / counts.sum()
        expected = torch.softmax((1 - freq[:3]) / temperature, dim=0)  # class 3 has no image above min_pixels
        torch.testing.assert_close(sampler.probs, expected.double())
        torch.testing.assert_close(rare_class_probabilities(freq[:3], temperature), expected.double())
        classes, images = sampler.draw(40000, torch.Generator().manual_seed(1))
        empirical = torch.bincount(classes, minlength=4).double() / 40000
        assert empirical[3] == 0
        torch.testing.assert_close(empirical[:3], expected.double(), atol=0.01, rtol=0)
        assert (counts[images, classes] > 3000).all()  # every drawn image holds its class
    low_t = RareClassSampler(counts, temperature=0.01, min_pixels=3000)
    assert low_t.probs.argmax() != 0  # the most frequent class is the least drawn
    # reproducible per epoch, different across epochs
    a, b = RareClassSampler(counts, seed=3), RareClassSampler(counts, seed=3)
    first = list(a)
    assert first == list(b) and len(first) == 6
    with pytest.raises(ConfigValueError, match="rcs_temperature"):
        RareClassSampler(counts, temperature=0)


def test_warmup_then_poly():
    f = poly_lambda(1000, power=1.0, warmup_iters=100, warmup_ratio=1e-6)
    assert f(0) == pytest.approx(1e-6)
    assert f(50) == pytest.approx((1 - 50 / 1000) * (1 - 0.5 * (1 - 1e-6)))
    assert f(100) == pytest.approx(0.9) and f(500) == pytest.approx(0.5)
    assert poly_lambda(1000, 0.9)(100) == pytest.approx(0.9 ** 0.9)  # off by default


def test_bad_values_name_their_key():
    net = BiSeNet(num_classes=19)
    for kwargs, key in [({"ema_alpha": 1.0}, "adaptation.ema_alpha"), ({"teacher_bn": "eval"}, "adaptation.teacher_bn"),
                        ({"weighting": "x"}, "adaptation.weighting"), ({"masking": True, "mask_ratio": 1.5}, "adaptation.mask_ratio"),
                        ({"warmup_iters": -1}, "adaptation.warmup_iters"),
                        ({"classmix_classes": "all"}, "adaptation.classmix_classes"),
                        ({"ema_schedule": "mic"}, "adaptation.ema_schedule"),
                        ({"mask_blur_sigma": "pixel"}, "adaptation.mask_blur_sigma")]:
        with pytest.raises(ConfigValueError, match=key):
            DACSModule(net, **kwargs)


# -- through the console script -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_mic_with_rare_class_sampling_end_to_end_and_fdist_refused_from_random_init(tiny_demo_dir, tmp_path):
    proc = rtda_train(["adaptation=mic", "adaptation.mask_block_size=16", "data.rare_class_sampling=true",
                       "data.rcs_min_pixels=50", "adaptation.warmup_iters=2", *TINY, *tiny_overrides(tiny_demo_dir)],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_folder(proc.stdout)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and math.isfinite(results["test/mIoU"])
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert any(k.startswith("teacher.net.") for k in keys) and any(k.startswith("net.") for k in keys)
    assert (folder / "dacs_samples.png").is_file()
    header = (folder / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_src", "train/loss_mix", "train/loss_masked", "train/ema_alpha"} <= set(header)
    assert (tiny_demo_dir / "demo" / "gta5" / "class_stats_all.json").is_file()  # the cached class statistics

    refused = rtda_train(["adaptation=dacs", "adaptation.fdist_lambda=0.005", *TINY, *tiny_overrides(tiny_demo_dir)],
                         cwd=tmp_path)
    assert refused.returncode == 1 and "rtda: error: adaptation.fdist_lambda" in refused.stderr


@pytest.mark.slow
def test_ddp_two_processes_keep_the_teacher_identical(tiny_demo_dir, tmp_path):
    proc = rtda_train(["trainer=ddp_cpu", "trainer.strategy=ddp", "adaptation=dacs", "callbacks=none", *TINY,
                       "trainer.max_steps=4", *tiny_overrides(tiny_demo_dir)], cwd=tmp_path, process=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_folder(proc.stdout)
    check = json.loads((folder / "ema_teacher_check.json").read_text())
    assert check["world_size"] == 2 and check["updates"] == 3
    assert len(set(check["teacher_sha1"])) == 1
