"""``rtda-eval``: score one checkpoint, or the softmax average of several, on a target split.

    rtda-eval ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt
    rtda-eval ckpt_path=[a.ckpt,b.ckpt,c.ckpt] save_predictions=8        # ensemble, with pictures
    rtda-eval ckpt_path=… data=gta5_to_cityscapes paths.data_dir=/datasets split=val
    rtda-eval ckpt_path=deploy/model_int8.onnx                             # an rtda-export file, by ONNX Runtime
    rtda-eval ckpt_path=… 'data.test=[cityscapes,bdd100k,mapillary]' data.eval_batch_size=1   # several targets

The network is rebuilt from the checkpoint's own resolved config (so the weights always fit), the
data from the run's saved command line plus today's overrides. Scoring is the training test step's:
predict at ``data.eval_size``, upsample the logits to the full-resolution label, one confusion matrix.
An exported ``.onnx`` file is scored by that same test step (:mod:`rtda.pipelines.onnx_model`), its data from the
training run its card records, at the file's own input size.

``data.test`` may name test sets of ``conf/data/test`` instead of holding one: a name (``data.test=bdd100k``, the
same as ``+data/test=bdd100k``) or a list of names, each scored in turn by the same network. A list gives
``results.json`` one row per target under ``targets`` (``{"target", "images", "mIoU", "acc", "mAcc", "IoU", …}``,
the class subsets and per-group scores of each, as a single target's ``test`` holds them) and ``test/mIoU`` their
mean (domain-generalisation papers' "average"); the summary prints them as a table.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from rtda.adaptation.segmenter import segmenter_module
from rtda.analysis.figures import confusion_matrix_figure
from rtda.data.render import colorize, overlay, save_rgb
from rtda.pipelines.onnx_model import card_overrides, is_onnx, onnx_segmenter_module
from rtda.run import config as rtda_config
from rtda.run.checkpoints import load_checkpoint
from rtda.run.errors import CheckpointError, ConfigValueError
from rtda.run.files import atomic_write_text, check_writable
from rtda.run.results import format_summary

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
    keep = [o for o in saved if _key(o) not in mine and not _key(o).startswith(_TRAINING_ONLY)
            and not (mine & _TEST_SET_KEYS and _is_test_set_key(_key(o)))]
    return keep + argv


#: overrides that choose the whole test set: given by the user, they replace the run's own test-set overrides
#: (``+data/test=acdc``, ``data.test.conditions=[fog]``), which would not merge with ``data.test=[a,b]``
_TEST_SET_KEYS = {"data/test", "data.test"}


def _is_test_set_key(key: str) -> bool:
    return key in _TEST_SET_KEYS or key.startswith("data.test.")


def named_test_sets(cfg: DictConfig) -> list[str] | str | None:
    """What ``data.test`` names of ``conf/data/test``: a list of names, one name, or None (a node, or null).
    An unknown name is one error naming the key and the known options."""
    value = cfg.data.get("test")
    if value is None or OmegaConf.is_dict(value):
        return None
    names = [value] if isinstance(value, str) else list(value) if OmegaConf.is_list(value) else None
    options = rtda_config.group_option_files("data/test")
    known = ", ".join(options)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigValueError(f"data.test={OmegaConf.to_container(value) if names else value!r}: expected a test set "
                               f"or a list of them, of {known} (conf/data/test)")
    for name in names:
        if name not in options:
            raise ConfigValueError(f"data.test: unknown test set {name!r}; expected one of {known} (conf/data/test)")
    if len(set(names)) != len(names):
        raise ConfigValueError(f"data.test={names}: a test set is named twice")
    return value if isinstance(value, str) else names


def with_test_set(cfg: DictConfig, name: str) -> DictConfig:
    """A copy of ``cfg`` whose ``data.test`` is the ``conf/data/test/<name>.yaml`` node (its interpolations, e.g.
    ``${paths.data_dir}``, resolved in the copy)."""
    node = OmegaConf.load(rtda_config.group_option_files("data/test")[name])
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.data.test = node
    return out


def _score(cfg: DictConfig, module, output_dir: Path):
    """The test step over the split ``cfg`` chooses: (datamodule, the module's results: ``test``, ``test/mIoU``,
    ``test/confmat``)."""
    data_kwargs = {"test": cfg.data.val} if cfg.split == "val" else {}
    datamodule = hydra.utils.instantiate(cfg.data, **data_kwargs)
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False,
                         enable_checkpointing=False, default_root_dir=output_dir, enable_model_summary=False)
    trainer.test(module, datamodule=datamodule, verbose=False)  # the summary lists the scores
    return datamodule, module.run_results(trainer)


def _pictures(cfg: DictConfig, module, datamodule, confmat, output_dir: Path, suffix: str = "") -> None:
    """The confusion-matrix plot and the first ``save_predictions`` predictions (under ``predictions/<suffix>``)."""
    if cfg.plot_confusion_matrix:
        name = f"confusion_matrix_{suffix}.png" if suffix else "confusion_matrix.png"
        confusion_matrix_figure(torch.tensor(confmat), module.class_names, output_dir / name)
    n = int(cfg.save_predictions or 0)
    if n > 0:
        dataset = datamodule.dataset("test")
        folder = output_dir / "predictions" / suffix if suffix else output_dir / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(n, len(dataset))):
            sample, raw = dataset[i], dataset.load(i)
            size = raw["image"].shape[:2]
            pred = module.predict_logits(module.normalize(sample["image"][None]), size).argmax(dim=1)[0].numpy()
            save_rgb(colorize(pred), folder / f"{sample['name']}_pred.png")
            save_rgb(overlay(raw["image"], pred), folder / f"{sample['name']}_overlay.png")


def evaluate(cfg: DictConfig) -> dict:
    rtda_config.check_values(cfg)
    if cfg.split not in ("val", "test"):
        raise ConfigValueError(f"split={cfg.split!r}: expected val or test")
    named = named_test_sets(cfg)
    if isinstance(named, list) and cfg.split != "test":
        raise ConfigValueError(f"data.test={named} names the test sets to score: it needs split=test, not {cfg.split}")
    output_dir = check_writable(cfg.paths.output_dir, "the evaluation's results")
    onnx = isinstance(cfg.get("ckpt_path"), str) and is_onnx(cfg.ckpt_path)
    paths, module = onnx_segmenter_module(cfg) if onnx else segmenter_module(cfg)
    if isinstance(named, list):
        return _evaluate_targets(cfg, named, paths, module, onnx, output_dir)
    if isinstance(named, str):
        cfg = with_test_set(cfg, named)
    datamodule, scores = _score(cfg, module, output_dir)

    results = {
        "experiment": f"eval split={cfg.split} " + rtda_config.describe(cfg) + _onnx_note(module, onnx),
        "checkpoints": [str(Path(p).resolve()) for p in paths],
        "checkpoint": ", ".join(str(Path(p).resolve()) for p in paths),
        "run_dir": str(output_dir.resolve()),
        "test": scores["test"],
        "test/confmat": scores["test/confmat"],
    }
    results["test/mIoU"] = results["test"]["mIoU"]
    _pictures(cfg, module, datamodule, results["test/confmat"], output_dir)
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
    print(format_summary(results))
    return results


def _onnx_note(module, onnx: bool) -> str:
    return (f" [{module.net.segmenter.card.get('format', 'onnx')} file, ONNX Runtime {module.net.segmenter.provider}]"
            if onnx else "")


def _evaluate_targets(cfg: DictConfig, names: list[str], paths, module, onnx: bool, output_dir: Path) -> dict:
    """One network scored on each test set named in ``data.test``: one row per target."""
    rows = []
    for name in names:
        target_cfg = with_test_set(cfg, name)
        datamodule, scores = _score(target_cfg, module, output_dir)
        rows.append({"target": name, "images": len(datamodule.dataset("test")), **scores["test"],
                     "confmat": scores["test/confmat"]})
        _pictures(target_cfg, module, datamodule, scores["test/confmat"], output_dir, suffix=name)
    mious = [r["mIoU"] for r in rows if r["mIoU"] is not None]
    mean = sum(mious) / len(mious) if mious else None
    results = {
        "experiment": f"eval split=test targets={','.join(names)} " + rtda_config.describe(cfg) + _onnx_note(module, onnx),
        "checkpoints": [str(Path(p).resolve()) for p in paths],
        "checkpoint": ", ".join(str(Path(p).resolve()) for p in paths),
        "run_dir": str(output_dir.resolve()),
        "targets": rows,
        "test/mIoU": mean,  # the mean over the targets (DG papers' "Avg.")
    }
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
    print(format_summary(results))
    return results
