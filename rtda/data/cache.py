"""A one-off copy of the training sets at their training resolution: the same formats, about 2x fewer pixels to
decode, no resize per sample.

    python -m rtda.data.cache data/cache                                    # data=gta5_to_cityscapes
    python -m rtda.data.cache /fast/cache data=gta5_to_cityscapes paths.data_dir=/datasets --workers 8
    rtda-train ... data.source.root=/fast/cache/gta5 data.target.root=/fast/cache/cityscapes

A GTA5 image is a 1914x1052 PNG: decoding it takes ~50 ms on one core, and the training pipeline then
resizes it to 1280x720 (``data.source_size``), for every sample of every epoch (BENCHMARKS.md §7). This
writes each training image (the source set and the target's train split) resized once, with the very
transform training applies (albumentations ``Resize``: bilinear image, nearest-neighbour label), as a
fast-to-decode PNG (zlib level 1) in the dataset's own layout; labels keep their encoding (GTA5's indexed
palette PNGs or colour PNGs, Cityscapes' label-id PNGs). Reading the copy at the same ``data.*_size``
gives the same samples, pixel for pixel (tested), so augmentation and methods are unchanged. Validation
and test sets are not copied: scoring stays at the labels' full resolution (``data.val.root`` unchanged).

Written once and atomically (:func:`rtda.run.files.build_once`): a ``cache.json`` stamp names the sources and
sizes; the same command again reuses the copy, another size or source rebuilds it. Rare-class sampling
counts class pixels in the labels it reads: on the copy, scale ``data.rcs_min_pixels`` by the area ratio
(the command prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from rtda.data.datamodule import DomainAdaptationDataModule
from rtda.run import config as rtda_config
from rtda.run.errors import RtdaError, run_cli  # noqa: E402
from rtda.run.files import build_once

CACHE_VERSION = 1


def resize_pair(image: np.ndarray, label: np.ndarray | None, size) -> tuple[np.ndarray, np.ndarray | None]:
    """Exactly the resize of :class:`rtda.data.transforms.SegmentationTransform` (albumentations ``Resize``)."""
    import albumentations as A

    resize = A.Resize(int(size[0]), int(size[1]))
    if label is None:
        return resize(image=image)["image"], None
    out = resize(image=image, mask=label)
    return out["image"], out["mask"]


def _copy_one(job: tuple) -> None:
    """Resize and write one image (and its label, in the label file's own mode and palette) as PNG."""
    image_path, image_out, label_path, label_out, size, allow_resize = job
    try:
        with Image.open(image_path) as img:
            image = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        label, mode, palette = None, None, None
        if label_path is not None:
            with Image.open(label_path) as lab:
                mode, palette = lab.mode, lab.getpalette() if lab.mode == "P" else None
                if lab.size != (image.shape[1], image.shape[0]):
                    if not allow_resize:
                        raise ValueError(f"label {label_path} is {lab.size[0]}x{lab.size[1]}, its image is "
                                         f"{image.shape[1]}x{image.shape[0]}")
                    lab = lab.resize((image.shape[1], image.shape[0]), Image.NEAREST)  # as the reader does first
                label = np.asarray(lab)
    except (OSError, SyntaxError, ValueError) as err:  # one line naming the file, from a worker process too
        raise RtdaError(f"cannot cache {image_path}: {err}") from None
    image, label = resize_pair(image, label, size)
    Path(image_out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_out, format="PNG", compress_level=1)  # lossless whatever the name says
    if label is not None:
        out = Image.fromarray(label, mode=mode if mode in ("P", "L") else None)
        if palette is not None:
            out.putpalette(palette)
        Path(label_out).parent.mkdir(parents=True, exist_ok=True)
        out.save(label_out, format="PNG", compress_level=1)


def _jobs(dataset, out_root: Path, size) -> list[tuple]:
    """(image, image copy, label, label copy, size) for every sample, mirroring the paths under the roots."""
    root = Path(dataset.root)
    label_root = Path(getattr(dataset, "label_root", root))
    labels = dataset.label_paths or [None] * len(dataset.image_paths)
    allow_resize = bool(getattr(dataset, "allow_resize", False))
    return [(str(im), str(out_root / Path(im).relative_to(root)), None if lb is None else str(lb),
             None if lb is None else str(out_root / Path(lb).relative_to(label_root)), tuple(size), allow_resize)
            for im, lb in zip(dataset.image_paths, labels)]


def cache_dataset(dataset, out_root: str | Path, size, workers: int = 1) -> bool:
    """Write the resized copy of ``dataset`` (a GTA5 or Cityscapes reader) under ``out_root``; True when built
    now, False when an identical copy was there."""
    out_root = Path(out_root)
    label_root = getattr(dataset, "label_root", None)
    stamp = {"version": CACHE_VERSION, "source": str(Path(dataset.root).resolve()), "size": list(size),
             "files": len(dataset.image_paths), "labels": dataset.label_paths is not None,
             "label_root": str(Path(label_root).resolve()) if label_root is not None else None,
             "split": getattr(dataset, "split", None)}

    def is_complete(folder: Path) -> bool:
        try:
            return json.loads((folder / "cache.json").read_text()) == stamp
        except (OSError, json.JSONDecodeError):
            return False

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        jobs = _jobs(dataset, tmp, size)
        for extra in Path(dataset.root).glob("*.txt"):  # GTA5's split lists
            shutil.copy2(extra, tmp / extra.name)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_copy_one, jobs, chunksize=8))
        else:
            for job in jobs:
                _copy_one(job)
        (tmp / "cache.json").write_text(json.dumps(stamp, indent=2))
        print(f"rtda: {len(jobs)} images of {dataset.root} at {size[1]}x{size[0]} -> {out_root} "
              f"in {time.perf_counter() - start:.0f} s")

    return build_once(out_root, is_complete, build)


