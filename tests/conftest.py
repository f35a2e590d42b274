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
