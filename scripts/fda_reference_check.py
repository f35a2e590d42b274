"""FDA against the authors' code on cases the tests do not contain (quoted in the FDA closing note): the
spectrum swap on demo images at 512x1024 for the three betas, the robust entropy on random logits, the
pseudo-label rule and the streamed thresholds against getSudoLabel_multi.py's numpy loop.

    python scripts/fda_reference_check.py     # needs the demo pair (data/demo, written by the first rtda-train)
"""
import glob

import numpy as np
import torch
from PIL import Image
from rtda.adaptation.fda import fda_source_to_target, charbonnier_entropy
from rtda.adaptation.pseudo_labels import fda_pseudo_labels, StreamingThresholds, class_thresholds
torch.manual_seed(7)
# 1. authors' FDA_source_to_target with the removed API's semantics, on real demo images (not in the tests)
def authors(src, trg, L):
    fs = torch.view_as_real(torch.fft.fft2(src.double())); ft = torch.view_as_real(torch.fft.fft2(trg.double()))
    amp_s = torch.sqrt(fs[...,0]**2+fs[...,1]**2); pha_s = torch.atan2(fs[...,1], fs[...,0])
    amp_t = torch.sqrt(ft[...,0]**2+ft[...,1]**2)
    _,_,h,w = amp_s.shape; b = int(np.floor(np.amin((h,w))*L))
    a = amp_s.clone()
    a[:,:,0:b,0:b]=amp_t[:,:,0:b,0:b]; a[:,:,0:b,w-b:w]=amp_t[:,:,0:b,w-b:w]
    a[:,:,h-b:h,0:b]=amp_t[:,:,h-b:h,0:b]; a[:,:,h-b:h,w-b:w]=amp_t[:,:,h-b:h,w-b:w]
    f = torch.complex(torch.cos(pha_s)*a, torch.sin(pha_s)*a)
    return torch.fft.irfft2(f[..., :w//2+1], s=(h,w))
src = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((1024,512)))).permute(2,0,1) for p in sorted(glob.glob("data/demo/gta5/images/*.png"))[:2]]).float()
trg = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((1024,512)))).permute(2,0,1) for p in sorted(glob.glob("data/demo/cityscapes/leftImg8bit/train/*/*.png"))[:2]]).float()
for beta in (0.01, 0.05, 0.09):
    d = (fda_source_to_target(src, trg, beta).double() - authors(src, trg, beta)).abs().max().item()
    print(f"FDA 2x3x512x1024 beta={beta}: max |rtda - authors| = {d:.2e} (0-255 scale)")
# 2. robust entropy: the authors' DeepLab forward (ent / 2.9444, **2 + 1e-8, ** ita)
x = torch.randn(2, 19, 65, 129) * 3
P = torch.softmax(x, 1); ent = -(P*torch.log_softmax(x, 1)).sum(1) / 2.9444; ref = ((ent**2 + 1e-8)**2.0).mean()
print("charbonnier: rtda", charbonnier_entropy(x).item(), "authors", ref.item(), "rel diff", abs(charbonnier_entropy(x).item()/ref.item()-1))
# 3. pseudo-label rule: getSudoLabel_multi.py's loop in numpy
probs = torch.softmax(torch.randn(5, 19, 64, 128) * 4, 1)
pl = probs.numpy().transpose(0, 2, 3, 1); label = np.argmax(pl, 3).astype(np.float64); prob = np.max(pl, 3).astype(np.float64)
thres = []
for i in range(19):
    x_ = prob[label == i]
    if len(x_) == 0: thres.append(0); continue
    x_ = np.sort(x_); thres.append(x_[int(np.round(len(x_) * 0.66))])
thres = np.array(thres); thres[thres > 0.9] = 0.9
for i in range(19): label[(prob < thres[i]) * (label == i)] = 255
ours = fda_pseudo_labels(probs).numpy()
print("pseudo-labels: pixels differing from the authors' rule:", int((ours != label).sum()), "of", label.size)
conf, lab = probs.max(1); st = StreamingThresholds(19)
for i in range(5): st.count(conf[i], lab[i])
st.locate()
for i in range(5): st.collect(conf[i], lab[i])
print("streamed thresholds == authors':", np.array_equal(st.thresholds().numpy(), thres))
