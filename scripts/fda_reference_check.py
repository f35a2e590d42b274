"""FDA against the authors' code on cases the tests do not contain (quoted in the FDA closing note): the
spectrum swap on demo images at 512x1024 for the three betas, the robust entropy on random logits, the
pseudo-label rule and the streamed thresholds against getSudoLabel_multi.py's numpy loop.

    python scripts/fda_reference_check.py     # needs the demo pair (data/demo, written by the first rtda-train)
"""

import glob

import numpy as np
import torch
from PIL import Image

from rtda.adaptation.fda import charbonnier_entropy, fda_source_to_target
from rtda.adaptation.pseudo_labels import StreamingThresholds, fda_pseudo_labels


def authors_fda(src, trg, beta):
    """FDA_source_to_target with the removed torch.rfft/irfft(onesided=False) semantics."""
    fs, ft = torch.view_as_real(torch.fft.fft2(src.double())), torch.view_as_real(torch.fft.fft2(trg.double()))
    amp_s = torch.sqrt(fs[..., 0] ** 2 + fs[..., 1] ** 2)
    pha_s = torch.atan2(fs[..., 1], fs[..., 0])
    amp_t = torch.sqrt(ft[..., 0] ** 2 + ft[..., 1] ** 2)
    h, w = amp_s.shape[-2:]
    b = int(np.floor(min(h, w) * beta))
    a = amp_s.clone()
    for rows in (slice(0, b), slice(h - b, h)):
        for cols in (slice(0, b), slice(w - b, w)):
            a[:, :, rows, cols] = amp_t[:, :, rows, cols]
    spectrum = torch.complex(torch.cos(pha_s) * a, torch.sin(pha_s) * a)
    return torch.fft.irfft2(spectrum[..., : w // 2 + 1], s=(h, w))


def images(pattern):
    paths = sorted(glob.glob(pattern))[:2]
    arrays = [np.array(Image.open(p).convert("RGB").resize((1024, 512))) for p in paths]
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float()


def main() -> None:
    torch.manual_seed(7)
    src, trg = images("data/demo/gta5/images/*.png"), images("data/demo/cityscapes/leftImg8bit/train/*/*.png")
    for beta in (0.01, 0.05, 0.09):
        d = (fda_source_to_target(src, trg, beta).double() - authors_fda(src, trg, beta)).abs().max().item()
        print(f"FDA 2x3x512x1024 beta={beta}: max |rtda - authors| = {d:.2e} (0-255 scale)")

    x = torch.randn(2, 19, 65, 129) * 3  # the authors' DeepLab forward: ent / 2.9444, **2 + 1e-8, ** ita
    p = torch.softmax(x, 1)
    ent = -(p * torch.log_softmax(x, 1)).sum(1) / 2.9444
    ref = ((ent ** 2 + 1e-8) ** 2.0).mean().item()
    ours = charbonnier_entropy(x).item()
    print(f"charbonnier: rtda {ours} authors {ref} rel diff {abs(ours / ref - 1):.2e}")

    probs = torch.softmax(torch.randn(5, 19, 64, 128) * 4, 1)  # getSudoLabel_multi.py's loop in numpy
    pl = probs.numpy().transpose(0, 2, 3, 1)
    label, prob = np.argmax(pl, 3).astype(np.float64), np.max(pl, 3).astype(np.float64)
    thres = []
    for c in range(19):
        values = np.sort(prob[label == c])
        thres.append(values[int(np.round(len(values) * 0.66))] if len(values) else 0)
    thres = np.array(thres)
    thres[thres > 0.9] = 0.9
    for c in range(19):
        label[(prob < thres[c]) * (label == c)] = 255
    differ = int((fda_pseudo_labels(probs).numpy() != label).sum())
    print(f"pseudo-labels: pixels differing from the authors' rule: {differ} of {label.size}")

    conf, lab = probs.max(1)
    stream = StreamingThresholds(19)
    for i in range(5):
        stream.count(conf[i], lab[i])
    stream.locate()
    for i in range(5):
        stream.collect(conf[i], lab[i])
    print("streamed thresholds == authors':", np.array_equal(stream.thresholds().numpy(), thres))


if __name__ == "__main__":
    main()
