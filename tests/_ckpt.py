"""Shared by the checkpoint, resume and fault tests: tiny training runs as real processes that
can be signalled or killed while they train."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from tests._mp import PYTHON, REPO, base_env, free_port, run
from tests.conftest import TINY

# a tiny model; sample grids and logs rarely, so that the runs spend their time training
ARGS = [*TINY, "train.log_every=1000", "train.sample_every=1000", "model.dcgan.norm=batch", "eval.enabled=false"]
TRAIN = ["-m", "gan_dist.train"]
BIN = Path(PYTHON).parent


def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [PYTHON, *TRAIN, *ARGS, f"run.dir={run_dir}", *extra]


def train(run_dir: Path, *extra: str, timeout: float = 240, check: bool = True,
          env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return run(train_cmd(run_dir, *extra), timeout=timeout, check=check, env=env or base_env(), cwd=REPO)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def latest(run_dir: Path) -> Optional[Path]:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    return pointer.parent / pointer.read_text().strip() if pointer.is_file() else None


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step"))


class Ranks:
    """`world_size` training processes started by hand (as a launcher would), so that a test can
    signal one of them. Output goes to files; `wait()` never hangs."""

    def __init__(self, args: Sequence[str], world_size: int, extra_env: Optional[dict] = None) -> None:
        self.logdir = Path(tempfile.mkdtemp(prefix="ckpt-ranks-"))
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        for r in range(world_size):
            env = base_env(**(extra_env or {}))
            if world_size > 1:
                env.update(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(r),
                           LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            self.procs.append(subprocess.Popen(
                list(args), cwd=REPO, env=env, stdout=open(self.logdir / f"{r}.out", "w"),
                stderr=open(self.logdir / f"{r}.err", "w"), start_new_session=True))

    def stderr(self, r: int) -> str:
        return (self.logdir / f"{r}.err").read_text()

    def logs(self) -> str:
        return "\n".join(f"--- rank {r} stderr:\n{self.stderr(r)[-4000:]}" for r in range(len(self.procs)))

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if any(p.poll() is not None for p in self.procs):
                self.kill()
                raise AssertionError(f"a rank exited before {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.02)

    def signal(self, r: int, sig: int) -> None:
        os.kill(self.procs[r].pid, sig)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"ranks did not exit within {timeout}s\n{self.logs()}")
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts workers in their own sessions,
    out of reach of a kill of the launcher's process group)."""
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children(p))
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def models(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "models.pt", weights_only=True)


def assert_tensors_equal(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
