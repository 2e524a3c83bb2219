#!/usr/bin/env python3
"""A real SLURM cluster of 1..N emulated nodes on one machine.

It exists so that `sbatch launch/slurm.sh` can be tried (and tested) without a cluster:
slurmctld plus one slurmd per emulated node (Debian's build has MULTIPLE_SLURMD), each
node on its own loopback address (127.0.0.11, 127.0.0.12, ...) and port. Needs root.

    python launch/local_slurm.py up --nodes 2 --dir /tmp/slurm
    export SLURM_CONF=/tmp/slurm/slurm.conf
    sbatch --nodes 2 launch/slurm.sh
    python launch/local_slurm.py down --dir /tmp/slurm

From Python:

    with LocalSlurm(nodes=2, scratch="/tmp/slurm") as cluster:
        subprocess.run(["sinfo"], env=cluster.env, check=True)

Bring-up installs Debian's slurmctld, slurmd and slurm-client when they are missing,
writes slurm.conf and every state, spool, log and PID file under the scratch directory,
and adds one /etc/hosts line per node name. Teardown cancels the cluster's jobs, stops
exactly the daemons it started (found through their PID files and checked against the
scratch directory before any signal), and removes exactly the /etc/hosts lines it added.
Nothing outside the scratch directory is touched apart from those /etc/hosts lines (and
the package install). Everything is standard library, so a bare `python3` runs it.

Timing quirks of SLURM 22.05 worth knowing when testing with it:
- slurmctld looks at time limits every 30 s (its compiled-in PERIODIC_TIMEOUT, not a
  slurm.conf setting) and sends the signal of `--signal=B:USR1@N` at the first look at which at most
  N+30 s are left: between N+30 and N s before the limit, or within the first 30 s of
  a job whose limit is shorter than N+30 s (e.g. --time=2 --signal=B:USR1@90). To
  signal a job's batch shell at once: `scancel --batch --signal=USR1 <job>`.
- A requeued job becomes eligible again after the credential lifetime
  (`AuthInfo=cred_expire`, 30 s by default) and starts about 2 s later.
- There is no accounting database (no sacct): final job states are in `scontrol show job`
  for `MinJobAge` seconds and in the jobcomp file (`LocalSlurm.jobcomp_path`) forever.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
HOSTS_FILE = Path("/etc/hosts")
STATE_FILE_NAME = "local_slurm.json"
# Set in the daemons' environment; slurmstepd inherits it from slurmd, so every process
# this cluster started can be recognised by it (and no other process can).
MARKER_VAR = "LOCAL_SLURM_DIR"
# slurmstepd binds a unix socket <spool>/<node>/<node>_<job>.<step>, and sun_path holds
# 107 bytes: 32 of them for the longest "/<node>/<node>_<job>.<step>" here.
MAX_SPOOL_PATH = 107 - len("/s99n9/s99n9_67043328.4294967294")
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
})


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be run here at all (not root, no apt, packages not installable)."""


class SlurmStartError(RuntimeError):
    """SLURM is installed but the cluster did not come up; the message holds the log tails."""


# --------------------------------------------------------------------------- install

def _which(name: str) -> Optional[str]:
    """Find a program also in the sbin directories, which a login PATH may lack."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def installed() -> bool:
    """Whether the daemons and the client commands are all present."""
    return all(_which(p) for p in ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol"))


def ensure_installed(timeout: float = 300.0) -> None:
    """Install Debian's SLURM packages when missing, or say clearly why that is impossible."""
    if installed():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root "
                               f"(apt-get install {' '.join(PACKAGES)})")
    apt = _which("apt-get")
    if apt is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install "
                               f"{' '.join(PACKAGES)} (not a Debian/Ubuntu system)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "--no-install-recommends", *PACKAGES]
    out = ""
    for step in ([install], [[apt, "update"], install]):
        out = ""
        try:
            for cmd in step:
                r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, timeout=timeout)
                out += r.stdout
                if r.returncode != 0:
                    break
        except subprocess.TimeoutExpired:
            out += f"\n(timed out after {timeout:.0f} s)"
        if installed():
            return
    raise SlurmUnavailable(f"apt-get could not install {' '.join(PACKAGES)}:\n{out[-2000:]}")


