"""Training at speed: rtda-bench's training and data-pipeline modes, the resized cache, mixed precision for every
method, compiling the segmenter. Speed itself is measured in BENCHMARKS.md, never asserted here."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_in_process, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from rtda.bench.training import MethodRow, PeakMemory, SyntheticBatches, _timed_intervals
from rtda.cli.bench import main as bench_main
from rtda.data.cache import main as cache_main
from rtda.run.config import CONFIG_DIR

METHODS = ["source_only", "adversarial", "minent", "advent", "fda", "fda_ssl", "cyclegan", "dacs", "mic"]


def bench_cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("bench", overrides=list(overrides))


def _bench(tmp_path, *args) -> list[dict]:
    proc = run_in_process(bench_main, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(tmp_path.rglob("bench.json")).read_text())


def test_timed_intervals_leave_out_warm_up_and_tear_down():
    # starts of 4 iterations + the end: the first (warm-up) and the last (ends with the fit) are not timed
    assert _timed_intervals([0.0, 5.0, 6.0, 8.0, 20.0]) == [1.0, 2.0]


def test_synthetic_batches_look_like_training_samples():
    data = SyntheticBatches(160, 248, num_classes=19, length=3)  # 10 x 16 regions
    sample = data[0]
    for domain in ("source", "target"):
        image, label = sample[domain]["image"], sample[domain]["label"]
        assert image.dtype == torch.uint8 and image.shape == (3, 160, 248)
        assert label.dtype == torch.int64 and label.shape == (160, 248)
        classes = set(label.unique().tolist())
        assert 255 in classes and len(classes - {255}) > 3 and max(classes - {255}) < 19
        assert torch.equal(label[:16, :16], label[0, 0].expand(16, 16))  # 16x16 regions of one class
    sample["source"]["image"].zero_()
    assert data[1]["source"]["image"].any()  # each sample a copy: a method editing its batch changes nothing else


def test_peak_memory_sees_an_allocation_in_the_stretch():
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    increase = memory.increase_mb()
    del block
    assert memory.resettable  # Linux: /proc/self/clear_refs resets the peak (the stretch's own peak is measured)
    assert 60 <= increase < 1000


def test_train_mode_rows_and_the_plain_loop(tmp_path):
    rows = _bench(tmp_path, "bench.mode=train", "bench.methods=[fda]", "bench.height=32", "bench.width=64",
                  "bench.min_rounds=1", "bench.max_rounds=1", "bench.train_iterations=2")
    assert [(r["method"], r["variant"]) for r in rows] == [("source_only", "lightning"), ("fda", "lightning"),
                                                          ("source_only", "plain")]
    src, fda, plain = rows
    for r in rows:
        assert r["iterations"] == 2 and 0 < r["median_s"] <= r["p90_s"] and r["peak_mem_MB"] > 0
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"])
    # the plain loop runs the same arithmetic as rtda's source-only: the same FLOPs, to the last one
    assert plain["GFLOPs_per_it"] == src["GFLOPs_per_it"] > 0
    assert src["time_ratio"] == src["flop_ratio"] == 1.0
    assert src["vs_plain"] == pytest.approx(src["median_s"] / plain["median_s"])
    # FDA adds one no-grad training-mode target pass (BatchNorm statistics) before its entropy switch: exactly
    # the FLOPs of a forward of the same batch, on top of source-only's forward and backward
    from torch.utils.flop_counter import FlopCounterMode

    from rtda.models.bisenet import BiSeNet

    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        BiSeNet(19).train()(torch.randn(2, 3, 32, 64))
    assert fda["GFLOPs_per_it"] == pytest.approx(src["GFLOPs_per_it"] + forward.get_total_flops() / 1e9, rel=1e-12)
    assert fda["flop_ratio"] == pytest.approx(fda["GFLOPs_per_it"] / src["GFLOPs_per_it"])
    assert fda["overhead"] == pytest.approx(fda["time_ratio"] / fda["flop_ratio"])
    table = (next(tmp_path.rglob("bench.csv"))).read_text()
    assert "time_ratio" in table.splitlines()[0] and "median_ms" not in table.splitlines()[0]


def test_method_overrides_go_to_the_methods_that_have_the_key(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from rtda.bench.training import method_configs
    from rtda.run.errors import ConfigValueError

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["bench.methods=[fda,dacs]", "+adaptation.switch_to_entropy=0"],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        configs = method_configs(cfg)
        assert list(configs) == ["source_only", "fda", "dacs"]
        assert configs["fda"].adaptation.switch_to_entropy == 0
        assert configs["fda"].bench.overrides == ["adaptation.switch_to_entropy=0"]
        assert "switch_to_entropy" not in configs["dacs"].adaptation and configs["dacs"].bench.overrides == []
        # a key whose default is null is still the method's (distill's teacher: null until the user names one)
        cfg = compose("bench", overrides=["bench.methods=[distill]", "+adaptation.teacher.ckpt_path=[a.ckpt,b.ckpt]"],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        configs = method_configs(cfg)
        assert list(configs["distill"].adaptation.teacher.ckpt_path) == ["a.ckpt", "b.ckpt"]
        cfg = compose("bench", overrides=["bench.methods=[dacs]", "+adaptation.nope=1"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with pytest.raises(ConfigValueError, match=r"\+adaptation.nope=1: no method"):
            method_configs(cfg)


def test_deeplab_from_random_init_trains_finitely_in_the_benchmark(tmp_path):
    """Frozen BatchNorm calibrated and rates scaled: random-init DeepLabV2 on random labels stays finite."""
    from rtda.bench.training import build_net
    from rtda.models.frozen_bn import FrozenBatchNorm2d

    cfg = bench_cfg("model=deeplabv2_r101", "adaptation=source_only", "bench.height=32", "bench.width=64")
    net = build_net(cfg, torch.device("cpu"))
    frozen = [m for m in net.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in frozen)
    row = MethodRow("source_only", cfg, torch.device("cpu"), "fp32", str(tmp_path))
    row._fit(4, [])  # four iterations through rtda's divergence check: none
    assert all(torch.isfinite(p).all() for p in row.module.parameters())


def test_train_mode_refuses_a_batch_of_one(tmp_path):
    proc = run_in_process(bench_main, ["bench.mode=train", "bench.train_batch_size=1"], tmp_path)
    assert proc.returncode == 1 and "bench.train_batch_size=1" in proc.stderr and "Traceback" not in proc.stderr


# float16 on the CPU runs without fast kernels (CycleGAN: minutes): the float16 + gradient-scaler path is tried
# on one method of each kind: automatic optimization, two optimizers (manual), FDA (FFTs, entropy)
FP16_METHODS = ["source_only", "advent", "fda"]


@pytest.mark.parametrize("precision, methods", [("bf16", METHODS), ("fp16", FP16_METHODS)])
def test_every_method_trains_in_mixed_precision(precision, methods, tmp_path):
    """bf16-mixed for every method, 16-mixed (gradient scaler): finite, and every network's weights move."""
    for name in methods:
        cfg = bench_cfg(f"adaptation={name}", "bench.height=32", "bench.width=64")
        row = MethodRow(name, cfg, torch.device("cpu"), precision, str(tmp_path))
        before = {k: v.clone() for k, v in row.module.named_parameters()}
        row._fit(2, [])  # two iterations through Lightning at this precision
        after = dict(row.module.named_parameters())
        assert all(torch.isfinite(v).all() for v in after.values()), name
        moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        owners = {k.split(".")[0] for k in before if not k.startswith("teacher.")}  # the EMA teacher follows, unstepped
        if precision == "fp16":  # the gradient scaler ran: a step with inf/NaN gradients is skipped and the scale cut
            scaler = row.module._trainer.precision_plugin.scaler
            assert scaler is not None and (moved >= owners or scaler.get_scale() < 2.0**16), name
        else:
            assert moved >= owners, f"{name} at {precision}: no step for {owners - moved}"


