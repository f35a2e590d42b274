"""A method written in the user's own package — one Python file and one YAML passed with ``--config-dir`` —
trains through rtda-train like a built-in one: its named losses logged as train/<name> by the core, its list
hyperparameter saved without ``_convert_``, its checkpoint scored by rtda-eval (which never imports it)."""

import csv
import json
import textwrap

import pytest
import torch
from helpers import ENV, rtda_eval, rtda_train, run_folder, tiny_overrides

METHOD = '''
"""Flip consistency: source cross-entropy + the target prediction agreeing with its mirror image's."""
from rtda.adaptation.segmentation import SegmentationModule
from rtda.models.outputs import main_logits


class FlipConsistency(SegmentationModule):
    uses_target_images = True

    def __init__(self, net, optimizer=None, lambda_flip: float = 0.1, scales=(1.0,), **kwargs):
        super().__init__(net, optimizer, **kwargs)

    def training_step(self, batch, batch_idx):
        source, target = batch["source"], batch["target"]
        loss, parts = self.segmentation_loss(self.net(source["image"]), source["label"])
        p = main_logits(self.forward_target(target["image"])).softmax(1)
        q = main_logits(self.forward_target(target["image"].flip(-1))).softmax(1).flip(-1)
        parts["loss_flip"] = (p - q).abs().mean()
        return {"loss": loss + self.hparams.lambda_flip * parts["loss_flip"], **parts}
'''

CONFIG = """\
# a user's method: the built-in source_only's settings, then its own
defaults:
  - source_only
  - _self_
_target_: flip_method.FlipConsistency
lambda_flip: 0.5
scales: [1.0, 0.5]   # a list: saved as a plain list in the checkpoint, no _convert_ needed
"""


@pytest.mark.slow
def test_a_one_file_method_of_the_users_own_package_trains_and_evaluates(tiny_demo_dir, tmp_path):
    package, configs = tmp_path / "mine", tmp_path / "mine" / "conf"
    (configs / "adaptation").mkdir(parents=True)
    (package / "flip_method.py").write_text(textwrap.dedent(METHOD))
    (configs / "adaptation" / "flip.yaml").write_text(CONFIG)
    env = {**ENV, "PYTHONPATH": f"{package}:{ENV['PYTHONPATH']}"}
    args = ["--config-dir", str(configs), "adaptation=flip", "trainer.max_steps=4", "trainer.val_check_interval=2",
            "data.batch_size=2", "data.num_workers=0", "trainer.log_every_n_steps=1", *tiny_overrides(tiny_demo_dir)]
    proc = rtda_train(args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_folder(proc.stdout)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["choices"]["adaptation"] == "flip"
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["train/loss_flip"]) for r in rows if r.get("train/loss_flip")]
    assert len(logged) == 4 and all(v > 0 for v in logged)  # every iteration, by the core
    assert any(r.get("train/loss_seg") for r in rows) and any(r.get("val/mIoU") for r in rows)

    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["scales"] == [1.0, 0.5] and ckpt["hyper_parameters"]["lambda_flip"] == 0.5

    # rtda-eval takes the segmenter out of the checkpoint without importing the user's method (a new process,
    # without the user's package on its path)
    scored = rtda_eval([f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}", "plot_confusion_matrix=false"], cwd=tmp_path,
                       process=True)
    assert scored.returncode == 0, scored.stderr[-3000:]
    evaluated = json.loads((run_folder(scored.stdout) / "results.json").read_text())
    assert evaluated["test/mIoU"] == results["test/mIoU"]
