"""The README's SLURM commands on a real single-node SLURM (``bash scripts/slurm_local.sh start``; `.ci/run` starts it).

- a ``hydra/launcher=slurm`` sweep: its jobs land in ``<sweep>/<n>_seed-<s>`` and ``rtda-compare`` reads them; one job
  preempted (``scancel --signal=USR2``, submitit's signal) resumes and ends with every iteration once; the sweep is
  killed midway (launcher and jobs) and the same command finishes it without training the completed job again;
- a job that reaches its real time limit is requeued by submitit and resumes;
- the plain ``sbatch`` + ``srun`` recipe: ``SIGUSR1`` saves the iteration, requeues, and the final ``results.json``
  scores the final weights (``rtda-eval`` of ``last.ckpt``) with the best validation of ``metrics.csv``.

SLURM holds a requeued job for ~120 s (BeginTime); the tests release it at once (``scontrol update StartTime=now``).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ENV, tiny_overrides


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.strip(" *") in ("idle", "mixed", "allocated") for s in out.stdout.split())


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    not _slurm_up(), reason="no SLURM running here: `bash scripts/slurm_local.sh start` (root) starts a one-node one")]

# 1 CPU per job (no loader workers) so that two jobs share the node; tiny images
JOB = ["trainer.val_check_interval=10", "trainer.log_every_n_steps=1", "data.batch_size=2", "data.num_workers=0",
       "data.source_size=[36,64]", "data.target_size=[32,64]", "callbacks.periodic_checkpoint.every_n_train_steps=4"]


def _squeue(job: str) -> tuple[str, str] | None:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout.split()
    return (out[0], out[1]) if len(out) >= 2 else None


def _release_if_held(job: str) -> None:
    """A requeued job waits ~120 s (BeginTime) before it may start again: start it now."""
    state = _squeue(job)
    if state and state[0] == "PENDING" and state[1] == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def _wait(predicate, timeout: float, what: str, release: tuple[str, ...] = ()) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        for job in release:
            _release_if_held(job)
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _job_ids(sweep: Path) -> dict[int, str]:
    """Sweep job number -> SLURM job id (``<array>_<n>``, or ``<id>`` for a sweep of one job), from submitit's folders."""
    ids = {}
    for pickle in (sweep / ".submitit").glob("*/*_submitted.pkl"):
        slurm_id = pickle.parent.name
        ids[int(slurm_id.partition("_")[2] or 0)] = slurm_id
    return ids


def _training_steps(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _sweep(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(["rtda-train", "-m", "hydra/launcher=slurm", "hydra.launcher.timeout_min=10", *args],
                            cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def time_limited_job(tiny_demo_dir, tmp_path_factory):
    """Started first, running beside the other tests: one submitit job whose time limit is cut to 1 minute once it
    trains (``scontrol update TimeLimit=1``), so that SLURM itself signals it (USR2, ``signal_delay_s`` before the
    limit) at its next time-limit check: submitit requeues it, rtda saves the iteration first; the limit is given
    back to the pending job, which resumes and completes."""
    cwd = tmp_path_factory.mktemp("time_limit")
    # the default sweep folder (stamped on the login node), as the README's command: the jobs must land in it
    proc = _sweep(["hydra.launcher.signal_delay_s=90", "trainer.max_steps=120", "seed=0", *JOB,
                   *tiny_overrides(tiny_demo_dir)], cwd)
    multiruns = cwd / "outputs" / "train" / "multiruns"
    seen: dict = {}

    def drive():
        try:
            _wait(lambda: multiruns.is_dir() and any(multiruns.iterdir()), 60, "the sweep folder")
            (sweep,) = list(multiruns.iterdir())
            seen["sweep"] = sweep
            job = sweep / "0"  # one job, nothing swept: named by its number
            _wait(lambda: (job / "checkpoints" / "last.ckpt").is_file(), 180, "the job's first checkpoint")
            slurm_id = _job_ids(sweep)[0]
            subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "TimeLimit=1"], check=True, capture_output=True)
            _wait(lambda: _results(job).get("status") == "interrupted", 120, "SLURM's time-limit signal")
            seen["interrupted"] = _results(job)
            subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "TimeLimit=10"], check=True, capture_output=True)
            _wait(lambda: proc.poll() is not None, 240, "the requeued job to complete", release=(slurm_id,))
        except BaseException as err:  # reported by the test
            seen["error"] = err

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    yield {"proc": proc, "multiruns": multiruns, "thread": thread, "seen": seen}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    if "sweep" in seen:
        for slurm_id in _job_ids(seen["sweep"]).values():
            subprocess.run(["scancel", slurm_id], capture_output=True)


