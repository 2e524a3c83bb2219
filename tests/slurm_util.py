"""A real local SLURM cluster for the tests, and small helpers to submit to it and wait.

The cluster comes from launch/local_slurm.py. Tests that use `slurm_cluster` skip with a
reason when SLURM cannot run here (not root, no apt, not Debian); any other failure to
bring it up is an error. Every wait has a timeout and ends in a message naming the job.
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_local_slurm():
    """launch/ is not a package (users run its files directly): load the module by path."""
    name = "local_slurm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "launch" / "local_slurm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


local_slurm = _load_local_slurm()
LocalSlurm = local_slurm.LocalSlurm
FINAL_STATES = local_slurm.FINAL_STATES

# One cluster per pytest process, even when several test modules import the fixture
# (each import makes its own session-scoped fixture definition).
_CLUSTER: Optional["LocalSlurm"] = None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> "LocalSlurm":
    """Two emulated nodes (n1, n2 unless another cluster is up), 2 CPUs each, partition debug.

    The credential lifetime is 10 s, so a requeued job runs again after about 12 s.
    """
    global _CLUSTER
    if _CLUSTER is not None:
        yield _CLUSTER
        return
    if os.geteuid() != 0:
        pytest.skip("real SLURM tests need root: they start slurmctld/slurmd and add node names to /etc/hosts")
    cluster = LocalSlurm(nodes=2, scratch=tmp_path_factory.mktemp("slurm"), cpus_per_node=2, cred_expire=10)
    try:
        cluster.start()
    except local_slurm.SlurmUnavailable as e:
        pytest.skip(f"no real SLURM here: {e}")
    _CLUSTER = cluster
    try:
        yield cluster
    finally:
        _CLUSTER = None
        cluster.stop()


def _env(env: Optional[Mapping[str, str]]) -> dict[str, str]:
    return dict(os.environ if env is None else env)


def slurm_cmd(*cmd: str, env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None,
              timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a SLURM client command; a hang is a test failure with the command named."""
    try:
        return subprocess.run(list(cmd), env=_env(env), cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`{' '.join(cmd)}` did not return within {timeout:.0f} s:\n"
                             f"{e.stdout or ''}{e.stderr or ''}") from None


def sbatch(*args: str, env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None) -> int:
    """Submit a batch job and return its id (sbatch --parsable)."""
    r = slurm_cmd("sbatch", "--parsable", *args, env=env, cwd=cwd)
    if r.returncode != 0:
        raise AssertionError(f"sbatch {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return int(r.stdout.strip().split(";")[0])


def _parse_fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w[\w:/]*)=(\S*)", line))


def job_info(job_id: int, *, env: Optional[Mapping[str, str]] = None) -> Optional[dict[str, str]]:
    """`scontrol show job` as a dict (JobState, Restarts, StdOut, NodeList, ExitCode, ...);
    None once slurmctld has forgotten the job (after MinJobAge, 1 h here)."""
    r = slurm_cmd("scontrol", "show", "job", "-o", str(job_id), env=env)
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return _parse_fields(r.stdout.splitlines()[0])


def jobcomp_records(job_id: Optional[int] = None, *,
                    env: Optional[Mapping[str, str]] = None) -> list[dict[str, str]]:
    """The jobcomp file's records (one per end of a run, requeues included), oldest first."""
    conf = Path(_env(env).get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    loc = re.search(r"^JobCompLoc=(\S+)", conf.read_text(), re.M)
    if loc is None or not Path(loc.group(1)).exists():
        return []
    records = [_parse_fields(l) for l in Path(loc.group(1)).read_text().splitlines() if l.strip()]
    return [r for r in records if job_id is None or r.get("JobId") == str(job_id)]


def wait_job(job_id: int, timeout: float, *, env: Optional[Mapping[str, str]] = None,
             until: Iterable[str] = FINAL_STATES, poll: float = 0.5) -> str:
    """Wait until the job is in one of `until` (default: any final state) and return it.

    A requeued job passes through PENDING again, so it is only final after its last run.
    """
    until = frozenset(until)
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while True:
        info = job_info(job_id, env=env)
        if info is not None:
            state = info.get("JobState", "UNKNOWN")
        else:  # forgotten by slurmctld: the jobcomp file has the last word
            records = jobcomp_records(job_id, env=env)
            state = records[-1].get("JobState", "UNKNOWN") if records else "UNKNOWN"
        if state in until:
            return state
        if time.monotonic() > deadline:
            shown = slurm_cmd("scontrol", "show", "job", str(job_id), env=env).stdout
            raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s "
                                 f"(waiting for {sorted(until)}):\n{shown}")
        time.sleep(poll)


def job_output(job_id: int, *, env: Optional[Mapping[str, str]] = None,
               path: Optional[Path] = None) -> str:
    """The job's stdout file (scontrol's StdOut, or `path` when given); '' if not written yet."""
    if path is None:
        info = job_info(job_id, env=env)
        if info is None or not info.get("StdOut"):
            raise AssertionError(f"job {job_id} is unknown to scontrol; pass the output path")
        path = Path(info["StdOut"])
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def signal_batch(job_id: int, sig: signal.Signals | str = "USR1", *,
                 env: Optional[Mapping[str, str]] = None) -> None:
    """Send a signal to the job's batch shell now (what `--signal=B:SIG@N` does near the limit)."""
    name = sig.name.removeprefix("SIG") if isinstance(sig, signal.Signals) else str(sig)
    r = slurm_cmd("scancel", "--batch", f"--signal={name}", str(job_id), env=env)
    if r.returncode != 0:
        raise AssertionError(f"scancel --batch --signal={name} {job_id} failed:\n{r.stdout}{r.stderr}")