def split_folder(dataset, split: str) -> str:
    """The copy's folder under ``out``: the dataset's own folder name (``gta5``, ``cityscapes``), or the split's
    when that name says nothing (two roots both named ``data``)."""
    name = Path(dataset.root).resolve().name
    return name if name.lower() in ("gta5", "cityscapes") else split


def cache_training_sets(out: str | Path, overrides: list[str], workers: int = 1) -> dict[str, Path]:
    """The data config's training sets (``source``; ``target``'s train split), each copied to ``out/<name>``
    at its ``data.<split>_size``. Returns the roots to train from."""
    import hydra
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(rtda_config.CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    datamodule: DomainAdaptationDataModule = hydra.utils.instantiate(cfg.data, augmentation=None)
    datamodule.prepare_data()
    roots = {}
    for split in ("source", "target"):
        if datamodule.factories.get(split) is None:
            continue
        size = datamodule.sizes[split]
        if size is None:
            raise RtdaError(f"data.{split}_size is null: the training images are not resized, nothing to cache")
        dataset = datamodule.factories[split](transform=None)
        roots[split] = (Path(out) / split_folder(dataset, split)).resolve()
        cache_dataset(dataset, roots[split], size, workers)
        with Image.open(dataset.image_paths[0]) as img:
            ratio = size[0] * size[1] / (img.size[0] * img.size[1])
        roots[f"{split}_area_ratio"] = ratio
    return roots


def main(argv: list[str] | None = None) -> None:
    """``python -m rtda.data.cache OUT [overrides]``; a user error is one line and exit status 1."""
    run_cli(lambda: _cache(sys.argv[1:] if argv is None else argv))


def _cache(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m rtda.data.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the copies (one sub-folder per dataset)")
    parser.add_argument("overrides", nargs="*", help="rtda-train overrides choosing the data (default data=gta5_to_cityscapes)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes writing (default: every core this process may use)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if not any(o.startswith("data=") for o in overrides):
        overrides.insert(0, "data=gta5_to_cityscapes")
    roots = cache_training_sets(args.out, overrides, args.workers)
    train = [f"data.{s}.root={roots[s]}" for s in ("source", "target") if s in roots]
    kept = [o for o in overrides if not o.startswith(("data.source.root=", "data.target.root="))]
    print(f"rtda: train from the copies with: rtda-train {' '.join([*kept, *train])}")
    if "source_area_ratio" in roots:
        print(f"rtda: with data.rare_class_sampling=true, scale data.rcs_min_pixels by {roots['source_area_ratio']:.3f} "
              "(class pixels are counted in the smaller labels)")


if __name__ == "__main__":
    main()