# --------------------------------------------------------------------------- helpers

def free_port() -> int:
    """A TCP port that nothing listens on right now (on any address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} missing)"
    return "\n".join(lines[-n:])


def _read_pid(pidfile: Path) -> Optional[int]:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _proc_marker(pid: int) -> Optional[str]:
    """The scratch directory a process belongs to (from its environment), if any."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = MARKER_VAR.encode() + b"="
    for item in env:
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _descendants(roots: Sequence[int]) -> list[int]:
    """All processes below `roots` in the process tree (roots excluded)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting for its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent's wait() is missing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pids_with_marker(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            if _proc_marker(int(entry.name)) == marker:
                pids.append(int(entry.name))
    return pids


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if pid_alive(p)]
    return left


# --------------------------------------------------------------------------- /etc/hosts

class _HostsLock:
    """An advisory lock on /etc/hosts, so that two clusters never pick the same slot."""

    def __enter__(self):
        self.f = open(HOSTS_FILE, "r+")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self.f

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _rewrite(f, text: str) -> None:
    # In place (no rename): /etc/hosts is often a bind mount in containers.
    f.seek(0)
    f.write(text)
    f.truncate()
    f.flush()


def _marker_comment(scratch: Path) -> str:
    return f"# local_slurm {scratch}"


# --------------------------------------------------------------------------- cluster

@dataclasses.dataclass
class LocalSlurm:
    """A SLURM cluster of `nodes` emulated nodes whose files all live under `scratch`.

    Use as a context manager, or call start()/stop(). `env` is the environment the SLURM
    commands need (SLURM_CONF). The partition is `partition` (default `debug`) with no
    time limit; every node claims `cpus_per_node` CPUs and `memory_mb` MB whatever the
    machine has (SlurmdParameters=config_overrides).
    """

    nodes: int = 2
    scratch: Path | str = "/tmp/local_slurm"
    cpus_per_node: int = 2
    memory_mb: int = 4096
    partition: str = "debug"
    cred_expire: int = 30
    kill_wait: int = 30
    first_job_id: Optional[int] = None
    start_timeout: float = 60.0

    # filled in by start()
    slot: int = dataclasses.field(default=-1, init=False)
    node_names: list[str] = dataclasses.field(default_factory=list, init=False)
    node_addrs: list[str] = dataclasses.field(default_factory=list, init=False)
    hosts_block: str = dataclasses.field(default="", init=False)

    def __post_init__(self) -> None:
        self.scratch = Path(self.scratch).absolute()
        if not 1 <= self.nodes <= 9:
            raise ValueError(f"nodes must be between 1 and 9, got {self.nodes}")
        if self.cpus_per_node < 1:
            raise ValueError(f"cpus_per_node must be at least 1, got {self.cpus_per_node}")
        bad = [c for c in str(self.scratch) if c.isspace() or c in "#=\"'"]
        if bad:
            raise ValueError(f"scratch directory {self.scratch} contains {bad[0]!r}, "
                             "which slurm.conf cannot hold; choose a plain path")
        if len(str(self.spool_dir)) > MAX_SPOOL_PATH:
            raise ValueError(f"scratch directory {self.scratch} is too long for slurmstepd's "
                             f"unix sockets; keep it at most {MAX_SPOOL_PATH - len('/spool')} characters")

    # ---- paths
    @property
    def conf_path(self) -> Path:
        return self.scratch / "slurm.conf"

    @property
    def spool_dir(self) -> Path:
        return self.scratch / "spool"

    @property
    def log_dir(self) -> Path:
        return self.scratch / "log"

    @property
    def run_dir(self) -> Path:
        return self.scratch / "run"

    @property
    def jobcomp_path(self) -> Path:
        """One line per finished (or requeued) job: JobId=... JobState=... ExitCode=..."""
        return self.scratch / "jobcomp.txt"

    @property
    def task_prolog_path(self) -> Path:
        return self.run_dir / "task_prolog.sh"

    @property
    def state_path(self) -> Path:
        return self.scratch / STATE_FILE_NAME

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: pass it to sbatch, srun, squeue, scontrol."""
        return dict(os.environ, SLURM_CONF=str(self.conf_path))

    def _pidfiles(self) -> list[Path]:
        return sorted(self.run_dir.glob("slurmd-*.pid"))

    # ---- lifecycle
    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalSlurm":
        """Install if needed, write the config, start the daemons, wait for idle nodes."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local SLURM cluster needs root (it starts slurmctld and "
                                   "slurmd as root and adds node names to /etc/hosts)")
        ensure_installed()
        if self.state_path.exists() or self.processes() or self._marked_hosts_lines():
            raise SlurmStartError(f"a cluster from {self.scratch} is still up (state file, processes "
                                  f"or /etc/hosts lines); run `python {__file__} down --dir {self.scratch}`")
        for d in (self.scratch, self.spool_dir, self.log_dir, self.run_dir, self.scratch / "state"):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._add_hosts()
            for n in self.node_names:
                (self.spool_dir / n).mkdir(exist_ok=True)
            self.conf_path.write_text(self._config())
            # Jobs find the cluster even with --export=NONE, as on a cluster whose
            # slurm.conf lives in /etc/slurm.
            self.task_prolog_path.write_text(f"#!/bin/sh\necho export SLURM_CONF={self.conf_path}\n")
            self.task_prolog_path.chmod(0o755)
            self._save_state()
            self._start_daemons()
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 60.0, grace: float = 5.0) -> None:
        """Cancel all jobs, stop the daemons this cluster started, remove its /etc/hosts lines.

        Jobs get SIGTERM and `grace` seconds before what they run is killed.
        """
        deadline = time.monotonic() + timeout
        try:
            if self._daemon_pid(self.run_dir / "slurmctld.pid") is not None:
                self._cancel_all_jobs(grace, deadline)
            for pidfile in self._pidfiles():
                self._stop_daemon(pidfile, deadline)
            self._stop_daemon(self.run_dir / "slurmctld.pid", deadline)
            # What is left (slurmstepd of jobs that did not end, daemons whose PID file is
            # gone) carries our marker, nothing else does; then what those still run.
            leftovers = self.processes()
            leftovers += _descendants(leftovers)
            for pid in leftovers:
                _kill(pid, signal.SIGKILL)
            left = _wait_gone(leftovers, max(1.0, deadline - time.monotonic()))
            if left:
                raise RuntimeError(f"processes of the SLURM cluster in {self.scratch} did not exit: {left}")
        finally:
            self._remove_hosts()
            try:
                self.state_path.unlink()
            except FileNotFoundError:
                pass

    # ---- pieces
    def _add_hosts(self) -> None:
        with _HostsLock() as f:
            text = f.read()
            used = set()
            for line in text.splitlines():
                if "# local_slurm " in line:
                    parts = line.split()[0].split(".")
                    if len(parts) == 4 and parts[2].isdigit():
                        used.add(int(parts[2]))
            self.slot = next(s for s in range(256) if s not in used)
            prefix = "n" if self.slot == 0 else f"s{self.slot}n"
            self.node_names = [f"{prefix}{i + 1}" for i in range(self.nodes)]
            self.node_addrs = [f"127.0.{self.slot}.{11 + i}" for i in range(self.nodes)]
            lines = [f"{a} {n} {_marker_comment(self.scratch)}\n"
                     for a, n in zip(self.node_addrs, self.node_names)]
            self.hosts_block = ("" if text.endswith("\n") or not text else "\n") + "".join(lines)
            _rewrite(f, text + self.hosts_block)

    def _is_marked(self, line: str) -> bool:
        return line.rstrip("\n").endswith(" " + _marker_comment(self.scratch))

    def _marked_hosts_lines(self) -> list[str]:
        return [l for l in HOSTS_FILE.read_text().splitlines() if self._is_marked(l)]

    def _remove_hosts(self) -> None:
        with _HostsLock() as f:
            text = f.read()
            new = text.replace(self.hosts_block, "", 1) if self.hosts_block else text
            # Lines of this directory's cluster that the block did not cover: edited
            # around, or the state file that knew the block is gone.
            new = "".join(l for l in new.splitlines(keepends=True) if not self._is_marked(l))
            if new != text:
                _rewrite(f, new)
        self.hosts_block = ""

    def _config(self) -> str:
        host = socket.gethostname().split(".")[0]
        ctld_port = free_port()
        first_job = self.first_job_id or random.randint(1000, 60000)
        s = self.scratch
        lines = [
            "# Written by launch/local_slurm.py: a cluster of emulated nodes on one machine.",
            "ClusterName=localslurm",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            # A requeued job may run again only once its credential expired.
            f"AuthInfo=cred_expire={self.cred_expire}",
            f"StateSaveLocation={s}/state",
            f"SlurmdSpoolDir={s}/spool/%n",
            f"SlurmctldPidFile={s}/run/slurmctld.pid",
            f"SlurmdPidFile={s}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={s}/log/slurmctld.log",
            f"SlurmdLogFile={s}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # Start a submitted job at once (batch_sched_delay defaults to 3 s) and look at
            # pending jobs every 2 s (defaults: 60 s and 30 s), so that a requeued job starts
            # soon after it becomes eligible again.
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "EnforcePartLimits=ALL",  # a request the partition can never satisfy is refused at submission
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_path}",
            # Random by default, so that ports derived from job ids differ between clusters.
            f"FirstJobId={first_job}",
            "MinJobAge=3600",
            f"TaskProlog={self.task_prolog_path}",
            f"KillWait={self.kill_wait}",
            "InactiveLimit=0",
            "MessageTimeout=10",
        ]
        for name, addr in zip(self.node_names, self.node_addrs):
            lines.append(f"NodeName={name} NodeAddr={addr} NodeHostname={host} Port={free_port()} "
                         f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.node_names)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _save_state(self) -> None:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["scratch"] = str(self.scratch)
        self.state_path.write_text(json.dumps(fields, indent=1))

    @classmethod
    def from_state(cls, scratch: Path | str) -> "LocalSlurm":
        """The cluster that `up` (or start()) left running in `scratch`."""
        path = Path(scratch).absolute() / STATE_FILE_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no local SLURM cluster state in {path} (is it up?)") from None
        init = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.init}
        obj = cls(**init)
        for f in dataclasses.fields(cls):
            if not f.init:
                setattr(obj, f.name, data[f.name])
        return obj

    def _spawn(self, cmd: list[str], logname: str) -> None:
        env = dict(os.environ, SLURM_CONF=str(self.conf_path))
        env[MARKER_VAR] = str(self.scratch)
        with open(self.log_dir / logname, "ab") as out:
            r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                               timeout=30, start_new_session=True)
        if r.returncode != 0:
            raise SlurmStartError(f"{' '.join(cmd)} exited with {r.returncode}:\n"
                                  f"{_tail(self.log_dir / logname)}")

    def _start_daemons(self) -> None:
        conf = str(self.conf_path)
        # Both daemonise themselves and write their PID files; -c: no state from an older run.
        self._spawn([_which("slurmctld"), "-f", conf, "-c"], "slurmctld.out")
        self._wait_pidfile(self.run_dir / "slurmctld.pid", self.log_dir / "slurmctld.log")
        for name in self.node_names:
            self._spawn([_which("slurmd"), "-f", conf, "-N", name], f"slurmd-{name}.out")
        for name in self.node_names:
            self._wait_pidfile(self.run_dir / f"slurmd-{name}.pid", self.log_dir / f"slurmd-{name}.log")

    def _wait_pidfile(self, pidfile: Path, log: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._daemon_pid(pidfile) is not None:
                return
            time.sleep(0.1)
        raise SlurmStartError(f"no live daemon behind {pidfile} after {self.start_timeout:.0f} s; "
                              f"{log}:\n{_tail(log)}")

    def processes(self) -> list[int]:
        """PIDs of every process this cluster started: daemons and the slurmstepd of jobs."""
        return _pids_with_marker(str(self.scratch))

    def daemon_pids(self) -> list[int]:
        """PIDs of this cluster's live slurmctld and slurmd processes."""
        pidfiles = [self.run_dir / "slurmctld.pid", *self._pidfiles()]
        return [p for p in map(self._daemon_pid, pidfiles) if p is not None]

    def _daemon_pid(self, pidfile: Path) -> Optional[int]:
        """The PID in `pidfile` if that process is alive and belongs to this cluster."""
        pid = _read_pid(pidfile)
        if pid is not None and pid_alive(pid) and _proc_marker(pid) == str(self.scratch):
            return pid
        return None

    def _run(self, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def node_states(self) -> dict[str, str]:
        """Node name -> sinfo's short state (idle, alloc, mix, down*, ...)."""
        r = self._run("sinfo", "-h", "-N", "-o", "%N %t")
        states = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in self.node_names:
                states[parts[0]] = parts[1]
        return states

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                states = self.node_states()
            except subprocess.TimeoutExpired:
                states = {}
            if len(states) == self.nodes and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p}:\n{_tail(p, 15)}" for p in sorted(self.log_dir.glob("*.log")))
        raise SlurmStartError(f"nodes not idle after {self.start_timeout:.0f} s: {states}\n{logs}")

    def _cancel_all_jobs(self, grace: float, deadline: float) -> None:
        try:
            ids = self._run("squeue", "-h", "-o", "%i", timeout=15).stdout.split()
            if not ids:
                return
            self._run("scancel", *ids, timeout=15)
            if self._wait_no_jobs(min(deadline, time.monotonic() + grace)):
                return
            # `scancel --signal=KILL` is an ordinary cancel in SLURM 22.05: a job that
            # ignores SIGTERM would hold the teardown for KillWait seconds.
            for pid in self._job_processes():
                _kill(pid, signal.SIGKILL)
            self._wait_no_jobs(deadline)
        except subprocess.TimeoutExpired:
            pass  # the daemons are stopped next anyway; leftovers are killed by marker

    def _wait_no_jobs(self, deadline: float) -> bool:
        while True:
            r = self._run("squeue", "-h", "-o", "%i", timeout=15)
            if r.returncode != 0 or not r.stdout.split():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def _job_processes(self) -> list[int]:
        """What the jobs run: the descendants of this cluster's slurmstepd processes."""
        stepds = [p for p in self.processes() if _cmdline(p).startswith(b"slurmstepd")]
        return _descendants(stepds)

    def _stop_daemon(self, pidfile: Path, deadline: float) -> None:
        pid = self._daemon_pid(pidfile)
        if pid is None:
            return
        _kill(pid, signal.SIGTERM)
        if _wait_gone([pid], max(1.0, min(15.0, deadline - time.monotonic()))):
            _kill(pid, signal.SIGKILL)
            _wait_gone([pid], 5.0)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- CLI

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="A real SLURM cluster of emulated nodes on this machine (root).")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="install if needed, start, wait until the nodes are idle")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--dir", required=True, help="scratch directory for config, state, logs")
    up.add_argument("--cpus-per-node", type=int, default=2)
    up.add_argument("--memory-mb", type=int, default=4096)
    up.add_argument("--partition", default="debug")
    up.add_argument("--cred-expire", type=int, default=30,
                    help="seconds; a requeued job waits about this long before it runs again")
    up.add_argument("--kill-wait", type=int, default=30,
                    help="seconds between SIGTERM and SIGKILL at a time limit or scancel")
    up.add_argument("--timeout", type=float, default=60.0)
    down = sub.add_parser("down", help="cancel jobs, stop the daemons, restore /etc/hosts")
    down.add_argument("--dir", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            cluster = LocalSlurm(nodes=args.nodes, scratch=args.dir, cpus_per_node=args.cpus_per_node,
                                 memory_mb=args.memory_mb, partition=args.partition,
                                 cred_expire=args.cred_expire, kill_wait=args.kill_wait,
                                 start_timeout=args.timeout)
            cluster.start()
            print(f"SLURM is up: nodes {','.join(cluster.node_names)}, partition {cluster.partition}.")
            print(f"export SLURM_CONF={cluster.conf_path}")
        else:
            try:
                cluster = LocalSlurm.from_state(args.dir)
            except FileNotFoundError:
                # The state file is gone: still stop whatever carries this directory's
                # marker and remove the /etc/hosts lines that name it.
                cluster = LocalSlurm(nodes=1, scratch=args.dir)
            cluster.stop()
            print(f"SLURM cluster in {cluster.scratch} is down.")
    except (SlurmUnavailable, SlurmStartError, FileNotFoundError, ValueError) as e:
        print(f"local_slurm: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
