"""The README's SLURM commands as three scenarios on a real single-node SLURM (``bash scripts/slurm_local.sh start``),
started together when the session starts (``tests/conftest.py``) and checked by ``tests/test_slurm.py``.

Their jobs spend most of their time waiting on the scheduler — a time-limit check, a requeue, a job's start — not on
the CPU, so they run beside the rest of the suite instead of after it. Each scenario does its own checks and returns
what it saw; an assertion inside it reaches the test through its future. The waits are upper bounds for a loaded
2-core machine: they return as soon as the awaited thing happens.

SLURM holds a requeued job for ~120 s (BeginTime); the scenarios release it at once (``scontrol update StartTime=now``).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from helpers import ENV, tiny_overrides

# 1 CPU per job (no loader workers) so that two jobs share the node; tiny images
JOB = ["trainer.val_check_interval=10", "trainer.log_every_n_steps=1", "data.batch_size=2", "data.num_workers=0",
       "data.source_size=[36,64]", "data.target_size=[32,64]", "callbacks.periodic_checkpoint.every_n_train_steps=4"]

#: every process a scenario started (killed at the end of the session if still alive) and every SLURM job id
STARTED: list[subprocess.Popen] = []
JOB_IDS: set[str] = set()


def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10, env=ENV)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.strip(" *") in ("idle", "mixed", "allocated") for s in out.stdout.split())


def squeue(job: str) -> tuple[str, str] | None:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True, env=ENV).stdout.split()
    return (out[0], out[1]) if len(out) >= 2 else None


def release_if_held(job: str) -> None:
    """A requeued job waits ~120 s (BeginTime) before it may start again: start it now."""
    state = squeue(job)
    if state and state[0] == "PENDING" and state[1] == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, env=ENV)


def wait(predicate, timeout: float, what: str, release: tuple[str, ...] = ()) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        for job in release:
            release_if_held(job)
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_ids(sweep: Path) -> dict[int, str]:
    """Sweep job number -> SLURM job id (``<array>_<n>``, or ``<id>`` for a sweep of one job), from submitit's folders."""
    ids = {}
    for submitted in (sweep / ".submitit").glob("*/*_submitted.pkl"):
        slurm_id = submitted.parent.name
        ids[int(slurm_id.partition("_")[2] or 0)] = slurm_id
    JOB_IDS.update(ids.values())
    return ids


