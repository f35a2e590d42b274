"""``rtda-translate``: write a translated copy of the source dataset in the GTA5 format — the second stage of
a two-stage adaptation (translate once, train every network and method on the copy).

    rtda-translate method=cyclegan ckpt_path=<run>/checkpoints/last.ckpt out=data/gta5_cyclegan
    rtda-translate method=fda beta=0.01 out=data/gta5_fda                 # random target styles, seeded
    rtda-train experiment=gta5_source_only data.source.root=data/gta5_cyclegan

The source is ``data.source`` (a GTA5-format tree: ``ROOT/images``, ``ROOT/labels``) of the ``data`` config
(``demo`` by default; with ``method=cyclegan`` and no ``data=`` given, the translator run's own data choice and
``data.*`` / ``paths.*`` overrides are replayed from its checkpoint). ``OUT/images/<name>.png`` holds each
translated image (PNG whatever the source's format), ``OUT/labels/<name>.png`` a byte-identical copy of its
label (and the source's split lists ``ROOT/*.txt`` are copied too): ``data.source.root=OUT`` reads it as it
read the source.

- **Resolution**: each image is translated at its own size (``size=[H,W]`` resizes it first, bilinear as the training transform; its
  label is still copied as it is, and the GTA5 reader resizes labels to their image). The CycleGAN generator
  is fully convolutional: sides that are not multiples of 4 are reflect-padded and cropped back.
- **cyclegan**: the source → target generator (``g_s2t``) of an ``adaptation=cyclegan`` checkpoint, in
  float32 on ``device`` (auto: CUDA when available).
- **fda**: FDA's spectrum swap (:func:`rtda.adaptation.fda.fda_source_to_target`) with β = ``beta`` against a
  random image of the target training split (``data.target``): image ``i`` takes the style of target
  ``rng([seed, i])`` — the same pairs whatever the order or the number of workers. FDA needs two images of one
  size: the target image is resized (bilinear) to the source image's size before the swap. The result is
  rounded and clipped to 0–255 to be written (training clips nothing; PNG must).
- **Resumable**: an image whose translation and label already exist is skipped; every file is written to a
  temporary name and renamed, so an interrupted run leaves no half-written file (stale temporary files are
  removed by the next run). ``OUT/translation.json`` records the method and its settings; a second run with
  other settings into the same folder is refused.
- **Multi-process**: ``num_workers`` DataLoader processes read (and, for FDA, translate) the images; a thread
  pool writes them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rtda.adaptation.cyclegan import load_generator
from rtda.adaptation.spectrum import fda_source_to_target
from rtda.data.base import read_rgb
from rtda.data.render import resize_image
from rtda.models.cyclegan import translate_image
from rtda.run.checkpoints import load_checkpoint
from rtda.run.errors import CheckpointError, ConfigValueError
from rtda.run.files import atomic_write_text, check_writable

METHODS = ("cyclegan", "fda")
MANIFEST = "translation.json"
#: the settings that make two translations the same (a resumed run must match them)
_IDENTITY = ("method", "source_root", "ckpt_path", "beta", "seed", "size")


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    return Path(tmp)


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """An H×W×3 uint8 image as a PNG that readers see whole or not at all (temporary file, then rename)."""
    tmp = _tmp_path(path)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    """A byte-identical copy that appears whole or not at all."""
    tmp = _tmp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> int:
    stale = [p for p in folder.glob(".*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


class _Pending(Dataset):
    """The source images still to translate: each item is ``{"index", "stem", "image"}`` (3×H×W uint8), the
    image already translated by FDA when ``fda`` is given (CPU work in the loader's processes)."""

    def __init__(self, items: list[tuple[int, Path]], size, fda: dict | None = None):
        self.items, self.size, self.fda = items, size, fda

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        index, path = self.items[k]
        image = read_rgb(path)
        if self.size is not None:
            image = resize_image(image, self.size)
        if self.fda is not None:
            styles = self.fda["styles"]
            style_path = styles[int(np.random.default_rng([self.fda["seed"], index]).integers(len(styles)))]
            style = resize_image(read_rgb(style_path), image.shape[:2])  # FDA swaps spectra of equal sizes
            src = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
            trg = torch.from_numpy(np.ascontiguousarray(style.transpose(2, 0, 1)))[None].float()
            out = fda_source_to_target(src, trg, self.fda["beta"])[0]
            image = out.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return {"index": index, "stem": path.stem, "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))}


def _first(batch: list):
    return batch[0]


def _dataset(node: DictConfig):
    """A dataset from its data-config node (a factory with ``_partial_: true`` there: called without transform)."""
    made = hydra.utils.instantiate(node)
    return made() if isinstance(made, functools.partial) else made


def check_settings(cfg: DictConfig) -> dict:
    """The run's settings, checked; a wrong value is one error naming its key."""
    method = cfg.get("method")
    if method not in METHODS:
        raise ConfigValueError(f"method={method!r}: expected one of {', '.join(METHODS)} "
                               "(rtda-translate method=cyclegan ckpt_path=<ckpt> out=<folder> | method=fda beta=0.01 out=<folder>)")
    if not cfg.get("out"):
        raise ConfigValueError("out is required: the folder to write the translated GTA5-format copy into")
    size = cfg.get("size")
    if size is not None:
        size = list(size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise ConfigValueError(f"size={size}: expected [height, width] in pixels, or null (each image's own size)")
    beta, ckpt = None, None
    if method == "fda":
        beta = cfg.get("beta")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
            raise ConfigValueError(f"beta={beta!r}: expected a fraction in [0, 1] (FDA's authors use 0.01, 0.05, 0.09)")
        beta = float(beta)
    else:
        if not cfg.get("ckpt_path"):
            raise ConfigValueError("ckpt_path is required with method=cyclegan: the translator's checkpoint "
                                   "(rtda-train adaptation=cyclegan … writes <run>/checkpoints/last.ckpt)")
        ckpt = str(Path(cfg.ckpt_path).resolve())
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigValueError(f"seed={seed!r}: expected an integer")
    workers = cfg.get("num_workers")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigValueError(f"num_workers={workers!r}: expected an integer >= 0")
    return {"method": method, "ckpt_path": ckpt, "beta": beta, "seed": seed if method == "fda" else None, "size": size}


def pick_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigValueError(f"device={name!r}: expected auto, cpu, cuda or cuda:N ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigValueError(f"device={name}: no CUDA device is available here (use device=cpu)")
    return device


def open_manifest(out: Path, settings: dict) -> dict:
    """The folder's record: created for a new translation, checked against ``settings`` for a resumed one."""
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ConfigValueError(f"out={out}: {path} is not readable JSON; delete it or choose another out") from None
        differ = [k for k in _IDENTITY if old.get(k) != settings.get(k)]
        if differ:
            what = ", ".join(f"{k}={old.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
            raise ConfigValueError(f"out={out} already holds another translation ({what}); choose another out or delete it")
        return old
    def empty(p: Path) -> bool:  # what this command creates before its record: the two empty folders
        return p.name in ("images", "labels") and p.is_dir() and not any(p.iterdir())

    if out.is_dir() and not all(empty(p) for p in out.iterdir()):
        raise ConfigValueError(f"out={out} is not empty and holds no {MANIFEST}: it was not written by rtda-translate; "
                               "choose an empty or new folder")
    record = {**settings, "status": "incomplete"}
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def translate(cfg: DictConfig) -> dict:
    """Translate every source image not yet in ``out``; returns the folder's record."""
    from tqdm.auto import tqdm

    settings = check_settings(cfg)
    out = Path(cfg.out)
    device = pick_device(cfg.get("device", "auto"))
    generator = load_generator(settings["ckpt_path"], device) if settings["method"] == "cyclegan" else None
    source_node = cfg.data.get("source")
    if source_node is None or not source_node.get("root"):
        raise ConfigValueError("data.source.root is not set: rtda-translate translates a GTA5-format source (ROOT/images, ROOT/labels)")
    settings["source_root"] = str(Path(source_node.root).resolve())
    if Path(settings["source_root"]) == out.resolve():
        raise ConfigValueError(f"out={out} is the source dataset itself; choose another folder")
    check_writable(out, "the translated dataset")
    record = open_manifest(out, settings)  # refuses another translation's folder before any work
    for sub in ("images", "labels"):
        check_writable(out / sub, "the translated dataset")
    if cfg.data.get("prepare") is not None:  # the built-in demo: generated on first use
        hydra.utils.instantiate(cfg.data.prepare)()
    source = _dataset(source_node)  # the GTA5 reader: the file list, headers checked
    if getattr(source, "label_paths", None) is None:
        raise ConfigValueError("data.source must be a labelled GTA5-format dataset (ROOT/images, ROOT/labels)")
    removed = sum(remove_stale_temporaries(out / sub) for sub in ("images", "labels"))

    fda = None
    if settings["method"] == "fda":
        if cfg.data.get("target") is None:
            raise ConfigValueError("method=fda needs target images for the styles: data.target is not configured")
        target = _dataset(cfg.data.target)
        fda = {"styles": list(target.image_paths), "beta": settings["beta"], "seed": settings["seed"]}
        record["style_root"] = str(Path(target.root).resolve())

    for listing in sorted(Path(source.root).glob("*.txt")):  # the split lists the GTA5 reader may read
        if not (out / listing.name).is_file():
            copy_atomic(listing, out / listing.name)
    labels = dict(zip((p.stem for p in source.image_paths), source.label_paths))
    pending, done = [], 0
    for index, image_path in enumerate(source.image_paths):
        if (out / "images" / f"{image_path.stem}.png").is_file() and (out / "labels" / f"{image_path.stem}.png").is_file():
            done += 1
        else:
            pending.append((index, image_path))
    print(f"rtda-translate: {settings['method']} of {len(source.image_paths)} images from {source.root} into {out}: "
          f"{done} already there, {len(pending)} to translate" + (f" ({removed} half-written files removed)" if removed else ""),
          flush=True)

    loader = DataLoader(_Pending(pending, settings["size"], fda), batch_size=1, shuffle=False, collate_fn=_first,
                        num_workers=cfg.num_workers if pending else 0)
    with ThreadPoolExecutor(max_workers=2) as writers, tqdm(total=len(source.image_paths), initial=done,
                                                            desc=f"rtda-translate {settings['method']}", unit="img") as bar:
        futures = []

        def write(stem: str, image: np.ndarray) -> None:
            write_png_atomic(out / "images" / f"{stem}.png", image)
            copy_atomic(labels[stem], out / "labels" / f"{stem}.png")  # after its image: a label means a pair

        for item in loader:
            image = item["image"]
            if generator is not None:
                image = translate_image(generator, image[None].to(device))[0].cpu()
            futures.append(writers.submit(write, item["stem"], image.permute(1, 2, 0).numpy()))
            while futures and (futures[0].done() or len(futures) > 8):  # at most 8 images wait for a writer
                futures.pop(0).result()  # an error in a writer stops the run here
                bar.update(1)
        for f in futures:
            f.result()
            bar.update(1)
    record.update({"status": "complete", "num_images": len(source.image_paths)})
    atomic_write_text(out / MANIFEST, json.dumps(record, indent=2))
    print(f"rtda-translate: {len(source.image_paths)} images in {out} ({len(pending)} written now); train on them with "
          f"data.source.root={out}", flush=True)
    return record


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def replay_data_overrides(argv: list[str]) -> list[str]:
    """With ``method=cyclegan ckpt_path=…`` and no ``data=``: the translator run's data choice and its
    ``data.*`` / ``paths.*`` overrides first (the user's own arguments win)."""
    given = {_key(a): a.split("=", 1)[1] if "=" in a else "" for a in argv}
    if given.get("method") != "cyclegan" or not given.get("ckpt_path") or "data" in given:
        return argv
    try:
        saved = load_checkpoint(given["ckpt_path"])["rtda"]
    except (OSError, CheckpointError):  # reported properly once the config is composed
        return argv
    replay = [f"data={saved['choices']['data']}"] if saved.get("choices", {}).get("data") else []
    replay += [o for o in saved.get("overrides", []) if _key(o).startswith(("data.", "paths.")) and _key(o) not in given]
    return replay + argv
