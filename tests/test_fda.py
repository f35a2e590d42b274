"""FDA: the spectrum swap, the robust entropy, the pseudo-label rule (in memory and streamed), the label tree,
and the method through the console scripts (train with three betas' pipeline steps, label, self-train)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ENV, rtda_eval, rtda_train, run_folder, tiny_overrides
from PIL import Image

from rtda.adaptation.fda import charbonnier_entropy, fda_source_to_target  # the contract's import paths
from rtda.adaptation.pseudo_labels import (
    StreamingThresholds,
    class_thresholds,
    fda_pseudo_labels,
    quantile_position,
)
from rtda.adaptation.spectrum import fda_window, match_size
from rtda.pipelines.pseudo_labels import write_pseudo_label_tree


def _images(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * 255


def _authors_fda(src, trg, beta):
    """The authors' training function step by step with the removed API's semantics: the full spectrum
    (``rfft(onesided=False)``), amplitude/phase by ``atan2``, the four b×b corners mutated, cos/sin recomposed,
    and ``irfft(onesided=False)``, which reads the first W//2+1 columns."""
    fft_src, fft_trg = torch.fft.fft2(src.double()), torch.fft.fft2(trg.double())
    amp_src, pha_src = fft_src.abs(), torch.atan2(fft_src.imag, fft_src.real)
    amp_trg = fft_trg.abs()
    h, w = src.shape[-2:]
    b = int(np.floor(min(h, w) * beta))
    amp = amp_src.clone()
    for rows in (slice(0, b), slice(h - b, h)):
        for cols in (slice(0, b), slice(w - b, w)):
            amp[..., rows, cols] = amp_trg[..., rows, cols]
    spectrum = torch.complex(torch.cos(pha_src) * amp, torch.sin(pha_src) * amp)
    return torch.fft.irfft2(spectrum[..., : w // 2 + 1], s=(h, w)).float()


def test_zero_window_is_the_identity():
    src, trg = _images((2, 3, 20, 30), 0), _images((2, 3, 20, 30), 1)
    assert fda_window(20, 30, 0.049) == 0
    torch.testing.assert_close(fda_source_to_target(src, trg, 0.049), src, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 32, 64), (1, 3, 37, 51), (3, 1, 40, 33)])
