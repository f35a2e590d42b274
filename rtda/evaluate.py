"""``rtda-eval``: score one checkpoint, or the softmax average of several, on a target split.

    rtda-eval ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt
    rtda-eval ckpt_path=[a.ckpt,b.ckpt,c.ckpt] save_predictions=8        # ensemble, with pictures
    rtda-eval ckpt_path=… data=gta5_to_cityscapes paths.data_dir=/datasets split=val

The network is rebuilt from the checkpoint's own resolved config (so the weights always fit), the
data from the run's saved command line plus today's overrides. Scoring is the training test step's:
predict at ``data.eval_size``, upsample the logits to the full-resolution label, one confusion matrix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from rtda import config as rtda_config
from rtda.checkpoints import build_net, describe_net, load_checkpoint
from rtda.errors import CheckpointError, ConfigValueError, exit_on_user_error, run_cli
from rtda.io import atomic_write_text, check_writable
from rtda.models.outputs import main_logits
from rtda.results import format_summary, test_summary

#: saved overrides that describe training only, never replayed at evaluation
_TRAINING_ONLY = ("hydra.", "ckpt_path", "debug", "logger", "callbacks", "trainer", "train", "test", "test_ckpt", "seed",
                  "optimizer", "adaptation", "task_name", "tags")


class SoftmaxEnsemble(nn.Module):
    """Averages the class probabilities of several networks (FDA's multi-band transfer ensemble).

    Each member's logits are upsampled to the label's size before the softmax, so an ensemble of
    identical members predicts exactly what one of them does. (FDA's script averages at the network's
    output resolution and upsamples afterwards; our networks already output at the input size.)
    """

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def predict(self, x: torch.Tensor, size=None) -> torch.Tensor:
        total = None
        for net in self.nets:
            logits = main_logits(net(x))
            if size is not None and tuple(logits.shape[-2:]) != tuple(size):
                logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total + probs
        return total / len(self.nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def replay_overrides(argv: list[str]) -> list[str]:
    """The checkpoint run's data-related overrides, then the user's (the user's win)."""
    ckpt_arg = next((a for a in argv if _key(a) == "ckpt_path"), None)
    if ckpt_arg is None:
        return argv
    first = ckpt_arg.split("=", 1)[1].strip("[]").split(",")[0].strip().strip("'\"")
    try:
        saved = load_checkpoint(first)["rtda"].get("overrides", [])
    except (OSError, CheckpointError):  # reported properly once Hydra has composed the config
        return argv
    mine = {_key(a) for a in argv}
    keep = [o for o in saved if _key(o) not in mine and not _key(o).startswith(_TRAINING_ONLY)]
    return keep + argv


def evaluate(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl

    from rtda.adaptation.base import SegmentationModule
    from rtda.viz import colorize, overlay, plot_confusion_matrix, save_rgb

    rtda_config.check_values(cfg)
    if cfg.split not in ("val", "test"):
        raise ConfigValueError(f"split={cfg.split!r}: expected val or test")
    output_dir = check_writable(cfg.paths.output_dir, "the evaluation's results")
    if not cfg.get("ckpt_path"):
        raise ConfigValueError("ckpt_path is required: rtda-eval ckpt_path=<run>/checkpoints/last.ckpt "
                               "(or a list [a.ckpt,b.ckpt] for an ensemble)")
    paths = list(cfg.ckpt_path) if not isinstance(cfg.ckpt_path, str) else [cfg.ckpt_path]
    ckpts = [load_checkpoint(p) for p in paths]
    for path, ckpt in zip(paths, ckpts):
        model_cfg = ckpt["rtda"]["config"]["model"]
        if model_cfg.get("num_classes", cfg.data.num_classes) != cfg.data.num_classes:
            raise CheckpointError(f"{path} holds {describe_net(model_cfg)}, but data={rtda_config.choices().get('data')} "
                                  f"has data.num_classes={cfg.data.num_classes}")
    nets = [build_net(c, p) for c, p in zip(ckpts, paths)]
    net = nets[0] if len(nets) == 1 else SoftmaxEnsemble(nets)
    data_kwargs = {"test": cfg.data.val} if cfg.split == "val" else {}
    datamodule = hydra.utils.instantiate(cfg.data, **data_kwargs)
    channels_last = ckpts[0]["rtda"]["config"].get("adaptation", {}).get("channels_last", True)  # as the run scored
    module = SegmentationModule(net=net, num_classes=cfg.data.num_classes, num_log_images=0, channels_last=channels_last)
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False,
                         enable_checkpointing=False, default_root_dir=output_dir, enable_model_summary=False)
    trainer.test(module, datamodule=datamodule)

    results = {
        "experiment": f"eval split={cfg.split} " + rtda_config.describe(cfg),
        "checkpoints": [str(Path(p).resolve()) for p in paths],
        "checkpoint": ", ".join(str(Path(p).resolve()) for p in paths),
        "run_dir": str(output_dir.resolve()),
        "test": test_summary(trainer.callback_metrics, module.class_names),
        "test/confmat": module.test_results["confmat"],
    }
    results["test/mIoU"] = results["test"]["mIoU"]
    if cfg.plot_confusion_matrix:
        plot_confusion_matrix(torch.tensor(results["test/confmat"]), module.class_names, output_dir / "confusion_matrix.png")
    n = int(cfg.save_predictions or 0)
    if n > 0:
        dataset = datamodule.dataset("test")
        folder = output_dir / "predictions"
        folder.mkdir(exist_ok=True)
        for i in range(min(n, len(dataset))):
            sample, raw = dataset[i], dataset.load(i)
            size = raw["image"].shape[:2]
            pred = module.predict_logits(sample["image"][None], size).argmax(dim=1)[0].numpy()
            save_rgb(colorize(pred), folder / f"{sample['name']}_pred.png")
            save_rgb(overlay(raw["image"], pred), folder / f"{sample['name']}_overlay.png")
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
    print(format_summary(results))
    return results


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="eval")
@exit_on_user_error
@rtda_config.closes_wandb
def _hydra_main(cfg: DictConfig) -> float:
    return evaluate(cfg)["test/mIoU"]


def main() -> None:
    sys.argv = sys.argv[:1] + replay_overrides(sys.argv[1:])
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
