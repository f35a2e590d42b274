"""``rtda-eval ckpt_path=[…] pseudo_labels.out=DIR``: FDA's pseudo-labels of the target training split written
as a Cityscapes label tree (``DIR/gtFine/train/CITY/…_gtFine_labelTrainIds.png`` at each image's full
resolution) + ``pseudo_labels.json`` (thresholds, kept share, and — when the split has ground truth — the
pseudo-labels' accuracy, mIoU and coverage). The rule itself (per-class confidence quantiles, capped) is
:mod:`rtda.adaptation.pseudo_labels`; the writing happens here."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rtda.adaptation.pseudo_labels import StreamingThresholds
from rtda.adaptation.segmenter import SoftmaxEnsemble, segmenter_module
from rtda.data.cityscapes import Cityscapes
from rtda.data.labels import IGNORE_INDEX
from rtda.data.transforms import SegmentationTransform
from rtda.metrics import SegmentationMetrics
from rtda.run import config as rtda_config
from rtda.run.errors import ConfigValueError, DatasetFormatError, RtdaError
from rtda.run.files import atomic_write_text, build_once

Prediction = Callable[[torch.Tensor], torch.Tensor]  # normalised N×3×H×W images -> N×C×H×W softmax


def write_pseudo_label_tree(predict: Prediction, loader: Iterable[dict], image_paths: Sequence[Path], image_root: Path,
                            out: Path, split: str, num_classes: int, quantile: float = 0.66, cap: float = 0.9,
                            progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it) -> dict:
    """Label every image of ``loader`` (in ``image_paths`` order, no shuffling) into ``out`` as a Cityscapes
    label tree; returns the manifest (thresholds, class pixel counts, rejected share). ``out`` is written as is:
    the caller makes it atomic (:func:`rtda.run.files.build_once`)."""
    stream = StreamingThresholds(num_classes, quantile, cap)

    def predictions(desc: str):
        for batch in progress(loader, desc):
            with torch.no_grad():
                probs = predict(batch["image"])
            confidence, label = probs.float().max(dim=1)
            yield confidence, label

    for confidence, label in predictions("pseudo-labels 1/2: class confidences"):
        stream.count(confidence, label)
    stream.locate()
    held: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # image -> undecided pixels
    provisional = out / ".provisional"
    provisional.mkdir(parents=True, exist_ok=True)
    index, kept, total = 0, 0, 0
    for confidence, label in predictions("pseudo-labels 2/2: writing"):
        undecided = stream.undecided(confidence, label)
        stream.collect(confidence, label, undecided)
        labels = stream.decided(confidence, label)
        for i in range(label.shape[0]):
            if undecided[i].any():
                where = undecided[i].flatten().nonzero().flatten()
                held[index] = (where.cpu(), confidence[i].flatten()[where].cpu(), label[i].flatten()[where].cpu())
                Image.fromarray(labels[i].byte().cpu().numpy()).save(provisional / f"{index}.png")
            else:
                kept += _save_label(labels[i], image_paths[index], image_root, out, split)
            total += labels[i].numel()
            index += 1
    if index != len(image_paths):
        raise RtdaError(f"pseudo-labels: {index} predictions for {len(image_paths)} images")
    thresholds = stream.thresholds()
    for i, (where, conf, cls) in held.items():
        path = provisional / f"{i}.png"
        labels = torch.from_numpy(np.array(Image.open(path))).long()
        flat = labels.flatten()
        flat[where[conf.double() < thresholds[cls]]] = IGNORE_INDEX
        kept += _save_label(flat.view_as(labels), image_paths[i], image_root, out, split)
        path.unlink()
    provisional.rmdir()
    counts = stream.counts
    return {"thresholds": thresholds.tolist(), "pixels_per_class": counts.tolist(), "num_images": len(image_paths),
            "kept_share": kept / max(total, 1)}


def _save_label(label: torch.Tensor, image_path: Path, image_root: Path, out: Path, split: str) -> int:
    """Write one label at its image's own resolution (nearest) under ``out/gtFine/split/CITY/``; returns the
    number of pixels kept (at the resolution the label was computed)."""
    kept = int((label != IGNORE_INDEX).sum())
    with Image.open(image_path) as img:
        width, height = img.size
    if tuple(label.shape) != (height, width):
        label = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest")[0, 0]
    relative = image_path.relative_to(image_root)
    name = relative.name.removesuffix("_leftImg8bit.png") + "_gtFine_labelTrainIds.png"
    target = out / "gtFine" / split / relative.parent / name
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.byte().cpu().numpy()).save(target)  # uint8 HxW: mode L
    return kept


def manifest_matches(out: Path, manifest: dict) -> bool:
    """True when ``out`` holds a complete tree written with the same inputs (``manifest`` minus results)."""
    path = out / "pseudo_labels.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    return all(saved.get(k) == v for k, v in manifest.items())


def write_pseudo_labels(cfg: DictConfig) -> dict:
    """``rtda-eval ckpt_path=[…] pseudo_labels.out=OUT``: FDA's pseudo-labels of the target training split
    (``data.target``) from the checkpoint(s)' softmax average, as a Cityscapes label tree under OUT, predicted
    at ``data.eval_size`` (the rule: :func:`rtda.adaptation.pseudo_labels.fda_pseudo_labels`). Written once, atomically; a second call
    with the same inputs reuses it."""
    out = Path(cfg.pseudo_labels.out).expanduser().resolve()
    paths, module = segmenter_module(cfg)
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
