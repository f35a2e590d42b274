import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# a demo small enough for seconds-long tests; the same keys as conf/data/demo.yaml's prepare node
TINY_DEMO = {"seed": 0, "source_count": 12, "target_train_count": 8, "target_val_count": 4}


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory) -> Path:
    """A data_dir holding a tiny demo pair under demo/ (generated once per test session)."""
    from rtda.data.demo import ensure_demo

    data_dir = tmp_path_factory.mktemp("data")
    ensure_demo(data_dir / "demo", **TINY_DEMO)
    return data_dir


def tiny_overrides(data_dir: Path) -> list[str]:
    """Hydra overrides that point the demo config at the tiny demo and keep a run to seconds."""
    return [f"paths.data_dir={data_dir}"] + [f"+data.prepare.{k}={v}" for k, v in TINY_DEMO.items() if k != "seed"]


@pytest.fixture(scope="session")
def trained_run(tiny_demo_dir, tmp_path_factory) -> dict:
    """One short rtda-train run on the tiny demo (6 iterations, geometric augmentation), shared by the
    tests that inspect its outputs; returns its results.json with the working folder."""
    import json
    import re
    import subprocess

    cwd = tmp_path_factory.mktemp("run")
    args = ["trainer.max_steps=6", "trainer.val_check_interval=3", "data.batch_size=2", "data.num_workers=0",
            "trainer.log_every_n_steps=1", "augmentation=geometric", *tiny_overrides(tiny_demo_dir)]
    proc = subprocess.run(["rtda-train", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))
    results = json.loads((folder / "results.json").read_text())
    return {**results, "cwd": cwd, "folder": folder, "args": args, "stdout": proc.stdout}
