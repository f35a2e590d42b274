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


def load_module(cfg: DictConfig):
    """The checkpoint paths of ``cfg.ckpt_path`` and a SegmentationModule holding their network (or their
    softmax ensemble), each rebuilt from its own checkpoint."""
    from rtda.adaptation.base import SegmentationModule

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
    channels_last = ckpts[0]["rtda"]["config"].get("adaptation", {}).get("channels_last", True)  # as the run scored
    module = SegmentationModule(net=net, num_classes=cfg.data.num_classes, num_log_images=0, channels_last=channels_last)
    return paths, module


def write_pseudo_labels(cfg: DictConfig) -> dict:
    """``rtda-eval ckpt_path=[…] pseudo_labels.out=OUT``: FDA's pseudo-labels of the target training split
    (``data.target``) from the checkpoint(s)' softmax average, as a Cityscapes label tree under OUT, predicted
    at ``data.eval_size`` (:mod:`rtda.adaptation.pseudo_labels`). Written once, atomically; a second call
    with the same inputs reuses it."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from rtda.adaptation.pseudo_labels import manifest_matches, write_pseudo_label_tree
    from rtda.data.cityscapes import Cityscapes
    from rtda.data.transforms import SegmentationTransform
    from rtda.io import build_once

    out = Path(cfg.pseudo_labels.out).expanduser().resolve()
    paths, module = load_module(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    factory = datamodule.factories["target"]
    if factory is None:
        raise ConfigValueError(f"pseudo_labels.out needs a target training set, and data={rtda_config.choices().get('data')} "
                               "has none (data.target is null)")
    datamodule.prepare_data()
    dataset = factory(transform=SegmentationTransform(datamodule.sizes["eval"]), labelled=False, label_root=None)
    if not isinstance(dataset, Cityscapes):
        raise ConfigValueError(f"pseudo_labels.out writes a Cityscapes label tree; data.target is {type(dataset).__name__}")
    manifest = {"checkpoints": [str(Path(p).resolve()) for p in paths], "image_root": str(dataset.root), "split": dataset.split,
                "size": list(datamodule.sizes["eval"] or []), "quantile": cfg.pseudo_labels.quantile, "cap": cfg.pseudo_labels.cap}
    if out.exists() and not manifest_matches(out, manifest):
        raise ConfigValueError(f"pseudo_labels.out={out} already exists and was not written from these checkpoints and "
                               "settings (its pseudo_labels.json differs or is missing): choose another folder or remove it")
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")
    module = module.to(device).eval()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # both passes predict alike
    ensemble = isinstance(module.net, SoftmaxEnsemble)

    def predict(images: torch.Tensor) -> torch.Tensor:
        scores = module.predict_logits(module.normalize(images.to(device)))
        return scores if ensemble else scores.softmax(dim=1)

    loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False, num_workers=datamodule.num_workers)
    summary = {}

    def build(tmp: Path) -> None:
        summary.update(write_pseudo_label_tree(
            predict, loader, dataset.image_paths, dataset.root / "leftImg8bit" / dataset.split, tmp, dataset.split,
            cfg.data.num_classes, cfg.pseudo_labels.quantile, cfg.pseudo_labels.cap,
            progress=lambda it, desc: tqdm(it, desc=desc, total=len(loader))))
        atomic_write_text(tmp / "pseudo_labels.json", json.dumps({**manifest, **summary}, indent=2))

    if not build_once(out, lambda root: manifest_matches(root, manifest), build):
        summary = json.loads((out / "pseudo_labels.json").read_text())
        print(f"pseudo-labels already written from these checkpoints: {out}")
    thresholds = ", ".join(f"{n} {t:.3f}" for n, t in zip(module.class_names, summary["thresholds"]))
    print(f"pseudo-labels of {len(dataset)} target images ({dataset.split}) in {out}\n"
          f"kept {100 * summary['kept_share']:.1f}% of the pixels; thresholds: {thresholds}")
    quality = score_pseudo_labels(factory, out, module.class_names) if cfg.pseudo_labels.score else None
    if quality is not None:
        print(f"against the split's own labels (a diagnostic; training never reads them): {100 * quality['accuracy']:.1f}% "
              f"of the kept pixels correct, mIoU {100 * quality['mIoU']:.2f} on them, "
              f"{100 * quality['coverage']:.1f}% of the labelled pixels kept")
        summary["quality"] = quality
        atomic_write_text(out / "pseudo_labels.json", json.dumps({**manifest, **summary}, indent=2))
    print(f"train on them: rtda-train adaptation=fda_ssl data.target.label_root={out}")
    return {"test/mIoU": float("nan"), "pseudo_labels": str(out), **summary}


def score_pseudo_labels(factory, out: Path, class_names: list[str]) -> dict | None:
    """The pseudo-labels against the split's ground truth where it has one (the demo's and Cityscapes' train
    splits do): accuracy and mIoU over the kept pixels, and the share of labelled pixels kept. None without
    ground truth."""
    from rtda.data.base import DatasetFormatError
    from rtda.metrics import SegmentationMetrics

    try:
        truth = factory(transform=None, labelled=True, label_root=None, check=False)
        pseudo = factory(transform=None, labelled=True, label_root=out, check=False)
    except DatasetFormatError:
        return None
    metrics = SegmentationMetrics(len(class_names))
    kept = labelled = 0
    for i in range(len(truth)):
        gt = torch.from_numpy(truth.load(i)["label"]).long()
        pl = torch.from_numpy(pseudo.load(i)["label"]).long()
        valid = gt != 255
        labelled += int(valid.sum())
        kept += int((valid & (pl != 255)).sum())
        metrics.update(pl[None], torch.where(pl == 255, torch.full_like(gt, 255), gt)[None])
    result = metrics.compute()
    return {"accuracy": result["acc"], "mIoU": result["mIoU"], "coverage": kept / max(labelled, 1),
            "IoU": {n: (None if v != v else v) for n, v in zip(class_names, result["IoU"].tolist())}}


def evaluate(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl

    from rtda.viz import colorize, overlay, plot_confusion_matrix, save_rgb

    rtda_config.check_values(cfg)
    if cfg.get("pseudo_labels") and cfg.pseudo_labels.get("out"):
        return write_pseudo_labels(cfg)
    if cfg.split not in ("val", "test"):
        raise ConfigValueError(f"split={cfg.split!r}: expected val or test")
    output_dir = check_writable(cfg.paths.output_dir, "the evaluation's results")
    paths, module = load_module(cfg)
    data_kwargs = {"test": cfg.data.val} if cfg.split == "val" else {}
    datamodule = hydra.utils.instantiate(cfg.data, **data_kwargs)
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
            pred = module.predict_logits(module.normalize(sample["image"][None]), size).argmax(dim=1)[0].numpy()
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
