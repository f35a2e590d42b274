"""rtda as a library: a wheel (not editable) carries the config tree; a user's project adds its own experiment."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, REPO, tiny_overrides

ENV = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # the installed wheel only, not a checkout

USER_EXPERIMENT = """\
# @package _global_
# a user's own experiment, in the user's own project: conf/experiment/my_short_run.yaml
defaults:
  - override /augmentation: geometric
task_name: my_study
trainer:
  max_steps: 2
  val_check_interval: 2
data:
  batch_size: 2
  num_workers: 0
  source_size: [36, 64]
  target_size: [32, 64]
tags: [my-study]
"""


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_a_users_own_experiment(tiny_demo_dir, tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("rtda-*.whl")
    # a fresh venv: its own site-packages first, then this environment's (torch & co.) by a .pth file. Not
    # --system-site-packages: inside a venv (as CI and users run the tests) that is the bare base interpreter.
    # The .pth lines add folders without running their own .pth files, so the checkout's editable install stays out
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    outer = subprocess.run([sys.executable, "-c", "import site; print(*site.getsitepackages(), sep='\\n')"],
                           capture_output=True, text=True, check=True).stdout
    (site_dir,) = (venv / "lib").glob("python*/site-packages")
    (site_dir / "outer_environment.pth").write_text(outer)
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]

    project = tmp_path / "my_project"
    (project / "conf" / "experiment").mkdir(parents=True)
    (project / "conf" / "experiment" / "my_short_run.yaml").write_text(USER_EXPERIMENT)
    where = subprocess.run([str(python), "-c", "import rtda.run.config as c; print(c.CONFIG_DIR)"], cwd=project, env=ENV,
                           capture_output=True, text=True, timeout=120)
    config_dir = Path(where.stdout.strip())
    assert config_dir.is_relative_to(venv) and (config_dir / "train.yaml").is_file(), where.stdout + where.stderr

    proc = subprocess.run([str(venv / "bin" / "rtda-train"), "--config-dir", "conf", "experiment=my_short_run",
                           *tiny_overrides(tiny_demo_dir)], cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (project / "outputs" / "my_study" / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["choices"]["experiment"] == "my_short_run"
    assert results["choices"]["augmentation"] == "geometric"
    assert (venv / "bin" / "rtda-compare").is_file()
