import concurrent.futures
import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # `pytest -n N`: the cores shared out among the workers (and the commands they start), not N x all of them
    # (OpenMP's threads spin-wait: oversubscribed, each worker ran about twice as slow as alone)
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import TINY_DEMO, rtda_train, run_folder, tiny_overrides  # noqa: E402


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory) -> Path:
    """A data_dir holding a tiny demo pair under demo/ (generated once per test session)."""
    from rtda.data.demo import ensure_demo

    data_dir = tmp_path_factory.mktemp("data")
    ensure_demo(data_dir / "demo", **TINY_DEMO)
    return data_dir


@pytest.fixture(scope="session")
def trained_run(tiny_demo_dir, tmp_path_factory) -> dict:
    """One short rtda-train run on the tiny demo (6 iterations, geometric augmentation), shared by the
    tests that inspect its outputs; returns its results.json with the working folder."""
    cwd = tmp_path_factory.mktemp("run")
    args = ["trainer.max_steps=6", "trainer.val_check_interval=3", "data.batch_size=2", "data.num_workers=0",
            "trainer.log_every_n_steps=1", "augmentation=geometric", *tiny_overrides(tiny_demo_dir)]
    proc = rtda_train(args, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_folder(proc.stdout)
    results = json.loads((folder / "results.json").read_text())
    return {**results, "cwd": cwd, "folder": folder, "args": args, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="session", autouse=True)
def slurm_scenarios(request, tmp_path_factory):
    """The SLURM scenarios (tests/helpers/slurm.py), started before the first test when the session holds a SLURM
    test and a SLURM is up; ``{}`` otherwise. Their jobs wait on the scheduler most of the time, so the rest of the
    suite runs meanwhile; tests/test_slurm.py collects their outcomes."""
    from helpers import slurm

    wanted = any(item.get_closest_marker("slurm") for item in request.session.items)
    if not wanted or not slurm.slurm_up():
        yield {}
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:  # one process: the futures themselves
        pool, futures = slurm.start(request.getfixturevalue("tiny_demo_dir"), tmp_path_factory)
        yield futures
        slurm.stop(pool)
        return
    # pytest-xdist (`pytest -n 2`): worker gw0 runs the scenarios; whichever worker runs a SLURM test reads its
    # outcome from the folder the workers share
    shared = tmp_path_factory.getbasetemp().parent
    if worker != "gw0":
        yield slurm.outcomes(shared)
        return
    pool, futures = slurm.start(request.getfixturevalue("tiny_demo_dir"), tmp_path_factory, shared)
    yield slurm.outcomes(shared)
    concurrent.futures.wait(list(futures.values()), timeout=1200)  # another worker's test may still be waiting on them
    slurm.stop(pool)
