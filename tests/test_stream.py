"""rtda-stream: the drifting demo stream, the frame readers, the online methods (TENT, BN, CoTTA, the budgeted
learner), the collapse guard, and the command end to end on a tiny stream with the shared trained checkpoint."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import run_in_process
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from rtda.adaptation.budgeted import Budgeted, ShiftDetector
from rtda.adaptation.cotta import CoTTA, stochastic_restore
from rtda.adaptation.online import BatchNormAdapter, CollapseGuard, OnlineAdapter, softmax_entropy
from rtda.adaptation.tent import Tent
from rtda.analysis.compare import load_run
from rtda.data.stream import FrameFolder, VideoFrames, demo_stream, ensure_stream, frame_schedule
from rtda.run.config import CONFIG_DIR

SCHEDULE = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "stream" / "demo.yaml").reader.schedule)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 19, 1))


def batch(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 32, generator=torch.Generator().manual_seed(seed))


def test_schedule_follows_the_segments():
    rows = frame_schedule(SCHEDULE, 50)
    assert [r["frame"] for r in rows] == list(range(50))
    conds = [r["condition"] for r in rows]
    assert conds[:10] == ["clear"] * 10 and conds[-10:] == ["clear"] * 10
    assert conds[10:20] == ["fog"] * 10 and conds[20:30] == ["rain"] * 10 and conds[30:40] == ["night"] * 10
    fog = [r["intensity"] for r in rows[10:20]]
    assert fog[0] < fog[3] <= 1.0 and max(fog) == 1.0 and fog[-1] < fog[5]  # ramps in and out
    assert all(r["intensity"] == 0 for r in rows if r["condition"] == "clear")


def test_demo_stream_is_ordered_deterministic_and_cached(tmp_path):
    a = demo_stream(tmp_path / "a", frames=12, size=(32, 64), schedule=SCHEDULE)
    b = demo_stream(tmp_path / "b", frames=12, size=(32, 64), schedule=SCHEDULE)
    assert len(a) == 12 and [s["name"] for s in a] == [f"drive_000000_{i:06d}" for i in range(12)]
    assert [s["condition"] for s in a] == [r["condition"] for r in frame_schedule(SCHEDULE, 12)]
    for sa, sb in zip(a, b):
        assert np.array_equal(sa["image"], sb["image"]) and np.array_equal(sa["label"], sb["label"])
    assert a[0]["label"].max() == 255 and a[0]["label"].min() < 19  # train ids, the bonnet ignored
    assert not np.array_equal(a[3]["image"], a[5]["image"])
    img = tmp_path / "a" / "leftImg8bit_sequence" / "stream" / "drive" / "drive_000000_000000_leftImg8bit.png"
    stamp = img.stat().st_mtime_ns
    ensure_stream(tmp_path / "a", frames=12, size=(32, 64), schedule=SCHEDULE)  # cached: not rewritten
    assert img.stat().st_mtime_ns == stamp
    with open(tmp_path / "a" / "stream.csv") as f:
        assert [r["condition"] for r in csv.DictReader(f)][4] == "fog"


def test_folder_reader_order_labels_and_conditions(tmp_path):
    root = tmp_path / "rgb_anon"
    for cond in ("night", "fog"):
        (root / cond).mkdir(parents=True)
        (tmp_path / "gt" / cond).mkdir(parents=True)
        for i in (10, 2, 1):
            Image.fromarray(np.full((4, 6, 3), i, np.uint8)).save(root / cond / f"f{i:03d}_rgb_anon.png")
            Image.fromarray(np.full((4, 6), 7, np.uint8)).save(tmp_path / "gt" / cond / f"f{i:03d}_gt_labelIds.png")
    reader = FrameFolder(root)
    assert [s["name"] for s in reader] == ["f001", "f002", "f010"] * 2
    assert [s["condition"] for s in reader] == ["fog"] * 3 + ["night"] * 3
    assert reader[0]["label"].max() == 0  # label id 7 (road) -> train id 0
    assert not FrameFolder(root, labels="none").labelled


def test_video_reader(tmp_path):
    import cv2

    path = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 16))
    for i in range(6):
        writer.write(np.full((16, 32, 3), 40 * i, np.uint8))
    writer.release()
    frames = list(VideoFrames(path, stride=2))
    assert len(frames) == 3 and frames[0]["image"].shape == (16, 32, 3) and [f["index"] for f in frames] == [0, 1, 2]


def test_tent_updates_only_norm_affine_params_and_lowers_entropy():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tent = Tent(net, lr=1e-2)
    x = batch()
    with torch.no_grad():
        e0 = float(softmax_entropy(net(x)).mean())
    for _ in range(10):
        tent.step(x)
    with torch.no_grad():
        e1 = float(softmax_entropy(net(x)).mean())
    assert e1 < e0
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= {"1.weight", "1.bias", "4.weight", "4.bias", "1.num_batches_tracked", "4.num_batches_tracked"}
    assert {"1.weight", "4.bias"} <= changed
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in ("1.running_mean", "4.running_var", "0.weight"))
    tent.reset()
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)


def test_bn_changes_only_running_stats():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adapter = BatchNormAdapter(net, momentum=0.1)
    adapter.step(batch())
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.split(".")[1] in ("running_mean", "running_var", "num_batches_tracked") for k in changed)
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    adapter.predict(batch(1))  # scoring again does not adapt
    assert all(torch.equal(net.state_dict()[k], frozen[k]) for k in frozen)


def test_bn_single_frame_through_global_pooling():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Upsample(size=(8, 8)),
                        nn.Conv2d(4, 19, 1))
    probs, _ = Tent(net).step(torch.randn(1, 3, 8, 8))  # one value per channel: running statistics for that layer
    assert probs.shape == (1, 19, 8, 8)


def test_cotta_restoration_p1_restores_p0_keeps():
    net = tiny_net()
    source = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    stochastic_restore(net, source, 1.0)
    assert all(torch.equal(p, source[n]) for n, p in net.named_parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    moved = {n: p.clone() for n, p in net.named_parameters()}
    assert stochastic_restore(net, source, 0.0) == 0
    assert all(torch.equal(p, moved[n]) for n, p in net.named_parameters())


def test_cotta_step_updates_student_and_teacher():
    net = tiny_net()
    cotta = CoTTA(net, lr=1e-3, scales=(1.0, 0.5), restore_p=0.0)
    t0 = [p.clone() for p in cotta.teacher.parameters()]
    probs, info = cotta.step(batch())
    assert info["updated"] and probs.shape == (2, 19, 16, 32) and torch.allclose(probs.sum(1), torch.ones(2, 16, 32))
    assert any(not torch.equal(a, b) for a, b in zip(t0, cotta.teacher.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(cotta.anchor.parameters(), [cotta.source_state[n] for n, _ in net.named_parameters()]))


def test_budgeted_trains_the_last_modules_and_skips_for_the_budget():
    net = tiny_net()
    first = net[0].weight.clone()
    learner = Budgeted(net, depth=2, lr=1e-2, burst=3, min_fps=None)
    for i in range(5):
        learner.step(batch(i))
    assert learner.trainable_names == ["4", "6"]  # the last BatchNorm and the classifier, in execution order
    assert torch.equal(net[0].weight, first) and learner.updates == 3 and learner.counts["skipped_idle"] == 2
    slow = Budgeted(tiny_net(), depth=2, burst=10, min_fps=1e9)  # an impossible budget: only the first update runs
    for i in range(4):
        slow.step(batch(i))
    assert slow.updates == 1 and slow.counts["skipped_budget"] == 3


def test_shift_detector_triggers_on_a_jump():
    det = ShiftDetector(threshold=3.0, warmup=3)
    hits = [det.update(0.9 + 0.001 * (i % 2))[0] for i in range(10)] + [det.update(0.5)[0]]
    assert hits[-1] and not any(hits[:-1])


def test_collapse_guard_resets_on_degenerate_predictions():
    guard = CollapseGuard(patience=2)
    good = torch.rand(1, 19, 8, 8).softmax(1)
    bad = torch.zeros(1, 19, 8, 8)
    bad[:, 3] = 1.0
    assert not guard.check(good, frame=0)
    assert not guard.check(bad, frame=1)
    assert guard.check(bad, frame=2) and guard.resets == 1 and guard.reset_frames == [2]
    assert guard.check(good, loss=float("nan"), frame=3) and guard.resets == 2
    net = tiny_net()
    adapter = Tent(net, lr=1.0)
    adapter.step(batch())
    adapter.reset()
    assert all(torch.equal(v, adapter.source_state[k]) for k, v in net.state_dict().items())
    assert isinstance(adapter, OnlineAdapter)


def rtda_stream(args, cwd):
    from rtda.cli.stream import main

    return run_in_process(main, args, cwd)


@pytest.mark.parametrize("adapt", ["none", "tent"])
def test_rtda_stream_end_to_end(trained_run, tmp_path, adapt):
    ckpt = trained_run["folder"] / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", f"adapt={adapt}", f"paths.data_dir={tmp_path / 'data'}", "stream.frames=10",
            "stream.reader.size=[32,64]", "stream.size=[32,64]", "report.window=3", f"hydra.run.dir={tmp_path / adapt}"]
    proc = rtda_stream(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    folder = tmp_path / adapt
    results = json.loads((folder / "results.json").read_text())
    for key in ("mIoU", "per_condition", "harmonic_mean", "per_segment", "forgetting", "fps", "fps_end_to_end",
                "resets", "updates", "curve"):
        assert key in results, key
    assert set(results["per_condition"]) == {"clear", "fog", "rain", "night"}
    assert [s["condition"] for s in results["per_segment"]] == ["clear", "fog", "rain", "night", "clear"]
    assert results["frames"] == 10 and len(results["curve"]) == 10 and results["fps"] > 0
    assert results["updates"] == (10 if adapt == "tent" else 0)
    assert results["forgetting"]["frames"] == 2 and results["forgetting"]["final_model_mIoU"] is not None
    if adapt == "none":  # the source model forgets nothing
        assert results["forgetting"]["forgetting"] == pytest.approx(0.0, abs=1e-9)
    with open(folder / "frames.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[2]["condition"] == "fog"
    assert (folder / "miou_over_time.png").stat().st_size > 0
    assert "mIoU over the stream" in proc.stdout
    # rtda-compare reads it: the training run's setting and seed (from the checkpoint) plus the stream's
    assert results["sources"][0]["seed"] == trained_run["seed"] and set(results["IoU"]) >= {"road", "car"}
    run = load_run(folder)
    assert run["status"] == "completed" and run["seed"] == trained_run["seed"]
    assert run["setting"]["augmentation"] == "geometric" and run["setting"]["trainer.max_steps"] == "6"
    assert run["setting"]["adapt"] == adapt and run["setting"]["stream"] == "demo"
    assert run["setting"]["stream.frames"] == "10" and "report.window" not in run["setting"]
    assert run["mIoU"] == results["mIoU"] and run["groups"] == results["per_condition"]
