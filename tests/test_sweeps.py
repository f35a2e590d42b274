"""Experiments at scale: sweep folders, parallel jobs on one data folder, W&B runs per job, the SLURM launcher."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ENV, TINY_DEMO, compose_config, rtda_train, run_in_process, tiny_overrides
from omegaconf import OmegaConf

from rtda.run import resolvers
from rtda.run.launchers import main as launchers_main

TINY_RUN = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=2", "data.num_workers=0",
            "data.source_size=[36,64]", "data.target_size=[32,64]", "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1"]


# -- folders ------------------------------------------------------------------------------------------------


def test_sweep_job_folder_names_the_swept_values(tmp_path):
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml({"hydra": {"overrides": {"task": [
        "adaptation=source_only,advent", "seed=range(0,3)", "paths.data_dir=/data/x", "optimizer.lr=0.01"]}}}))
    job = ["adaptation=advent", "seed=2", "paths.data_dir=/data/x", "optimizer.lr=0.01"]
    assert resolvers.job_dirname(4, str(tmp_path), job) == "4_adaptation-advent_seed-2"
    assert resolvers.job_dirname(4, str(tmp_path / "elsewhere"), job) == "4"  # no multirun.yaml: the number
    long = resolvers.job_dirname(0, str(tmp_path), ["adaptation=" + "x" * 300, "seed=1"])
    assert len(long) <= 120 and long.startswith("0_adaptation-xxx") and "/" not in long


def test_a_job_folder_passes_as_an_unquoted_override(tmp_path):
    """`rtda-eval ckpt_path=<sweep job>/checkpoints/last.ckpt` and `ckpt_path=[a,b]` must parse without quotes:
    no "=" nor "," in a job folder's name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml({"hydra": {"overrides": {"task": [
        "adaptation.beta=0.01,0.05", "model.adaptation_levels=[out],[out,context16]"]}}}))
    name = resolvers.job_dirname(1, str(tmp_path), ["adaptation.beta=0.05", "model.adaptation_levels=[out,context16]"])
    assert name.startswith("1_adaptation.beta-0.05_model.adaptation_levels-")
    path = f"outputs/train/multiruns/2026-11-28_05-00-00/{name}/checkpoints/last.ckpt"
    parsed = OverridesParser.create().parse_overrides([f"ckpt_path={path}", f"ckpt_path=[{path},{path}]"])
    assert parsed[0].value() == path and parsed[1].value() == [path, path]


def test_values_with_slashes_stay_one_folder_level():
    assert resolvers.safe_name("paths.data_dir=/a/b c") == "paths.data_dir_a_b_c"


