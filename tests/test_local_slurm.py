"""The local SLURM cluster behaves like a real one: jobs run, span nodes, requeue, get signals,
and teardown leaves the machine as it was."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_util import (REPO, LocalSlurm, job_info, job_output, jobcomp_records, local_slurm,
                              sbatch, signal_batch, slurm_cluster, slurm_cmd, wait_job)  # noqa: F401


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_sbatch_hello_completes_on_one_node(slurm_cluster, tmp_path):
    job = sbatch("--nodes=1", f"--output={tmp_path}/hello-%j.out",
                 "--wrap", "echo hello from $SLURMD_NODENAME job $SLURM_JOB_ID",
                 env=slurm_cluster.env, cwd=tmp_path)
    assert wait_job(job, timeout=60, env=slurm_cluster.env) == "COMPLETED"
    out = job_output(job, env=slurm_cluster.env)
    assert (tmp_path / f"hello-{job}.out").read_text() == out
    assert out in {f"hello from {node} job {job}\n" for node in slurm_cluster.node_names}, out
    assert jobcomp_records(job, env=slurm_cluster.env)[-1]["JobState"] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_srun_two_nodes_gives_node_ids_0_and_1(slurm_cluster, tmp_path):
    r = slurm_cmd("srun", "--nodes=2", "--ntasks=2", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME $SLURM_PROCID",
                  env=slurm_cluster.env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = sorted(tuple(line.split()) for line in r.stdout.splitlines())
    assert rows == [("0", slurm_cluster.node_names[0], rows[0][2]), ("1", slurm_cluster.node_names[1], rows[1][2])], r.stdout
    assert sorted(row[2] for row in rows) == ["0", "1"], r.stdout


REQUEUE_SCRIPT = """#!/bin/bash
echo "run ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    scontrol requeue "$SLURM_JOB_ID" || { echo "requeue failed"; exit 3; }
    sleep 120
    echo "not requeued"
    exit 4
