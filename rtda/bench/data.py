"""``rtda-bench bench.mode=data``: can the data loaders feed the training step? Images/s per worker process of
each training dataset (decode, resize, augment, collate), the loader's images/s with N workers, and the
training step's images/s beside them: how many workers a run needs.

    rtda-bench bench.mode=data                                   # synthetic files at the authors' sizes
    rtda-bench bench.mode=data bench.data=gta5_to_cityscapes     # the real datasets under paths.data_dir
    rtda-bench bench.mode=data bench.data=gta5_to_cityscapes +data.source.root=/fast/cache/gta5
    rtda-bench bench.mode=data bench.device=cuda bench.precision=bf16   # the GPU's training step to feed

Rows: one ``per_worker`` row per training set and augmentation pipeline, read in this process sample by
sample with its time split into image decoding, label decoding, the transform (resize + augmentation) and
collation; one ``loader`` row per worker count (``bench.workers``) through the same ``DataLoader`` as
training (the batches made while the workers start left out); and the training step's images/s —
source-only of ``model=`` at the source set's training size and the data config's ``batch_size`` (or
``bench.data_batch_size``), on ``bench.device`` (or ``bench.target_images_per_s``) — with ``workers_needed`` = ceil(step images/s ÷ images/s per worker): the
GPU starves with fewer. The step's rate is per domain: a method reading the target (every adaptation method)
runs a source and a target loader side by side, each needing its own workers, on the same cores.

Without ``bench.data`` the sets are synthetic files written once under
``paths.data_dir/bench_fullsize`` in the real formats at the real sizes (GTA5 1914x1052 PNG + indexed
labels, Cityscapes 2048x1024 PNG), rendered scenes about as compressible as the real ones (bytes per pixel
in the ``note``), read with the data config ``gta5_to_cityscapes``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rtda.bench.training import MethodRow, PeakMemory, method_configs
from rtda.data.base import read_label, read_rgb
from rtda.data.demo import ensure_demo
from rtda.run.errors import ConfigValueError, RtdaError

DATA_COLUMNS = ["dataset", "kind", "augmentation", "stored", "size", "batch", "workers", "images_per_s", "decode_image_ms",
                "decode_label_ms", "transform_ms", "collate_ms", "train_images_per_s", "workers_needed", "note"]

#: how many synthetic full-size files of each domain ``bench.data=null`` writes (then reads in a cycle)
SYNTHETIC_FILES = 12


def synthetic_fullsize(data_dir: str | Path) -> Path:
    """GTA5- and Cityscapes-format files at the datasets' own resolutions, written once (rtda.data.demo)."""
    return ensure_demo(Path(data_dir) / "bench_fullsize", source_count=SYNTHETIC_FILES, source_size=(1052, 1914),
                       target_train_count=SYNTHETIC_FILES, target_val_count=1, target_size=(1024, 2048))


def data_config(cfg: DictConfig, augmentation: str) -> DictConfig:
    """The training run's data config (``bench.data``, or ``gta5_to_cityscapes`` on the synthetic files) with
    the augmentation pipeline ``augmentation``, composed as ``rtda-train`` would."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    name = cfg.bench.get("data")
    # rtda-bench's own config has no data group: +data.source.root=... there; here set or added alike (++)
    overrides = [("++" + o.lstrip("+")) if o.lstrip("+").startswith("data.") else o
                 for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith(("data.", "paths."))]
    extra = []
    if not name:
        root = synthetic_fullsize(cfg.paths.data_dir)
        extra = [f"data.source.root={root / 'gta5'}", f"data.target.root={root / 'cityscapes'}",
                 f"data.val.root={root / 'cityscapes'}"]
    try:
        return compose(config_name="train", overrides=[f"data={name or 'gta5_to_cityscapes'}",
                                                       f"augmentation={augmentation}", *extra, *overrides])
    except Exception as err:  # noqa: BLE001 -- Hydra lists the choices
        raise ConfigValueError(f"bench.data / bench.augmentation: {str(err).splitlines()[0]}") from err


def _stored(dataset) -> tuple[str, str]:
    """The first file's size on disk (H x W) and its bytes per pixel."""
    from PIL import Image

    path = Path(dataset.image_paths[0])
    with Image.open(path) as img:
        w, h = img.size
    return f"{w}x{h}", f"{path.stat().st_size / (w * h * 3):.2f} bytes/px (PNG)"