def training_steps(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def results(run: Path) -> dict:
    try:
        return json.loads((run / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
        return {}


def launch_sweep(args: list[str], cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["rtda-train", "-m", "hydra/launcher=slurm", "hydra.launcher.timeout_min=10", *args],
                            cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    STARTED.append(proc)
    return proc


def preempted_and_killed_sweep(data_dir: Path, tmp: Path) -> dict:
    """A two-job sweep: job 0 preempted (submitit's USR2) resumes with every iteration once; the sweep is killed
    while job 1 runs (launcher and job); the same command finishes it without training job 0 again; rtda-compare
    reads the sweep folder."""
    sweep = tmp / "sweep"
    args = [f"hydra.sweep.dir={sweep}", "hydra.launcher.array_parallelism=1", "trainer.max_steps=30", "seed=0,1",
            *JOB, *tiny_overrides(data_dir)]
    first = launch_sweep(args, tmp)
    job0, job1 = sweep / "0_seed-0", sweep / "1_seed-1"
    wait(lambda: (job0 / "checkpoints" / "last.ckpt").is_file(), 400, "job 0's first checkpoint")
    ids = job_ids(sweep)
    subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True, env=ENV)  # preemption: submitit's signal
    wait(lambda: results(job0).get("status") == "interrupted", 120, "job 0 to stop at an iteration boundary")
    assert results(job0)["requeued"] is True

    # while job 0 waits to be started again, job 1 runs: the sweep is killed there (its launcher and job 1)
    wait(lambda: (job1 / "checkpoints" / "last.ckpt").is_file(), 400, "job 1's first checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    subprocess.run(["scancel", job_ids(sweep)[1]], check=True, env=ENV)
    wait(lambda: squeue(job_ids(sweep)[1]) is None, 120, "job 1 to be cancelled")
    assert results(job1)["status"] != "completed"

    wait(lambda: results(job0).get("status") == "completed", 400, "job 0 to resume and complete", release=(ids[0],))
    assert training_steps(job0) == list(range(30))  # every iteration once across the requeue
    done_before = (job0 / "results.json").read_text()

    again = launch_sweep(args, tmp)  # the same command, the same sweep folder
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").glob("*/*_0_log.out"))
    assert "rtda: job 0_seed-0: completed, skipped" in logs
    assert (job0 / "results.json").read_text() == done_before  # not trained, not rewritten
    assert results(job1)["status"] == "completed" and results(job1)["resumed_from"]["iteration"] > 0
    assert training_steps(job1) == list(range(30))

    compared = subprocess.run(["rtda-compare", str(sweep)], env=ENV, capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr
    with open(sweep / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"sweep": sweep, "rows": rows, "entries": {p.name for p in sweep.iterdir() if not p.name.startswith(".")}}


def plain_sbatch_recipe(data_dir: Path, tmp: Path) -> dict:
    """``sbatch --requeue --signal=SIGUSR1@60`` + ``srun rtda-train``: SIGUSR1 saves the iteration and requeues; the
    final results.json scores the final weights (rtda-eval of last.ckpt) with the best validation of metrics.csv."""
    # with a loader worker: SLURM delivers the signal to every process of the step, workers included
    command = " ".join(["srun", sys.executable, "-m", "rtda.cli.train", "trainer.max_steps=30", "seed=0", *JOB,
                        "data.num_workers=1", *tiny_overrides(data_dir)])
    submitted = subprocess.run(["sbatch", "--parsable", "--requeue", "--signal=SIGUSR1@60", "--time=10", "--ntasks=1",
                                "--cpus-per-task=1", f"--chdir={tmp}", f"--output={tmp}/slurm-%j.out",
                                "--wrap", command], env=ENV, capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    JOB_IDS.add(job)
    run = tmp / "outputs" / "train" / "runs" / f"slurm-{job}"
    wait(lambda: (run / "checkpoints" / "last.ckpt").is_file(), 400, "the job's first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=ENV)
    wait(lambda: results(run).get("status") == "interrupted", 120, "the job to save and requeue itself")
    interrupted = results(run)
    wait(lambda: results(run).get("status") in ("completed", "failed"), 400, "the requeued job to finish",
         release=(job,))
    evaluated = subprocess.run(["rtda-eval", f"ckpt_path={run}/checkpoints/last.ckpt", f"paths.data_dir={data_dir}"],
                               cwd=tmp, env=ENV, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = json.loads(next((tmp / "outputs" / "eval").rglob("results.json")).read_text())
    return {"run": run, "interrupted": interrupted, "results": results(run), "scored": scored}


def time_limited_job(data_dir: Path, tmp: Path) -> dict:
    """One submitit job whose time limit is cut to 1 minute once it trains (``scontrol update TimeLimit=1``), so that
    SLURM itself signals it (USR2, ``signal_delay_s`` before the limit) at its next time-limit check: submitit
    requeues it, rtda saves the iteration first; the limit is given back to the pending job, which resumes and
    completes."""
    # the default sweep folder (stamped on the login node), as the README's command: the jobs must land in it
    proc = launch_sweep(["hydra.launcher.signal_delay_s=90", "trainer.max_steps=120", "seed=0", *JOB,
                         *tiny_overrides(data_dir)], tmp)
    multiruns = tmp / "outputs" / "train" / "multiruns"
    wait(lambda: multiruns.is_dir() and any(multiruns.iterdir()), 120, "the sweep folder")
    (sweep,) = list(multiruns.iterdir())
    job = sweep / "0"  # one job, nothing swept: named by its number
    wait(lambda: (job / "checkpoints" / "last.ckpt").is_file(), 400, "the job's first checkpoint")
    slurm_id = job_ids(sweep)[0]
    subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "TimeLimit=1"], check=True, capture_output=True, env=ENV)
    wait(lambda: results(job).get("status") == "interrupted", 240, "SLURM's time-limit signal")
    interrupted = results(job)
    subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "TimeLimit=10"], check=True, capture_output=True, env=ENV)
    wait(lambda: proc.poll() is not None, 480, "the requeued job to complete", release=(slurm_id,))
    return {"returncode": proc.returncode, "out": proc.stdout.read(), "multiruns": multiruns, "sweep": sweep,
            "job": job, "interrupted": interrupted}


SCENARIOS = {"sweep": preempted_and_killed_sweep, "sbatch": plain_sbatch_recipe, "time_limit": time_limited_job}


def start(data_dir: Path, tmp_path_factory, shared: Path | None = None) -> tuple[ThreadPoolExecutor, dict[str, Future]]:
    """Every scenario started now, each in a thread of its own and a folder of its own. With ``shared`` (a folder
    every pytest-xdist worker sees), each outcome — what the scenario returned, or what it raised — is also pickled
    there when it ends, for the worker that runs its test (:class:`Outcome`)."""
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS), thread_name_prefix="slurm")
    futures = {name: pool.submit(run, data_dir, tmp_path_factory.mktemp(f"slurm_{name}"))
               for name, run in SCENARIOS.items()}
    if shared is not None:
        for name, future in futures.items():
            future.add_done_callback(lambda f, name=name: _publish(f, shared / f"slurm_{name}.pickle"))
    return pool, futures


def _publish(future: Future, path: Path) -> None:
    if future.cancelled():
        return
    error = future.exception()
    outcome = ("raised", error) if error is not None else ("returned", future.result())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(outcome))
    tmp.replace(path)  # whole or absent for the reader


class Outcome:
    """A scenario another pytest-xdist worker runs, read from the file it pickles at its end: ``result`` as a
    :class:`Future`'s (the scenario's value, or its exception raised here)."""

    def __init__(self, path: Path):
        self.path = path

    def result(self, timeout: float):
        end = time.time() + timeout
        while not self.path.is_file():
            if time.time() > end:
                raise TimeoutError(f"no outcome of the SLURM scenario in {self.path} after {timeout:.0f} s")
            time.sleep(2)
        kind, value = pickle.loads(self.path.read_bytes())
        if kind == "raised":
            raise value
        return value


def outcomes(shared: Path) -> dict[str, Outcome]:
    return {name: Outcome(shared / f"slurm_{name}.pickle") for name in SCENARIOS}


def stop(pool: ThreadPoolExecutor) -> None:
    """The session's end: what is still running is killed, and its jobs cancelled."""
    for proc in STARTED:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for job in JOB_IDS:
        subprocess.run(["scancel", job], capture_output=True, env=ENV)
    pool.shutdown(wait=False, cancel_futures=True)