def test_compile_option_compiles_the_segmenter_in_place():
    from rtda.adaptation.segmentation import SegmentationModule
    from rtda.models.bisenet import BiSeNet

    module = SegmentationModule(BiSeNet(4), num_classes=4, compile={"backend": "eager"})
    keys = list(module.state_dict())
    module.setup("fit")
    assert module.net._compiled_call_impl is not None
    assert list(module.state_dict()) == keys  # checkpoints keep their keys
    plain = SegmentationModule(BiSeNet(4), num_classes=4)
    plain.setup("fit")
    assert plain.net._compiled_call_impl is None


def test_bf16_falls_back_to_fp16_on_a_gpu_without_it(monkeypatch):
    from omegaconf import OmegaConf

    from rtda.pipelines.train import supported_precision

    gpu = OmegaConf.create({"accelerator": "gpu", "precision": "bf16-mixed"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert supported_precision(gpu) == {"precision": "16-mixed"}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert supported_precision(gpu) == {}
    assert supported_precision(OmegaConf.create({"accelerator": "cpu", "precision": "bf16-mixed"})) == {}


def test_gpu_trainers_default_to_bf16():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for trainer in ("gpu", "ddp"):
            assert compose("train", overrides=[f"trainer={trainer}"]).trainer.precision == "bf16-mixed"
        assert compose("train").trainer.precision == "32-true"


# -- the data pipeline -------------------------------------------------------------------------------
def test_data_mode_per_worker_and_loader_rows(tiny_demo_dir, tmp_path):
    over = [o if o.startswith("paths.") else "+" + o.lstrip("+") for o in tiny_overrides(tiny_demo_dir)]
    rows = _bench(tmp_path, "bench.mode=data", "bench.data=demo", "bench.data_images=6", "bench.workers=[0,1]",
                  "bench.target_images_per_s=1000", *over)
    per = [r for r in rows if r["kind"] == "per_worker"]
    assert [r["dataset"] for r in per] == ["source: GTA5", "target: Cityscapes"]
    for r in per:
        assert r["images_per_s"] > 0 and r["decode_image_ms"] > 0 and r["transform_ms"] > 0
        assert r["workers_needed"] == int(np.ceil(1000 / r["images_per_s"]))
        assert r["stored"] == ("512x288" if r["dataset"].startswith("source") else "512x256")
    assert per[0]["decode_label_ms"] > 0 and per[1]["decode_label_ms"] < per[0]["decode_label_ms"]  # target: no labels
    loaders = [r for r in rows if r["kind"] == "loader"]
    assert sorted((r["dataset"], r["workers"]) for r in loaders) == [("source: GTA5", 0), ("source: GTA5", 1),
                                                                    ("target: Cityscapes", 0), ("target: Cityscapes", 1)]
    assert all(r["images_per_s"] > 0 and r["note"] == "the training step waits for data" for r in loaders)


def test_cache_gives_the_same_samples_and_is_built_once(tiny_demo_dir, tmp_path, capsys):
    from rtda.data.cache import main
    from rtda.data.cityscapes import Cityscapes
    from rtda.data.gta5 import GTA5
    from rtda.data.transforms import SegmentationTransform

    demo = tiny_demo_dir / "demo"
    over = ["data=demo", *tiny_overrides(tiny_demo_dir), "data.source_size=[72,128]", "data.target_size=[64,128]"]
    main([str(tmp_path / "cache"), *over, "--workers", "1"])
    out = capsys.readouterr().out
    assert f"data.source.root={tmp_path / 'cache' / 'gta5'}" in out and "rcs_min_pixels by 0.062" in out
    # the copies keep the formats: GTA5 indexed labels with their palette; only Cityscapes' train split
    label = Image.open(next((tmp_path / "cache" / "gta5" / "labels").iterdir()))
    assert label.mode == "P" and label.size == (128, 72)
    assert label.getpalette()[:48] == Image.open(next((demo / "gta5" / "labels").iterdir())).getpalette()[:48]
    assert not (tmp_path / "cache" / "cityscapes" / "leftImg8bit" / "val").exists()
    for cls, sub, size, kw in ((GTA5, "gta5", (72, 128), {}), (Cityscapes, "cityscapes", (64, 128), {"labelled": False})):
        transform = SegmentationTransform(size)
        original = cls(demo / sub, transform=transform, **kw)
        cached = cls(tmp_path / "cache" / sub, transform=transform, **kw)
        assert len(original) == len(cached)
        for i in range(len(original)):
            a, b = original[i], cached[i]
            assert a["name"] == b["name"] and torch.equal(a["image"], b["image"])
            if "label" in a:
                assert torch.equal(a["label"], b["label"])
    stamp = (tmp_path / "cache" / "gta5" / "cache.json").stat().st_mtime_ns
    main([str(tmp_path / "cache"), *over, "--workers", "1"])  # again: reused, not rewritten
    assert (tmp_path / "cache" / "gta5" / "cache.json").stat().st_mtime_ns == stamp
    assert "images of" not in capsys.readouterr().out


def test_cache_resizes_a_mismatched_gta5_label_as_the_reader_does(tmp_path):
    from rtda.data.cache import cache_dataset
    from rtda.data.gta5 import GTA5
    from rtda.data.labels import ID_PALETTE
    from rtda.data.transforms import SegmentationTransform

    root = tmp_path / "gta5"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i, label_size in enumerate([(60, 34), (45, 26)]):  # the second label is smaller than its image
        Image.fromarray(rng.integers(0, 255, (34, 60, 3), dtype=np.uint8)).save(root / "images" / f"{i:05d}.png")
        label = Image.fromarray(rng.choice([7, 8, 11, 26], size=label_size[::-1]).astype(np.uint8), mode="P")
        label.putpalette(ID_PALETTE.flatten().tolist())
        label.save(root / "labels" / f"{i:05d}.png")
    (root / "train.txt").write_text("00000.png\n00001.png\n")
    with pytest.warns(UserWarning, match="resized"):
        dataset = GTA5(root, transform=None)
    assert cache_dataset(dataset, tmp_path / "copy", (24, 40))
    assert (tmp_path / "copy" / "train.txt").read_text() == (root / "train.txt").read_text()
    transform = SegmentationTransform((24, 40))
    with pytest.warns(UserWarning, match="resized"):
        original = GTA5(root, transform=transform)
    cached = GTA5(tmp_path / "copy", transform=transform)
    for i in range(2):
        assert torch.equal(original[i]["image"], cached[i]["image"]) and torch.equal(original[i]["label"], cached[i]["label"])


def test_cache_cli_names_a_missing_dataset(tmp_path):
    proc = run_in_process(cache_main, [str(tmp_path / "c"), f"paths.data_dir={tmp_path}"], tempfile.gettempdir())
    assert proc.returncode == 1 and "GTA5: folder not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not Path(tmp_path / "c").exists() or not any(Path(tmp_path / "c").iterdir())
