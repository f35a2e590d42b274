"""The README's SLURM commands on a real single-node SLURM (``bash scripts/slurm_local.sh start``; `.ci/run` starts it).

- a ``hydra/launcher=slurm`` sweep: its jobs land in ``<sweep>/<n>_seed-<s>`` and ``rtda-compare`` reads them; one job
  preempted (``scancel --signal=USR2``, submitit's signal) resumes and ends with every iteration once; the sweep is
  killed midway (launcher and jobs) and the same command finishes it without training the completed job again;
- a job that reaches its real time limit is requeued by submitit and resumes;
- the plain ``sbatch`` + ``srun`` recipe: ``SIGUSR1`` saves the iteration, requeues, and the final ``results.json``
  scores the final weights (``rtda-eval`` of ``last.ckpt``) with the best validation of ``metrics.csv``.

The scenarios (``tests/helpers/slurm.py``) start with the session and run beside the other tests (their jobs mostly
wait on the scheduler); each test here waits for its scenario and checks what it saw.
"""

import csv

import pytest
from helpers.slurm import results as read_results
from helpers.slurm import slurm_up, training_steps

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(
    not slurm_up(), reason="no SLURM running here: `bash scripts/slurm_local.sh start` (root) starts a one-node one")]

#: seconds a test waits for its scenario beyond the time the suite has already given it
TIMEOUT = 1200


def test_a_sweep_lands_in_its_folder_survives_preemption_and_a_kill_and_is_compared(slurm_scenarios):
    seen = slurm_scenarios["sweep"].result(timeout=TIMEOUT)  # the preemption, kill and resume checks ran inside
    (row,) = seen["rows"]
    assert (row["runs"], row["seeds"]) == ("2", "0 1")  # both jobs, one group, once each
    assert seen["entries"] >= {"0_seed-0", "1_seed-1", "comparison.csv"}


def test_the_plain_sbatch_recipe_requeues_on_sigusr1_and_scores_the_final_weights(slurm_scenarios):
    seen = slurm_scenarios["sbatch"].result(timeout=TIMEOUT)
    run, interrupted, results = seen["run"], seen["interrupted"], seen["results"]
    assert interrupted["requeued"] is True
    assert results["status"] == "completed", results.get("error")
    assert results["resumed_from"]["iteration"] == interrupted["interrupted_at"]
    assert training_steps(run) == list(range(30))  # no step shifted or repeated by the requeue
    assert not list(run.glob("hpc_ckpt_*.ckpt")) and not list((run / "checkpoints").glob("last-v*.ckpt"))
    with open(run / "csv" / "metrics.csv", newline="") as f:
        val = [float(r["val/mIoU"]) for r in csv.DictReader(f) if r.get("val/mIoU")]
    assert len(val) == 3 and results["best_val_mIoU"] == pytest.approx(max(val), abs=1e-6)
    assert results["test/mIoU"] == pytest.approx(seen["scored"]["test/mIoU"], abs=1e-6)  # the final weights


def test_a_job_at_its_time_limit_is_requeued_and_resumes(slurm_scenarios):
    seen = slurm_scenarios["time_limit"].result(timeout=TIMEOUT)
    out, job = seen["out"], seen["job"]
    assert seen["returncode"] == 0, out[-3000:]
    # the job landed in the sweep folder the login node printed, named by its number; no slurm-<id> folder beside it
    assert list(seen["multiruns"].iterdir()) == [seen["sweep"]]
    assert f"sweep output dir : {seen['sweep']}" in out
    assert seen["interrupted"]["requeued"] is True and seen["interrupted"]["error"].startswith("SIGUSR2 at iteration")
    results = read_results(job)
    assert results["status"] == "completed"
    assert results["resumed_from"]["iteration"] == seen["interrupted"]["interrupted_at"]
    assert "resumed from iteration" in (job / "train.log").read_text()
    assert training_steps(job) == list(range(120))