fi
echo "done"
"""


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_job_that_requeues_itself_runs_again_and_completes(slurm_cluster, tmp_path):
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_SCRIPT)
    job = sbatch("--requeue", "--open-mode=append", f"--output={tmp_path}/rq-%j.out", str(script),
                 env=slurm_cluster.env, cwd=tmp_path)
    assert wait_job(job, timeout=120, env=slurm_cluster.env) == "COMPLETED", job_output(job, env=slurm_cluster.env)
    out = job_output(job, env=slurm_cluster.env)
    runs = [line for line in out.splitlines() if line.startswith(("run ", "done", "not requeued", "requeue failed"))]
    assert runs == ["run 0", "run 1", "done"], out
    assert job_info(job, env=slurm_cluster.env)["Restarts"] == "1"
    assert [r["JobState"] for r in jobcomp_records(job, env=slurm_cluster.env)][-1] == "COMPLETED"


SIGNAL_SCRIPT = """#!/bin/bash
trap 'echo "got USR1"; exit 0' USR1
echo started
for i in $(seq 300); do sleep 1; done
echo "no signal"
exit 5
"""


@pytest.mark.slurm
@pytest.mark.timeout(150)
def test_signal_before_time_limit_reaches_batch_shell(slurm_cluster, tmp_path):
    # slurmctld checks time limits every 30 s and signals once the time left is at most
    # N + 30 s: with a 2 min limit and N = 90 the signal comes within about 30 s.
    script = tmp_path / "signal.sh"
    script.write_text(SIGNAL_SCRIPT)
    job = sbatch("--time=2", "--signal=B:USR1@90", f"--output={tmp_path}/sig-%j.out", str(script),
                 env=slurm_cluster.env, cwd=tmp_path)
    assert wait_job(job, timeout=110, env=slurm_cluster.env) == "COMPLETED", job_output(job, env=slurm_cluster.env)
    assert job_output(job, env=slurm_cluster.env).split() == ["started", "got", "USR1"]


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_signal_batch_delivers_now(slurm_cluster, tmp_path):
    script = tmp_path / "signal.sh"
    script.write_text(SIGNAL_SCRIPT)
    job = sbatch(f"--output={tmp_path}/sig-%j.out", str(script), env=slurm_cluster.env, cwd=tmp_path)
    wait_job(job, timeout=30, env=slurm_cluster.env, until={"RUNNING"})
    deadline = time.monotonic() + 30
    while "started" not in job_output(job, env=slurm_cluster.env):  # the trap is set before this line
        assert time.monotonic() < deadline, f"job {job} printed nothing in 30 s"
        time.sleep(0.2)
    signal_batch(job, "USR1", env=slurm_cluster.env)
    assert wait_job(job, timeout=30, env=slurm_cluster.env) == "COMPLETED"
    assert job_output(job, env=slurm_cluster.env).split() == ["started", "got", "USR1"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(REPO / "launch" / "local_slurm.py"), *args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    assert r.returncode == 0, f"local_slurm.py {' '.join(args)} failed:\n{r.stdout}{r.stderr}"
    return r


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_cli_up_down_restores_hosts_and_stops_everything_it_started(slurm_cluster, tmp_path):
    # Runs beside the session cluster: the second cluster takes other names and addresses.
    hosts_before = Path("/etc/hosts").read_bytes()
    scratch = tmp_path / "c"
    up = _cli("up", "--nodes", "1", "--cpus-per-node", "1", "--dir", str(scratch))
    try:
        cluster = LocalSlurm.from_state(scratch)
        assert f"export SLURM_CONF={cluster.conf_path}" in up.stdout
        assert cluster.node_names and not set(cluster.node_names) & set(slurm_cluster.node_names)
        assert cluster.node_states() == {cluster.node_names[0]: "idle"}
        hosts_up = Path("/etc/hosts").read_text()
        for name, addr in zip(cluster.node_names, cluster.node_addrs):
            assert f"{addr} {name} " in hosts_up
        daemons = cluster.daemon_pids()
        assert len(daemons) == 2, daemons  # slurmctld + one slurmd
        # A job still running at teardown (ignoring SIGTERM) must not survive it.
        job = sbatch(f"--output={tmp_path}/busy-%j.out", "--wrap", "trap '' TERM; echo up; sleep 600",
                     env=cluster.env, cwd=tmp_path)
        wait_job(job, timeout=30, env=cluster.env, until={"RUNNING"})
        started = cluster.processes()
        assert set(daemons) < set(started), (daemons, started)  # the job's slurmstepd too
    finally:
        _cli("down", "--dir", str(scratch))
    assert Path("/etc/hosts").read_bytes() == hosts_before
    assert [p for p in started if local_slurm.pid_alive(p)] == []
    assert cluster.processes() == []
    assert not cluster.state_path.exists()
    assert len(slurm_cluster.daemon_pids()) == 1 + slurm_cluster.nodes  # the other cluster still runs


def test_bad_scratch_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="contains ' '"):
        LocalSlurm(nodes=1, scratch=tmp_path / "with space")
    with pytest.raises(ValueError, match="too long"):
        LocalSlurm(nodes=1, scratch=tmp_path / ("x" * 80))
    with pytest.raises(ValueError, match="nodes must be"):
        LocalSlurm(nodes=0, scratch=tmp_path)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_down_cleans_up_even_without_the_state_file(slurm_cluster, tmp_path):
    hosts_before = Path("/etc/hosts").read_bytes()
    cluster = LocalSlurm(nodes=1, scratch=tmp_path / "c", cpus_per_node=1)
    cluster.start()
    try:
        started = cluster.processes()
        assert len(cluster.daemon_pids()) == 2
        cluster.state_path.unlink()  # as if the directory had been half cleaned by hand
        with pytest.raises(local_slurm.SlurmStartError, match="still up"):
            LocalSlurm(nodes=1, scratch=cluster.scratch).start()
    finally:
        _cli("down", "--dir", str(cluster.scratch))
    assert Path("/etc/hosts").read_bytes() == hosts_before
    assert [p for p in started if local_slurm.pid_alive(p)] == []
    assert cluster.processes() == []
