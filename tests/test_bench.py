"""Complexity counting and the benchmark's rows, on tiny inputs (speed itself is measured in BENCHMARKS.md)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run_in_process
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torch import nn

from rtda.bench.complexity import count_flops, count_parameters, measure_interleaved
from rtda.bench.inference import _onnx_runner, benchmark, format_table
from rtda.cli.bench import main as bench_main
from rtda.models.bisenet import BiSeNet
from rtda.run.config import CONFIG_DIR


def test_parameters_and_flops_of_a_tiny_net_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=True))
    net[2].weight.requires_grad_(False)
    assert count_parameters(net) == {"params": 3 * 4 * 9 + 4 * 2 + 2, "trainable_params": 3 * 4 * 9 + 2}
    # 2 FLOPs per multiply-accumulate: conv3x3 3->4 and conv1x1 4->2 over an 8x8 map
    assert count_flops(net, torch.randn(1, 3, 8, 8)) == 2 * (3 * 4 * 9 * 64 + 4 * 2 * 64)


def test_inference_parameters_leave_out_what_evaluation_does_not_run():
    class WithTrainingHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            x = self.body(x)
            return (x, self.head(x)) if self.training else x

    counts = count_parameters(WithTrainingHead(), torch.randn(1, 3, 4, 4))
    assert counts["params"] == 16 + 10 and counts["inference_params"] == 16


def test_flops_of_bisenet_match_the_reference_scale():
    # ~51 GFLOPs at 512x1024 (course template, 2 per MAC); FLOPs scale with the pixel count
    flops = count_flops(BiSeNet(19), torch.randn(1, 3, 128, 256))
    assert flops * 16 / 1e9 == pytest.approx(51.26, rel=0.01)


def test_interleaved_timing_gives_positive_rows():
    stats = measure_interleaved({"a": lambda: sum(range(1000)), "b": lambda: sum(range(2000))}, torch.device("cpu"),
                                warmup=1, min_runs=4, max_seconds=0.05, rounds=2)
    for row in stats.values():
        assert row["runs"] >= 4 and 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["fps"] == pytest.approx(1000 / row["median_ms"])


def test_onnx_export_matches_eager():
    net = BiSeNet(19).eval()
    x = torch.randn(1, 3, 64, 128)
    _, note, session, feed = _onnx_runner(net, x, torch.device("cpu"), threads=1)
    out = session.run(None, feed)[0]
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    assert "CPUExecutionProvider" in note


@pytest.mark.slow
def test_benchmark_rows(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["bench.height=64", "bench.width=128", "bench.max_seconds=0.05",
                                          "bench.min_runs=2", "bench.warmup=1", "bench.variants=[plain,eager,channels_last,onnxruntime]"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    rows = benchmark(cfg)
    assert [r["variant"] for r in rows] == ["plain", "eager", "channels_last", "onnxruntime"]
    for r in rows:
        assert r["median_ms"] > 0 and r["fps"] > 0 and r["GFLOP/s"] > 0 and r["ceiling_%"] > 0
        # BiSeNet-R18's 12,068,672 (the reference) less the two training-only 1x1 heads (256 and 512 -> 19 classes)
        assert r["params_M"] == pytest.approx((12_068_672 - 257 * 19 - 513 * 19) / 1e6) and r["GMACs"] == pytest.approx(r["GFLOPs"] / 2)
    assert rows[0]["vs_plain"] == 1.0
    assert rows[0]["machine"]["matmul_ceiling_GFLOPs"]["torch"] > 0
    table = format_table(rows)
    assert "onnxruntime" in table and "GFLOP/s" in table


def test_cli_compares_networks_in_one_table(tmp_path):
    args = ["-m", "model=bisenet_r18,deeplabv2_r101", "bench.height=32", "bench.width=64", "bench.max_seconds=0.05",
            "bench.min_runs=2", "bench.warmup=1", "bench.variants=[plain,eager]", "bench.matmul_ceiling=false"]
    proc = run_in_process(bench_main, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.split("rtda-bench comparison", 1)[1]
    assert table.count("bisenet_r18") == 2 and table.count("deeplabv2_r101") == 2
    assert "43.9" in table  # DeepLabV2-R101: 43.9 M parameters


@pytest.mark.slow
def test_bench_needs_no_albumentations():
    # the GPU machines carry no albumentations: the benchmark path must not import it
    code = "import sys; sys.modules['albumentations'] = None; import rtda.bench.inference, rtda.bench.training, rtda.adaptation.base, rtda.pipelines.evaluate"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bench_takes_the_segmenter_of_an_adversarial_checkpoint(tmp_path):
    import pytorch_lightning as pl
    from helpers.lightning import TinyData, module, trainer

    m = module("adversarial")
    m.run_config = {"config": {"model": {"_target_": "rtda.models.bisenet.BiSeNet", "num_classes": 4, "pretrained": False}},
                    "overrides": [], "choices": {"model": "bisenet_r18", "adaptation": "adversarial"}}
    t: pl.Trainer = trainer(tmp_path, max_steps=1)
    t.fit(m, datamodule=TinyData())
    t.save_checkpoint(tmp_path / "adv.ckpt")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["bench.height=32", "bench.width=64", "bench.max_seconds=0.05", "bench.min_runs=2",
                                          "bench.warmup=1", "bench.variants=[plain,eager]", "bench.matmul_ceiling=false",
                                          f"bench.ckpt_path={tmp_path / 'adv.ckpt'}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    rows = benchmark(cfg)
    # the 4-class segmenter alone (no discriminator): BiSeNet-R18's size for 4 classes, not 19
    params = sum(p.numel() for p in m.net.parameters())
    assert [r["params_with_training_heads_M"] for r in rows] == pytest.approx([params / 1e6] * 2) and params < 12_068_672
    assert rows[0]["model"] == "bisenet_r18"
