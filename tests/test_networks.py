"""Every network beyond BiSeNet and DeepLabV2 (the real-time ones and the transformers) under every method that trains a segmenter: the module a run builds (the network's
YAML, the method's config), fitted by Lightning for two iterations on synthetic batches (``rtda-bench
bench.mode=train``'s rows: uint8 images and labels, the target where the method reads it, its labels for
``fda_ssl``). The network's own loss terms (OHEM, boundary, detail) are what every method applies to it;
everything stays finite and every trained network's weights move. CycleGAN trains no segmenter (its second stage
is ``source_only`` on the translated copy)."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rtda.bench.training import MethodRow
from rtda.run.config import CONFIG_DIR

METHODS = ["source_only", "adversarial", "minent", "advent", "fda", "fda_ssl", "dacs", "mic"]
#: the loss terms each network brings beside cross-entropy on its main output
OWN_TERMS = {"stdc1": {"loss_seg", "loss_aux/context16", "loss_aux/context32", "loss_detail/bce",
                       "loss_detail/dice"},
             "stdc2": {"loss_seg", "loss_aux/context16", "loss_aux/context32", "loss_detail/bce",
                       "loss_detail/dice"},
             "pidnet_s": {"loss_seg", "loss_aux/p", "loss_boundary", "loss_bas"},
             "ddrnet23_slim": {"loss_seg", "loss_aux/high_res"},
             # mmseg's cross-entropy (mean over all pixels), the MiT networks' only term
             "segformer_b0": {"loss_seg"}, "segformer_b1": {"loss_seg"}, "daformer_mitb5": {"loss_seg"}}
#: overrides that keep a network small here: DAFormer's head on the MiT-B0 encoder (its MiT-B5 is the same blocks,
#: deeper and wider: 85 M parameters, ~20 s a case; tests/test_mit.py checks B5 against the official code)
SMALL = {"daformer_mitb5": ["model.variant=b0"]}


def _row(network: str, method: str, root) -> MethodRow:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=[f"model={network}", f"adaptation={method}", "bench.height=32", "bench.width=64",
                                          "bench.train_batch_size=2", *SMALL.get(network, [])])
    return MethodRow(method, cfg, torch.device("cpu"), "fp32", str(root))


#: each network with source-only and DACS in the quick suite; the other methods in the slow one
CASES = [pytest.param(network, method, marks=() if method in ("source_only", "dacs") else pytest.mark.slow)
         for network in OWN_TERMS for method in METHODS]


@pytest.mark.parametrize("network, method", CASES)
def test_every_method_trains_every_network_with_its_own_losses(network, method, tmp_path):
    row = _row(network, method, tmp_path)
    net = row.module.net
    seen: list[set[str]] = []
    own = net.loss_terms

    def recorded(*args, **kwargs):
        terms = own(*args, **kwargs)
        seen.append(set(terms))
        assert all(torch.isfinite(value).all() for value, _ in terms.values()), (network, method, terms)
        return terms

    net.loss_terms = recorded  # the instance's: what rtda.models.losses.loss_terms calls
    graded: set[str] = set()
    for name, p in net.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda grad, name=name: graded.add(name))
    before = {k: v.detach().clone() for k, v in row.module.named_parameters()}
    row._fit(2, [])
    assert seen and all(names == OWN_TERMS[network] for names in seen), (network, method, seen)
    after = dict(row.module.named_parameters())
    assert all(torch.isfinite(v).all() for v in after.values())
    # every trainable tensor of the segmenter is in a loss (a head built and never used has no gradient: DDP refuses it)
    unused = [n for n, p in net.named_parameters() if p.requires_grad and n not in graded]
    assert not unused, f"{network} under {method}: {unused[:5]}"
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    owners = {k.split(".")[0] for k in before if not k.startswith("teacher.")}  # the EMA teacher follows, unstepped
    assert moved >= owners, f"{network} under {method}: no step for {owners - moved}"
