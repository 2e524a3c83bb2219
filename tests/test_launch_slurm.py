"""`sbatch launch/slurm.sh` on a real local SLURM (1 and 2 emulated nodes, CPU only)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests._mp import PYTHON, REPO, base_env
from tests.conftest import TINY
from tests.slurm_util import (job_info, job_output, signal_batch, slurm_cluster, slurm_cmd,  # noqa: F401
                              wait_job)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
SCRIPT = str(REPO / "launch" / "slurm.sh")


def job_env(cluster, **extra: str) -> dict:
    env = base_env(**extra)
    env.update(cluster.env)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env['PATH']}"
    env.update(PYTHON=PYTHON, GAN_DIST_REPO=str(REPO))
    return env


def submit(cluster, tmp_path: Path, *args: str, sbatch_args: tuple = (), **extra: str):
    env = job_env(cluster, **extra)
    r = slurm_cmd("sbatch", "--parsable", *sbatch_args, SCRIPT, *args, env=env, cwd=tmp_path)
    return r, env


def run_info(path: Path) -> dict:
    return json.loads((path / "run_info.json").read_text())


@pytest.mark.parametrize("nodes, nproc", [(1, 2), (2, 1)])
def test_sbatch_runs_one_job_of_the_right_world_size(slurm_cluster, tmp_path, nodes, nproc):
    r, env = submit(slurm_cluster, tmp_path, *TINY, sbatch_args=(f"--nodes={nodes}",),
                    NPROC_PER_NODE=str(nproc))
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.strip().split(";")[0])
    state = wait_job(job, timeout=240, env=env)
    out = job_output(job, env=env)
    assert state == "COMPLETED", out
    info = run_info(tmp_path / "runs" / f"slurm-{job}")   # the default run.dir under SLURM
    assert info["world_size"] == nodes * nproc and info["num_nodes"] == nodes, out
    assert info["strategy"] == "ddp" and info["status"] == "finished"
    assert info["steps"] == 4


def test_bare_sbatch_from_a_fresh_checkout_runs_on_two_nodes(slurm_cluster, tmp_path):
    """The command as README shows it, typed in a checkout nobody prepared (no logs/ folder, no
    GAN_DIST_REPO or PYTHON set, only the virtual environment on PATH)."""
    checkout = tmp_path / "checkout"
    for part in ("gan_dist", "launch", "configs"):
        shutil.copytree(REPO / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = base_env()
    env.pop("PYTHONPATH", None)
    env.update(slurm_cluster.env)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env['PATH']}"
    r = slurm_cmd("sbatch", "--nodes", "2", "launch/slurm.sh", *TINY, env=env, cwd=checkout)
    assert r.returncode == 0, r.stdout + r.stderr
    job = int(re.fullmatch(r"Submitted batch job (\d+)\s*", r.stdout).group(1))
    state = wait_job(job, timeout=240, env=env)
    log = checkout / f"slurm-gan_dist-{job}.out"  # in the submit directory, as SLURM users expect
    assert log.is_file(), sorted(p.name for p in checkout.iterdir())
    out = log.read_text()
    assert state == "COMPLETED", out
    assert job_info(job, env=env)["StdOut"] == str(log)
    assert "nodes=2 processes/node=1 world=2" in out and "training finished" in out, out
    info = run_info(checkout / "runs" / f"slurm-{job}")
    assert info["world_size"] == 2 and info["num_nodes"] == 2 and info["status"] == "finished", out
    assert not (checkout / "logs").exists()


def test_missing_config_file_fails_the_job_with_a_clear_error(slurm_cluster, tmp_path):
    r, env = submit(slurm_cluster, tmp_path, "--config", "configs/nope.yaml")
    job = int(r.stdout.strip().split(";")[0])
    assert wait_job(job, timeout=120, env=env) == "FAILED"
    out = job_output(job, env=env)
    assert "nope.yaml" in out and "does not exist" in out and "not starting" in out


def test_unknown_override_fails_the_job_naming_the_key(slurm_cluster, tmp_path):
    r, env = submit(slurm_cluster, tmp_path, *TINY, "train.stepz=3")
    job = int(r.stdout.strip().split(";")[0])
    assert wait_job(job, timeout=120, env=env) == "FAILED"
    assert "train.stepz" in job_output(job, env=env)
    assert job_info(job, env=env)["ExitCode"].startswith("2:")


def test_more_nodes_than_the_partition_has_is_refused_at_submission(slurm_cluster, tmp_path):
    r, _ = submit(slurm_cluster, tmp_path, *TINY, sbatch_args=("--nodes=3",))
    assert r.returncode != 0
    assert "submission failed" in r.stderr.lower(), r.stderr  # SLURM says why (nodes/processors)


@pytest.mark.timeout(600)  # 200 steps in two runs plus a requeue: minutes on a busy 2-core machine
def test_usr1_checkpoints_requeues_and_the_second_run_resumes(slurm_cluster, tmp_path):
    """What happens near the time limit (--signal=B:USR1@N): checkpoint, requeue, resume."""
    steps = 200
    args = [*TINY, "model.dcgan.ngf=32", "model.dcgan.ndf=32", "train.batch_size=32", f"train.steps={steps}",
            "train.ckpt_every=100000", "eval.every=0"]
    r, env = submit(slurm_cluster, tmp_path, *args, NPROC_PER_NODE="1")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.strip().split(";")[0])
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    deadline = time.monotonic() + 120
    while not ((run_dir / "run_info.json").is_file() and run_info(run_dir)["status"] == "running"):
        assert time.monotonic() < deadline, job_output(job, env=env)
        time.sleep(0.5)
    time.sleep(4)  # some steps into training
    signal_batch(job, "USR1", env=env)
    state = wait_job(job, timeout=540, env=env)
    out = job_output(job, env=env)
    assert state == "COMPLETED", out
    assert int(job_info(job, env=env)["Restarts"]) == 1, out
    assert "requeueing" in out
    info = run_info(run_dir)
    assert info["status"] == "finished" and info["steps"] == steps, out
    assert info["resumed_from"], out  # the second run started from the USR1 checkpoint
    first_stop = [line for line in out.splitlines() if "resumed from" in line]
    assert first_stop and " at step " in first_stop[-1]
    resumed_step = int(first_stop[-1].split(" at step ")[1].split()[0])
    assert 0 < resumed_step < steps, out