def test_run_folder_comes_from_run_name_then_slurm_job_then_the_time(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert resolvers.run_name("baseline", "STAMP") == "baseline"
    assert resolvers.run_name(None, "STAMP") == "STAMP"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued job keeps its id: the same folder
    assert resolvers.run_name(None, "STAMP") == "slurm-4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert resolvers.run_name(None, "STAMP") == "slurm-4200_7"
    assert resolvers.run_name("mine", "STAMP") == "mine"


def test_composed_run_dir_uses_run_name(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = compose_config("train", ["run_name=gta5/advent seed 1"])
    assert cfg.hydra.run.dir.endswith("outputs/train/runs/gta5_advent_seed_1")
    assert cfg.ckpt_path == "auto"  # rerunning the command resumes the run in that folder


# -- parallel sweep on a fresh data folder ------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_sweep_jobs_build_the_demo_once_and_both_complete(tmp_path):
    """hydra/launcher=parallel with 2 jobs at once on a data folder without the demo: both jobs ask for it at
    the same moment; it is generated once, under a lock, and both runs train on the complete folder."""
    data = tmp_path / "data"
    demo = [f"paths.data_dir={data}"] + [f"+data.prepare.{k}={v}" for k, v in TINY_DEMO.items() if k != "seed"]
    args = ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "seed=1,2", *TINY_RUN, *demo]
    proc = subprocess.run(["rtda-train", *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_seed-1", "1_seed-2"]
    for job in jobs:
        assert json.loads((sweep / job / "results.json").read_text())["status"] == "completed"
    assert not [p.name for p in data.iterdir() if ".tmp-" in p.name]  # no temporary folder left
    assert {p.name for p in data.iterdir()} <= {"demo", "demo.lock", "demo.readers"}
    assert json.loads((data / "demo" / "demo.json").read_text())["source_count"] == TINY_DEMO["source_count"]
    assert len(list((data / "demo" / "gta5" / "images").glob("*.png"))) == TINY_DEMO["source_count"]


@pytest.mark.parametrize("gpus,jobs", [(0, 1), (3, 3)])
def test_parallel_launcher_composes_one_job_per_device(monkeypatch, gpus, jobs):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    cfg = compose_config("train", ["hydra/launcher=parallel"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == jobs  # one job per GPU; one on a machine without


# -- W&B ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_offline_sweep_gives_one_run_per_job_with_group_tags_and_status(tiny_demo_dir, tmp_path):
    from wandb_records import history_keys, records, run_record

    from rtda.run.loggers import run_id

    env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    env["HOME"] = str(tmp_path)  # not logged in: offline by itself, never prompts
    args = ["-m", "optimizer.lr=1e6,0.01", "logger=many", "trainer.max_steps=3", "trainer.val_check_interval=1",
            "data.batch_size=2", "data.num_workers=0", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
            *tiny_overrides(tiny_demo_dir)]
    proc = subprocess.run(["rtda-train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "training diverged" in proc.stderr, proc.stderr[-3000:]  # job 0 diverges
    assert proc.stdout.count("wandb sync ") == 2
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    runs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        (file,) = job.glob("wandb/offline-run-*/*.wandb")  # exactly one W&B run per job, in the job's folder
        runs[job.name] = file
        run = run_record(file)
        assert run.run_id == run_id(job)  # derived from the folder: a resumed job appends to it
        assert run.run_group == f"sweep-{sweep.name}" and run.job_type == "train"
        assert {"adaptation=source_only", "model=bisenet_r18", "data=demo"} <= set(run.tags)
    assert sorted(runs) == ["0_optimizer.lr-1000000.0", "1_optimizer.lr-0.01"]
    exits = {name: [r.exit.exit_code for r in records(f) if r.WhichOneof("record_type") == "exit"] for name, f in runs.items()}
    assert exits == {"0_optimizer.lr-1000000.0": [1], "1_optimizer.lr-0.01": [0]}  # the failed job is marked failed
    keys = history_keys(runs["1_optimizer.lr-0.01"])
    assert {"val/mIoU", "test/mIoU", "val/segmentation/all_masks", "test/IoU_per_class/nrows"} <= keys
    config = {u.key for r in records(runs["1_optimizer.lr-0.01"]) if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert {"trainer", "data", "model", "optimizer", "git_revision"} <= config  # the resolved config
    masks = list(runs["1_optimizer.lr-0.01"].parent.glob("files/media/images/mask/**/*.png"))
    assert masks, "segmentation masks (prediction, ground truth) saved with the validation images"


# -- SLURM --------------------------------------------------------------------------------------------------


def test_slurm_launcher_derives_resources_from_the_trainer():
    cfg = compose_config("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "+trainer.num_nodes=2",
                         "data.num_workers=4", "hydra.launcher.partition=gpu",
                         'hydra.launcher.setup=["module load cuda"]', "hydra.sweep.dir=/scratch/sweep"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["nodes"] == 2 and launcher["tasks_per_node"] == 4 and launcher["gpus_per_node"] == 4
    assert launcher["cpus_per_task"] == 9 and launcher["max_num_timeout"] > 0 and launcher["timeout_min"] > 0
    assert launcher["setup"] == ["module load cuda"] and launcher["submitit_folder"] == "/scratch/sweep/.submitit/%j"
    cpu = OmegaConf.to_container(compose_config("train", ["hydra/launcher=slurm"]).hydra.launcher, resolve=True)
    assert cpu["tasks_per_node"] == 1 and cpu["gpus_per_node"] is None and cpu["nodes"] == 1


def test_slurm_launcher_composes_from_the_command_line(tmp_path):
    proc = rtda_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "--cfg", "hydra"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    launcher = OmegaConf.create(proc.stdout).hydra.launcher if proc.stdout.startswith("hydra:") else \
        OmegaConf.create(proc.stdout).launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert "tasks_per_node" in launcher and "max_num_timeout" in launcher and "setup" in launcher


def test_slurm_dry_run_prints_the_sbatch_script(tmp_path):
    proc = run_in_process(launchers_main, ["trainer=ddp", "trainer.devices=2", "+trainer.num_nodes=1", "hydra.launcher.timeout_min=90",
                                     'hydra.launcher.setup=["source ~/env/bin/activate"]'], tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90", "#SBATCH --signal=USR2@",
                 "source ~/env/bin/activate", "srun "):
        assert line in script, script


def test_slurm_with_all_devices_asks_for_a_number(tmp_path):
    proc = run_in_process(launchers_main, ["trainer=ddp", "trainer.devices=auto"], tmp_path)
    assert proc.returncode == 1 and "trainer.devices='auto'" in proc.stderr and "trainer.devices=4" in proc.stderr


def test_lightnings_slurm_requeue_is_always_off_and_checkpoints_are_written_whole(monkeypatch):
    """Inside any SLURM job Lightning's auto-requeue (hpc_ckpt saved from the signal handler, mid-iteration) is off:
    submitit requeues its jobs, rtda.run.callbacks.GracefulStop plain sbatch ones. Checkpoints go through rtda's
    whole-or-nothing writer everywhere."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from rtda.run.checkpoints import AtomicCheckpointIO
    from rtda.run.launchers import trainer_plugins

    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    (writer,) = trainer_plugins()["plugins"]
    assert isinstance(writer, AtomicCheckpointIO)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "rtda-train")
    for launcher in (["hydra/launcher=slurm"], []):
        compose_config("train", launcher)
        writer, environment = trainer_plugins()["plugins"]
        assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


def test_ddp_uses_every_gpu_of_the_node_unless_told():
    assert compose_config("train", ["trainer=ddp"]).trainer.devices == "auto"
    assert compose_config("train", ["trainer=ddp", "trainer.devices=2"]).trainer.devices == 2
    from rtda.run.ddp import launches_processes

    assert launches_processes(compose_config("train", ["trainer=ddp"]).trainer)  # one process per GPU, this job's folder


READER = """
import json, sys, time
from rtda.run.files import holding_read_locks
from rtda.data.demo import ensure_demo
root, gap, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
with holding_read_locks():  # what rtda-train does around a job
    ensure_demo(root, seed=0, gap=gap, source_count=2, target_train_count=1, target_val_count=1)
    print("reading", time.time(), flush=True)
    time.sleep(hold)
    intact = json.load(open(root + "/demo.json"))["gap"] == gap
    print("done", time.time(), intact, flush=True)
"""


def test_a_sweep_over_a_data_knob_never_replaces_the_demo_a_job_is_reading(tmp_path):
    """Job A trains on the demo with gap 0.4; job B (gap 0.8) starts meanwhile: B generates its copy, but swaps
    it in only after A has finished reading the old one."""
    root = str(tmp_path / "demo")
    a = subprocess.Popen([sys.executable, "-c", READER, root, "0.4", "3"], env=ENV, stdout=subprocess.PIPE, text=True)
    line = a.stdout.readline()
    while line and not line.startswith("reading"):  # "rtda: wrote the demo ..." first
        line = a.stdout.readline()
    assert line.startswith("reading"), line
    b = subprocess.run([sys.executable, "-c", READER, root, "0.8", "0"], env=ENV, capture_output=True, text=True, timeout=120)
    rest = a.communicate(timeout=120)[0].split()
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    a_done, a_intact = float(rest[1]), rest[2]
    b_reading = float(next(ln for ln in b.stdout.splitlines() if ln.startswith("reading")).split()[1])
    assert a_intact == "True"  # A's demo was never replaced under it
    assert b_reading >= a_done  # B waited for A, then used its own spec
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["gap"] == 0.8
    assert not list(tmp_path.glob("demo.tmp-*"))
