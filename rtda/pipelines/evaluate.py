"""``rtda-eval``: score one checkpoint, or the softmax average of several, on a target split.

    rtda-eval ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt
    rtda-eval ckpt_path=[a.ckpt,b.ckpt,c.ckpt] save_predictions=8        # ensemble, with pictures
    rtda-eval ckpt_path=… data=gta5_to_cityscapes paths.data_dir=/datasets split=val
    rtda-eval ckpt_path=deploy/model_int8.onnx                             # an rtda-export file, by ONNX Runtime

The network is rebuilt from the checkpoint's own resolved config (so the weights always fit), the
data from the run's saved command line plus today's overrides. Scoring is the training test step's:
predict at ``data.eval_size``, upsample the logits to the full-resolution label, one confusion matrix.
An exported ``.onnx`` file is scored by that same test step (:mod:`rtda.pipelines.onnx_model`), its data from the
training run its card records, at the file's own input size.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from rtda.adaptation.segmenter import segmenter_module
from rtda.analysis.figures import confusion_matrix_figure
from rtda.data.render import colorize, overlay, save_rgb
from rtda.pipelines.onnx_model import card_overrides, is_onnx, onnx_segmenter_module
from rtda.run import config as rtda_config
from rtda.run.checkpoints import load_checkpoint
from rtda.run.errors import CheckpointError, ConfigValueError
from rtda.run.files import atomic_write_text, check_writable
from rtda.run.results import format_summary, test_scores

#: saved overrides that describe training only, never replayed at evaluation
_TRAINING_ONLY = ("hydra.", "ckpt_path", "debug", "logger", "callbacks", "trainer", "train", "test", "test_ckpt", "seed",
                  "optimizer", "adaptation", "task_name", "tags")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def replay_overrides(argv: list[str]) -> list[str]:
    """The checkpoint run's data-related overrides, then the user's (the user's win)."""
    ckpt_arg = next((a for a in argv if _key(a) == "ckpt_path"), None)
    if ckpt_arg is None:
        return argv
    first = ckpt_arg.split("=", 1)[1].strip("[]").split(",")[0].strip().strip("'\"")
    try:
        saved = card_overrides(first) if is_onnx(first) else load_checkpoint(first)["rtda"].get("overrides", [])
    except (OSError, CheckpointError):  # reported properly once Hydra has composed the config
        return argv
    mine = {_key(a) for a in argv}
    keep = [o for o in saved if _key(o) not in mine and not _key(o).startswith(_TRAINING_ONLY)]
    return keep + argv


def evaluate(cfg: DictConfig) -> dict:
    rtda_config.check_values(cfg)
    if cfg.split not in ("val", "test"):
        raise ConfigValueError(f"split={cfg.split!r}: expected val or test")
    output_dir = check_writable(cfg.paths.output_dir, "the evaluation's results")
    onnx = isinstance(cfg.get("ckpt_path"), str) and is_onnx(cfg.ckpt_path)
    paths, module = onnx_segmenter_module(cfg) if onnx else segmenter_module(cfg)
    data_kwargs = {"test": cfg.data.val} if cfg.split == "val" else {}
    datamodule = hydra.utils.instantiate(cfg.data, **data_kwargs)
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False,
                         enable_checkpointing=False, default_root_dir=output_dir, enable_model_summary=False)
    trainer.test(module, datamodule=datamodule, verbose=False)  # the summary lists the scores

    results = {
        "experiment": f"eval split={cfg.split} " + rtda_config.describe(cfg) + (
            f" [{module.net.segmenter.card.get('format', 'onnx')} file, ONNX Runtime {module.net.segmenter.provider}]"
            if onnx else ""),
        "checkpoints": [str(Path(p).resolve()) for p in paths],
        "checkpoint": ", ".join(str(Path(p).resolve()) for p in paths),
        "run_dir": str(output_dir.resolve()),
        "test": test_scores(trainer.callback_metrics, module.class_names),
        "test/confmat": module.test_results["confmat"],
    }
    results["test/mIoU"] = results["test"]["mIoU"]
    if cfg.plot_confusion_matrix:
        confusion_matrix_figure(torch.tensor(results["test/confmat"]), module.class_names, output_dir / "confusion_matrix.png")
    n = int(cfg.save_predictions or 0)
    if n > 0:
        dataset = datamodule.dataset("test")
        folder = output_dir / "predictions"
        folder.mkdir(exist_ok=True)
        for i in range(min(n, len(dataset))):
            sample, raw = dataset[i], dataset.load(i)
            size = raw["image"].shape[:2]
            pred = module.predict_logits(module.normalize(sample["image"][None]), size).argmax(dim=1)[0].numpy()
            save_rgb(colorize(pred), folder / f"{sample['name']}_pred.png")
            save_rgb(overlay(raw["image"], pred), folder / f"{sample['name']}_overlay.png")
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
    print(format_summary(results))
    return results