@pytest.mark.parametrize("beta", [0.05, 0.09, 0.2])
def test_swap_takes_target_amplitude_inside_the_window_and_source_elsewhere(shape, beta):
    src, trg = _images(shape, 2), _images(shape, 3)
    out = fda_source_to_target(src, trg, beta)
    h, w = shape[-2:]
    b = fda_window(h, w, beta)
    assert b >= 1 and out.shape == src.shape and out.dtype == torch.float32
    f_out, f_src, f_trg = (torch.fft.rfft2(x.double()) for x in (out, src, trg))
    inside = torch.zeros(f_out.shape[-2:], dtype=torch.bool)
    inside[:b, :b] = inside[h - b:, :b] = True
    # column 0 of a real image's spectrum is Hermitian: row H-b is in the window, its conjugate partner row b
    # is not, and the inverse (the authors' as this one) keeps their average -- the one pair that is neither
    mixed = torch.zeros_like(inside)
    mixed[h - b, 0] = mixed[b, 0] = True
    torch.testing.assert_close(f_out.abs()[..., inside & ~mixed], f_trg.abs()[..., inside & ~mixed], rtol=1e-4, atol=0.05)
    torch.testing.assert_close(f_out.abs()[..., ~inside & ~mixed], f_src.abs()[..., ~inside & ~mixed], rtol=1e-4, atol=0.05)
    # phase preserved everywhere the amplitude is not negligible
    strong = (f_src.abs() > 1.0) & (f_out.abs() > 1.0)
    dphase = torch.angle(f_out[strong] * f_src[strong].conj())
    assert dphase.abs().max() < 1e-3
    # the target's mean colour (the DC term) is what the stylised source now has
    torch.testing.assert_close(out.double().mean(dim=(-2, -1)), trg.double().mean(dim=(-2, -1)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape,beta", [((2, 3, 48, 96), 0.05), ((1, 3, 45, 77), 0.1)])
def test_equals_the_authors_full_spectrum_formulation(shape, beta):
    src, trg = _images(shape, 4), _images(shape, 5)
    torch.testing.assert_close(fda_source_to_target(src, trg, beta), _authors_fda(src, trg, beta), atol=2e-3, rtol=0)


def test_swap_rejects_mismatched_batches_and_bad_beta():
    with pytest.raises(ValueError, match="one shape"):
        fda_source_to_target(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9), 0.1)
    with pytest.raises(ValueError, match="beta=1.5"):
        fda_source_to_target(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 1.5)


def test_match_size_crops_jointly_or_resizes():
    image = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    label = image[:, 0].long()
    crop, crop_label = match_size(image, label, (6, 8))
    assert crop.shape == (2, 3, 6, 8) and torch.equal(crop[:, 0].long(), crop_label)  # same window for both
    small, small_label = match_size(image[..., :4, :], label[..., :4, :], (6, 8))
    assert small.shape == (2, 3, 6, 8) and small_label.shape == (2, 6, 8) and small_label.dtype == torch.long


def test_charbonnier_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).T.reshape(1, 2, 1, 2)  # p = (1/4, 3/4) and (1/2, 1/2)
    ent1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    ent2 = 1.0
    expected = ((ent1 ** 2 + 1e-8) ** 2.0 + (ent2 ** 2 + 1e-8) ** 2.0) / 2
    assert charbonnier_entropy(logits).item() == pytest.approx(expected, rel=1e-6)
    assert charbonnier_entropy(logits, eta=0.5).item() == pytest.approx(((ent1 ** 2 + 1e-8) ** 0.5 + 1.0) / 2, rel=1e-6)
    confident = torch.tensor([20.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert charbonnier_entropy(confident).item() < 1e-9


def _probs_from(conf_label):
    """A 1×C×1×N softmax whose argmax and max are the given (confidence, class) pairs over 3 classes."""
    probs = torch.zeros(1, 3, 1, len(conf_label))
    for i, (p, c) in enumerate(conf_label):
        probs[0, :, 0, i] = (1 - p) / 2
        probs[0, c, 0, i] = p
    return probs


def test_pseudo_label_rule_on_a_crafted_softmax():
    # class 0: n=5, position round(3.3)=3 -> 0.95, capped at 0.9; class 1: one pixel (position round(0.66)=1
    # is past the end: the script would fail; the largest is taken) ; class 2: ties at the threshold are kept
    pairs = [(0.5, 0), (0.6, 0), (0.7, 0), (0.95, 0), (0.99, 0), (0.45, 1), (0.5, 2), (0.6, 2), (0.6, 2), (0.6, 2)]
    labels = fda_pseudo_labels(_probs_from(pairs))[0, 0].tolist()
    assert labels == [255, 255, 255, 0, 0, 1, 255, 2, 2, 2]
    conf, label = _probs_from(pairs).max(dim=1)
    thresholds = class_thresholds(conf, label, 4)
    assert thresholds[0] == pytest.approx(0.9) and thresholds[1] == pytest.approx(0.45)
    assert thresholds[2] == pytest.approx(0.6) and thresholds[3] == 0  # absent class: nothing to reject
    assert quantile_position(25, 0.66) == 16  # np.round(16.5) = 16: half to even, as the script
    assert fda_pseudo_labels(_probs_from(pairs), cap=0.55)[0, 0].tolist()[:5] == [255, 0, 0, 0, 0]


def _random_softmax(n, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * torch.rand(n, 1, h, w, generator=g) * 6
    logits[:, 0] += 8 * (torch.rand(n, 1, h, w, generator=g)[:, 0] > 0.5)  # a class saturating near 1 (capped)
    probs = logits.softmax(dim=1)
    probs[0, :, :2, :2] = torch.tensor([0.7, 0.1, 0.1, 0.1, 0][:c]).view(c, 1, 1) / 1.0  # exact ties
    return probs


def test_streaming_thresholds_equal_the_in_memory_ones():
    probs = _random_softmax(6, 5, 9, 13, seed=0)
    conf, label = probs.max(dim=1)
    st = StreamingThresholds(5)
    for i in range(0, 6, 2):
        st.count(conf[i:i + 2], label[i:i + 2])
    st.locate()
    for i in range(0, 6, 2):
        st.collect(conf[i:i + 2], label[i:i + 2])
    torch.testing.assert_close(st.thresholds(), class_thresholds(conf, label, 5), rtol=0, atol=0)
    assert st.counts.sum() == conf.numel()


def _tree(root, split, names, size=(16, 32), seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        city = name.split("_")[0]
        folder = root / "leftImg8bit" / split / city
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_leftImg8bit.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_written_tree_equals_the_in_memory_rule_and_reads_back(tmp_path):
    from rtda.data.cityscapes import Cityscapes

    names = [f"aachen_000000_{i:06d}" for i in range(5)] + [f"bremen_000000_{i:06d}" for i in range(4)]
    paths = _tree(tmp_path / "cs", "train", names)
    probs = _random_softmax(len(names), 4, 8, 16, seed=1)  # predicted at half the images' resolution
    loader = [{"image": torch.arange(i, min(i + 4, len(names)))} for i in range(0, len(names), 4)]
    out = tmp_path / "pseudo"
    summary = write_pseudo_label_tree(lambda idx: probs[idx], loader, paths, tmp_path / "cs" / "leftImg8bit" / "train",
                                      out, "train", num_classes=4)
    expected = F.interpolate(fda_pseudo_labels(probs)[:, None].float(), size=(16, 32), mode="nearest")[:, 0].byte()
    assert not (out / ".provisional").exists()
    ds = Cityscapes(tmp_path / "cs", "train", labelled=False, label_root=out)
    assert len(ds) == len(names)
    for i in range(len(names)):
        np.testing.assert_array_equal(ds.load(i)["label"], expected[i].numpy())
    kept = (fda_pseudo_labels(probs) != 255).float().mean().item()
    assert summary["kept_share"] == pytest.approx(kept) and 0 < kept < 1
    # a missing label in the tree is reported by name
    next((out / "gtFine" / "train" / "bremen").glob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="have no label"):
        Cityscapes(tmp_path / "cs", "train", labelled=False, label_root=out)


FDA_TINY = ["trainer.max_steps=3", "trainer.val_check_interval=3", "data.batch_size=2", "data.num_workers=0",
            "data.source_size=[72,128]", "data.target_size=[64,128]", "trainer.log_every_n_steps=1"]


def _env():
    return dict(ENV)


@pytest.mark.slow
def test_fda_pipeline_through_the_console_scripts(tiny_demo_dir, tmp_path):
    """train FDA (entropy on from iteration 2) -> pseudo-labels of an ensemble -> self-training on them."""
    proc = rtda_train(["adaptation=fda", "adaptation.beta=0.05", "adaptation.switch_to_entropy=1", *FDA_TINY,
                       *tiny_overrides(tiny_demo_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_folder(proc.stdout)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and math.isfinite(results["test/mIoU"])
    samples = np.asarray(Image.open(folder / "fda_samples.png"))
    assert samples.shape == (2 * 64, 3 * 128, 3)  # source (cropped to the target's size) | target | stylised
    rows = [line.split(",") for line in (folder / "csv" / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("train/loss_ent_trg")
    assert [r[col] for r in rows[1:] if r[col]] and rows[1][col] == ""  # logged once switched on, not before

    ckpt = folder / "checkpoints" / "last.ckpt"
    out = tmp_path / "pseudo"
    cmd = [f"ckpt_path=[{ckpt},{ckpt}]", f"pseudo_labels.out={out}"]
    ev = rtda_eval(cmd, tmp_path, env=_env())
    assert ev.returncode == 0, ev.stderr[-3000:]
    manifest = json.loads((out / "pseudo_labels.json").read_text())
    assert manifest["image_root"].endswith("cityscapes") and manifest["num_images"] == 8 and len(manifest["thresholds"]) == 19 and manifest["size"] == [64, 128]
    written = sorted(out.glob("gtFine/train/*/*_gtFine_labelTrainIds.png"))
    assert len(written) == 8
    kept = np.concatenate([np.asarray(Image.open(f)).ravel() for f in written]) != 255
    # the kept share is that of the files it wrote (a 3-iteration net may keep every pixel: shares up to 1)
    assert manifest["kept_share"] == pytest.approx(kept.mean(), abs=1e-6) and kept.any()
    assert 0 < manifest["quality"]["coverage"] <= 1 and 0 <= manifest["quality"]["accuracy"] <= 1  # the demo has train labels
    again = rtda_eval(cmd, tmp_path, env=_env())
    assert again.returncode == 0 and "already written" in again.stdout
    other = rtda_eval([f"ckpt_path={ckpt}", f"pseudo_labels.out={out}"], tmp_path, env=_env())
    assert other.returncode == 1 and "already exists and was not written from these checkpoints" in other.stderr

    ssl = rtda_train(["adaptation=fda_ssl", f"data.target.label_root={out}", *FDA_TINY, *tiny_overrides(tiny_demo_dir)],
                     cwd=tmp_path)
    assert ssl.returncode == 0, ssl.stderr[-3000:]
    header = (run_folder(ssl.stdout) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_seg", "train/loss_seg_trg", "train/loss_ent_trg"} <= set(header)
    missing = rtda_train(["adaptation=fda_ssl", *FDA_TINY, *tiny_overrides(tiny_demo_dir)], cwd=tmp_path)
    assert missing.returncode == 1 and "data.target.label_root" in missing.stderr