def per_worker(dataset, n: int, batch_size: int) -> dict:
    """One process reading ``n`` samples: images/s and the milliseconds per sample of each stage."""
    from torch.utils.data import default_collate

    t = {"image": 0.0, "label": 0.0, "transform": 0.0, "collate": 0.0}
    batch = []
    start = time.perf_counter()
    for i in range(n):
        k = i % len(dataset)
        t0 = time.perf_counter()
        image = read_rgb(dataset.image_paths[k])
        t1 = time.perf_counter()
        label = None
        if dataset.label_paths is not None:
            label = dataset.fit_label(read_label(dataset.label_paths[k], dataset.decode_label), image.shape[:2],
                                      dataset.label_paths[k])
        t2 = time.perf_counter()
        sample = dataset.transform(image=image, label=label)
        t3 = time.perf_counter()
        batch.append(sample)
        if len(batch) == batch_size or i == n - 1:
            default_collate(batch)
            batch = []
        t4 = time.perf_counter()
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[key] += dt
    total = time.perf_counter() - start
    return {"images_per_s": n / total, "decode_image_ms": 1000 * t["image"] / n, "decode_label_ms": 1000 * t["label"] / n,
            "transform_ms": 1000 * t["transform"] / n, "collate_ms": 1000 * t["collate"] / n}


def loader_rate(dataset, n: int, batch_size: int, workers: int, pin_memory: bool) -> float:
    """Images/s through a ``DataLoader`` as training builds it, over ``n`` images after the batches made
    before the clock starts (the first one, waited for while the workers start, and the two each worker
    prefetches meanwhile)."""
    from torch.utils.data import DataLoader, Subset

    skip = 1 + 2 * workers
    batches = max(math.ceil(n / batch_size), 2) + skip
    indices = [i % len(dataset) for i in range(batches * batch_size)]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=pin_memory, drop_last=True)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    start = time.perf_counter()
    seen = sum(b["image"].shape[0] for b in it)
    return seen / (time.perf_counter() - start)


def train_step_rate(cfg: DictConfig, size, batch_size: int) -> float:
    """Source images/s of source-only training of ``model=`` at ``size`` and ``batch_size`` on ``bench.device``
    (Lightning, synthetic batches, :mod:`rtda.bench.training`)."""
    import tempfile

    cfg_train = method_configs(cfg)["source_only"]
    OmegaConf.set_struct(cfg_train, False)
    cfg_train.bench.height, cfg_train.bench.width = int(size[0]), int(size[1])
    cfg_train.bench.train_batch_size = batch_size
    row = MethodRow("source_only", cfg_train, torch.device(cfg.bench.device), cfg.bench.precision, tempfile.mkdtemp())
    row.run_round(max(int(cfg.bench.train_iterations), 2), PeakMemory(torch.device(cfg.bench.device)))
    times = sorted(row.times)
    return batch_size / times[len(times) // 2]


def data_benchmark(cfg: DictConfig) -> list[dict]:
    try:
        import albumentations  # noqa: F401 -- the training transforms
    except ImportError as err:
        raise RtdaError(f"bench.mode=data reads through the training transforms, which need albumentations ({err}): "
                        "pip install -e . (bench.mode=infer and train do not)") from err
    b = cfg.bench
    augmentations = b.get("augmentation") or ["none"]
    augmentations = [augmentations] if isinstance(augmentations, str) else list(augmentations)
    if b.threads:
        torch.set_num_threads(int(b.threads))
    n = int(b.data_images)
    rows: list[dict] = []
    train_rate = b.get("target_images_per_s")
    for aug in augmentations:
        data_cfg = data_config(cfg, aug)
        datamodule = hydra.utils.instantiate(data_cfg.data, augmentation=data_cfg.get("augmentation"))
        datamodule.prepare_data()
        batch_size = int(b.get("data_batch_size") or datamodule.batch_size)
        for split in ("source", "target"):
            if datamodule.factories.get(split) is None:
                continue
            dataset = datamodule.dataset(split)
            size = datamodule.sizes[split]
            if split == "source" and train_rate is None:
                if size is None:
                    raise ConfigValueError("data.source_size is null: give bench.target_images_per_s (the training "
                                           "step's images/s) to compare the loaders with")
                train_rate = train_step_rate(cfg, size, batch_size)
            stored, bpp = _stored(dataset)
            common = {"dataset": f"{split}: {type(dataset).__name__}", "augmentation": aug, "stored": stored,
                      "batch": batch_size,
                      "size": "x".join(str(s) for s in reversed(size)) if size else stored}
            per = per_worker(dataset, n, batch_size)
            needed = math.ceil(train_rate / per["images_per_s"]) if train_rate else None
            rows.append({**common, "kind": "per_worker", "workers": 1, **per, "train_images_per_s": train_rate,
                         "workers_needed": needed, "note": bpp})
            for workers in b.workers:
                rate = loader_rate(dataset, n, batch_size, int(workers), torch.device(b.device).type == "cuda")
                rows.append({**common, "kind": "loader", "workers": int(workers), "images_per_s": rate,
                             "train_images_per_s": train_rate,
                             "note": ("keeps up" if train_rate and rate >= train_rate else
                                      "the training step waits for data" if train_rate else "")})
    for r in rows:
        r["device"] = b.device
    return rows