def test_a_sweep_lands_in_its_folder_survives_preemption_and_a_kill_and_is_compared(time_limited_job, tiny_demo_dir,
                                                                                     tmp_path):
    sweep = tmp_path / "sweep"
    args = [f"hydra.sweep.dir={sweep}", "hydra.launcher.array_parallelism=1", "trainer.max_steps=30", "seed=0,1",
            *JOB, *tiny_overrides(tiny_demo_dir)]
    first = _sweep(args, tmp_path)
    job0, job1 = sweep / "0_seed-0", sweep / "1_seed-1"
    _wait(lambda: (job0 / "checkpoints" / "last.ckpt").is_file(), 120, "job 0's first checkpoint")
    ids = _job_ids(sweep)
    subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True)  # preemption: submitit's signal
    _wait(lambda: _results(job0).get("status") == "interrupted", 60, "job 0 to stop at an iteration boundary")
    assert _results(job0)["requeued"] is True

    # while job 0 waits to be started again, job 1 runs: the sweep is killed there (its launcher and job 1)
    _wait(lambda: (job1 / "checkpoints" / "last.ckpt").is_file(), 120, "job 1's first checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    subprocess.run(["scancel", _job_ids(sweep)[1]], check=True)
    _wait(lambda: _squeue(_job_ids(sweep)[1]) is None, 60, "job 1 to be cancelled")
    assert _results(job1)["status"] != "completed"

    _wait(lambda: _results(job0).get("status") == "completed", 150, "job 0 to resume and complete", release=(ids[0],))
    assert _training_steps(job0) == list(range(30))  # every iteration once across the requeue
    done_before = (job0 / "results.json").read_text()

    again = _sweep(args, tmp_path)  # the same command, the same sweep folder
    out, _ = again.communicate(timeout=240)
    assert again.returncode == 0, out[-3000:]
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").glob("*/*_0_log.out"))
    assert "rtda: job 0_seed-0: completed, skipped" in logs
    assert (job0 / "results.json").read_text() == done_before  # not trained, not rewritten
    assert _results(job1)["status"] == "completed" and _results(job1)["resumed_from"]["iteration"] > 0
    assert _training_steps(job1) == list(range(30))

    compared = subprocess.run(["rtda-compare", str(sweep)], env=ENV, capture_output=True, text=True, timeout=120)
    assert compared.returncode == 0, compared.stderr
    with open(sweep / "comparison.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["runs"], row["seeds"]) == ("2", "0 1")  # both jobs, one group, once each
    assert {p.name for p in sweep.iterdir() if not p.name.startswith(".")} >= {"0_seed-0", "1_seed-1", "comparison.csv"}


def test_the_plain_sbatch_recipe_requeues_on_sigusr1_and_scores_the_final_weights(tiny_demo_dir, tmp_path):
    # with a loader worker: SLURM delivers the signal to every process of the step, workers included
    command = " ".join(["srun", sys.executable, "-m", "rtda.cli.train", "trainer.max_steps=30", "seed=0", *JOB,
                        "data.num_workers=1", *tiny_overrides(tiny_demo_dir)])
    submitted = subprocess.run(["sbatch", "--parsable", "--requeue", "--signal=SIGUSR1@60", "--time=10", "--ntasks=1",
                                "--cpus-per-task=1", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out",
                                "--wrap", command], env=ENV, capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    run = tmp_path / "outputs" / "train" / "runs" / f"slurm-{job}"
    _wait(lambda: (run / "checkpoints" / "last.ckpt").is_file(), 120, "the job's first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    _wait(lambda: _results(run).get("status") == "interrupted", 60, "the job to save and requeue itself")
    interrupted = _results(run)
    assert interrupted["requeued"] is True
    _wait(lambda: _results(run).get("status") in ("completed", "failed"), 180, "the requeued job to finish",
          release=(job,))
    results = _results(run)
    assert results["status"] == "completed", results.get("error")
    assert results["resumed_from"]["iteration"] == interrupted["interrupted_at"]
    assert _training_steps(run) == list(range(30))  # no step shifted or repeated by the requeue
    assert not list(run.glob("hpc_ckpt_*.ckpt")) and not list((run / "checkpoints").glob("last-v*.ckpt"))

    with open(run / "csv" / "metrics.csv", newline="") as f:
        val = [float(r["val/mIoU"]) for r in csv.DictReader(f) if r.get("val/mIoU")]
    assert len(val) == 3 and results["best_val_mIoU"] == pytest.approx(max(val), abs=1e-6)
    evaluated = subprocess.run(["rtda-eval", f"ckpt_path={run}/checkpoints/last.ckpt",
                                f"paths.data_dir={tiny_demo_dir}"], cwd=tmp_path, env=ENV, capture_output=True,
                               text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = json.loads(next((tmp_path / "outputs" / "eval").rglob("results.json")).read_text())
    assert results["test/mIoU"] == pytest.approx(scored["test/mIoU"], abs=1e-6)  # the final weights, not a stale file


def test_a_job_at_its_time_limit_is_requeued_and_resumes(time_limited_job):
    time_limited_job["thread"].join(timeout=360)
    seen, proc = time_limited_job["seen"], time_limited_job["proc"]
    if "error" in seen:
        raise seen["error"]
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    # the job landed in the sweep folder the login node printed, named by its number; no slurm-<id> folder beside it
    assert list(time_limited_job["multiruns"].iterdir()) == [seen["sweep"]]
    assert f"sweep output dir : {seen['sweep']}" in out
    job = seen["sweep"] / "0"
    assert seen["interrupted"]["requeued"] is True and seen["interrupted"]["error"].startswith("SIGUSR2 at iteration")
    results = _results(job)
    assert results["status"] == "completed"
    assert results["resumed_from"]["iteration"] == seen["interrupted"]["interrupted_at"]
    assert "resumed from iteration" in (job / "train.log").read_text()
    assert _training_steps(job) == list(range(120))
