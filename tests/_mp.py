"""Run real multi-process jobs from tests: free ports, timeouts, and teardown that never hangs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(threads: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_JOB_ID"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               GAN_DIST_PG_TIMEOUT="120", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _kill(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run(cmd: Sequence[str], timeout: float = 300, cwd: Optional[Path] = None,
        env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    """One command (a launcher or a single process) in its own process group, killed on timeout."""
    env = env if env is not None else base_env()
    p = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill([p])
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
    result = subprocess.CompletedProcess(list(cmd), p.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {' '.join(cmd)}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-6000:]}")
    return result


def run_ranks(script: Sequence[str], world_size: int, timeout: float = 300, cwd: Optional[Path] = None,
              extra_env: Optional[dict] = None) -> list[subprocess.CompletedProcess]:
    """`world_size` processes of `script` with RANK/WORLD_SIZE/MASTER_* set, as a launcher would.

    If one rank fails, the others are killed at once (they would wait in a collective).
    """
    import tempfile

    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="ranks-"))
    procs, files = [], []
    for r in range(world_size):
        env = base_env(**(extra_env or {}))
        env.update(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out, err = open(logdir / f"{r}.out", "w+"), open(logdir / f"{r}.err", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen([PYTHON, *script], cwd=cwd, env=env, stdout=out, stderr=err,
                                      text=True, start_new_session=True))

    def text(i: int, which: int) -> str:
        f = files[i][which]
        f.flush()
        f.seek(0)
        return f.read()

    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                i = bad[0]
                raise AssertionError(f"rank {i} exited {codes[i]}\nstdout:\n{text(i, 0)[-3000:]}\n"
                                     f"stderr:\n{text(i, 1)[-6000:]}")
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{world_size}-process job timed out after {timeout}s: {script}\n"
                                     + "\n".join(f"rank {i} stderr:\n{text(i, 1)[-3000:]}" for i in range(world_size)))
            time.sleep(0.1)
        return [subprocess.CompletedProcess(p.args, 0, text(i, 0), text(i, 1)) for i, p in enumerate(procs)]
    finally:
        _kill(procs)
        for out, err in files:
            out.close()
            err.close()
